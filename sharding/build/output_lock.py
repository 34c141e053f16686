"""One process owns an output: a lock file in the output directory, held for the whole command
(the mechanism is phileo/output_lock.py's).

`.phileo-shard.lock` (`.phileo-shard.node-I.lock` for node I of a multi-node build, whose nodes
share one directory but own disjoint units) is created with O_EXCL and holds the owner's pid, host
and start time. A second command into the same output is refused with a message naming the
holder. A lock left by a process that no longer runs on this host (kill -9, a crash, a preempted
job) is stale: it is taken over with a warning, so a rerun resumes as before. A lock of another
host cannot be checked from here; the message says how to remove it once that build is gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from phileo.output_lock import hold_lock, in_use_message, is_stale, owner_record
from sharding.errors import InputError

__all__ = ["in_use", "is_lock_file", "is_stale", "lock_name", "make_output_dir", "output_lock", "owner_record"]

LOCK_PREFIX, LOCK_SUFFIX = ".phileo-shard", ".lock"


def lock_name(node_rank: int | None = None) -> str:
    return f"{LOCK_PREFIX}{'' if node_rank is None else f'.node-{node_rank}'}{LOCK_SUFFIX}"


def is_lock_file(name: str) -> bool:
    return name.startswith(LOCK_PREFIX) and name.endswith(LOCK_SUFFIX)


def in_use(flag: str, output: Path | str, holder: dict, lock: Path | str) -> InputError:
    """The refusal naming the holder, and how to remove its lock once that process is gone."""
    return InputError(in_use_message(flag, output, holder, lock))


def make_output_dir(output: Path, flag: str) -> None:
    """Create `output` (and its parents); refuse a path that is a file."""
    if output.exists() and not output.is_dir():
        raise InputError(f"{flag} {output}: exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def output_lock(output: Path, flag: str = "--output", node_rank: int | None = None) -> Iterator[None]:
    """Hold the output's lock for the block; InputError naming the holder if another process has it."""
    make_output_dir(output, flag)
    with hold_lock(output / lock_name(node_rank), flag, InputError):
        yield
