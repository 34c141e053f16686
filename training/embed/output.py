"""The output directory of `phileo-train embed`, in the layout of Major-TOM's embedding datasets.

    OUT/embed.json                    the arguments and the shard list (a rerun must match them)
    OUT/embeddings/part_NNNNN.parquet one per input shard (N = its position in the shard list)
    OUT/summary.json, OUT/_SUCCESS    written last, once every shard has its part

A part is written under `part_NNNNN.parquet.<pid>.tmp` and renamed when complete, so a part under its
final name is complete (its footer is read back to be sure) and a rerun skips its shard. A killed run
leaves only .tmp files, which the next run deletes. Rank 0 holds `.phileo-train.lock` for the run:
one command owns an output (phileo/output_lock.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from phileo.urls import redact
from training.config import BadDataError, ConfigError
from training.data.epoch import fingerprint
from training.data.shards import ShardInfo
from training.embed.rows import FILE_SCHEMA

log = logging.getLogger(__name__)

EMBED_JSON, SUMMARY, SUCCESS = "embed.json", "summary.json", "_SUCCESS"
PARTS_DIR, LOCK = "embeddings", ".phileo-train.lock"
ROW_GROUP_ROWS = 4096


def part_path(out: Path, index: int) -> Path:
    return out / PARTS_DIR / f"part_{index:05d}.parquet"


def run_record(arguments: dict, shards: list[ShardInfo]) -> dict:
    """What embed.json holds: the arguments that decide the rows, and the shards (URLs without secrets)."""
    return {"arguments": arguments, "dataset": fingerprint(shards),
            "shards": [{"url": redact(s.url), "samples": s.samples} for s in shards]}


def claim_output(out: Path, record: dict) -> list[int]:
    """Check or write embed.json and clear leftovers; the indices of the shards still without a part.

    Rank 0 only, under the lock. ConfigError when OUT is a file or holds a run with other arguments.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out}: exists and is not a directory")
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    saved = out / EMBED_JSON
    if saved.is_file():
        previous = json.loads(saved.read_text())
        changed = [f"--{k.replace('_', '-')}" for k in record["arguments"]
                   if previous["arguments"].get(k) != record["arguments"][k]]
        if previous["dataset"] != record["dataset"]:  # sample counts, not URLs: a dataset may move
            changed.append("--shards (other shards)")
        if changed:
            raise ConfigError(f"--output {out}: holds embeddings made with another {changed[0]} ({saved}); "
                              "use a new --output, or the same arguments to resume")
    else:
        _write_atomic(saved, json.dumps(record, indent=1))
    for leftover in (out / PARTS_DIR).glob("*.tmp"):
        leftover.unlink()
    (out / SUCCESS).unlink(missing_ok=True)  # this run decides again whether the output is complete
    return [index for index in range(len(record["shards"])) if not _complete(part_path(out, index))]


def _complete(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid) as error:  # not ours to keep: a rename is atomic, so this was damaged later
        log.warning("%s is unreadable (%s); embedding its shard again", path, error)
        path.unlink()
        return False
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class PartWriter:
    """One shard's part file: rows in row groups of ROW_GROUP_ROWS, renamed into place by `close`."""

    def __init__(self, out: Path, index: int, shard_url: str):
        self.path = part_path(out, index)
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self.shard_url, self.pending, self.rows = redact(shard_url), [], 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        if sum(len(t) for t in self.pending) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending = []
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, FILE_SCHEMA)
        self.writer.write_table(table, row_group_size=len(table))
        self.rows += len(table)

    def close(self, tiles: int, bad: int) -> None:
        """Finish the file: its counts in the footer (`phileo` key), then the rename."""
        self._flush()
        if self.writer is None:  # a shard without a usable tile still gets its (empty) part: it is done
            self.writer = pq.ParquetWriter(self.tmp, FILE_SCHEMA)
        self.writer.add_key_value_metadata({"phileo": json.dumps({"shard": self.shard_url, "tiles": tiles,
                                                                  "bad_tiles": bad, "rows": self.rows})})
        self.writer.close()
        os.replace(self.tmp, self.path)


def write_summary(out: Path, record: dict, elapsed_s: float, max_bad_fraction: float) -> dict:
    """summary.json from the parts' footers, then _SUCCESS: the output is complete. BadDataError (and no
    _SUCCESS) when more tiles were unreadable than --max-bad-fraction allows, however many runs it took."""
    totals = {"parts": 0, "rows": 0, "tiles": 0, "bad_tiles": 0}
    with_bad = []
    for index in range(len(record["shards"])):
        meta = pq.read_metadata(part_path(out, index))
        counts = json.loads(meta.metadata[b"phileo"])
        totals["parts"] += 1
        totals["rows"] += meta.num_rows
        totals["tiles"] += counts["tiles"]
        totals["bad_tiles"] += counts["bad_tiles"]
        if counts["bad_tiles"]:
            with_bad.append(counts["shard"])
    planned = sum(s["samples"] for s in record["shards"])
    summary = {"arguments": record["arguments"], "dataset": record["dataset"], "totals": totals,
               "planned_tiles": planned, "last_run_s": round(elapsed_s, 3)}
    _write_atomic(out / SUMMARY, json.dumps(summary, indent=1))
    if planned and totals["bad_tiles"] / planned > max_bad_fraction:
        shards = ", ".join(with_bad[:5]) + (" ..." if len(with_bad) > 5 else "")
        raise BadDataError(f"{totals['bad_tiles']} of {planned} tiles unreadable or unusable (> --max-bad-fraction "
                           f"{max_bad_fraction}); in {shards}; see the warnings, and {out / SUMMARY}")
    (out / SUCCESS).write_text("")
    return summary
