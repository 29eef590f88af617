"""S1's outline from a second, small detector trained on wedge-shaped S1 targets.

The bundled detector finds S1 well enough to anchor the levels, but its S1 outline reaches into
the L5-S1 disc on about three scans in five (the disc's radiologist point falls inside S1's
outline on 33 of 55 held-out scans, bundled MODEL_CARD.md, "S1's outline"), which makes the
L5-S1 disc look thin and cuts its volume from the wrong place.  Detectors trained on S1 targets
that follow the sacrum's wedge shape (``spinenet train tianchi-targets --s1-construction wedge``)
draw that outline much better, but whether they name the levels as well is not settled: one training
run differs from the next as much as the two kinds of targets do (MODEL_CARD.md, "Three draws of each
recipe").  So the second detector does not name levels.  Mainly, the outline of the body that the
labelled chain already calls S1 is replaced, slice by slice, by the outline of the second detector's
body that overlaps it most (:func:`refine_s1_outline`); which bodies there are, and their levels, never
change.  Besides, where the chain still ends above S1 (at L1-L5) after every other search, its bodies
(:func:`bodies_clear_of_the_lower_edge`) are the last place the bodies down to S1 are looked for, and
they are added only if the labelling names them the next levels down to S1 and keeps every other level
(``pipeline._s1_from_second_detector``; MODEL_CARD.md, "S1 below an L5 from the second detector").

Pure functions over a :class:`Scan`, the labelled vertebrae and a detector ``predict`` function.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import numpy as np

from SpineNetLib.core.polygons import iou
from SpineNetLib.core.results import OUTLINE_FROM_S1_DETECTOR, DetectionResult, Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.detect.vfr import DetectionParams, PatchBox, Predictor, detect_vertebrae, slice_plan

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
    """``body`` (its slices, level and probabilities) with ``other``'s polygon on every slice both share,
    its outline now the second detector's (``Vertebra.outline_from``)."""
    polygons = [np.array(other.polygon_on(s) if other.polygon_on(s) is not None else p, dtype=float, copy=True)
                for s, p in zip(body.slices, body.polygons)]
    return replace(body, slices=list(body.slices), polygons=polygons, outline_from=OUTLINE_FROM_S1_DETECTOR)


#: How far (mm) around the labelled S1 the second detector looks: the plan's patches reaching no
#: closer to S1's outline than this are not run (:func:`patches_near`).  With 5 mm, S1's outline came out
#: identical to the whole plan's on all 185 validation scans with an S1 (patches were left out on 5 of
#: the 62 held-out scans that ran the stage; MODEL_CARD.md, "S1's outline"), and the stage took 0.56
#: instead of 0.96 s on chu_02, whose S1 lies in the lower two of its four patches.
SEARCH_MARGIN_MM = 5.0


def patches_near(body: Vertebra, shape_hw: tuple[int, int], spacing_rc: tuple[float, float],
                 params: DetectionParams) -> list[PatchBox] | None:
    """The boxes of one slice's plan (:func:`~SpineNetLib.detect.plans.slice_plan`) that overlap ``body``'s
    bounding box over all its slices grown by :data:`SEARCH_MARGIN_MM`; None when that is all of them (or
    the plan is one whole slice).

    Each patch is normalised on its own, so the patches kept give exactly the outputs they give in
    the whole plan; what the others add lies away from S1."""
    plan, _ = slice_plan(shape_hw, spacing_rc, params)
    corners = np.concatenate([np.asarray(p, dtype=float) for p in body.polygons])
    grow_x, grow_y = SEARCH_MARGIN_MM / float(spacing_rc[1]), SEARCH_MARGIN_MM / float(spacing_rc[0])
    (x_lo, y_lo), (x_hi, y_hi) = corners.min(axis=0), corners.max(axis=0)
    near = [b for b in plan if b.x0 <= x_hi + grow_x and b.x1 > x_lo - grow_x
            and b.y0 <= y_hi + grow_y and b.y1 > y_lo - grow_y]
    return near if 0 < len(near) < len(plan) else None


def bodies_on_slices(scan: Scan, body: Vertebra, predict: Predictor, params: DetectionParams) -> list[Vertebra]:
    """Every body that ``predict`` finds near ``body`` on the run of its slices (``min .. max``) of
    ``scan``, in the scan's own slice numbers: full-strength detections, weaker candidates and faint
    detections below each slice's lowest body (``DetectionParams.candidate_threshold``,
    ``faint_threshold``), as the main detector's S1 is looked for.

    Only those slices, and only the plan's patches near ``body`` (:func:`patches_near`), are detected:
    the detector normalises each frame on its own, so they come out as they would from the whole scan."""
    found, first = _detection_on_slices(scan, body, predict, params)
    return _in_scan_slices((*found.vertebrae, *found.candidates, *found.faint_candidates), first)


def _detection_on_slices(scan: Scan, body: Vertebra, predict: Predictor,
                         params: DetectionParams) -> tuple[DetectionResult, int]:
    """(:func:`bodies_on_slices`' detection, in slice numbers from ``body``'s first slice; that slice)."""
    first, last = int(min(body.slices)), int(max(body.slices))
    part = replace(scan, voxels=scan.voxels[:, :, first:last + 1])
    spacing_rc = (float(scan.spacing_mm[0]), float(scan.spacing_mm[1]))
    plan = patches_near(body, part.voxels.shape[:2], spacing_rc, params)
    return detect_vertebrae(part, predict, params, plan=plan), first


def _in_scan_slices(bodies: Sequence[Vertebra], first: int) -> list[Vertebra]:
    return [replace(v, slices=[s + first for s in v.slices]) for v in bodies]


def bodies_clear_of_the_lower_edge(scan: Scan, predict: Predictor, params: DetectionParams) -> list[Vertebra]:
    """Every body ``predict``'s detector finds on ``scan`` (full-strength, weaker and faint) but those
    reaching the image's last row: cut by its lower edge, such a body cannot be told from an L5 cut
    there (``label/confidence.s1_cut_by_lower_edge``).  Where the labelled chain still ends at L5,
    these are the last place S1 is looked for (``pipeline._s1_from_second_detector``)."""
    found = detect_vertebrae(scan, predict, params)
    last_row = scan.voxels.shape[0] - 1
    bodies = (*found.vertebrae, *found.candidates, *found.faint_candidates)
    return [replace(v, outline_from=OUTLINE_FROM_S1_DETECTOR) for v in bodies
            if max(float(np.max(np.asarray(p)[:, 1])) for p in v.polygons) < last_row]


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
    found, first = _detection_on_slices(scan, vertebrae[at], predict, params)
    match = best_match(vertebrae[at], _in_scan_slices((*found.vertebrae, *found.candidates), first))
    if match is None:
        # The faint detections only where no stronger one overlaps S1 enough: decoding them took 0.09-0.14
        # s on the benchmark scans, and beside a match the second best body never overlapped S1 by more
        # than 0.17 (MIN_OVERLAP_IOU), so a faint one could not have been the better match there.
        match = best_match(vertebrae[at], _in_scan_slices(found.faint_candidates, first))
    if match is None:
        return vertebrae, False
    vertebrae[at] = with_outline_of(vertebrae[at], match)
    return vertebrae, True


def refine_s1_outline(scan: Scan, result: DetectionResult, predict: Predictor,
                      params: DetectionParams | None) -> None:
    """:func:`refined_s1_outline` on a labelled detection ``result``, in place: its vertebrae,
    ``labelling["s1_outline_from_second_detector"]`` and ``timings_s["s1_outline"]``.

    Skipped (the entry left out) where the bodies were found at another multiple of the header's pixel
    spacing (``labelling["pixel_spacing_factor"]``): the second detector would see other pixels.  Not run
    again where S1 is the body the second detector already added (:func:`s1_added_by_second_detector`).
    """
    start = time.perf_counter()
    if s1_added_by_second_detector(result.labelling):
        result.labelling["s1_outline_from_second_detector"] = True
    elif result.labelling.get("pixel_spacing_factor", 1.0) == 1.0:
        result.vertebrae, refined = refined_s1_outline(scan, result.vertebrae, predict, params or DetectionParams())
        result.labelling["s1_outline_from_second_detector"] = refined
    result.timings_s["s1_outline"] = time.perf_counter() - start


def s1_added_by_second_detector(labelling: dict) -> bool:
    """Whether the body named S1 is one the second detector added below the chain
    (``pipeline._s1_from_second_detector``) and no later step named another body S1 (the relabelling of
    an S1 at the image edge, the move up to a weaker S1): its outline is then already the second
    detector's, from the whole scan, and detecting its slices again would give it back."""
    return (bool(labelling.get("s1_from_second_detector")) and not labelling.get("s1_at_image_edge_relabelled")
            and not labelling.get("moved_up_to_weaker_s1"))
