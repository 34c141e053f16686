"""Claiming an output directory and checking a resume: shared by every command that writes a dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sharding.build.writer import TMP_SUFFIX
from sharding.errors import InputError


def claim_output_dir(output: Path, owned: Callable[[str], bool], flag: str = "--output",
                     what: str = "a phileo-shard build") -> None:
    """Create `output`; refuse a file, or a directory holding anything `owned` does not recognise.

    Temp files of an interrupted run (TMP_SUFFIX) always count as owned: the command removes them.
    """
    if output.exists() and not output.is_dir():
        raise InputError(f"{flag} {output}: exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in output.iterdir() if not (owned(p.name) or p.name.endswith(TMP_SUFFIX)))
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
