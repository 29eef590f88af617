"""Training-time augmentation: one affine resampling per patch, then intensity changes.

Why: the bundled networks are trained on a few dozen mostly T2 / water-image
lumbar scans, yet must work on T1, STIR and TIRM scans of any spine region
(issue #3).  Geometry is varied by a random similarity transform (scale,
rotation, horizontal flip) applied in ONE resampling (``grid_sample``), so
the image is interpolated once, exactly as the pipeline's single bicubic
resize.  Intensities are varied by random contrast/gamma, random
piecewise-linear remapping (including non-monotonic "sequence-like" remaps
that turn bright CSF/discs dark as in T1, or suppress fat as in STIR), a
smooth multiplicative bias field, Rician-like noise and mild blur.  The
network input is then normalised with exactly the inference function
(:func:`normalise_patch`, which calls ``detection.extract_patches``).

Geometry conventions: scan pixels ``(x=col, y=row)`` with pixel centres at
integers (docs/CONVENTIONS.md); patch pixels ``(u, v)`` likewise.  A
:class:`PatchTransform` maps patch pixels to scan pixels; its inverse maps
ground-truth quads into the patch.  A horizontal flip swaps posterior and
anterior, so the corner labels are re-assigned by image position
(rt<->lt, rb<->lb) to keep the rt, rb, lb, lt convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from SpineNetLib.training.contrast import t1_like_map

#: Corner order after a horizontal flip: new corner k is old corner FLIP_CORNERS[k]
#: (rt <- lt, rb <- lb, lb <- rb, lt <- rt).
FLIP_CORNERS = np.array([3, 2, 1, 0])


@dataclass(frozen=True)
class PatchTransform:
    """Patch pixel ``(u, v)`` -> scan pixel ``(x, y)``: ``xy = A @ uv + b``."""

    A: np.ndarray   # (2, 2)
    b: np.ndarray   # (2,)
    flipped: bool
    size: int

    def patch_to_scan(self, uv) -> np.ndarray:
        uv = np.asarray(uv, np.float64)
        return uv @ self.A.T + self.b

    def scan_to_patch(self, xy) -> np.ndarray:
        xy = np.asarray(xy, np.float64)
        return (xy - self.b) @ np.linalg.inv(self.A).T

    def quads_to_patch(self, quads) -> np.ndarray:
        """``(N, 4, 2)`` scan quads -> patch quads, corners relabelled after a flip."""
        q = self.scan_to_patch(np.asarray(quads, np.float64).reshape(-1, 4, 2))
        if self.flipped:
            q = q[:, FLIP_CORNERS]
        return q


def make_transform(center_xy, spacing_rc, *, patch_mm: float = 260.0, size: int = 224,
                   scale: float = 1.0, rotation_deg: float = 0.0, flip: bool = False) -> PatchTransform:
    """Patch of ``patch_mm * scale`` mm centred on ``center_xy`` (scan px), rotated, maybe flipped.

    The patch pixel is ``patch_mm * scale / size`` mm; anisotropic scan
    pixels are handled by working in millimetres.  ``rotation_deg`` turns
    the sampled content counter-clockwise as displayed.
    """
    row_mm, col_mm = float(spacing_rc[0]), float(spacing_rc[1])
    pmm = float(patch_mm) * float(scale) / int(size)
    t = np.deg2rad(float(rotation_deg))
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    fl = np.diag([-1.0 if flip else 1.0, 1.0])
    A = np.diag([1.0 / col_mm, 1.0 / row_mm]) @ rot @ fl * pmm
    c = (int(size) - 1) / 2.0
    b = np.asarray(center_xy, np.float64) - A @ np.array([c, c])
    return PatchTransform(A=A, b=b, flipped=bool(flip), size=int(size))


def _grid(tf: PatchTransform, shape_hw) -> torch.Tensor:
    n = tf.size
    v, u = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")
    xy = tf.patch_to_scan(np.stack([u, v], axis=-1))
    h, w = shape_hw
    gx = (2.0 * xy[..., 0] + 1.0) / w - 1.0   # align_corners=False pixel-centre convention
    gy = (2.0 * xy[..., 1] + 1.0) / h - 1.0
    return torch.from_numpy(np.stack([gx, gy], axis=-1)[None].astype(np.float32))


def resample(image_2d: np.ndarray, tf: PatchTransform, mode: str = "bicubic") -> np.ndarray:
    """The patch ``(size, size)`` float32 sampled from a 2-D image (zeros outside)."""
    img = torch.from_numpy(np.ascontiguousarray(image_2d, dtype=np.float32))[None, None]
    out = F.grid_sample(img, _grid(tf, image_2d.shape), mode=mode, padding_mode="zeros", align_corners=False)
    return out[0, 0].numpy()


def resample_with_ignore(image_2d: np.ndarray, ignore_2d: np.ndarray | None, tf: PatchTransform):
    """(patch, ignore-mask patch) with one grid; bicubic overshoot clipped to the image range."""
    patch = resample(image_2d, tf, "bicubic")
    lo, hi = float(np.min(image_2d)), float(np.max(image_2d))
    patch = np.clip(patch, min(lo, 0.0), hi)
    ign = None
    if ignore_2d is not None:
        ign = resample(ignore_2d.astype(np.float32), tf, "bilinear") > 0.01
    return patch, ign


# --------------------------------------------------------------------------- intensity


def _smooth_field(rng: np.random.Generator, shape_hw, strength: float, grid: int = 4) -> np.ndarray:
    """exp of a bicubically upsampled random ``grid x grid`` field: a smooth bias of +-strength."""
    g = torch.from_numpy(rng.normal(0.0, 1.0, (1, 1, grid, grid)).astype(np.float32))
    f = F.interpolate(g, size=tuple(int(s) for s in shape_hw), mode="bicubic", align_corners=True)[0, 0].numpy()
    return np.exp(float(strength) * f / 2.0).astype(np.float32)


def random_remap(rng: np.random.Generator, x: np.ndarray, *, p_sequence: float = 0.35) -> np.ndarray:
    """Random piecewise-linear map of [0, 1] intensities.

    With probability ``p_sequence`` the knot values are free (non-monotonic):
    e.g. bright fluid mapped dark and mid-grey marrow bright (T2 -> T1-like),
    or the brightest fat suppressed (STIR-like).  Otherwise a mild monotonic
    wobble around the identity.
    """
    k = int(rng.integers(3, 7))
    xs = np.concatenate([[0.0], np.sort(rng.uniform(0.05, 0.95, k)), [1.0]])
    if rng.random() < p_sequence:
        ys = rng.uniform(0.0, 1.0, k + 2)
        ys[0] = rng.uniform(0.0, 0.15)   # background stays dark
    else:
        ys = np.clip(xs + rng.normal(0.0, 0.08, k + 2), 0.0, 1.0)
        ys = np.maximum.accumulate(ys)
        ys[0] = 0.0
    return np.interp(x, xs, ys).astype(np.float32)


def augment_intensity(rng: np.random.Generator, img: np.ndarray, *, strength: float = 1.0) -> np.ndarray:
    """Random intensity changes of a 2-D patch or a 3-D volume (last axis = slices).

    The result is un-normalised (roughly [0, 1.x]); normalise it afterwards
    exactly as at inference.  ``strength`` 0 returns the input scaled to [0, 1].
    """
    x = np.asarray(img, np.float32)
    sub = x.ravel()[:: max(1, x.size // 65536)]  # percentiles of a regular subsample: fast on volumes
    lo, hi = (float(v) for v in np.percentile(sub, [0.5, 99.5]))
    x = np.clip((x - lo) / (hi - lo + 1e-6), 0.0, 1.5)  # keep highlights up to 1.5
    if strength <= 0:
        return x
    x = np.clip(x, 0.0, 1.0)
    if rng.random() < 0.6:
        x = random_remap(rng, x)
    if rng.random() < 0.7:
        x = np.power(np.clip(x, 0, None), float(np.exp(rng.uniform(-0.5, 0.5)))).astype(np.float32)
    if rng.random() < 0.7:
        shape_hw = x.shape[:2]
        field = _smooth_field(rng, shape_hw, rng.uniform(0.1, 0.6))
        x = x * (field[..., None] if x.ndim == 3 else field)
    if rng.random() < 0.3:
        sigma = float(rng.uniform(0.3, 1.0))
        t = torch.from_numpy(np.ascontiguousarray(x))
        r = int(np.ceil(3 * sigma))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
        k = (k / k.sum())
        if x.ndim == 2:
            t = t[None, None]
        else:
            t = t.permute(2, 0, 1)[:, None]
        t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        t = F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        x = t[0, 0].numpy() if x.ndim == 2 else t[:, 0].permute(1, 2, 0).numpy()
    if rng.random() < 0.7:
        sigma = float(rng.uniform(0.0, 0.06))
        n1 = sigma * rng.standard_normal(x.shape, dtype=np.float32)
        n2 = sigma * rng.standard_normal(x.shape, dtype=np.float32)
        x = np.sqrt((x + n1) ** 2 + n2 ** 2)
    x = x * float(np.exp(rng.uniform(-0.3, 0.3)))   # global contrast scale (normalisation removes most)
    return np.ascontiguousarray(x, dtype=np.float32)


#: Share of patches that ``degrade_acquisition`` changes, and the chance of each of its changes.
DEGRADE_SHARE = 0.8
DEGRADE_PART_CHANCE = 0.7


def degrade_acquisition(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """``x`` (a 2-D patch, or a 3-D volume whose last axis is the slices, with a dark background at 0, such
    as a normalised one; normalise the result again) as a poorer scan of another centre might show it:
    several changes at once, as the ``combined`` rows of ``benchmarks/acquisition_variants.py`` make them,
    with random strengths, every slice of a volume alike but for its noise.

    Each with chance ``DEGRADE_PART_CHANCE``: coarser pixels (1.1-1.7 times as large: a Gaussian blur of
    0.4 of the factor, then down- and up-sampled bilinearly), a gamma of 0.7-1.4, a signal falloff
    across the patch in a random direction (gain 1 - d to 1 + d, d 0.05-0.4), Rician noise of 1-5 % of
    the 99th percentile.  A share ``1 - DEGRADE_SHARE`` is returned unchanged, so that the student of
    ``spinenet train detector --robust-distil`` (and ``train appearance --robust-distil``) also sees clean
    inputs held to its teacher.
    """
    x = np.asarray(x, np.float32)
    if rng.random() >= DEGRADE_SHARE:
        return x
    h, w = x.shape[:2]
    slices = x.reshape(h, w, -1)            # a patch as a volume of one slice
    if rng.random() < DEGRADE_PART_CHANCE:
        factor = float(rng.uniform(1.1, 1.7))
        blurred = ndimage.gaussian_filter(slices, (0.4 * factor, 0.4 * factor, 0.0), mode="nearest")
        t = torch.from_numpy(np.ascontiguousarray(blurred.astype(np.float32).transpose(2, 0, 1)))[:, None]
        small = F.interpolate(t, size=(max(2, round(h / factor)), max(2, round(w / factor))), mode="bilinear",
                              align_corners=True)
        slices = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=True)[:, 0].numpy().transpose(1, 2, 0)
    if rng.random() < DEGRADE_PART_CHANCE:
        slices = np.power(np.clip(slices, 0.0, None), float(rng.uniform(0.7, 1.4))).astype(np.float32)
    if rng.random() < DEGRADE_PART_CHANCE:
        angle, depth = rng.uniform(0.0, 2.0 * np.pi), float(rng.uniform(0.05, 0.4))
        rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
        along = ((cols - (w - 1) / 2.0) * np.cos(angle) + (rows - (h - 1) / 2.0) * np.sin(angle)) / (max(h, w) / 2.0)
        slices = slices * (1.0 + depth * np.clip(along, -1.0, 1.0)).astype(np.float32)[:, :, None]
    if rng.random() < DEGRADE_PART_CHANCE:
        sigma = float(rng.uniform(0.01, 0.05)) * float(np.percentile(slices, 99))
        slices = np.hypot(slices + rng.normal(0.0, sigma, slices.shape),
                          rng.normal(0.0, sigma, slices.shape)).astype(np.float32)
    return np.ascontiguousarray(slices.reshape(x.shape), dtype=np.float32)


def t1_like_contrast(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """``x`` (a 2-D patch or a 3-D volume, dark background at 0, such as a normalised one; normalise the result
    again) with a random T1-like contrast made from its T2 one (``contrast.t1_like_map``): the middle knot, made
    the brightest, at a random 55th-85th percentile of the foreground, the bright knot, made dark grey, 7 points
    above it up to the 97th, and random new intensities.  The benchmark row ``t1_like`` is a fixed member of this
    family (``contrast.T1_LIKE_ROW``).  A share ``1 - DEGRADE_SHARE`` is returned unchanged, as by
    ``degrade_acquisition``.
    """
    x = np.asarray(x, np.float32)
    if rng.random() >= DEGRADE_SHARE:
        return x
    middle = float(rng.uniform(55.0, 85.0))
    bright = float(rng.uniform(middle + 7.0, 97.0))
    values = (rng.uniform(0.05, 0.3), 1.0, rng.uniform(0.2, 0.5), rng.uniform(0.1, 0.4))
    return t1_like_map(x, middle, bright, values)


#: The changes ``--robust-distil`` shows its student, by ``--degradation`` name, and the one it shows by default.
DEGRADATIONS = {"acquisition": degrade_acquisition, "t1-contrast": t1_like_contrast}
DEFAULT_DEGRADATION = "acquisition"


def normalise_patch(patch: np.ndarray) -> np.ndarray:
    """Exactly the detector's inference normalisation of a ``(P, P)`` patch (official §5.1).

    Calls ``detection.extract_patches`` on the whole patch, which then does no
    resizing: clip to its own range, ``(p - min) / (P99.5 - P0.5 + 1e-9)``.
    """
    from SpineNetLib.detect.vfr import PatchBox, extract_patches

    p = np.asarray(patch, np.float32)
    rows, cols = p.shape
    box = PatchBox(0, 0, 0, rows, cols, net_px=(rows, cols))
    return extract_patches(p, [box])[0, :rows, :cols]
