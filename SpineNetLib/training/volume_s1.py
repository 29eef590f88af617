"""S1 pseudo-labels for the training volumes whose S1 is visible but not outlined (``chu/``, ``myosegmentum/``).

Why: the appearance network saw real S1 bodies only on the clinical single slices (``tianchi/``, most
of them constructed outlines) and in phantoms, never in a real volume, while it saw the L5 of every
training volume.  On held-out chu_07 it calls the real L5 S1 at p = 0.999 (bundled MODEL_CARD.md,
"S1 of the training volumes"), which keeps that L5 out of the labelled chain.  The data README asks for
pseudo-labels with checks where S1 is visible but unannotated; this module makes them.  Networks
trained with them (from scratch and fine-tuned) named fewer held-out scans right and still called
chu_07's L5 S1, so the bundled weights do not use them (the same model-card section).

An S1 is taken from the pipeline's own detection and labelling (``pipeline.detect_and_label``: the
outline the appearance network is given at inference) only when every check holds:

* every outlined body of the case is named right: the labelled body nearest to the centre of each
  annotated body (in-plane, over all its slices) carries that body's level and lies within
  :data:`MAX_CENTRE_DISTANCE_MM` of it, and no two annotated bodies share one labelled body;
* the labelled chain continues with exactly one body named S1 directly below the one named L5;
* S1 has at least half its own height of image below it (an S1 cut by the lower edge is left out:
  the appearance network must not learn that an image ending below a body means S1).

The file written (JSON) maps case id to ``{"S1": [[x, y] * 4]}``: S1's average polygon in the pixels of
the case's slab-averaged scan (``datasets.case_scans``), which has the 1 mm scan's in-plane grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.training.provenance import code_identity

#: A labelled body further than this (mm, in-plane) from an annotated body's centre does not match it.
MAX_CENTRE_DISTANCE_MM = 10.0


def _annotated_centres(data) -> dict[str, np.ndarray]:
    """In-plane ``[x, y]`` centre (pixels) of every annotated vertebral body of a case, by level."""
    from SpineNetLib.training.datasets import is_vertebral_body_code

    centres = {}
    for code, name in data.level_names.items():
        if not is_vertebral_body_code(code):
            continue
        rows, cols, _ = np.nonzero(data.labels == code)
        if len(rows):
            centres[name] = np.array([cols.mean(), rows.mean()])
    return centres


def checked_s1(labelled, annotated: dict[str, np.ndarray], shape_hw: tuple[int, int],
               spacing_rc: tuple[float, float]) -> np.ndarray | None:
    """S1's average polygon ``(4, 2)`` from a labelled chain (top to bottom) when every check of the
    module doc holds, else None.  ``annotated``: centre ``[x, y]`` (pixels) of each outlined body by level."""
    if not annotated or not labelled:
        return None
    scale = np.array([float(spacing_rc[1]), float(spacing_rc[0])])
    centres = np.array([v.centroid_xy for v in labelled]) * scale
    used = set()
    for level, centre in annotated.items():
        offsets = np.hypot(*(centres - np.asarray(centre) * scale).T)
        nearest = int(np.argmin(offsets))
        if labelled[nearest].level != level or offsets[nearest] > MAX_CENTRE_DISTANCE_MM or nearest in used:
            return None
        used.add(nearest)
    levels = [v.level for v in labelled]
    if levels.count("S1") != 1 or "L5" not in levels or levels.index("S1") != levels.index("L5") + 1:
        return None
    s1 = np.asarray(labelled[levels.index("S1")].average_polygon, float)
    height = float(np.ptp(s1[:, 1]))
    if float(shape_hw[0]) - float(s1[:, 1].max()) < 0.5 * height:
        return None
    return s1


def make_volume_s1_targets(cases, networks, out_path, log=print) -> dict[str, dict]:
    """Run detection and labelling (``networks``, as ``pipeline.load_networks`` gives them) on each
    volume case's slab-averaged scan and write the checked S1 outlines to ``out_path`` (JSON)."""
    from SpineNetLib.pipeline import detect_and_label
    from SpineNetLib.training.datasets import case_scans

    targets: dict[str, dict] = {}
    for case in cases:
        _, thick, data = case_scans(case)
        labelled = detect_and_label(thick, networks).vertebrae
        s1 = checked_s1(labelled, _annotated_centres(data), thick.voxels.shape[:2], thick.spacing_mm[:2])
        log(f"{case.case_id}: {'S1 taken' if s1 is not None else 'left out'} "
            f"({', '.join(str(v.level) for v in labelled)})")
        if s1 is not None:
            targets[case.case_id] = {"S1": np.round(s1, 3).tolist()}
    document = {"made_by": code_identity(), "cases": targets}
    Path(out_path).write_text(json.dumps(document, indent=1), encoding="utf-8")
    log(f"{len(targets)} of {len(cases)} volumes give an S1; wrote {out_path}")
    return targets


def read_volume_s1_targets(path) -> dict[str, dict[str, np.ndarray]]:
    """The file of :func:`make_volume_s1_targets`: case id -> {"S1": (4, 2) polygon}. The file records the
    code that made it (``made_by``, :func:`SpineNetLib.training.provenance.code_identity`) beside the cases;
    a file written before 2026-12-05 is the flat map of cases alone, and reads the same."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(raw, dict) and isinstance(raw.get("cases"), dict) and "made_by" in raw:
            raw = raw["cases"]
        return {str(case): {str(level): np.asarray(quad, float).reshape(4, 2) for level, quad in bodies.items()}
                for case, bodies in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise InputError(f"cannot read volume S1 targets {path}: {exc}") from None
