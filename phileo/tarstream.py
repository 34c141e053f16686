"""The one streaming tar reader of shards: samples in file order, for the loader and the dataset tools.

The trainer reads samples as {"__key__", ext: bytes} (`iter_samples`); verify, inspect and the
tests read them with their byte spans in the shard (`iter_sample_spans`), the offsets that
index.parquet records. Bytes in, members out: no file system, no network.

Python's tarfile in stream mode builds a TarInfo and copies every member through its own
buffering, a large share of the loader's time on 10 MB tiles when it was measured. Shards are
plain ustar/pax tars written by one writer, so reading 512-byte headers and `read(size)`
directly is enough, and ~6x faster (tests/test_tarstream.py checks it against tarfile;
docs/benchmarks.md, data loader, shows its share of a tile's time today). Grouping follows
WebDataset: consecutive members whose names share the part before the first dot of the basename
form one sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file types (7: contiguous file)
_SKIPPED = (b"5", b"1", b"2", b"g")  # directories, links and global pax headers carry no member data


class TarFormatError(ValueError):
    """The stream is not a well-formed tar (bad checksum, truncated member); the message says where."""


def _read_exact(stream: BinaryIO, size: int, offset: int) -> bytes:
    """`size` bytes or TarFormatError: remote streams may return short reads, a truncated shard ends early."""
    data = stream.read(size)
    if len(data) == size:
        return data
    parts, got = [data], len(data)
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            raise TarFormatError(f"truncated at byte {offset + got}: {size - got} bytes of a member missing")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _field(header: bytes, start: int, end: int) -> bytes:
    return header[start:end].split(b"\0", 1)[0]


def _parse_header(header: bytes, offset: int) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar header; TarFormatError when its checksum is wrong."""
    try:
        checksum = int(_field(header, 148, 156).strip() or b"0", 8)
        size = int(_field(header, 124, 136).strip() or b"0", 8)
    except ValueError as error:
        raise TarFormatError(f"unreadable header at byte {offset}") from error
    if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field counted as spaces
        raise TarFormatError(f"bad header checksum at byte {offset}")
    name = _field(header, 0, 100).decode("utf-8")
    prefix = _field(header, 345, 500).decode("utf-8") if header[257:262] == b"ustar" else ""
    return (f"{prefix}/{name}" if prefix else name), size, header[156:157]


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<value>\\n" records)."""
    for record in data.split(b"\n"):
        _, _, field = record.partition(b" ")
        if field.startswith(b"path="):
            return field[len(b"path="):].decode("utf-8")
    return None


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular member, in order; TarFormatError on a damaged stream."""
    for name, data, _, _ in iter_member_spans(stream):
        yield name, data


def iter_member_spans(stream: BinaryIO, headers_only: bool = False) -> Iterator[tuple[str, bytes, int, int]]:
    """(name, bytes, start, end) of every regular member: [start, end) spans its headers (pax or GNU
    long-name ones included), data and padding in the stream.

    `headers_only` (a seekable stream): members' data is skipped with a seek and yielded as b"".
    """
    offset, long_name, start = 0, None, 0
    total = stream.seek(0, 2) if headers_only else None
    if headers_only:
        stream.seek(0)
    while True:
        header = stream.read(BLOCK)
        if not header:  # end of stream without the zero-block trailer: tolerated
            return
        if len(header) < BLOCK:  # a short read (sockets), or a truncated header
            header += _read_exact(stream, BLOCK - len(header), offset + len(header))
        if header == b"\0" * BLOCK:  # end of archive
            return
        name, size, kind = _parse_header(header, offset)
        padding = -size % BLOCK
        if headers_only and kind in _REGULAR:
            if offset + BLOCK + size > total:
                raise TarFormatError(f"truncated at byte {total}: a member needs {offset + BLOCK + size}")
            data = b""
            stream.seek(size + padding, 1)
        else:
            data = _read_exact(stream, size, offset + BLOCK)
            if padding:
                _read_exact(stream, padding, offset + BLOCK + size)
        offset += BLOCK + size + padding
        if kind == b"x":  # pax header: applies to the next member
            long_name = _pax_path(data) or long_name
        elif kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind in _REGULAR:
            yield (long_name or name), data, start, offset
            long_name, start = None, offset
        elif kind in _SKIPPED:
            long_name, start = None, offset
        else:
            raise TarFormatError(f"unsupported member type {kind!r} at byte {offset}")


def split_key(name: str) -> tuple[str, str]:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`), as WebDataset's base_plus_ext."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension


def iter_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """Consecutive members with one key -> {"__key__", "__url__", ext: bytes}."""
    sample: dict = {}
    for name, data in iter_members(stream):
        key, extension = split_key(name)
        if not extension:
            continue  # not a sample member (WebDataset skips these too)
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        if not sample:
            sample = {"__key__": key, "__url__": url}
        if extension in sample:
            raise TarFormatError(f"{url}: member {name!r} appears twice in sample {key}")
        sample[extension] = data
    if sample:
        yield sample


def iter_sample_spans(stream: BinaryIO, where: str) -> Iterator[tuple[str, dict[str, bytes], int, int]]:
    """(key, {extension: bytes}, offset, size) per sample; [offset, offset + size) is the sample's bytes.

    Strict, as a dataset check must be: a member without an extension or a repeated member of one
    sample is a TarFormatError naming `where`.
    """
    key, members, offset, end = None, {}, 0, 0
    for name, data, start, stop in iter_member_spans(stream):
        member_key, extension = split_key(name)
        if not extension:
            raise TarFormatError(f"{where}: member {name!r} has no extension")
        if member_key != key:
            if key is not None:
                yield key, members, offset, start - offset
            key, members, offset = member_key, {}, start
        if extension in members:
            raise TarFormatError(f"{where}: member {name!r} appears twice")
        members[extension] = data
        end = stop
    if key is not None:
        yield key, members, offset, end - offset


def count_samples(stream: BinaryIO) -> int:
    """Distinct sample keys of a seekable shard, from its headers alone (data is seeked over)."""
    keys = (split_key(name) for name, _, _, _ in iter_member_spans(stream, headers_only=True))
    return len({key for key, extension in keys if extension})
