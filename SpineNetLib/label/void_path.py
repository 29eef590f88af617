"""The darkest stretch along a chain of bodies: a signal void, where metal (screws, a cage, a disc prosthesis)
leaves no signal (issue 10; ``label/signal_void.py`` says how it was measured, what it does to the levels and
the review).

Apart from ``signal_void`` so that the labelling can leave a void's spaces out of the spaces where it counts a
missed body (``labelling.skips_across_gaps``) without importing the review rules, which import the labelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan

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
    :data:`VOID_SHARE_OF_MARROW` of their marrow (``signal_void``'s docstring), of length 0 where none is; None with
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


def pairs_in_a_void(scan: Scan, vertebrae: Sequence[Vertebra]) -> frozenset[int]:
    """Positions ``k`` of a chain (top to bottom) whose step from body ``k - 1`` runs through a void of
    :data:`VOID_MIN_MM` or more (:func:`void_along_chain`): the bodies on each side of it lie at the void or
    in it.  A space there is no sign of a body missed or collapsed: the void's edges cut the outlines short,
    which opens the space (``benchmarks/acquisition_variants.py``, ``metal_l4_l5``; MODEL_CARD.md, "A collapsed
    vertebra")."""
    void = void_along_chain(scan, vertebrae)
    if void is None or void.length_mm < VOID_MIN_MM:
        return frozenset()
    return frozenset(range(max(void.upper_index + 1, 1), min(void.lower_index, len(vertebrae) - 1) + 1))
