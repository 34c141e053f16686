"""The schema is the contract between sharding/ and training/: write with our writer, read with webdataset."""

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from phileo.schema import SCHEMA_VERSION, Sample, SchemaError, decode_array, decode_sample, encode_array, encode_sample
from sharding.build.writer import ShardWriter


def make_sample(key="454U_120R_20200612T104021", size=60, stack=False, seed=0) -> Sample:
    rng = np.random.default_rng(seed)
    if stack:
        arrays = {"s2_stack": rng.integers(0, 65535, (10, size, size), dtype=np.uint16)}
    else:
        arrays = {"s2_10m": rng.integers(0, 65535, (4, size, size), dtype=np.uint16),
                  "s2_20m": rng.integers(0, 65535, (6, size // 2, size // 2), dtype=np.uint16),
                  "s2_60m": rng.integers(0, 65535, (2, size // 6, size // 6), dtype=np.uint16)}
    arrays["cloud"] = rng.integers(0, 4, (size, size), dtype=np.uint8)
    arrays["label_water"] = rng.integers(0, 2, (size, size), dtype=np.uint8)
    arrays["label_roads"] = rng.random((size, size), dtype=np.float32)
    meta = {"schema": SCHEMA_VERSION, "source": "test", "key": key, "shape": [size, size], "bands": {},
            "corners_lonlat": [[0, 1], [1, 1], [1, 0], [0, 0]], "centre_lat": 0.5, "centre_lon": 0.5}
    return Sample(key, meta, arrays, thumb_jpg=b"\xff\xd8fakejpeg")


def test_array_roundtrip_and_window():
    array = np.arange(4 * 60 * 90, dtype=np.uint16).reshape(4, 60, 90)
    data = encode_array(array)
    np.testing.assert_array_equal(decode_array(data), array)
    np.testing.assert_array_equal(decode_array(data, window=(10, 20, 16, 32)), array[:, 10:26, 20:52])


def test_write_with_our_writer_then_read_with_webdataset(tmp_path):
    samples = [make_sample(f"cell_{i}", stack=(i % 2 == 1), seed=i) for i in range(5)]
    writer = ShardWriter(tmp_path, unit=7, shard_size=10**9)
    for sample in samples:
        writer.write(sample)
    (shard,) = writer.close()
    assert shard.name == "000007-0000.tar" and shard.samples == 5
    dataset = wds.WebDataset(str(tmp_path / shard.name), shardshuffle=False, empty_check=False)
    read = []
    for record in dataset:
        members = {k: v for k, v in record.items() if not k.startswith("__")}
        read.append(decode_sample(record["__key__"], members))
    assert [s.key for s in read] == [s.key for s in samples]
    for original, decoded in zip(samples, read):
        assert decoded.meta == original.meta and decoded.thumb_jpg == original.thumb_jpg
        assert set(decoded.arrays) == set(original.arrays)
        for name, array in original.arrays.items():
            assert decoded.arrays[name].dtype == array.dtype
            np.testing.assert_array_equal(decoded.arrays[name], array)


def test_shards_roll_over_at_target_size(tmp_path):
    writer = ShardWriter(tmp_path, unit=0, shard_size=150_000)
    sizes = []
    for i in range(6):
        sizes.append(writer.write(make_sample(f"k{i}", seed=i))["bytes"])
    shards = writer.close()
    assert len(shards) > 1 and sum(s.samples for s in shards) == 6
    for shard in shards:  # over the target by less than one sample
        assert shard.bytes < 150_000 + max(sizes) + 10240
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.meta.update(schema="phileo-shard/0"), "schema"),
    (lambda s: s.meta.pop("centre_lat"), "lacks centre_lat"),
    (lambda s: s.arrays.update(s2_10m=s.arrays["s2_10m"].astype(np.int32)), "dtype int32"),
    (lambda s: s.arrays.update(cloud=s.arrays["cloud"][:-1]), "shape"),
    (lambda s: s.arrays.pop("s2_60m"), "missing image members"),
    (lambda s: s.arrays.update(s2_stack=np.zeros((10, 60, 60), np.uint16)), "both"),
    (lambda s: s.arrays.update(label_x=np.zeros((60, 60), np.int64)), "label_x"),
    (lambda s: s.meta.update(shape=[61, 61]), "divisible by 6"),
])
def test_invalid_samples_are_refused_with_a_clear_message(mutate, message):
    sample = make_sample()
    mutate(sample)
    with pytest.raises(SchemaError, match=message):
        encode_sample(sample)


def test_bad_keys_and_frames():
    with pytest.raises(SchemaError, match="key"):
        encode_sample(make_sample(key="a.b"))
    members = encode_sample(make_sample())
    corrupt = r"cloud.b2nd: xxh3 [0-9a-f]{16}, meta.json says [0-9a-f]{16} \(corrupt member\)"
    with pytest.raises(SchemaError, match=corrupt):
        decode_sample("454U_120R_20200612T104021", members | {"cloud.b2nd": b"garbage"})
    meta = json.loads(members["meta.json"])
    meta.pop("xxh3")  # a sample written before members carried checksums
    older = members | {"meta.json": json.dumps(meta).encode()}
    assert decode_sample("454U_120R_20200612T104021", older).meta == make_sample().meta
    with pytest.raises(SchemaError, match="cloud.b2nd: not a valid Blosc2 frame"):
        decode_sample("454U_120R_20200612T104021", older | {"cloud.b2nd": b"garbage"})
    with pytest.raises(SchemaError, match="meta.json is not valid"):
        decode_sample("k", members | {"meta.json": b"{"})


def test_tar_member_names_follow_webdataset_convention(tmp_path):
    writer = ShardWriter(tmp_path, unit=1, shard_size=10**9)
    writer.write(make_sample("454U_120R_20200612T104021"))
    (shard,) = writer.close()
    with tarfile.open(tmp_path / shard.name) as tar:
        names = tar.getnames()
        meta = json.load(io.BytesIO(tar.extractfile(names[0]).read()))
    assert names[0] == "454U_120R_20200612T104021.meta.json" and meta["schema"] == SCHEMA_VERSION
    assert all(n.startswith("454U_120R_20200612T104021.") for n in names)


def test_skipped_members_must_exist_but_are_not_decoded():
    members = encode_sample(make_sample())
    sample = decode_sample("454U_120R_20200612T104021", members, skip=frozenset({"s2_60m"}))
    assert "s2_60m" not in sample.arrays and "s2_20m" in sample.arrays
    del members["s2_60m.b2nd"]
    with pytest.raises(SchemaError, match="missing image members"):
        decode_sample("454U_120R_20200612T104021", members, skip=frozenset({"s2_60m"}))
