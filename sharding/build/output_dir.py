"""Claiming an output directory, clearing it and checking a resume: shared by every command that writes a dataset."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from sharding.build.output_lock import is_lock_file, make_output_dir
from sharding.errors import InputError
from sharding.layout import BUILD_INFO, MANIFEST, TMP_SUFFIX


def claim_output_dir(output: Path, owned: Callable[[str], bool], flag: str = "--output",
                     what: str = "a phileo-shard build") -> None:
    """Create `output`; refuse a file, or a directory holding anything `owned` does not recognise.

    Temp files of an interrupted run (TMP_SUFFIX) always count as owned: the command removes them;
    so do the output's lock files (build/output_lock.py).
    """
    make_output_dir(output, flag)
    foreign = sorted(p.name for p in output.iterdir()
                     if not (owned(p.name) or p.name.endswith(TMP_SUFFIX) or is_lock_file(p.name)))
    if foreign:
        raise InputError(f"{flag} {output}: holds {foreign[0]!r}, which is not part of {what}; "
                         "choose an empty or new directory")


def refuse_other_arguments(output: Path | str, saved: dict, defining: dict, source_differs: bool = False) -> None:
    """A resume must repeat the arguments that define the dataset; InputError names those that differ."""
    changed = sorted(k for k in saved.keys() | defining.keys() if saved.get(k) != defining.get(k))
    if source_differs:
        changed = changed or ["--source"]
    if changed:
        raise InputError(f"--output {output} holds a build made with other arguments ({', '.join(changed)} "
                         "differ); rerun with the same arguments to resume, or add --overwrite to start over")


def clear_owned(output: Path, owned: Callable[[str], bool]) -> None:
    """Delete what a previous run left there (owned names and temp files), the manifest first: a crash
    half-way never leaves a directory that looks like a complete dataset."""
    names = [p.name for p in output.iterdir() if owned(p.name) or p.name.endswith(TMP_SUFFIX)]
    for name in sorted(names, key=lambda name: (name != MANIFEST, name)):
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def remove_temp_files(output: Path) -> None:
    """Top-level temp files of earlier, dead runs (a killed plan or finalize). Temp names carry the
    writer's pid, so no later write replaces them; only the output lock's sole holder may call this."""
    for leftover in output.glob(f"*{TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def open_build_output(output: Path, owned: Callable[[str], bool], overwrite: bool, defining: dict,
                      source: str | None = None) -> dict | None:
    """Claim (and with `overwrite` clear) a build's output; the saved build info when resuming, else None.

    A resume must repeat the `defining` arguments (and the `source`, where build.json records one)."""
    claim_output_dir(output, owned)
    if overwrite:
        clear_owned(output, owned)
    info_path = output / BUILD_INFO
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    refuse_other_arguments(output, info.get("args", {}), defining,
                           source_differs=source is not None and info.get("source") != source)
    return info
