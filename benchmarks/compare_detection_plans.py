"""Do the whole-slice and the patch detection plans find the same vertebrae? (issue 16, item 1)

    python benchmarks/compare_detection_plans.py [--weights bundled|DIR] [--no-real] [--no-phantoms] [--json FILE]

Runs ``detect.vfr.detect_vertebrae`` twice on each scan with the same detector weights, once with
``DetectionParams(plan="patches")`` and once with ``plan="whole_slice"`` (all other settings the
``default`` profile's), on seeded phantoms (lumbar and whole spine) and on the held-out real cases
of ``benchmarks/validate_bundled.py`` (read as ``spinenet run`` reads them with ``default``).  A
vertebra of one plan is matched to the one of the other plan whose average polygon overlaps it
most (IoU > 0.5, one to one).  Per case it prints the vertebrae of each plan, how many match,
whether the matched ones have the same slices, and the median and largest corner difference
(scan pixels; per polygon, its largest corner difference) over the slices they share; the same
for the weaker detections (``DetectionResult.candidates``).  For scale, the last columns compare
the patch plan with itself on the scan moved by ``SHIFT_PX`` rows and columns into a frame of its
minimum value at the top left (its patch grid moved against the anatomy; the results shifted back):
how far the detector's outputs move when only the grid of its inputs moves.

The official weights are not needed: both plans run the same network, so any detector with
outputs to compare will do; an official-size detector with random weights finds nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from script_errors import InputError, at_least  # noqa: E402

PHANTOMS = (
    dict(fov="lumbar", shape=(512, 512), pixel_spacing=(0.6, 0.6), n_slices=15, seed=1),
    dict(fov="lumbar", shape=(448, 400), pixel_spacing=(0.7, 0.7), n_slices=9, seed=9001, rotation_deg=8.0),
    dict(fov="lumbar", shape=(512, 384), pixel_spacing=(0.5, 0.8), n_slices=9, seed=9002, contrast="T1"),
    dict(fov="whole", shape=(1024, 512), pixel_spacing=(0.9, 0.9), n_slices=15, seed=1),
    dict(fov="whole", shape=(800, 400), pixel_spacing=(1.1, 1.1), n_slices=9, seed=9001, contrast="STIR"),
)


#: Rows and columns of padding at the top left for the patch plan's own reference (module doc).
SHIFT_PX = 7


@dataclass
class Agreement:
    """How the vertebrae of two detections of one scan pair up."""

    n_a: int
    n_b: int
    matched: int
    same_slices: int
    max_corner_px: float
    #: per matched polygon (a vertebra on one slice), its largest corner difference
    polygon_px: list

    @property
    def same(self) -> bool:
        return self.n_a == self.n_b == self.matched == self.same_slices


def agreement(a, b) -> Agreement:
    """Pairs vertebrae ``a`` and ``b`` by the IoU of their average polygons (> 0.5, greedy, one to one)."""
    from SpineNetLib.core import polygons

    pairs = sorted(((polygons.iou(u.average_polygon, v.average_polygon), i, j)
                    for i, u in enumerate(a) for j, v in enumerate(b)), reverse=True)
    used_a, used_b, matched = set(), set(), []
    for iou, i, j in pairs:
        if iou > 0.5 and i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matched.append((a[i], b[j]))
    diffs = [float(np.abs(u.polygon_on(s) - v.polygon_on(s)).max())
             for u, v in matched for s in sorted(set(u.slices) & set(v.slices))]
    return Agreement(len(a), len(b), len(matched), sum(u.slices == v.slices for u, v in matched),
                     max(diffs, default=0.0), diffs)


def compare_scan(scan, predict) -> dict:
    from SpineNetLib.detect import vfr

    results = {}
    for plan in ("patches", "whole_slice"):
        start = time.perf_counter()
        results[plan] = vfr.detect_vertebrae(scan, predict, vfr.DetectionParams(plan=plan))
        results[plan + "_s"] = time.perf_counter() - start
    verts = agreement(results["patches"].vertebrae, results["whole_slice"].vertebrae)
    cands = agreement(results["patches"].candidates, results["whole_slice"].candidates)
    padded = np.pad(scan.voxels, ((SHIFT_PX, 0), (SHIFT_PX, 0), (0, 0)), constant_values=float(scan.voxels.min()))
    moved = vfr.detect_vertebrae(replace(scan, voxels=padded), predict, vfr.DetectionParams(plan="patches")).vertebrae
    for v in moved:
        v.polygons = [p - SHIFT_PX for p in v.polygons]
    shifted = agreement(results["patches"].vertebrae, moved)
    return {"vertebrae": verts.__dict__ | {"same": verts.same},
            "candidates": cands.__dict__ | {"same": cands.same},
            "patches_shifted": shifted.__dict__ | {"same": shifted.same},
            "seconds": {"patches": round(results["patches_s"], 2), "whole_slice": round(results["whole_slice_s"], 2)}}


def _median(a: dict) -> float:
    return float(np.median(a["polygon_px"])) if a["polygon_px"] else 0.0


HEADER = (f"{'':34} {'patches vs whole slice':^36} | {'weaker':^11} | {'patches vs shifted':^24} | seconds\n"
          f"{'case':34} {'n_p':>4} {'n_w':>4} {'match':>5} {'slices':>6} {'median':>6} {'max px':>6} | "
          f"{'n_p':>3} {'n_w':>3} {'m':>3} | {'n':>3} {'match':>5} {'median':>6} {'max':>6} | {'p':>5} {'w':>5}")


def _row(name: str, r: dict) -> str:
    v, c, t = r["vertebrae"], r["candidates"], r["patches_shifted"]
    return (f"{name:34} {v['n_a']:4d} {v['n_b']:4d} {v['matched']:5d} "
            f"{'same' if v['same_slices'] == v['matched'] else 'DIFF':>6} {_median(v):6.2f} {v['max_corner_px']:6.2f} | "
            f"{c['n_a']:3d} {c['n_b']:3d} {c['matched']:3d} | {t['n_b']:3d} {t['matched']:5d} {_median(t):6.2f} "
            f"{t['max_corner_px']:6.2f} | {r['seconds']['patches']:5.1f} {r['seconds']['whole_slice']:5.1f}")


def _summary(rows: list[dict], key: str) -> str:
    pooled = np.array([d for r in rows for d in r[key]["polygon_px"]])
    same = sum(r[key]["same"] for r in rows)
    worst = max((r[key]["max_corner_px"] for r in rows), default=0.0)
    return (f"same vertebrae and slice sets on {same} of {len(rows)} scans; per matched polygon the largest "
            f"corner difference: median {np.median(pooled):.2f} px, 90th percentile {np.percentile(pooled, 90):.2f} px, "
            f"{np.mean(pooled <= 1.0):.0%} within 1 px, largest {worst:.2f} px")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--no-phantoms", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.no_real and args.no_phantoms:
        raise InputError("--no-real and --no-phantoms leave nothing to compare")

    import torch

    from SpineNetLib.detect import vfr
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.synthetic.phantom import make_phantom
    from SpineNetLib.training.datasets import default_data_root
    from SpineNetLib.weights.checkpoints import load_model
    from SpineNetLib.weights.resolve import resolve_weights
    from validate_bundled import held_out_cases

    torch.set_num_threads(args.threads)
    predict = vfr.network_predictor(load_model("detector", resolve_weights(args.weights).path("detector")))
    scans = []
    if not args.no_phantoms:
        for kw in PHANTOMS:
            name = f"phantom {kw['fov']} {kw['shape'][0]}x{kw['shape'][1]} {kw['pixel_spacing'][0]}x{kw['pixel_spacing'][1]}"
            scans.append((name, lambda kw=kw: make_phantom(**kw).scan))
    if not args.no_real:
        root = Path(args.data) if args.data else default_data_root()
        for case in held_out_cases(root):
            scans.append((case.case_id, lambda c=case: load_scan(c.path / "image.nii.gz", resample_isotropic=True)))
    print(HEADER)
    report = {}
    for name, read in scans:
        report[name] = compare_scan(read(), predict)
        print(_row(name, report[name]), flush=True)
    rows = list(report.values())
    print(f"\npatches vs whole slice: {_summary(rows, 'vertebrae')}")
    print(f"patches vs patches shifted by {SHIFT_PX} px: {_summary(rows, 'patches_shifted')}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
