"""Compute ledger: closed-form totals, MFU, GPU-hours, A100 normalisation and resume."""

from __future__ import annotations

import pytest

from lens_model.train.ledger import (
    LENS_A100_GPU_HOURS,
    ComputeLedger,
    peak_tflops_for,
    zimage_fraction,
)


def test_zimage_fraction_reproduces_paper() -> None:
    assert round(zimage_fraction(LENS_A100_GPU_HOURS), 3) == 0.193
    assert zimage_fraction(192_000) == pytest.approx((192 * 312) / (314 * 989.5))
    assert zimage_fraction(0.0) == 0.0


def test_peak_table() -> None:
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("h800") == 989.0
    assert peak_tflops_for("cpu") is None
    assert peak_tflops_for("NVIDIA L4") is None


def test_h100_closed_form() -> None:
    led = ComputeLedger("NVIDIA H100 80GB HBM3", n_devices=8)
    # two steps of 2 s each on 8 GPUs; 8 x 989e12 x 2 s of capacity per step
    step = led.step(flops=8 * 989e12 * 2 * 0.4, tokens=40_000, images=20, seconds=2.0)
    assert step["compute/step_mfu"] == pytest.approx(0.4)
    assert step["throughput/step_tokens_per_s"] == pytest.approx(20_000)
    led.step(flops=8 * 989e12 * 2 * 0.2, tokens=60_000, images=30, seconds=2.0)
    m = led.metrics()
    assert m["compute/steps"] == 2
    assert m["compute/flops_total"] == pytest.approx(8 * 989e12 * 2 * 0.6)
    assert m["compute/flops_per_s"] == pytest.approx(8 * 989e12 * 0.3)
    assert m["compute/mfu"] == pytest.approx(0.3)
    assert m["throughput/tokens_per_s"] == pytest.approx(25_000)
    assert m["throughput/images_per_s"] == pytest.approx(12.5)
    assert m["compute/gpu_hours"] == pytest.approx(4.0 * 8 / 3600)
    a100 = 4.0 * 8 / 3600 * 989 / 312
    assert m["compute/a100_equiv_gpu_hours"] == pytest.approx(a100)
    assert m["compute/zimage_fraction"] == pytest.approx(a100 * 312 / (314_000 * 989.5))
    assert led.mfu == pytest.approx(0.3)


def test_a100_run_of_paper_length_gives_paper_fraction() -> None:
    led = ComputeLedger("A100", n_devices=128)
    led.step(flops=1e21, tokens=1, images=1, seconds=192_000 * 3600 / 128)  # 192K GPU-hours
    m = led.metrics()
    assert m["compute/gpu_hours"] == pytest.approx(192_000)
    assert m["compute/a100_equiv_gpu_hours"] == pytest.approx(192_000)
    assert round(m["compute/zimage_fraction"], 3) == 0.193


def test_cpu_has_no_mfu_unless_peak_given() -> None:
    led = ComputeLedger("cpu", n_devices=1)
    step = led.step(flops=1e9, tokens=64, images=1, seconds=0.5)
    assert "compute/step_mfu" not in step
    m = led.metrics()
    assert led.mfu is None
    assert "compute/mfu" not in m and "compute/a100_equiv_gpu_hours" not in m
    assert m["compute/flops_per_s"] == pytest.approx(2e9)
    assert m["compute/gpu_hours"] == pytest.approx(0.5 / 3600)
    given = ComputeLedger("cpu", n_devices=2, peak_tflops=0.5)
    given.step(flops=1e11, tokens=64, images=1, seconds=0.5)
    assert given.mfu == pytest.approx(1e11 / (0.5 * 2 * 0.5e12))
    assert given.metrics()["compute/a100_equiv_gpu_hours"] == pytest.approx(1.0 / 3600 * 0.5 / 312)


def test_resume_keeps_history_across_hardware() -> None:
    a = ComputeLedger("A100", n_devices=4)
    a.step(flops=4 * 312e12 * 10 * 0.5, tokens=100, images=10, seconds=10.0)
    state = a.state_dict()
    # resumed on 2 H100s: earlier A100 time keeps its own peak and count
    b = ComputeLedger("H100", n_devices=2)
    b.load_state_dict(state)
    assert b.metrics() == a.metrics()
    b.step(flops=2 * 989e12 * 10 * 0.25, tokens=300, images=30, seconds=10.0)
    m = b.metrics()
    assert m["compute/gpu_hours"] == pytest.approx((40 + 20) / 3600)
    assert m["compute/a100_equiv_gpu_hours"] == pytest.approx((40 + 20 * 989 / 312) / 3600)
    capacity = 40 * 312e12 + 20 * 989e12
    assert m["compute/mfu"] == pytest.approx((4 * 312e12 * 5 + 2 * 989e12 * 2.5) / capacity)
    assert m["throughput/tokens_per_s"] == pytest.approx(400 / 20)
    # time on a device with no known peak makes the A100-normalised numbers unknown
    c = ComputeLedger("cpu", n_devices=1)
    c.load_state_dict(b.state_dict())
    c.step(flops=1.0, tokens=1, images=1, seconds=1.0)
    assert "compute/mfu" not in c.metrics() and c.metrics()["compute/steps"] == 3


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"n_devices"):
        ComputeLedger("H100", n_devices=0)
    with pytest.raises(ValueError, match=r"peak_tflops"):
        ComputeLedger("cpu", 1, peak_tflops=-1.0)
    led = ComputeLedger("H100", 1)
    with pytest.raises(ValueError, match=r"seconds must be > 0"):
        led.step(1.0, 1, 1, 0.0)
    with pytest.raises(ValueError, match=r"flops must be >= 0"):
        led.step(-1.0, 1, 1, 1.0)
    with pytest.raises(ValueError, match=r"not a ComputeLedger.state_dict"):
        led.load_state_dict({"totals": {"steps": 1}})
    assert led.metrics()["compute/steps"] == 0  # the failed calls recorded nothing
