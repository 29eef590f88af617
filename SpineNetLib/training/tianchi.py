"""Training targets from the point-annotated clinical slices of ``tianchi/`` (issue 10).

``tianchi/`` gives, on one mid-sagittal T2 slice per study, radiologist centre
points of L1-L5 and of the discs T12-L1 .. L5-S1, but no outlines (data README).
The detector and the appearance network need outlines, so they are made here
as *checked pseudo-labels*:

* **L1-L5**: a detection of a given detector (the previous bundled one) that
  contains exactly one body point takes that point's level (a disc point may
  lie on its edge: the radiologists' disc points often touch the endplate).
  A body point that no detection claims in this way is left without an
  outline, and :func:`loss_ignore_mask` removes a disk around it from the
  detector's loss (it is a body, so it must not be taught as background).
* **T12**: the detection directly above L1's, when the T12-L1 disc point lies
  between the two centres (and outside it) and the gap is about one body height.
* **S1**: the detection directly below L5's when the L5-S1 disc point lies
  between them and outside it (a detected S1); otherwise an outline
  *constructed* from L5's outline and the L5-S1 disc point
  (:func:`constructed_s1`): the lumbosacral disc separates the two bodies, so
  S1's upper endplate is L5's lower endplate moved across the disc and tilted
  to the disc's wedge (:data:`L5_S1_WEDGE`; the disc at least
  :data:`MIN_L5_S1_DISC_OVER_L5` of L5's height), and S1's height is taken as
  0.9 x L5's.  This is the sacrum target the detector never had for clinical
  slices (README: the sacrum is visible below the L5-S1 point in every case).

The detector's loss ignores the image above the highest target body and
below S1 (bodies there are visible but carry no label).  Everything is
deterministic given the detector; :func:`make_pseudo_labels` writes it to one
JSON file that the trainers read (``--tianchi-targets``), so every training
run says exactly which outlines it was given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SpineNetLib.core import polygons
from SpineNetLib.core.errors import InputError
from SpineNetLib.detect.plans import DetectionParams
from SpineNetLib.training import datasets as dataset
from SpineNetLib.training.provenance import code_identity

BODY_LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
#: S1's height along its axis as a share of L5's, for the constructed S1 outline.
S1_HEIGHT_OVER_L5 = 0.9
#: The L5-S1 disc is a wedge, higher in front: the constructed S1's anterior upper corner lies
#: (1 + w) x the disc's height at the disc point below L5's anterior lower corner, the posterior one
#: (1 - w) x, so 2:1 front to back.  Measured: on the L5-S1 masks of the five ivd/ volumes the disc is
#: 1.07-2.25 (median 1.5) times higher at 30 % of its depth from the front than at 70 % (L4-L5:
#: 1.0-1.33), which, linear across the disc, is about 3:1 at the corners; the 9 S1s the previous
#: detector found on training-side slices leave median 0.55 and 0.33 L5 heights at the corners (1.7:1).
#: A disc of even height put S1's front corner on L5's (MODEL_CARD.md, "Outlines around the discs").
#: The ivd/ volumes (and zukic_15, below) are held out: these two numbers are the only thing taken
#: from their masks into training, a shape prior, and a figure on them of a detector trained with it
#: is not quite independent (say so).
L5_S1_WEDGE = 1.0 / 3.0
#: The constructed L5-S1 disc is at least this share of L5's height high at the disc point.  The
#: radiologists' disc point often touches L5's lower endplate, which mirrored across it gave S1's upper
#: endplate on L5's lower one; the five ivd/ L5-S1 discs are 0.22-0.42 (median 0.35) of L5's height
#: high in the middle, zukic_15 (T2, pathology) 0.24.
MIN_L5_S1_DISC_OVER_L5 = 0.2
#: How S1 is found where no detector gave it (``spinenet train tianchi-targets --s1-construction``):
#: "wedge" (the default since 2026-12-02) tilts the constructed S1 to the disc's wedge, keeps at least
#: :data:`MIN_L5_S1_DISC_OVER_L5` of disc and takes no detected S1 (or T12) that holds the disc point
#: between it and L5 (L1);
#: "even" is the earlier construction (a disc of even height, mirrored across the disc point), with
#: which the bundled detector and grader were trained (MODEL_CARD.md, "Training").
S1_CONSTRUCTIONS: tuple[str, ...] = ("wedge", "even")
#: Radius (in body heights) of the ignored disk around a body point no detection matched.
UNMATCHED_IGNORE_RADIUS = 0.8
#: Margin (in body heights) kept in the loss above the highest and below the lowest target body.
BAND_MARGIN = 0.25


@dataclass
class SliceTargets:
    """Pseudo-labelled bodies of one tianchi study (canonical pixels, x = column, y = row)."""

    case_id: str
    quads: dict[str, np.ndarray]          # level -> (4, 2) rt, rb, lb, lt
    s1_constructed: bool
    unmatched_points: list[tuple[float, float]]
    body_height_px: float

    def to_json(self) -> dict:
        return {"case_id": self.case_id, "quads": {k: np.round(v, 3).tolist() for k, v in self.quads.items()},
                "s1_constructed": self.s1_constructed,
                "unmatched_points": [list(map(float, p)) for p in self.unmatched_points],
                "body_height_px": float(self.body_height_px)}

    @classmethod
    def from_json(cls, doc: dict) -> "SliceTargets":
        return cls(case_id=str(doc["case_id"]),
                   quads={k: np.asarray(v, float).reshape(4, 2) for k, v in doc["quads"].items()},
                   s1_constructed=bool(doc["s1_constructed"]),
                   unmatched_points=[tuple(p) for p in doc["unmatched_points"]],
                   body_height_px=float(doc["body_height_px"]))


def case_points(labels: np.ndarray, level_names: dict[int, str]) -> dict[str, np.ndarray]:
    """Centre ``[x, y]`` of every annotated point of a tianchi case's label image: "L1".., "T12-L1".."""
    out = {}
    for code, name in level_names.items():
        mask = (np.asarray(labels) == code).any(axis=2)
        if mask.any():
            out[name.removesuffix(" disc")] = dataset.mask_centroid(mask)
    return out


def _height(quad: np.ndarray) -> float:
    """Mean length of the two vertical edges (rt-rb and lt-lb)."""
    return float((np.linalg.norm(quad[0] - quad[1]) + np.linalg.norm(quad[3] - quad[2])) / 2.0)


def constructed_s1(l5: np.ndarray, l5_s1_disc: np.ndarray, construction: str = "wedge") -> np.ndarray:
    """An S1 outline below L5 across the L5-S1 disc point (module docstring), rt, rb, lb, lt.

    Canonical columns run anterior to posterior (``inputs/canonical.py``), so the lower-x end of
    L5's lower endplate is its front; the disc opens there by :data:`L5_S1_WEDGE`.  A disc point on
    or above L5's lower endplate still leaves a disc :data:`MIN_L5_S1_DISC_OVER_L5` high.  With
    ``construction="even"`` neither (:data:`S1_CONSTRUCTIONS`).
    """
    l5 = np.asarray(l5, float)
    rb, lb = l5[1], l5[2]
    offset = 2.0 * (np.asarray(l5_s1_disc, float) - (rb + lb) / 2.0)
    along = (rb - lb) / max(np.linalg.norm(rb - lb), 1e-6)
    down = np.array([-along[1], along[0]])
    if down[1] < 0:
        down = -down
    gap = float(np.dot(offset, down))                      # below 0 where the disc point lies inside L5
    if construction == "wedge":
        wedge, disc_height = L5_S1_WEDGE, max(gap, MIN_L5_S1_DISC_OVER_L5 * _height(l5))
    else:
        wedge, disc_height = 0.0, gap
    offset = offset + (disc_height - gap) * down
    front_sign = 1.0 if lb[0] <= rb[0] else -1.0        # +1: lb is the anterior corner
    lt = lb + offset + front_sign * wedge * disc_height * down
    rt = rb + offset - front_sign * wedge * disc_height * down
    h = S1_HEIGHT_OVER_L5 * _height(l5)
    return np.stack([rt, rt + h * down, lt + h * down, lt])


def _centre(quad) -> np.ndarray:
    return np.asarray(quad, float).mean(axis=0)


def match_points(detections: list[np.ndarray], points: dict[str, np.ndarray], case_id: str = "",
                 s1_construction: str = "wedge") -> SliceTargets:
    """Pseudo-labels of one slice from its detected quads and annotated points (module docstring)."""
    body_points = {k: p for k, p in points.items() if k in BODY_LEVELS}
    quads: dict[str, np.ndarray] = {}
    used = set()
    for level, point in body_points.items():
        inside = [i for i, q in enumerate(detections) if polygons.point_in_polygon(point, q)]
        if len(inside) != 1 or inside[0] in used:
            continue
        q = detections[inside[0]]
        if any(polygons.point_in_polygon(p, q) for k, p in body_points.items() if k != level):
            continue
        quads[level] = np.asarray(q, float)
        used.add(inside[0])
    heights = [_height(q) for q in quads.values()]
    body_h = float(np.median(heights)) if heights else 0.0
    free = [np.asarray(q, float) for i, q in enumerate(detections) if i not in used]

    def neighbour(anchor: str, disc: str, below: bool) -> np.ndarray | None:
        if anchor not in quads or disc not in points or body_h <= 0:
            return None
        a, d = _centre(quads[anchor]), points[disc]
        best = None
        for q in free:
            c = _centre(q)
            lo, hi = (a[1], c[1]) if below else (c[1], a[1])
            gap = np.linalg.norm(c - a)
            if lo < d[1] < hi and 0.7 * body_h < gap < 1.8 * body_h \
                    and not any(polygons.point_in_polygon(p, q) for p in body_points.values()) \
                    and not (s1_construction == "wedge" and polygons.point_in_polygon(d, q)):
                if best is None or gap < np.linalg.norm(_centre(best) - a):
                    best = q
        return best

    t12 = neighbour("L1", "T12-L1", below=False)
    if t12 is not None:
        quads["T12"] = t12
    s1 = neighbour("L5", "L5-S1", below=True)
    s1_constructed = False
    if s1 is None and "L5" in quads and "L5-S1" in points:
        s1, s1_constructed = constructed_s1(quads["L5"], points["L5-S1"], s1_construction), True
    if s1 is not None:
        quads["S1"] = s1
    unmatched = [tuple(map(float, p)) for k, p in body_points.items() if k not in quads]
    return SliceTargets(case_id, quads, s1_constructed, unmatched, body_h)


def loss_ignore_mask(targets: SliceTargets, shape_hw: tuple[int, int]) -> np.ndarray:
    """True where the detector's loss is ignored: outside the labelled band and around unmatched bodies."""
    h, w = shape_hw
    ignore = np.zeros((h, w), bool)
    if not targets.quads:
        ignore[:] = True
        return ignore
    margin = BAND_MARGIN * max(targets.body_height_px, 1.0)
    ys = np.concatenate([q[:, 1] for q in targets.quads.values()])
    top, bottom = float(ys.min()) - margin, float(ys.max()) + margin
    rows = np.arange(h)[:, None]
    ignore |= (rows < top) | (rows > bottom)
    cols = np.arange(w)[None, :]
    r = UNMATCHED_IGNORE_RADIUS * max(targets.body_height_px, 1.0)
    for x, y in targets.unmatched_points:
        ignore |= (cols - x) ** 2 + (rows - y) ** 2 <= r * r
    return ignore


def make_pseudo_labels(cases, detector_checkpoint, out_path, log=print, s1_construction: str = "wedge",
                       params: DetectionParams = DetectionParams()) -> dict:
    """Run the detector checkpoint on every tianchi case (detection ``params``) and write the checked
    pseudo-labels as JSON.  The patch stride matters on wide fields of view: the targets of the bundled
    detector and appearance network were made at 0.6, the default stride before 2026-12-01 (with their
    detector, 3 bodies fewer than at 0.8, on tianchi_057 and tianchi_105; MODEL_CARD.md, "Training")."""
    from SpineNetLib.detect import vfr as detection
    from SpineNetLib.weights import checkpoints

    model = checkpoints.load_model("detector", Path(detector_checkpoint), device="cpu")
    predictor = detection.network_predictor(model, device="cpu")
    docs, counts = [], {"cases": 0, "S1_detected": 0, "S1_constructed": 0, "unmatched": 0}
    for case in cases:
        if case.source not in dataset.POINT_SOURCES:
            continue
        _, scan, data = dataset.case_scans(case)
        result = detection.detect_vertebrae(scan, predictor, params)
        quads = [np.asarray(v.average_polygon, float) for v in result.vertebrae]
        t = match_points(quads, case_points(data.labels, data.level_names), case.case_id, s1_construction)
        docs.append(t.to_json())
        counts["cases"] += 1
        counts["S1_detected"] += int("S1" in t.quads and not t.s1_constructed)
        counts["S1_constructed"] += int(t.s1_constructed)
        counts["unmatched"] += len(t.unmatched_points)
    out = {"detector": str(detector_checkpoint), "s1_construction": s1_construction,
           "stride_fraction": float(params.stride_fraction), "made_by": code_identity(), "counts": counts,
           "cases": docs}
    Path(out_path).write_text(json.dumps(out), encoding="utf-8")
    log(f"pseudo-labels of {counts['cases']} tianchi slices: {counts} -> {out_path}")
    return out


def read_pseudo_labels(path) -> dict[str, SliceTargets]:
    """``case_id -> SliceTargets`` from a file written by :func:`make_pseudo_labels`."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        return {d["case_id"]: SliceTargets.from_json(d) for d in doc["cases"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read tianchi pseudo-labels {path}: {exc}") from None


def training_studies(data_root, targets_path, *, without_calibration: bool = False) -> list[tuple]:
    """``(case, SliceTargets)`` of the tianchi studies of the default split's training side.

    The validation studies (``datasets.DEFAULT_VAL_CASES``) are never returned,
    whatever the pseudo-label file holds; with ``without_calibration`` neither
    are the calibration studies (``datasets.calibration_split``).
    """
    targets = read_pseudo_labels(targets_path)
    cases = dataset.list_cases(data_root, sources=dataset.POINT_SOURCES)
    train = dataset.calibration_split(cases)[0] if without_calibration else dataset.default_split(cases)[0]
    return [(c, targets[c.case_id]) for c in train if c.case_id in targets and targets[c.case_id].quads]
