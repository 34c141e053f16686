"""Decode only the Blosc2 blocks that a tile's crops touch.

A shard array is one Blosc2 chunk split into blocks that span every band and a small square
of pixels (phileo/schema.py `block_shape`). K crops of a 1068 px tile touch a fraction of
those blocks, so the loader decompresses that fraction, one ranged call per run of adjacent
blocks in a block row, into a zero-filled array of the full shape. Arrays laid out otherwise
(older shards: row blocks, several chunks) are decoded whole, which is always correct.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import blosc2
import numpy as np

# Above this share of blocks, one whole-chunk decode (multi-threaded, no per-call cost) is cheaper.
FULL_DECODE_FRACTION = 0.6

Window = tuple[int, int, int, int]  # y, x, height, width on the last two axes


class BlockDecodeError(ValueError):
    """A compressed block could not be decoded (a damaged frame whose header looked valid)."""


def block_addressable(array: blosc2.NDArray) -> bool:
    """One chunk whose blocks span every leading axis: a block row is then a run of flat items."""
    return (array.ndim in (2, 3) and tuple(array.chunks) == tuple(array.shape)
            and tuple(array.blocks[:-2]) == tuple(array.shape[:-2]))


def needed_blocks(array: blosc2.NDArray, windows: Sequence[Window]) -> np.ndarray:
    """Boolean (block rows, block columns) grid of the blocks that `windows` touch (clipped to the array)."""
    block_h, block_w = array.blocks[-2:]
    height, width = array.shape[-2:]
    grid = np.zeros((-(-height // block_h), -(-width // block_w)), dtype=bool)
    for y, x, h, w in windows:
        top, left = max(y, 0), max(x, 0)
        bottom, right = min(y + h, height), min(x + w, width)
        if bottom > top and right > left:
            grid[top // block_h : (bottom - 1) // block_h + 1, left // block_w : (right - 1) // block_w + 1] = True
    return grid


def decode_windows(array: blosc2.NDArray, windows: Sequence[Window], scratch: dict | None = None) -> np.ndarray:
    """The array with every pixel inside `windows` decoded, bit-exact.

    Pixels outside the windows are 0, or, with a `scratch` dict (reused buffers: fresh ones cost
    page faults that doubled a DataLoader worker's time), whatever an earlier call left there;
    the result then lives until the next call with the same `scratch`.
    """
    try:
        if not block_addressable(array):
            return array[...]
        grid = needed_blocks(array, windows)
        if grid.mean() > FULL_DECODE_FRACTION:
            return array[...]
        return _decode_blocks(array, grid, scratch)
    except (RuntimeError, ValueError) as error:  # blosc2 reports a damaged block as a bare error
        raise BlockDecodeError(f"damaged Blosc2 data ({error})") from error


def _buffer(scratch: dict | None, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if scratch is None:
        return np.zeros(shape, dtype=dtype)
    key = (name, shape, np.dtype(dtype).str)
    if key not in scratch:
        scratch[key] = np.zeros(shape, dtype=dtype)
    return scratch[key]


def _decode_blocks(array: blosc2.NDArray, grid: np.ndarray, scratch: dict | None) -> np.ndarray:
    shape, dtype, schunk = tuple(array.shape), array.dtype, array.schunk  # blosc2 properties: read once
    lead, (block_h, block_w) = shape[:-2], tuple(array.blocks[-2:])
    block_items = math.prod(lead) * block_h * block_w
    rows, columns = grid.shape
    out = _buffer(scratch, "out", lead + (rows * block_h, columns * block_w), dtype)
    buffer = _buffer(scratch, "run", (columns * block_items,), dtype)
    # a run of blocks (count, *lead, h, w) side by side on the pixel grid is (*lead, h, count, w)
    side_by_side = (*range(1, len(lead) + 2), 0, len(lead) + 2)
    for row, first, stop in _runs(grid):
        count = stop - first
        start = (row * columns + first) * block_items
        run = buffer[: count * block_items]
        schunk.get_slice(start, start + count * block_items, out=run)
        strip = out[..., row * block_h : (row + 1) * block_h, first * block_w : stop * block_w]
        strip.reshape((*lead, block_h, count, block_w))[...] = run.reshape((count, *lead, block_h, block_w)).transpose(
            side_by_side)
    return out[..., : shape[-2], : shape[-1]]


def _runs(grid: np.ndarray, max_gap: int = 1) -> list[tuple[int, int, int]]:
    """(row, start, stop) of the runs of True in each row of a boolean grid, bridging gaps of up to `max_gap`.

    Decoding one unneeded block costs about as much as one more call, so short gaps are decoded.
    """
    runs: list[list[int]] = []
    for row, column in zip(*(axis.tolist() for axis in np.nonzero(grid))):  # row-major order
        if runs and runs[-1][0] == row and column - runs[-1][2] <= max_gap:
            runs[-1][2] = column + 1
        else:
            runs.append([row, column, column + 1])
    return [(row, first, stop) for row, first, stop in runs]
