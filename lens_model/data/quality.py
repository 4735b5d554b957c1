"""Per-item quality features behind the paper's blur, entropy and luminance filters.

All three read the grey image (ITU-R 601 luma, PIL's ``L``):
- blur: variance of the 4-neighbour Laplacian (OpenCV's default kernel and reflect-101
  border), on a copy downscaled so the long side is at most 512, so one threshold serves
  every resolution; higher means sharper;
- entropy: Shannon entropy in bits of the 256-bin grey histogram (0 for a flat image, 8 max);
- luminance: mean grey / 255.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BLUR_MAX_SIDE = 512


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D array (reflect-101 border)."""
    g = np.pad(grey.astype(np.float64), 1, mode="reflect")
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def histogram_entropy(counts: np.ndarray) -> float:
    """Shannon entropy in bits of a histogram of counts."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def features(img: Image.Image) -> dict[str, float]:
    """``{"blur", "entropy", "luminance"}`` of an RGB image (definitions in the module doc)."""
    grey = img.convert("L")
    counts = np.asarray(grey.histogram(), dtype=np.float64)  # (256,)
    luminance = float((counts * np.arange(256)).sum() / counts.sum() / 255.0)
    w, h = grey.size
    if max(w, h) > BLUR_MAX_SIDE:
        scale = BLUR_MAX_SIDE / max(w, h)
        grey = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return {
        "blur": laplacian_variance(np.asarray(grey)),
        "entropy": histogram_entropy(counts),
        "luminance": luminance,
    }
