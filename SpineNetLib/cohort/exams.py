"""Series of one exam that name the same vertebra differently.

A spine exam often holds two or more sagittal series (T1, T2, STIR, a Dixon's stacks), which a cohort runs
as separate studies, each labelled on its own. Acquired in one session in one frame of reference
(the same StudyInstanceUID and FrameOfReferenceUID), their vertebrae lie at the same places in the
patient's coordinates, within the few millimetres a patient moves between series, while the next level
lies about 30 mm away. So where a vertebra of one series has its centroid within
:data:`SpineNetLib.core.levels.SAME_BODY_MM` of a vertebra of another series of the exam, both must carry the
same level; where they do not, the levels of one of the two (or of both) are wrong, whatever each series'
own review flag says (``spinenet run`` on an exam folder checks the same:
:mod:`SpineNetLib.label.other_series`). The cohort tables say so in ``exam_disagreement`` and ask for a
review of both studies (:mod:`SpineNetLib.cohort.tables`, :mod:`SpineNetLib.cohort.review_page`). Where a
study's own labelling asks for a review and every sure study of its exam names its vertebrae by one shift, or
no study of its exam is sure and one that sees the spine down to S1 names them so where this one names none S1
(``core.levels.levels_to_take_from``, the rule by which ``spinenet run`` takes another series' levels),
:func:`levels_to_take` says so and ``spinenet cohort`` rewrites the study's results with those levels
once its studies have run (:mod:`SpineNetLib.cohort.exam_levels`); where that has not happened (a reader's
correction since, a scan that could not be read again), the study's ``exam_disagreement`` ends with the
``spinenet correct`` that does it.

Only DICOM studies record the two UIDs (``vertebrae.json``'s ``input``, since 2026-12-05). Image files are
compared only within a session of a BIDS dataset (``input.bids_session``, since the fifty-fourth session;
``spinenet run`` compares them too, ``inputs/load.load_other_series``), which a converter writes in the
scanner's patient coordinates; other image files never. Pure functions over the result documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from SpineNetLib.core.levels import (SURE_SERIES, level_differences, levels_to_take_from, more_likely_wrong,
                                    same_bodies, taken_levels_reason)


def exam_of(vertebrae_doc: dict) -> str:
    """``"<StudyInstanceUID>/<FrameOfReferenceUID>"`` of a result; for an image file in a BIDS dataset,
    ``"bids:<its session folder>"`` (``inputs/image.bids_session``); "" otherwise."""
    described = vertebrae_doc.get("input") or {}
    study, frame = (str(described.get(key) or "") for key in ("study_uid", "frame_of_reference_uid"))
    if study and frame:
        return f"{study}/{frame}"
    session = str(described.get("bids_session") or "")
    return f"bids:{session}" if session else ""


def _named_centroids(vertebrae_doc: dict) -> list[tuple[str, np.ndarray]]:
    """(level, centroid in the sagittal plane: A, S in mm) of each vertebra with a level and a centroid."""
    out = []
    for vertebra in vertebrae_doc.get("vertebrae") or []:
        centroid = vertebra.get("centroid_ras")
        if vertebra.get("level") and isinstance(centroid, list) and len(centroid) == 3:
            out.append((str(vertebra["level"]), np.asarray(centroid[1:], float)))
    return out


def _asks_on_its_own(vertebrae_doc: dict) -> bool:
    """Whether a study's own labelling asks for a review (``needs_review``: the cohort's runs compare no
    series; the tables add the exam's disagreement)."""
    return bool((vertebrae_doc.get("labelling") or {}).get("needs_review"))


def _exams(documents: Mapping[str, dict]) -> list[list[str]]:
    """The study ids of ``documents`` grouped by exam (:func:`exam_of`); studies that record none are left out."""
    exams: dict[str, list[str]] = {}
    for study_id, document in documents.items():
        exam = exam_of(document)
        if exam:
            exams.setdefault(exam, []).append(study_id)
    return list(exams.values())


def exam_disagreements(documents: Mapping[str, dict]) -> dict[str, str]:
    """``{study id: why}`` of each study whose vertebrae another study of the same exam names otherwise
    (module docstring), among ``documents`` (study id -> its ``vertebrae.json``); studies that agree, or
    have no other series of their exam here, are left out."""
    reasons: dict[str, str] = {}
    for members in _exams(documents):
        centroids = {study_id: _named_centroids(documents[study_id]) for study_id in members}
        for study_id in members:
            said = []
            for other in members:
                differences = level_differences(centroids[study_id], centroids[other]) if other != study_id else []
                if differences:
                    mine, theirs = differences[0]
                    mine_asks, theirs_asks = _asks_on_its_own(documents[study_id]), _asks_on_its_own(documents[other])
                    likely = more_likely_wrong(mine_asks, theirs_asks, centroids[study_id], centroids[other])
                    said.append(f"the levels disagree with study {other} of the same exam, which names the "
                                f"vertebra {mine} here {theirs}"
                                + (f" ({len(differences)} vertebrae differ)" if len(differences) > 1 else "")
                                + (f"; one of the two is named wrongly{likely}" if likely else ""))
            if said:   # taking levels needs a disagreement: looked for only here
                taking = _levels_to_take(study_id, members, documents, centroids)
                reasons[study_id] = "; ".join(said + ([taking.correction()] if taking else []))
    return reasons


@dataclass(frozen=True)
class LevelsToTake:
    """A study whose own labelling asks for a review and that takes the levels of a sure study of its exam."""

    study_id: str
    #: The study whose levels it takes.
    source: str
    #: How many levels further down the spine the source names each vertebra (+1: its L4 is the source's L5).
    shift: int
    #: A vertebra both show, as the study named it and as the source names it.
    here: str
    there: str
    #: Why: ``core.levels.SURE_SERIES`` or ``SERIES_DOWN_TO_S1`` (:func:`core.levels.levels_to_take_from`).
    rule: str = SURE_SERIES

    def reason(self, own_levels) -> str:
        """The study's first review reason once it took the levels (``own_levels``: its own, top to bottom)."""
        return taken_levels_reason(f"study {self.source}", self.here, self.there, own_levels, self.rule)

    def correction(self) -> str:
        """The end of its ``exam_disagreement`` where it has not taken them: the ``spinenet correct`` that does."""
        whose = (", whose own labelling does not ask for a review" if self.rule == SURE_SERIES
                 else ", which shows the spine down to S1")
        return (f"as spinenet run would, take the levels of study {self.source}{whose}: `spinenet correct "
                f"studies/{self.study_id} {self.here} {self.there}` in the cohort's output folder")


def levels_to_take(documents: Mapping[str, dict]) -> list[LevelsToTake]:
    """Each study of ``documents`` (study id -> its ``vertebrae.json``) that takes the levels of another study of
    its exam by ``spinenet run``'s rule (module docstring), in the order of ``documents``."""
    found = []
    for members in _exams(documents):
        centroids = {study_id: _named_centroids(documents[study_id]) for study_id in members}
        found += [taking for taking in (_levels_to_take(study_id, members, documents, centroids)
                                        for study_id in members) if taking is not None]
    order = list(documents)
    return sorted(found, key=lambda taking: order.index(taking.study_id))


def _levels_to_take(study_id: str, members: list[str], documents: Mapping[str, dict],
                    centroids: dict[str, list[tuple[str, np.ndarray]]]) -> LevelsToTake | None:
    """Whether the study takes the levels of another study of its exam
    (``core.levels.levels_to_take_from``: its own labelling asks, and every sure study of the exam names the
    vertebrae both show by one shift, or none is sure and one sees the spine down to S1), and whose. A study takes
    levels once: not again where it took some before (its ``labelling.levels_taken_from_series``; a reader
    corrected the study it took them from since, say)."""
    labelling = documents[study_id].get("labelling") or {}
    if not _asks_on_its_own(documents[study_id]) or labelling.get("levels_taken_from_series"):
        return None
    readings = [(other, centroids[other], _asks_on_its_own(documents[other]))
                for other in members if other != study_id]
    levels = [vertebra.get("level") for vertebra in documents[study_id].get("vertebrae") or []]
    taken = levels_to_take_from(centroids[study_id], levels, readings)
    if taken is None:
        return None
    here, there = same_bodies(centroids[study_id], centroids[taken[0]])[0]
    return LevelsToTake(study_id, taken[0], taken[1], here, there, taken[2])
