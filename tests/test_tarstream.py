"""phileo/tarstream.py: the shard reader against tarfile-written archives and WebDataset's grouping."""

from __future__ import annotations

import io
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from phileo.tarstream import (
    TarFormatError,
    count_samples,
    iter_members,
    iter_sample_spans,
    iter_samples,
    split_key,
)

MEMBERS = [("a_1.meta.json", b"{}"), ("a_1.s2_10m.b2nd", bytes(range(256)) * 5), ("a_1.txt", b""),
           ("b-2.meta.json", b'{"k": 1}'), ("b-2.cloud.b2nd", b"x" * 513),
           ("dir/" + "c" * 120 + ".meta.json", b"long name")]


def make_tar(fmt: int, members=MEMBERS, directory: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Trickle(io.RawIOBase):
    """A stream returning at most 100 bytes per read, as a slow socket does."""

    def __init__(self, data: bytes):
        self.data, self.position = data, 0

    def read(self, size: int = -1) -> bytes:
        size = 100 if size < 0 else min(size, 100)
        chunk = self.data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_match_tarfile_in_every_format(fmt):
    if fmt == tarfile.USTAR_FORMAT:  # ustar splits long names into prefix + name
        members = [(n if len(n) < 100 else "d" * 60 + "/" + "c" * 90 + ".meta.json", d) for n, d in MEMBERS]
    else:
        members = MEMBERS
    data = make_tar(fmt, members)
    assert list(iter_members(io.BytesIO(data))) == members
    assert list(iter_members(Trickle(data))) == members


def test_samples_group_like_webdataset():
    data = make_tar(tarfile.PAX_FORMAT, directory=False)
    ours = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(io.BytesIO(data), "u")]
    theirs = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
              for s in group_by_keys(tar_file_expander([{"url": "u", "stream": io.BytesIO(data)}]))]
    assert ours == theirs and [s["__key__"] for s in ours] == ["a_1", "b-2", "dir/" + "c" * 120]


def test_truncated_and_corrupt_archives_raise_after_the_complete_samples():
    data = make_tar(tarfile.PAX_FORMAT, directory=False)
    truncated = data[: len(data) // 2]
    seen = []
    with pytest.raises(TarFormatError, match="truncated"):
        for sample in iter_samples(io.BytesIO(truncated), "u"):
            seen.append(sample["__key__"])
    assert seen == ["a_1"]  # the half-read second sample is never yielded
    corrupt = bytearray(data)
    corrupt[0] ^= 0xFF  # first header's name: the checksum no longer matches
    with pytest.raises(TarFormatError, match="checksum at byte 0"):
        list(iter_members(io.BytesIO(bytes(corrupt))))
    with pytest.raises(TarFormatError, match="appears twice"):
        list(iter_samples(io.BytesIO(make_tar(tarfile.PAX_FORMAT, [("k.a", b"1"), ("k.a", b"2")])), "u"))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_sample_spans_are_the_byte_ranges_tarfile_sees(fmt):
    data = make_tar(fmt, directory=False)
    spans = list(iter_sample_spans(io.BytesIO(data), "mem.tar"))
    assert [key for key, _, _, _ in spans] == ["a_1", "b-2", "dir/" + "c" * 120]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        starts = {}
        for info in tar:  # a sample starts at the first header (pax / long-name ones included) of its first member
            starts.setdefault(split_key(info.name)[0], info.offset)
    for (key, members, offset, size), following in zip(spans, spans[1:] + [None]):
        assert offset == starts[key]
        assert following is None or offset + size == following[2]  # samples tile the archive
        sample = list(iter_sample_spans(io.BytesIO(data[offset: offset + size]), "slice"))
        assert sample == [(key, members, 0, size)]  # a sample's span alone reads back as that sample


def test_sample_spans_refuse_what_a_dataset_must_not_hold():
    with pytest.raises(TarFormatError, match="mem.tar: member 'noext' has no extension"):
        list(iter_sample_spans(io.BytesIO(make_tar(tarfile.PAX_FORMAT, [("noext", b"1")], False)), "mem.tar"))
    with pytest.raises(TarFormatError, match="appears twice"):
        list(iter_sample_spans(io.BytesIO(make_tar(tarfile.PAX_FORMAT, [("k.a", b"1"), ("k.a", b"2")], False)), "x"))


def test_count_samples_reads_headers_only_and_notices_truncation(tmp_path):
    data = make_tar(tarfile.PAX_FORMAT)
    assert count_samples(io.BytesIO(data)) == 3  # a_1, b-2, dir/ccc...: the directory entry is no sample
    with pytest.raises(TarFormatError, match="truncated"):
        count_samples(io.BytesIO(data[:1800]))
