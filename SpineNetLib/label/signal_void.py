"""A signal void on the spine's path, where the levels cannot be counted (issue 10).

Metal in the spine (pedicle screws, an interbody cage, a disc prosthesis) leaves a region with no signal
that can hide a whole body or two.  The chain the detector finds then ends at the void or runs across it
with bodies missing, and the bodies are named as if none were missing: with a void drawn over the L4-L5
disc and half of each body (``benchmarks/acquisition_variants.py``, row ``metal_l4_l5``), 27 of the 68
held-out scans came out with wrongly named bodies, 6 of them not flagged (MODEL_CARD.md, "Metal in the
spine").  No real scan here holds metal, so that row stands in for one.

:func:`void_along_chain` follows the path through the centres of the chain's bodies (each on its own mid
slice), on to :data:`BEYOND_ENDS_STEPS` usual steps beyond the first and last bodies, and finds its longest
stretch whose local median is darker than :data:`VOID_SHARE_OF_MARROW` of the marrow (the median of the
local medians at the bodies' centres).  A stretch of :data:`VOID_MIN_MM` or more is a void that no disc,
endplate or collapsed body makes on the 201 real scans here, and the review rule asks about it
(:func:`ask_for_review_over_a_void`).  Where the void lies right above the body named S1, the bodies it hides
are counted from the way across it and the levels above it moved up (:func:`levels_counted_across_a_void`;
under the row, 50 of the 68 held-out scans then keep every level right, 41 before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from SpineNetLib.core.levels import LEVELS, is_level_name, level_index
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.label.confidence import LabellingConfidence, ask_for_review
from SpineNetLib.label.gaps import gap_ratios

#: Darker than this share of the marrow is no signal (the pile-up and distortion of real metal aside, a void
#: is as dark as the air outside the body).
VOID_SHARE_OF_MARROW = 0.10
#: A dark stretch this long or longer (mm along the path) is a void.  Chosen on the 133 training-side scans:
#: as acquired their longest dark stretch is 7.1 mm (tianchi_120), and under the ``metal_l4_l5`` row each of
#: the 4 runs with a wrongly named body and no review flag has one of 12 mm or more; the 68 held-out scans'
#: longest is 5.3 mm (MODEL_CARD.md, "Metal in the spine").
VOID_MIN_MM = 12.0
#: How far the path goes on beyond the chain's first and last bodies, in usual steps (the median step
#: between consecutive centres): into a void that hides the bodies below a chain's end.  A whole step
#: reaches the black border above tianchi_200's field of view (17.3 mm dark) and catches no wrong run of the
#: training side's ``metal_l4_l5`` row that was not flagged already.
BEYOND_ENDS_STEPS = 0.5
#: Half the side of the square whose median is the path's local intensity (mm): wider than an endplate.
LOCAL_HALF_SIDE_MM = 4.0


@dataclass
class VoidRun:
    """The longest dark stretch along a chain's path (:func:`void_along_chain`)."""

    length_mm: float
    #: The level of the body above the stretch and of the body below it ("" beyond the chain's end).
    above: str
    below: str
    #: The indices (top to bottom) of the body above the stretch and of the body below it (-1 above the
    #: chain's first body, the number of bodies below its last); the bodies between them lie in the void.
    upper_index: int = -1
    lower_index: int = -1


def _path(vertebrae: Sequence[Vertebra]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The path's points (pixel x, y) about a pixel apart, the canonical slice each is read on (the nearer
    body's mid slice), and for each the index of the body above it (-1 above the first body); the first point
    of each segment from a body onwards is that body's centre."""
    centres = np.array([b.centroid_xy for b in vertebrae], np.float64)
    slices = np.array([b.mid_slice for b in vertebrae])
    steps = np.diff(centres, axis=0)
    beyond = BEYOND_ENDS_STEPS * float(np.median(np.hypot(*steps.T)))
    first_out = centres[0] - steps[0] / max(float(np.hypot(*steps[0])), 1e-6) * beyond
    last_out = centres[-1] + steps[-1] / max(float(np.hypot(*steps[-1])), 1e-6) * beyond
    knots = np.vstack([first_out, centres, last_out])
    knot_slices = np.concatenate([[slices[0]], slices, [slices[-1]]])
    points, point_slices, above = [], [], []
    for k in range(len(knots) - 1):
        n = max(int(np.ceil(np.hypot(*(knots[k + 1] - knots[k])))), 1)
        t = np.arange(n) / n
        points.append(knots[k] + t[:, None] * (knots[k + 1] - knots[k]))
        point_slices.append(np.where(t < 0.5, knot_slices[k], knot_slices[k + 1]))
        above.append(np.full(n, k - 1))
    return np.vstack(points), np.concatenate(point_slices), np.concatenate(above)


def _local_medians(scan: Scan, points: np.ndarray, slices: np.ndarray) -> np.ndarray:
    """The median of the square of :data:`LOCAL_HALF_SIDE_MM` about each point on its slice; NaN outside."""
    height, width, n_slices = scan.voxels.shape
    half_r = max(1, round(LOCAL_HALF_SIDE_MM / scan.spacing_mm[0]))
    half_c = max(1, round(LOCAL_HALF_SIDE_MM / scan.spacing_mm[1]))
    local = np.full(len(points), np.nan)
    for i, ((x, y), s) in enumerate(zip(points, slices)):
        r, c = int(round(y)), int(round(x))
        if 0 <= r < height and 0 <= c < width and 0 <= s < n_slices:
            local[i] = float(np.median(scan.voxels[max(r - half_r, 0):r + half_r + 1,
                                                   max(c - half_c, 0):c + half_c + 1, int(s)]))
    return local


def void_along_chain(scan: Scan, vertebrae: Sequence[Vertebra]) -> VoidRun | None:
    """The longest stretch of the path of ``vertebrae`` (detected bodies, top to bottom) darker than
    :data:`VOID_SHARE_OF_MARROW` of their marrow (module docstring), of length 0 where none is; None with
    fewer than three bodies or no marrow signal."""
    if len(vertebrae) < 3:
        return None
    points, slices, above = _path(vertebrae)
    local = _local_medians(scan, points, slices)
    at_centres = local[np.searchsorted(above, np.arange(len(vertebrae)))]   # body k's centre: the first point below it
    if not np.isfinite(at_centres).any() or np.nanmedian(at_centres) <= 0:
        return None
    marrow = float(np.nanmedian(at_centres))
    dark = np.nan_to_num(local, nan=np.inf) < VOID_SHARE_OF_MARROW * marrow   # outside the image: not dark
    along_mm = np.concatenate([[0.0], np.cumsum(np.hypot(*(np.diff(points, axis=0) * scan.spacing_mm[1::-1]).T))])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], dark.astype(np.int8), [0]])))
    runs = edges.reshape(-1, 2) - [0, 1]            # first and last point of each dark stretch
    if runs.size == 0:
        return VoidRun(0.0, "", "")
    lengths = along_mm[runs[:, 1]] - along_mm[runs[:, 0]]
    first, last = runs[int(np.argmax(lengths))]
    upper, lower = int(above[first]), int(above[last]) + 1

    def level(k: int) -> str:
        return (vertebrae[k].level or "") if 0 <= k < len(vertebrae) else ""

    return VoidRun(float(lengths.max()), level(upper), level(lower), upper, lower)


def levels_counted_across_a_void(scan: Scan, vertebrae: Sequence[Vertebra]) -> tuple[list[str], int] | None:
    """The chain's levels with the bodies a void hides counted, and how many it hides; None where that changes
    nothing.

    Where a void of :data:`VOID_MIN_MM` or more lies on a labelled chain (top to bottom) right above the body
    named S1, the way from the body above the void to S1 over the chain's usual step (``gaps.gap_ratios``),
    rounded, is the number of steps between them, and ``hidden`` bodies fewer than that were found there
    (those whose centres lie in the void count).  S1 and any body below it keep their levels; those above
    are moved up until as many levels lie between as steps.  Only up: where the labelling already left out
    as many levels or more, nothing changes.  Rounding, not the bar of a gap without a void
    (``gaps.MISSED_BODY_GAP_RATIO``, 0.65 of a step beyond the steps found): on the training side's row,
    three wrongly named runs with such a void went 0.55-0.62 of a step beyond, and the runs named right
    either less than 0.5 or more than 0.65 (model card, "Metal in the spine").

    Only right above S1, which anchors the count: where the body below the void is another, the void cuts it,
    and its outline, drawn over the part outside the void, puts its centre further from the void than the
    body's, so the step across the void reads a body too long (4 of the 7 runs it moved on the training side's
    ``metal_l4_l5`` row without this bar were named right before and wrong after, each with an L5 cut below
    the void; model card, "Metal in the spine").

    Why (issue 10): the labelling cannot see bodies under metal, and the beam search, which may skip a level
    across a gap but is not made to, named the bodies above such a void as if none were hidden (on the
    training side's ``metal_l4_l5`` row, 13 of the 40 runs with wrongly named bodies missed L5, or L4 and L5,
    above a body named S1; benchmarks/RESULTS.md, "What goes wrong under the void").  No scan of the 201 has
    a void as acquired, so this changes none of them."""
    void = void_along_chain(scan, vertebrae)
    if void is None or void.length_mm < VOID_MIN_MM or not 0 <= void.upper_index < void.lower_index < len(vertebrae):
        return None
    upper, lower = void.upper_index, void.lower_index
    names = [v.level for v in vertebrae]
    if names[lower] != "S1" or not all(is_level_name(name) for name in names):
        return None
    steps = int(np.floor(float(np.sum(gap_ratios(vertebrae)[upper:lower])) + 0.5))   # rounded, halves up
    hidden = steps - (lower - upper)
    indices = [level_index(name) for name in names]       # S1 = 0 upwards; S2 counts as S1
    move = steps - (indices[upper] - indices[lower])
    if hidden < 1 or move <= 0 or indices[0] + move >= len(LEVELS):
        return None
    return [LEVELS[i + move] for i in indices[:lower]] + names[lower:], hidden


def void_warning(void: VoidRun, hidden: int | None = None) -> str:
    """The review reason of a void: how long, where on the chain, and the bodies counted under it."""
    where = (f"between {void.above} and {void.below}" if void.above and void.below
             else f"below {void.above}" if void.above else f"above {void.below}" if void.below else "on the chain")
    if hidden:
        return (f"a signal void {void.length_mm:.0f} mm long lies on the spine {where} (metal, or an artefact): "
                f"from the way across it, it hides {hidden} vertebra{'e' if hidden > 1 else ''}, counted "
                "in the levels above it; check the count")
    return (f"a signal void {void.length_mm:.0f} mm long lies on the spine {where} (metal, or an artefact): "
            "vertebrae under it may be missed and the levels counted wrongly")


def ask_for_review_over_a_void(scan: Scan, vertebrae: Sequence[Vertebra], labelling: dict,
                               confidence: LabellingConfidence) -> None:
    """Ask for a review where :func:`void_along_chain` finds a void of :data:`VOID_MIN_MM` or more, its reason
    first; ``labelling`` (the labelling block) records it as ``signal_void``."""
    void = void_along_chain(scan, vertebrae)
    if void is None or void.length_mm < VOID_MIN_MM:
        return
    labelling["signal_void"] = {"length_mm": round(void.length_mm, 1), "between": [void.above, void.below]}
    hidden = labelling.get("levels_counted_across_void", {}).get("bodies_hidden")
    ask_for_review(confidence, void_warning(void, hidden))
