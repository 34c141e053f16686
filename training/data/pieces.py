"""What a DataLoader worker reads: its crops grouped by shard, and the byte range of each part of a shard.

A worker's crops (training/data/epoch.py `EpochPlan.crop_ids`) become one `ShardPiece` per shard:
the tiles it needs there, by position in the shard, each with the crop indices to cut. A piece
that starts or ends inside its shard gets the byte range `[offset of its first tile, end of its
last tile)` from the dataset's index.parquet (docs/format.md section 8), read in the rank's main
process for the few shards that need it: only the row groups whose `shard` statistics can hold
them are read, never the whole index. A local shard is then read from a seek, a remote one with
a ranged request. Without an index (a plain list of tar URLs) or when it cannot be read, the
worker streams the shard from its start and skips the samples before its first tile without
decoding them.
"""

from __future__ import annotations

import logging
import posixpath
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from training.data.epoch import EpochPlan
from training.data.position import tile_groups
from training.data.shards import is_remote

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["shard", "offset", "bytes"]


@dataclass(frozen=True)
class ShardPiece:
    url: str
    samples: int  # in the whole shard
    tiles: tuple[tuple[int, tuple[int, ...]], ...]  # (position in the shard, crop indices to cut), increasing
    span: tuple[int, int] | None = None  # bytes [start, end) of the shard from its first to its last tile
    index: str | None = None  # the dataset's index.parquet, when the shard has one

    @property
    def whole(self) -> bool:
        """From the shard's first sample to its last: read as a plain stream."""
        return self.tiles[0][0] == 0 and self.tiles[-1][0] == self.samples - 1

    @property
    def crops(self) -> int:
        return sum(len(crops) for _, crops in self.tiles)


def worker_pieces(plan: EpochPlan, rank: int, worker: int) -> list[ShardPiece]:
    """This worker's shards in the epoch order, with the tiles and crops it takes from each."""
    size = plan.crops_per_tile
    pieces = []
    for slot, tiles in tile_groups(plan.tile_starts, plan.crop_ids(rank, worker), size):
        shard = plan.shards[int(plan.order[slot])]
        cut = tuple((int(position), tuple(int(c) % size for c in crops)) for position, crops in tiles)
        pieces.append(ShardPiece(shard.url, shard.samples, cut, index=shard.index))
    return pieces


def rank_pieces(plan: EpochPlan, rank: int) -> list[list[ShardPiece]]:
    """Every worker's pieces of this rank, partial ones with their byte spans (one index read per dataset)."""
    pieces = [worker_pieces(plan, rank, worker) for worker in range(plan.layout.streams)]
    wanted: dict[str, set[str]] = defaultdict(set)
    for piece in (p for worker in pieces for p in worker if not p.whole and p.index):
        wanted[piece.index].add(piece.url)
    spans: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for index, urls in wanted.items():
        spans |= sample_spans(index, sorted(urls))
    return [[_with_span(piece, spans.get(piece.url)) for piece in worker] for worker in pieces]


def _with_span(piece: ShardPiece, offsets: tuple[np.ndarray, np.ndarray] | None) -> ShardPiece:
    if piece.whole or offsets is None:
        return piece
    starts, sizes = offsets
    if len(starts) != piece.samples:
        log.warning("%s: index.parquet lists %d samples, the manifest %d; streaming the shard from its start",
                    piece.url, len(starts), piece.samples)
        return piece
    first, last = piece.tiles[0][0], piece.tiles[-1][0]
    return replace(piece, span=(int(starts[first]), int(starts[last] + sizes[last])))


def _relative(index: str, url: str) -> str | None:
    root = posixpath.dirname(index)
    return url[len(root) + 1:] if url.startswith(root + "/") else None


def _open_index(index: str):
    if index.startswith("s3://"):
        from phileo.remote import s3_filesystem

        return s3_filesystem().open(index, "rb", block_size=4 << 20, cache_type="readahead")
    if is_remote(index):
        import fsspec

        return fsspec.open(index, "rb", block_size=4 << 20).open()
    return open(index[len("file://"):] if index.startswith("file://") else index, "rb")


def sample_spans(index: str, urls: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """url -> (offsets, sizes) of its samples in file order, from the row groups of `index` that can hold them.

    The index is written in shard order, so a shard's rows sit in one or two row groups, found
    from the `shard` column's min/max statistics. {} (and a warning) when the index cannot be read.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = {name: url for url in urls if (name := _relative(index, url)) is not None}
    if not names or (not is_remote(index) and not Path(index).is_file()):
        return {}
    try:
        with _open_index(index) as file:
            parquet = pq.ParquetFile(file)
            column = parquet.schema_arrow.get_field_index("shard")
            groups = [g for g in range(parquet.num_row_groups)
                      if _may_hold(parquet.metadata.row_group(g).column(column).statistics, names)]
            table = parquet.read_row_groups(groups, columns=INDEX_COLUMNS) if groups else None
    except (OSError, ValueError, KeyError, pa.ArrowException) as error:
        log.warning("%s: unreadable (%s); shards are streamed from their start instead", index, error)
        return {}
    if table is None:
        return {}
    table = table.filter(pc.is_in(table["shard"], value_set=pa.array(sorted(names))))
    shard = table["shard"].to_numpy(zero_copy_only=False)
    offsets, sizes = table["offset"].to_numpy(), table["bytes"].to_numpy()
    return {names[name]: (offsets[shard == name], sizes[shard == name]) for name in names if (shard == name).any()}


def _may_hold(statistics, names: dict[str, str]) -> bool:
    if statistics is None or not statistics.has_min_max:
        return True
    return any(statistics.min <= name <= statistics.max for name in names)
