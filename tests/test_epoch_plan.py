"""The epoch plan and its resume position, from sample counts alone: every crop dealt once, drops under one
global batch, and the crops left after any interruption computed exactly (training/data/epoch.py, position.py)."""

import pickle

import numpy as np
import pytest

from training.data.batches import redeal
from training.data.deal import Deal, Layout
from training.data.epoch import EpochPosition, PlanError, plan_epoch
from training.data.shards import ShardInfo

SHAPES = [  # (tiles per shard, world, workers, batch, K, grad_accum)
    ([4, 4, 3], 2, 1, 2, 3, 1),  # 11 tiles in 3 shards
    ([1, 2, 3, 4, 5, 6, 7], 3, 2, 2, 3, 1),
    ([1, 2, 3, 4, 5, 6, 7], 2, 3, 3, 2, 2),
    ([97, 5, 1, 40], 5, 4, 4, 16, 1),  # fewer shards than workers
    ([13] * 9, 4, 0, 5, 7, 3),
]


def every_crop(plan) -> list[np.ndarray]:
    return [plan.crop_ids(rank, worker) for rank in range(plan.layout.world_size)
            for worker in range(plan.layout.streams)]


def test_eleven_tiles_two_ranks_drop_one_crop_and_repeat_none():
    shards = [ShardInfo(f"s{i}", n) for i, n in enumerate([4, 4, 3])]
    plan = plan_epoch(shards, 2, 1, batch_size=2, crops_per_tile=3, seed=0, epoch=0)
    assert (plan.steps, plan.dropped, plan.repeated) == (8, 1, 0)
    dealt = np.sort(np.concatenate(every_crop(plan)))
    assert dealt.tolist() == list(range(32))  # crop 33 of the epoch (its last) is the one dropped


@pytest.mark.parametrize("sizes, world, workers, batch, crops, accum", SHAPES)
def test_every_crop_is_dealt_once_and_drops_are_under_one_global_batch(sizes, world, workers, batch, crops, accum):
    shards = [ShardInfo(f"s{i}", n) for i, n in enumerate(sizes)]
    plan = plan_epoch(shards, world, workers, batch, crops, seed=4, epoch=1, grad_accum=accum)
    parts = every_crop(plan)
    assert [len(p) for p in parts] == [plan.quota(r, w) for r in range(world) for w in range(max(workers, 1))]
    for rank in range(world):
        assert sum(plan.quota(rank, w) for w in range(max(workers, 1))) == plan.steps * batch
    dealt = np.concatenate(parts)
    assert len(np.unique(dealt)) == len(dealt) == plan.steps * world * batch  # nothing twice
    assert plan.dropped + len(dealt) == sum(sizes) * crops
    assert 0 <= plan.dropped < world * batch * accum and plan.repeated == 0
    assert plan.steps % accum == 0


def test_plans_are_seeded_and_too_little_data_is_a_clear_error():
    shards = [ShardInfo(f"s{i}", n) for i, n in enumerate([1, 2, 3, 4, 5, 6, 7])]
    one = plan_epoch(shards, 3, 1, 2, 3, seed=1, epoch=0)
    assert one.order.tolist() == plan_epoch(shards, 3, 1, 2, 3, seed=1, epoch=0).order.tolist()
    assert one.order.tolist() != plan_epoch(shards, 3, 1, 2, 3, seed=1, epoch=1).order.tolist()
    with pytest.raises(PlanError, match="84 crops in an epoch: less than 1 batch"):
        plan_epoch(shards, 512, 8, 16, 3, seed=1, epoch=0)


@pytest.mark.parametrize("count, steps", [(3, 12), (3, 10), (4, 9), (1, 5)])
def test_trained_prefix_matches_what_redeal_hands_out(count, steps):
    """Deal.trained: after n mixed batches, worker b gave the first L_b crops of its output."""
    size = 3
    layout = Layout(1, count, size)
    deal = Deal(layout, steps * size)
    loader = [{"keys": [(i % count, i // count * size + j) for j in range(size)]} for i in range(steps)]
    mixed = [b for g in range(0, steps, count) for b in redeal(loader[g : g + count])]
    for n in range(steps + 1):
        given = [sorted(k[1] for b in mixed[:n] for k in b["keys"] if k[0] == w) for w in range(count)]
        assert [list(range(length)) for length in deal.trained(n)] == given, n


def resume_sequence(shards, layouts, stops, seed=2, crops=3):
    """Train `stops[i]` micro-batches on `layouts[i]` (replaying every worker's real stages on ids), then plan
    the next; returns (ids trained per segment, final plan)."""
    trained, history = [], ()
    for layout, stop in zip(layouts, stops):
        plan = plan_epoch(shards, layout.world_size, layout.num_workers, layout.batch_size, crops, seed, 0,
                          layout.grad_accum, history, layout.shuffle_buffer, layout.shards_in_parallel)
        counts = plan.deal.trained(stop)
        for unit, count in enumerate(counts.tolist()):
            rank, worker = divmod(unit, layout.streams)
            ids = plan.crop_ids(rank, worker)
            trained.append(plan.remaining.replay(len(history), plan.deal, unit, ids, count))
        history = plan.position_after(stop).segments
    last = layouts[-1]
    plan = plan_epoch(shards, last.world_size, last.num_workers, last.batch_size, crops, seed, 0, last.grad_accum,
                      history, last.shuffle_buffer, last.shards_in_parallel)
    return trained, plan


@pytest.mark.parametrize("layouts, stops", [
    ([Layout(2, 2, 2, 1, 5, 2), Layout(2, 2, 2, 1, 5, 2)], [5]),  # same layout, mid-group
    ([Layout(2, 2, 2, 1, 5, 2), Layout(3, 1, 3, 1, 4, 3)], [6]),  # other world, workers, batch
    ([Layout(3, 3, 2, 2, 7, 1), Layout(1, 2, 4, 1, 3, 2), Layout(2, 0, 1, 1, 9, 4)], [4, 7]),  # killed twice
])
def test_a_resumed_epoch_trains_every_remaining_crop_exactly_once(layouts, stops):
    shards = [ShardInfo(f"s{i}", n) for i, n in enumerate([1, 2, 3, 4, 5, 6, 7, 9])]
    trained, plan = resume_sequence(shards, layouts, stops)
    rest = every_crop(plan)
    everything = np.concatenate(trained + rest)
    assert len(np.unique(everything)) == len(everything)  # no crop twice, across all segments
    assert len(everything) + plan.dropped == sum(s.samples for s in shards) * 3
    assert plan.dropped < plan.layout.global_batch
    position = plan.position_after(0)
    assert EpochPosition.from_dict(position.to_dict()) == position and len(str(position.to_dict())) < 1000
    copy = pickle.loads(pickle.dumps(plan))  # what a spawned DataLoader worker gets, replay cache included
    assert all(np.array_equal(a, b) for a, b in zip(every_crop(copy), rest, strict=True))
