"""S1's outline from a second, small detector trained on wedge-shaped S1 targets.

The bundled detector finds S1 well enough to anchor the levels, but its S1 outline reaches into
the L5-S1 disc on about three scans in five (the disc's radiologist point falls inside S1's
outline on 33 of 55 held-out scans, bundled MODEL_CARD.md, "S1's outline"), which makes the
L5-S1 disc look thin and cuts its volume from the wrong place.  Detectors trained on S1 targets
that follow the sacrum's wedge shape (``spinenet train tianchi-targets --s1-construction wedge``)
draw that outline much better, but whether they name the levels as well is not settled: one training
run differs from the next as much as the two kinds of targets do (MODEL_CARD.md, "Three draws of each
recipe").  So the second detector is used for one thing only: the outline of the body that the labelled chain
already calls S1 is replaced, slice by slice, by the outline of the second detector's body that
overlaps it most.  Which bodies there are, and their levels, never change.

Pure functions over a :class:`Scan`, the labelled vertebrae and a detector ``predict`` function.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import numpy as np

from SpineNetLib.core.polygons import iou
from SpineNetLib.core.results import DetectionResult, Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.detect.vfr import DetectionParams, Predictor, detect_vertebrae

#: The second detector's body must overlap the labelled S1 by more than this (mean intersection over
#: union over their common slices) to give S1 its outline.  With the bundled networks, on the 182 scans
#: of the model card's held-out and training sides on which a body was named S1, the best overlap had a
#: median of 0.61 (5th-95th percentile 0.38-0.77 held out, 0.33-0.80 training side) and the second best
#: never exceeded 0.17 (MODEL_CARD.md, "S1's outline").
MIN_OVERLAP_IOU = 0.3


def s1_index(vertebrae: Sequence[Vertebra]) -> int | None:
    """Index of the (first) body labelled S1, or None."""
    return next((k for k, v in enumerate(vertebrae) if v.level == "S1"), None)


def mean_overlap(body: Vertebra, other: Vertebra) -> float:
    """Mean polygon IoU of two bodies over the slices both are on (0 when they share none)."""
    common = [s for s in body.slices if other.polygon_on(s) is not None]
    if not common:
        return 0.0
    return float(np.mean([iou(body.polygon_on(s), other.polygon_on(s)) for s in common]))


def best_match(body: Vertebra, others: Sequence[Vertebra], min_iou: float = MIN_OVERLAP_IOU) -> Vertebra | None:
    """The body of ``others`` overlapping ``body`` most, if by more than ``min_iou``."""
    scored = [(mean_overlap(body, other), k) for k, other in enumerate(others)]
    best = max(scored, default=(0.0, -1))
    return others[best[1]] if best[0] > min_iou else None


def with_outline_of(body: Vertebra, other: Vertebra) -> Vertebra:
    """``body`` (its slices, level and probabilities) with ``other``'s polygon on every slice both share."""
    polygons = [np.array(other.polygon_on(s) if other.polygon_on(s) is not None else p, dtype=float, copy=True)
                for s, p in zip(body.slices, body.polygons)]
    return replace(body, slices=list(body.slices), polygons=polygons)


def bodies_on_slices(scan: Scan, slices: Sequence[int], predict: Predictor,
                     params: DetectionParams) -> list[Vertebra]:
    """Every body that ``predict`` finds on the run of slices ``min(slices) .. max(slices)`` of ``scan``, in
    the scan's own slice numbers: full-strength detections, weaker candidates and faint detections below
    each slice's lowest body (``DetectionParams.candidate_threshold``, ``faint_threshold``), as the main
    detector's S1 is looked for.

    Only those slices are detected: the detector normalises each frame on its own, so they come out
    as they would from the whole scan."""
    first, last = int(min(slices)), int(max(slices))
    part = replace(scan, voxels=scan.voxels[:, :, first:last + 1])
    found = detect_vertebrae(part, predict, params)
    bodies = (*found.vertebrae, *found.candidates, *found.faint_candidates)
    return [replace(v, slices=[s + first for s in v.slices]) for v in bodies]


def refined_s1_outline(scan: Scan, vertebrae: Sequence[Vertebra], predict: Predictor,
                       params: DetectionParams) -> tuple[list[Vertebra], bool]:
    """(the vertebrae with S1's outline from ``predict``'s detector, whether it was replaced).

    Nothing changes when no body is labelled S1 or when the second detector finds no body that
    overlaps it by more than :data:`MIN_OVERLAP_IOU`.
    """
    vertebrae = list(vertebrae)
    at = s1_index(vertebrae)
    if at is None:
        return vertebrae, False
    match = best_match(vertebrae[at], bodies_on_slices(scan, vertebrae[at].slices, predict, params))
    if match is None:
        return vertebrae, False
    vertebrae[at] = with_outline_of(vertebrae[at], match)
    return vertebrae, True


def refine_s1_outline(scan: Scan, result: DetectionResult, predict: Predictor,
                      params: DetectionParams | None) -> None:
    """:func:`refined_s1_outline` on a labelled detection ``result``, in place: its vertebrae,
    ``labelling["s1_outline_from_second_detector"]`` and ``timings_s["s1_outline"]``.

    Skipped (the entry left out) where the bodies were found at another multiple of the header's pixel
    spacing (``labelling["pixel_spacing_factor"]``): the second detector would see other pixels.
    """
    start = time.perf_counter()
    if result.labelling.get("pixel_spacing_factor", 1.0) == 1.0:
        result.vertebrae, refined = refined_s1_outline(scan, result.vertebrae, predict, params or DetectionParams())
        result.labelling["s1_outline_from_second_detector"] = refined
    result.timings_s["s1_outline"] = time.perf_counter() - start
