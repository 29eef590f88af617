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
review of both studies (:mod:`SpineNetLib.cohort.tables`, :mod:`SpineNetLib.cohort.review_page`). Where
``spinenet run`` would have a study take another's levels (``core.levels.series_to_take_levels_from``), the
cohort does not rewrite its results; its ``exam_disagreement`` ends with the ``spinenet correct`` that does.

Only DICOM studies record the two UIDs (``vertebrae.json``'s ``input``, since 2026-12-05); image files
are never compared. Pure functions over the result documents.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from SpineNetLib.core.levels import level_differences, more_likely_wrong, same_bodies, series_to_take_levels_from


def exam_of(vertebrae_doc: dict) -> str:
    """``"<StudyInstanceUID>/<FrameOfReferenceUID>"`` of a result, or "" when it records either not."""
    described = vertebrae_doc.get("input") or {}
    study, frame = (str(described.get(key) or "") for key in ("study_uid", "frame_of_reference_uid"))
    return f"{study}/{frame}" if study and frame else ""


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


def exam_disagreements(documents: Mapping[str, dict]) -> dict[str, str]:
    """``{study id: why}`` of each study whose vertebrae another study of the same exam names otherwise
    (module docstring), among ``documents`` (study id -> its ``vertebrae.json``); studies that agree, or
    have no other series of their exam here, are left out."""
    exams: dict[str, list[str]] = {}
    for study_id, document in documents.items():
        exam = exam_of(document)
        if exam:
            exams.setdefault(exam, []).append(study_id)
    reasons: dict[str, str] = {}
    for members in exams.values():
        centroids = {study_id: _named_centroids(documents[study_id]) for study_id in members}
        for study_id in members:
            said = []
            for other in members:
                differences = level_differences(centroids[study_id], centroids[other]) if other != study_id else []
                if differences:
                    mine, theirs = differences[0]
                    likely = more_likely_wrong(_asks_on_its_own(documents[study_id]),
                                               _asks_on_its_own(documents[other]))
                    said.append(f"the levels disagree with study {other} of the same exam, which names the "
                                f"vertebra {mine} here {theirs}"
                                + (f" ({len(differences)} vertebrae differ)" if len(differences) > 1 else "")
                                + (f"; one of the two is named wrongly{likely}" if likely else ""))
            if said:   # taking levels needs a disagreement: looked for only here
                taken = _levels_to_take(study_id, members, documents, centroids)
                reasons[study_id] = "; ".join(said + ([taken] if taken else []))
    return reasons


def _levels_to_take(study_id: str, members: list[str], documents: Mapping[str, dict],
                    centroids: dict[str, list[tuple[str, np.ndarray]]]) -> str:
    """Where ``spinenet run`` would have the study take the levels of another study of its exam
    (``core.levels.series_to_take_levels_from``: its own labelling asks, every sure series of the exam names the
    vertebrae both show by one shift), the sentence that says so with the correction that applies them; else ""."""
    if not _asks_on_its_own(documents[study_id]):
        return ""
    readings = [(other, centroids[other], _asks_on_its_own(documents[other]))
                for other in members if other != study_id]
    levels = [vertebra.get("level") for vertebra in documents[study_id].get("vertebrae") or []]
    taken = series_to_take_levels_from(centroids[study_id], levels, readings)
    if taken is None:
        return ""
    here, there = same_bodies(centroids[study_id], centroids[taken[0]])[0]
    return (f"as spinenet run would, take the levels of study {taken[0]}, whose own labelling does not ask for a "
            f"review: `spinenet correct studies/{study_id} {here} {there}` in the cohort's output folder")
