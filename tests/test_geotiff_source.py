"""`--source geotiff`: per-sample folders of GeoTIFFs, with and without metadata.json."""

from __future__ import annotations

import json
import shutil

import numpy as np

from phileo.schema import decode_sample
from sharding.dataset.tarread import iter_tar_samples
from tests.conftest import read_manifest, run_shard
from tools.majortom_fixture import make_majortom_dataset


def decoded(dataset):
    samples = {}
    for shard in read_manifest(dataset)["shards"]:
        for raw in iter_tar_samples(dataset / shard["url"]):
            sample = decode_sample(raw.key, raw.members)
            samples[sample.key] = sample
    return samples


def test_geotiff_folders_build_like_the_extracted_layout(tmp_path):
    rows = make_majortom_dataset(tmp_path / "extracted", num_files=1, rows_per_file=3, layout="extracted")
    products = sorted(p.parent for p in (tmp_path / "extracted").rglob("B02.tif"))
    folders = tmp_path / "folders"
    for index, product in enumerate(products):
        target = folders / f"scene.{index}"  # a dot: not allowed in keys, replaced
        shutil.copytree(product, target)
        if index == 0:  # one sample with MajorTOM-style metadata: MajorTOM-style key
            parts = product.name.split("_")
            (target / "metadata.json").write_text(json.dumps(
                {"grid_cell": product.parent.name, "product_id": product.name, "product_datetime": parts[2],
                 "cloud_cover": 12.5}))
    (folders / "broken").mkdir()
    (folders / "broken" / "B02.tif").write_bytes(b"not a tiff")
    assert run_shard("build", "--input", str(tmp_path / "extracted"), "--output", str(tmp_path / "ref")).exit_code == 0
    result = run_shard("build", "--source", "geotiff", "--input", str(folders), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    reference, built = decoded(tmp_path / "ref"), decoded(tmp_path / "out")
    assert len(built) == len(rows) == 3
    first_key = f"{products[0].parent.name}_{products[0].name.split('_')[2]}"
    assert set(built) == {first_key, "scene-1", "scene-2"}
    assert built[first_key].meta["cloud_cover"] == 12.5
    by_product = {s.meta["product_id"]: s for s in reference.values()}
    folder_product = {f"scene.{index}": product.name for index, product in enumerate(products)}
    for sample in built.values():  # without metadata.json the product id is the folder name
        expected = by_product[folder_product.get(sample.meta["product_id"], sample.meta["product_id"])]
        assert sample.meta["source"] == "geotiff"
        assert sample.meta["transform"] == expected.meta["transform"]
        for member, array in expected.arrays.items():
            assert np.array_equal(sample.arrays[member], array), member
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [r["file"].endswith("broken") for r in rejected] == [True]
    assert run_shard("verify", str(tmp_path / "out")).exit_code == 0


def test_geotiff_source_needs_a_directory(tmp_path):
    result = run_shard("build", "--source", "geotiff", "--input", str(tmp_path / "nope"), "--output",
                       str(tmp_path / "out"))
    assert result.exit_code == 2 and "--source geotiff expects a directory" in result.output
