"""Quality features against closed-form values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lens_model.data.quality import features, histogram_entropy, laplacian_variance


def test_flat_image():
    f = features(Image.new("RGB", (40, 30), (51, 51, 51)))
    assert f["blur"] == 0.0 and f["entropy"] == 0.0
    assert f["luminance"] == pytest.approx(51 / 255)


def test_two_levels_half_half():
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[:, 16:] = 200
    f = features(Image.fromarray(a))
    assert f["entropy"] == pytest.approx(1.0)
    assert f["luminance"] == pytest.approx(100 / 255)


def test_four_equal_levels_is_two_bits():
    assert histogram_entropy(np.array([5, 0, 5, 5, 0, 5])) == pytest.approx(2.0)


def test_luminance_uses_luma_weights():
    assert features(Image.new("RGB", (8, 8), (255, 0, 0)))["luminance"] == pytest.approx(
        0.299, abs=0.005)
    assert features(Image.new("RGB", (8, 8), (255, 255, 255)))["luminance"] == 1.0


def test_laplacian_of_an_impulse():
    # An impulse v away from the border: centre -4v, four neighbours v, 49 values, mean 0.
    g = np.zeros((7, 7))
    g[3, 3] = 10.0
    assert laplacian_variance(g) == pytest.approx(20 * 10.0**2 / 49)


def test_blurring_a_checkerboard_lowers_blur():
    board = ((np.indices((64, 64)) // 4).sum(axis=0) % 2 * 255).astype(np.uint8)
    sharp = Image.fromarray(board).convert("RGB")
    soft = sharp.filter(ImageFilter.GaussianBlur(2))
    assert features(soft)["blur"] < features(sharp)["blur"] / 4
    assert features(sharp)["entropy"] == pytest.approx(1.0)


def test_large_images_are_measured_downscaled():
    # 1-px stripes along x: downscaling 2048 -> 512 averages them away, so blur collapses,
    # while entropy and luminance still see every pixel.
    a = np.zeros((64, 2048, 3), dtype=np.uint8)
    a[:, 1::2] = 255
    f = features(Image.fromarray(a))
    assert f["blur"] < 10.0
    assert f["entropy"] == pytest.approx(1.0) and f["luminance"] == pytest.approx(0.5)
    small = features(Image.fromarray(a[:, :512]))  # the same stripes at 512 wide stay sharp
    assert small["blur"] > 1000
