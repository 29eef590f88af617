"""The other sagittal series of the scan's exam as a second opinion on its levels.

A lumbar exam holds a sagittal T1, T2 and often STIR, acquired in one session in one frame of reference:
their vertebrae lie at the same places in the patient's coordinates. ``spinenet run`` on an exam folder
reads one of them (its T2) and, since the forty-eighth session, detects and labels the others too
(``pipeline.RunOptions.other_series``; the Slicer panel and ``SpineNetBatch.py`` since the forty-ninth).
Where a vertebra of another series lies within :data:`SpineNetLib.core.levels.SAME_BODY_MM` of one of the
scan's and carries another level, one of the two series is named wrongly, whatever the scan's own margin
says: the levels ask for a review, and where only one of the two labellings asks on its own, the warning
says that one is more likely wrong (``core.levels.more_likely_wrong``); where that one is the scan and every
sure series names the shared vertebrae by one and the same shift, the scan takes their levels, still asking
for a review (``core.levels.series_to_take_levels_from``; since the fiftieth session); where no series is sure,
from a series that sees the spine down to S1 where the scan names none S1 (``core.levels.series_down_to_s1``;
since the fifty-first session). Where each series puts
each level is recorded, so a reader can see both readings (``preview.png``, the Slicer scene). The same rule
as ``spinenet cohort``'s ``exam_disagreement`` (:mod:`SpineNetLib.cohort.exams`); measured on the held-out
scans and their acquisition variants taken as two series of one exam (``benchmarks/exam_comparison.py``,
README "A second opinion from the same exam"). A shift both series share is not seen.

Functions over the scans and their labelled vertebrae; only :func:`review_against_other_series` changes one of
its arguments: the levels of the scan's vertebrae, where it takes another series' levels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from SpineNetLib.core.levels import (MIN_SAME_BODIES_ALIKE, SAME_BODY_MM, levels_to_take_from, more_likely_wrong,
                                    same_bodies, shifted_by, taken_levels_reason)
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan, vertebra_centroid_ras
from SpineNetLib.label.confidence import LabellingConfidence, ask_for_review


def series_name(scan: Scan) -> str:
    """How a warning names a series: its description and number (and the stack's label, for one contrast of
    a series of several: "'T2 Dixon' (series 6) [W]"), else its UID (as ``--series`` takes it), else, for an
    image file (``spinenet run --compare-with``), its path as the user gave it."""
    meta = scan.metadata
    number = str(meta.get("series_number") or "").strip()
    description = str(meta.get("series_description") or "").strip()
    stack = str(meta.get("stack") or "").strip()
    named = " ".join(x for x in (repr(description) if description else "", f"(series {number})" if number else "",
                                 f"[{stack}]" if stack else "") if x)
    source = str(meta.get("source") or "")
    return named or str(meta.get("series_uid") or (repr(source) if source else "") or "another series")


def _named_centroids(scan: Scan, vertebrae: Sequence[Vertebra]) -> list[tuple[str, np.ndarray]]:
    """(level, centroid in RAS mm) of each named vertebra."""
    return [(v.level, vertebra_centroid_ras(scan, v)) for v in vertebrae if v.level]


def _in_plane(named: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """The centroids in the sagittal plane (A and S in mm), where two series of an exam are compared."""
    return [(level, ras[1:]) for level, ras in named]


def _disagreement(name: str, differences: list[tuple[str, str]], likely: str) -> str:
    """The review reason where the series ``name`` names vertebrae of the scan otherwise, saying which of the
    two is more likely wrong (``likely``: ``core.levels.more_likely_wrong``)."""
    here, there = differences[0]
    more = f" ({len(differences)} vertebrae differ)" if len(differences) > 1 else ""
    return (f"levels may be shifted: the series {name} of the same exam names the vertebra {here} here {there}"
            f"{more}; one of the two series is named wrongly" + likely)


def review_against_other_series(scan: Scan, vertebrae: Sequence[Vertebra], others: Sequence[Scan],
                                labelled: Callable[[Scan], tuple[Sequence[Vertebra], bool]],
                                confidence: LabellingConfidence, asks_on_its_own: bool = False) -> dict:
    """Label each of ``others`` (``labelled``: as the scan was, with whether its own labelling asks for a
    review) and ask for a review (``confidence``) for each that names a vertebra otherwise
    (``asks_on_its_own``: whether the scan's own labelling asks). Where the scan's own labelling asks and
    ``core.levels.levels_to_take_from`` names a series, the scan's ``vertebrae`` take its levels (their
    ``level`` set in place), still asking for a review, which says so. Returns the entries of the labelling
    block: ``compared_with_series`` (the names of the series compared), ``disagreeing_series`` (those
    that name a vertebra otherwise), ``agreeing_series`` (those that show at least
    :data:`MIN_SAME_BODIES_ALIKE` of the same vertebrae and name them all alike; a series that is neither
    gets a note; the series whose levels were taken is neither), ``other_series_levels`` (where each puts its
    levels) and, where levels were taken, ``levels_taken_from_series`` (its name, the shift, the scan's own
    levels and the rule by which they were taken)."""
    readings = []
    for other in others:
        other_vertebrae, other_asks = labelled(other)
        readings.append((series_name(other), _named_centroids(other, other_vertebrae), other_asks))
    mine = _in_plane(_named_centroids(scan, vertebrae))
    own = [v.level for v in vertebrae]
    taken = levels_to_take_from(mine, own, [(n, _in_plane(t), a) for n, t, a in readings]) \
        if asks_on_its_own else None
    entries = {"compared_with_series": [], "disagreeing_series": [], "agreeing_series": [], "other_series_levels": []}
    if taken is not None:
        source = next(theirs for name, theirs, _ in readings if name == taken[0])
        here, there = same_bodies(mine, _in_plane(source))[0]
        taken_reason = taken_levels_reason(f"the series {taken[0]}", here, there, own, taken[2])
        new_levels = shifted_by(own, taken[1])
        for vertebra, level in zip(vertebrae, new_levels):
            vertebra.level = level
        confidence.s1_found = "S1" in new_levels
        entries["levels_taken_from_series"] = {"series": taken[0], "shift": taken[1], "own_levels": own,
                                               "rule": taken[2]}
        mine = [(level, centroid) for level, (_, centroid) in zip(shifted_by([lv for lv, _ in mine], taken[1]), mine)]
    for name, theirs, other_asks in readings:
        shared = same_bodies(mine, _in_plane(theirs))
        differences = [(level, other_level) for level, other_level in shared if other_level != level]
        if differences:
            likely = more_likely_wrong(asks_on_its_own, other_asks, mine, _in_plane(theirs))
            ask_for_review(confidence, _disagreement(name, differences, likely))
            entries["disagreeing_series"].append(name)
        elif taken is not None and name == taken[0]:
            pass   # alike because its levels were taken: the reason below says so
        elif len(shared) >= MIN_SAME_BODIES_ALIKE:
            entries["agreeing_series"].append(name)
        else:   # a note: nothing to doubt, nothing confirmed
            confidence.warnings.append(f"the series {name} of the same exam shows fewer than {MIN_SAME_BODIES_ALIKE} "
                                       f"of these vertebrae within {SAME_BODY_MM:g} mm (the patient moved, or it "
                                       "shows another part of the spine): its levels were not compared")
        entries["compared_with_series"].append(name)
        # where it puts each level, in the patient's coordinates the scan shares (preview.png, the Slicer scene)
        entries["other_series_levels"].append({"series": name, "vertebrae": [
            {"level": level, "centroid_ras": [round(float(x), 2) for x in ras]} for level, ras in theirs]})
    if taken is not None:   # first: the levels shown are not this series' own
        ask_for_review(confidence, taken_reason)
    return entries
