"""Bytes and requests per tile of `phileo-shard build` over hf://, from the Hub-compatible server on loopback.

Generates MajorTOM-format parquet files (one row group per tile, as Core-S2L2A) with metadata.parquet,
serves them as the dataset repo Major-TOM/Core-S2L2A (tools/hub_server.py: the Hub's API, resolve
with its 302 to a CDN origin, ranged GETs), and runs the real CLI in a subprocess through
huggingface_hub's client twice: `--input hf://datasets/Major-TOM/Core-S2L2A` (listed: every footer
and id column read at plan time) and `--metadata hf://.../metadata.parquet` (planned from its rows).
The server counts every request and body byte; the baseline is the source parquet bytes per tile.
Each build is checked byte for byte against the local build of the same files.

    python tools/bench_hub.py [--tiles 16] [--tiles-per-file 4] [--tile-size 1068] [--workers 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from tools.docs_section import report  # noqa: E402
from tools.hub_server import HubServer  # noqa: E402

SECTION = "## Hub reads (tools/bench_hub.py)"
REPO = "Major-TOM/Core-S2L2A"
MB = 1e6


def build(out: Path, args: list[str], env: dict[str, str]) -> float:
    command = [sys.executable, "-m", "sharding.cli", "build", "--output", str(out), *args]
    started = time.perf_counter()
    done = subprocess.run(command, env=os.environ | env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"build {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def shards(dataset: Path) -> list[tuple[str, str]]:
    return [(s["url"], s["sha256"]) for s in json.loads((dataset / "manifest.json").read_text())["shards"]]


def footer_bytes(log: list[tuple], sizes: dict[str, int]) -> int:
    """Body bytes of the footer samples: the ranged GETs that end at a file's last byte."""
    total = 0
    for _method, kind, path, ranged, status in log:
        if kind == "cdn" and status == 206 and path in sizes and ranged.endswith(f"-{sizes[path] - 1}"):
            first = int(ranged.split("=")[1].split("-")[0])
            total += sizes[path] - first
    return total


def measure(hub: HubServer, work: Path, name: str, args: list[str], tiles: int, local: Path) -> dict:
    hub.reset_stats()
    seconds = build(work / name, args, hub.env)
    stats = hub.stats()
    assert shards(work / name) == shards(local), f"{name}: not the local build's shards"
    assert not stats["foreign"], stats["foreign"]
    parquet = sum(n for path, n in stats["bytes"].items() if path.startswith("images/"))
    whole = [e for e in stats["log"] if e[2].startswith("images/") and e[0] == "GET" and e[3] is None]
    sizes = {f"images/{p.name}": p.stat().st_size for p in (work / "repo" / "images").glob("*.parquet")}
    return {"name": name, "seconds": seconds, "tiles": tiles, "parquet": parquet,
            "footers": footer_bytes(stats["log"], sizes),
            "metadata": stats["bytes"]["metadata.parquet"], "total": sum(stats["bytes"].values()),
            "api": stats["requests"]["api"], "resolve": stats["requests"]["resolve"],
            "cdn": stats["requests"]["cdn"], "whole_file_gets": len(whole)}


def rows(results: list[dict], source_per_tile: float) -> list[str]:
    lines = ["| per tile | " + " | ".join(f"`{r['name']}`" for r in results) + " |",
             "|---|" + "---|" * len(results)]

    def row(label: str, value) -> None:
        lines.append(f"| {label} | " + " | ".join(value(r) for r in results) + " |")

    row("parquet bytes fetched (footers, id columns, row groups)",
        lambda r: f"{r['parquet'] / r['tiles'] / MB:.3f} MB (**{r['parquet'] / r['tiles'] / source_per_tile:.2f}x** "
                  "the tile)")
    row("of which footer samples", lambda r: f"{r['footers'] / r['tiles'] / MB:.3f} MB")
    row("of which row groups (and id columns)",
        lambda r: f"{(r['parquet'] - r['footers']) / r['tiles'] / MB:.3f} MB "
                  f"({(r['parquet'] - r['footers']) / r['tiles'] / source_per_tile:.3f}x)")
    row("metadata.parquet bytes", lambda r: f"{r['metadata'] / r['tiles'] / 1e3:.1f} kB")
    row("all bytes served (API JSON included)", lambda r: f"{r['total'] / r['tiles'] / MB:.3f} MB")
    row("requests: API (repo info, tree pages)", lambda r: f"{r['api'] / r['tiles']:.2f}")
    row("requests: resolve (302 to the CDN)", lambda r: f"{r['resolve'] / r['tiles']:.2f}")
    row("requests: CDN ranged GETs", lambda r: f"{r['cdn'] / r['tiles']:.2f}")
    row("requests: all", lambda r: f"**{(r['api'] + r['resolve'] + r['cdn']) / r['tiles']:.2f}**")
    row("whole-file GETs of a tile file (build)", lambda r: str(r["whole_file_gets"]))
    row("build wall time (whole build)", lambda r: f"{r['seconds']:.1f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--tiles-per-file", type=int, default=4, help="rows (row groups) per parquet file")
    parser.add_argument("--tile-size", type=int, default=1068, help="fixture tile size in 10 m pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.tiles % args.tiles_per_file:
        raise SystemExit("error: --tiles must be a multiple of --tiles-per-file")
    from huggingface_hub import __version__ as hub_version

    from tools.majortom_fixture import make_majortom_dataset

    with tempfile.TemporaryDirectory(prefix="bench_hub-") as scratch:
        work = Path(scratch)
        make_majortom_dataset(work / "repo", num_files=args.tiles // args.tiles_per_file,
                              rows_per_file=args.tiles_per_file, tile_size=args.tile_size, seed=0)
        files = sorted((work / "repo" / "images").glob("*.parquet"))
        source_per_tile = sum(p.stat().st_size for p in files) / args.tiles
        common = ["--workers", str(args.workers)]
        build(work / "local", ["--input", str(work / "repo"), *common], {})
        with HubServer(work / "repo", REPO) as hub:
            results = [measure(hub, work, f"--{flag} hf://...", [f"--{flag}", f"hf://datasets/{REPO}{tail}", *common],
                               args.tiles, work / "local")
                       for flag, tail in (("input", ""), ("metadata", "/metadata.parquet"))]
    command = f"python tools/bench_hub.py {' '.join(sys.argv[1:] if argv is None else argv)}".strip()
    lines = [SECTION, "", f"Command: `{command}` ({datetime.date.today().isoformat()}; huggingface_hub "
             f"{hub_version}).", "",
             f"Data: {args.tiles} synthetic MajorTOM-format tiles of {args.tile_size} px in {len(files)} parquet files "
             f"of {args.tiles_per_file} row groups (one per tile, as Core-S2L2A), {source_per_tile / MB:.2f} MB of "
             "parquet per tile, served by tools/hub_server.py on 127.0.0.1 as the dataset repo "
             f"{REPO}; `phileo-shard build --workers {args.workers}` in a subprocess with HF_ENDPOINT set, "
             "default footer sample (2 MB). Both builds give the local build's shards byte for byte; no request "
             "left 127.0.0.1.", "", *rows(results, source_per_tile), "",
             "Notes: every parquet read is a ranged GET, and on the Hub each costs two requests (resolve, "
             "then the CDN's 302 target), counted apart above. The footer sample is one 2 MB GET per file (sized "
             f"for Core-S2L2A's 1-1.5 MB footers): with {args.tiles_per_file} tiles a file that is "
             f"{2 / args.tiles_per_file:.2f} MB per tile here, against a few kB per tile for Core-S2L2A files of "
             "hundreds of tiles; it is fetched once per build (footers/ cache), not once per unit. "
             "`--input` also reads each file's id columns at plan time; `--metadata` plans from "
             "metadata.parquet (one whole GET) instead. API requests: the repo info and tree pages of each "
             "process (the planner and every pool worker)."]
    report(SECTION, lines, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
