"""The samples of a shard with their byte spans (phileo/tarstream.py reads the tar)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from phileo.tarstream import iter_sample_spans

BUFFER = 1 << 20


@dataclass
class TarSample:
    key: str
    members: dict[str, bytes]  # extension ("meta.json") -> bytes
    offset: int  # offset of the sample's first tar header in the shard
    size: int  # bytes from that header to the next sample's header


def iter_tar_samples(path: str | Path) -> Iterator[TarSample]:
    """Yield samples in file order; TarFormatError (a ValueError) on a damaged tar."""
    with open(path, "rb", buffering=BUFFER) as stream:
        yield from iter_stream_samples(stream, str(path))


def iter_stream_samples(stream: BinaryIO, where: str) -> Iterator[TarSample]:
    """Samples of an open shard stream (local file or remote, read front to back), in file order."""
    for key, members, offset, size in iter_sample_spans(stream, where):
        yield TarSample(key, members, offset, size)
