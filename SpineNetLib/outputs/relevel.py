"""A discs document after its vertebrae were renamed (a level corrected after review,
:func:`SpineNetLib.outputs.documents.apply_level_correction`).

Its own module so that :mod:`SpineNetLib.outputs.documents`, which the Slicer module imports before its
Python dependencies are installed, reaches the measurement rules only when a level is corrected.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

from SpineNetLib.core.levels import disc_name
from SpineNetLib.core.results import OUTLINE_FROM_WEAKER_DETECTION
from SpineNetLib.discs.extraction import skipped_disc_message
from SpineNetLib.discs.measurements import (BODY_SIZE_WARNING_START, body_size_warning, disc_height_warnings,
                                            lordosis_from_endplate_angles)

def relevelled_discs_document(discs_doc: dict, old_names: Sequence[str], new_names: Sequence[str], *,
                              check_body_sizes: bool = True) -> dict:
    """A copy of ``discs_doc`` after its vertebrae (top to bottom) were renamed from ``old_names`` to
    ``new_names`` (:func:`SpineNetLib.outputs.documents.apply_level_correction`): every part that names
    or depends on a level made again from the document's own numbers, as the run makes it.

    * each disc's ``level`` and ``measurement_warnings`` (:func:`disc_height_warnings`: the thin-disc
      line belongs to the disc above S1, wherever that now is);
    * ``vertebrae_measurements``' levels;
    * the lumbar lordosis, between the new L1 and S1 (:func:`lordosis_from_endplate_angles`; a document
      from before ``upper_endplate_angle_deg`` keeps it only while L1 and S1 are the same bodies);
    * the warnings that name levels: a missing disc between two bodies (the same pairs, new names), the
      discs' measurement lines and the body-size line (:func:`body_size_warning`, which needs
      ``pixel_spacing_mm``; an older document keeps its line; ``check_body_sizes`` False, as the run
      does when it chose the pixel spacing itself, says none).

    Grades stay with their discs: the disc is the same, only its name changes. The numbers are the
    document's, rounded as written, so a line on the edge of a bound can differ from a new run's.
    """
    doc = copy.deepcopy(discs_doc)
    old_lines = _measurement_lines(doc)
    _rename_discs(doc, old_names, new_names)
    rows = doc.get("vertebrae_measurements") or []
    for row in rows:
        index = row.get("index")
        if isinstance(index, int) and 0 <= index < len(new_names):
            row["level"] = new_names[index]
    spine = doc.setdefault("spine_measurements", {})
    _measure_lordosis_again(spine, rows, old_names, new_names)
    spacing = spine.get("pixel_spacing_mm") if check_body_sizes else None
    size_line = (body_size_warning([row["level"] for row in rows], [row.get("middle_height_mm") for row in rows],
                                   spacing) if spacing and rows else None)
    skipped = {skipped_disc_message(old_names[k], old_names[k + 1]):
               skipped_disc_message(new_names[k], new_names[k + 1]) for k in range(len(old_names) - 1)}
    warnings, block = [], ([size_line] if size_line else []) + _measurement_lines(doc)   # as the run orders them
    for line in doc.get("warnings") or []:
        if line in skipped:
            warnings.append(skipped[line])
        elif line in old_lines or (spacing and line.startswith(BODY_SIZE_WARNING_START)):
            warnings += block   # in the place of the old block, once
            block = []
        else:
            warnings.append(line)
    warnings += block   # none before: after the others
    if warnings:
        doc["warnings"] = warnings
    else:
        doc.pop("warnings", None)
    return doc


def _measurement_lines(doc: dict) -> list[str]:
    return [line for d in doc.get("discs") or [] for line in d.get("measurement_warnings") or []]


def _rename_discs(doc: dict, old_names: Sequence[str], new_names: Sequence[str]) -> None:
    """Each disc named after its renamed vertebrae, its height lines made again under the new name (and the
    new names of its bodies with rougher outlines, ``vertebrae_measurements``' ``outline_from``)."""
    rename = {disc_name(old_names[k], old_names[k + 1]): disc_name(new_names[k], new_names[k + 1])
              for k in range(len(old_names) - 1)}
    rougher = {row.get("index") for row in doc.get("vertebrae_measurements") or []
               if row.get("outline_from") == OUTLINE_FROM_WEAKER_DETECTION}
    for d in doc.get("discs") or []:
        d["level"] = rename.get(d["level"], d["level"])
        m = d.get("measurements") or {}
        if m:
            bodies = [new_names[i] for i in (d.get("upper_vertebra"), d.get("lower_vertebra"))
                      if i in rougher and isinstance(i, int) and 0 <= i < len(new_names)]
            d["measurement_warnings"] = disc_height_warnings(
                d["level"], m.get("disc_height_anterior_mm"), m.get("disc_height_middle_mm"),
                m.get("disc_height_posterior_mm"), m.get("disc_height_mean_mm"), bodies)


def _measure_lordosis_again(spine: dict, rows: list[dict], old_names: Sequence[str],
                            new_names: Sequence[str]) -> None:
    """The lordosis between the bodies now named L1 and S1, from the endplate angles as written."""
    if rows and all("upper_endplate_angle_deg" in row for row in rows):
        angles = [float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else math.nan
                  for a in (row["upper_endplate_angle_deg"] for row in rows)]   # null: not measurable
        lordosis = lordosis_from_endplate_angles([row["level"] for row in rows], angles)
        spine["lumbar_lordosis_deg"] = None if lordosis is None else round(lordosis, 2) + 0.0   # as written
        return
    bodies = [[names.index(n) if n in names else None for n in ("L1", "S1")] for names in (old_names, new_names)]
    if bodies[0] != bodies[1]:
        spine["lumbar_lordosis_deg"] = None   # other bodies, and no angles to measure them by (an older document)
