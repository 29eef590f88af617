"""Bicubic resampling of the run path, with torch's kernels or without torch.

The crops of the detector, the appearance volumes and the disc volumes are resampled with the
cubic-convolution kernel (a = -0.75, OpenCV's and torch's), pixel centres at half-integers
(``align_corners=False``): :func:`bicubic_resize` as ``torch.nn.functional.interpolate(mode="bicubic")``
and :func:`bicubic_sample` as ``grid_sample(mode="bicubic", padding_mode="zeros")``.

Where this process has imported torch (the torch and OpenVINO runtimes, which load torch networks)
torch's kernels run: the bundled results were measured with them, and they are the faster ones. Where it
has not (``--runtime onnx`` from its cache, ``models/onnx_runtime.py``, which exists so that a run never
pays for importing torch), the numpy kernels below compute the same formula; they agree with torch's
within float rounding (``Testing/Python/test_resample.py``: 1e-5 of the value range in float32, 1e-12 in
float64).
"""
from __future__ import annotations

import sys

import numpy as np
from scipy import sparse

#: The cubic-convolution parameter of torch's and OpenCV's bicubic kernels.
CUBIC_A = -0.75


def loaded_torch():
    """torch when this process has imported it already, else None (torch is never imported here)."""
    return sys.modules.get("torch")


def cubic_weights(t: np.ndarray) -> np.ndarray:
    """The four tap weights ``(..., 4)`` for the taps at floor - 1 .. floor + 2 of fractional offsets ``t``,
    in ``t``'s float dtype."""
    t = np.asarray(t)
    if t.dtype not in (np.float32, np.float64):
        t = t.astype(np.float64)
    a, one, two = t.dtype.type(CUBIC_A), t.dtype.type(1), t.dtype.type(2)

    def near(d):   # |d| <= 1
        return ((a + two) * d - (a + 3)) * d * d + one

    def far(d):    # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + one), near(t), near(one - t), far(two - t)], axis=-1)


def _resize_matrix(n_in: int, n_out: int, dtype) -> np.ndarray:
    """``(n_out, n_in)``: torch's bicubic resize along one axis (``align_corners=False``; source
    ``(i + 0.5) * n_in / n_out - 0.5``, not clamped; taps beyond the ends read the end pixel).  The source
    positions and weights are computed in ``dtype``, as torch computes them for that dtype (float32
    positions of a 300-pixel axis are off by about 2e-5 pixels, which moves a noisy image's values by 1e-5
    of their range)."""
    kind = np.dtype(dtype).type
    scale = kind(n_in) / kind(n_out)
    source = scale * (np.arange(n_out, dtype=kind) + kind(0.5)) - kind(0.5)
    first = np.floor(source)
    weights = cubic_weights(source - first)
    taps = np.clip(first[:, None].astype(int) + np.arange(-1, 3), 0, n_in - 1)
    matrix = np.zeros((n_out, n_in), dtype=kind)
    np.add.at(matrix, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
    return matrix


def bicubic_resize(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Every plane of ``planes`` ``(..., h, w)`` resized to ``size`` (rows, columns), in the planes' dtype
    (float32 or float64), as ``F.interpolate(mode="bicubic", align_corners=False)`` resizes them."""
    planes = np.asarray(planes)
    rows, cols = int(size[0]), int(size[1])
    torch = loaded_torch()
    if torch is not None:
        import torch.nn.functional as F

        lead = planes.shape[:-2]
        flat = torch.from_numpy(np.ascontiguousarray(planes).reshape(1, -1, *planes.shape[-2:]))
        with torch.inference_mode():
            out = F.interpolate(flat, size=(rows, cols), mode="bicubic", align_corners=False)
        return out.numpy().reshape(*lead, rows, cols)
    along_rows = _resize_matrix(planes.shape[-2], rows, planes.dtype)
    along_cols = _resize_matrix(planes.shape[-1], cols, planes.dtype)
    return np.ascontiguousarray(along_rows @ planes @ along_cols.T)


def bicubic_sample(region: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Each plane of ``region`` ``(S, h, w)`` sampled at the points (``xs``: columns, ``ys``: rows, in the
    region's pixels, any equal shapes), taps outside the region counting as zero: ``(S, *xs.shape)`` in
    the region's dtype, as ``F.grid_sample(mode="bicubic", padding_mode="zeros", align_corners=False)``
    samples them."""
    region = np.ascontiguousarray(region)
    n_planes, h, w = region.shape
    xs, ys = np.asarray(xs), np.asarray(ys)
    torch = loaded_torch()
    if torch is not None:
        import torch.nn.functional as F

        # pixel i <-> normalised (2 i + 1) / n - 1 with align_corners=False
        grid = np.stack([(2.0 * xs + 1.0) / w - 1.0, (2.0 * ys + 1.0) / h - 1.0], axis=-1).astype(region.dtype)
        grid = torch.from_numpy(grid.reshape(1, -1, 1, 2))
        # each plane a batch item: grid_sample shares its work out over the batch only (the same values)
        out = F.grid_sample(torch.from_numpy(region)[:, None], grid.expand(n_planes, -1, -1, -1),
                            mode="bicubic", padding_mode="zeros", align_corners=False)
        return out.numpy().reshape(n_planes, *xs.shape)
    kind = region.dtype.type
    # the positions as torch computes them for this dtype: normalised, then back to pixels
    gx = ((2.0 * xs.reshape(-1) + 1.0) / w - 1.0).astype(kind)
    gy = ((2.0 * ys.reshape(-1) + 1.0) / h - 1.0).astype(kind)
    x = ((gx + kind(1)) * kind(w) - kind(1)) / kind(2)
    y = ((gy + kind(1)) * kind(h) - kind(1)) / kind(2)
    x0, y0 = np.floor(x), np.floor(y)
    cols = x0.astype(int)[:, None] + np.arange(-1, 3)
    rows = y0.astype(int)[:, None] + np.arange(-1, 3)
    wx = np.where((cols >= 0) & (cols < w), cubic_weights(x - x0), 0.0)   # (P, 4): taps outside count zero
    wy = np.where((rows >= 0) & (rows < h), cubic_weights(y - y0), 0.0)
    weights = (wy[:, :, None] * wx[:, None, :]).reshape(len(x), 16)
    index = (np.clip(rows, 0, h - 1)[:, :, None] * w + np.clip(cols, 0, w - 1)[:, None, :]).reshape(len(x), 16)
    taps = sparse.csr_matrix((weights.ravel(), index.ravel(), np.arange(0, 16 * len(x) + 1, 16)),
                             shape=(len(x), h * w))
    out = (taps @ region.reshape(n_planes, h * w).T).T
    return out.astype(region.dtype).reshape(n_planes, *xs.shape)
