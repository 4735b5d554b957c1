"""The compute ledger: FLOPs, MFU, GPU-hours and the paper's compute comparison, per run.

Each step reports the analytic FLOPs of the whole (global) step, computed elsewhere from the
model config and real token counts, with its tokens, images and wall seconds; all ranks
together. The ledger keeps totals in device-independent units (device-seconds, peak-FLOP
capacity, A100-equivalent seconds) so a run resumed on other hardware keeps its history.

Normalisation follows the Lens paper's compute accounting (arXiv 2605.21573): GPU-hours are
scaled by peak dense bf16 rate to A100-equivalents, gpu_hours * peak(device) / peak(A100). The
peak table uses 989 TFLOP/s for H100/H800, while the paper's Z-Image ratio,
(192 x 312) / (314 x 989.5) = 0.193, uses 989.5; both are kept as the paper has them, so
``zimage_fraction`` reproduces the paper's 0.193 exactly.
"""

from __future__ import annotations

from typing import Any

# Peak dense bf16 tensor-core rate, TFLOP/s. H200 has H100's compute (more, faster memory).
PEAK_TFLOPS: dict[str, float] = {"a100": 312.0, "h100": 989.0, "h800": 989.0, "h200": 989.0}
A100_TFLOPS = PEAK_TFLOPS["a100"]
LENS_A100_GPU_HOURS = 192_000.0
ZIMAGE_H800_GPU_HOURS = 314_000.0
ZIMAGE_H800_TFLOPS = 989.5  # the paper's value in its ratio (the table above says 989)


def peak_tflops_for(device: str) -> float | None:
    """Peak bf16 TFLOP/s of a device name (e.g. "NVIDIA H100 80GB HBM3"), None if unknown."""
    name = device.lower()
    hits = [peak for key, peak in PEAK_TFLOPS.items() if key in name]
    return hits[0] if len(hits) == 1 else None


def zimage_fraction(a100_equiv_gpu_hours: float) -> float:
    """Share of Z-Image's compute (314K H800 GPU-hours), both at peak bf16 rate."""
    return a100_equiv_gpu_hours * A100_TFLOPS / (ZIMAGE_H800_GPU_HOURS * ZIMAGE_H800_TFLOPS)


class ComputeLedger:
    """Accumulates per-step compute and reports rates, MFU and GPU-hours as flat metrics."""

    _TOTALS = ("steps", "flops", "tokens", "images", "seconds", "device_seconds",
               "peak_flop_capacity", "flops_at_known_peak", "a100_equiv_seconds",
               "device_seconds_unknown_peak")

    def __init__(self, device: str, n_devices: int, peak_tflops: float | None = None) -> None:
        if n_devices < 1:
            raise ValueError(f"n_devices must be >= 1, got {n_devices}")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 or None (device {device!r}), "
                             f"got {peak_tflops}")
        self.device, self.n_devices = device, n_devices
        self.peak_tflops = peak_tflops if peak_tflops is not None else peak_tflops_for(device)
        self.totals: dict[str, float] = dict.fromkeys(self._TOTALS, 0.0)

    def step(self, flops: float, tokens: int, images: int, seconds: float) -> dict[str, float]:
        """Record one global step; returns that step's own rates (MFU when the peak is known)."""
        for name, value in (("flops", flops), ("tokens", tokens), ("images", images)):
            if value < 0:
                raise ValueError(f"step {name} must be >= 0, got {value}")
        if seconds <= 0:
            raise ValueError(f"step seconds must be > 0, got {seconds}; time the step with "
                             f"time.perf_counter() around it")
        dev_s = seconds * self.n_devices
        t = self.totals
        t["steps"] += 1
        t["flops"] += flops
        t["tokens"] += tokens
        t["images"] += images
        t["seconds"] += seconds
        t["device_seconds"] += dev_s
        out = {"compute/step_flops_per_s": flops / seconds,
               "throughput/step_tokens_per_s": tokens / seconds,
               "throughput/step_images_per_s": images / seconds}
        if self.peak_tflops is None:
            t["device_seconds_unknown_peak"] += dev_s
        else:
            capacity = dev_s * self.peak_tflops * 1e12
            t["peak_flop_capacity"] += capacity
            t["flops_at_known_peak"] += flops
            t["a100_equiv_seconds"] += dev_s * self.peak_tflops / A100_TFLOPS
            out["compute/step_mfu"] = flops / capacity
        return out

    def metrics(self) -> dict[str, float]:
        """Totals and rates so far. MFU, A100-equivalent hours and the Z-Image fraction are
        left out while any recorded step ran on a device with no known peak."""
        t = self.totals
        gpu_hours = t["device_seconds"] / 3600
        out = {"compute/steps": t["steps"],
               "compute/flops_total": t["flops"],
               "compute/tokens_total": t["tokens"],
               "compute/images_total": t["images"],
               "compute/wall_s": t["seconds"],
               "compute/gpu_hours": gpu_hours}
        if t["seconds"] > 0:
            out["compute/flops_per_s"] = t["flops"] / t["seconds"]
            out["throughput/tokens_per_s"] = t["tokens"] / t["seconds"]
            out["throughput/images_per_s"] = t["images"] / t["seconds"]
        if t["device_seconds_unknown_peak"] == 0 and t["steps"] > 0:
            a100_hours = t["a100_equiv_seconds"] / 3600
            out["compute/mfu"] = t["flops_at_known_peak"] / t["peak_flop_capacity"]
            out["compute/a100_equiv_gpu_hours"] = a100_hours
            out["compute/zimage_fraction"] = zimage_fraction(a100_hours)
        return out

    @property
    def mfu(self) -> float | None:
        """MFU over the run so far; None on a device with no known peak."""
        return self.metrics().get("compute/mfu")

    def state_dict(self) -> dict[str, Any]:
        return {"device": self.device, "n_devices": self.n_devices,
                "peak_tflops": self.peak_tflops, "totals": dict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the totals; this ledger's own device, count and peak apply from here on."""
        totals = state.get("totals")
        if not isinstance(totals, dict) or set(totals) != set(self._TOTALS):
            got = sorted(totals) if isinstance(totals, dict) else type(totals).__name__
            raise ValueError(f"ledger state has totals {got}, expected {sorted(self._TOTALS)}; "
                             f"it is not a ComputeLedger.state_dict() of this version")
        self.totals = {k: float(v) for k, v in totals.items()}
