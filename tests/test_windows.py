"""Block-addressed decoding: only the blocks under the crops, bit-exact, identical crops to a full decode."""

import blosc2
import numpy as np
import pytest

import training.data.windows as windows_module
from phileo.schema import block_shape, encode_array
from sharding.dataset.tarread import iter_tar_samples
from tests.conftest import read_manifest
from training.data.loader import BadDataPolicy, CutCrops, StreamOptions, decode_crop_windows, read_tiles
from training.data.windows import BlockDecodeError, block_addressable, decode_windows, needed_blocks


def smooth_array(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    bands = [(1000 + 400 * np.sin(yy / 7 + b) * np.cos(xx / 5) + rng.integers(0, 50, yy.shape)).astype(np.uint16)
             for b in range(shape[0] if len(shape) == 3 else 1)]
    return np.stack(bands) if len(shape) == 3 else bands[0]


@pytest.mark.parametrize("shape, blocks", [((4, 200, 150), (4, 64, 64)), ((6, 100, 75), (6, 32, 32)),
                                           ((200, 150), (64, 64)), ((10, 256, 256), (10, 64, 64))])
def test_windows_decode_bit_exact_including_edges(shape, blocks, monkeypatch):
    monkeypatch.setattr(windows_module, "FULL_DECODE_FRACTION", 1.0)  # the block path, however many blocks
    array = smooth_array(shape)
    lazy = blosc2.ndarray_from_cframe(encode_array(array, blocks=blocks))
    assert block_addressable(lazy)
    height, width = shape[-2:]
    windows = [(0, 0, 17, 9), (height - 20, width - 33, 20, 33), (30, 40, 64, 64), (-1, -1, 10, 10),
               (height - 5, width - 5, 10, 10)]  # the last two reach outside: clipped like a halo
    decoded = decode_windows(lazy, windows)
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    for y, x, h, w in windows:
        inside = (..., slice(max(y, 0), min(y + h, height)), slice(max(x, 0), min(x + w, width)))
        np.testing.assert_array_equal(decoded[inside], array[inside])
    grid = needed_blocks(lazy, windows)
    assert 0 < grid.sum() < grid.size  # some blocks were skipped: the windowed path really ran
    untouched = np.kron(~grid, np.ones(blocks[-2:], dtype=bool))[:height, :width]
    outside, truth = decoded[..., untouched], array[..., untouched]
    assert ((outside == 0) | (outside == truth)).all()  # skipped blocks are zero (or decoded): never stale memory
    assert (outside == 0).any()  # and some were really skipped


def test_default_layouts_fall_back_to_a_full_decode():
    array = smooth_array((4, 200, 150))
    # per-band row blocks, as Blosc2 3.x chose by default for older shards (4.15 makes this small array one block)
    lazy = blosc2.ndarray_from_cframe(encode_array(array, blocks=(1, 40, 150)))
    assert tuple(lazy.blocks) == (1, 40, 150) and not block_addressable(lazy)
    np.testing.assert_array_equal(decode_windows(lazy, [(0, 0, 8, 8)]), array)


def test_block_shapes_span_all_bands_and_the_same_ground():
    assert block_shape("s2_10m", (4, 1068, 1068)) == (4, 64, 64)
    assert block_shape("s2_20m", (6, 534, 534)) == (6, 32, 32)
    assert block_shape("cloud", (1068, 1068)) == (64, 64)
    assert block_shape("s2_stack", (10, 40, 40)) == (10, 40, 40)
    assert block_shape("s2_60m", (2, 178, 178)) is None


def _damage_block(frame: bytes, lazy: blosc2.NDArray, block: int) -> bytes:
    """Point one block's start offset (the chunk's bstarts table) past the end of the chunk."""
    chunk = lazy.schunk.get_chunk(0)
    at = frame.find(chunk) + 32 + 4 * block  # 32-byte chunk header, then one int32 offset per block
    assert frame.find(chunk) > 0
    return frame[:at] + b"\xff\xff\xff\x7f" + frame[at + 4 :]


def test_a_damaged_block_is_a_clear_error_only_where_it_is_read():
    array = smooth_array((4, 200, 150))
    frame = encode_array(array, blocks=(4, 64, 64))
    damaged = blosc2.ndarray_from_cframe(_damage_block(frame, blosc2.ndarray_from_cframe(frame), block=4))
    np.testing.assert_array_equal(decode_windows(damaged, [(0, 0, 10, 10)])[:, :10, :10], array[:, :10, :10])
    with pytest.raises(BlockDecodeError, match="damaged Blosc2 data"):
        decode_windows(damaged, [(70, 70, 10, 10)])  # block row 1, column 1 = block 4 of a 3-column grid


def _crops(tiles: list[dict], options: StreamOptions) -> list[dict]:
    return list(CutCrops(options, epoch=0)(iter(tiles)))


def test_lazy_tiles_give_the_same_crops_as_decoded_tiles(built, monkeypatch):
    monkeypatch.setattr(windows_module, "FULL_DECODE_FRACTION", 1.0)  # always the block path
    options = StreamOptions(crops_per_tile=3, crop_size=32)
    url = str(built / read_manifest(built)["shards"][0]["url"])
    eager = [t | {"repeat": False} for t in read_tiles(url, BadDataPolicy(0.0))]
    lazy = [t | {"repeat": False} for t in read_tiles(url, BadDataPolicy(0.0), lazy=True)]
    assert isinstance(lazy[0]["arrays"]["s2_10m"], blosc2.NDArray) and block_addressable(lazy[0]["arrays"]["s2_10m"])
    first = decode_crop_windows(lazy[0]["arrays"], [(0, 0)], 32)
    assert not first["s2_10m"][:, -1, -1].any()  # far corner block skipped: the block path ran
    crops_eager, crops_lazy = _crops(eager, options), _crops(lazy, options)
    assert len(crops_lazy) == 3 * len(eager) > 0
    for a, b in zip(crops_eager, crops_lazy, strict=True):
        assert a.keys() == b.keys() and a["key"] == b["key"]
        for name, value in a.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, b[name], err_msg=name)


def test_a_tile_with_a_damaged_block_yields_no_crop_and_is_counted(built):
    url = str(built / read_manifest(built)["shards"][0]["url"])
    policy = BadDataPolicy(1.0)
    tiles = [t | {"repeat": False} for t in read_tiles(url, policy, lazy=True)]
    frame = next(raw.members["s2_10m.b2nd"] for raw in iter_tar_samples(url) if raw.key == tiles[0]["key"])
    broken = _damage_block(frame, tiles[0]["arrays"]["s2_10m"], block=0)
    tiles[0]["arrays"]["s2_10m"] = blosc2.ndarray_from_cframe(broken)
    crops = _crops(tiles, StreamOptions(crops_per_tile=2, crop_size=120))  # whole tile: every block is read
    assert [c["key"] for c in crops] == [k for t in tiles[1:] for k in (t["key"],) * 2]
    assert policy.bad == 1 and policy.good == len(tiles) - 1 and url in policy.urls
