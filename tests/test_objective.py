"""Tests of training/objective.py: the two augmented views and the multi-task pretraining loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.objective import (
    TERM_NAMES,
    LossWeights,
    boxes_to_mask,
    foundation_loss,
    make_views,
    sample_erase_boxes,
    similarity_loss,
)

B, C, H, W, L = 16, 10, 32, 48, 8


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flip_index(x: torch.Tensor, target: torch.Tensor) -> list[int]:
    """For each sample, which of the 4 flips of x equals target exactly (0 none, 1 V, 2 H, 3 VH); -1 if none."""
    cands = [x, x.flip(-2), x.flip(-1), x.flip(-2).flip(-1)]
    found = []
    for b in range(x.shape[0]):
        hits = [k for k, c in enumerate(cands) if torch.equal(c[b], target[b])]
        found.append(hits[0] if hits else -1)
    return found


# ---------------------------------------------------------------------------------------------- views


def test_views_shapes_dtype_and_targets_are_flips():
    x = torch.rand(B, C, H, W)
    va, vb, ta, tb = make_views(x, _gen())
    for t in (va, vb, ta, tb):
        assert t.shape == x.shape and t.dtype == x.dtype
    assert -1 not in _flip_index(x, ta) and -1 not in _flip_index(x, tb)


def test_flips_are_per_sample():
    # The original took one flip decision per batch (train_model_ddp.py:332-339): a batch of 64 must show several
    # flip patterns.
    x = torch.rand(64, 2, 8, 8)
    _, _, ta, tb = make_views(x, _gen(1))
    assert len(set(_flip_index(x, ta))) >= 3 and len(set(_flip_index(x, tb))) >= 3


def _erased_mask(view: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixels where any channel differs (N(0,1) noise equal to the original value has probability 0)."""
    return (view != target).any(dim=1)


def test_erasing_one_rectangle_per_sample_in_area_range():
    x = torch.rand(B, C, H, W)
    va, vb, ta, tb = make_views(x, _gen(2))
    boxes = []
    for view, target in ((va, ta), (vb, tb)):
        mask = _erased_mask(view, target)
        for b in range(B):
            rows, cols = mask[b].nonzero(as_tuple=True)
            i0, i1, j0, j1 = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
            assert mask[b, i0:i1 + 1, j0:j1 + 1].all()  # a full rectangle, nothing outside it
            area = mask[b].sum().item()
            assert 0.25 * H * W <= area <= 0.5 * H * W
            boxes.append((i0, i1, j0, j1))
    # Per-sample rectangles: the original's single batch rectangle would make them all equal.
    assert len(set(boxes)) > len(boxes) // 2


def test_non_erased_pixels_equal_target_and_noise_is_gaussian():
    x = torch.rand(64, C, H, W)
    va, _, ta, _ = make_views(x, _gen(3))
    mask = _erased_mask(va, ta)[:, None].expand_as(va)
    assert torch.equal(va[~mask], ta[~mask])
    noise = va[mask]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1.0) < 0.05


def test_sampled_boxes_area_bounds_over_many_draws():
    for hgt, wid in ((128, 128), (64, 128), (16, 16)):
        boxes = sample_erase_boxes(4096, hgt, wid, _gen(4))
        i, j, h, w = boxes.unbind(1)
        assert (i >= 0).all() and (j >= 0).all() and (i + h <= hgt).all() and (j + w <= wid).all()
        frac = (h * w).double() / (hgt * wid)
        assert (frac >= 0.25).all() and (frac <= 0.5).all()
        if hgt == wid == 128:  # the crop size: aspect ratios span (0.3, 3.3) up to rounding/rejection
            ratio = h.double() / w.double()
            assert ratio.min() < 0.45 and ratio.max() > 2.2
        mask = boxes_to_mask(boxes[:8], hgt, wid)
        assert torch.equal(mask.sum(dim=(1, 2, 3)), (h * w)[:8])


def test_generator_determinism():
    x = torch.rand(B, C, H, W)
    first = make_views(x, _gen(5))
    second = make_views(x, _gen(5))
    other = make_views(x, _gen(6))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])


def test_views_keep_bf16_dtype():
    x = torch.rand(4, C, H, W, dtype=torch.bfloat16)
    va, _, ta, _ = make_views(x, _gen(7))
    assert va.dtype == torch.bfloat16 and ta.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------- loss


def _labels(batch: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {
        "coords": torch.rand(batch, 4, generator=g),
        "coords_weight": torch.ones(batch),
        "clouds": torch.softmax(torch.randn(batch, 4, generator=g), dim=1),
        "clouds_weight": torch.ones(batch),
        "buildings": torch.rand(batch, 1, generator=g),
        "buildings_weight": torch.ones(batch),
        "landcover": torch.softmax(torch.randn(batch, 11, generator=g), dim=1),
        "landcover_weight": torch.rand(batch, generator=g),
    }


def _output(batch: int = B, seed: int = 1, requires_grad: bool = False) -> tuple:
    g = _gen(seed)
    parts = [
        torch.rand(batch, C, H, W, generator=g), torch.randn(batch, L, generator=g),
        torch.randn(batch, 4, 2, 2, generator=g), torch.randn(batch, 4, H, W, generator=g),
        torch.rand(batch, 4, generator=g), torch.randn(batch, 4, generator=g),
        torch.rand(batch, 1, generator=g), torch.randn(batch, 11, generator=g),
    ]
    parts = [p.requires_grad_(requires_grad) for p in parts]
    return (*parts[:4], tuple(parts[4:]))


def _perfect_output(target: torch.Tensor, labels: dict, emb: torch.Tensor) -> tuple:
    """Predictions equal to the labels: CE logits = log of the fractions (softmax gives them back)."""
    heads = (labels["coords"], labels["clouds"].clamp_min(1e-12).log(), labels["buildings"],
             labels["landcover"].clamp_min(1e-12).log())
    return (target, emb, torch.zeros(1), torch.zeros(1), heads)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim=1)


def test_perfect_predictions_give_zero_supervised_terms():
    labels = _labels()
    ta, tb = torch.rand(B, C, H, W), torch.rand(B, C, H, W)
    emb = torch.randn(B, L)
    _, log = foundation_loss(_perfect_output(ta, labels, emb), _perfect_output(tb, labels, emb), ta, tb, labels)
    assert set(log) == {"loss", *TERM_NAMES}
    for k in ("recon", "coords", "buildings"):
        assert log[k] == pytest.approx(0.0, abs=1e-7)
    # Soft CE bottoms out at the label entropy (= KL 0); with one-hot labels that is exactly 0.
    w = labels["landcover_weight"]
    assert log["clouds"] == pytest.approx(_entropy(labels["clouds"]).mean().item(), rel=1e-5)
    assert log["landcover"] == pytest.approx(((_entropy(labels["landcover"]) * w).sum() / w.sum()).item(), rel=1e-5)
    onehot = {**labels, "clouds": F.one_hot(torch.arange(B) % 4, 4).float(),
              "landcover": F.one_hot(torch.arange(B) % 11, 11).float()}
    out = _perfect_output(ta, onehot, emb)
    _, log = foundation_loss(out, out, ta, ta, onehot)
    assert log["clouds"] < 1e-6 and log["landcover"] < 1e-6


def test_terms_match_reference_formulas_and_weights():
    labels = {**_labels(), "landcover_weight": torch.ones(B)}
    out_a, out_b = _output(seed=1), _output(seed=2)
    ta, tb = torch.rand(B, C, H, W), torch.rand(B, C, H, W)
    total, log = foundation_loss(out_a, out_b, ta, tb, labels)
    # With all-one weights the terms equal the original's (losses.py:17-29, 45-67).
    (ra, ea, _, _, pa), (rb, eb, _, _, pb) = out_a, out_b
    ref = {
        "recon": (F.mse_loss(ra, ta) + F.mse_loss(rb, tb)) / 2,
        "coords": (F.mse_loss(pa[0], labels["coords"]) + F.mse_loss(pb[0], labels["coords"])) / 2,
        "clouds": (F.cross_entropy(pa[1], labels["clouds"]) + F.cross_entropy(pb[1], labels["clouds"])) / 2,
        "buildings": (F.mse_loss(pa[2], labels["buildings"]) + F.mse_loss(pb[2], labels["buildings"])) / 2,
        "landcover": (F.cross_entropy(pa[3], labels["landcover"]) + F.cross_entropy(pb[3], labels["landcover"])) / 2,
        "similarity": similarity_loss(ea, eb),
    }
    for k, v in ref.items():
        assert log[k] == pytest.approx(v.item(), rel=1e-5), k
    # Logged terms are unweighted; the total applies the 100x factors of clouds and buildings.
    expected = sum(ref[k] for k in ref) + 99 * (ref["clouds"] + ref["buildings"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-5) and log["loss"] == pytest.approx(total.item())
    w = LossWeights(recon=2.0, coords=0.0, clouds=1.0, buildings=3.0, landcover=0.5, similarity=0.0)
    total_w, _ = foundation_loss(out_a, out_b, ta, tb, labels, w)
    expected_w = 2 * ref["recon"] + ref["clouds"] + 3 * ref["buildings"] + 0.5 * ref["landcover"]
    assert total_w.item() == pytest.approx(expected_w.item(), rel=1e-5)


def test_zero_weight_sample_has_no_influence():
    labels = _labels()
    for key in ("coords", "clouds", "buildings", "landcover"):
        labels[f"{key}_weight"][3] = 0.0
    out_a, out_b = _output(seed=1), _output(seed=2)
    ta = tb = torch.rand(B, C, H, W)
    _, log = foundation_loss(out_a, out_b, ta, tb, labels)
    changed = dict(labels)
    changed["coords"] = labels["coords"].clone()
    changed["coords"][3] = 1 - changed["coords"][3]
    changed["buildings"] = labels["buildings"].clone()
    changed["buildings"][3] = 1 - changed["buildings"][3]
    for key, n in (("clouds", 4), ("landcover", 11)):
        changed[key] = labels[key].clone()
        changed[key][3] = F.one_hot(torch.tensor(n - 1), n).float()
    _, log2 = foundation_loss(out_a, out_b, ta, tb, changed)
    assert log == pytest.approx(log2, rel=1e-6)


def test_all_zero_weights_give_finite_zero_terms_and_gradients():
    labels = _labels()
    for key in ("coords", "clouds", "buildings", "landcover"):
        labels[f"{key}_weight"] = torch.zeros(B)
    out_a, out_b = _output(seed=1, requires_grad=True), _output(seed=2, requires_grad=True)
    total, log = foundation_loss(out_a, out_b, torch.rand(B, C, H, W), torch.rand(B, C, H, W), labels)
    assert all(math.isfinite(v) for v in log.values())
    assert log["coords"] == log["clouds"] == log["buildings"] == log["landcover"] == 0.0
    total.backward()
    assert all(torch.isfinite(h.grad).all() for h in out_a[4])


def test_gradient_flows_to_every_used_output():
    out_a, out_b = _output(seed=1, requires_grad=True), _output(seed=2, requires_grad=True)
    total, _ = foundation_loss(out_a, out_b, torch.rand(B, C, H, W), torch.rand(B, C, H, W), _labels())
    assert total.requires_grad and total.dim() == 0
    total.backward()
    for out in (out_a, out_b):
        for t in (out[0], out[1], *out[4]):
            assert t.grad is not None and t.grad.abs().sum() > 0 and torch.isfinite(t.grad).all()


def test_similarity_negative_term_is_not_zero():
    # Bug 2: cosine_embedding_loss with target 0 is identically 0. Identical embeddings zero the positive and
    # distance terms, so what remains is the (1 - alpha) * mean(max(0, cos(negatives))) term.
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5]])
    loss = similarity_loss(emb, emb.clone())
    rolled = torch.roll(emb, 1, 0)
    expected = 0.5 * F.cosine_embedding_loss(rolled, emb, -torch.ones(4))
    assert loss.item() > 0.1 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Anti-aligned negatives cost nothing (margin 0); a batch of one has no negative pair.
    assert similarity_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == 0
    assert similarity_loss(emb[:1], emb[:1]).item() == 0.0


def test_similarity_identical_views_have_finite_gradient():
    emb = torch.randn(5, L, requires_grad=True)
    similarity_loss(emb, emb).backward()
    assert torch.isfinite(emb.grad).all()


def test_bf16_inputs_under_autocast_give_float32_loss():
    out_a = tuple(t.bfloat16() if isinstance(t, torch.Tensor) else tuple(h.bfloat16() for h in t)
                  for t in _output(seed=1))
    out_b = tuple(t.bfloat16() if isinstance(t, torch.Tensor) else tuple(h.bfloat16() for h in t)
                  for t in _output(seed=2))
    target = torch.rand(B, C, H, W).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        total, log = foundation_loss(out_a, out_b, target, target, _labels())
    assert total.dtype == torch.float32 and math.isfinite(log["loss"])


def test_loss_weights_validation_and_missing_labels():
    assert LossWeights().clouds == 100.0 and LossWeights().buildings == 100.0
    with pytest.raises(ValueError):
        LossWeights(recon=-1.0)
    with pytest.raises(ValueError):
        LossWeights(coords=float("nan"))
    labels = _labels()
    del labels["clouds_weight"]
    with pytest.raises(KeyError):
        foundation_loss(_output(), _output(), torch.rand(B, C, H, W), torch.rand(B, C, H, W), labels)
