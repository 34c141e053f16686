"""Run work units on a local process pool (or in-process for one worker).

The broad `except` lives here, at the process-pool boundary only: a unit that raises is
reported as failed (it wrote no stats file, so a rerun retries it) and the others go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

from sharding.unit import UnitOptions, build_unit

log = logging.getLogger(__name__)


def _run_unit_safely(unit: int, rows: list[dict], options: UnitOptions) -> dict:
    try:
        return build_unit(unit, rows, options)
    except Exception as error:  # process-pool boundary: report, never kill the whole build
        return {"unit": unit, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}


def run_local(units: list[tuple[int, list[dict]]], options: UnitOptions, workers: int) -> Iterator[dict]:
    """Yield each unit's stats (or {"unit", "error"}) as units complete."""
    if workers <= 1:
        for unit, rows in units:
            yield _run_unit_safely(unit, rows, options)
        return
    # "spawn" keeps workers free of the parent's threads (tqdm monitor) and locks.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_run_unit_safely, unit, rows, options) for unit, rows in units]
        for future in as_completed(futures):
            yield future.result()
