"""Where the fragments of a tile lie: Major-TOM's fragment grid, and the one window of per-tile embeddings.

Major-TOM (MajorTOM/embedder/grid_cell_fragment.py `fragment_fn`, target_overlap 0.1, border_shift True)
spreads fragments of F px over a side of L px so that neighbours overlap by about 10%: n = round((L - F) /
(0.9 F)) steps of stride floor((L - F) / n), and the last fragment moved flush to the far border. A 1068 px
Core-S2L2A tile gives 5 x 5 fragments of 224 px (stride 211) or 9 x 9 of 128 px (stride 117, last at 940).
Windows are (row, col) of the upper-left pixel, row-major, as its output rows.
"""

from __future__ import annotations

import math

import numpy as np

TARGET_OVERLAP = 0.1  # MajorTOM_Embedder(target_overlap=0.1)


def axis_offsets(length: int, size: int, target_overlap: float = TARGET_OVERLAP) -> list[int]:
    """Fragment starts along one side of `length` px (fragment_fn's arithmetic, per axis, border shifted)."""
    assert length >= size > 0, (length, size)
    if length == size:  # fragment_fn's "scenario 2": the image is one fragment
        return [0]
    steps = max(1, int(np.round((length - size) / (size - target_overlap * size))))
    overlap = int(math.ceil(size - (length - size) / steps))
    offsets = [step * (size - overlap) for step in range(steps + 1)]
    offsets[-1] = length - size  # border_shift: the last fragment ends on the border
    return offsets


def fragment_windows(height: int, width: int, size: int) -> np.ndarray:
    """(n, 2) int64 upper-left (row, col) of each fragment, row-major.

    The original's border shift only runs on grids that fit exactly (224 and 384 px on 1068, its
    published models): for any other it fails (grid_cell_fragment.py `fragment_fn` passes an unpermuted
    slice to `fragment_unfold`), and would cut its bottom-right fragment at column n x stride while
    labelling it width - size (`full[-1] = bottomleft`). Here every fragment is cut where its window says.
    """
    rows, cols = axis_offsets(height, size), axis_offsets(width, size)
    return np.array([(row, col) for row in rows for col in cols], dtype=np.int64).reshape(-1, 2)


def centre_window(height: int, width: int, size: int | None) -> tuple[np.ndarray, int]:
    """The one window of a per-tile embedding: the whole tile for a model of any input size (`size` None),
    else the model's `size` px centred in the tile (inputs.py's centre crop). Returns (windows, side)."""
    if size is None or (height, width) == (size, size):
        assert height == width, "a model of any input size still gets a square tile"
        return np.zeros((1, 2), dtype=np.int64), height
    return np.array([[(height - size) // 2, (width - size) // 2]], dtype=np.int64), size
