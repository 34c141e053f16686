"""Decode only the Blosc2 blocks that a tile's crops touch.

A shard array is one Blosc2 chunk split into blocks that span every band and a small square
of pixels (phileo/schema.py `block_shape`). K crops of a 1068 px tile touch a fraction of
those blocks, so the loader decompresses that fraction, one ranged call per run of adjacent
blocks in a block row, into a zero-filled array of the full shape. Arrays laid out otherwise
(older shards: row blocks, several chunks) are decoded whole, which is always correct.
"""

from __future__ import annotations

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


def decode_windows(array: blosc2.NDArray, windows: Sequence[Window]) -> np.ndarray:
    """The array with every pixel inside `windows` decoded, bit-exact; pixels outside them may be 0."""
    try:
        if not block_addressable(array):
            return array[...]
        grid = needed_blocks(array, windows)
        if grid.mean() > FULL_DECODE_FRACTION:
            return array[...]
        return _decode_blocks(array, grid)
    except (RuntimeError, ValueError) as error:  # blosc2 reports a damaged block as a bare error
        raise BlockDecodeError(f"damaged Blosc2 data ({error})") from error


def _decode_blocks(array: blosc2.NDArray, grid: np.ndarray) -> np.ndarray:
    lead = tuple(array.shape[:-2])
    block_h, block_w = array.blocks[-2:]
    block_items = int(np.prod(array.blocks))
    rows, columns = grid.shape
    out = np.zeros(lead + (rows * block_h, columns * block_w), dtype=array.dtype)  # lazily zeroed pages
    buffer = np.empty(columns * block_items, dtype=array.dtype)
    for row in range(rows):
        for first, stop in _runs(grid[row]):
            count = stop - first
            start = (row * columns + first) * block_items
            array.schunk.get_slice(start, start + count * block_items, out=buffer[: count * block_items])
            blocks = buffer[: count * block_items].reshape((count, *lead, block_h, block_w))
            # (blocks, ..., h, w) -> (..., h, blocks * w): the run side by side on the pixel grid
            strip = np.moveaxis(blocks, 0, -2).reshape((*lead, block_h, count * block_w))
            out[..., row * block_h : (row + 1) * block_h, first * block_w : stop * block_w] = strip
    return out[..., : array.shape[-2], : array.shape[-1]]


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
