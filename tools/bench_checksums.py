"""Cost of the per-member XXH3 check in the loader's decode path, against the same path without it.

Builds real-size (1068 px) MajorTOM-format tiles into shards (or reads --shards DIR), holds the
samples in memory, and times per tile what a DataLoader worker does with a sample: `decode_sample`
(lazy, s2_60m skipped, as training/data/loader.py) then `decode_crop_windows` for K random 128 px
crops, with the checksums in meta.json (checked) and with the same samples stripped of them (the
baseline, in the same process). The ratio is an upper bound of the check's share of the loader's
crops/s (the loader also reads tars, cuts labels, shuffles and batches). Best of --rounds.

    python tools/bench_checksums.py [--tiles 8] [--k 16] [--rounds 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from phileo.schema import CHECKSUMS, META_MEMBER, decode_sample
from training.data.loader import UNUSED_MEMBERS, decode_crop_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from sharding.dataset.tarread import iter_tar_samples  # noqa: E402
from tools.docs_section import report  # noqa: E402
from tools.majortom_fixture import make_majortom_dataset  # noqa: E402

SECTION = "## Member checksums (tools/bench_checksums.py)"
CROP = 128


def load_samples(shards: Path | None, tiles: int, scratch: Path) -> list[tuple[str, dict]]:
    """(key, members) of every sample, built from generated real-size tiles unless `shards` is given."""
    if shards is None:
        from click.testing import CliRunner

        from sharding.cli import main

        make_majortom_dataset(scratch / "in", num_files=1, rows_per_file=tiles, tile_size=1068)
        result = CliRunner().invoke(main, ["build", "--input", str(scratch / "in"), "--output", str(scratch / "ds")])
        assert result.exit_code == 0, result.output
        shards = scratch / "ds"
    return [(raw.key, raw.members) for path in sorted(shards.rglob("*.tar")) for raw in iter_tar_samples(path)]


def without_checksums(samples: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    stripped = []
    for key, members in samples:
        meta = json.loads(members[META_MEMBER])
        meta.pop(CHECKSUMS, None)
        stripped.append((key, members | {META_MEMBER: json.dumps(meta).encode()}))
    return stripped


def seconds_per_tile(samples: list[tuple[str, dict]], k: int, seed: int) -> float:
    rng, scratch = np.random.default_rng(seed), {}
    started = time.perf_counter()
    for key, members in samples:
        sample = decode_sample(key, members, skip=UNUSED_MEMBERS, lazy=True)
        height, width = sample.meta["shape"]
        origins = [(2 * int(rng.integers(0, (height - CROP) // 2 + 1)),
                    2 * int(rng.integers(0, (width - CROP) // 2 + 1))) for _ in range(k)]
        decode_crop_windows(sample.arrays, origins, CROP, scratch)
    return (time.perf_counter() - started) / len(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--k", type=int, default=16, help="crops per tile")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shards", type=Path, help="a dataset directory to read instead of generated tiles")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        checked = load_samples(args.shards, args.tiles, Path(scratch))
    assert all(CHECKSUMS in json.loads(m[META_MEMBER]) for _, m in checked), "shards without checksums"
    plain = without_checksums(checked)
    best = {"plain": float("inf"), "checked": float("inf")}
    for round_number in range(args.rounds):  # interleaved, so drift hits both alike
        best["plain"] = min(best["plain"], seconds_per_tile(plain, args.k, round_number))
        best["checked"] = min(best["checked"], seconds_per_tile(checked, args.k, round_number))
    member_bytes = np.mean([sum(len(v) for n, v in m.items() if n.endswith(".b2nd") and not n.startswith("s2_60m"))
                            for _, m in checked])
    ratio = best["checked"] / best["plain"]
    lines = [
        SECTION, "",
        f"Command: `python tools/bench_checksums.py --tiles {args.tiles} --k {args.k} --rounds {args.rounds}"
        f"{' --shards ' + str(args.shards) if args.shards else ''}` ({datetime.date.today().isoformat()}, "
        f"Python {platform.python_version()}, one thread).", "",
        f"Per tile, what a loader worker does with a sample: lazy `decode_sample` (s2_60m skipped) + decode of "
        f"the blocks under K={args.k} random 128 px crops; {len(checked)} real-size (1068 px) tiles, "
        f"{member_bytes / 1e6:.2f} MB of checked members per tile; best of {args.rounds} interleaved rounds.", "",
        "| measure | ms per tile | vs without checksums |", "|---|---|---|",
        f"| without checksums (baseline) | {best['plain'] * 1e3:.2f} | 1.000 |",
        f"| with XXH3 checked | {best['checked'] * 1e3:.2f} | {ratio:.3f} |", "",
        f"The check adds {100 * (ratio - 1):.1f}% to this decode path, an upper bound of its share of the loader's "
        "crops/s, whose workers also read tars, cut labels, shuffle and batch.",
    ]
    report(SECTION, lines, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
