"""Bodies the detector saw but too weakly: S1 below a labelled L5, and bodies in a gap of the chain.

On clinical mid-sagittal T2 slices the detector's centroid response inside S1
is weak (median 0.38 on the 50 held-out ``tianchi/`` studies, against about 0.9
for L1-L5), so at the official threshold of 0.6 S1 was found in 1 of 50 and the
labels lost their anchor.  Detection therefore keeps what a second decoding at
a lower threshold finds apart (``DetectionParams.candidate_threshold``,
``DetectionResult.candidates``); a candidate becomes a vertebra only where
anatomy says a body must be:

* :func:`gap_fillers`, before labelling: in a gap between consecutive bodies
  wider than ``confidence.MAX_GAP_RATIO`` times the scan's usual step (the gap
  the review rule would flag), at one of the evenly spaced positions where the
  missing bodies would lie, within half a step;
* :func:`sacrum_candidate`, after labelling: when the labelled spine ends at
  L5, one L4-to-L5 step below L5, within half a step.  The pipeline labels
  again with it and keeps it only if it is named S1
  (:func:`SpineNetLib.pipeline.detect_and_label`).

Distances are between centroids of the average polygons, in millimetres.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from SpineNetLib.core.results import Vertebra
from SpineNetLib.label.confidence import MAX_GAP_RATIO

#: A candidate is taken when its centre lies within this fraction of the step between bodies from
#: where a missing body would be.
MAX_OFFSET_OF_STEP = 0.5


def _centres_mm(vertebrae: Sequence[Vertebra], spacing_rc) -> np.ndarray:
    scale = np.array([float(spacing_rc[1]), float(spacing_rc[0])])  # (x, y) pixels to mm
    return np.array([v.centroid_xy * scale for v in vertebrae]).reshape(-1, 2)


def _nearest(candidates: Sequence[Vertebra], centres: np.ndarray, expected: np.ndarray,
             radius: float, taken: set[int]) -> int | None:
    offsets = np.hypot(*(centres - expected).T) if len(centres) else np.zeros(0)
    order = [i for i in np.argsort(offsets) if offsets[i] < radius and i not in taken]
    return int(order[0]) if order else None


def gap_fillers(vertebrae: Sequence[Vertebra], candidates: Sequence[Vertebra],
                spacing_rc: tuple[float, float] = (1.0, 1.0)) -> list[Vertebra]:
    """The candidates that lie where bodies are missing inside the chain (``vertebrae`` top to bottom)."""
    if len(vertebrae) < 3 or not candidates:
        return []
    chain = _centres_mm(vertebrae, spacing_rc)
    steps = np.hypot(*np.diff(chain, axis=0).T)
    usual = float(np.median(steps))
    cand = _centres_mm(candidates, spacing_rc)
    taken: set[int] = set()
    for i, step in enumerate(steps):
        if usual <= 0 or step <= MAX_GAP_RATIO * usual:
            continue
        n_missing = max(1, int(round(step / usual)) - 1)
        for j in range(1, n_missing + 1):
            expected = chain[i] + (chain[i + 1] - chain[i]) * j / (n_missing + 1)
            found = _nearest(candidates, cand, expected, MAX_OFFSET_OF_STEP * usual, taken)
            if found is not None:
                taken.add(found)
    return [candidates[i] for i in sorted(taken)]


def sacrum_candidate(labelled: Sequence[Vertebra], candidates: Sequence[Vertebra],
                     spacing_rc: tuple[float, float] = (1.0, 1.0)) -> Vertebra | None:
    """The candidate nearest to where S1 should be below a labelled L5 (``labelled`` top to bottom), or None.

    Only used when the lowest body is L5 and the one above it L4 (which gives the step).
    """
    if len(labelled) < 2 or labelled[-1].level != "L5" or labelled[-2].level != "L4" or not candidates:
        return None
    l4, l5 = _centres_mm(labelled[-2:], spacing_rc)
    step = float(np.hypot(*(l5 - l4)))
    if step == 0:
        return None
    found = _nearest(candidates, _centres_mm(candidates, spacing_rc), 2 * l5 - l4,
                     MAX_OFFSET_OF_STEP * step, set())
    return None if found is None else candidates[found]
