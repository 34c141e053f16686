"""Run jobs (work units, file scans) on a local process pool, or in-process for one worker.

One pool for every build: the MajorTOM-family build runs its units through `run_local`, the
PhilEO Bench build its units and label scans through `run_jobs`. The broad `except` lives
here, at the process-pool boundary only: a job that raises is reported as failed (a unit that
failed wrote no stats file, so a rerun retries it) and the others go on. Workers report
progress through a queue, so bars move in tiles or patches, not units.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from itertools import islice

import blosc2

from sharding.build.unit import Progress, UnitOptions, build_unit

log = logging.getLogger(__name__)

_progress_queue = None  # set in each worker process by _init_worker
# One thread per library in a pool worker: the workers are the parallelism, and N workers each with
# Arrow, OpenBLAS and GDAL pools of N threads only oversubscribe the cores. These libraries size
# their pools from the environment at import, so the variables must be in the environment the spawn
# workers start with; a value the user set is kept. Blosc2 is pinned in `_init_worker` instead:
# BLOSC_NTHREADS would change the shard bytes (phileo/schema.py BLOSC_ENCODING_ENV).
WORKER_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                     "GDAL_NUM_THREADS": "1"}


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    blosc2.set_nthreads(1)  # decoding threads only: encoding is single-threaded (phileo/schema.py)


def _report_to_queue(*event) -> None:
    _progress_queue.put(event)


def _call(function: Callable, args: tuple, progress: Callable | None = None):
    try:
        return function(*args, progress=progress or (_report_to_queue if _progress_queue else None))
    except Exception as error:  # process-pool boundary: report, never kill the whole build
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}


def run_jobs(function: Callable, jobs: Iterable[tuple], workers: int,
             progress: Callable) -> Iterator[tuple[int, object]]:
    """Yield (job number, result) as jobs finish; a job that raised gives {"error", "traceback"}.

    `function(*job, progress=...)` runs in-process for one worker, else in "spawn" workers (free of
    the parent's threads, such as tqdm's monitor, and of its locks); `progress(*event)` is called in
    this process for every event a job reports.
    """
    if workers <= 1:
        for number, args in enumerate(jobs):
            yield number, _call(function, args, progress)
        return
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    numbered = enumerate(jobs)  # taken lazily: at most `window` jobs' arguments exist at once
    window = 2 * workers
    with worker_thread_env(), ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                  initargs=(progress_queue,)) as pool:
        futures = {pool.submit(_call, function, args): number for number, args in islice(numbered, window)}
        while futures:
            done, _ = wait(set(futures), timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(progress_queue, progress)
            for future in done:
                yield futures.pop(future), future.result()
            for number, args in islice(numbered, window - len(futures)):
                futures[pool.submit(_call, function, args)] = number
        _drain(progress_queue, progress)


@contextmanager
def worker_thread_env() -> Iterator[None]:
    """WORKER_THREAD_ENV in os.environ while the pool starts workers (on demand, so for its whole life)."""
    added = {name: value for name, value in WORKER_THREAD_ENV.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def run_local(units: Iterable[tuple[int, list[dict]]], options: UnitOptions, workers: int,
              progress: Progress) -> Iterator[dict]:
    """Yield each unit's stats (or {"unit", "error", "traceback"}) as units complete; `progress` per tile.

    `units` may be lazy (build/plan.py PendingUnits): a unit's rows are made when it is submitted."""
    numbers: list[int] = []

    def jobs() -> Iterator[tuple]:
        for unit, rows in units:
            numbers.append(unit)
            yield unit, rows, options

    for number, result in run_jobs(build_unit, jobs(), workers, progress):
        yield {"unit": numbers[number], **result} if "error" in result else result


def _drain(progress_queue, progress: Callable) -> None:
    while True:
        try:
            progress(*progress_queue.get_nowait())
        except queue.Empty:
            return
