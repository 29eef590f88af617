"""Level labelling of detected vertebral bodies (paper §3.2, official §5.4-5.5).

Stages, each a pure function so that it can be tested and re-run on its own:

1. :func:`extract_vertebra_volume` cuts a straightened 224x224x16 volume
   around each vertebral body (official §5.4).
2. :func:`appearance_probabilities` runs the appearance network on them and
   turns its logits into softmax(logits / 10) (official §3.2, §5.5, §11.6).
3. :func:`build_height_map` paints those 24-vectors into a 1-row-per-mm
   "label image" of the whole scan height, :func:`context_probabilities`
   runs the context network on it and reads each vertebra's row back
   (official §3.3, §5.5).
4. :func:`beam_search` finds the most likely top-to-bottom level sequence
   under the official ordering penalties (across a gap that holds a missed body a level may be skipped
   freely, or must be: :func:`skips_across_gaps`; not official), and :func:`assign_level_names`
   applies the S2 rule (official §5.5).

:func:`label_vertebrae` chains them; :func:`relabel_with_correction` re-runs
only the beam search when a user pins one vertebra to a level.

Deliberate differences from the official code (all documented at the place
they happen): the straightening angle is ``atan2`` instead of the official
``tanh`` (official §11.4); crops that leave the image are zero-padded on every
side instead of giving an all-zero volume for a negative x start; anisotropic
pixels are handled in a square-pixel frame; rotation, crop and in-plane
resize are done as one bicubic resampling of only the crop region instead of
warping every slice of the whole scan per vertebra.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVELS, N_LEVELS, is_level_name, level_index
from SpineNetLib.core.resample import bicubic_resize, bicubic_sample
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.label.appearance_slices import SliceRun, appearance_slice_runs, slices_seen
from SpineNetLib.label.gaps import SkipsAcrossGaps, gaps_holding_a_body
from SpineNetLib.label.void_path import pairs_in_a_void
from SpineNetLib.models.inference import network_outputs, softmax

#: Probabilities are floored here before -ln so that a zero never gives inf
#: (-ln(1e-300) ~ 691: more than a skip, less than an ascending penalty).
_P_FLOOR = 1e-300


@dataclass
class LabellingParams:
    """Numbers of the official labelling stage (official §5.4-5.5, §11)."""

    #: Softmax temperature for the appearance and the context logits (official §11.6).
    temperature: float = 10.0
    #: In-plane size of the appearance volume (official §3.2: 224x224x16).
    crop_px: int = 224
    #: Number of sagittal slices of the appearance volume.
    crop_slices: int = 16
    #: Height-map rows are this many millimetres apart (official: 1 mm).
    height_map_row_mm: float = 1.0
    #: The height map is zero-padded to a multiple of this many rows.
    height_pad: int = 256
    #: Beam search (official §5.5).
    beam_width: int = 100
    ascending_penalty: float = 1000.0
    #: Official value 100.  A context checkpoint may carry its own value
    #: (entry ``repeat_s1_penalty``, see :func:`params_for_context`): the
    #: penalty trades off against -ln p of the whole spine being shifted by one
    #: level, so it must match how peaked that network's probabilities are.
    repeat_s1_penalty: float = 100.0
    skip_penalty: float = 100.0
    penalise_skips: bool = True
    #: Weight w of the appearance probabilities in the beam search's evidence
    #: p_ctx * p_app**w (renormalised; :func:`level_evidence`).  Official: 0, the
    #: context probabilities only (official §5.5).  A context checkpoint may
    #: carry its own value (entry ``appearance_weight``, :func:`params_for_context`).
    appearance_weight: float = 0.0
    #: The levels are flagged for review when the best labelling shifted by one level
    #: costs less than this many nats more than the chosen one (``label.confidence``;
    #: ln 9 = confidence 0.9).  Kept as a margin, not a probability: calibrated values
    #: lie where 1 / (1 + e^-margin) is 1.0 in floating point.  A context checkpoint
    #: may carry its calibrated value (entry ``min_labelling_margin_nats``).
    review_margin_nats: float = math.log(9.0)
    #: Cut the appearance volumes the official way (:func:`extract_vertebra_volume`): tanh
    #: straightening angle, crop start truncated to whole pixels, floor(3L) pixels, a crop
    #: running off the bottom or right edge cut there and stretched, a negative x start giving
    #: zeros (official §5.4, §11.4).  The ``official`` processing profile sets it.
    official_crop: bool = False
    #: Leave out a third or further S1 at the bottom (:func:`sacral_run_end`); the official
    #: code keeps them (the ``official`` processing profile).
    drop_lower_sacral_segments: bool = True
    #: Label again without the appearance of a body named S1 at the lower image edge, and keep that
    #: labelling when it differs (``pipeline._labelled_without_edge_appearance``; not official: the
    #: ``official`` processing profile turns it off).
    relabel_s1_at_image_edge: bool = True
    #: Move the chain up by one level, the weaker detection below it named S1, when the body named S1
    #: may be L5 and two bodies above it are named against their sure evidence
    #: (``pipeline._moved_up_to_weaker_s1``; not official: the ``official`` profile turns it off).
    move_up_to_weaker_s1: bool = True
    #: Let the beam search skip one level without the skip penalty across a gap between consecutive
    #: bodies that holds a missed body, and make it count one where the space between them is higher
    #: than a body (:func:`skips_across_gaps`, ``label/gaps.py``; not official: the ``official``
    #: processing profile turns it off).
    skip_across_gaps: bool = True
    #: Show the appearance network the slices centred on the spine where it lies off the middle of the
    #: slab (``label/appearance_slices.py``; not official: the ``official`` processing profile turns it off).
    centre_appearance_slices: bool = True
    #: Appearance volumes per network call (batching does not change the
    #: result: BatchNorm runs in eval mode).
    appearance_batch_size: int = 4


@dataclass
class LabellingTimings:
    """Seconds spent in each labelling step (filled by :func:`label_vertebrae`)."""

    extract_s: float = 0.0
    appearance_s: float = 0.0
    context_s: float = 0.0
    search_s: float = 0.0


# ---------------------------------------------------------------------------
# 1. Appearance volumes (official §5.4)
# ---------------------------------------------------------------------------

def _straightening(poly: np.ndarray, official: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rotation ``R`` and centre ``c`` such that ``R @ (p - c) + c`` makes the lt->rt edge horizontal.

    The official code uses ``tanh(dy/dx)`` as the angle (official §5.4, §11.4),
    a bug that is nearly harmless for small tilts; we use the correct
    ``atan2(dy, dx)`` on purpose.  The centre is the midpoint of the top edge,
    as in the official code.  ``R`` is OpenCV's rotation by +angle in image
    coordinates (y down), i.e. the one ``getRotationMatrix2D`` would build.
    """
    lt, rt = poly[3], poly[0]
    dx, dy = float(rt[0] - lt[0]), float(rt[1] - lt[1])
    if official:  # the official angle: tanh of the slope (official §11.4); tanh(+-inf) = +-1
        angle = math.tanh(dy / dx) if dx != 0 else math.copysign(1.0, dy)
    else:
        angle = math.atan2(dy, dx)
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, s], [-s, c]])
    return rotation, (lt + rt) / 2.0


def normalise_volume(volume: np.ndarray) -> np.ndarray:
    """(v - min) / (P95 + 1e-6) over the whole volume (official §5.4, quirk §11.5 kept).

    The official code divides by P95, not by P95 - min; we keep that because
    the network was trained with it.  Only where that would divide by zero
    or by a negative number (P95 <= 0: more than 95 % of the crop is zero,
    e.g. a body at the very edge of the field of view, or signed input data)
    do we divide by max - min instead, so the values stay in [0, 1] instead
    of blowing up by 1e6.  An all-constant volume becomes all zeros.
    """
    v = np.asarray(volume, np.float64)
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return np.zeros(v.shape, np.float32)
    p95 = float(np.percentile(v, 95))
    denominator = p95 + 1e-6 if p95 > 0 else hi - lo
    return ((v - lo) / denominator).astype(np.float32)


def _sample_bicubic(voxels: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
    """Bicubic samples of every slice at in-slice points (xs, ys); zero outside the image.

    Only the bounding box of the points (plus the 2-pixel bicubic support) is
    copied out of the scan.  Returns ``(S, *xs.shape)`` float64, or None when
    no sample touches the image.
    """
    height, width, n_slices = voxels.shape
    x_lo = max(int(np.floor(xs.min())) - 2, 0)
    x_hi = min(int(np.floor(xs.max())) + 3, width - 1)
    y_lo = max(int(np.floor(ys.min())) - 2, 0)
    y_hi = min(int(np.floor(ys.max())) + 3, height - 1)
    if x_lo > x_hi or y_lo > y_hi:
        return None
    region = np.ascontiguousarray(voxels[y_lo:y_hi + 1, x_lo:x_hi + 1, :].transpose(2, 0, 1),
                                  dtype=np.float64)
    # Bicubic here is the cubic-convolution kernel (a = -0.75) of OpenCV and torch.interpolate; taps
    # outside the image count as zero, which is the official zero border of the rotation, on all four sides.
    return bicubic_sample(region, xs - x_lo, ys - y_lo)


def extract_vertebra_volume(scan: Scan, vertebra: Vertebra,
                            params: LabellingParams | None = None) -> np.ndarray:
    """The straightened appearance volume of one body, ``(224, 224, 16)`` float32 [row, col, slice].

    Follows official §5.4: rotate about the midpoint of the average polygon's
    top (lt->rt) edge so that the edge is horizontal; L = max(width, height)
    of the rotated polygon; square crop of side 3L starting L above and L
    left of the rotated lt corner, so the body starts one third into the
    crop in both directions and fills the middle third along its longer
    side (a body wider than high sits in the upper half of the middle
    third); all sagittal slices; 224x224 bicubic in-plane and linear to 16 slices; normalised by
    :func:`normalise_volume`.

    Done as one resampling: each output pixel is mapped back through the
    crop and the rotation and the scan is sampled there (bicubic), so only
    the crop region is read.  Geometry is computed in a square-pixel frame
    whose pixel is the finer of the row/column spacings (as PyPI SpineNet
    does), so anisotropic pixels give an undistorted, physically square crop.
    The crop start is not truncated to an integer (the official int() moves
    it by < 1 pixel).  A degenerate or non-finite polygon gives zeros, like
    the official "on any error" path; a crop partly off the image is
    zero-padded on every side (the official code only pads the top and
    returns zeros for a negative x start - a bug we fix).
    """
    params = params or LabellingParams()
    n, m = int(params.crop_px), int(params.crop_slices)
    zeros = np.zeros((n, n, m), np.float32)
    voxels = scan.voxels
    if voxels.ndim != 3 or min(voxels.shape) == 0:
        return zeros
    poly = np.asarray(vertebra.average_polygon, np.float64)
    if poly.shape != (4, 2) or not np.all(np.isfinite(poly)):
        return zeros
    row_mm, col_mm = float(scan.spacing_mm[0]), float(scan.spacing_mm[1])
    pixel_mm = min(row_mm, col_mm)
    to_square = np.array([col_mm / pixel_mm, row_mm / pixel_mm])  # (x, y) -> square-pixel frame
    square = poly * to_square
    rotation, centre = _straightening(square, params.official_crop)
    rotated = (square - centre) @ rotation.T + centre
    side = float(max(np.ptp(rotated[:, 0]), np.ptp(rotated[:, 1])))
    if not side > 0:
        return zeros
    if params.official_crop:
        planes = _official_crop_planes(voxels, rotated[3], side, rotation, centre, to_square, n)
        if planes is None:
            return zeros
        return normalise_volume(_resample_slices(planes, m).transpose(1, 2, 0))
    # Crop pixels k = 0 .. 3L-1 are centred at (lt - L + k); the crop's outer
    # edge is half a pixel before the first centre.  align_corners=False
    # resizing samples output pixel j at edge + (j + 0.5) * 3L / n.
    step = 3.0 * side / n
    offsets = (np.arange(n) + 0.5) * step - 0.5
    u = rotated[3, 0] - side + offsets  # columns of the crop, square frame
    v = rotated[3, 1] - side + offsets  # rows of the crop
    uu, vv = np.meshgrid(u, v)  # (n, n) indexed [row, col]
    points = np.stack([uu, vv], axis=-1) - centre
    source = points @ rotation + centre  # inverse rotation (R^T) in row-vector form
    xs = source[..., 0] / to_square[0]
    ys = source[..., 1] / to_square[1]
    planes = _sample_bicubic(voxels, xs, ys)
    if planes is None:
        return zeros
    return normalise_volume(_resample_slices(planes, m).transpose(1, 2, 0))


def _resample_slices(planes: np.ndarray, m: int) -> np.ndarray:
    """``(S, n, n)`` planes to ``m`` slices: output slice k samples position k * S / m clamped to S - 1, linearly."""
    n_slices = planes.shape[0]
    positions = np.minimum(np.arange(m) * n_slices / m, n_slices - 1)
    lower = np.floor(positions).astype(int)
    upper = np.minimum(lower + 1, n_slices - 1)
    frac = (positions - lower)[:, None, None]
    return planes[lower] * (1.0 - frac) + planes[upper] * frac  # (m, n, n)


def _official_crop_planes(voxels: np.ndarray, rotated_lt: np.ndarray, side: float, rotation: np.ndarray,
                          centre: np.ndarray, to_square: np.ndarray, n: int) -> np.ndarray | None:
    """The official crop (official §5.4) of every slice, resized to ``(S, n, n)``; None for the all-zero cases.

    The official code rotates each whole slice (bicubic, zero border, same
    canvas), then slices ``[y0:y0 + k, x0:x0 + k]`` with ``x0 = int(lt_x - L)``,
    ``y0 = int(lt_y - L)``, ``k = int(3 L)``, zero rows added above for a
    negative ``y0``, and resizes the crop to n x n (bicubic, align_corners
    False).  Rows or columns beyond the canvas are simply absent, so a crop
    that runs off the bottom or right edge is stretched; a negative ``x0``
    raises in the official code, whose error path returns zeros.  The rotated
    canvas is sampled here only at the crop's whole pixels (the same values).
    """
    height, width = (np.asarray(voxels.shape[:2], np.float64) * to_square[::-1]).astype(int)
    x0, y0, k = int(rotated_lt[0] - side), int(rotated_lt[1] - side), int(3.0 * side)
    if x0 < 0 or k < 1:
        return None
    cols = np.arange(x0, min(x0 + k, width), dtype=np.float64)
    rows = np.arange(y0, min(y0 + k, height), dtype=np.float64)
    if len(cols) == 0 or len(rows) == 0:
        return None
    uu, vv = np.meshgrid(cols, rows)
    source = np.stack([uu, vv], axis=-1) - centre
    source = source @ rotation + centre
    planes = _sample_bicubic(voxels, source[..., 0] / to_square[0], source[..., 1] / to_square[1])
    if planes is None:
        return None
    planes[:, rows < 0, :] = 0.0          # the official zero rows above a negative y0
    return bicubic_resize(planes, (n, n))


# ---------------------------------------------------------------------------
# 2. Appearance network
# ---------------------------------------------------------------------------

def appearance_probabilities(volumes: np.ndarray, appearance_net: Callable, device="cpu",
                             params: LabellingParams | None = None) -> np.ndarray:
    """softmax(logits / T) of the appearance net per volume, ``(N, 24)`` float64.

    ``volumes`` is ``(N, 224, 224, 16)``; the net gets ``[B, 1, 224, 224, 16]``
    (official §3.2).  All-zero volumes (nothing extracted) are not run and get an
    all-zero vector, as in the official code (official §5.5).
    """
    params = params or LabellingParams()
    volumes = np.asarray(volumes, np.float32)
    n = len(volumes)
    probs = np.zeros((n, N_LEVELS), np.float64)
    todo = [i for i in range(n) if np.any(volumes[i])]
    if not todo:
        return probs
    batch = max(1, int(params.appearance_batch_size))
    for start in range(0, len(todo), batch):
        idx = todo[start:start + batch]
        logits = network_outputs(appearance_net, volumes[idx][:, None], device)
        probs[idx] = softmax(np.asarray(logits, np.float64).reshape(len(idx), N_LEVELS), params.temperature)
    return probs


# ---------------------------------------------------------------------------
# 3. Height map and context network (official §5.5)
# ---------------------------------------------------------------------------

def _row_scale(scan: Scan, params: LabellingParams) -> float:
    """Height-map rows per canonical image row (official: row spacing in mm per 1-mm row)."""
    return float(scan.spacing_mm[0]) / float(params.height_map_row_mm)


def _band(vertebra: Vertebra, row_scale: float) -> tuple[int, int, int]:
    """(centre row int(yc), first row, end row) of a vertebra's band in the height map."""
    ys = np.asarray(vertebra.average_polygon, np.float64)[:, 1]
    yc = float(ys.mean()) * row_scale
    half_height = float(ys.max() - ys.min()) * row_scale / 2.0
    return int(yc), int(yc) - int(half_height / 2.0), int(yc) + int(half_height / 2.0)


def height_map_shape(scan: Scan, params: LabellingParams | None = None) -> tuple[int, int]:
    """(Hpad, 24): int(H * row_mm) rows, zero-padded up to a multiple of 256."""
    params = params or LabellingParams()
    n_rows = int(scan.voxels.shape[0] * _row_scale(scan, params))
    pad = int(params.height_pad)
    return max(1, math.ceil(n_rows / pad)) * pad, N_LEVELS


def build_height_map(vertebrae: Sequence[Vertebra], probs: np.ndarray, scan: Scan,
                     params: LabellingParams | None = None) -> np.ndarray:
    """The context net's input "label image", ``(Hpad, 24)`` float32 (official §5.5).

    One row per ``height_map_row_mm`` (1 mm) of the scan height.  For each
    vertebra, in list order (later ones overwrite earlier ones), with yc =
    mean y of the average polygon in mm and w = (max y - min y) in mm / 2,
    rows [int(yc) - int(w/2), int(yc) + int(w/2)) - about the middle half of
    the body - hold its appearance vector; all other rows are 0.  The height
    is int(H * row spacing), padded with zero rows up to a multiple of 256
    (a height that already is a multiple gets no extra rows).
    """
    params = params or LabellingParams()
    probs = np.asarray(probs, np.float64)
    if probs.shape != (len(vertebrae), N_LEVELS):
        raise ValueError(f"probs must be ({len(vertebrae)}, {N_LEVELS}), got {probs.shape}")
    total_rows, _ = height_map_shape(scan, params)
    n_rows = int(scan.voxels.shape[0] * _row_scale(scan, params))
    height_map = np.zeros((total_rows, N_LEVELS), np.float32)
    scale = _row_scale(scan, params)
    for vertebra, p in zip(vertebrae, probs):
        _, first, end = _band(vertebra, scale)
        first, end = max(first, 0), min(end, n_rows)
        if end > first:
            height_map[first:end] = p
    return height_map


def height_map_rows(vertebrae: Sequence[Vertebra], scan: Scan,
                    params: LabellingParams | None = None) -> np.ndarray:
    """Height-map row int(yc) of each vertebra (official §5.5), clipped into the map; (N,) int."""
    params = params or LabellingParams()
    total_rows, _ = height_map_shape(scan, params)
    scale = _row_scale(scan, params)
    rows = np.array([_band(v, scale)[0] for v in vertebrae], dtype=int)
    return np.clip(rows, 0, total_rows - 1)


def context_probabilities(height_map: np.ndarray, context_net: Callable, rows, device="cpu",
                          params: LabellingParams | None = None) -> np.ndarray:
    """softmax(out[row] / T) of the context net run once on the height map; ``(N, 24)`` float64.

    The net gets ``[1, 1, Hpad, 24]`` and returns the same shape, raw (official §3.3).
    """
    params = params or LabellingParams()
    height_map = np.asarray(height_map, np.float32)
    rows = np.asarray(rows, dtype=int).reshape(-1)
    if len(rows) == 0:
        return np.zeros((0, N_LEVELS), np.float64)
    out = np.asarray(network_outputs(context_net, height_map[None, None], device), np.float64)
    out = out.reshape(height_map.shape)
    return softmax(out[rows], params.temperature)


# ---------------------------------------------------------------------------
# 4. Beam search and level names (official §5.5)
# ---------------------------------------------------------------------------

def _transition_penalties(params: LabellingParams) -> np.ndarray:
    """(24, 24) penalty[previous, new] for consecutive labels, top to bottom (official §5.5).

    Labels must descend (C2 = 23 at the top, S1 = 0 at the bottom):
    +ascending if new >= previous and new != S1; +repeat if both are S1;
    +skip if |new - previous| > 1 (when skips are penalised).  They add up.
    """
    previous = np.arange(N_LEVELS)[:, None]
    new = np.arange(N_LEVELS)[None, :]
    penalty = np.where((new >= previous) & (new != 0), float(params.ascending_penalty), 0.0)
    penalty = penalty + np.where((new == 0) & (previous == 0), float(params.repeat_s1_penalty), 0.0)
    if params.penalise_skips:
        penalty = penalty + np.where(np.abs(new - previous) > 1, float(params.skip_penalty), 0.0)
    return penalty


def skips_across_gaps(vertebrae: Sequence[Vertebra], params: LabellingParams | None = None,
                      in_void: frozenset[int] = frozenset()) -> SkipsAcrossGaps:
    """Where the beam search may skip one level without the skip penalty, and where it must count one, in
    the chain ``vertebrae`` (top to bottom): :func:`~SpineNetLib.label.gaps.gaps_holding_a_body`, but for
    the spaces at positions ``in_void`` (a signal void's: ``void_path.pairs_in_a_void``), with the levels
    counted where the bodies' levels put them (:func:`counted_across_wide_spaces`; none before the bodies
    are labelled); nothing when ``params.skip_across_gaps`` is off.

    Why (issue 10): the official search charges a skip as much as a wrong level on a sure body, so a
    body missed in the middle of a chain anchored at S1 named every body above the gap one level too
    low (two of the 133 training-side scans).  The gap is evidence of its own; across it the
    probabilities alone decide whether a level is skipped."""
    if not (params or LabellingParams()).skip_across_gaps:
        return SkipsAcrossGaps()
    found = gaps_holding_a_body(vertebrae)
    found = replace(found, wide_spaces=found.wide_spaces - in_void)
    if not all(is_level_name(v.level) for v in vertebrae):
        return found
    indices = [level_index(v.level) for v in vertebrae]      # S2 counts as S1
    return replace(found, counted=counted_across_wide_spaces(indices, found))


def counted_across_wide_spaces(indices: Sequence[int], skips: SkipsAcrossGaps) -> frozenset[int]:
    """The positions of ``skips.wide_spaces`` where a level is counted, given a labelling ``indices`` (class
    indices, top to bottom) of the chain: those whose lower body it names L5 or higher, where it reaches S1.

    Why (issue 10): above L1 a missed T11 or T12 keeps the centre step under its bar, and the networks'
    evidence for the bodies above it counts on from the bodies below (tianchi_176: its T10 reads T12 at
    0.998, above the real T12), so skipping freely never happens there; a missed collapsed body (a compression
    fracture, most often at T12-L1) does the same anywhere, its space under a body high
    (``gaps.COLLAPSED_BODY_SPACE_RATIO``).  Only where the chain reaches S1: without it nothing tells which side
    of the space is named right (a thoracolumbar field of view ending at L2).  Not above S1: no level lies
    between L5 and S1 (MODEL_CARD.md, "A level counted where a body was missed", "A collapsed vertebra")."""
    if 0 not in indices:
        return frozenset()
    return frozenset(k for k in skips.wide_spaces if indices[k] > 0)


def _penalty_tables(params: LabellingParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(:func:`_transition_penalties`, the same with a downward skip of one level free, and that with a
    downward step of one charged the skip penalty): the penalties of a step elsewhere, across a gap where
    a skip is free and across one where a level is counted, indexed by ``skips.table(k)``
    (:func:`skips_across_gaps`)."""
    penalty = _transition_penalties(params)
    if not params.penalise_skips:
        return penalty, penalty, penalty
    previous, new = np.arange(N_LEVELS)[:, None], np.arange(N_LEVELS)[None, :]
    free = penalty - np.where(previous - new == 2, float(params.skip_penalty), 0.0)
    return penalty, free, free + np.where(previous - new == 1, float(params.skip_penalty), 0.0)


def _label_costs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[1] != N_LEVELS:
        raise ValueError(f"probabilities must be (N, {N_LEVELS}), got {p.shape}")
    return -np.log(np.maximum(p, _P_FLOOR))


def sequence_cost(indices: Sequence[int], probs: np.ndarray,
                  params: LabellingParams | None = None, skips: SkipsAcrossGaps = SkipsAcrossGaps()) -> float:
    """Beam-search score of one labelling: 1 + sum(-ln p) + penalties (lower is better); ``skips``
    as in :func:`beam_search`."""
    params = params or LabellingParams()
    costs = _label_costs(probs)
    penalties = _penalty_tables(params)
    labels = [int(i) for i in indices]
    score = 1.0 + float(sum(costs[k, c] for k, c in enumerate(labels)))
    score += float(sum(penalties[skips.table(k)][labels[k - 1], labels[k]] for k in range(1, len(labels))))
    return score


def beam_search(probs: np.ndarray, params: LabellingParams | None = None,
                fixed: dict[int, int] | None = None, skips: SkipsAcrossGaps = SkipsAcrossGaps()) -> list[int]:
    """Most likely class index per vertebra (top to bottom) under the ordering penalties.

    Official algorithm (official §5.5): beam of 100, score starts at 1.0, adds
    -ln p(label) (p floored at 1e-300) and the transition penalties of
    :func:`_transition_penalties`; lowest score wins.  Ties keep the earlier
    beam, then the lower class index (stable sort).  ``fixed`` maps a
    vertebra index to the only class it may take (a user correction); the
    other vertebrae are re-solved around it with the same costs.  ``skips``: positions ``k``
    whose step from vertebra ``k - 1`` may skip one level without the skip penalty, or must
    (:func:`skips_across_gaps`; not official).
    """
    params = params or LabellingParams()
    costs = _label_costs(probs)
    n = len(costs)
    if n == 0:
        return []
    allowed = np.ones((n, N_LEVELS), bool)
    for k, c in (fixed or {}).items():
        if not (0 <= int(k) < n and 0 <= int(c) < N_LEVELS):
            raise InputError(f"cannot fix vertebra {k} to class {c}: there are {n} vertebrae "
                             f"and {N_LEVELS} classes")
        allowed[int(k)] = False
        allowed[int(k), int(c)] = True
    costs = np.where(allowed, costs, np.inf)
    penalties = _penalty_tables(params)
    width = max(1, int(params.beam_width))

    def keep_best(candidates: np.ndarray) -> np.ndarray:
        order = np.argsort(candidates, kind="stable")[:width]
        return order[np.isfinite(candidates[order])]

    first = 1.0 + costs[0]
    best = keep_best(first)
    scores, history = first[best], best[:, None]
    for k in range(1, n):
        candidates = (scores[:, None] + costs[k][None, :] + penalties[skips.table(k)][history[:, -1]]).ravel()
        best = keep_best(candidates)
        beam, label = np.divmod(best, N_LEVELS)
        scores = candidates[best]
        history = np.concatenate([history[beam], label[:, None]], axis=1)
    return [int(c) for c in history[0]]


def level_evidence(context: np.ndarray, appearance: np.ndarray, appearance_weight: float) -> np.ndarray:
    """What the beam search weighs: p_ctx * p_app**w per vertebra, renormalised; ``(N, 24)``.

    Why (issue 10): on clinical slices the appearance net is most reliable
    exactly where the context net is not, at the lumbosacral junction (the
    body sitting on the sacrum looks like L5 with p ~ 1), while the context
    net, seeing a run of upper bodies one level off, can call that body S1
    and shift the whole spine.  With w = 0 this is the context probabilities
    (official).  An all-zero appearance row (no volume could be cut) counts
    as uniform, so it leaves the context probabilities unchanged.
    """
    context = np.asarray(context, np.float64)
    w = float(appearance_weight)
    if w == 0.0 or len(context) == 0:
        return context.copy()
    appearance = np.asarray(appearance, np.float64)
    missing = ~np.any(appearance > 0, axis=1)
    log_app = np.log(np.maximum(appearance, 1e-12))
    log_app[missing] = 0.0
    log_p = np.log(np.maximum(context, _P_FLOOR)) + w * log_app
    log_p -= log_p.max(axis=1, keepdims=True)
    p = np.exp(log_p)
    return p / p.sum(axis=1, keepdims=True)


#: Checkpoint entries of a context network that set labelling numbers (``params_for_context``).
CONTEXT_CHECKPOINT_PARAMS = {"repeat_s1_penalty": "repeat_s1_penalty", "appearance_weight": "appearance_weight",
                             "min_labelling_margin_nats": "review_margin_nats"}


def params_for_context(context_net, params: LabellingParams | None = None) -> LabellingParams:
    """``params`` (default: the official ones) with the context checkpoint's own labelling numbers.

    The bundled context network is much less confident than the official one
    (its probabilities are less peaked), so with the official penalty of 100
    for a second S1 the beam search prefers shifting every level of the spine
    up by one to naming a detected first sacral segment S2; its checkpoint
    therefore records the penalty chosen for it, and also the appearance
    weight of :func:`level_evidence` and the review threshold of
    ``label.confidence`` (:data:`CONTEXT_CHECKPOINT_PARAMS`, MODEL_CARD.md).
    Explicit ``params`` are returned unchanged.
    """
    if params is not None:
        return params
    values = {name: _checkpoint_number(context_net, entry) for entry, name in CONTEXT_CHECKPOINT_PARAMS.items()}
    return LabellingParams(**{name: value for name, value in values.items() if value is not None})


def calibrated_review_margin(context_net) -> float | None:
    """The review margin (nats) that the context checkpoint records as calibrated for its weights; None
    when it records none (the official weights: their review margin is the default, not calibrated)."""
    return _checkpoint_number(context_net, "min_labelling_margin_nats")


def _checkpoint_number(context_net, entry: str) -> float | None:
    """A finite number >= 0 recorded in the context checkpoint under ``entry``, else None."""
    value = (getattr(context_net, "checkpoint_meta", None) or {}).get(entry)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def sacral_run_end(indices: Sequence[int]) -> int:
    """Number of vertebrae (top to bottom) to keep: a bottom run of S1s is cut after two.

    The official S2 rule (:func:`assign_level_names`) names a second S1 at
    the bottom "S2".  A detector may also find lower fused sacral segments;
    when the search calls three or more bodies at the bottom S1, the ones
    after the second are sacral segments below S2, which are not vertebral
    levels SpineNet reports, and are dropped.
    """
    labels = [int(i) for i in indices]
    n = len(labels)
    first = n
    while first > 0 and labels[first - 1] == 0:
        first -= 1
    return min(n, first + 2) if n - first >= 3 else n


def assign_level_names(indices: Sequence[int]) -> list[str]:
    """Level names of class indices with the official S2 rule (official §5.5).

    If the last two are both S1 the last becomes "S2"; then, if the first two
    are (still) both S1, the first becomes "S2".  Applied in this order on
    the names, as the official code does, so [S1, S1] gives [S1, S2].
    """
    names = [LEVELS[int(i)] for i in indices]
    if len(names) >= 2 and names[-1] == "S1" and names[-2] == "S1":
        names[-1] = "S2"
    if len(names) >= 2 and names[0] == "S1" and names[1] == "S1":
        names[0] = "S2"
    return names


# ---------------------------------------------------------------------------
# Whole stage
# ---------------------------------------------------------------------------

def _mean_y(vertebra: Vertebra) -> float:
    return float(np.mean(np.asarray(vertebra.average_polygon, np.float64)[:, 1]))


def choose_levels(context: np.ndarray, appearance: np.ndarray,
                  params: LabellingParams, skips: SkipsAcrossGaps = SkipsAcrossGaps()) -> tuple[list[str], np.ndarray]:
    """(level names of the vertebrae kept, top to bottom; the ``(N, 24)`` evidence the beam weighed).

    :func:`level_evidence` and :func:`beam_search` (with ``skips``); where that labelling counts a level
    across a wide space (:func:`counted_across_wide_spaces`), the search again with the level counted
    there and every body from the lowest such space down kept at its level.  Then lower sacral segments
    left out (:func:`sacral_run_end`, unless ``params.drop_lower_sacral_segments`` is off) and the S2 rule
    (:func:`assign_level_names`).
    """
    evidence = level_evidence(context, appearance, params.appearance_weight)
    skips = replace(skips, counted=frozenset())     # where a level is counted, this labelling says
    indices = beam_search(evidence, params, skips=skips)
    counted = counted_across_wide_spaces(indices, skips)
    if counted:
        kept = {k: indices[k] for k in range(max(counted), len(indices))}
        indices = beam_search(evidence, params, kept, replace(skips, counted=counted))
    keep = sacral_run_end(indices) if params.drop_lower_sacral_segments else len(indices)
    return assign_level_names(indices[:keep]), evidence


def _appearance_known(vertebra: Vertebra, labelled_before: Sequence[Vertebra], seen: SliceRun) -> np.ndarray | None:
    """The appearance probabilities an earlier labelling computed for this very body seen on the same
    slices ``seen``, or None."""
    for before in labelled_before:
        if before.appearance_probabilities is not None and list(before.slices) == list(vertebra.slices) \
                and before.appearance_slices == seen \
                and len(before.polygons) == len(vertebra.polygons) \
                and all(np.array_equal(a, b) for a, b in zip(before.polygons, vertebra.polygons)):
            return np.asarray(before.appearance_probabilities, np.float64)
    return None


def label_vertebrae(scan: Scan, vertebrae: Sequence[Vertebra], appearance_net: Callable,
                    context_net: Callable, params: LabellingParams | None = None, device="cpu",
                    progress: Callable[[int, int, str], None] | None = None,
                    timings: LabellingTimings | None = None,
                    labelled_before: Sequence[Vertebra] = ()) -> list[Vertebra]:
    """New, labelled copies of ``vertebrae``, top to bottom; the argument is left as it was.

    The copies are sorted by the mean y of the average polygons, as the
    official code does (a no-op for detector output), and lower sacral
    segments (a third or further S1 at the bottom, :func:`sacral_run_end`)
    are left out.  Each copy has ``.level`` (name, with the S2 rule),
    ``.level_probabilities`` (what the beam search weighed: the context
    probabilities, times the appearance ones when ``appearance_weight`` > 0,
    :func:`level_evidence`; kept for :func:`relabel_with_correction`) and
    ``.appearance_probabilities`` with the slices it was seen on (``.appearance_slices``,
    :mod:`SpineNetLib.label.appearance_slices`).  ``progress(done, total, message)`` is
    called once per vertebra volume and per network; ``timings``, when
    given, receives the seconds per step.  A body of ``labelled_before`` (the
    output of an earlier call on the same scan and parameters) keeps its
    appearance probabilities instead of being run again where it is seen on the
    same slices: they depend on its own crop only, so labelling again with a few
    bodies added (``pipeline.detect_and_label``) costs the new bodies only.
    """
    params = params or LabellingParams()
    ordered = sorted(vertebrae, key=_mean_y)
    if not ordered:
        return []
    timings = timings if timings is not None else LabellingTimings()
    n = len(ordered)
    total = n + 3
    report = progress or (lambda done, total, message: None)

    appearance = np.zeros((n, N_LEVELS), np.float64)
    seen = (appearance_slice_runs(ordered, scan.voxels.shape[2], float(scan.spacing_mm[2]))
            if params.centre_appearance_slices else [None] * n)
    known = [_appearance_known(vertebra, labelled_before, run) for vertebra, run in zip(ordered, seen)]
    todo = [i for i in range(n) if known[i] is None]
    start = time.perf_counter()
    volumes = np.empty((len(todo), params.crop_px, params.crop_px, params.crop_slices), np.float32)
    for k, i in enumerate(todo):
        volumes[k] = extract_vertebra_volume(slices_seen(scan, seen[i]), ordered[i], params)
        report(i + 1, total, "extracting vertebra volumes")
    timings.extract_s = time.perf_counter() - start

    start = time.perf_counter()
    appearance[todo] = appearance_probabilities(volumes, appearance_net, device, params)
    for i, probabilities in enumerate(known):
        if probabilities is not None:
            appearance[i] = probabilities
    del volumes
    timings.appearance_s = time.perf_counter() - start
    report(n + 1, total, "appearance network")

    start = time.perf_counter()
    height_map = build_height_map(ordered, appearance, scan, params)
    rows = height_map_rows(ordered, scan, params)
    context = context_probabilities(height_map, context_net, rows, device, params)
    timings.context_s = time.perf_counter() - start
    report(n + 2, total, "context network")

    start = time.perf_counter()
    in_void = pairs_in_a_void(scan, ordered) if params.skip_across_gaps else frozenset()
    names, evidence = choose_levels(context, appearance, params, skips_across_gaps(ordered, params, in_void))
    keep = len(names)
    timings.search_s = time.perf_counter() - start
    labelled = [replace(vertebra, slices=list(vertebra.slices),
                        polygons=[np.array(p, copy=True) for p in vertebra.polygons],
                        level=name, level_probabilities=p_context.copy(),
                        appearance_probabilities=p_appearance.copy(), appearance_slices=run)
                for vertebra, name, p_context, p_appearance, run
                in zip(ordered[:keep], names, evidence, appearance, seen)]
    report(total, total, "beam search")
    return labelled


def relabel_with_correction(vertebrae: list[Vertebra], index: int, level_name: str,
                            params: LabellingParams | None = None) -> list[Vertebra]:
    """Pin vertebra ``index`` (top to bottom) to ``level_name`` and re-solve the others.

    Re-runs only the beam search on the stored ``.level_probabilities`` with
    that vertebra fixed; the others move only where their probabilities allow
    (on near-certain ones it may keep them and name two bodies alike).  The
    pipeline uses it where the evidence should decide
    (``pipeline._moved_up_to_weaker_s1``); a user's correction shifts the whole
    chain instead (``core.levels.shifted_to_correction``).  "S2" is searched as
    class S1 and named "S2"; since S2 lies directly
    below S1, the vertebra above it is then pinned to S1 too (otherwise the
    repeated-S1 penalty would push it to L5).  Updates ``.level`` in place
    and returns the same list.
    """
    params = params or LabellingParams()
    n = len(vertebrae)
    if n == 0:
        raise InputError("there are no vertebrae to relabel")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise InputError(f"vertebra index {index!r} is out of range (0 to {n - 1})")
    index = int(index)
    if not is_level_name(level_name):
        raise InputError(f"unknown level {level_name!r} (use C2..C7, T1..T12, L1..L5, S1 or S2)")
    if any(v.level_probabilities is None for v in vertebrae):
        raise InputError("the vertebrae have no level probabilities yet: run the labelling first")
    probs = np.stack([np.asarray(v.level_probabilities, np.float64) for v in vertebrae])
    fixed = {index: level_index(level_name)}
    if level_name == "S2" and index > 0:
        fixed[index - 1] = level_index("S1")
    names = assign_level_names(beam_search(probs, params, fixed, skips_across_gaps(vertebrae, params)))
    names[index] = level_name
    if level_name == "S2" and index > 0:
        names[index - 1] = "S1"
    for vertebra, name in zip(vertebrae, names):
        vertebra.level = name
    return vertebrae
