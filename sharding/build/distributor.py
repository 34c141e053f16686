"""Run work units on a local process pool (or in-process for one worker).

The broad `except` lives here, at the process-pool boundary only: a unit that raises is
reported as failed (it wrote no stats file, so a rerun retries it) and the others go on.
Workers report per-tile progress through a queue so the bar moves in tiles, not units.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from sharding.build.unit import Progress, UnitOptions, build_unit

log = logging.getLogger(__name__)

_progress_queue = None  # set in each worker process by _init_worker


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _report_to_queue(bytes_in: int, bytes_out: int) -> None:
    _progress_queue.put((bytes_in, bytes_out))


def _run_unit_safely(unit: int, rows: list[dict], options: UnitOptions, progress: Progress | None = None) -> dict:
    try:
        return build_unit(unit, rows, options, progress or (_report_to_queue if _progress_queue else None))
    except Exception as error:  # process-pool boundary: report, never kill the whole build
        return {"unit": unit, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}


def run_local(units: list[tuple[int, list[dict]]], options: UnitOptions, workers: int,
              progress: Progress) -> Iterator[dict]:
    """Yield each unit's stats (or {"unit", "error"}) as units complete; `progress` is called per tile."""
    if workers <= 1:
        for unit, rows in units:
            yield _run_unit_safely(unit, rows, options, progress)
        return
    # "spawn" keeps workers free of the parent's threads (tqdm monitor) and locks.
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(progress_queue,)) as pool:
        pending = {pool.submit(_run_unit_safely, unit, rows, options) for unit, rows in units}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(progress_queue, progress)
            for future in done:
                yield future.result()
        _drain(progress_queue, progress)


def _drain(progress_queue, progress: Progress) -> None:
    while True:
        try:
            progress(*progress_queue.get_nowait())
        except queue.Empty:
            return
