"""Check a run on a synthetic phantom against the phantom's exact ground truth (``spinenet demo``).

The demo is the first result a new user sees, so it says itself whether it
is right: one row per ground-truth body (level, found or missed, the level
the run gave it, centroid error in mm) and a one-line verdict.

Which bodies are scored:

* every body of ``Phantom.vertebrae`` that is a vertebra (``extra`` False):
  it must be found and carry its own level;
* bodies that are visible but not required: the first sacral segment "S2"
  (listed with ``include_s2``; the official S2 rule names it, official §5.5)
  and bodies cut by the image edge (``Phantom.cut_vertebrae``).  Missing
  them is fine; finding them with the wrong level is an error;
* a detection that contains no ground-truth centre on its nearest slice is a
  false positive, and so is a second detection of the same body.

Matching is the paper's rule (paper §5.1): a body is found by the detection
whose outline, on the slice nearest the body's mid slice, contains the
body's centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from SpineNetLib.core import polygons
from SpineNetLib.evaluation.evaluate import predictions_from_document


@dataclass
class TruthRow:
    level: str
    #: "required", "sacral segment (not required)" or "cut by the image edge (not required)".
    role: str
    found_level: str | None = None
    error_mm: float | None = None

    @property
    def required(self) -> bool:
        return self.role == "required"

    @property
    def right(self) -> bool:
        if self.found_level is None:
            return not self.required
        return self.found_level == self.level


@dataclass
class DemoCheck:
    rows: list[TruthRow]
    #: Levels the run gave to detections that match no ground-truth body (or match one twice).
    false_positives: list[str] = field(default_factory=list)

    @property
    def all_right(self) -> bool:
        return all(r.right for r in self.rows) and not self.false_positives

    def verdict(self) -> str:
        required = [r for r in self.rows if r.required]
        named = f"{required[0].level}..{required[-1].level}" if required else "none"
        if self.all_right:
            extra = [r for r in self.rows if not r.required and r.found_level]
            also = f"; also named right: {', '.join(r.level for r in extra)}" if extra else ""
            return f"all levels right: {len(required)} of {len(required)} bodies {named} found and named right{also}"
        problems = [f"{r.level} missed" for r in self.rows if r.required and r.found_level is None]
        problems += [f"{r.level} named {r.found_level}" for r in self.rows if r.found_level and not r.right]
        problems += [f"extra detection named {lv or '?'}" for lv in self.false_positives]
        return f"WRONG: {'; '.join(problems)}"

    def review_note(self, vertebrae_doc: dict) -> str | None:
        """What the run's review flag (``labelling.needs_review``) was worth here, where the truth is
        known; None when the run did not flag its levels and they are right.  A new user reads the
        flag's warnings first, then this check: the two must not seem to contradict each other."""
        flagged = bool((vertebrae_doc.get("labelling") or {}).get("needs_review"))
        if flagged and self.all_right:
            return ("the run asked for a review of its levels (the warnings above), and against the ground "
                    "truth they are right: a false alarm. The flag errs on the side of caution, on real scans "
                    "too (README, \"How sure the levels are\")")
        if flagged:
            return "the run asked for a review of its levels (the warnings above), rightly"
        if not self.all_right:
            return "the run did not ask for a review of its levels: an error it did not see"
        return None

    def table(self) -> str:
        lines = [f"{'truth':6} {'role':38} {'result':7} {'centroid error':>14}"]
        for r in self.rows:
            error = "" if r.error_mm is None else f"{r.error_mm:.1f} mm"
            result = r.found_level or "missed"
            mark = "" if r.right else "  <- wrong"
            lines.append(f"{r.level:6} {r.role:38} {result:7} {error:>14}{mark}")
        for level in self.false_positives:
            lines.append(f"{'-':6} {'no body here (false positive)':38} {level or '?':7} {'':>14}  <- wrong")
        return "\n".join(lines)


def _ras_to_canonical_of(phantom):
    """``(N, 3)`` RAS mm -> ``(N, 3)`` canonical ``[row, col, slice]`` of the phantom's scan."""
    inverse = np.linalg.inv(phantom.scan.canonical_to_ras)
    return lambda ras: (np.c_[ras, np.ones(len(ras))] @ inverse.T)[:, :3]


def check_against_phantom(vertebrae_doc: dict, phantom) -> DemoCheck:
    """Compare a ``spinenet.vertebrae/1`` document of a run on ``phantom``'s scan with its ground truth."""
    truth = [(v, "required" if not v.extra else "sacral segment (not required)") for v in phantom.vertebrae]
    truth += [(v, "cut by the image edge (not required)") for v in phantom.cut_vertebrae]
    truth.sort(key=lambda item: float(item[0].centroid_xy[1]))
    detections = predictions_from_document(vertebrae_doc, _ras_to_canonical_of(phantom))
    row_mm, col_mm = phantom.scan.spacing_mm[0], phantom.scan.spacing_mm[1]
    used: set[int] = set()
    rows = []
    for body, role in truth:
        row = TruthRow(level=body.level, role=role)
        centre = np.asarray(body.centroid_xy, float)
        best = None
        for d, detection in enumerate(detections):
            quad = detection.polygon_near(body.mid_slice, math.inf)  # on the nearest of its slices
            if d not in used and polygons.point_in_polygon(centre, quad):
                offset = (quad.mean(axis=0) - centre) * np.array([col_mm, row_mm])
                error = float(math.hypot(*offset))
                if best is None or error < best[1]:
                    best = (d, error, detection.level)
        if best is not None:
            used.add(best[0])
            row.found_level, row.error_mm = best[2] or "?", best[1]
        rows.append(row)
    false_positives = [detection.level for d, detection in enumerate(detections) if d not in used]
    return DemoCheck(rows=rows, false_positives=false_positives)
