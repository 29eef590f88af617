"""Intervertebral disc (IVD) volumes for the grading network (paper §3.3, official §6).

For every pair of consecutive vertebrae (top to bottom) we cut a
``(9, 112, 224)`` = (slices, rows, cols) volume around the disc between them,
straightened so that the upper body's lower endplate is horizontal, and
normalise it by the intensity of the two bodies, as the official
``get_ivds_from_vert_dicts`` does, so that the official grading weights see
what they were trained on.

Geometry (official §6)
----------------------
* Disc mid slice = round(mean of the two bodies' mid slices); on it each body
  contributes its own polygon (or its average polygon where it was not
  detected on that slice).  The disc quad is [upper.rb, lower.rt, lower.lt,
  upper.lb].
* Rotation: the upper body's lower endplate (its lb -> rb edge) becomes
  horizontal, posterior to the right (``atan2`` of that edge, official §6).
* Box: the bounding box of the disc quad in that rotated frame, of AP width
  ``w``.  The official code doubles the width, sets the height to half of it,
  adds a border and crops; the net coverage is ``COVERAGE * 2w`` across by
  ``COVERAGE * w`` down (``COVERAGE`` = 0.98678, derived in official §6), centred
  on the box.  So the crop is about twice the disc's (= the larger adjacent
  endplate's) AP width, with a 2:1 aspect.  We centre on the disc box, like
  the official code, rather than on the midpoint of the two body centroids:
  between bodies of unequal height (C2-C3: 35 mm over 14 mm) the centroid
  midpoint lies millimetres inside the taller body.
* Slices: 9 native slices, disc mid slice - 4 .. + 4, no resampling along the
  slice axis; slices outside the scan are zeros (official §6).
* Slice direction: volume slice 0 is the canonical slice ``mid - 4``, i.e.
  the volume runs **patient right -> left** (docs/CONVENTIONS.md).  The slice
  direction the official grader was trained with is unknown (official §4, §12);
  it only matters for the ForaminalStenosisLeft/Right heads, which would be
  swapped if training ran left -> right.

Unlike the official code (square pixels, whole-volume rotations with
OpenCV), everything is done in physical millimetres, so anisotropic pixels
give an undistorted crop, and each output voxel is mapped straight back to
the scan and sampled once (bicubic, OpenCV's a = -0.75 kernel via
``core/resample.py``) from only the region the crop covers.

Intensity (official §6, §11.8): reference = median of the raw scan values inside
each body's mid-slice polygon, applied to every slice where that body was
detected, pooled over both bodies; volume = clip(v / reference * 0.5, 0, 2) / 2,
so the bodies' median maps to 0.25 and 1.0 means four times it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from SpineNetLib.core.levels import LEVELS_TOP_DOWN, disc_name
from SpineNetLib.core.polygons import points_in_polygon
from SpineNetLib.core.resample import bicubic_resize, bicubic_sample
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan

#: Output shape (slices, rows, cols), the grading network's input (official §3.4, §6).
IVD_SHAPE: tuple[int, int, int] = (9, 112, 224)
#: Native slices on each side of the disc mid slice (9 = 2 * 4 + 1).
HALF_SLICES = 4
#: Net crop size as a fraction of (2w, w): (1 + 2 * 46.5 / 227) * 224 / 320
#: = (1 + 2 * 39.25 / 113.5) * 112 / 192 (official §6, border then centre crop).
COVERAGE = (1.0 + 93.0 / 227.0) * 224.0 / 320.0

#: (rows, cols) of the official resized disc patch, before its centre crop to 112 x 224 (official §6).
OFFICIAL_PATCH: tuple[int, int] = (192, 320)

#: Level names in reading order; "S2" (from the S2 rule) follows S1.
_ORDER: tuple[str, ...] = LEVELS_TOP_DOWN + ("S2",)


@dataclass
class IVDVolume:
    """One disc's grading volume and where it came from."""

    #: Disc name, "{upper}-{lower}" ("L4-L5"), or "V3-V4" style (1-based) for unlabelled bodies.
    level: str
    #: Indices of the two bodies in the vertebra list given to :func:`extract_ivd_volumes`.
    upper_index: int
    lower_index: int
    #: float32 ``(9, 112, 224)`` = (slices R->L, rows S->I, cols A->P), values in [0, 1].
    volume: np.ndarray
    #: (2,) disc centre ``(x=col, y=row)`` in canonical pixels, on ``mid_slice``.
    centre_xy: np.ndarray
    #: Canonical slice of the disc (volume slice 4).
    mid_slice: int
    #: 4x4: volume index ``[slice, row, col, 1]`` -> canonical ``[row, col, slice, 1]``.
    sample_to_canonical: np.ndarray
    #: Raw-intensity median of the two bodies (the value that maps to 0.25).
    reference_intensity: float


# --------------------------------------------------------------------------- pairing and naming

def body_name(vertebra: Vertebra, index: int) -> str:
    """The level, or "V<n>" (1-based, top to bottom) for an unlabelled body.

    The same rule as :func:`SpineNetLib.outputs.documents.vertebra_name`, which works on the
    vertebrae of a ``vertebrae.json`` document instead of :class:`Vertebra` objects.
    """
    return vertebra.level or f"V{index + 1}"


def adjacent_levels(upper: str | None, lower: str | None) -> bool:
    """True unless both are known levels that are not neighbours (e.g. L3 over L5)."""
    if not upper or not lower or upper not in _ORDER or lower not in _ORDER:
        return True
    return _ORDER.index(lower) == _ORDER.index(upper) + 1


def disc_pairs(vertebrae: Sequence[Vertebra], across_missed_levels: bool = False) -> list[tuple[int, int, str]]:
    """``(upper_index, lower_index, name)`` for each disc, top to bottom.

    Every consecutive pair gives a disc (as official §6), except two labelled
    bodies whose levels are not adjacent (a missed body in between): the
    volume would straddle a whole vertebra and the name would be wrong.
    ``across_missed_levels`` keeps those too, as the official code does (the
    ``official`` processing profile).
    """
    pairs = []
    for i in range(len(vertebrae) - 1):
        up, lo = vertebrae[i], vertebrae[i + 1]
        if across_missed_levels or adjacent_levels(up.level, lo.level):
            pairs.append((i, i + 1, disc_name(body_name(up, i), body_name(lo, i + 1))))
    return pairs


def skipped_discs(vertebrae: Sequence[Vertebra]) -> list[str]:
    """One message per pair of consecutive bodies that :func:`disc_pairs` gives no disc (missed body between)."""
    return [skipped_disc_message(up.level, lo.level) for up, lo in zip(vertebrae, vertebrae[1:])
            if not adjacent_levels(up.level, lo.level)]


def skipped_disc_message(upper_level: str | None, lower_level: str | None) -> str:
    """Why two consecutive bodies have no disc (:func:`skipped_discs`)."""
    return (f"no disc between {upper_level} and {lower_level}: the vertebra between them was not found, "
            "and a volume across a whole vertebra would not be a disc")


# --------------------------------------------------------------------------- geometry helpers

def polygon_on_or_average(vertebra: Vertebra, canonical_slice: int) -> np.ndarray:
    """The body's polygon on a slice, or its average polygon where it was not detected (official §6)."""
    poly = vertebra.polygon_on(int(canonical_slice))
    return np.asarray(vertebra.average_polygon if poly is None else poly, np.float64)


def body_mid_polygon(vertebra: Vertebra) -> np.ndarray:
    """The (4, 2) canonical polygon on the body's mid slice (round(median(slices))), or its average polygon.

    Not :func:`SpineNetLib.outputs.documents.mid_polygon`, which picks a document vertebra's RAS
    polygon entry (ties to the lower slice).
    """
    return polygon_on_or_average(vertebra, vertebra.mid_slice)


def disc_mid_slice(upper: Vertebra, lower: Vertebra) -> int:
    """round(mean of the two bodies' mid slices) (official §6); halves round to even like np.round."""
    return int(np.round(0.5 * (upper.mid_slice + lower.mid_slice)))


def disc_quad(upper_poly: np.ndarray, lower_poly: np.ndarray) -> np.ndarray:
    """[upper.rb, lower.rt, lower.lt, upper.lb] (official §6), (4, 2) ``[x, y]``."""
    return np.stack([upper_poly[1], lower_poly[0], lower_poly[3], upper_poly[2]]).astype(np.float64)


def pixel_scale(scan: Scan) -> np.ndarray:
    """(col_mm, row_mm): multiplies ``[x, y]`` pixels into millimetres."""
    return np.array([float(scan.spacing_mm[1]), float(scan.spacing_mm[0])])


# --------------------------------------------------------------------------- intensity reference

def body_intensity_samples(scan: Scan, vertebra: Vertebra, official_fill: bool = False) -> np.ndarray:
    """Raw values inside the mid-slice polygon, on every slice where the body was detected (official §6).

    A pixel belongs to the polygon when its centre lies inside it by the even-odd rule.
    ``official_fill``: scikit-image's ``draw.polygon`` decides, as in the official code; it
    differs for pixel centres exactly on an edge or a vertex, which moved the median of 8-bit
    clinical slices by up to 1 % (a tie between two grey values).
    """
    voxels = scan.voxels
    height, width, n_slices = voxels.shape
    poly = body_mid_polygon(vertebra)
    if not np.all(np.isfinite(poly)):
        return np.zeros(0, np.float32)
    slices = [s for s in vertebra.slices if 0 <= s < n_slices]
    if official_fill:
        from skimage.draw import polygon as fill_polygon

        rows, cols = fill_polygon(poly[:, 1], poly[:, 0], (height, width))
        return np.asarray(voxels[rows, cols][:, slices], np.float32).ravel()
    x0, x1 = max(int(math.ceil(poly[:, 0].min())), 0), min(int(math.floor(poly[:, 0].max())), width - 1)
    y0, y1 = max(int(math.ceil(poly[:, 1].min())), 0), min(int(math.floor(poly[:, 1].max())), height - 1)
    if x0 > x1 or y0 > y1 or not slices:
        return np.zeros(0, np.float32)
    yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    inside = points_in_polygon(np.stack([xx.ravel(), yy.ravel()], axis=1), poly).reshape(yy.shape)
    if not inside.any():
        return np.zeros(0, np.float32)
    region = voxels[y0:y1 + 1, x0:x1 + 1][:, :, slices]
    return np.asarray(region[inside], np.float32).ravel()


def reference_intensity(scan: Scan, upper: Vertebra, lower: Vertebra,
                        samples: dict[int, np.ndarray] | None = None,
                        indices: tuple[int, int] | None = None, official_fill: bool = False) -> float:
    """Median of the pooled samples of both bodies (official §6); NaN when neither has any pixel.

    ``samples``/``indices`` let a caller reuse each body's samples across its two discs;
    ``official_fill``: see :func:`body_intensity_samples`.
    """
    parts = []
    for k, v in enumerate((upper, lower)):
        if samples is not None and indices is not None:
            key = indices[k]
            if key not in samples:
                samples[key] = body_intensity_samples(scan, v, official_fill)
            parts.append(samples[key])
        else:
            parts.append(body_intensity_samples(scan, v, official_fill))
    pooled = np.concatenate(parts) if parts else np.zeros(0)
    return float(np.median(pooled)) if pooled.size else float("nan")


def normalise_ivd(volume: np.ndarray, reference: float) -> np.ndarray:
    """v / reference * 0.5, clipped to [0, 2], / 2: the bodies' median -> 0.25 (official §6, §11.8)."""
    return (np.clip(np.asarray(volume, np.float64) / reference * 0.5, 0.0, 2.0) / 2.0).astype(np.float32)


# --------------------------------------------------------------------------- the crop

@dataclass(frozen=True)
class _Frame:
    """The straightened disc frame in millimetres: centre, axes and the crop size."""

    centre_mm: np.ndarray   # (2,) [x, y] mm
    ex: np.ndarray          # (2,) unit, along the upper body's lower endplate, posterior
    ey: np.ndarray          # (2,) unit, ex turned 90 deg towards inferior
    width_mm: float
    height_mm: float


def _disc_frame(quad_px: np.ndarray, scale: np.ndarray) -> _Frame | None:
    """Crop frame of a disc quad (see module docstring); None if degenerate."""
    q = quad_px * scale
    if not np.all(np.isfinite(q)):
        return None
    edge = q[0] - q[3]  # upper.lb -> upper.rb
    length = float(np.hypot(edge[0], edge[1]))
    if not length > 1e-6:
        return None
    ex = edge / length
    ey = np.array([-ex[1], ex[0]])  # (1, 0) -> (0, 1): posterior -> inferior in image axes
    u, v = q @ ex, q @ ey
    w = float(u.max() - u.min())
    if not w > 1e-6:
        return None
    centre = 0.5 * (u.max() + u.min()) * ex + 0.5 * (v.max() + v.min()) * ey
    return _Frame(centre, ex, ey, 2.0 * w * COVERAGE, w * COVERAGE)


def _sample_to_canonical(frame: _Frame, scale: np.ndarray, first_slice: int) -> np.ndarray:
    """4x4 ``[slice, row, col, 1]`` of the volume -> canonical ``[row, col, slice, 1]``.

    Output pixel (r, c) is centred at u = (c + 0.5) W / 224 - W / 2 across and
    v = (r + 0.5) H / 112 - H / 2 down the frame (align_corners=False resizing,
    as the official resize-then-crop).
    """
    n_s, n_r, n_c = IVD_SHAPE
    du, dv = frame.width_mm / n_c, frame.height_mm / n_r
    origin = frame.centre_mm + (0.5 * du - 0.5 * frame.width_mm) * frame.ex \
        + (0.5 * dv - 0.5 * frame.height_mm) * frame.ey          # [x, y] mm of voxel (r=0, c=0)
    col_mm, row_mm = float(scale[0]), float(scale[1])
    m = np.zeros((4, 4))
    # canonical row = y / row_mm, col = x / col_mm
    m[0, 1], m[0, 2], m[0, 3] = dv * frame.ey[1] / row_mm, du * frame.ex[1] / row_mm, origin[1] / row_mm
    m[1, 1], m[1, 2], m[1, 3] = dv * frame.ey[0] / col_mm, du * frame.ex[0] / col_mm, origin[0] / col_mm
    m[2, 0], m[2, 3] = 1.0, float(first_slice)
    m[3, 3] = 1.0
    return m


def _sample_slices(voxels: np.ndarray, slices: list[int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bicubic samples of the given slices at in-slice points; zero outside the image.

    Only the bounding box of the points plus the 2-pixel kernel support is
    read; taps outside the image count as zero (the official zero border).
    Returns ``(len(slices), *rows.shape)`` float32.
    """
    height, width = voxels.shape[:2]
    out = np.zeros((len(slices), *rows.shape), np.float32)
    x_lo, x_hi = max(int(np.floor(cols.min())) - 2, 0), min(int(np.floor(cols.max())) + 3, width - 1)
    y_lo, y_hi = max(int(np.floor(rows.min())) - 2, 0), min(int(np.floor(rows.max())) + 3, height - 1)
    if not slices or x_lo > x_hi or y_lo > y_hi:
        return out
    region = np.ascontiguousarray(voxels[y_lo:y_hi + 1, x_lo:x_hi + 1][:, :, slices].transpose(2, 0, 1),
                                  dtype=np.float32)
    return bicubic_sample(region, cols - x_lo, rows - y_lo)


def _disc_slices(voxels: np.ndarray, first_slice: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The disc's 9 native slices from ``first_slice`` sampled at the in-slice points (official §6):
    ``(9, *rows.shape)`` float32, zeros for slices beyond the scan."""
    wanted = [first_slice + k for k in range(IVD_SHAPE[0])]
    inside = [k for k, s in enumerate(wanted) if 0 <= s < voxels.shape[2]]
    out = np.zeros((IVD_SHAPE[0], *rows.shape), np.float32)
    if inside:
        out[inside] = _sample_slices(voxels, [wanted[k] for k in inside], rows, cols)
    return out


def extract_ivd_volume(scan: Scan, upper: Vertebra, lower: Vertebra, *, level: str = "",
                       upper_index: int = 0, lower_index: int = 1,
                       reference: float | None = None) -> IVDVolume | None:
    """The grading volume of the disc between two bodies (module docstring); None if degenerate."""
    voxels = scan.voxels
    mid = disc_mid_slice(upper, lower)
    quad = disc_quad(polygon_on_or_average(upper, mid), polygon_on_or_average(lower, mid))
    scale = pixel_scale(scan)
    frame = _disc_frame(quad, scale)
    if frame is None:
        return None
    first = mid - HALF_SLICES
    to_canonical = _sample_to_canonical(frame, scale, first)
    _, n_r, n_c = IVD_SHAPE
    rr, cc = np.meshgrid(np.arange(n_r, dtype=np.float64), np.arange(n_c, dtype=np.float64), indexing="ij")
    rows = to_canonical[0, 1] * rr + to_canonical[0, 2] * cc + to_canonical[0, 3]
    cols = to_canonical[1, 1] * rr + to_canonical[1, 2] * cc + to_canonical[1, 3]
    raw = _disc_slices(voxels, first, rows, cols)
    if reference is None:
        reference = reference_intensity(scan, upper, lower)
    if not (math.isfinite(reference) and reference > 0):
        # No body pixel (or a non-positive median, e.g. signed data): fall back
        # to the median of the crop's positive values so the volume stays usable.
        positive = raw[raw > 0]
        reference = float(np.median(positive)) if positive.size else 1.0
    return IVDVolume(level=level, upper_index=upper_index, lower_index=lower_index,
                     volume=normalise_ivd(raw, reference),
                     centre_xy=frame.centre_mm / scale, mid_slice=int(mid),
                     sample_to_canonical=to_canonical, reference_intensity=float(reference))


def _official_rotation(quad_sq: np.ndarray, width: float, height: float) -> tuple[np.ndarray, int, int]:
    """The official rotate-bound matrix (official §6): 2x3, square-pixel frame -> enlarged canvas.

    OpenCV's ``getRotationMatrix2D`` about the frame's centre by theta = atan2 of the upper
    body's lower endplate in degrees, then shifted so the whole rotated frame fits a canvas of
    ``int(H |sin| + W |cos|)`` x ``int(H |cos| + W |sin|)``.
    """
    theta = math.radians(math.degrees(math.atan2(quad_sq[0, 1] - quad_sq[3, 1], quad_sq[0, 0] - quad_sq[3, 0])))
    a, b = math.cos(theta), math.sin(theta)
    cx, cy = width / 2.0, height / 2.0
    m = np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])
    new_w = int(height * abs(b) + width * abs(a))
    new_h = int(height * abs(a) + width * abs(b))
    m[0, 2] += (new_w - width) / 2.0
    m[1, 2] += (new_h - height) / 2.0
    return m, new_w, new_h


def _official_box(rotated_quad: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, x1, y0, y1)`` canvas window of the official crop (official §6), before the 320x192 resize.

    The rotated quad's bounding box widened by half its width on each side, made half as high
    as wide around its middle, bordered by 46.5/227 of the width and 39.25/113.5 of the height
    on each side, and each edge rounded half to even (np.round).
    """
    qx, qy = rotated_quad[:, 0], rotated_quad[:, 1]
    w = float(qx.max() - qx.min())
    x_lo, x_hi = qx.min() - 0.5 * w, qx.max() + 0.5 * w
    extra_vert = ((x_hi - x_lo) / 2.0 - float(qy.max() - qy.min())) * 0.5
    y_lo, y_hi = qy.min() - extra_vert, qy.max() + extra_vert
    extra_w = ((OFFICIAL_PATCH[1] - 227.0) / 2.0) * ((x_hi - x_lo) / 227.0)
    extra_h = ((OFFICIAL_PATCH[0] - 113.5) / 2.0) * ((y_hi - y_lo) / 113.5)
    return (int(np.round(x_lo - extra_w)), int(np.round(x_hi + extra_w)),
            int(np.round(y_lo - extra_h)), int(np.round(y_hi + extra_h)))


def extract_ivd_volume_official(scan: Scan, upper: Vertebra, lower: Vertebra, *, level: str = "",
                                upper_index: int = 0, lower_index: int = 1,
                                reference: float | None = None) -> IVDVolume | None:
    """The grading volume as the official code cuts it (official §6): the ``official`` profile.

    Each slice is rotated onto the official rotate-bound canvas (square pixels of the finer
    spacing, bicubic, zero border); the window of :func:`_official_box` (whole canvas pixels,
    zeros beyond the canvas) is resized to 192 x 320 (bicubic, half-pixel centres, as OpenCV's
    ``resize``), normalised, and rows 40:152, columns 48:272 kept.  Only the window's canvas
    pixels are computed, each sampled from the scan once.  None if degenerate.
    """
    voxels = scan.voxels
    height_px, width_px = voxels.shape[:2]
    row_mm, col_mm = float(scan.spacing_mm[0]), float(scan.spacing_mm[1])
    to_square = np.array([col_mm, row_mm]) / min(row_mm, col_mm)      # (x, y) factors
    mid = disc_mid_slice(upper, lower)
    quad = disc_quad(polygon_on_or_average(upper, mid), polygon_on_or_average(lower, mid)) * to_square
    if not np.all(np.isfinite(quad)) or not np.hypot(*(quad[0] - quad[3])) > 1e-6:
        return None
    m, canvas_w, canvas_h = _official_rotation(quad, width_px * to_square[0], height_px * to_square[1])
    rotated = quad @ m[:, :2].T + m[:, 2]
    x0, x1, y0, y1 = _official_box(rotated)
    if x1 <= x0 or y1 <= y0:
        return None
    warp = m.copy()
    warp[:, :2] *= to_square                       # the scan's own pixels -> canvas, as official
    inverse = np.linalg.inv(np.vstack([warp, [0.0, 0.0, 1.0]]))
    cc, rr = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))
    cols = inverse[0, 0] * cc + inverse[0, 1] * rr + inverse[0, 2]
    rows = inverse[1, 0] * cc + inverse[1, 1] * rr + inverse[1, 2]
    window = _disc_slices(voxels, mid - HALF_SLICES, rows, cols)
    window[:, (rr[:, 0] < 0) | (rr[:, 0] >= canvas_h), :] = 0.0   # beyond the canvas: the official zero pad
    window[:, :, (cc[0] < 0) | (cc[0] >= canvas_w)] = 0.0
    patch = bicubic_resize(window, OFFICIAL_PATCH)
    r0, c0 = (OFFICIAL_PATCH[0] - IVD_SHAPE[1]) // 2, (OFFICIAL_PATCH[1] - IVD_SHAPE[2]) // 2
    raw = patch[:, r0:r0 + IVD_SHAPE[1], c0:c0 + IVD_SHAPE[2]]
    if reference is None:
        reference = reference_intensity(scan, upper, lower, official_fill=True)
    reference = reference if math.isfinite(reference) and reference != 0 else 1.0
    volume = normalise_ivd(raw, reference)
    # voxel (slice, row, col) -> window pixel -> canvas -> scan pixel (for hotspots and outputs)
    sy, sx = (y1 - y0) / OFFICIAL_PATCH[0], (x1 - x0) / OFFICIAL_PATCH[1]
    to_canvas = np.array([[0.0, 0.0, sx, x0 + (c0 + 0.5) * sx - 0.5],
                          [0.0, sy, 0.0, y0 + (r0 + 0.5) * sy - 0.5], [0.0, 0.0, 0.0, 1.0]])
    to_scan = inverse @ to_canvas                  # rows: col, row, 1
    to_canonical = np.array([to_scan[1], to_scan[0], [1.0, 0.0, 0.0, mid - HALF_SLICES], [0.0, 0.0, 0.0, 1.0]])
    centre_canvas = np.array([0.5 * (x0 + x1) - 0.5, 0.5 * (y0 + y1) - 0.5, 1.0])
    return IVDVolume(level=level, upper_index=upper_index, lower_index=lower_index, volume=volume,
                     centre_xy=(inverse @ centre_canvas)[:2], mid_slice=int(mid),
                     sample_to_canonical=to_canonical, reference_intensity=float(reference))


def extract_ivd_volumes(scan: Scan, vertebrae: Sequence[Vertebra],
                        across_missed_levels: bool = False, official_arithmetic: bool = False) -> list[IVDVolume]:
    """Grading volumes of all discs between consecutive vertebrae (given top to bottom), top to bottom.

    Pairs of labelled but non-adjacent levels are skipped unless
    ``across_missed_levels`` (:func:`disc_pairs`), as are degenerate quads
    (zero-length endplate or non-finite corners).  ``official_arithmetic`` cuts them as the
    official code does (:func:`extract_ivd_volume_official`, the ``official`` profile).
    """
    extract = extract_ivd_volume_official if official_arithmetic else extract_ivd_volume
    samples: dict[int, np.ndarray] = {}
    out = []
    for i, j, name in disc_pairs(vertebrae, across_missed_levels):
        ref = reference_intensity(scan, vertebrae[i], vertebrae[j], samples, (i, j), official_arithmetic)
        ivd = extract(scan, vertebrae[i], vertebrae[j], level=name, upper_index=i, lower_index=j, reference=ref)
        if ivd is not None:
            out.append(ivd)
    return out


def canonical_points(ivd: IVDVolume, index_points) -> np.ndarray:
    """Canonical ``(row, col, slice)`` of volume indices ``(slice, row, col)``, (N, 3)."""
    p = np.asarray(index_points, np.float64).reshape(-1, 3)
    hom = np.concatenate([p, np.ones((len(p), 1))], axis=1)
    return (hom @ ivd.sample_to_canonical.T)[:, :3]


def sample_to_ras(scan: Scan, ivd: IVDVolume) -> np.ndarray:
    """4x4: volume index ``[slice, row, col, 1]`` -> RAS millimetres."""
    return np.asarray(scan.canonical_to_ras, np.float64) @ ivd.sample_to_canonical
