"""Run work units as Ray tasks: on an existing cluster (--ray-address) or a local one.

Same contract as `distributor.run_local`: yield each unit's stats, or {"unit", "error",
"traceback"} for a unit that failed for good, and call `progress` once per tile. A task
raises instead of reporting, so Ray retries it: a dead worker (OOM kill, preemption) or a
transient I/O error reruns the unit, which rewrites the same shard names from scratch
(build_unit removes its own leftovers), so every key is written exactly once.
Each task runs in a fresh worker process (max_calls=1): a long build does not grow workers.
"""

from __future__ import annotations

import logging
import os
import traceback
import uuid
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from sharding.build.unit import Progress, UnitOptions, build_unit
from sharding.errors import InputError

log = logging.getLogger(__name__)

MAX_RETRIES = 3
TRANSIENT_ERRORS = (OSError, TimeoutError, ConnectionError)  # retried; anything else fails the unit at once
UNIT_MEMORY = 2 * 1024**3  # logical reservation per task (bytes): bounds tasks per node by RAM
POLL_SECONDS = 0.5
# Tests only: "UNIT:MARKER_DIR" makes the first attempt of unit UNIT exit after its first tile while
# MARKER_DIR exists (it records the death there, so the retry lives).
DIE_ONCE_ENV = "PHILEO_TEST_RAY_DIE_ONCE"


class _ProgressSink:
    """Ray actor (created in run_ray): collects (unit, attempt, bytes_in, bytes_out) per tile."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, int, int]] = []

    def add(self, unit: int, attempt: str, bytes_in: int, bytes_out: int) -> None:
        self.events.append((unit, attempt, bytes_in, bytes_out))

    def drain(self) -> list[tuple[int, str, int, int]]:
        events, self.events = self.events, []
        return events


def _die_once_hook(unit: int) -> bool:
    """True where the test hook asks this attempt of `unit` to die (the first attempt only)."""
    spec = os.environ.get(DIE_ONCE_ENV)
    if not spec or int(spec.split(":", 1)[0]) != unit:
        return False
    marker_dir = Path(spec.split(":", 1)[1])
    if not marker_dir.is_dir():  # armed only while the test's marker directory exists
        return False
    marker = marker_dir / f"died-{unit}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def _unit_task(unit: int, rows: list[dict], options: UnitOptions, sink) -> dict:
    """Body of the Ray task: build one unit, reporting each tile to the progress actor."""
    attempt = uuid.uuid4().hex
    die = _die_once_hook(unit)

    def report(bytes_in: int, bytes_out: int) -> None:
        sink.add.remote(unit, attempt, bytes_in, bytes_out)
        if die:
            os._exit(1)  # simulates a worker killed mid-unit (tests only)

    return build_unit(unit, rows, options, report)


class _ProgressForwarder:
    """Forward tile events to `progress`, counting a retried unit's tiles once (highest attempt count)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.per_attempt: dict[tuple[int, str], int] = {}
        self.best: dict[int, int] = {}

    def __call__(self, events: list[tuple[int, str, int, int]]) -> None:
        for unit, attempt, bytes_in, bytes_out in events:
            count = self.per_attempt[unit, attempt] = self.per_attempt.get((unit, attempt), 0) + 1
            if count > self.best.get(unit, 0):
                self.best[unit] = count
                self.progress(bytes_in, bytes_out)


def _connect(address: str | None, workers: int) -> bool:
    """Connect to `address` or start a local cluster of `workers` CPUs; True when we started it."""
    try:
        import ray
    except ImportError as error:
        raise InputError("--executor ray: ray is not installed (pip install 'phileo-majortom[ray]')") from error

    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **quiet)
    else:
        log.info("starting a local Ray cluster with %d CPUs", workers)
        ray.init(num_cpus=workers, include_dashboard=False, **quiet)
    return True


def run_ray(units: Iterable[tuple[int, list[dict]]], options: UnitOptions, workers: int, progress: Progress,
            address: str | None = None) -> Iterator[dict]:
    """Yield each unit's stats (or {"unit", "error", "traceback"}) as Ray tasks complete."""
    if not units:
        return  # nothing to run: do not start a cluster
    import ray

    started_here = _connect(address, workers)
    try:
        yield from _run_tasks(units, options, _ProgressForwarder(progress))
    finally:
        if started_here:
            ray.shutdown()


def _run_tasks(units: Iterable[tuple[int, list[dict]]], options: UnitOptions,
               forward: _ProgressForwarder) -> Iterator[dict]:
    import ray

    resources = ray.cluster_resources()
    cpus = max(int(resources.get("CPU", 1)), 1)
    memory = int(min(UNIT_MEMORY, resources.get("memory", UNIT_MEMORY * cpus) / cpus))
    task = ray.remote(max_calls=1, max_retries=MAX_RETRIES, retry_exceptions=list(TRANSIENT_ERRORS),
                      num_cpus=1)(_unit_task).options(memory=memory)
    sink = ray.remote(_ProgressSink).options(num_cpus=0).remote()
    options_ref = ray.put(options)
    queued = iter(units)  # lazy (build/plan.py PendingUnits): rows are made as tasks are submitted
    unit_of: dict = {}
    window = 2 * cpus  # tasks in flight: the rest of the plan stays on the driver
    try:
        while True:
            for unit, rows in islice(queued, window - len(unit_of)):
                unit_of[task.remote(unit, rows, options_ref, sink)] = unit
            if not unit_of:
                break
            done, _ = ray.wait(list(unit_of), num_returns=1, timeout=POLL_SECONDS)
            forward(ray.get(sink.drain.remote()))
            for ref in done:
                yield _result(ref, unit_of.pop(ref))
        forward(ray.get(sink.drain.remote()))
    finally:
        for ref in unit_of:
            ray.cancel(ref, force=True)
        ray.kill(sink)


def _result(ref, unit: int) -> dict:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:  # the task failed for good (retries spent): report it
        cause = getattr(error, "cause", None) or error
        message = f"{type(cause).__name__}: {cause}".splitlines()[0]
        return {"unit": unit, "error": message, "traceback": traceback.format_exc()}

