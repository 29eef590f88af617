"""The result documents as plain data: disc geometry, the disc table, level corrections, reading them back.

Why a module of its own: the Slicer module, its worker process, the batch
script and the MRML writer (:mod:`SpineNetLib.slicer.mrml`) all work from the same
two JSON documents, never from live pipeline objects, so that results can be
handed from a worker process to Slicer, saved, reloaded and corrected later:

* ``vertebrae.json`` (schema ``spinenet.vertebrae/1``, written by
  :func:`SpineNetLib.outputs.vertebrae.vertebrae_document`): per vertebra, top to
  bottom, its level, level probabilities, RAS centroid and per-slice RAS
  outline (corners rt, rb, lb, lt); and a ``"labelling"`` block with how sure
  the levels are (:mod:`SpineNetLib.label.confidence`; :func:`labelling_status`
  turns it into one line for the panel);
* ``discs.json`` (schema ``spinenet.discs/1``, written by
  :func:`SpineNetLib.outputs.discs.discs_document`):
  ``{"discs": [{"level": "L4-L5", "centre_ras": [r, a, s],
  "grades": {"Pfirrmann": {"value": 3, "probabilities": [...]}, ...},
  "measurements": {"disc_height_mean_mm": 9.1, ...}}, ...]}``.

The files (and the ``result.json`` manifest that lists them) are written by
:func:`SpineNetLib.outputs.files.write_results`; :func:`read_result` reads them back.

Nothing here imports torch, vtk or Slicer (the labelling module, which needs
torch, is imported only when a level is corrected), so the Slicer module can
import this before its Python dependencies are installed.

Hotspot files (evidence maps of the grading stage) are looked up by name in
the results folder (:func:`hotspot_files`): a map of one disc,
``hotspots/<disc>_<head>.nii.gz`` (e.g. ``hotspots/L4-L5_Pfirrmann.nii.gz``),
or a map of all discs for one head, ``hotspots_<head>.nii.gz`` (what
:func:`SpineNetLib.discs.hotspots.hotspot_maps` computes); ``.nii``, ``.nrrd``
and ``.mha`` work too.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVEL_CHOICES, LEVELS, LEVELS_TOP_DOWN, disc_name, shifted_by, shifted_to_correction
from SpineNetLib.core.results import OUTLINE_FROM_WEAKER_DETECTION, DetectionResult, Vertebra
from SpineNetLib.outputs.vertebrae import next_best_levels, vertebrae_document
from SpineNetLib.weights.resolve import trained_grading_heads

VERTEBRAE_SCHEMA = "spinenet.vertebrae/1"
DISCS_SCHEMA = "spinenet.discs/1"
#: The small manifest (``result.json``) :func:`SpineNetLib.outputs.files.write_results` writes last.
RESULT_SCHEMA = "spinenet.result/1"

#: Grading heads in the official output order (official §7): the names the grading network's heads
#: report (``SpineNetLib.models.grading.HEADS``) and hotspot files use.
GRADE_HEADS: tuple[str, ...] = (
    "Pfirrmann", "Narrowing", "CentralCanalStenosis", "Spondylolisthesis", "UpperEndplateDefect",
    "LowerEndplateDefect", "UpperMarrow", "LowerMarrow", "ForaminalStenosisLeft", "ForaminalStenosisRight",
    "Herniation",
)
#: The grading network's layer of each head above (``SpineNetLib.models.grading.HEADS``; here too so
#: that the Slicer panel can match a checkpoint's ``trained_heads`` to these names without torch).
GRADE_HEAD_LAYERS: dict[str, str] = dict(zip(GRADE_HEADS, (
    "fc_pf", "fc_nar", "fc_ccs", "fc_spn", "fc_ued", "fc_led", "fc_umc", "fc_lmc", "fc_fsl", "fc_fsr", "fc_hrn")))
#: Meaning of each grade column, under its official name and the readable name the grading
#: stage may use instead (``DiscNarrowing``, ``UpperMarrowChange``, ``LowerMarrowChange``).
GRADE_DESCRIPTIONS: dict[str, str] = {
    "Pfirrmann": "Pfirrmann grade of disc degeneration on T2, 1 (normal) to 5 (collapsed disc)",
    "Narrowing": "disc space narrowing, 1 (normal) to 4 (severe)",
    "DiscNarrowing": "disc space narrowing, 1 (normal) to 4 (severe)",
    "CentralCanalStenosis": "central canal stenosis at the disc, 1 (normal) to 4 (severe)",
    "Spondylolisthesis": "spondylolisthesis at the disc: 0 none; 1 and 2 are listhesis classes "
                         "the official code does not define",
    "UpperEndplateDefect": "defect of the endplate above the disc: 0 absent, 1 present",
    "LowerEndplateDefect": "defect of the endplate below the disc: 0 absent, 1 present",
    "UpperMarrow": "marrow signal change (Modic-type) in the body above the disc: 0 absent, 1 present",
    "UpperMarrowChange": "marrow signal change (Modic-type) in the body above the disc: 0 absent, 1 present",
    "LowerMarrow": "marrow signal change (Modic-type) in the body below the disc: 0 absent, 1 present",
    "LowerMarrowChange": "marrow signal change (Modic-type) in the body below the disc: 0 absent, 1 present",
    "ForaminalStenosisLeft": "left foraminal stenosis (side as the network names it): 0 absent, 1 present",
    "ForaminalStenosisRight": "right foraminal stenosis (side as the network names it): 0 absent, 1 present",
    "Herniation": "disc herniation: 0 absent, 1 present",
}
#: Column order of the grades in the table: official head order, either name.
_GRADE_ORDER: tuple[str, ...] = tuple(GRADE_DESCRIPTIONS)

HOTSPOT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

#: Unit of a measurement, from the end of its key.
_UNIT_SUFFIXES = (("_mm2", "mm2"), ("_mm3", "mm3"), ("_mm", "mm"), ("_deg", "deg"),
                  ("_percent", "%"), ("_pct", "%"), ("_ratio", ""))


# --------------------------------------------------------------------------- checks

def check_vertebrae_document(doc) -> dict:
    """``doc`` if it looks like a ``spinenet.vertebrae/1`` document, else :class:`InputError`."""
    if not isinstance(doc, dict) or doc.get("schema") != VERTEBRAE_SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise InputError(f"not a SpineNet vertebrae document (schema {found!r}, expected {VERTEBRAE_SCHEMA!r})")
    vertebrae = doc.get("vertebrae")
    if not isinstance(vertebrae, list):
        raise InputError("the vertebrae document has no 'vertebrae' list")
    for n, v in enumerate(vertebrae):
        polygons = v.get("polygons") if isinstance(v, dict) else None
        if not polygons or not all(np.shape(p.get("corners_ras")) == (4, 3) for p in polygons):
            raise InputError(f"vertebra {n + 1} of the vertebrae document has no valid 4-corner RAS polygons")
    return doc


def check_discs_document(doc) -> dict:
    """``doc`` if it looks like a ``spinenet.discs/1`` document, else :class:`InputError`."""
    if not isinstance(doc, dict) or doc.get("schema") != DISCS_SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise InputError(f"not a SpineNet discs document (schema {found!r}, expected {DISCS_SCHEMA!r})")
    if not isinstance(doc.get("discs"), list):
        raise InputError("the discs document has no 'discs' list")
    for n, d in enumerate(doc["discs"]):
        if not isinstance(d, dict) or not isinstance(d.get("level"), str):
            raise InputError(f"disc {n + 1} of the discs document has no level name")
    return doc


# --------------------------------------------------------------------------- geometry

def vertebra_name(vertebra: dict, index: int) -> str:
    """The level, or "V<n>" (1-based, top to bottom) for an unlabelled vertebra of a document."""
    return vertebra.get("level") or f"V{index + 1}"


def mid_polygon(vertebra: dict) -> dict:
    """A document vertebra's polygon entry on the slice closest to its median slice (ties: the lower slice)."""
    polygons = sorted(vertebra["polygons"], key=lambda p: p["slice"])
    median = float(np.median([p["slice"] for p in polygons]))
    return min(polygons, key=lambda p: (abs(p["slice"] - median), p["slice"]))


def disc_polygons(vertebrae_doc: dict) -> list[dict]:
    """The disc between each pair of consecutive vertebrae, on the slices both share.

    On each shared slice the disc is the quadrilateral
    [upper.rb, lower.rt, lower.lt, upper.lb] (official §6): the upper body's
    lower edge and the lower body's upper edge.  Pairs that share no slice
    give no disc.  Returns, top to bottom, ``{"level", "upper", "lower",
    "polygons": [{"slice", "corners_ras"}], "centre_ras"}`` where the centre
    is the mean of the corners over all shared slices.
    """
    vertebrae = vertebrae_doc["vertebrae"]
    discs = []
    for k in range(len(vertebrae) - 1):
        upper, lower = vertebrae[k], vertebrae[k + 1]
        lower_by_slice = {p["slice"]: np.asarray(p["corners_ras"], float) for p in lower["polygons"]}
        polygons = []
        for p in sorted(upper["polygons"], key=lambda p: p["slice"]):
            if p["slice"] not in lower_by_slice:
                continue
            u, l = np.asarray(p["corners_ras"], float), lower_by_slice[p["slice"]]
            polygons.append({"slice": p["slice"], "corners_ras": np.stack([u[1], l[0], l[3], u[2]]).tolist()})
        if not polygons:
            continue
        centre = np.mean([np.mean(q["corners_ras"], axis=0) for q in polygons], axis=0)
        discs.append({"level": disc_name(vertebra_name(upper, k), vertebra_name(lower, k + 1)),
                      "upper": k, "lower": k + 1, "polygons": polygons,
                      "centre_ras": np.round(centre, 3).tolist()})
    return discs


# --------------------------------------------------------------------------- the disc table

@dataclass(frozen=True)
class Column:
    """One column of the disc table: name, value kind ("str", "int", "float"), unit, meaning."""

    name: str
    kind: str
    unit: str = ""
    description: str = ""


def measurement_unit(key: str) -> str:
    for suffix, unit in _UNIT_SUFFIXES:
        if key.endswith(suffix):
            return unit
    return ""


def _grade_value(entry):
    value = entry.get("value") if isinstance(entry, dict) else entry
    return None if value is None else int(value)


def reported_probability(entry, classes=None) -> float | None:
    """Softmax probability of the reported class of one ``discs.json`` grade entry, to 3 decimals.

    ``classes`` are the column's class texts in class order, as ``discs.json``'s
    ``"grade_columns"`` lists them ("3: ..." for value 3); they place the reported value among
    the probabilities.  Without them the reported class is the most probable one (the grader
    reports the argmax).  None when the entry has no value or no probabilities.
    """
    if not isinstance(entry, dict) or entry.get("value") is None or not entry.get("probabilities"):
        return None
    probabilities = [float(p) for p in entry["probabilities"]]
    values = [str(c).split(":", 1)[0].strip() for c in (classes or [])]
    value = str(int(entry["value"]))
    index = values.index(value) if value in values else int(np.argmax(probabilities))
    return round(probabilities[index], 3) + 0.0 if index < len(probabilities) else None


def disc_table(vertebrae_doc: dict | None, discs_doc: dict | None = None) -> tuple[list[Column], list[list]]:
    """Columns and rows (one per disc, top to bottom) of the "SpineNet grades" table.

    With a discs document: level, one column per grade (official head order
    first), each followed by the probability of its reported class
    (``<grade>_probability``, :func:`reported_probability`; when the document has the
    probabilities), one per measurement (unit from the key's suffix, e.g. ``_mm``),
    then the disc centre.  Without one: level and centre of each disc
    between consecutive vertebrae.  Missing values are None.
    """
    centre_columns = [Column(f"centre_{axis}_mm", "float", "mm", f"disc centre, {name} coordinate (RAS)")
                      for axis, name in (("R", "right"), ("A", "anterior"), ("S", "superior"))]
    level_column = Column("level", "str", "", "disc level: upper and lower vertebra")
    if discs_doc is None:
        discs = disc_polygons(vertebrae_doc) if vertebrae_doc else []
        return [level_column, *centre_columns], [[d["level"], *d["centre_ras"]] for d in discs]

    discs = discs_doc["discs"]
    heads = [h for h in _GRADE_ORDER if any(h in (d.get("grades") or {}) for d in discs)]
    heads += [h for d in discs for h in (d.get("grades") or {}) if h not in heads]
    heads = list(dict.fromkeys(heads))
    measures = list(dict.fromkeys(m for d in discs for m in (d.get("measurements") or {})))
    columns, grade_cells = [level_column], []   # grade_cells: one function per grade column, disc -> cell
    for h in heads:
        values = [_grade_value((d.get("grades") or {}).get(h)) for d in discs]
        kind = "int" if all(v is not None for v in values) else "float"
        described = ((discs_doc.get("grade_columns") or {}).get(h) or {}).get("description")
        columns.append(Column(h, kind, "", described or GRADE_DESCRIPTIONS.get(h, f"grade {h}")))
        grade_cells.append(lambda d, h=h: _grade_value((d.get("grades") or {}).get(h)))
        if any(((d.get("grades") or {}).get(h) or {}).get("probabilities") for d in discs):
            classes = ((discs_doc.get("grade_columns") or {}).get(h) or {}).get("classes")
            columns.append(Column(f"{h}_probability", "float", "", f"probability of the reported {h} class"))
            grade_cells.append(lambda d, h=h, c=classes: reported_probability((d.get("grades") or {}).get(h), c))
    for m in measures:
        values = [(d.get("measurements") or {}).get(m) for d in discs]
        integer = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        described = (discs_doc.get("measurement_definitions") or {}).get(m) or m.replace("_", " ")
        columns.append(Column(m, "int" if integer else "float", measurement_unit(m), described))
    columns += centre_columns
    geometry = {d["level"]: d["centre_ras"] for d in disc_polygons(vertebrae_doc)} if vertebrae_doc else {}
    rows = []
    for d in discs:
        measurements = d.get("measurements") or {}
        centre = d.get("centre_ras") or geometry.get(d["level"]) or [None, None, None]
        row = [d["level"]]
        row += [cell(d) for cell in grade_cells]
        row += [None if measurements.get(m) is None else
                (int(measurements[m]) if c.kind == "int" else float(measurements[m]))
                for m, c in zip(measures, columns[1 + len(grade_cells):])]
        row += [None if c is None else float(c) for c in centre]
        rows.append(row)
    return columns, rows


def format_cell(value, kind: str) -> str:
    """Text of one table cell: integers plainly, floats with 2 decimals, missing as empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if kind == "int":
        return str(int(value))
    if kind == "float":
        return f"{float(value):.2f}"
    return str(value)


def table_csv_text(columns: list[Column], rows: list[list]) -> str:
    """CSV with a header of column names (units are in the names, e.g. ``_mm``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.name for c in columns])
    for row in rows:
        writer.writerow([format_cell(v, c.kind) for v, c in zip(row, columns)])
    return buffer.getvalue()


def vertebra_rows(vertebrae_doc: dict) -> list[dict]:
    """Rows of the Slicer vertebra table, top to bottom: name, level probability, first and last slice, and
    which network drew the outline (``outline_from``; "" in a document written before it was recorded)."""
    rows = []
    for i, v in enumerate(vertebrae_doc["vertebrae"]):
        slices = [p["slice"] for p in v["polygons"]]
        rows.append({"name": vertebra_name(v, i), "level": v.get("level"),
                     "probability": v.get("level_probability"),
                     "first_slice": min(slices), "last_slice": max(slices),
                     "outline_from": v.get("outline_from") or ""})
    return rows


def _two_decimals_down(value: float) -> str:
    """0.996 -> "0.99": a confidence never reads as certain before it is."""
    return f"{math.floor(float(value) * 100.0) / 100.0:.2f}"


def labelling_status(vertebrae_doc: dict | None) -> tuple[str, bool]:
    """(one line about how sure the levels are, whether they need review) from the ``"labelling"`` block.

    ``("", False)`` for a document without a confidence (no vertebrae, a
    plug-in pipeline, ground truth).  After a correction by hand the levels
    are the user's and need no review.
    """
    block = (vertebrae_doc or {}).get("labelling") or {}
    confidence = block.get("confidence")
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not math.isfinite(confidence):
        return "", False
    if block.get("corrected_by_user"):
        sure = f"the network's own labelling had confidence {_two_decimals_down(confidence)}"
        shift = shift_by_reader(vertebrae_doc)
        if shift == 0:
            return f"Levels confirmed by hand ({sure}).", False
        named = f" and named them {levels_by_network(vertebrae_doc)}" if shift is not None else ""
        return f"Levels corrected by hand ({sure}{named}).", False
    review = bool(block.get("needs_review"))
    notes = [w[:1].upper() + w[1:] for w in _grouped_shift_reasons(block.get("warnings") or [])]
    lines = notes if review else [f"Level labelling confidence {_two_decimals_down(confidence)}", *notes]
    alike = series_alike(block)
    if alike:   # a second opinion that agrees is said too; one that does not is a review reason above
        lines.append(alike[:1].upper() + alike[1:])
    return ". ".join(lines) + ".", review


#: How the preview and the Slicer scene name a series' own levels where it took another series' (``OWN_READING``).
OWN_READING = "this series on its own"
#: The colour (RGB, 0-255) in which the preview and the Slicer scene draw the :func:`other_readings`: magenta.
OTHER_READING_COLOUR = (255, 90, 200)


def other_readings(vertebrae_doc: dict) -> list[dict]:
    """The other readings of the scan's levels that the preview and the Slicer scene draw on it, each
    ``{"series", "vertebrae": [{"level", "centroid_ras"}]}``: the ``other_series_levels`` entries of the exam's
    series that name a vertebra otherwise (``disagreeing_series``), and, where the scan took another series'
    levels (``levels_taken_from_series``), its own levels at its vertebrae, as :data:`OWN_READING`."""
    labelling = vertebrae_doc.get("labelling") or {}
    disagreeing = set(labelling.get("disagreeing_series") or [])
    readings = [other for other in labelling.get("other_series_levels") or [] if other.get("series") in disagreeing]
    own = (labelling.get("levels_taken_from_series") or {}).get("own_levels") or []
    vertebrae = vertebrae_doc.get("vertebrae") or []
    if own and len(own) == len(vertebrae):
        readings.append({"series": OWN_READING, "vertebrae": [
            {"level": level, "centroid_ras": vertebra["centroid_ras"]} for level, vertebra in zip(own, vertebrae)
            if level and vertebra.get("centroid_ras")]})
    return readings


#: How the preview and the Slicer scene name the labelling's best shifted alternative (:func:`next_best_reading`).
NEXT_BEST_READING = "the next best labelling"
#: The colour (RGB, 0-255) in which they draw it: a light red, apart from the outlines, level names, discs and
#: other series' levels (the preview's review banner names the same labelling in words: "the next best
#: labelling calls the lowest body S2 instead of S1").
NEXT_BEST_COLOUR = (255, 96, 96)

#: The Slicer scene's colour (RGB, 0-1) per spine region, two shades alternating so that neighbours differ: the
#: vertebra outlines and segments (:func:`level_colour`); the discs' segments are cyan.
REGION_COLOURS = {
    "C": ((0.62, 0.47, 0.85), (0.78, 0.66, 0.95)),
    "T": ((0.25, 0.58, 0.89), (0.45, 0.75, 0.97)),
    "L": ((0.96, 0.58, 0.19), (0.99, 0.79, 0.31)),
    "S": ((0.36, 0.76, 0.42), (0.57, 0.88, 0.56)),
}
UNLABELLED_COLOUR = (0.75, 0.75, 0.75)
SEGMENT_DISC_COLOUR = (0.35, 0.90, 0.95)


def level_colour(level: str | None) -> tuple[float, float, float]:
    """Region colour of a level (C, T, L, S), alternating shades by level."""
    shades = REGION_COLOURS.get(level[0]) if level else None
    if shades is None:
        return UNLABELLED_COLOUR
    order = list(LEVELS_TOP_DOWN) + ["S2"]
    return shades[order.index(level) % 2] if level in order else shades[0]


def rough_outline(vertebra: dict) -> bool:
    """Whether a document vertebra's (or a ``vertebrae_measurements`` row's) outline was drawn by a detection
    below the detector's threshold (``outline_from``, :data:`SpineNetLib.core.results.OUTLINE_FROM_WEAKER_DETECTION`):
    rougher, so the preview dashes it, the Slicer scene draws it unfilled and its discs carry a line saying so."""
    return vertebra.get("outline_from") == OUTLINE_FROM_WEAKER_DETECTION


def _below_centre(vertebra: dict) -> list[float]:
    """40 % of the way from a document vertebra's centre to the middle of its lower edge (corners rb, lb of its
    mid-slice outline); the centre itself for a vertebra without an outline."""
    centre = np.asarray(vertebra["centroid_ras"], float)
    if not vertebra.get("polygons"):
        return [float(x) for x in centre]
    corners = np.asarray(mid_polygon(vertebra)["corners_ras"], float)
    return [float(x) for x in centre + 0.4 * ((corners[1] + corners[2]) / 2.0 - centre)]


def next_best_reading(vertebrae_doc: dict) -> dict | None:
    """Where the levels need a review, the labelling's best alternative shifted by one level
    (``shifted_alternative``, :mod:`SpineNetLib.label.confidence`) as ``{"series": NEXT_BEST_READING,
    "vertebrae": [{"level", "centroid_ras", "index", "marker_ras"}]}``, at each vertebra it names otherwise
    (``index``: its place in ``vertebrae``, top to bottom), so that the reviewer sees both candidate readings
    on the image. ``marker_ras`` is where the preview and the Slicer scene put that level: 40 % of the way from
    the centre to the middle of the body's lower edge on its mid-slice outline, clear of the level's own label.

    None where :func:`~SpineNetLib.outputs.vertebrae.next_best_levels` is (no review asked, levels corrected by
    hand or taken from another series, whose own levels :func:`other_readings` draws)."""
    alternative = next_best_levels(vertebrae_doc)
    if alternative is None:
        return None
    vertebrae = vertebrae_doc.get("vertebrae") or []
    differing = [{"level": str(level), "centroid_ras": vertebra["centroid_ras"], "index": k,
                  "marker_ras": _below_centre(vertebra)}
                 for k, (level, vertebra) in enumerate(zip(alternative, vertebrae))
                 if level and level != vertebra.get("level") and vertebra.get("centroid_ras")]
    return {"series": NEXT_BEST_READING, "vertebrae": differing} if differing else None


def series_alike(labelling: dict) -> str:
    """"the exam's series 'T1' (series 3) and 'STIR' (series 5) name the vertebrae alike": the exam's other
    series that show the same vertebrae and name them alike (``agreeing_series``); "" where none do."""
    names = list(labelling.get("agreeing_series") or [])
    if not names:
        return ""
    named = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return f"the exam's series {named} name{'s' if len(names) == 1 else ''} the vertebrae alike"


#: How every review reason that the levels may be one off begins (``label/confidence.py``).
_SHIFT_PREFIX = "levels may be shifted by one"


def _grouped_shift_reasons(warnings: list[str]) -> list[str]:
    """The warnings with two or more "levels may be shifted by one ..." reasons said once, numbered:
    "levels may be shifted by one, for 2 reasons: (1) ...; (2) ...", in the first one's place."""
    reasons = []
    for warning in warnings:
        rest = warning[len(_SHIFT_PREFIX):] if warning.startswith(_SHIFT_PREFIX) else None
        if rest is not None and rest.startswith(": "):
            reasons.append(rest[2:])
        elif rest is not None and rest.startswith(" (") and "): " in rest:
            how_sure, _, what = rest[2:].partition("): ")     # "(confidence 0.50): the next best ..."
            reasons.append(f"{how_sure}: {what}")
        else:
            reasons.append(None)
    if sum(r is not None for r in reasons) < 2:
        return list(warnings)
    shift_reasons = [r for r in reasons if r is not None]
    numbered = "; ".join(f"({n}) {r}" for n, r in enumerate(shift_reasons, 1))
    grouped, out = f"{_SHIFT_PREFIX}, for {len(shift_reasons)} reasons: {numbered}", []
    for warning, reason in zip(warnings, reasons):
        if reason is None:
            out.append(warning)
        elif grouped not in out:
            out.append(grouped)
    return out


# --------------------------------------------------------------------------- corrections

def corrected_levels(vertebrae_doc: dict, index: int, level: str) -> list[str]:
    """Levels of all vertebrae after the user names vertebra ``index`` (top to bottom) ``level``: the
    whole chain shifted with it (:func:`SpineNetLib.core.levels.shifted_to_correction`).

    Not the labelling's beam search re-run with that body pinned: on the near-certain probabilities the
    networks give, it kept every other body where it was and named two bodies alike ("L3 L3") rather
    than move them, so a spine named one level off needed each body corrected by hand.
    """
    vertebrae = vertebrae_doc["vertebrae"]
    n = len(vertebrae)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise InputError(f"vertebra index {index!r} is out of range (0 to {n - 1})")
    if level not in LEVEL_CHOICES:
        raise InputError(f"unknown level {level!r} (use C2..C7, T1..T12, L1..L5, S1 or S2)")
    return shifted_to_correction([v.get("level") for v in vertebrae], int(index), level)


def _mark_corrected(doc: dict, new_levels: list) -> None:
    """The levels are now the user's: no review and no labelling warnings; the confidence stays the network's,
    and what the network said before the first correction is kept under ``"before_correction"`` (its levels,
    whether it asked for a review and why): the record of an automated reading a person overrode."""
    block = doc.get("labelling")
    if not isinstance(block, dict) or "confidence" not in block:
        return
    if "before_correction" not in block:
        block["before_correction"] = {"levels": [v.get("level") for v in doc["vertebrae"]],
                                      "needs_review": bool(block.get("needs_review")),
                                      "warnings": list(block.get("warnings") or [])}
    stale = set(block.get("warnings") or [])
    if isinstance(doc.get("warnings"), list):
        doc["warnings"] = [w for w in doc["warnings"] if w not in stale]
    block.update(corrected_by_user=True, needs_review=False, warnings=[], s1_found="S1" in new_levels)
    # these doubted the network's levels (most its S1), which the user has now decided
    for doubt in ("s1_may_be_l5", "same_level_twice", "moved_up_to_weaker_s1", "s1_at_image_edge",
                  "s1_cut_by_image_edge", "s1_at_image_edge_relabelled", "orientation_doubt", "signal_void",
                  "levels_counted_across_void"):
        block.pop(doubt, None)


def apply_level_correction(vertebrae_doc: dict, index: int, level: str,
                           discs_doc: dict | None = None) -> tuple[dict, dict | None]:
    """New (vertebrae, discs) documents with vertebra ``index`` corrected to ``level``.

    The inputs are not modified.  Each vertebra's ``level_probability`` is
    re-read for its new level, the correction is appended to
    ``"corrections"``, and discs are renamed after their vertebrae (a disc
    keeps its grades: it is the same disc, only its name changes), with
    whatever in the discs document depends on the levels: the vertebrae's
    measurements, the lordosis between the new L1 and S1, and the warnings
    that name levels (:func:`SpineNetLib.outputs.relevel.relevelled_discs_document`).  The
    ``"labelling"`` block is marked ``corrected_by_user``: the levels need no
    review and its warnings are dropped (from the top-level ``"warnings"``
    too); ``confidence`` still describes the network's own labelling.
    """
    new_levels = corrected_levels(vertebrae_doc, index, level)
    doc = copy.deepcopy(vertebrae_doc)
    _mark_corrected(doc, new_levels)   # before the levels change: it keeps the network's
    doc.setdefault("corrections", []).append({"vertebra": int(index), "level": level})
    return _renamed(vertebrae_doc, doc, new_levels, discs_doc)


def apply_taken_levels(vertebrae_doc: dict, discs_doc: dict | None, shift: int, source: str,
                       reason: str, rule: str) -> tuple[dict, dict | None]:
    """New (vertebrae, discs) documents of a scan that takes the levels of another series of its exam, which
    names each of its vertebrae ``shift`` levels further down the spine (``source``: how the other series is
    named; ``reason``: :func:`SpineNetLib.core.levels.taken_levels_reason`), as ``spinenet run`` takes them
    (:mod:`SpineNetLib.label.other_series`): the levels still ask for a review, the reason first; the
    ``"labelling"`` block records ``levels_taken_from_series`` (``series``, ``shift``, the scan's ``own_levels``,
    the ``rule``: :func:`SpineNetLib.core.levels.levels_to_take_from`),
    and its other entries still describe the scan's own labelling. Discs are renamed as by
    :func:`apply_level_correction`. The inputs are not modified; ``spinenet cohort`` (``cohort/exams.py``)."""
    own = [v.get("level") for v in vertebrae_doc["vertebrae"]]
    new_levels = shifted_by(own, shift)
    doc = copy.deepcopy(vertebrae_doc)
    block = doc.setdefault("labelling", {})
    labelling_warnings = list(block.get("warnings") or [])
    scan_warnings = [w for w in doc.get("warnings") or [] if w not in set(labelling_warnings)]
    block.update(needs_review=True, warnings=[reason, *labelling_warnings], s1_found="S1" in new_levels,
                 levels_taken_from_series={"series": source, "shift": int(shift), "own_levels": own, "rule": rule})
    doc["warnings"] = scan_warnings + block["warnings"]
    return _renamed(vertebrae_doc, doc, new_levels, discs_doc)


def _renamed(vertebrae_doc: dict, doc: dict, new_levels: list, discs_doc: dict | None) -> tuple[dict, dict | None]:
    """``doc`` (a copy of ``vertebrae_doc``) with its vertebrae named ``new_levels``, each ``level_probability``
    read again for its new level, and ``discs_doc`` renamed after the new names
    (:func:`SpineNetLib.outputs.relevel.relevelled_discs_document`), or None without one."""
    old_names = [vertebra_name(v, i) for i, v in enumerate(vertebrae_doc["vertebrae"])]
    for v, name in zip(doc["vertebrae"], new_levels):
        v["level"] = name
        probs = v.get("level_probabilities") or {}
        if probs:
            v["level_probability"] = round(float(probs.get("S1" if name == "S2" else name, 0.0)), 4)
    new_names = [vertebra_name(v, i) for i, v in enumerate(doc["vertebrae"])]
    discs = None
    if discs_doc is not None:
        from SpineNetLib.outputs.relevel import relevelled_discs_document   # numpy and scipy: only when correcting

        spacing_chosen_by_run = "pixel_spacing_factor" in (vertebrae_doc.get("labelling") or {})
        discs = relevelled_discs_document(discs_doc, old_names, new_names, check_body_sizes=not spacing_chosen_by_run)
    return doc, discs


def levels_by_network(vertebrae_doc: dict) -> str:
    """The levels as the network named them before a reader corrected them (``labelling.before_correction``),
    top and bottom (``T11..L5``; an unlabelled vertebra as ``V<n>``), or "" when nobody corrected them."""
    before = ((vertebrae_doc.get("labelling") or {}).get("before_correction") or {}).get("levels") or []
    names = [name or f"V{i + 1}" for i, name in enumerate(before)]
    return f"{names[0]}..{names[-1]}" if names else ""


def shift_by_reader(vertebrae_doc: dict) -> int | str | None:
    """How many levels a reader moved the network's levels (``labelling.before_correction``): 0 when the
    reader confirmed them, +1 when every level moved one down (L5 named L4 by the network), -1 one up;
    "mixed" when the vertebrae moved by different numbers of levels; None when nobody corrected them or
    no vertebra has a level both before and after."""
    before = ((vertebrae_doc.get("labelling") or {}).get("before_correction") or {}).get("levels")
    if not isinstance(before, list) or len(before) != len(vertebrae_doc.get("vertebrae") or []):
        return None
    order = list(LEVEL_CHOICES)   # top to bottom, C2 .. S2
    moves = {order.index(now) - order.index(then) for then, now in
             zip(before, (v.get("level") for v in vertebrae_doc["vertebrae"])) if then in order and now in order}
    if not moves:
        return None
    return moves.pop() if len(moves) == 1 else "mixed"


# --------------------------------------------------------------------------- ground truth

def vertebrae_document_from_truth(scan, truth, timings_s: dict | None = None) -> dict:
    """A ``vertebrae.json`` document of ground-truth quads (a phantom's, an annotation's).

    ``truth`` holds objects with ``.level``, ``.slices`` (canonical) and
    ``.quads`` (canonical slice -> (4, 2) corners rt, rb, lb, lt); each level
    gets a one-hot probability.  Used by tests and the module self-test to
    exercise everything downstream of the networks without trained weights.
    """
    vertebrae = []
    for t in truth:
        one_hot = np.zeros(len(LEVELS))
        name = "S1" if t.level == "S2" else t.level
        if name in LEVELS:
            one_hot[LEVELS.index(name)] = 1.0
        slices = sorted(int(s) for s in t.slices)
        vertebrae.append(Vertebra(slices=slices, polygons=[np.asarray(t.quads[s], float) for s in slices],
                                  level=t.level, level_probabilities=one_hot))
    return vertebrae_document(scan, DetectionResult(vertebrae=vertebrae, timings_s=dict(timings_s or {})))


def discs_document_from_truth(scan, truth_discs) -> dict:
    """A ``discs.json`` document of ground-truth disc geometry (no grades): level, centre, heights.

    ``truth_discs`` holds objects with ``.name``, ``.centre_xy``, ``.mid_slice``
    (canonical) and ``.anterior_height_mm``/``.posterior_height_mm``, as a
    phantom's discs do.  Used by tests and the README screenshots.
    """
    discs = []
    for d in truth_discs:
        centre = scan.xy_to_ras(np.asarray(d.centre_xy, float), d.mid_slice)[0]
        discs.append({"level": d.name, "centre_ras": np.round(centre, 3).tolist(), "grades": {},
                      "measurements": {"disc_height_anterior_mm": round(float(d.anterior_height_mm), 2),
                                       "disc_height_posterior_mm": round(float(d.posterior_height_mm), 2)}})
    return {"schema": DISCS_SCHEMA, "source": "ground truth", "discs": discs}


# --------------------------------------------------------------------------- files

def hotspot_heads(weights=None) -> tuple[str, ...]:
    """The grading heads (:data:`GRADE_HEADS` names) whose evidence hotspots the weights ``weights``
    ("bundled", "official" or a folder) can show: the heads their grader trained. A head the grader
    did not train gets no map (the run says so in a warning), so the Slicer panel does not offer it.
    Every head when the grader records none (the official weights) or the weights cannot be found;
    none when there is no grader. Reads no network (no torch)."""
    trained = trained_grading_heads(weights)
    if trained is None:
        return GRADE_HEADS
    return tuple(head for head in GRADE_HEADS if GRADE_HEAD_LAYERS[head] in trained)


def hotspot_files(folder, disc: str, head: str) -> list[Path]:
    """Hotspot images for one disc and grading head in a results folder, best first (may be empty).

    A map of that disc (``hotspots/<disc>_<head>.*``) comes before a map of
    all discs for the head (``hotspots_<head>.*``, in the folder or in
    ``hotspots/``).
    """
    if not folder:
        return []
    folder = Path(folder)
    names = [Path("hotspots") / f"{disc}_{head}", Path(f"{disc}_{head}"),
             Path(f"hotspots_{head}"), Path("hotspots") / f"hotspots_{head}"]
    return [folder / f"{name}{suffix}" for name in names for suffix in HOTSPOT_SUFFIXES
            if (folder / f"{name}{suffix}").is_file()]


def disc_names_in_folder(folder, vertebrae_doc: dict | None) -> dict[str, str]:
    """``{disc name now: disc name in the folder}`` of the discs that a level correction renamed since the
    folder was written, from its ``vertebrae.json`` and ``vertebrae_doc`` (the same bodies, top to bottom,
    as :func:`apply_level_correction` leaves them): a map of one disc (``hotspots/<disc>_<head>.*``) is
    filed under the folder's name. Empty without a ``vertebrae.json`` there."""
    path = Path(folder) / "vertebrae.json" if folder else None
    if vertebrae_doc is None or path is None or not path.is_file():
        return {}
    then = [vertebra_name(v, i) for i, v in enumerate(read_json(path, "vertebrae document").get("vertebrae") or [])]
    now = [vertebra_name(v, i) for i, v in enumerate(vertebrae_doc.get("vertebrae") or [])]
    if len(then) != len(now):
        raise InputError(f"the results hold {len(now)} vertebrae and {path} {len(then)}: they are not the same "
                         "run's")
    pairs = ((disc_name(now[k], now[k + 1]), disc_name(then[k], then[k + 1])) for k in range(len(now) - 1))
    return {a: b for a, b in pairs if a != b}


def hotspot_node_name(relative_path) -> str:
    """Node name of a hotspot file: "hotspots/L4-L5_Pfirrmann.nii.gz" -> "SpineNet hotspot L4-L5 Pfirrmann"."""
    name = Path(relative_path).name
    for suffix in HOTSPOT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.startswith("hotspots_"):
        name = "all discs " + name[len("hotspots_"):]
    return "SpineNet hotspot " + name.replace("_", " ")


def list_hotspot_files(folder) -> list[str]:
    """Hotspot images in a results folder, as paths relative to it (for the ``result.json`` manifest)."""
    folder = Path(folder)
    found = []
    for base in (folder, folder / "hotspots"):
        if base.is_dir():
            for p in base.iterdir():
                is_image = p.is_file() and any(p.name.endswith(s) for s in HOTSPOT_SUFFIXES)
                if is_image and (base != folder or p.name.startswith("hotspots_")):
                    found.append(p.relative_to(folder).as_posix())
    return sorted(found)


def read_json(path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {what} {path}: {' '.join(str(error).split())}") from None


def read_result(path) -> tuple[dict, dict | None, Path]:
    """(vertebrae document, discs document or None, results folder) of a ``result.json``
    manifest, a results folder, or a ``vertebrae.json`` file."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if p.is_dir():
        p = folder / "result.json" if (folder / "result.json").is_file() else folder / "vertebrae.json"
    doc = read_json(p, "result file")
    if isinstance(doc, dict) and doc.get("schema") == RESULT_SCHEMA:
        vertebrae = read_json(folder / doc["vertebrae"], "vertebrae document")
        discs = read_json(folder / doc["discs"], "discs document") if doc.get("discs") else None
    else:
        vertebrae = doc
        discs = read_json(folder / "discs.json", "discs document") if (folder / "discs.json").is_file() else None
    check_vertebrae_document(vertebrae)
    if discs is not None:
        check_discs_document(discs)
    return vertebrae, discs, folder
