"""The cohort tables: the rows of every finished study in one CSV file per kind.

* ``cohort_vertebrae.csv``: one row per vertebra per study;
* ``cohort_discs.csv``: one row per disc per study;
* ``cohort_failures.csv``: one row per study without a result: study, input, one-line reason;
* ``cohort_studies.csv``: one row per finished study, for going through a cohort study by study: its
  levels, how sure they are and why a review is asked for, its exam and whether the other sagittal
  series of that exam name its vertebrae otherwise (:mod:`SpineNetLib.cohort.exams`), whether a reader
  corrected them
  (``spinenet correct``) and, if so, the levels as the network named them and by how many levels the
  reader moved them, whether its discs were graded and the sequence that decided it, its other
  warnings, and its ``preview.png`` (relative to the output folder);
* ``cohort_review.html``: the studies table and the failures as one page to go through by eye, the
  studies that ask for a review first (:mod:`SpineNetLib.cohort.review_page`).

Each vertebra and disc row is the study's own ``vertebrae.csv`` or ``discs.csv`` row, made from
its ``vertebrae.json`` and ``discs.json`` by the same functions that write those files
(:func:`SpineNetLib.outputs.vertebrae.vertebrae_csv_text`,
:func:`SpineNetLib.outputs.discs.discs_csv_text`), so the columns are the ones the README (and
docs/SLICER.md, "The disc table") describes and the same for every study (grades that a study lacks stay
empty).  In front come the study's columns (``study``, ``input``, ``series_uid``, ``series_description``); the disc
rows end with the study's labelling columns (``labelling_confidence``, ``labelling_margin_nats``, ``s1_found``,
``levels_need_review``, ``labelling_warning``), which ``discs.csv`` does not carry.

The tables are made again, whole, from the study folders at the end of every run, so a run
that was interrupted, or that only added a few studies, still gives complete tables; a correction of
one study replaces its rows alone (:func:`replace_study_rows`).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

from SpineNetLib.core.errors import InputError, one_line
from SpineNetLib.cohort.discover import Study, StudyFailure
from SpineNetLib.cohort.exams import exam_disagreements, exam_of
from SpineNetLib.cohort.review_page import REVIEW_PAGE_FILE, asks_for_review, review_order, review_page_html
from SpineNetLib.outputs.discs import discs_csv_header, discs_csv_text, not_graded_warning, sequence_cell
from SpineNetLib.outputs.documents import levels_by_network, read_result, shift_by_reader, vertebra_name
from SpineNetLib.outputs.files import earlier_manifest, write_files_atomically
from SpineNetLib.outputs.preview import PREVIEW_FILE
from SpineNetLib.outputs.vertebrae import (PER_SCAN_CSV_COLUMNS, VERTEBRAE_CSV_COLUMNS, csv_flag, labelling_csv_cells,
                                          vertebrae_csv_text)

COHORT_VERTEBRAE_FILE = "cohort_vertebrae.csv"
COHORT_DISCS_FILE = "cohort_discs.csv"
COHORT_FAILURES_FILE = "cohort_failures.csv"
COHORT_STUDIES_FILE = "cohort_studies.csv"
#: The columns in front of every vertebra and disc row.
STUDY_COLUMNS = ("study", "input", "series_uid", "series_description")
#: The per-scan columns of vertebrae.csv that the disc rows repeat.
LABELLING_COLUMNS = VERTEBRAE_CSV_COLUMNS[-PER_SCAN_CSV_COLUMNS:]
FAILURE_COLUMNS = ("study", "input", "reason")
STUDIES_COLUMNS = (*STUDY_COLUMNS, "vertebrae", "levels", *LABELLING_COLUMNS, "exam", "exam_disagreement",
                   "corrected_by_user", "levels_by_network", "shift_by_reader", "discs", "grading", "sequence",
                   "other_warnings", "preview")
#: Where :data:`STUDIES_COLUMNS` holds the study's exam and what the other series of that exam say of its levels
#: (:mod:`SpineNetLib.cohort.exams`), filled in once every study's row is made.
_EXAM, _DISAGREEMENT = STUDIES_COLUMNS.index("exam"), STUDIES_COLUMNS.index("exam_disagreement")


def _rows(csv_text: str) -> list[list[str]]:
    """The data rows of a CSV text (its header dropped)."""
    return list(csv.reader(io.StringIO(csv_text)))[1:]


def _csv(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def study_rows(study: Study, folder: str | os.PathLike
               ) -> tuple[list[list[str]], list[list[str]], list[str], dict]:
    """(vertebra rows, disc rows, the study's row of ``cohort_studies.csv``, its ``vertebrae.json``) of one
    finished study's folder, each row with the study's columns in front; the row's ``exam_disagreement``
    is left empty (:func:`_with_exam_disagreements` fills it in).

    Raises :class:`InputError` when the folder's documents cannot be read.
    """
    vertebrae_doc, discs_doc, _ = read_result(folder)
    described = vertebrae_doc.get("input") or {}
    front = [study.study_id, study.relative, str(described.get("series_uid") or ""),
             str(described.get("series_description") or "")]
    vertebrae = [front + row for row in _rows(vertebrae_csv_text(vertebrae_doc))]
    labelling = labelling_csv_cells(vertebrae_doc)
    discs = [front + row + labelling for row in _rows(discs_csv_text(discs_doc, vertebrae_doc))] \
        if discs_doc is not None else []
    return vertebrae, discs, front + _study_cells(vertebrae_doc, discs_doc, Path(folder), labelling), vertebrae_doc


def _study_cells(vertebrae_doc: dict, discs_doc: dict | None, folder: Path, labelling: list[str]) -> list[str]:
    """The cells of :data:`STUDIES_COLUMNS` after the study's own columns."""
    names = [vertebra_name(v, i) for i, v in enumerate(vertebrae_doc["vertebrae"])]
    block = vertebrae_doc.get("labelling") or {}
    grading = (discs_doc or {}).get("grading") or {}
    graded = "done" if grading.get("status") == "done" else (
        f"not run: {grading.get('reason')}" if grading.get("reason") else str(grading.get("status") or ""))
    # said in their own columns: the labelling's warnings, and why the discs were not graded (pipeline.run)
    said = {str(w) for w in block.get("warnings") or []} | {not_graded_warning(grading.get("reason"))}
    others = [str(w) for w in [*(vertebrae_doc.get("warnings") or []), *((discs_doc or {}).get("warnings") or [])]
              if str(w) not in said]
    images = (earlier_manifest(folder) or {}).get("images") or []
    # relative to the output folder, whose studies/ holds the study folders
    preview = f"{folder.parent.name}/{folder.name}/{PREVIEW_FILE}" if PREVIEW_FILE in images else ""
    return [str(len(names)), f"{names[0]}..{names[-1]}" if names else "", *labelling, exam_of(vertebrae_doc), "",
            csv_flag(block.get("corrected_by_user") is True) if block else "",
            levels_by_network(vertebrae_doc), _shift_cell(shift_by_reader(vertebrae_doc)),
            str(len((discs_doc or {}).get("discs") or [])) if discs_doc is not None else "", one_line(graded),
            sequence_cell(grading), one_line("; ".join(dict.fromkeys(others))), preview]


def _shift_cell(shift: int | str | None) -> str:
    """``shift_by_reader`` as the table shows it: "", "0", "+1", "-2", "mixed"."""
    if shift is None or isinstance(shift, str):
        return shift or ""
    return f"{shift:+d}" if shift else "0"


def cohort_table_texts(studies_dir: str | os.PathLike, studies: Sequence[Study],
                       failures: Sequence[StudyFailure]) -> dict[str, str]:
    """``{file name: text}`` of the four cohort tables and the review page made from them
    (:mod:`SpineNetLib.cohort.review_page`).

    ``studies`` that have a finished folder (``studies_dir/<study id>/result.json``) give rows, in
    the order given; the others are left out (they are running, failed or not run yet).  A
    finished folder that cannot be read becomes a failure row.
    """
    vertebrae, discs, summaries, documents, failed = [], [], [], {}, list(failures)
    for study in studies:
        folder = Path(studies_dir) / study.study_id
        if not (folder / "result.json").is_file():
            continue
        try:
            v_rows, d_rows, summary, documents[study.study_id] = study_rows(study, folder)
        except InputError as error:
            failed.append(StudyFailure(study.study_id, study.relative, f"its results cannot be read: {one_line(error)}"))
            continue
        vertebrae += v_rows
        discs += d_rows
        summaries.append(summary)
    summaries = _with_exam_disagreements(summaries, documents)
    headers = _table_headers()
    rows = {COHORT_VERTEBRAE_FILE: vertebrae, COHORT_DISCS_FILE: discs, COHORT_STUDIES_FILE: summaries,
            COHORT_FAILURES_FILE: [(f.study_id, f.input, one_line(f.reason)) for f in failed]}
    return _with_review_page({name: _csv(headers[name], rows[name]) for name in headers})


def _with_exam_disagreements(summaries: list[list[str]], documents: dict[str, dict]) -> list[list[str]]:
    """``cohort_studies.csv`` rows with their ``exam_disagreement`` cell made from ``documents`` (study id ->
    ``vertebrae.json``), which hold every study of the rows' exams (:func:`exam_disagreements`)."""
    reasons = exam_disagreements(documents)
    return [[*row[:_DISAGREEMENT], one_line(reasons.get(row[0], "")), *row[_DISAGREEMENT + 1:]] for row in summaries]


def _with_review_page(texts: dict[str, str]) -> dict[str, str]:
    """The tables' texts with the review page made from them."""
    return {**texts, REVIEW_PAGE_FILE: review_page_html(texts[COHORT_STUDIES_FILE], texts[COHORT_FAILURES_FILE])}


def _table_headers() -> dict[str, list[str]]:
    """``{file name: header}`` of the four cohort tables."""
    return {COHORT_VERTEBRAE_FILE: [*STUDY_COLUMNS, *VERTEBRAE_CSV_COLUMNS],
            COHORT_DISCS_FILE: [*STUDY_COLUMNS, *discs_csv_header(), *LABELLING_COLUMNS],
            COHORT_FAILURES_FILE: list(FAILURE_COLUMNS),
            COHORT_STUDIES_FILE: list(STUDIES_COLUMNS)}


def write_cohort_tables(outdir: str | os.PathLike, studies_dir: str | os.PathLike, studies: Sequence[Study],
                        failures: Sequence[StudyFailure]) -> list[Path]:
    """Write the four cohort tables and the review page into ``outdir``, replacing them together; returns
    their paths."""
    return write_files_atomically(outdir, cohort_table_texts(studies_dir, studies, failures))


def replace_study_rows(outdir: str | os.PathLike, study: Study, folder: str | os.PathLike) -> list[Path]:
    """Replace the rows of one study in ``outdir``'s four cohort tables by those of its folder ``folder`` (after
    a correction), where its old rows were (a study without rows goes last), every other row unchanged; the
    tables and the review page made from them are replaced together. Returns their paths.

    Raises :class:`InputError`, with the tables left as they are, when the folder cannot be read, a table is
    missing or cannot be read, or it has other columns than this version writes (a cohort written by
    another version): the next ``spinenet cohort`` run writes them all again from the study folders.
    """
    outdir = Path(outdir)
    vertebrae, discs, summary, document = study_rows(study, folder)
    new_rows = {COHORT_VERTEBRAE_FILE: vertebrae, COHORT_DISCS_FILE: discs, COHORT_STUDIES_FILE: [summary],
                COHORT_FAILURES_FILE: []}
    tables = {}
    for name, header in _table_headers().items():
        try:
            with (outdir / name).open(newline="", encoding="utf-8") as handle:
                table = list(csv.reader(handle))
        except (OSError, csv.Error, UnicodeDecodeError) as error:
            raise InputError(f"cannot read {outdir / name}: {one_line(getattr(error, 'strerror', None) or error)}"
                             ) from None
        if not table or table[0] != header:
            raise InputError(f"{outdir / name} has other columns than this version of spinenet writes")
        others = [row for row in table[1:] if row[:1] != [study.study_id]]
        # every row before the study's first one is another study's: the new rows go where the old ones began
        at = next((i for i, row in enumerate(table[1:]) if row[:1] == [study.study_id]), len(others))
        tables[name] = others[:at] + new_rows[name] + others[at:]
    # the other series of the study's exam: what they say of its levels, and it of theirs, may have changed
    exam = summary[_EXAM]
    partners = {row[0] for row in tables[COHORT_STUDIES_FILE] if exam and row[_EXAM] == exam} - {study.study_id}
    documents = {study.study_id: document, **{p: _partner_document(Path(folder).parent / p) for p in partners}}
    redone = {row[0]: row for row in _with_exam_disagreements(
        [row for row in tables[COHORT_STUDIES_FILE] if row[0] in documents], documents)}
    tables[COHORT_STUDIES_FILE] = [redone.get(row[0], row) for row in tables[COHORT_STUDIES_FILE]]
    texts = {name: _csv(header, tables[name]) for name, header in _table_headers().items()}
    return write_files_atomically(outdir, _with_review_page(texts))


def _partner_document(folder: Path) -> dict:
    """The ``vertebrae.json`` of another study of the corrected study's exam; an empty document (it then
    agrees with every study) when it cannot be read: the next cohort run reads every folder again."""
    try:
        return read_result(folder)[0]
    except InputError:
        return {}


def studies_table_rows(outdir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``outdir``'s ``cohort_studies.csv`` as dictionaries; empty when there is no such table or
    it cannot be read (the next ``spinenet cohort`` run writes it again)."""
    try:
        with (Path(outdir) / COHORT_STUDIES_FILE).open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def study_table_row(outdir: str | os.PathLike, study_id: str) -> dict[str, str]:
    """The study's row of ``outdir``'s ``cohort_studies.csv`` (:func:`studies_table_rows`); {} when the table
    names no such study or cannot be read."""
    return next((row for row in studies_table_rows(outdir) if row.get("study") == study_id), {})


def exam_disagreement_of(outdir: str | os.PathLike, study_id: str) -> str:
    """The study's ``exam_disagreement`` in ``outdir``'s ``cohort_studies.csv`` (:mod:`SpineNetLib.cohort.exams`);
    "" when it has none, or the table names no such study or cannot be read."""
    return study_table_row(outdir, study_id).get("exam_disagreement") or ""


def studies_asking_for_review(outdir: str | os.PathLike) -> list[str]:
    """The ids of the studies in ``outdir``'s ``cohort_studies.csv`` that ask for a review of their levels
    (:func:`SpineNetLib.cohort.review_page.asks_for_review`), in the review page's order (the least sure
    first); empty when there is no such table or it cannot be read."""
    return [row["study"] for row in sorted(studies_table_rows(outdir), key=review_order)
            if asks_for_review(row) and row.get("study")]
