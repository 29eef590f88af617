"""Detection and labelling metrics of the SpineNetV2 paper (Windsor et al. 2022; paper §5.1).

Definitions (the paper's, made precise where it leaves room)
-------------------------------------------------------------
Ground truth, per annotated vertebral body (:func:`ground_truth_from_labels`):
its **mid slice** is ``round(median(annotated slices))`` (the same rule as
``results.Vertebra.mid_slice`` for predictions; the slice of largest mask area
was rejected because the area is flat across the central slices and its
argmax jumps to lateral slices, e.g. slice 44 of 16-58 for T11 of chu_06),
and its **centroid** is the centroid ``(x, y)`` of its mask on that slice
(``training.datasets.mask_centroid``, also the detector's centroid target).  A body
whose mid-slice mask touches the image border is cut by the field of view:
it is **ignored**: not counted, and a prediction that contains its centroid
on any of the prediction's slices (and no scored centroid) is neither TP nor FP.
Cases with disc masks only (``ivd/``) score the bodies between two annotated
discs instead (:func:`ground_truth_from_disc_labels`).

A prediction's polygon "on" a ground-truth slice is its polygon on the
nearest of its own slices, if that is within ``slice_tolerance_mm`` (default
2 mm).  Predictions on the native slices match exactly; ``spinenet run``
slab-averages these 1 mm volumes to ~3.5 mm slices (``inputs/canonical.py``), whose
centres are at most 1.75 mm from any native slice.

* **Hit.** A ground-truth vertebra is detected when its centroid lies inside a
  predicted quadrilateral on its mid slice (paper: "inside a single detected
  quadrilateral").  When several predictions contain it, the one whose
  polygon centroid is nearest is matched; the others are **false positives**
  (duplicates).  Matching is one-to-one, greedy by distance: a prediction
  that contains two ground-truth centroids (a merged detection) matches the
  nearer one only and the other vertebra is missed.
* **TP** = matched ground-truth vertebrae, **FN** = the unmatched ones,
  **FP** = unmatched predictions, except those that contain no ground-truth
  centroid and lie entirely outside the annotated range: their centroid row
  is above the superior edge of the highest annotated body or below the
  inferior edge of the lowest (both on that body's mid slice).  Those are
  unannotated vertebrae (S1 in chu/ and myosegmentum/, T10 or T12 above the
  annotated run, S2 below zukic's S1) and are **ignored**, neither TP nor FP.
* precision = TP / (TP + FP); recall = TP / (TP + FN).
* **Identification rate** (IDR) = matched vertebrae whose predicted level
  equals the true one / number of ground-truth vertebrae (a miss counts as
  not identified).  **IDR within one level**: the level is at most one
  vertebra off, counting along C1..C7, T1..T12, L1..L5, S1, S2.
* **Localisation error**: distance in millimetres, in the slice plane, between
  the ground-truth centroid and the matched polygon's centroid (mean of its
  four corners, as ``results.Vertebra.centroid_xy``), using the row and
  column spacings.  Note the floor: mask centroid and corner mean of the
  ground-truth quads differ by 0.71 px on average on the real mid slices.

Cases are summarised per case and overall by micro-averaging (counts summed
over cases; localisation error pooled over all matched vertebrae).  Each pooled
group carries 95 % intervals (``"ci95"``, :mod:`SpineNetLib.evaluation.intervals`):
Wilson over scans for the share of scans entirely right and for S1 below an
annotated L5-S1 disc, and for recall and identification rate with the scan as
the unit (conservative: a shifted scan names all its bodies wrongly at once).
In the ``chu/`` and ``myosegmentum/`` volumes, which show S1 unannotated, the next predicted body below the
annotated L5 is scored as S1 where the image holds S1 whole (:func:`s1_below_l5`), and apart from those where
the image cuts S1 below its centre (:func:`s1_cut_below_l5`).
Where several scans are of one patient (``RealCase.patient_id``: zukic's
sequences of one subject; one's own cases by their ``case.json`` or DICOM
patient), the patient is the unit instead, and ``"n_patients"`` says how many.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from SpineNetLib.core import polygons
from SpineNetLib.training.datasets import DETECTION_SOURCES, POINT_SOURCES, SOURCE_FOLDERS, CaseGeometry, list_cases
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.evaluation.own_cases import (
    case_series, image_path, is_own_case, own_case, shared_patient_warnings,
)
from SpineNetLib.evaluation.intervals import patient_share_interval, patient_unit_interval, rounded
from SpineNetLib.evaluation.ground_truth import (  # noqa: F401 (re-exported: evaluate.ground_truth_of_case, ...)
    CaseGroundTruth, GroundTruthVertebra, annotated_with_points, case_data_and_geometry, ground_truth_from_disc_labels,
    ground_truth_from_labels, ground_truth_from_points, ground_truth_of, ground_truth_of_case, point_across_disc,
)

#: Default half-window (mm) along the slice axis for finding a prediction's polygon on a GT slice.
SLICE_TOLERANCE_MM = 2.0

#: Order used for "within one level": C1, C2 ... S1, S2.
_LEVEL_ORDER = {name: i for i, name in enumerate(("C1",) + LEVELS_TOP_DOWN + ("S2",))}


def level_distance(a: str | None, b: str | None) -> float:
    """Number of vertebrae between two level names (0 if equal, inf if unknown)."""
    if a is None or b is None:
        return math.inf
    if a == b:
        return 0.0
    if a in _LEVEL_ORDER and b in _LEVEL_ORDER:
        return float(abs(_LEVEL_ORDER[a] - _LEVEL_ORDER[b]))
    return math.inf


# --------------------------------------------------------------------------- ground truth: ground_truth.py

# --------------------------------------------------------------------------- predictions


@dataclass
class PredictedVertebra:
    """A predicted vertebra in a case's canonical frame (slices may be fractional)."""

    level: str | None
    slices: np.ndarray          # (n,) float canonical slice coordinates, ascending
    polygons: list[np.ndarray]  # n x (4, 2) [x, y], rt, rb, lb, lt

    def polygon_near(self, canonical_slice: float, tolerance_slices: float) -> np.ndarray | None:
        """The polygon on the slice nearest to ``canonical_slice`` if within the tolerance."""
        if len(self.slices) == 0:
            return None
        d = np.abs(np.asarray(self.slices, float) - float(canonical_slice))
        i = int(np.argmin(d))  # ties: the lower slice
        return self.polygons[i] if d[i] <= tolerance_slices + 1e-9 else None

    @property
    def centroid_xy(self) -> np.ndarray:
        return np.mean([np.asarray(p, float).mean(axis=0) for p in self.polygons], axis=0)


def as_predicted(vertebrae) -> list[PredictedVertebra]:
    """Predictions from objects with ``level``, ``slices`` and ``polygons`` (e.g. ``results.Vertebra``)."""
    out = []
    for v in vertebrae:
        if len(v.polygons) == 0:
            continue  # nothing to score
        if isinstance(v, PredictedVertebra):
            out.append(v)
            continue
        order = np.argsort(np.asarray(v.slices, float), kind="stable")
        out.append(PredictedVertebra(level=v.level, slices=np.asarray(v.slices, float)[order],
                                     polygons=[np.asarray(v.polygons[i], float).reshape(4, 2) for i in order]))
    return out


def predictions_from_vertebrae_json(path, geometry: CaseGeometry) -> list[PredictedVertebra]:
    """Read a ``vertebrae.json`` (``SpineNetLib.outputs.vertebrae``) into a case's canonical pixel frame.

    Corners are mapped RAS -> canonical ``[row, col, slice]`` with the case
    image's own IJK-to-RAS, so the file must have been made from that image
    (checked against the file's ``scan.shape``).  The slice coordinate is
    taken from the corners (exact even when the pipeline slab-averaged the
    slices) rather than from the rounded ``slice`` index.
    """
    return predictions_from_document(read_vertebrae_json(path, geometry), geometry.ras_to_canonical, source=str(path))


def read_vertebrae_json(path, geometry: CaseGeometry) -> dict:
    """A ``vertebrae.json`` checked to be one, made from the image of ``geometry``'s case."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("spinenet.vertebrae/"):
        raise InputError(f"{path} is not a spinenet vertebrae.json file")
    shape = (doc.get("scan") or {}).get("shape")
    if shape is not None and tuple(int(n) for n in shape) != tuple(geometry.input_shape_ijk):
        raise InputError(f"{path} was made from an image of shape {tuple(shape)}, "
                         f"not {geometry.case_id} {tuple(geometry.input_shape_ijk)}")
    return doc


def predictions_from_document(doc: dict, ras_to_canonical, source: str = "the document"
                              ) -> list[PredictedVertebra]:
    """The vertebrae of a ``vertebrae.json`` document in a canonical pixel frame.

    ``ras_to_canonical`` maps ``(N, 3)`` RAS mm to ``(N, 3)`` canonical ``[row, col, slice]``.
    The slice coordinate comes from the corners (exact even when the pipeline slab-averaged the
    slices) rather than from the rounded ``slice`` index.
    """
    out = []
    for v in doc.get("vertebrae", []):
        slices, polys = [], []
        for p in v.get("polygons", []):
            corners = np.asarray(p["corners_ras"], dtype=float)
            if corners.shape != (4, 3):
                raise InputError(f"{source}: a polygon does not have 4 RAS corners")
            rcs = ras_to_canonical(corners)
            slices.append(float(rcs[:, 2].mean()))
            polys.append(np.stack([rcs[:, 1], rcs[:, 0]], axis=1))  # [x=col, y=row]
        if not polys:
            continue
        order = np.argsort(slices, kind="stable")
        out.append(PredictedVertebra(level=v.get("level"), slices=np.asarray(slices)[order],
                                     polygons=[polys[i] for i in order]))
    return out


# --------------------------------------------------------------------------- metrics


@dataclass
class Match:
    gt_level: str
    pred_index: int
    pred_level: str | None
    error_mm: float


@dataclass
class CaseMetrics:
    case_id: str
    n_gt: int
    tp: int
    fp: int
    fn: int
    n_identified: int
    n_identified_within_1: int
    localisation_errors_mm: list[float] = field(default_factory=list)
    n_ignored_predictions: int = 0
    matches: list[Match] = field(default_factory=list)
    missed_levels: list[str] = field(default_factory=list)
    #: Point-annotated cases (``CaseGroundTruth.s1_point``): a prediction contains the derived S1
    #: point / that prediction is named S1.  None where the case has no such point.
    s1_detected: bool | None = None
    s1_named: bool | None = None
    #: Point-annotated cases with ``CaseGroundTruth.t12_point``: a prediction holding it is named T12 / a
    #: prediction that does not hold it is named T12 (a body missed between it and L1).  None without the point.
    t12_named: bool | None = None
    t12_named_elsewhere: bool | None = None
    #: Volumes that show S1 without annotating it (``CaseGroundTruth.s1_shown_not_annotated``): the next predicted
    #: body below the annotated L5 is named S1 (:func:`s1_below_l5`). None elsewhere.
    s1_below_l5: bool | None = None
    #: The same where the image cuts S1 below its centre (:func:`s1_cut_below_l5`). None elsewhere.
    s1_cut_below_l5: bool | None = None
    #: Cases with annotated discs: the discs scored (``CaseGroundTruth.disc_points``) and those whose
    #: point lies inside a predicted outline near its slice (an outline that reaches into the disc).
    discs_scored: list[str] = field(default_factory=list)
    disc_points_inside_outlines: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def identification_rate(self) -> float:
        return _ratio(self.n_identified, self.n_gt)

    @property
    def identification_rate_within_1(self) -> float:
        return _ratio(self.n_identified_within_1, self.n_gt)

    @property
    def all_levels_right(self) -> bool:
        """Every scored body found and named right, and no false positive: the scan is entirely right."""
        return self.fn == 0 and self.fp == 0 and self.n_identified == self.n_gt

    @property
    def level_shift(self) -> int | None:
        """By how many levels every found body is named off, the same for all: +1 when each is named one
        level lower than it is (L4 called L5), -1 one higher; 0 when none is named wrongly (or none was
        found); None when they are off by different amounts or one has no level.  A shift is issue 10's
        worst error: the whole spine named consistently, and wrongly."""
        offsets = {None if m.pred_level not in _LEVEL_ORDER else _LEVEL_ORDER[m.pred_level] - _LEVEL_ORDER[m.gt_level]
                   for m in self.matches}
        if not offsets or offsets == {0}:
            return 0
        return offsets.pop() if len(offsets) == 1 and None not in offsets else None

    @property
    def mean_localisation_error_mm(self) -> float:
        return float(np.mean(self.localisation_errors_mm)) if self.localisation_errors_mm else math.nan


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def evaluate_case(gt: CaseGroundTruth, predictions, spacing_mm=None, *,
                  slice_tolerance_mm: float = SLICE_TOLERANCE_MM) -> CaseMetrics:
    """Metrics of one case (see the module docstring for the definitions).

    ``predictions``: :class:`PredictedVertebra` or any objects with
    ``level``, ``slices`` and ``polygons`` in the case's canonical frame.
    ``spacing_mm`` ``(row, col, slice)`` defaults to ``gt.spacing_mm``.
    """
    preds = as_predicted(predictions)
    row_mm, col_mm, slice_mm = (gt.spacing_mm if spacing_mm is None else tuple(float(s) for s in spacing_mm))
    tol = float(slice_tolerance_mm) / slice_mm
    # Every (gt, prediction) pair where the prediction's polygon contains the GT centroid.
    pairs = []
    contains_scored = np.zeros(len(preds), dtype=bool)
    on_ignored = np.zeros(len(preds), dtype=bool)
    for g, v in enumerate(gt.vertebrae):
        for p, pred in enumerate(preds):
            if v.ignored:  # any of its slices: the border-cut body may have no polygon near its mid slice
                on_ignored[p] |= any(polygons.point_in_polygon(v.centroid, q) for q in pred.polygons)
                continue
            poly = pred.polygon_near(v.mid_slice, tol)
            if poly is None or not polygons.point_in_polygon(v.centroid, poly):
                continue
            contains_scored[p] = True
            d = (np.asarray(poly, float).mean(axis=0) - v.centroid) * np.array([col_mm, row_mm])
            pairs.append((float(np.hypot(*d)), g, p))
    pairs.sort()
    gt_match: dict[int, tuple[int, float]] = {}
    used = set()
    for d, g, p in pairs:
        if g in gt_match or p in used:
            continue
        gt_match[g] = (p, d)
        used.add(p)

    scored = [g for g, v in enumerate(gt.vertebrae) if not v.ignored]
    fp = ignored = 0
    for p, pred in enumerate(preds):
        if p in used:
            continue
        if contains_scored[p]:
            fp += 1            # a duplicate or a merged detection
        elif on_ignored[p] or _outside_range(gt, pred):
            ignored += 1       # on a border-cut vertebra, or beyond the annotated run
        else:
            fp += 1
    tp = len(gt_match)
    metrics = CaseMetrics(case_id=gt.case_id, n_gt=len(scored), tp=tp, fp=fp, fn=len(scored) - tp,
                          n_identified=0, n_identified_within_1=0, n_ignored_predictions=ignored)
    for g, v in enumerate(gt.vertebrae):
        if v.ignored:
            continue
        if g not in gt_match:
            metrics.missed_levels.append(v.level)
            continue
        p, d = gt_match[g]
        level = preds[p].level
        metrics.matches.append(Match(gt_level=v.level, pred_index=p, pred_level=level, error_mm=d))
        metrics.localisation_errors_mm.append(d)
        dist = level_distance(level, v.level)
        metrics.n_identified += int(dist == 0)
        metrics.n_identified_within_1 += int(dist <= 1)
    if gt.s1_point is not None:
        on_s1 = [p for p in preds
                 if (q := p.polygon_near(gt.s1_slice, tol)) is not None and polygons.point_in_polygon(gt.s1_point, q)]
        metrics.s1_detected = bool(on_s1)
        metrics.s1_named = any(p.level == "S1" for p in on_s1)
    if gt.s1_shown_not_annotated:
        metrics.s1_below_l5 = s1_below_l5(gt, preds, (row_mm, col_mm))
        metrics.s1_cut_below_l5 = s1_cut_below_l5(gt, preds, (row_mm, col_mm))
    if gt.t12_point is not None:
        holds = [(q := p.polygon_near(0, tol)) is not None and polygons.point_in_polygon(gt.t12_point, q)
                 for p in preds]
        metrics.t12_named = any(h and p.level == "T12" for h, p in zip(holds, preds))
        metrics.t12_named_elsewhere = any(not h and p.level == "T12" for h, p in zip(holds, preds))
    for disc, (disc_slice, point) in sorted(gt.disc_points.items(), key=lambda kv: _disc_order(kv[0])):
        metrics.discs_scored.append(disc)
        near = [p.polygon_near(disc_slice, tol) for p in preds]
        if any(q is not None and polygons.point_in_polygon(point, q) for q in near):
            metrics.disc_points_inside_outlines.append(disc)
    return metrics


#: How far below the place one L4-L5 step below L5 S1 reaches, in steps: half a body, a body being about 0.7 of
#: the step (a lumbar body about 25 mm high, a disc about 10 mm).
S1_WHOLE_BELOW_STEPS = 0.35


def _s1_view(gt: CaseGroundTruth) -> str | None:
    """How much of S1 the image shows below the annotated L5: "whole" where one L4-L5 step below L5's centroid,
    and :data:`S1_WHOLE_BELOW_STEPS` of a step further, lie within the image's rows (``CaseGroundTruth.image_rows``);
    "cut" where only the first does (S1's centre in view, its foot cut off: most myosegmentum volumes end there);
    None where even S1's centre lies beyond the last row, or without an annotated L4 and L5."""
    truth = {v.level: v for v in gt.vertebrae if not v.ignored}
    if "L4" not in truth or "L5" not in truth or gt.image_rows is None:
        return None
    l4_row, l5_row = float(truth["L4"].centroid[1]), float(truth["L5"].centroid[1])
    last_row = gt.image_rows - 1
    if l5_row + (1.0 + S1_WHOLE_BELOW_STEPS) * (l5_row - l4_row) <= last_row:
        return "whole"
    return "cut" if l5_row + (l5_row - l4_row) <= last_row else None


def _next_body_below_l5_is_s1(gt: CaseGroundTruth, preds: Sequence[PredictedVertebra], spacing_rc) -> bool | None:
    """Whether the predicted body next below the annotated L5 is named S1 (False where none is there; None
    without an L4-L5 step): the one nearest L5's centroid among those whose centroid lies further along the L4-L5
    direction than 0.3 and nearer than 1.5 L4-L5 steps (annotated centroids, in mm)."""
    truth = {v.level: v for v in gt.vertebrae if not v.ignored}
    scale = np.array([float(spacing_rc[1]), float(spacing_rc[0])])           # (x, y) pixels to mm
    l4, l5 = (np.asarray(truth[level].centroid, float) * scale for level in ("L4", "L5"))
    step = float(np.hypot(*(l5 - l4)))
    if step == 0:
        return None
    down = (l5 - l4) / step
    below = []
    for p in preds:
        offset = p.centroid_xy * scale - l5
        distance = float(np.hypot(*offset))
        if 0.3 * step < float(offset @ down) and distance < 1.5 * step:
            below.append((distance, p))
    return bool(below) and min(below, key=lambda dp: dp[0])[1].level == "S1"


def s1_below_l5(gt: CaseGroundTruth, preds: Sequence[PredictedVertebra], spacing_rc) -> bool | None:
    """Whether the next predicted body below the annotated L5 is named S1 where the image holds S1 whole
    (:func:`_s1_view`); None elsewhere.

    A proxy for S1 where a volume shows it unannotated (:func:`_next_body_below_l5_is_s1`); none there counts as
    S1 not found."""
    return _next_body_below_l5_is_s1(gt, preds, spacing_rc) if _s1_view(gt) == "whole" else None


def s1_cut_below_l5(gt: CaseGroundTruth, preds: Sequence[PredictedVertebra], spacing_rc) -> bool | None:
    """The same where the image cuts S1 below its centre (:func:`_s1_view` "cut"); None elsewhere.  Scored apart
    from :func:`s1_below_l5`: a body cut by the image edge is harder to detect and to name (an L5 there can be
    taken for S1, ``label/confidence.s1_at_lower_edge``), and 22 of the 30 myosegmentum volumes end so (6 more
    end above S1's centre and are not scored)."""
    return _next_body_below_l5_is_s1(gt, preds, spacing_rc) if _s1_view(gt) == "cut" else None


def _disc_order(disc: str) -> int:
    """Sort key of a disc name ("L5-S1"): its upper level, top to bottom."""
    return _LEVEL_ORDER.get(disc.split("-")[0], 0)


def _outside_range(gt: CaseGroundTruth, pred: PredictedVertebra) -> bool:
    """The prediction's centroid lies above or below the annotated run (or nothing is annotated)."""
    if gt.range_top_row is None or gt.range_bottom_row is None:
        return True
    y = float(pred.centroid_xy[1])
    return y < gt.range_top_row or y > gt.range_bottom_row


def _nan_to_none(x: float):
    return None if (x is None or (isinstance(x, float) and math.isnan(x))) else round(float(x), 4)


def _case_dict(m: CaseMetrics) -> dict:
    errors = m.localisation_errors_mm
    return {
        "n_gt": m.n_gt, "tp": m.tp, "fp": m.fp, "fn": m.fn,
        "ignored_predictions": m.n_ignored_predictions,
        "precision": _nan_to_none(m.precision), "recall": _nan_to_none(m.recall),
        "identification_rate": _nan_to_none(m.identification_rate),
        "identification_rate_within_1": _nan_to_none(m.identification_rate_within_1),
        "localisation_error_mm_mean": _nan_to_none(float(np.mean(errors)) if errors else math.nan),
        "localisation_error_mm_median": _nan_to_none(float(np.median(errors)) if errors else math.nan),
        "all_levels_right": m.all_levels_right,
        "level_shift": m.level_shift,
        "missed_levels": list(m.missed_levels),
        "wrong_levels": [f"{x.gt_level}->{x.pred_level}" for x in m.matches if x.pred_level != x.gt_level],
        "s1_detected": m.s1_detected, "s1_named": m.s1_named,
        "t12_named": m.t12_named, "t12_named_elsewhere": m.t12_named_elsewhere, "s1_below_l5": m.s1_below_l5,
        "s1_cut_below_l5": m.s1_cut_below_l5,
        "discs_scored": list(m.discs_scored),
        "disc_points_inside_outlines": list(m.disc_points_inside_outlines),
    }


def _pooled(metrics: Sequence[CaseMetrics], patients: dict[str, str] | None = None) -> dict:
    """Micro-averaged metrics of a group of cases, with the share of scans that are entirely right.
    ``patients``: the patient of each case id (a case missing from it is its own patient)."""
    total = CaseMetrics(case_id="pooled", n_gt=0, tp=0, fp=0, fn=0, n_identified=0, n_identified_within_1=0)
    for m in metrics:
        total.n_gt += m.n_gt
        total.tp += m.tp
        total.fp += m.fp
        total.fn += m.fn
        total.n_identified += m.n_identified
        total.n_identified_within_1 += m.n_identified_within_1
        total.n_ignored_predictions += m.n_ignored_predictions
        total.localisation_errors_mm.extend(m.localisation_errors_mm)
    pooled = _case_dict(total)
    for per_case_only in ("missed_levels", "wrong_levels", "all_levels_right", "level_shift", "s1_detected", "s1_named",
                          "t12_named", "t12_named_elsewhere", "s1_below_l5", "s1_cut_below_l5", "discs_scored",
                          "disc_points_inside_outlines"):
        del pooled[per_case_only]
    discs: dict[str, dict] = {}
    for m in metrics:
        for disc in m.discs_scored:
            row = discs.setdefault(disc, {"scored": 0, "inside_an_outline": 0})
            row["scored"] += 1
            row["inside_an_outline"] += int(disc in m.disc_points_inside_outlines)
    pooled["disc_points"] = dict(sorted(discs.items(), key=lambda kv: _disc_order(kv[0])))
    with_s1 = [m for m in metrics if m.s1_detected is not None]
    pooled["s1_point_scans"] = len(with_s1)
    pooled["s1_point_detected"] = sum(bool(m.s1_detected) for m in with_s1)
    pooled["s1_point_named_s1"] = sum(bool(m.s1_named) for m in with_s1)
    below_l5 = [m for m in metrics if m.s1_below_l5 is not None]
    pooled["s1_below_l5_scans"], pooled["s1_below_l5_named_s1"] = len(below_l5), sum(m.s1_below_l5 for m in below_l5)
    pooled["s1_below_l5_not_named"] = sorted(m.case_id for m in below_l5 if not m.s1_below_l5)
    cut = [m for m in metrics if m.s1_cut_below_l5 is not None]
    pooled["s1_cut_below_l5_scans"], pooled["s1_cut_below_l5_named_s1"] = len(cut), sum(m.s1_cut_below_l5 for m in cut)
    pooled["s1_cut_below_l5_not_named"] = sorted(m.case_id for m in cut if not m.s1_cut_below_l5)
    with_t12 = [m for m in metrics if m.t12_named is not None]
    pooled["t12_point_scans"], pooled["t12_point_named_t12"] = len(with_t12), sum(m.t12_named for m in with_t12)
    pooled["t12_named_elsewhere"] = sorted(m.case_id for m in with_t12 if m.t12_named_elsewhere)
    pooled["n_cases"] = len(metrics)
    right = sum(m.all_levels_right for m in metrics)
    pooled["scans_all_levels_right"] = right
    pooled["share_of_scans_all_levels_right"] = _nan_to_none(_ratio(right, len(metrics)))
    shifted = [m for m in metrics if m.level_shift]
    pooled["scans_shifted"] = len(shifted)
    pooled["scans_shifted_by"] = {f"{k:+d}": sum(m.level_shift == k for m in shifted)
                                  for k in sorted({m.level_shift for m in shifted})}
    # a scan whose patient is not known is its own (keyed by its place: case ids need not be unique here)
    patient = [(patients or {}).get(m.case_id, (i,)) for i, m in enumerate(metrics)]
    pooled["n_patients"] = len(set(patient))
    # 95 % intervals (evaluation/intervals.py): Wilson over scans; for the body-level rates with the
    # scan as the unit too, because one scan's bodies are wrong together; over patients where a
    # patient has several scans, because one patient's scans are wrong together
    s1_patients = [p for p, m in zip(patient, metrics) if m.s1_detected is not None]
    pooled["ci95"] = {
        "share_of_scans_all_levels_right": rounded(patient_share_interval([m.all_levels_right for m in metrics], patient)),
        "share_of_scans_shifted": rounded(patient_share_interval([m.level_shift for m in metrics], patient)),
        "s1_point_named_s1": rounded(patient_share_interval([m.s1_named for m in with_s1], s1_patients)),
        "recall": rounded(patient_unit_interval([m.tp for m in metrics], [m.tp + m.fn for m in metrics], patient)),
        "identification_rate": rounded(patient_unit_interval([m.n_identified for m in metrics],
                                                             [m.n_gt for m in metrics], patient)),
    }
    return pooled


def _by_level(metrics: Sequence[CaseMetrics], patients: dict[str, str] | None = None) -> dict:
    """Per true level: bodies scored, found and named right (S1 recall is ``by_level["S1"]``), with 95 %
    intervals of both rates over the patients that have such a body (a level has one body per scan)."""
    table: dict[str, dict] = {}
    units: dict[str, dict] = {}   # level -> patient -> [n, found, identified]
    for i, m in enumerate(metrics):
        patient = (patients or {}).get(m.case_id, (i,))
        rows = [(level, 0, 0) for level in m.missed_levels]
        rows += [(match.gt_level, 1, int(match.pred_level == match.gt_level)) for match in m.matches]
        for level, found, identified in rows:
            row = table.setdefault(level, {"n": 0, "found": 0, "identified": 0})
            row["n"] += 1
            row["found"] += found
            row["identified"] += identified
            sums = units.setdefault(level, {}).setdefault(patient, [0, 0, 0])
            sums[0] += 1
            sums[1] += found
            sums[2] += identified
    order = {name: i for i, name in enumerate(LEVELS_TOP_DOWN)}

    def interval(level: str, column: int):
        sums = list(units[level].values())
        return rounded(patient_unit_interval([s[column] for s in sums], [s[0] for s in sums]))

    return {level: {**row, "recall": _nan_to_none(_ratio(row["found"], row["n"])),
                    "identification_rate": _nan_to_none(_ratio(row["identified"], row["n"])),
                    "n_patients": len(units[level]),
                    "ci95": {"recall": interval(level, 1), "identification_rate": interval(level, 2)}}
            for level, row in sorted(table.items(), key=lambda kv: order.get(kv[0], len(order)))}


def summarise(metrics: Sequence[CaseMetrics], groups: dict[str, dict[str, str]] | None = None) -> dict:
    """Per case, overall (micro-averaged), per level and, with ``groups`` (``{case_id: {"source": ..,
    "sequence": .., "patient": ..}}``), per source and per sequence, with the patient as the unit of
    the intervals where a patient has several scans; JSON-ready."""
    patients = {case_id: group["patient"] for case_id, group in (groups or {}).items() if group.get("patient")}
    summary = {"cases": {m.case_id: _case_dict(m) for m in metrics}, "overall": _pooled(metrics, patients),
               "by_level": _by_level(metrics, patients)}
    for key in ("source", "sequence"):
        names = sorted({(groups or {}).get(m.case_id, {}).get(key, "") for m in metrics} - {""})
        if names:
            summary[f"by_{key}"] = {name: _pooled([m for m in metrics if groups[m.case_id].get(key) == name], patients)
                                    for name in names}
    return summary


def review_summary(cases: dict, needs_review: dict[str, bool], patients: dict[str, str] | None = None) -> dict:
    """How the predictions' own review flag (``needs_review`` of each ``vertebrae.json``) sorts the scored
    scans (``summarise(...)["cases"]``): the scans with a wrongly named body should all be flagged, the
    scans entirely right as few as possible, and a scan left unflagged should name no body wrongly (what
    a reader relies on).  Scans with a missed or false body but none named wrongly count in neither of the
    first two groups.  Intervals: Wilson's over scans, over patients where ``patients`` (case id ->
    patient) gives one patient several scans."""
    wrong = [k for k, m in cases.items() if m["wrong_levels"]]
    right = [k for k, m in cases.items() if m["all_levels_right"]]
    unflagged = [k for k in cases if not needs_review[k]]
    table = {"wrong": len(wrong), "wrong_flagged": sum(needs_review[k] for k in wrong),
             "right": len(right), "right_flagged": sum(needs_review[k] for k in right),
             "unflagged": len(unflagged), "unflagged_none_wrong": sum(k not in wrong for k in unflagged),
             "wrong_not_flagged": [k for k in wrong if not needs_review[k]]}
    patient = lambda scans: [(patients or {}).get(k, (k,)) for k in scans]   # noqa: E731
    table["ci95"] = {
        "wrong_flagged": rounded(patient_share_interval([needs_review[k] for k in wrong], patient(wrong))),
        "right_flagged": rounded(patient_share_interval([needs_review[k] for k in right], patient(right))),
        "unflagged_none_wrong": rounded(patient_share_interval([k not in wrong for k in unflagged],
                                                               patient(unflagged)))}
    return table


def annotated_cases(path, sources: Sequence[str]) -> list:
    """The annotated cases ``path`` names: one case folder (it holds ``case.json`` or a reference file), one source folder
    (``DATA/tianchi``), a data root (``DATA/<source>/<case>``), or a folder of one's own cases
    (``MINE/<case>/``, :func:`own_case`; each counts as source ``MINE``); InputError when it holds none."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"no data folder at {path}")
    if is_own_case(path):
        if path.parent.name not in SOURCE_FOLDERS:
            return [own_case(path)]
        root, folder, case_name = path.parent.parent, path.parent.name, path.name
    elif path.name in SOURCE_FOLDERS:
        root, folder, case_name = path.parent, path.name, None
    else:
        root, folder, case_name = path, None, None
    cases = [c for c in list_cases(root, sources=sources)
             if (folder is None or c.path.parent.name == folder) and (case_name is None or c.path.name == case_name)]
    if folder is None and case_name is None:   # a folder of one's own cases, or such cases beside the sources
        cases += [own_case(p) for p in sorted(path.iterdir()) if p.is_dir() and is_own_case(p)]
    if not cases:
        raise InputError(f"no annotated case under {path}: give a case folder (with case.json or labels.*), "
                         f"a source folder ({', '.join(SOURCE_FOLDERS)}), a data root holding them, or a folder "
                         "of case folders")
    return cases


def scored_cases(data_root, case_ids: Sequence[str] | None = None) -> list:
    """The annotated cases ``data_root`` names (:func:`annotated_cases`) that ``spinenet evaluate`` scores,
    only ``case_ids`` when given (InputError for an unknown one)."""
    cases = annotated_cases(data_root, sources=tuple(DETECTION_SOURCES) + ("ivd",) + tuple(POINT_SOURCES))
    if case_ids is not None:
        known = {c.case_id for c in cases}
        unknown = [c for c in case_ids if c not in known]
        if unknown:
            raise InputError(f"unknown case(s): {', '.join(unknown)}")
        cases = [c for c in cases if c.case_id in set(case_ids)]
    return cases


def scans_without_prediction(data_root, pred_root, case_ids: Sequence[str] | None = None
                             ) -> list[tuple[str, Path, str | None]]:
    """``(case id, the scan spinenet run reads, its series or None)`` of every scored case with no
    ``pred_root/<case>/vertebrae.json`` (``spinenet evaluate --run``;
    :func:`~SpineNetLib.evaluation.own_cases.image_path`, which finds the ``image.nii.gz`` of ``../shared/data``
    too, and :func:`~SpineNetLib.evaluation.own_cases.case_series`)."""
    return [(c.case_id, image_path(c.path), case_series(c.path))
            for c in scored_cases(data_root, case_ids) if not (Path(pred_root) / c.case_id / "vertebrae.json").is_file()]


def evaluate_directories(data_root, pred_root, case_ids: Sequence[str] | None = None, *,
                         slice_tolerance_mm: float = SLICE_TOLERANCE_MM) -> dict:
    """Score ``pred_root/<case_id>/vertebrae.json`` against every real case with vertebral bodies
    (or, for ``ivd/``, the bodies between annotated discs: :func:`ground_truth_from_disc_labels`), and
    against one's own cases (:func:`own_case`).

    For ``spinenet evaluate --data DIR --pred DIR``.  Cases without a
    prediction file are listed under ``"missing_predictions"`` and not scored.
    """
    pred_root = Path(pred_root)
    if not pred_root.is_dir():
        raise InputError(f"no prediction folder at {pred_root}")
    cases = scored_cases(data_root, case_ids)
    results, missing, needs_review = [], [], {}
    for case in cases:
        pred_file = pred_root / case.case_id / "vertebrae.json"
        if not pred_file.is_file():
            missing.append(case.case_id)
            continue
        data, geometry = case_data_and_geometry(case)
        gt = ground_truth_of(case, data)
        doc = read_vertebrae_json(pred_file, geometry)
        preds = predictions_from_document(doc, geometry.ras_to_canonical, source=str(pred_file))
        results.append(evaluate_case(gt, preds, slice_tolerance_mm=slice_tolerance_mm))
        labelling = doc.get("labelling")
        needs_review[case.case_id] = bool(isinstance(labelling, dict) and labelling.get("needs_review"))
    if not results:
        raise InputError(f"nothing to score: none of the {len(cases)} annotated case(s) under {data_root} has a "
                         f"prediction {pred_root}/<case>/vertebrae.json")
    summary = summarise(results, {c.case_id: {"source": c.source, "sequence": c.sequence, "patient": c.patient_id}
                                  for c in cases})
    for case_id, flagged in needs_review.items():
        summary["cases"][case_id]["needs_review"] = flagged
    summary["review"] = review_summary(summary["cases"], needs_review, {c.case_id: c.patient_id for c in cases})
    summary["missing_predictions"] = missing
    summary["warnings"] = shared_patient_warnings([c for c in cases if c.source not in SOURCE_FOLDERS.values()
                                                   and c.case_id in summary["cases"]])
    return summary

