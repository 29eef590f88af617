"""Studies of a cohort that take the levels of a sure study of their exam, as ``spinenet run`` takes a sure series'.

``spinenet cohort`` runs each sagittal series of an exam as a study of its own, labelled without the others.
Once its studies have run, :func:`take_exam_levels` finds each study whose own labelling asks for a review and
whose vertebrae every sure study of its exam names by one and the same shift, or, where none is sure, a study
that sees the spine down to S1 (:func:`SpineNetLib.cohort.exams.levels_to_take`, ``spinenet run``'s rule:
``core.levels.levels_to_take_from``), and writes its results
again with those levels (:func:`SpineNetLib.outputs.documents.apply_taken_levels`): they still ask for a review,
the first reason says whose levels they are and what the study named them on its own, and ``preview.png`` draws
its own levels in magenta beside them. Every file that names a level is made again and the folder's files are
replaced together, as by ``spinenet correct`` (:func:`SpineNetLib.outputs.correction.rewrite_results`); the
pictures and DICOM results are drawn again from the study's scan, read as the cohort read it.

Measured on stand-in exams (README, "A second opinion from the same exam"). A study that cannot be rewritten
keeps its results; its ``exam_disagreement`` then gives the ``spinenet correct`` that does the same.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from SpineNetLib.cohort.discover import Study, study_input
from SpineNetLib.cohort.exams import LevelsToTake, levels_to_take
from SpineNetLib.core.errors import InputError, error_line
from SpineNetLib.outputs.correction import (files_needing_the_scan, read_manifest_lists, read_scan_as_run,
                                            rewrite_results)
from SpineNetLib.outputs.documents import apply_taken_levels, read_result
from SpineNetLib.outputs.files import RESULT_FILE


@dataclass(frozen=True)
class TakenLevels:
    """What became of one study that takes another's levels."""

    taking: LevelsToTake
    #: The study's levels, top and bottom, on its own and after taking ("T11..L4 -> T12..L5").
    levels: str
    #: Why its results could not be written again ("" where they were).
    failure: str = ""


def _span(levels: list) -> str:
    named = [level for level in levels if level]
    return f"{named[0]}..{named[-1]}" if named else "none"


def _documents(studies_dir: Path, studies: Sequence[Study]) -> dict[str, dict]:
    """study id -> ``vertebrae.json`` of each finished study of ``studies`` (in their order) that has one to read
    (a folder that cannot be read is left out here; the cohort tables list it as a failure)."""
    documents = {}
    for study in studies:
        folder = studies_dir / study.study_id
        if (folder / RESULT_FILE).is_file():
            with contextlib.suppress(InputError):
                documents[study.study_id] = read_result(folder)[0]
    return documents


def take_exam_levels(studies_dir: str | os.PathLike, studies: Sequence[Study]) -> list[TakenLevels]:
    """Write again, with the levels of a sure study of their exam, the results of each finished study of
    ``studies`` (in ``studies_dir/<study id>``) that takes them (module docstring); returns what became of each.
    Never raises for one study's problem: its :class:`TakenLevels` says it, and its results stay as they were."""
    studies_dir = Path(studies_dir)
    by_id = {study.study_id: study for study in studies}
    outcomes = []
    for taking in levels_to_take(_documents(studies_dir, studies)):
        try:
            levels = _take(studies_dir / taking.study_id, by_id[taking.study_id], taking)
            outcomes.append(TakenLevels(taking, levels))
        except Exception as error:   # one study's problem (its scan moved, a full disc): the others go on
            outcomes.append(TakenLevels(taking, "", error_line(error)))
    return outcomes


def _take(folder: Path, study: Study, taking: LevelsToTake) -> str:
    """Rewrite one study's results with the levels it takes; returns its levels before and after."""
    vertebrae_doc, discs_doc, folder = read_result(folder)
    own = [vertebra.get("level") for vertebra in vertebrae_doc["vertebrae"]]
    taken, taken_discs = apply_taken_levels(vertebrae_doc, discs_doc, taking.shift, f"study {taking.source}",
                                            taking.reason(own), taking.rule)
    needs_scan = bool(files_needing_the_scan(read_manifest_lists(folder)))
    with (study_input(study) if needs_scan else contextlib.nullcontext()) as scan_path:
        scan = read_scan_as_run(vertebrae_doc, scan_path, study.series_uid) if scan_path is not None else None
        rewrite_results(folder, taken, taken_discs, scan=scan)
    return f"{_span(own)} -> {_span([v.get('level') for v in taken['vertebrae']])}"
