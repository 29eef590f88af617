"""Result files of the disc stage: ``discs.json`` and ``discs.csv``.

``discs.json`` (schema ``spinenet.discs/1``), read by the Slicer module
(:mod:`SpineNetLib.outputs.documents`)::

    {"schema": "spinenet.discs/1", "input": {...}, "scan": {...},
     "grading": {"status": "done" | "not run", "reason": "...", "weights": "bundled" | "official" | <folder>,
                 "heads_not_trained": {column: reason}, ...},   # the last only when some heads are untrained
     "grade_columns": {"Pfirrmann": {"description", "classes", "official_name"}, ...},
     "discs": [{"level": "L4-L5", "upper_vertebra": 4, "lower_vertebra": 5,
                "centre_ras": [r, a, s], "slice": <input slice index>,
                "grades": {"Pfirrmann": {"value": 3, "probabilities": [...]}, ...},   # {} when not graded;
                                                   # columns of untrained heads are absent
                "measurements": {"disc_height_anterior_mm": 11.2, ..., "slip_percent": 3.1},
                "volume_to_ras": 4x4 | null, "reference_intensity": 512.0 | null}, ...],
     "vertebrae_measurements": [{"level": "L1", "anterior_height_mm": ..., "genant_grade": 0}, ...],
     "spine_measurements": {"lumbar_lordosis_deg": 52.3 | null, "pixel_spacing_mm": [row, col]},
     "measurement_definitions": {key: text}}

Discs and vertebrae are listed top to bottom.  Coordinates are the input's
RAS millimetres and slice indices the input's own, as in ``vertebrae.json``
(:mod:`SpineNetLib.outputs.vertebrae`).  ``volume_to_ras`` maps a grading-volume index
``[slice, row, col, 1]`` to RAS, so evidence maps can be overlaid.  Units are
in the measurement names (``_mm``, ``_deg``, ``_percent``); values that
cannot be computed are ``null``.

``discs.csv`` has one row per disc, top to bottom, with headers a
radiologist reads without a legend: the level, each grade followed by the
probability of its reported class (``Pfirrmann``, ``Pfirrmann_probability``, ...;
:data:`GRADE_CSV_COLUMNS`), the measurements, ``grading_weights``, the
grading block's weight source, and ``sequence``, the scan's weighting as the grading
judged it (:func:`sequence_cell`; both the same on every row).  The learned columns
are empty when the discs were not graded (``discs.json`` says why) and for the
heads the weights did not train.  The files are written by
:func:`SpineNetLib.outputs.files.write_results`.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Sequence

import numpy as np

from SpineNetLib.discs.grading import GRADE_COLUMNS, DiscGrades
from SpineNetLib.discs.extraction import IVDVolume, sample_to_ras
from SpineNetLib.discs.measurements import SpineMeasurements, disc_measurement_warnings
# the run's warning for a scan the grader is not given, for readers of the documents (cohort/tables.py)
from SpineNetLib.discs.weighting import not_graded_warning  # noqa: F401
from SpineNetLib.outputs.documents import disc_table, reported_probability, table_csv_text
from SpineNetLib.outputs.vertebrae import input_description, scan_description
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan

DISCS_SCHEMA = "spinenet.discs/1"

#: DiscMeasurements field -> (discs.json key, discs.csv header, decimals; None = integer).
DISC_MEASUREMENTS: dict[str, tuple[str, str, int | None]] = {
    "anterior_height_mm": ("disc_height_anterior_mm", "Disc height anterior (mm)", 2),
    "middle_height_mm": ("disc_height_middle_mm", "Disc height middle (mm)", 2),
    "posterior_height_mm": ("disc_height_posterior_mm", "Disc height posterior (mm)", 2),
    "mean_height_mm": ("disc_height_mean_mm", "Disc height mean (mm)", 2),
    "disc_height_index": ("disc_height_index", "Disc height index", 3),
    "farfan_index": ("farfan_index", "Farfan index", 3),
    "slip_mm": ("slip_mm", "Slip (mm)", 2),
    "slip_percent": ("slip_percent", "Slip (%)", 1),
    "meyerding_grade": ("meyerding_grade", "Meyerding grade", None),
    "segmental_angle_deg": ("segmental_angle_deg", "Segmental angle (deg)", 2),
    "disc_angle_deg": ("disc_angle_deg", "Disc angle (deg)", 2),
    "signal_ratio": ("disc_signal_ratio", "Disc signal ratio", 3),
}

#: VertebraMeasurements field -> decimals (None = integer), in discs.json "vertebrae_measurements".
VERTEBRA_MEASUREMENTS: dict[str, int | None] = {
    "anterior_height_mm": 2, "middle_height_mm": 2, "posterior_height_mm": 2,
    "wedge_ratio": 3, "biconcavity_ratio": 3, "height_reduction_percent": 1, "genant_grade": None,
    "upper_endplate_length_mm": 2, "lower_endplate_length_mm": 2, "upper_endplate_angle_deg": 3,
}

MEASUREMENT_DEFINITIONS: dict[str, str] = {
    "disc_height_anterior_mm": "upper body's anterior-inferior to lower body's anterior-superior corner, "
                               "perpendicular to the disc mid-plane (bisector of its endplates)",
    "disc_height_middle_mm": "between the midpoints of the two endplates, perpendicular to the disc mid-plane",
    "disc_height_posterior_mm": "upper body's posterior-inferior to lower body's posterior-superior corner, "
                                "perpendicular to the disc mid-plane",
    "disc_height_mean_mm": "mean of the anterior, middle and posterior disc heights",
    "disc_height_index": "mean disc height / mean middle height of the two adjacent bodies",
    "farfan_index": "(anterior + posterior disc height) / disc AP depth (mean length of its endplates)",
    "slip_mm": "posterior-inferior corner of the upper body relative to the posterior-superior corner of the "
               "lower body, along the disc mid-plane; positive = anterolisthesis, negative = retrolisthesis",
    "slip_percent": "slip as a percentage of the lower body's upper endplate length",
    "meyerding_grade": "0 = slip under 3 mm; 1-5 = Meyerding I (<25 %), II (25-50 %), III (50-75 %), "
                       "IV (75-100 %), V (>100 %)",
    "segmental_angle_deg": "angle between the upper endplates of the upper and lower bodies; positive = lordotic",
    "disc_angle_deg": "angle between the two endplates bounding the disc; positive = lordotic",
    "disc_signal_ratio": "median intensity of the disc's central part / median intensity of the adjacent bodies "
                         "(meaningful on T2)",
    "genant_grade": "Genant semi-quantitative grade from the largest height reduction: 0 <20 %, 1 20-25 %, "
                    "2 25-40 %, 3 >40 %",
    "upper_endplate_angle_deg": "the body's upper endplate (anterior to posterior corner) from the image rows on "
                                "its mid slice; positive = its posterior end lower",
    "lumbar_lordosis_deg": "angle between the upper endplates of L1 and S1; positive = lordotic",
    "pixel_spacing_mm": "the in-plane pixel spacing (rows, columns) every size in mm rests on",
}

#: The learned columns of discs.csv: each grade column, then the probability of its reported class.
GRADE_CSV_COLUMNS: tuple[str, ...] = tuple(h for name in GRADE_COLUMNS for h in (name, f"{name}_probability"))
MEYERDING_NAMES = ("none", "I", "II", "III", "IV", "V")


def _number(value, decimals: int | None):
    """A JSON-safe rounded number (None for missing or non-finite values)."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return int(round(value)) if decimals is None else round(value, decimals) + 0.0  # no "-0.0"


def _round_list(values, decimals: int) -> list:
    return np.round(np.asarray(values, dtype=float), decimals).tolist()


def grade_entries(grades: DiscGrades | None) -> dict:
    """``{column: {"value": v, "probabilities": [...]}}`` in column order ({} when not graded)."""
    if not grades:
        return {}
    out = {}
    for name in GRADE_COLUMNS:
        if name in grades:
            value, probs = grades[name]
            out[name] = {"value": int(value), "probabilities": _round_list(probs, 4)}
    return out


def discs_document(scan: Scan, vertebrae: Sequence[Vertebra], ivds: Sequence[IVDVolume],
                   grades: Sequence[DiscGrades] | None, measurements: SpineMeasurements | None,
                   grading_status: dict) -> dict:
    """The ``discs.json`` document (module docstring).

    ``grades`` is aligned with ``ivds`` (None when not graded); the discs are
    those of ``measurements`` (every disc pair) and of ``ivds``, matched by
    their vertebra indices.  ``grading_status`` is e.g. ``{"status": "done"}``
    or ``{"status": "not run", "reason": "..."}``.
    """
    graded = grading_status.get("status") == "done" and grades is not None
    by_pair: dict[tuple[int, int], dict] = {}
    for k, ivd in enumerate(ivds):
        entry = by_pair.setdefault((ivd.upper_index, ivd.lower_index), {})
        entry["ivd"] = ivd
        if graded and k < len(grades):
            entry["grades"] = grades[k]
    for d in (measurements.discs if measurements is not None else []):
        by_pair.setdefault((d.upper_index, d.lower_index), {})["measurements"] = d

    discs = []
    for pair in sorted(by_pair):
        entry = by_pair[pair]
        ivd: IVDVolume | None = entry.get("ivd")
        m = entry.get("measurements")
        # Centre: the mean of the disc's corners (as documents.disc_polygons), else the volume's centre.
        if m is not None:
            level, centre_xy, mid = m.level, m.centre_xy, m.mid_slice
        else:
            level, centre_xy, mid = ivd.level, ivd.centre_xy, ivd.mid_slice
        values = m.values() if m is not None else {}
        discs.append({
            "level": level,
            "upper_vertebra": int(pair[0]),
            "lower_vertebra": int(pair[1]),
            "centre_ras": _round_list(scan.xy_to_ras(np.asarray(centre_xy, float), mid)[0], 3),
            "slice": scan.input_slice_index(mid),
            "grades": grade_entries(entry.get("grades")),
            "measurements": {key: _number(values.get(field), decimals)
                             for field, (key, _, decimals) in DISC_MEASUREMENTS.items()} if m is not None else {},
            "volume_to_ras": _round_list(sample_to_ras(scan, ivd), 6) if ivd is not None else None,
            "reference_intensity": _number(ivd.reference_intensity, 3) if ivd is not None else None,
            "measurement_warnings": disc_measurement_warnings(m, measurements.vertebrae) if m is not None else [],
        })

    status = {k: v for k, v in grading_status.items()}
    status.setdefault("status", "not run")
    status["slice_direction"] = ("grading volumes run patient right to left; the training direction of the "
                                 "official network is unknown, which affects only the left/right foraminal heads")
    vertebrae_rows = []
    for vm in (measurements.vertebrae if measurements is not None else []):
        row = {"level": vm.level, "index": int(vm.index)}
        row.update({k: _number(getattr(vm, k), d) for k, d in VERTEBRA_MEASUREMENTS.items()})
        row["outline_from"] = vm.outline_from   # its discs' lines are made again from it when a level is corrected
        vertebrae_rows.append(row)
    lordosis = measurements.lumbar_lordosis_deg if measurements is not None else None
    return {
        "schema": DISCS_SCHEMA,
        "input": input_description(scan),
        "scan": scan_description(scan),
        "grading": status,
        "grade_columns": {c.name: {"description": c.description, "classes": list(c.classes),
                                   "official_name": c.official_name} for c in GRADE_COLUMNS.values()},
        "discs": discs,
        "vertebrae_measurements": vertebrae_rows,
        "spine_measurements": {"lumbar_lordosis_deg": _number(lordosis, 2),
                               "pixel_spacing_mm": [round(float(scan.spacing_mm[0]), 6),
                                                    round(float(scan.spacing_mm[1]), 6)]},
        "measurement_definitions": dict(MEASUREMENT_DEFINITIONS),
    }


def _csv_cell(value, decimals: int | None, key: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if key == "meyerding_grade":
        return MEYERDING_NAMES[int(value)] if 0 <= int(value) < len(MEYERDING_NAMES) else str(int(value))
    if decimals is None:
        return str(int(value))
    return f"{round(float(value), decimals) + 0.0:.{decimals}f}"  # + 0.0: no "-0.00"


def discs_csv_header() -> list[str]:
    return ["Level", *GRADE_CSV_COLUMNS, *(header for _, header, _ in DISC_MEASUREMENTS.values()),
            "measurement_warning", "grading_weights", "sequence"]


def sequence_cell(grading: dict) -> str:
    """The ``sequence`` cell: the weighting the grading block records and where it came from, e.g.
    "T1 (image)" (``discs/weighting.py``; a scan that is not T2-weighted is not graded); empty where it
    was not asked (grading off, or no grader)."""
    weighting = grading.get("weighting") or {}
    if not weighting.get("weighting"):
        return ""
    source = {"user": "as given"}.get(weighting.get("source"), weighting.get("source") or "")
    return f"{weighting['weighting']} ({source})" if source else str(weighting["weighting"])


def grade_csv_cells(grades: dict) -> list[str]:
    """The :data:`GRADE_CSV_COLUMNS` cells of one disc's ``discs.json`` grades (empty where not graded)."""
    cells = []
    for name, column in GRADE_COLUMNS.items():
        entry = grades.get(name)
        probability = reported_probability(entry, column.classes)
        cells += ["" if not entry or entry.get("value") is None else str(int(entry["value"])),
                  "" if probability is None else f"{probability:.3f}"]
    return cells


def discs_csv_text(discs_doc: dict | None, vertebrae_doc: dict | None = None) -> str:
    """``discs.csv``: one row per disc of a ``discs.json`` document, top to bottom (module docstring).

    Without a discs document (a plug-in pipeline with no disc stage) the
    rows are the discs between consecutive vertebrae of ``vertebrae_doc``,
    with their level and centre (:func:`SpineNetLib.outputs.documents.disc_table`).
    """
    if discs_doc is None:
        return table_csv_text(*disc_table(vertebrae_doc))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(discs_csv_header())
    grading = discs_doc.get("grading") or {}
    source, sequence = grading.get("weights") or "", sequence_cell(grading)
    for d in discs_doc["discs"]:
        measures = d.get("measurements") or {}
        row = [d["level"], *grade_csv_cells(d.get("grades") or {})]
        row += [_csv_cell(measures.get(key), decimals, key) for key, _, decimals in DISC_MEASUREMENTS.values()]
        writer.writerow(row + ["; ".join(d.get("measurement_warnings") or []), str(source), sequence])
    return buffer.getvalue()

