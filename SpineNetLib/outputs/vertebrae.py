"""Result files: ``vertebrae.json`` and ``vertebrae.csv``.

Every coordinate written here is in the input's RAS millimetres, and every
slice index is the index along the input's own slice axis, so results overlay
the original scan in any viewer.  The document's ``"labelling"`` block and
the CSV's last four columns (the same on every row) say how sure the level
labelling is (:mod:`SpineNetLib.label.confidence`).  The files themselves are
written by :func:`SpineNetLib.outputs.files.write_results`.
"""

from __future__ import annotations

import csv
import io
import math
from typing import TYPE_CHECKING

import numpy as np

from SpineNetLib.core.levels import LEVELS
from SpineNetLib.core.results import DetectionResult, Vertebra
from SpineNetLib.core.scan import Scan, vertebra_centroid_ras

if TYPE_CHECKING:  # annotations only: the labelling needs torch, and documents.py (read by the
    # Slicer module before torch is installed) imports this module
    from SpineNetLib.label.confidence import LabellingConfidence

VERTEBRAE_SCHEMA = "spinenet.vertebrae/1"


def _round(values, ndigits: int = 3):
    return np.round(np.asarray(values, dtype=float), ndigits).tolist()


def vertebra_polygons_ras(scan: Scan, vertebra: Vertebra) -> list[dict]:
    """Per-slice polygons as ``{"slice": input slice index, "corners_ras": 4x[r, a, s]}``, one per
    *input* slice where the vertebra is.

    Without slab averaging a canonical slice is an input slice.  When thin slices were averaged
    into slabs (``inputs/canonical.py``), the vertebra's extent runs from the first input slice of
    its first slab to the last of its last slab, and each input slice gets the polygon interpolated
    linearly between the slab centres around it (the end slabs' polygons beyond their centres), so
    that scrolling through the user's own slices shows the outline on every slice it covers (issue 14).
    """
    order = np.argsort(vertebra.slices)
    slices = [float(vertebra.slices[i]) for i in order]
    polys = [np.asarray(vertebra.polygons[i], float) for i in order]
    origin = scan.input_slice_position(0.0)
    signed_step = scan.input_slice_position(1.0) - origin     # input slices per canonical slice
    if abs(signed_step) <= 1.0 + 1e-6:
        return [{"slice": scan.input_slice_index(s), "corners_ras": _round(scan.xy_to_ras(p, s))}
                for s, p in sorted(zip(slices, polys), key=lambda sp: scan.input_slice_index(sp[0]))]
    first, last = input_slices_covered(scan, slices[0], slices[-1])
    out = []
    for k in range(first, last + 1):
        c = (k - origin) / signed_step                  # fractional canonical slice of input slice k
        if c <= slices[0]:
            poly = polys[0]
        elif c >= slices[-1]:
            poly = polys[-1]
        else:
            j = int(np.searchsorted(slices, c)) - 1
            t = (c - slices[j]) / (slices[j + 1] - slices[j])
            poly = (1.0 - t) * polys[j] + t * polys[j + 1]
        out.append({"slice": k, "corners_ras": _round(scan.xy_to_ras(poly, c))})
    return out


def input_slices_covered(scan: Scan, first: float, last: float) -> tuple[int, int]:
    """The input slices ``(lowest, highest)`` that canonical slices ``first..last`` cover: the same ones
    without slab averaging, else every thin slice of the slabs (``inputs/canonical.py``)."""
    step = abs(scan.input_slice_position(1.0) - scan.input_slice_position(0.0))
    if step <= 1.0 + 1e-6:
        ends = [scan.input_slice_index(first), scan.input_slice_index(last)]
        return min(ends), max(ends)
    centres = [scan.input_slice_position(first), scan.input_slice_position(last)]
    n_input = scan.input_shape_ijk[scan.input_slice_axis]
    return (max(0, int(np.ceil(min(centres) - step / 2.0 + 0.5 - 1e-6))),
            min(n_input - 1, int(np.floor(max(centres) + step / 2.0 - 0.5 + 1e-6))))


def level_probability_dict(probs: np.ndarray | None) -> dict[str, float]:
    if probs is None:
        return {}
    order = np.argsort(-np.asarray(probs))
    return {LEVELS[i]: round(float(probs[i]), 4) for i in order if probs[i] >= 1e-4}


def level_probability(vertebra: Vertebra) -> float | None:
    """Probability of the assigned level (S2 reads the S1 column)."""
    if vertebra.level is None or vertebra.level_probabilities is None:
        return None
    name = "S1" if vertebra.level == "S2" else vertebra.level
    return float(vertebra.level_probabilities[LEVELS.index(name)])


def input_description(scan: Scan) -> dict:
    """What the input was and how it was read: its source, and the acquisition ``inputs/canonical.py`` took it
    for, with the slab reading of thin slices where there was one (``resampled``)."""
    keep = ("path", "format", "series_uid", "study_uid", "frame_of_reference_uid", "series_description", "modality",
            "manufacturer", "sequence", "overrides", "acquisition", "resampled", "bids_session")
    return {k: scan.metadata[k] for k in keep if k in scan.metadata}


def scan_description(scan: Scan) -> dict:
    ijk_to_ras = np.asarray(scan.input_ijk_to_ras, float)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    return {
        "shape": [int(n) for n in scan.input_shape_ijk],
        "spacing_mm": _round(spacing, 4),
        "ijk_to_ras": _round(ijk_to_ras, 6),
        "slice_axis": int(scan.input_slice_axis),
    }


def _finite(value: float, ndigits: int) -> float | None:
    return round(float(value), ndigits) if math.isfinite(value) else None


def labelling_confidence_dict(confidence: LabellingConfidence) -> dict:
    """The confidence entries of the document's ``"labelling"`` block (NaN is written as null)."""
    return {
        "confidence": _finite(confidence.confidence, 6),
        "margin_nats": _finite(confidence.margin_nats, 3),
        "shift": int(confidence.shift),
        "shifted_alternative": None if confidence.shifted_levels is None else list(confidence.shifted_levels),
        "s1_found": bool(confidence.s1_found),
        "min_confidence": float(confidence.min_confidence),
        "review_margin_nats": _finite(confidence.review_margin_nats, 3),
        "needs_review": bool(confidence.needs_review),
        "warnings": list(confidence.warnings),
    }


def vertebrae_document(scan: Scan, result: DetectionResult,
                       labelling_confidence: LabellingConfidence | None = None) -> dict:
    """The ``vertebrae.json`` document (schema ``spinenet.vertebrae/1``).

    Its ``"labelling"`` block holds the labelling settings of ``result``
    and, when given, the entries of :func:`labelling_confidence_dict`.
    """
    vertebrae = []
    for v in result.vertebrae:
        p = level_probability(v)
        vertebrae.append({
            "level": v.level,
            "level_probability": None if p is None else round(p, 4),
            "level_probabilities": level_probability_dict(v.level_probabilities),
            "centroid_ras": _round(vertebra_centroid_ras(scan, v)),
            "polygons": vertebra_polygons_ras(scan, v),
            # the input slices the appearance network saw of it, where they were centred on the spine
            # (``label/appearance_slices.py``); null: every slice
            "appearance_slices": None if v.appearance_slices is None
            else list(input_slices_covered(scan, *v.appearance_slices)),
            # which network drew the outline (core/results.py): "weaker detection" ones are rougher
            "outline_from": v.outline_from,
        })
    document = {
        "schema": VERTEBRAE_SCHEMA,
        "input": input_description(scan),
        "scan": scan_description(scan),
        "vertebrae": vertebrae,
        "timings_s": {k: round(float(t), 3) for k, t in result.timings_s.items()},
    }
    labelling = dict(result.labelling)
    if labelling_confidence is not None:
        labelling.update(labelling_confidence_dict(labelling_confidence))
    if labelling:
        document["labelling"] = labelling
    return document


#: ``next_best_level``: where the levels need a review, the level the next best labelling (the one the shift
#: reason names) gives this vertebra, where it differs (:func:`next_best_levels`); else empty.
#: ``outline_from``: which network drew the outline (``core/results.py``, ``OUTLINE_FROM_*``): "detector",
#: "weaker detection" (rougher: check it before using its measurements) or "S1-outline detector"; empty in a
#: document written before it was recorded.
#: The last five are per scan (the same on every row): the ``"labelling"`` block's
#: ``confidence``, ``margin_nats``, ``s1_found``, ``needs_review`` and its warnings (joined by "; ", with the
#: reason); empty when the document has none.  The margin is the column to sort a cohort by: the confidence
#: reads 1.000000 from a margin of about 14.5 nats on, well below the bundled weights' review margin.
VERTEBRAE_CSV_COLUMNS = ("level", "centroid_R_mm", "centroid_A_mm", "centroid_S_mm",
                         "first_slice", "last_slice", "level_probability", "next_best_level", "outline_from",
                         "labelling_confidence", "labelling_margin_nats", "s1_found", "levels_need_review",
                         "labelling_warning")
#: How many of :data:`VERTEBRAE_CSV_COLUMNS`, at its end, describe the whole scan.
PER_SCAN_CSV_COLUMNS = 5


def csv_flag(value) -> str:
    """A boolean as the CSV files write it (true / false), empty for anything else."""
    return "" if not isinstance(value, bool) else ("true" if value else "false")


def _number_cell(value, digits: int) -> str:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{float(value):.{digits}f}" if number else ""


def labelling_csv_cells(document: dict) -> list[str]:
    """The per-scan cells of every CSV row: labelling confidence and margin, S1 found, levels need review,
    warnings."""
    block = document.get("labelling") or {}
    return [_number_cell(block.get("confidence"), 6), _number_cell(block.get("margin_nats"), 3),
            csv_flag(block.get("s1_found")), csv_flag(block.get("needs_review")),
            "; ".join(str(w) for w in block.get("warnings") or [])]


def next_best_levels(document: dict) -> list[str] | None:
    """Where the levels need a review, the level that the labelling's best alternative shifted by one level
    (``labelling.shifted_alternative``, :mod:`SpineNetLib.label.confidence`) gives each vertebra of a
    ``vertebrae.json`` document, top to bottom ("" where it names none).

    None where the levels need no review (the alternative is then out of the question), were corrected by
    hand, or were taken from another series (the alternative is of the scan's own levels), and where the
    alternative does not name the vertebrae one for one."""
    block = document.get("labelling") or {}
    if not block.get("needs_review") or block.get("corrected_by_user") or block.get("levels_taken_from_series"):
        return None
    alternative = block.get("shifted_alternative") or []
    if len(alternative) != len(document.get("vertebrae") or []):
        return None
    return [str(level) if level else "" for level in alternative]


def vertebrae_csv_text(document: dict) -> str:
    """One row per vertebra, top to bottom, from a ``vertebrae.json`` document."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(VERTEBRAE_CSV_COLUMNS)
    per_scan = labelling_csv_cells(document)
    next_best = next_best_levels(document) or [""] * len(document["vertebrae"])
    for v, other in zip(document["vertebrae"], next_best):
        slices = [p["slice"] for p in v["polygons"]]
        r, a, s = v["centroid_ras"]
        prob = v["level_probability"]
        writer.writerow([v["level"] or "", f"{r:.2f}", f"{a:.2f}", f"{s:.2f}", min(slices), max(slices),
                         "" if prob is None else f"{prob:.4f}", "" if other == (v["level"] or "") else other,
                         v.get("outline_from") or "", *per_scan])
    return buffer.getvalue()

