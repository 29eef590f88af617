"""A cohort study's folder as part of its cohort: where the study was read from, and its rows in the
cohort tables, so that one study can be corrected on its own.

A reader goes through ``cohort_studies.csv``, corrects a flagged study (``spinenet correct
OUTDIR/studies/<study id> L4 L5``, or the Slicer panel's Save results) and expects the pictures, the
DICOM results and the cohort tables to follow. The pictures and DICOM results are drawn from the scan,
so every ``spinenet cohort`` run records each study's input in ``OUTDIR/cohort_inputs.json``
(:func:`record_study_inputs`: the absolute path, the same path relative to ``OUTDIR``, the path inside a
ZIP archive, the DICOM series), merged with the record of earlier runs into the same folder; a correction
reads the scan from there (:func:`recorded_study`) when no other is given. Where the absolute path is
gone but the relative one leads to the input (the data and the output folder moved together: a project
folder copied to another machine, a drive mounted elsewhere), the input is read from there. The study's
rows in the four cohort tables are then replaced by those of its corrected folder
(:func:`SpineNetLib.cohort.tables.replace_study_rows`), as the next ``spinenet cohort`` run would write them.

The record is a convenience, not a result: the tables are made from the study folders alone, and a
cohort folder without the record (written before it existed) is corrected with ``--input`` as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from SpineNetLib.cohort.discover import Study
from SpineNetLib.cohort.tables import COHORT_STUDIES_FILE, replace_study_rows, study_table_row
from SpineNetLib.core.errors import InputError
from SpineNetLib.outputs.files import write_files_atomically

#: The per-study result folders' parent, inside a cohort's output folder.
STUDIES_FOLDER = "studies"
#: The file in a cohort's output folder that records where each study was read from.
INPUTS_FILE = "cohort_inputs.json"
#: The key of a study's record that holds its path relative to the cohort's output folder.
FROM_OUTPUT_FOLDER = "path_from_output_folder"
#: What the record says of itself, for a reader who opens it.
_ABOUT = ("where spinenet cohort read each study (its folder under studies/): spinenet correct and the Slicer "
          "panel read the scan from here to draw a corrected study's pictures again")


@dataclass(frozen=True)
class CohortStudy:
    """A results folder that is one study of a cohort (:func:`cohort_study_of`)."""

    #: The cohort's output folder (the one holding ``studies/`` and the tables).
    outdir: Path
    study_id: str
    #: The study as the cohort recorded it (:data:`INPUTS_FILE`), or None: a folder written before the
    #: record existed.
    study: Study | None
    #: The study's path relative to the cohort's root (its ``input`` in the tables), or None when neither
    #: the record nor ``cohort_studies.csv`` names it.
    relative: str | None


def _read_record(outdir: Path) -> dict[str, dict]:
    """``{study id: recorded fields}`` of ``outdir``'s record; empty when there is none or it cannot be read
    (the record is rewritten whole by the next run)."""
    try:
        record = json.loads((outdir / INPUTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    studies = record.get("studies") if isinstance(record, dict) else None
    return {k: v for k, v in studies.items() if isinstance(v, dict)} if isinstance(studies, dict) else {}


def record_study_inputs(outdir: str | os.PathLike, studies: Sequence[Study]) -> Path:
    """Record where each of ``studies`` is read from in ``outdir/cohort_inputs.json``, keeping what earlier
    runs recorded of other studies (a run over part of the root, or a moved root, adds to the record)."""
    outdir = Path(outdir)
    record = _read_record(outdir)
    record.update({s.study_id: {**{k: v for k, v in asdict(s).items() if k != "study_id"},
                                FROM_OUTPUT_FOLDER: _relative_to(s.path, outdir)} for s in studies})
    text = json.dumps({"about": _ABOUT, "studies": dict(sorted(record.items()))}, indent=1) + "\n"
    return write_files_atomically(outdir, {INPUTS_FILE: text})[0]


def _relative_to(path: str, outdir: Path) -> str | None:
    """``path`` relative to the output folder ``outdir`` (POSIX separators), or None where there is no such
    path (another drive)."""
    try:
        return Path(os.path.relpath(Path(path).absolute(), outdir.absolute())).as_posix()
    except ValueError:
        return None


def cohort_location(results_folder: str | os.PathLike) -> tuple[Path, str] | None:
    """(the cohort's output folder, the study id) when ``results_folder`` is a cohort study's folder
    (``OUTDIR/studies/<study id>`` with the cohort's record or tables in ``OUTDIR``), else None: a folder of
    ``spinenet run`` or the batch script. A few file checks, nothing read: cheap enough for every panel
    update."""
    folder = Path(results_folder).absolute()
    outdir = folder.parent.parent
    if folder.parent.name != STUDIES_FOLDER or not any(
            (outdir / name).is_file() for name in (INPUTS_FILE, COHORT_STUDIES_FILE)):
        return None
    return outdir, folder.name


def cohort_study_of(results_folder: str | os.PathLike) -> CohortStudy | None:
    """The cohort study whose folder ``results_folder`` is (:func:`cohort_location`), with what the cohort
    recorded of it, else None."""
    location = cohort_location(results_folder)
    if location is None:
        return None
    outdir, study_id = location
    study = _study_from_record(study_id, _read_record(outdir).get(study_id), outdir)
    relative = study.relative if study is not None else study_table_row(outdir, study_id).get("input")
    return CohortStudy(outdir, study_id, study, relative)


def _study_from_record(study_id: str, fields: dict | None, outdir: Path) -> Study | None:
    """The :class:`Study` the record's ``fields`` describe, or None when they are missing or are not what
    :func:`record_study_inputs` writes (another version's record, or one edited by hand). Its ``path`` is
    the recorded path relative to ``outdir`` where the absolute one is gone and the relative one exists
    (module docstring); a record written before the relative path was kept (2026-12-05) has none."""
    if not isinstance(fields, dict):
        return None
    fields = dict(fields)
    from_outdir = fields.pop(FROM_OUTPUT_FOLDER, None)
    text, optional = ("path", "relative", "kind"), ("series_uid", "inner")
    if set(fields) != {f.name for f in dataclasses.fields(Study)} - {"study_id"} \
            or not all(isinstance(fields[k], str) and fields[k] for k in text) \
            or not all(fields[k] is None or isinstance(fields[k], str) for k in optional) \
            or not (from_outdir is None or isinstance(from_outdir, str) and from_outdir):
        return None
    moved = os.path.normpath(outdir.absolute() / from_outdir) if from_outdir is not None else None
    if moved is not None and not Path(fields["path"]).exists() and Path(moved).exists():
        fields["path"] = moved
    return Study(study_id=study_id, **fields)


def recorded_study(cohort_study: CohortStudy) -> Study:
    """The study as the cohort recorded it, to read its scan from (:func:`SpineNetLib.cohort.discover.study_input`,
    with its ``series_uid``). Raises :class:`InputError` when the record has no such study or its input is
    gone."""
    study = cohort_study.study
    if study is None:
        raise InputError(f"the cohort in {cohort_study.outdir} has no record of where study {cohort_study.study_id} "
                         f"was read from (no {INPUTS_FILE}, written by spinenet cohort since 2026-12-05)")
    if not Path(study.path).exists():
        raise InputError(f"study {cohort_study.study_id} was read from {study.path}, which is gone (moved?)")
    return study


def update_cohort_tables(cohort_study: CohortStudy) -> list[Path]:
    """Replace the study's rows in its cohort's tables by those of its folder as it is now (after a
    correction; :func:`SpineNetLib.cohort.tables.replace_study_rows`); returns the tables' paths. Raises
    :class:`InputError`, the tables unchanged, when they cannot be updated so."""
    if cohort_study.relative is None:
        raise InputError(f"neither {INPUTS_FILE} nor {COHORT_STUDIES_FILE} in {cohort_study.outdir} names study "
                         f"{cohort_study.study_id}")
    study = cohort_study.study or Study(cohort_study.study_id, path="", relative=cohort_study.relative, kind="")
    return replace_study_rows(cohort_study.outdir, study,
                              cohort_study.outdir / STUDIES_FOLDER / cohort_study.study_id)
