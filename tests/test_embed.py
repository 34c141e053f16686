"""`phileo-train embed`: Major-TOM's fragment grid and columns, every tile once across ranks and workers,
embeddings equal to a direct `model.encode` of the training loader's pixels, resume after SIGKILL."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from phileo.models import build, build_task_model
from phileo.schema import decode_sample
from sharding.dataset.tarread import iter_tar_samples
from tests.conftest import read_manifest, run_shard
from tools.majortom_fixture import make_majortom_dataset
from training.cli import main
from training.config import EmbedConfig
from training.data.loader import cut_crop, model_input
from training.embed.fragments import axis_offsets, fragment_windows

TILE = 144  # fixture tiles (a multiple of 6 above the models' 128 px): 2 x 2 fragments at offsets 0 and 16
WINDOWS = [(0, 0), (0, 16), (16, 0), (16, 16)]
MODEL = "geoaware-unet-tiny"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """6 tiles of 144 px in 4 shards, and a checkpoint of the tiny U-Net (seeded random weights)."""
    root = tmp_path_factory.mktemp("embed")
    make_majortom_dataset(root / "src", num_files=2, rows_per_file=3, tile_size=TILE)
    result = run_shard("build", "--input", str(root / "src"), "--output", str(root / "ds"), "--shard-size", "200KB",
                       "--mix-files", "1")
    assert result.exit_code == 0, result.output
    assert len(read_manifest(root / "ds")["shards"]) == 4
    torch.manual_seed(0)
    torch.save({"model": build(MODEL).state_dict()}, root / "unet.pt")
    return root / "ds"


def embed_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["embed", "--model", MODEL, "--init", str(dataset.parent / "unet.pt"), "--shards", str(dataset),
            "--output", str(out), *extra]


def read_rows(out: Path) -> list[dict]:
    return pq.read_table(out / "embeddings").to_pylist()


def index_keys(dataset: Path) -> list[str]:
    return pq.read_table(dataset / "index.parquet", columns=["key"]).column("key").to_pylist()


def tiles(dataset: Path) -> dict[str, object]:
    """Every sample of the dataset, decoded as the training reader does (no 60 m bands)."""
    decoded = {}
    for shard in read_manifest(dataset)["shards"]:
        for sample in iter_tar_samples(dataset / shard["url"]):
            decoded[sample.key] = decode_sample(sample.key, sample.members, skip=frozenset({"s2_60m"}))
    return decoded


def loader_encode(model: torch.nn.Module, sample, windows: list[tuple[int, int]]) -> np.ndarray:
    """model.encode of the training loader's crops (cut_crop + model_input: reflectance, 20 m upsampled)."""
    tile = {"key": sample.key, "url": "", "repeat": False, "meta": sample.meta, "arrays": sample.arrays}
    crops = [cut_crop(tile, row, col, 128) for row, col in windows]
    batch = {name: torch.from_numpy(np.stack([c[name] for c in crops]).astype(np.int32))
             for name in ("s2_10m", "s2_20m")}
    with torch.no_grad():
        return model.encode(model_input(batch, torch.device("cpu"))).numpy()


def test_the_fragment_grid_is_major_toms():
    # 224 and 384 px on Core-S2L2A's 1068: the grids of the published embeddings (the notebook's pixel_bbox
    # columns start at 0, 211, 422, 633, 844)
    assert axis_offsets(1068, 224) == [0, 211, 422, 633, 844]
    assert axis_offsets(1068, 384) == [0, 342, 684]
    # 128 px: 9 fragments, stride 117, the last one moved to the border
    assert axis_offsets(1068, 128) == [0, 117, 234, 351, 468, 585, 702, 819, 940]
    assert axis_offsets(128, 128) == [0] and axis_offsets(TILE, 128) == [0, 16]
    assert fragment_windows(TILE, TILE, 128).tolist() == [list(w) for w in WINDOWS]  # row-major


@pytest.mark.parametrize("name", ["geoaware-unet-tiny", "phileo-vit-tiny", "vit-upernet-tiny-pretrain",
                                  "vit-upernet-tiny"])
def test_encode_is_one_vector_per_image(name):
    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.rand(3, 10, 128, 128)
    with torch.no_grad():
        embeddings = model.encode(x)
        features = model.forward_features(x[:1])
    assert embeddings.shape[0] == 3 and embeddings.ndim == 2 and embeddings.dtype == torch.float32
    if name.startswith("geoaware"):  # the deepest encoder map, averaged
        expected = features.embeddings_cnn.mean(dim=(2, 3))
    else:  # the normed CLS token
        expected = (features[-1] if isinstance(features, list) else features.vit_output)[:, 0]
    torch.testing.assert_close(embeddings[:1], expected)


def test_the_dense_unet_encodes_like_its_pretrained_unet():
    torch.manual_seed(0)
    unet = build(MODEL).eval()
    dense = build_task_model(MODEL, "regression", unet.state_dict()).eval()
    x = torch.rand(2, 10, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(dense.encode(x), unet.encode(x))


@pytest.fixture(scope="module")
def two_ranks(dataset, tmp_path_factory) -> Path:
    """torchrun, 2 ranks x 2 workers, 128 px fragments, batches of 3 fragments (they straddle tiles)."""
    out = tmp_path_factory.mktemp("two_ranks") / "emb"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command = [*launcher, "-m", "training.cli", *embed_args(dataset, out, "--fragment-size", "128",
                                                             "--batch-size", "3", "--num-workers", "2")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "embedded 6 of 6 tiles (0 bad): 24 rows in 4 parts" in result.stdout
    return out


@pytest.mark.slow
def test_two_ranks_embed_every_fragment_once_as_a_direct_encode(dataset, two_ranks):
    rows = read_rows(two_ranks)
    keys = index_keys(dataset)
    assert Counter(row["key"] for row in rows) == {key: len(WINDOWS) for key in keys}  # joins index.parquet
    assert len({row["unique_id"] for row in rows}) == len(rows)
    assert sorted(os.listdir(two_ranks / "embeddings")) == [f"part_{i:05d}.parquet" for i in range(4)]
    summary = json.loads((two_ranks / "summary.json").read_text())
    assert summary["totals"] == {"parts": 4, "rows": 24, "tiles": 6, "bad_tiles": 0}
    assert (two_ranks / "_SUCCESS").is_file() and not list(two_ranks.glob(".*.lock"))
    model = build(MODEL)
    model.load_state_dict(torch.load(dataset.parent / "unet.pt", weights_only=True)["model"])
    model.eval()
    for key, sample in tiles(dataset).items():
        mine = [row for row in rows if row["key"] == key]
        windows = [(row["pixel_bbox"][1], row["pixel_bbox"][0]) for row in mine]  # [col0, row0, col1, row1]
        assert windows == WINDOWS  # row-major, as Major-TOM's rows
        expected = loader_encode(model, sample, windows)
        np.testing.assert_allclose(np.array([row["embedding"] for row in mine]), expected, rtol=1e-4, atol=1e-5)
        assert {row["grid_cell"] for row in mine} == {sample.meta["grid_cell"]}
        assert {row["product_id"] for row in mine} == {sample.meta["product_id"]}


def wkb_ring(data: bytes) -> np.ndarray:
    order, kind, rings, points = struct.unpack_from("<BIII", data)
    assert (order, kind, rings, points) == (1, 3, 1, 5) and len(data) == 13 + 80
    return np.frombuffer(data, "<f8", offset=13).reshape(5, 2)


@pytest.mark.slow
def test_fragment_geometry_on_a_hand_checked_tile(dataset, two_ranks):
    """The UTM footprint from the geotransform, not transposed; its lon/lat corners are the tile's own."""
    sample = next(iter(tiles(dataset).values()))
    a, _, x0, _, e, y0 = sample.meta["transform"]
    assert (a, e) == (10.0, -10.0) and float(x0).is_integer() and float(y0).is_integer()  # WKT: no decimals
    rows = {tuple(row["pixel_bbox"]): row for row in read_rows(two_ranks) if row["key"] == sample.key}
    # the fragment at row 0, column 16: 160 m east of the tile's west edge, its top on the tile's top
    east = rows[(16, 0, 144, 128)]
    x, y = x0 + 160, y0
    corners = [(x + 1280, y), (x + 1280, y - 1280), (x, y - 1280), (x, y), (x + 1280, y)]
    numbers = ", ".join(f"{cx:.0f} {cy:.0f}" for cx, cy in corners)
    assert east["utm_footprint"] == f"POLYGON (({numbers}))" and east["utm_crs"] == sample.meta["crs"]
    assert east["timestamp"] == sample.meta["timestamp"][:-1].replace("-", "").replace(":", "")
    # outer corners of the tile (meta.json corners_lonlat: UL, UR, LR, LL, written by the build)
    upper_left, _, lower_right, _ = np.array(sample.meta["corners_lonlat"])
    first, last = wkb_ring(rows[(0, 0, 128, 128)]["geometry"]), wkb_ring(rows[(16, 16, 144, 144)]["geometry"])
    np.testing.assert_allclose(first[3], upper_left, atol=1e-9)  # vertex order UR, LR, LL, UL, UR
    np.testing.assert_allclose(last[1], lower_right, atol=1e-9)
    for row in rows.values():
        ring = wkb_ring(row["geometry"])
        assert (ring[0] == ring[4]).all()
        lon, lat = row["centre_lon"], row["centre_lat"]
        assert ring[:, 0].min() < lon < ring[:, 0].max() and ring[:, 1].min() < lat < ring[:, 1].max()
        assert (row["grid_row_u"], row["grid_col_r"]) == (454, 120) or row["grid_cell"] != "454U_120R"


def test_one_row_per_tile_without_fragment_size(dataset, tmp_path):
    out = tmp_path / "tiles"
    result = CliRunner().invoke(main, embed_args(dataset, out, "--num-workers", "0"))
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert Counter(row["key"] for row in rows) == dict.fromkeys(index_keys(dataset), 1)
    # the 128 px model sees the middle of each 144 px tile
    assert {tuple(row["pixel_bbox"]) for row in rows} == {(8, 8, 136, 136)}
    assert len(rows[0]["embedding"]) == 16  # the tiny U-Net's deepest width


def test_unusable_tiles_are_counted_and_fail_the_run_unless_allowed(tmp_path):
    make_majortom_dataset(tmp_path / "src", num_files=1, rows_per_file=2)  # 120 px: smaller than the model
    result = run_shard("build", "--input", str(tmp_path / "src"), "--output", str(tmp_path / "ds"))
    assert result.exit_code == 0, result.output
    torch.save({"model": build(MODEL).state_dict()}, tmp_path / "unet.pt")
    args = embed_args(tmp_path / "ds", tmp_path / "out", "--num-workers", "0")
    result = CliRunner().invoke(main, args)
    error = result.output.split("\r")[-1].split("tile/s]")[-1]  # after the progress bar, which shares stderr here
    assert result.exit_code == 1 and error.count("\n") == 1
    assert error.startswith("error: 2 of 2 planned tiles unreadable (> --max-bad-fraction 0.0)")
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    result = CliRunner().invoke(main, args)  # the shard is done: a rerun fails on the same totals, not a new read
    assert result.exit_code == 1 and "error: 2 of 2 tiles unreadable or unusable" in result.output
    result = CliRunner().invoke(main, [*args, "--max-bad-fraction", "1"])  # the same parts, now accepted
    assert result.exit_code == 0 and "embedded 0 of 2 tiles (2 bad): 0 rows in 1 parts" in result.output
    assert (tmp_path / "out" / "_SUCCESS").is_file()


def _kill_tree(process: subprocess.Popen) -> None:
    tree = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_resume_after_sigkill_embeds_the_rest_once(dataset, tmp_path):
    out = tmp_path / "emb"
    command = [sys.executable, "-m", "training.cli", *embed_args(dataset, out, "--fragment-size", "128",
                                                                 "--num-workers", "0", "--batch-size", "1")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=os.environ | {"OMP_NUM_THREADS": "1"})
    first = out / "embeddings" / "part_00000.parquet"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not first.exists():
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    _kill_tree(process)
    counts = {i: s["samples"] for i, s in enumerate(read_manifest(dataset)["shards"])}
    done = sorted(out.glob("embeddings/part_*.parquet"))
    assert done and len(done) < 4 and not (out / "_SUCCESS").exists()
    for part in done:  # whatever a killed run left under a final name is complete
        assert pq.read_metadata(part).num_rows == len(WINDOWS) * counts[int(part.stem.split("_")[1])]
    kept = {part.name: part.stat().st_mtime_ns for part in done}
    result = CliRunner().invoke(main, embed_args(dataset, out, "--fragment-size", "128", "--num-workers", "0"))
    assert result.exit_code == 0, result.output  # the dead run's lock is taken over
    assert {name: (out / "embeddings" / name).stat().st_mtime_ns for name in kept} == kept  # skipped, not redone
    assert Counter(row["key"] for row in read_rows(out)) == {key: len(WINDOWS) for key in index_keys(dataset)}
    assert not list(out.glob("embeddings/*.tmp")) and (out / "_SUCCESS").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (["--fragment-size", "64"], "error: --fragment-size 64: model geoaware-unet-tiny takes 128 px inputs"),
    (["--fragment-size", "0"], "error: --fragment-size 0: expected a positive finite number"),
    (["--model", "nope"], "error: --model nope: unknown; choose one of"),
    (["--init", "missing.pt"], "error: --init missing.pt: not a readable weights file"),
    (["--init", "README.md"], "error: --init README.md: not a readable weights file (Weights only load failed"),
    (["--model", "phileo-vit-tiny"], "error: --init "),
])
def test_bad_flags_are_one_line(dataset, tmp_path, extra, message):
    result = CliRunner().invoke(main, embed_args(dataset, tmp_path / "out") + extra)
    assert result.exit_code == 2 and result.output.startswith(message), result.output
    assert result.output.count("\n") == 1


def test_a_rerun_with_other_arguments_is_refused(dataset, tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(main, embed_args(dataset, out, "--num-workers", "0")).exit_code == 0
    result = CliRunner().invoke(main, embed_args(dataset, out, "--fragment-size", "128"))
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: --output {out}: holds embeddings made with another --fragment-size")


def test_help_and_flag_defaults():
    command = main.commands["embed"]
    help_text = CliRunner().invoke(main, ["embed", "--help"]).output
    assert "--output" in help_text and "--out " not in help_text
    defaults = {p.name: p.default for p in command.params if p.default is not None and not p.required}
    fields = {f.name: f.default for f in dataclasses.fields(EmbedConfig)}
    assert defaults and all(fields[name] == value for name, value in defaults.items())


@pytest.mark.slow
def test_shards_streamed_from_s3_give_the_local_rows(dataset, tmp_path, monkeypatch):
    from tests.s3_server import SeaweedS3

    local = tmp_path / "local"
    assert CliRunner().invoke(main, embed_args(dataset, local, "--num-workers", "0")).exit_code == 0
    with SeaweedS3(tmp_path / "seaweed") as server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        prefix = server.upload_dir(dataset, "ds")
        result = CliRunner().invoke(main, embed_args(dataset, tmp_path / "s3", "--num-workers", "1") + [
            "--shards", f"{prefix}/manifest.json"])
    assert result.exit_code == 0, result.output
    assert read_rows(tmp_path / "s3") == read_rows(local)
