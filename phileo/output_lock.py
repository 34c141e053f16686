"""One process owns an output: a lock file created with O_EXCL, held for the whole command.

The lock holds the owner's pid, host and start time. A second command into the same output is
refused with an error naming the holder. A lock left by a process that no longer runs on this host
(kill -9, a crash, a preempted job) is stale: it is taken over with a warning, so a rerun resumes. A
lock of another host cannot be checked from here; the refusal says how to remove it once that
process is gone. Both stages use it (sharding/build/output_lock.py, training/embed/output.py), each
raising its own one-line error type.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def is_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (an unusable pid counts as running: never take over on a guess)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def owner_record() -> dict:
    """What a lock holds: this process, its host and when it started."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def is_stale(holder: dict) -> bool:
    """A lock of a process that no longer runs on this host; another host's cannot be judged from here."""
    return holder.get("host") == socket.gethostname() and not is_alive(holder.get("pid"))


def in_use_message(flag: str, output: Path | str, holder: dict, lock: Path | str) -> str:
    """The refusal naming the holder, and how to remove its lock once that process is gone."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"{flag} {output}: in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"since {since}; wait for it, or delete {lock} if that process is gone")


def _holder(path: Path) -> dict | None:
    """The lock's owner record; None when the file vanished meanwhile; {} when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _take(path: Path) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(owner_record(), file)
    except OSError as error:  # a full disk: no half-written lock left behind, and say which path
        path.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from error
    return True


@contextlib.contextmanager
def hold_lock(path: Path, flag: str, error: Callable[[str], Exception]) -> Iterator[None]:
    """Hold the lock file `path` (its directory exists) for the block; `error(message)` is raised when another
    live process holds it. `flag` names the output in that message."""
    output = path.parent
    for _ in range(3):  # a stale lock is removed and the take retried; a racing winner keeps it
        if _take(path):
            break
        holder = _holder(path)
        if holder is None:
            continue
        if is_stale(holder):
            log.warning("%s: taking over the lock of pid %s, which no longer runs", output, holder["pid"])
            path.unlink(missing_ok=True)
            continue
        raise error(in_use_message(flag, output, holder, path))
    else:
        raise error(f"{flag} {output}: could not take the lock {path}")
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
