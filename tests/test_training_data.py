"""Training data path: shard lists, epoch plans, crops and labels, exactly-once streaming."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from rasterio.warp import transform as warp

from phileo.geo import encode_latlon
from tests.test_build import read_dataset
from training.data.crop_labels import cloud_fractions, crop_labels, landcover_fractions
from training.data.epoch import plan_epoch
from training.data.loader import StreamOptions, make_loader, model_input
from training.data.pieces import rank_pieces
from training.data.shards import ShardSpecError, resolve_shards


def test_label_coords_match_rasterio_in_all_quadrants(built):
    for sample in read_dataset(built).values():
        meta, size = sample.meta, 64
        for y, x in ((0, 0), (56, 20)):
            labels = crop_labels(meta, sample.arrays, y, x, size)
            a, b, c, d, e, f = meta["transform"]
            col, row = x + size / 2, y + size / 2
            lon, lat = warp(meta["crs"], "EPSG:4326", [a * col + b * row + c], [d * col + e * row + f])
            np.testing.assert_allclose(labels["coords"], encode_latlon(lat[0], lon[0]), atol=1e-5)


def test_cloud_and_landcover_fractions_on_hand_made_masks():
    cloud = np.array([[0, 0, 1, 1], [2, 3, 3, 3]], dtype=np.uint8)
    np.testing.assert_allclose(cloud_fractions(cloud), [2 / 8, 2 / 8, 1 / 8, 3 / 8])
    codes = np.array([[10, 10, 0, 95], [100, 0, 10, 50]], dtype=np.uint8)  # 0 = no data
    fractions, weight = landcover_fractions(codes)
    expected = np.zeros(11)
    expected[[0, 9, 10, 4]] = [3 / 6, 1 / 6, 1 / 6, 1 / 6]
    np.testing.assert_allclose(fractions, expected, atol=1e-7)
    assert weight == pytest.approx(6 / 8)
    fractions, weight = landcover_fractions(np.zeros((4, 4), np.uint8))
    assert weight == 0 and fractions[0] == 1


def test_missing_layers_get_zero_weight_and_present_ones_are_used():
    meta = {"shape": [8, 8], "corners_lonlat": [[0, 1], [1, 1], [1, 0], [0, 0]]}
    arrays = {"cloud": np.zeros((8, 8), np.uint8)}
    labels = crop_labels(meta, arrays, 0, 0, 4)
    assert labels["landcover_weight"] == labels["buildings_weight"] == labels["water_weight"] == 0
    assert labels["clouds_weight"] == 1 and labels["clouds"][0] == 1
    arrays |= {"label_buildings": np.full((8, 8), 50, np.uint8), "label_water": np.eye(8, dtype=np.uint8)}
    labels = crop_labels(meta, arrays, 0, 0, 4)
    assert labels["buildings"][0] == pytest.approx(0.5) and labels["buildings_weight"] == 1
    assert labels["water"][0] == pytest.approx(0.25) and labels["water_weight"] == 1


def test_resolve_shards_from_manifest_dir_list_and_pattern(built, tmp_path, monkeypatch):
    monkeypatch.setenv("PHILEO_REMOTE_RETRIES", "0")  # the remote case below fails at once, whatever DNS says
    manifest = json.loads((built / "manifest.json").read_text())
    expected = [(str(built / s["url"]), s["samples"]) for s in manifest["shards"]]
    for spec in (str(built), str(built / "manifest.json")):
        assert [(s.url, s.samples) for s in resolve_shards(spec)] == expected
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{url}\n" for url, _ in expected))
    assert [(s.url, s.samples) for s in resolve_shards(str(listing))] == expected
    first, last = expected[0][0].rsplit("/", 1)[1][:6], expected[-1][0].rsplit("/", 1)[1][:6]
    pattern = f"{built}/shards/{{{first}..{last}}}-0000.tar"
    assert [(s.url, s.samples) for s in resolve_shards(pattern)] == expected
    with pytest.raises(ShardSpecError, match="does not exist"):
        resolve_shards(str(tmp_path / "nope-{0..2}.tar"))
    with pytest.raises(ShardSpecError, match="remote shards"):
        resolve_shards("https://example.invalid/shards/{0..1}.tar")


def crops_of(batches) -> Counter:
    return Counter(pair for batch in batches for pair in zip(batch["keys"], batch["crop_index"]))


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1), (2, 3)])
def test_stream_trains_every_crop_exactly_once_but_the_last_partial_global_batch(built, world, workers):
    shards = resolve_shards(str(built))
    options = StreamOptions(crops_per_tile=3, crop_size=64, batch_size=2)
    plan = plan_epoch(shards, world, workers, options.batch_size, options.crops_per_tile, 0, 0, shuffle_buffer=7)
    counts: Counter = Counter()
    for rank in range(world):
        batches = list(make_loader(plan, rank, options, workers))
        assert len(batches) == plan.steps
        for batch in batches:
            image = model_input(batch, torch.device("cpu"))
            assert image.shape == (2, 10, 64, 64) and image.dtype == torch.float32 and batch["coords"].shape == (2, 4)
            assert 0 < float(image.max()) < 7 and batch["s2_10m"].dtype == torch.uint16
        counts += crops_of(batches)
    assert set(counts.values()) == {1} and plan.repeated == 0
    assert len(counts) + plan.dropped == 12 * 3 and plan.dropped < world * 2
    assert {key for key, _ in counts} <= set(read_dataset(built))


def test_shards_split_between_workers_are_read_from_their_byte_range_or_by_skipping(built):
    """With index.parquet a worker whose range starts inside a shard seeks there; without one it skips the
    samples before undecoded. Both give the same batches, bit for bit."""
    from dataclasses import replace

    from training.data.pieces import rank_pieces

    shards = resolve_shards(str(built))
    assert all(s.index == str(built / "index.parquet") for s in shards)
    options = StreamOptions(crops_per_tile=3, crop_size=32, batch_size=5)
    plan = plan_epoch(shards, 1, 2, 5, 3, 0, 0, shuffle_buffer=5)  # 4 + 3 batches of 5: tile 7 is cut 2 + 1
    first, second = rank_pieces(plan, 0)
    assert first[-1].url == second[0].url and first[-1].tiles[-1][0] == second[0].tiles[0][0]
    assert first[-1].tiles[-1][1] == (0, 1) and second[0].tiles[0][1] == (2,)
    spans = [p for p in first + second if p.span is not None]
    assert spans and all(not p.whole for p in spans) and any(p.span[0] > 0 for p in spans)
    indexed = list(make_loader(plan, 0, options, 2))
    bare = plan_epoch([replace(s, index=None) for s in shards], 1, 2, 5, 3, 0, 0, shuffle_buffer=5)
    assert all(p.span is None for worker in rank_pieces(bare, 0) for p in worker)
    streamed = list(make_loader(bare, 0, options, 2))
    assert len(indexed) == len(streamed) == plan.steps
    for a, b in zip(indexed, streamed, strict=True):
        assert (a["keys"], a["crop_index"]) == (b["keys"], b["crop_index"])
        assert torch.equal(a["s2_10m"], b["s2_10m"]) and torch.equal(a["s2_20m"], b["s2_20m"])
    assert set(crops_of(indexed).values()) == {1}


def test_index_lookup_reads_only_the_row_groups_of_the_wanted_shards(built, tmp_path, monkeypatch):
    import shutil

    import pyarrow.parquet as pq

    from training.data.pieces import sample_spans

    copy = tmp_path / "ds"
    shutil.copytree(built, copy)
    table = pq.read_table(copy / "index.parquet")
    pq.write_table(table, copy / "index.parquet", row_group_size=2)  # 6 row groups of 2 samples
    names = sorted(set(table.column("shard").to_pylist()))
    read: list = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read.append(list(groups)) or real(self, groups, **kw))
    wanted = [str(copy / names[1])]
    spans = sample_spans(str(copy / "index.parquet"), wanted)
    rows = table.filter(pq.ParquetFile(copy / "index.parquet").read().column("shard").to_numpy(
        zero_copy_only=False) == names[1])
    assert spans[wanted[0]][0].tolist() == rows.column("offset").to_pylist()
    assert spans[wanted[0]][1].tolist() == rows.column("bytes").to_pylist()
    assert 0 < len(read[0]) < 6  # not every row group
    assert sample_spans(str(tmp_path / "none.parquet"), wanted) == {}


def test_loader_resumed_on_another_layout_trains_each_remaining_crop_once(built):
    """Kill after 5 batches of 1 rank x 2 workers (mid-group of the worker mixing), go on with 2 ranks x 3 workers
    and another batch size: the crops of both parts are every crop of the epoch once, but < 1 global batch."""
    import itertools

    shards = resolve_shards(str(built))
    options = StreamOptions(crops_per_tile=3, crop_size=32, batch_size=2)
    first = plan_epoch(shards, 1, 2, 2, 3, 5, 0, shuffle_buffer=6, shards_in_parallel=2)
    trained = crops_of(itertools.islice(iter(make_loader(first, 0, options, 2)), 5))
    assert sum(trained.values()) == 10
    resumed_options = StreamOptions(crops_per_tile=3, crop_size=32, batch_size=3)
    second = plan_epoch(shards, 2, 3, 3, 3, 5, 0, history=first.position_after(5).segments, shuffle_buffer=4)
    rest = sum((crops_of(make_loader(second, rank, resumed_options, 3)) for rank in range(2)), Counter())
    both = trained + rest
    assert set(both.values()) == {1}  # nothing twice
    assert len(both) + second.dropped == 12 * 3 and second.dropped < 2 * 3


@pytest.mark.parametrize("y, x", [(0, 0), (56, 56), (30, 8), (56, 0)])
def test_crop_20m_upsampling_equals_full_tile_bilinear(built, y, x):
    import torch
    import torch.nn.functional as F

    from training.data.batches import as_tensors, collate_crops
    from training.data.loader import cut_crop, model_input

    sample = next(iter(read_dataset(built).values()))
    tile = {"key": sample.key, "url": "u", "repeat": False, "meta": sample.meta, "arrays": sample.arrays}
    batch = as_tensors(collate_crops([cut_crop(tile, y, x, 64)]))
    image = model_input(batch, torch.device("cpu"))
    full = F.interpolate(torch.from_numpy(sample.arrays["s2_20m"].astype(np.float32))[None], scale_factor=2,
                         mode="bilinear", align_corners=False)[0]
    expected_20m = full[:, y : y + 64, x : x + 64] / 10000
    expected_10m = torch.from_numpy(sample.arrays["s2_10m"][:, y : y + 64, x : x + 64].astype(np.float32)) / 10000
    torch.testing.assert_close(image[0, :4], expected_10m)
    torch.testing.assert_close(image[0, 4:], expected_20m, rtol=1e-6, atol=1e-7)


def test_water_and_buildings_exclude_nodata_pixels():
    meta = {"shape": [4, 4], "corners_lonlat": [[0, 1], [1, 1], [1, 0], [0, 0]],
            "labels": {"water": {"nodata": 255}, "buildings": {"nodata": 255}}}
    water = np.array([[1, 0, 255, 255]] * 4, dtype=np.uint8)
    buildings = np.full((4, 4), 255, dtype=np.uint8)
    labels = crop_labels(meta, {"label_water": water, "label_buildings": buildings}, 0, 0, 4)
    assert labels["water"][0] == pytest.approx(0.5) and labels["water_weight"] == pytest.approx(0.5)
    assert labels["buildings_weight"] == 0 and labels["buildings"][0] == 0


def test_shuffle_spreads_tiles_over_batches_and_keeps_every_crop_once():
    from training.data.order import ShuffleCrops

    crops = [{"key": f"t{tile:02d}", "n": n} for tile in range(40) for n in range(16)]  # tile by tile, K=16
    out = list(ShuffleCrops(16 * 20, seed=3, epoch=0, rank=0)(iter(crops)))
    assert sorted((c["key"], c["n"]) for c in out) == sorted((c["key"], c["n"]) for c in crops)
    assert out == list(ShuffleCrops(16 * 20, seed=3, epoch=0, rank=0)(iter(crops)))  # seeded
    assert out != list(ShuffleCrops(16 * 20, seed=3, epoch=1, rank=0)(iter(crops)))
    full = [len({c["key"] for c in out[i : i + 16]}) for i in range(0, len(out) - 16 * 16, 16)]
    assert sum(full) / len(full) > 15.5  # a reservoir shuffle gives about 10 of 16 on this stream


@pytest.mark.parametrize("sizes", [(4, 4, 3), (3, 3, 3)])  # the epoch's last group; every other (one np.stack)
def test_redeal_mixes_workers_and_keeps_every_crop_once(sizes):
    from training.data.batches import redeal

    def batch(worker: int, size: int) -> dict:
        keys = [f"w{worker}-{j}" for j in range(size)]
        return {"keys": keys, "urls": [f"u{worker}"] * size, "s2_10m": torch.arange(size) + 100 * worker,
                "repeated": torch.tensor([j % 2 == 0 for j in range(size)])}

    group = [batch(worker, size) for worker, size in enumerate(sizes)]
    out = redeal(group)
    assert [len(b["keys"]) for b in out] == list(sizes)
    assert out[0]["keys"] == ["w0-0", "w1-0", "w2-0", "w0-1"][: sizes[0]]  # position by position over the workers
    dealt = [f"w{b}-{j}" for j in range(max(sizes)) for b in range(len(sizes)) if j < sizes[b]]
    assert [k for b in out for k in b["keys"]] == dealt
    for b in out:  # tensors and lists are re-dealt together, crop by crop
        assert b["s2_10m"].tolist() == [100 * int(k[1]) + int(k.split("-")[1]) for k in b["keys"]]
        assert b["repeated"].tolist() == [int(k.split("-")[1]) % 2 == 0 for k in b["keys"]]
        assert b["urls"] == [f"u{k[1]}" for k in b["keys"]]
    assert sorted(k for b in out for k in b["keys"]) == sorted(k for b in group for k in b["keys"])


def test_batches_of_two_workers_hold_tiles_of_both(built):
    shards = resolve_shards(str(built))
    options = StreamOptions(crops_per_tile=2, crop_size=32, batch_size=4, shuffle_buffer=8)
    plan = plan_epoch(shards, 1, 2, options.batch_size, options.crops_per_tile, 0, 0, shuffle_buffer=8)
    tiles_of = [{key for piece in worker for key in read_piece_keys(piece)} for worker in rank_pieces(plan, 0)]
    batches = list(make_loader(plan, 0, options, 2))
    assert len(batches) == plan.steps
    mixed = [all(set(b["keys"]) & tiles for tiles in tiles_of) for b in batches]
    assert sum(mixed) >= len(batches) - 1  # every batch but possibly the last, once one worker has run out


def read_piece_keys(piece) -> list[str]:
    from sharding.dataset.tarread import iter_tar_samples

    positions = {position for position, _ in piece.tiles}
    return [raw.key for number, raw in enumerate(iter_tar_samples(piece.url)) if number in positions]


def test_plan_command_reports_the_trainers_own_plan(built):
    from click.testing import CliRunner

    from training.cli import main

    result = CliRunner().invoke(main, ["plan", "--shards", str(built), "--world-size", "2", "--num-workers", "1",
                                       "--batch-size", "2", "--crops-per-tile", "3"])
    assert result.exit_code == 0, result.output
    shards = resolve_shards(str(built))
    plan = plan_epoch(shards, 2, 1, 2, 3, 0, 0)
    assert (plan.steps, plan.dropped, plan.repeated) == (9, 0, 0)  # 12 tiles x 3 crops = 9 steps of 2 x 2
    assert f"steps per rank: {plan.steps} optimizer steps" in result.output
    assert f"crops per epoch: {plan.steps * 2 * 2} (K=3 per tile)" in result.output
    assert f"{plan.dropped} crops dropped, {plan.repeated} repeated" in result.output
    assert re.search(r"resume state: \d{2,3} bytes per checkpoint", result.output)
    too_many = CliRunner().invoke(main, ["plan", "--shards", str(built), "--world-size", "512"])
    assert too_many.exit_code == 2 and "192 crops in an epoch: less than 1 batch(es) of 16" in too_many.output
