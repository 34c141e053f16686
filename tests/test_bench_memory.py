"""tools/bench_memory.py: the fake-tensor peak equals the real-tensor peak, and AC lowers the activations."""

from __future__ import annotations

import pytest

from tools.bench_memory import tensor_peak

MODEL = "geoaware-unet-tiny"  # 2.1M params: a real CPU step takes seconds


@pytest.fixture(scope="module")
def fake_off() -> dict:
    return tensor_peak(MODEL, batch=2, ac=False, fake=True, device="cpu", steps=1)


def test_fake_peak_equals_real_peak(fake_off: dict) -> None:
    real = tensor_peak(MODEL, batch=2, ac=False, fake=False, device="cpu", steps=1)
    assert real["params"] == fake_off["params"] == 2_143_954
    assert real["peak_mb"] > 50  # the input alone is 2.5 MB, activations dominate
    assert fake_off["peak_mb"] == pytest.approx(real["peak_mb"], abs=0.05)
    for part in ("param", "grad", "opt", "act", "temp", "other"):
        assert fake_off["parts"].get(part, 0.0) == pytest.approx(real["parts"].get(part, 0.0), abs=0.05), part


def test_activation_checkpointing_lowers_activation_peak(fake_off: dict) -> None:
    fake_on = tensor_peak(MODEL, batch=2, ac=True, fake=True, device="cpu", steps=1)
    assert fake_on["params"] == fake_off["params"]
    assert fake_on["parts"]["param"] == pytest.approx(fake_off["parts"]["param"])
    assert fake_on["parts"]["act"] < 0.8 * fake_off["parts"]["act"]
    assert fake_on["peak_mb"] < fake_off["peak_mb"]
