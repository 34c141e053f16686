"""The shared-memory batch ring: bit-exact across fork, no slot reused before release, same batches as without."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from training.data.ring import BatchRing, SlotArray, shared_empty


def _fill(ring: BatchRing, worker: int, batches: int, results) -> None:
    """In a forked child: put `batches` batches, reporting the descriptors (None once the ring stays full)."""
    for index in range(batches):
        rows = [np.full((2, 3, 4), 10 * index + row, dtype=np.uint16) for row in range(5)]
        results.put(ring.put(worker, {"s2_10m": rows, "s2_20m": [r[:, :2, :2] for r in rows]}))


def _forked_puts(ring: BatchRing, worker: int, batches: int) -> list:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_fill, args=(ring, worker, batches, results))
    child.start()
    placed = [results.get(timeout=30) for _ in range(batches)]
    child.join(timeout=30)
    assert child.exitcode == 0
    return placed


def test_ring_carries_arrays_from_a_forked_worker_bit_exact():
    ring = BatchRing(num_workers=2, slots=3, slot_bytes=4096)
    placed = _forked_puts(ring, worker=1, batches=2)
    for index, arrays in enumerate(placed):
        assert set(arrays) == {"s2_10m", "s2_20m"} and all(isinstance(a, SlotArray) for a in arrays.values())
        bands = ring.views(arrays)["s2_10m"]
        assert bands.shape == (5, 2, 3, 4) and bands.dtype == np.uint16
        assert [int(bands[row].min()) for row in range(5)] == [10 * index + row for row in range(5)]
        assert (ring.views(arrays)["s2_20m"] == bands[:, :, :2, :2]).all()
        assert arrays["s2_20m"].offset % 64 == 0  # each array starts on a cache line
    assert placed[0]["s2_10m"].offset != placed[1]["s2_10m"].offset
    assert placed[0]["s2_10m"].offset >= 3 * 4096  # worker 1's slots follow worker 0's


def test_full_ring_makes_the_worker_fall_back_instead_of_overwriting():
    ring = BatchRing(num_workers=1, slots=2, slot_bytes=4096, wait_s=0.2)
    first = _forked_puts(ring, worker=0, batches=3)
    assert first[0] is not None and first[1] is not None and first[2] is None  # 2 slots, none released
    for index in range(2):  # batch 2 did not wrap around onto batch 0's slot
        assert int(ring.views(first[index])["s2_10m"][0].min()) == 10 * index
    ring.release(first[0])
    again = _forked_puts(ring, worker=0, batches=2)  # a fresh worker starts at slot 0 again
    assert again[0]["s2_10m"].offset == first[0]["s2_10m"].offset and again[1] is None  # slot 1 is still held


def test_batch_too_large_or_empty_is_not_placed():
    ring = BatchRing(num_workers=1, slots=1, slot_bytes=64)
    assert ring.put(0, {"s2_10m": [np.zeros(64, np.uint16)]}) is None
    assert ring.put(0, {}) is None
    assert ring.free[0].acquire(timeout=0)  # the slot was not taken


def test_shared_empty_is_shared_and_writable():
    tensor = shared_empty((3, 5), np.dtype(np.uint16))
    assert tensor.is_shared() and tensor.dtype == torch.uint16 and tensor.shape == (3, 5)
    tensor.numpy()[:] = 7
    assert int(tensor.sum()) == 105


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_batches_are_the_same_with_and_without_the_ring(built, workers):
    from training.data.batches import WorkerMixedBatches
    from training.data.epoch import plan_epoch
    from training.data.loader import StreamOptions, make_loader
    from training.data.shards import resolve_shards

    shards = resolve_shards(str(built))
    options = StreamOptions(crops_per_tile=3, crop_size=64, batch_size=2, shuffle_buffer=7)
    plan = plan_epoch(shards, 1, workers, options.batch_size, options.crops_per_tile, 0, 0)
    with_ring = make_loader(plan, 0, options, workers)
    assert isinstance(with_ring, WorkerMixedBatches)
    ringed = list(with_ring)
    plain = list(WorkerMixedBatches(with_ring.loader, workers))  # no collate stage: fresh shared tensors
    assert with_ring.ring_batches == len(ringed) == len(plain) == plan.steps
    for a, b in zip(ringed, plain):
        assert a["keys"] == b["keys"]
        for name in ("s2_10m", "s2_20m", "coords", "clouds"):
            assert torch.equal(a[name], b[name]), name


def test_loader_goes_without_the_ring_when_it_cannot_be_mapped(built, monkeypatch):
    import training.data.ring
    from training.data.epoch import plan_epoch
    from training.data.loader import StreamOptions, make_loader
    from training.data.shards import resolve_shards

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(training.data.ring.mmap, "mmap", refuse)  # as a kernel refusing a huge shared mapping
    options = StreamOptions(crops_per_tile=3, crop_size=64, batch_size=2, shuffle_buffer=7)
    plan = plan_epoch(resolve_shards(str(built)), 1, 2, options.batch_size, options.crops_per_tile, 0, 0)
    loader = make_loader(plan, 0, options, 2)
    assert len(list(loader)) == plan.steps and loader.ring_batches == 0
