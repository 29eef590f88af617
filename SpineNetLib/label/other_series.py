"""The other sagittal series of the scan's exam as a second opinion on its levels.

A lumbar exam holds a sagittal T1, T2 and often STIR, acquired in one session in one frame of reference:
their vertebrae lie at the same places in the patient's coordinates. ``spinenet run`` on an exam folder
reads one of them (its T2) and, since the forty-eighth session, detects and labels the others too
(``pipeline.RunOptions.other_series``; the Slicer panel and ``SpineNetBatch.py`` since the forty-ninth).
Where a vertebra of another series lies within :data:`SpineNetLib.core.levels.SAME_BODY_MM` of one of the
scan's and carries another level, one of the two series is named wrongly, whatever the scan's own margin
says: the levels ask for a review, and where only one of the two labellings asks on its own, the warning
says that one is more likely wrong (``core.levels.more_likely_wrong``). Where each series puts each level
is recorded, so a reader can see both readings (``preview.png``, the Slicer scene). The same rule
as ``spinenet cohort``'s ``exam_disagreement`` (:mod:`SpineNetLib.cohort.exams`); measured on the held-out
scans and their acquisition variants taken as two series of one exam (``benchmarks/exam_comparison.py``,
README "A second opinion from the same exam"). A shift both series share is not seen.

Pure functions over the scans and their labelled vertebrae.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from SpineNetLib.core.levels import (MIN_SAME_BODIES_ALIKE, SAME_BODY_MM, level_differences, more_likely_wrong,
                                     same_bodies)
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan, vertebra_centroid_ras
from SpineNetLib.label.confidence import LabellingConfidence, ask_for_review


def series_name(scan: Scan) -> str:
    """How a warning names a series: its description and number (and the stack's label, for one contrast of
    a series of several: "'T2 Dixon' (series 6) [W]"), else its UID (as ``--series`` takes it)."""
    meta = scan.metadata
    number = str(meta.get("series_number") or "").strip()
    description = str(meta.get("series_description") or "").strip()
    stack = str(meta.get("stack") or "").strip()
    named = " ".join(x for x in (repr(description) if description else "", f"(series {number})" if number else "",
                                 f"[{stack}]" if stack else "") if x)
    return named or str(meta.get("series_uid") or meta.get("source") or "another series")


def _placed(scan: Scan, vertebrae: Sequence[Vertebra]) -> list[tuple[str, np.ndarray]]:
    """(level, centroid: A and S in mm) of each named vertebra."""
    return [(v.level, vertebra_centroid_ras(scan, v)[1:]) for v in vertebrae if v.level]


def series_disagreements(scan: Scan, vertebrae: Sequence[Vertebra],
                         others: Sequence[tuple[Scan, Sequence[Vertebra], bool]],
                         asks_on_its_own: bool = False) -> list[tuple[str, str]]:
    """(series name, review reason) of each of ``others`` (another series of the exam, its labelled
    vertebrae, and whether its own labelling asks for a review) that names a vertebra of ``scan`` otherwise
    (module docstring), saying which of the two is more likely wrong where only one asks on its own
    (``asks_on_its_own``: the scan's labelling); [] where all agree."""
    mine = _placed(scan, vertebrae)
    reasons = []
    for other, other_vertebrae, other_asks in others:
        differences = level_differences(mine, _placed(other, other_vertebrae))
        if differences:
            here, there = differences[0]
            more = f" ({len(differences)} vertebrae differ)" if len(differences) > 1 else ""
            reasons.append((series_name(other), f"levels may be shifted: the series {series_name(other)} of the same "
                                                 f"exam names the vertebra {here} here {there}{more}; one of the two "
                                                 "series is named wrongly"
                                                 + more_likely_wrong(asks_on_its_own, other_asks)))
    return reasons


def _alike(scan: Scan, vertebrae: Sequence[Vertebra], other: Scan, other_vertebrae: Sequence[Vertebra]) -> bool:
    """Whether ``other`` shows at least :data:`MIN_SAME_BODIES_ALIKE` of the scan's vertebrae and names them
    all alike."""
    shared = same_bodies(_placed(scan, vertebrae), _placed(other, other_vertebrae))
    return len(shared) >= MIN_SAME_BODIES_ALIKE and all(mine == theirs for mine, theirs in shared)


def review_against_other_series(scan: Scan, vertebrae: Sequence[Vertebra], others: Sequence[Scan],
                                labelled: Callable[[Scan], tuple[Sequence[Vertebra], bool]],
                                confidence: LabellingConfidence, asks_on_its_own: bool = False) -> dict:
    """Label each of ``others`` (``labelled``: as the scan was, with whether its own labelling asks for a
    review) and ask for a review (``confidence``) for each that names a vertebra otherwise
    (``asks_on_its_own``: whether the scan's own labelling asks). Returns the entries of the labelling
    block: ``compared_with_series`` (the names of the series compared), ``disagreeing_series`` (those
    that name a vertebra otherwise), ``agreeing_series`` (those that show at least
    :data:`MIN_SAME_BODIES_ALIKE` of the same vertebrae and name them all alike; a series that is neither
    gets a note) and ``other_series_levels`` (where each puts its levels)."""
    labelled_others = [(other, *labelled(other)) for other in others]
    reasons = series_disagreements(scan, vertebrae, labelled_others, asks_on_its_own)
    for _, reason in reasons:
        ask_for_review(confidence, reason)
    alike = [series_name(other) for other, other_vertebrae, _ in labelled_others
             if _alike(scan, vertebrae, other, other_vertebrae)]
    disagreeing = [name for name, _ in reasons]
    for other, _, _ in labelled_others:
        if series_name(other) not in alike + disagreeing:   # a note: nothing to doubt, nothing confirmed
            confidence.warnings.append(f"the series {series_name(other)} of the same exam shows fewer than "
                                       f"{MIN_SAME_BODIES_ALIKE} of these vertebrae within {SAME_BODY_MM:g} mm "
                                       "(the patient moved, or it shows another part of the spine): its levels "
                                       "were not compared")
    return {"compared_with_series": [series_name(other) for other in others], "disagreeing_series": disagreeing,
            "agreeing_series": alike,
            "other_series_levels": [_levels_of(other, other_vertebrae)
                                    for other, other_vertebrae, _ in labelled_others]}


def _levels_of(scan: Scan, vertebrae: Sequence[Vertebra]) -> dict:
    """``{"series": name, "vertebrae": [{"level", "centroid_ras"}]}``: where another series of the exam puts
    each level, in the patient's coordinates that the read scan shares (the Slicer panel shows them on it)."""
    return {"series": series_name(scan),
            "vertebrae": [{"level": v.level,
                           "centroid_ras": [round(float(x), 2) for x in vertebra_centroid_ras(scan, v)]}
                          for v in vertebrae if v.level]}
