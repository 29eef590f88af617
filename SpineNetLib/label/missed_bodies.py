"""Bodies the detector saw but too weakly: bodies in a gap of the chain, and L5-S1 below its end.

On clinical mid-sagittal T2 slices the detector's centroid response inside S1
is weak (median 0.38 on the 50 held-out ``tianchi/`` studies, against about 0.9
for L1-L5), so at the official threshold of 0.6 S1 was found in 1 of 50 and the
labels lost their anchor.  Detection therefore keeps what a second decoding at
a lower threshold finds apart (``DetectionParams.candidate_threshold``,
``DetectionResult.candidates``); a candidate becomes a vertebra only where
anatomy says a body must be:

* :func:`gap_fillers`, before labelling: in a gap between consecutive bodies
  that holds a missed body by the centre step or by the space between the
  bodies, each measured against the chain's other pairs
  (``gaps.gaps_missing_a_body``), at one of the evenly spaced positions where
  the missing bodies would lie, within half a step (MODEL_CARD.md, "Bodies in a
  gap, found among the weaker detections");
* :func:`bodies_below`, after labelling: when the labelled spine ends above
  S1 (at L1-L5), step by step below its lowest body, down to S1; then, if the
  chain still ends above S1, among the fainter detections of a third decoding
  (``DetectionParams.faint_threshold``).  The pipeline
  labels again with them and keeps them when the bodies found before keep their
  levels, or when the lowest of those moves to a level its own appearance favours
  more (:func:`keeps_bodies_below`).  Keeping them
  whenever the networks name one of them S1 was tried on the 201 held-out and
  training cases: it mended two shifted scans (ivd_11, tianchi_142) but turned
  chu_07, whose L5 only the weaker pass finds, into a confident shift by one
  with no review flag; the appearance test keeps the mends without that
  (MODEL_CARD.md, "The body below may move the levels");
* :func:`weaker_body_below_s1`, a review check: a weaker detection where S1
  would lie if the lowest body, named S1, were L5 (MODEL_CARD.md, "Review flags").

Distances are between centroids of the average polygons, in millimetres.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from SpineNetLib.core.levels import LUMBAR, level_index
from SpineNetLib.core.results import Vertebra
from SpineNetLib.label.gaps import MIN_BODIES_TO_FIND_A_GAP, gaps_missing_a_body, level_skipped, medians_of_the_others
from SpineNetLib.label.labelling import LabellingParams, skips_across_gaps

#: A candidate is taken when its centre lies within this fraction of the step between bodies from
#: where a missing body would be.
MAX_OFFSET_OF_STEP = 0.5
#: Where S1's centre lies from L5's, in units of the L4-L5 step: (along it, across it towards
#: anterior).  S1 tilts with the lumbosacral angle, so its centre lies short of and posterior to
#: the straight continuation.  Median over the 63 training ``tianchi/`` studies whose S1 was
#: detected (``DetectionParams.candidate_threshold``; the body holding the L5 point mirrored
#: through the L5-S1 disc point), relative to the radiologist's L4 and L5 points; sd 0.13, 0.10.
S1_FROM_L5 = (0.83, -0.18)


def _centres_mm(vertebrae: Sequence[Vertebra], spacing_rc) -> np.ndarray:
    scale = np.array([float(spacing_rc[1]), float(spacing_rc[0])])  # (x, y) pixels to mm
    return np.array([v.centroid_xy * scale for v in vertebrae]).reshape(-1, 2)


def _nearest(centres: np.ndarray, expected: np.ndarray, radius: float, taken: set[int]) -> int | None:
    """Index of the centre nearest to ``expected`` within ``radius`` (mm) and not ``taken``, or None."""
    offsets = np.hypot(*(centres - expected).T) if len(centres) else np.zeros(0)
    order = [i for i in np.argsort(offsets) if offsets[i] < radius and i not in taken]
    return int(order[0]) if order else None


def gap_fillers(vertebrae: Sequence[Vertebra], candidates: Sequence[Vertebra],
                spacing_rc: tuple[float, float] = (1.0, 1.0)) -> list[Vertebra]:
    """The candidates that lie where bodies are missing inside the chain (``vertebrae`` top to bottom): in the
    gaps of :func:`gaps.gaps_missing_a_body`, at the evenly spaced places of as many bodies as the step holds
    (at least one), each within :data:`MAX_OFFSET_OF_STEP` times the median of the chain's other steps."""
    if len(vertebrae) < MIN_BODIES_TO_FIND_A_GAP or not candidates:
        return []
    chain = _centres_mm(vertebrae, spacing_rc)
    steps = np.hypot(*np.diff(chain, axis=0).T)
    cand = _centres_mm(candidates, spacing_rc)
    others = medians_of_the_others(steps)
    taken: set[int] = set()
    for i in np.flatnonzero(gaps_missing_a_body(vertebrae)):
        usual = float(others[i])
        if usual <= 0:
            continue
        n_missing = max(1, int(round(steps[i] / usual)) - 1)
        for j in range(1, n_missing + 1):
            expected = chain[i] + (chain[i + 1] - chain[i]) * j / (n_missing + 1)
            found = _nearest(cand, expected, MAX_OFFSET_OF_STEP * usual, taken)
            if found is not None:
                taken.add(found)
    return [candidates[i] for i in sorted(taken)]


def chain_ends_above_s1(labelled: Sequence[Vertebra]) -> bool:
    """Whether a labelled chain (top to bottom) of at least two bodies ends at L1-L5 (``LUMBAR``), the only chain
    :func:`bodies_below` continues."""
    return len(labelled) >= 2 and labelled[-1].level in LUMBAR


def bodies_below(labelled: Sequence[Vertebra], candidates: Sequence[Vertebra],
                 spacing_rc: tuple[float, float] = (1.0, 1.0)) -> list[Vertebra]:
    """Candidates continuing the chain below a lowest body labelled L1-L5, down to S1 at most.

    ``labelled`` is top to bottom.  Each step looks one step (that between the two lowest bodies so
    far) below the lowest (bent by :data:`S1_FROM_L5` for S1), within :data:`MAX_OFFSET_OF_STEP` of
    it, and stops where nothing is found or at S1.  Top to bottom.
    """
    if not candidates or not chain_ends_above_s1(labelled):
        return []
    chain = list(_centres_mm(labelled[-2:], spacing_rc))
    cand = _centres_mm(candidates, spacing_rc)
    taken: list[int] = []
    for level in levels_down_to_s1(labelled[-1].level):
        found = _next_below(chain[-2], chain[-1], level, cand, set(taken))
        if found is None:
            break
        taken.append(found)
        chain.append(cand[found])
    return [candidates[i] for i in taken]


def _next_below(upper: np.ndarray, lowest: np.ndarray, level: str, cand: np.ndarray, taken: set[int]) -> int | None:
    """Index of the candidate centre where the body ``level`` would lie below the chain's two lowest
    centres ``upper`` and ``lowest`` (one step on, bent by :data:`S1_FROM_L5` for S1), or None."""
    step = lowest - upper
    length = float(np.hypot(*step))
    if length == 0:
        return None
    along, across = S1_FROM_L5 if level == "S1" else (1.0, 0.0)
    # across: the downward step turned by 90 degrees towards anterior (smaller x: columns run A->P)
    expected = lowest + along * step + across * np.array([-step[1], step[0]])
    return _nearest(cand, expected, MAX_OFFSET_OF_STEP * length, taken)


def weaker_body_below_s1(labelled: Sequence[Vertebra], candidates: Sequence[Vertebra],
                         spacing_rc: tuple[float, float] = (1.0, 1.0)) -> Vertebra | None:
    """The candidate lying where S1 would lie if the lowest body of ``labelled``, named S1, were L5.

    Why (a review check, not a relabelling): with the bundled detector S1 is
    rarely a full-strength detection (its centroid response inside S1 has a
    median of 0.38), so a full-strength lowest body named S1 with a weaker
    detection below it at S1's place is more likely L5 with the real S1 below.
    On the 133 training-side cases this held for 4 scans, all of them shifted
    by one (L5 named S1), and for none of the scans named right; on the 68
    held-out cases for none.  ``candidates`` must be the weaker detections not
    used as bodies; the caller checks that the lowest body is a full-strength
    one.  None when the lowest body is not S1 or nothing lies there.
    """
    if len(labelled) < 2 or not candidates or labelled[-1].level != "S1":
        return None
    upper, lowest = _centres_mm(labelled[-2:], spacing_rc)
    found = _next_below(upper, lowest, "S1", _centres_mm(candidates, spacing_rc), set())
    return None if found is None else candidates[found]


def levels_down_to_s1(lowest: str) -> list[str]:
    """The levels below ``lowest`` (L1-L5) down to S1: those :func:`bodies_below` looks for."""
    return [*LUMBAR[LUMBAR.index(lowest) + 1:], "S1"]


def names_bodies_down_to_s1(labelled: list[Vertebra], relabelled: list[Vertebra], added: list[Vertebra],
                            params: LabellingParams) -> bool:
    """Whether a labelling with ``added`` (:func:`bodies_below`'s, down to S1) names them the levels below the
    chain's lowest body down to S1 while every body of ``labelled`` keeps its level but for the levels counted
    across wide spaces above it once the chain reaches S1 (:func:`_moved_only_across_gaps`): the condition of
    ``pipeline._s1_from_second_detector``, stricter than :func:`keeps_bodies_below`.

    Why the counted levels may move the bodies above: a level is counted across a wide space only where the
    chain reaches S1 (``labelling.counted_across_wide_spaces``), so a chain that ends at L5 above a missed
    collapsed L1 names the body above it L1, and only with the S1 added does it name it T12
    (``benchmarks/acquisition_variants.py``, ``collapsed_l1``: tianchi_005)."""
    return ([level_in(relabelled, b) for b in added] == levels_down_to_s1(labelled[-1].level)
            and _moved_only_across_gaps(labelled, relabelled, params))


def same_body(a: Vertebra, b: Vertebra) -> bool:
    """Whether two vertebrae are the same detection (a labelled copy and its original)."""
    return a.slices == b.slices and np.allclose(a.average_polygon, b.average_polygon)


def level_in(relabelled: list[Vertebra], body: Vertebra) -> str | None:
    """The level that a labelling (``relabelled``, labelled copies) gave ``body``; None when it left it out."""
    return next((other.level for other in relabelled if same_body(other, body)), None)


def _levels_skipped_below(chain: list[Vertebra], params: LabellingParams) -> list[int]:
    """For each body of ``chain`` (labelled, top to bottom): how many levels the chain skips below it where
    the beam search may skip one freely, or must (``labelling.skips_across_gaps``)."""
    skips = skips_across_gaps(chain, params)
    skipped = [int(k in skips and level_skipped(chain[k - 1].level, chain[k].level) is not None)
               for k in range(len(chain))]
    return [sum(skipped[at + 1:]) for at in range(len(chain))]


def _moved_only_across_gaps(labelled: list[Vertebra], relabelled: list[Vertebra], params: LabellingParams) -> bool:
    """Whether every body of ``labelled`` is in ``relabelled`` with its level, but for the levels that the new
    labelling skips across gaps below it and the old one did not (:func:`_levels_skipped_below`)."""
    if all(level_in(relabelled, b) == b.level for b in labelled):
        return True
    at = [next((k for k, other in enumerate(relabelled) if same_body(other, b)), None) for b in labelled]
    if None in at:
        return False
    skipped_before, skipped_now = _levels_skipped_below(labelled, params), _levels_skipped_below(relabelled, params)
    return all(level_index(relabelled[k].level) - level_index(b.level) == skipped_now[k] - skipped_before[i]
               for i, (b, k) in enumerate(zip(labelled, at)))


def keeps_bodies_below(labelled: list[Vertebra], relabelled: list[Vertebra], below: list[Vertebra],
                        params: LabellingParams) -> bool:
    """Whether a labelling with the ``below`` bodies added (:func:`bodies_below`) is kept
    (``pipeline.detect_and_label``): every added body is still there, and either the bodies labelled
    before keep their levels (but for the levels a labelling skips across gaps below them,
    ``labelling.skips_across_gaps`` with ``params``: with the added bodies a gap higher up may stand
    out as the place of a missed body), or the lowest of them moves to a level its own appearance
    favours more than its old one (the added bodies then settle a conflict between context and
    appearance at the lumbosacral junction; when its appearance favours the old level, they would push
    the spine against the appearance evidence)."""
    if not labelled or any(level_in(relabelled, b) is None for b in below):
        return False
    if _moved_only_across_gaps(labelled, relabelled, params):
        return True
    lowest = labelled[-1]
    new_level = level_in(relabelled, lowest)
    if new_level is None or lowest.appearance_probabilities is None:
        return False
    appearance = lowest.appearance_probabilities
    return bool(appearance[level_index(new_level)] > appearance[level_index(lowest.level)])
