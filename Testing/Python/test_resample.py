"""The run path's bicubic resampling (core/resample.py): torch's kernels where torch is loaded, numpy's
where it is not (``--runtime onnx``), the same numbers either way.

What a user relies on: a run that never imports torch cuts the detector's patches, the appearance
volumes and the disc volumes as the torch runtime does, so the two runtimes find and name the same
bodies.  The numpy kernels are compared here with torch's own functions, on upsampling, downsampling,
rotated sampling grids and taps beyond the image edge.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SpineNetLib.core import resample
from SpineNetLib.detect import plans


@pytest.fixture
def without_torch(monkeypatch):
    """The module as a process that has not imported torch sees it."""
    monkeypatch.setattr(resample, "loaded_torch", lambda: None)
    monkeypatch.setattr(plans, "loaded_torch", lambda: None)


def _close(got: np.ndarray, expected: np.ndarray, dtype) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype == dtype
    scale = float(np.abs(expected).max())
    tolerance = 2e-5 if dtype == np.float32 else 1e-12
    assert float(np.abs(got - expected).max()) <= tolerance * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,size", [((3, 260, 300), (224, 224)), ((2, 90, 140), (224, 224)),
                                        ((9, 37, 53), (112, 224)), ((1, 224, 224), (224, 224))])
def test_numpy_resize_is_torchs_bicubic_interpolate(without_torch, dtype, shape, size):
    planes = (np.random.default_rng(1).random(shape) * 255).astype(dtype)
    expected = F.interpolate(torch.from_numpy(planes)[None], size=size, mode="bicubic",
                             align_corners=False)[0].numpy()
    _close(resample.bicubic_resize(planes, size), expected, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_sampling_is_torchs_bicubic_grid_sample_with_a_zero_border(without_torch, dtype):
    """A rotated grid that reaches beyond the region on every side: taps outside count as zero."""
    region = (np.random.default_rng(2).random((5, 40, 50)) * 100).astype(dtype)
    rows, cols = np.meshgrid(np.linspace(-6, 46, 61), np.linspace(-5, 55, 67), indexing="ij")
    angle = 0.35
    xs = 25 + (cols - 25) * np.cos(angle) - (rows - 20) * np.sin(angle)
    ys = 20 + (cols - 25) * np.sin(angle) + (rows - 20) * np.cos(angle)
    h, w = region.shape[1:]
    grid = np.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], axis=-1).astype(dtype)
    expected = F.grid_sample(torch.from_numpy(region)[:, None], torch.from_numpy(grid)[None].expand(5, -1, -1, -1),
                             mode="bicubic", padding_mode="zeros", align_corners=False)[:, 0].numpy()
    got = resample.bicubic_sample(region, xs, ys)
    _close(got, expected, dtype)
    assert np.all(got[:, 0, :3] == 0) or float(np.abs(got[:, 0, :3]).max()) < 1e-9   # far outside: nothing


def test_with_torch_loaded_the_kernels_are_torchs_own():
    """The torch runtime's numbers stay exactly what they were (the bundled results were measured so)."""
    planes = np.random.default_rng(3).random((4, 100, 120)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(planes)[:, None], size=(224, 224), mode="bicubic",
                             align_corners=False)[:, 0].numpy()
    assert np.array_equal(resample.bicubic_resize(planes, (224, 224)), expected)


def test_patch_percentiles_are_the_same_without_torch(monkeypatch):
    flat = (np.random.default_rng(4).random((6, 50176)) * 255).astype(np.float32)
    with_torch = plans._percentiles_half_and_99_half(flat)
    monkeypatch.setattr(plans, "loaded_torch", lambda: None)
    without = plans._percentiles_half_and_99_half(flat)
    assert all(np.array_equal(a, b) for a, b in zip(with_torch, without))


def test_cubic_weights_sum_to_one_and_interpolate():
    t = np.linspace(0, 0.999, 50)
    weights = resample.cubic_weights(t)
    assert weights.shape == (50, 4) and np.allclose(weights.sum(axis=1), 1.0)
    assert np.allclose(resample.cubic_weights(np.zeros(1)), [[0, 1, 0, 0]])
