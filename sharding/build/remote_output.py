"""`--output s3://bucket/prefix`: the same dataset layout, on object storage.

The build runs unchanged in a local staging directory, new for every run (mkdtemp under
$PHILEO_STAGING_DIR, default the system temp dir) and removed at the end; what it writes is
published in an order that keeps object storage consistent:

* after planning: plan.parquet, plan_rejected.jsonl, then build.json;
* per unit (in the worker): every shard (a complete local file, one PUT or a multipart upload
  that becomes visible only when completed; the local copy is then deleted), the unit's index
  and histogram, and last its stats object `units/<unit>.json`;
* at the end: index.parquet, rejected.jsonl, then manifest.json.

Nothing is ever uploaded under a final name before it is complete. On start the staging
directory is rebuilt from the objects under the prefix, so resume skips exactly the units whose
stats object exists, on any machine. Credentials and endpoint come from the standard AWS
environment (see sharding/sources/remote.py) and are never logged. One build per output at a
time, as for a local directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from sharding.build.output_lock import in_use, is_lock_file, is_stale, lock_name, owner_record
from sharding.errors import InputError
from sharding.layout import FINAL_FILES, PLAN_FILES, SHARDS_DIR, UNITS_DIR, unit_file
from sharding.sources.remote import filesystem, with_retries

log = logging.getLogger(__name__)

SYNCED = frozenset(PLAN_FILES)  # the plan state a rerun needs in its staging directory


def staging_dir(url: str) -> Path:
    """A new private directory (mkdtemp: mode 0700, a fresh random name, never a path planted in
    advance) under $PHILEO_STAGING_DIR or the system temp dir; one per run, so two runs on one
    machine never share one."""
    root = Path(os.environ.get("PHILEO_STAGING_DIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:8]
    return Path(tempfile.mkdtemp(prefix=f"phileo-shard-staging-{tag}-", dir=root))


class RemoteOutput:
    """An output prefix on object storage (s3://) mirrored by a local staging directory."""

    def __init__(self, url: str, staging: Path | None = None):
        if not url.startswith("s3://"):
            raise InputError(f"--output {url}: remote outputs must be s3://bucket/prefix")
        self.url = url.rstrip("/")
        self.staging = staging or staging_dir(self.url)

    @property
    def fs(self):
        return filesystem(self.url)

    def remote(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    def list_relative(self) -> list[str]:
        bucket_path = self.url.split("://", 1)[1]
        self.fs.invalidate_cache()  # another process (a killed run, another node) may have written since
        found = with_retries(self.url, "LIST", lambda: self.fs.find(bucket_path))
        return sorted(path[len(bucket_path) + 1:] for path in found)

    def acquire(self) -> None:
        """Put the prefix's lock object (pid, host, start), refusing a prefix another build holds.

        Object storage has no exclusive create here, so this is a check then a write: it keeps a
        second build out unless both start in the same instant. A lock of a process that no longer
        runs on this host is stale and taken over; another host's lock names how to remove it."""
        lock = self.remote(lock_name())
        self.fs.invalidate_cache()
        if with_retries(self.url, "HEAD lock", lambda: self.fs.exists(lock)):
            holder = json.loads(with_retries(self.url, "GET lock", lambda: self.fs.cat_file(lock)) or b"{}")
            if not is_stale(holder):
                raise in_use("--output", self.url, holder, lock)
            log.warning("%s: taking over the lock of pid %s, which no longer runs", self.url, holder.get("pid"))
        record = json.dumps(owner_record()).encode()
        with_retries(self.url, "PUT lock", lambda: self.fs.pipe_file(lock, record))

    def release(self) -> None:
        lock = self.remote(lock_name())
        with contextlib.suppress(Exception):  # best effort: a lock left behind is taken over as stale
            self.fs.invalidate_cache()
            if json.loads(self.fs.cat_file(lock)).get("pid") == os.getpid():
                self.fs.rm_file(lock)

    def prepare(self, overwrite: bool, owned: set[str]) -> Path:
        """Check/clean the prefix; rebuild the staging directory from it. Returns the staging path."""
        existing = [name for name in self.list_relative() if not is_lock_file(name)]
        foreign = [name for name in existing if name.split("/", 1)[0] not in owned]
        if foreign:
            raise InputError(f"--output {self.url}: holds {foreign[0]!r}, which is not part of a phileo-shard "
                             "build; choose an empty or new prefix")
        if overwrite and existing:
            log.info("--overwrite: deleting %d objects under %s", len(existing), self.url)
            with_retries(self.url, "DELETE", lambda: self.fs.rm([self.remote(n) for n in existing]))
            existing = []
        (self.staging / UNITS_DIR).mkdir(parents=True)
        (self.staging / SHARDS_DIR).mkdir()
        wanted = [n for n in existing if n in SYNCED or n.startswith(UNITS_DIR + "/")]
        if wanted:
            remote, local = [self.remote(n) for n in wanted], [str(self.staging / n) for n in wanted]
            with_retries(self.url, "GET state", lambda: self.fs.get(remote, local))
        log.info("staging %s in %s (%d state objects)", self.url, self.staging, len(wanted))
        return self.staging

    def put(self, local: Path, relative: str) -> None:
        """Upload one complete local file under its final name (single PUT or completed multipart)."""
        with_retries(self.url, f"PUT {relative}", lambda: self.fs.put_file(str(local), self.remote(relative)))

    def publish_plan(self) -> None:
        for name in PLAN_FILES:
            self.put(self.staging / name, name)

    def publish_unit(self, unit: int, stats: dict, stats_path: Path) -> None:
        """Shards (local copies deleted once uploaded), index, histogram, then the stats object."""
        for shard in stats["shards"]:
            local = self.staging / shard["url"]
            self.put(local, shard["url"])
            local.unlink()
        for suffix in ("index.parquet", "hist.npz"):
            name = unit_file(unit, suffix)
            self.put(self.staging / name, name)
        self.put(stats_path, unit_file(unit))

    def publish_final(self) -> None:
        for name in FINAL_FILES:
            self.put(self.staging / name, name)


def publish_unit(url: str, unit: int, stats: dict, stats_path: Path) -> None:
    """Worker-side entry point (UnitOptions carries only the URL; the staging directory is the output's)."""
    RemoteOutput(url, staging=stats_path.parent.parent).publish_unit(unit, stats, stats_path)
