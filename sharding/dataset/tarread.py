"""Stream the samples of a shard tar (WebDataset convention) with their byte offsets."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TarSample:
    key: str
    members: dict[str, bytes]  # extension ("meta.json") -> bytes
    offset: int  # offset of the sample's first tar header in the shard
    size: int  # bytes from that header to the next sample's header


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/KEY.ext.more` -> (`KEY`, `ext.more`): keys hold no dots, extensions may."""
    base = name.rsplit("/", 1)[-1]
    key, _, extension = base.partition(".")
    return key, extension


def iter_tar_samples(path: str | Path) -> Iterator[TarSample]:
    """Yield samples in file order; raises tarfile.TarError / ValueError on a damaged tar."""
    current: TarSample | None = None
    with tarfile.open(path, "r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, extension = split_member_name(info.name)
            if not extension:
                raise ValueError(f"{path}: member {info.name!r} has no extension")
            if current is None or key != current.key:
                if current is not None:
                    current.size = info.offset - current.offset
                    yield current
                current = TarSample(key, {}, info.offset, 0)
            if extension in current.members:
                raise ValueError(f"{path}: member {info.name!r} appears twice")
            current.members[extension] = tar.extractfile(info).read()
            end = info.offset_data + ((info.size + 511) // 512) * 512
        if current is not None:
            current.size = end - current.offset
            yield current
