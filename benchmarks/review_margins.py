"""How the review flag would catch wrongly named scans at other review margins: figures, not a test.

    python benchmarks/review_margins.py --pred DIR [--split val|train] [--margins 10,15,20,25,30,36.74]

``DIR`` is a prediction folder of ``acquisition_variants.py`` (``DIR/<variant>/<case>/vertebrae.json``,
made with the same ``--split``).  A run's review flag (``needs_review``) is set by its labelling margin
(the best labelling shifted by one level costs less than the review margin more than the chosen one:
``label.confidence``) or by a reason the margin cannot show (two bodies with the same level evidence,
an S1 that may be L5, an S1 cut by the image edge, a missed vertebra, a retried pixel spacing, ...).
This script reads both from each ``vertebrae.json`` and counts, for each margin of ``--margins``, the
runs it would flag, separately for single sagittal slices and for volumes (their margins differ: a
slice holds less evidence): the runs with a wrongly named body flagged, and the others flagged.  The
flags are recomputed from the runs' own margins and reasons, so the script first checks that, at the
margin each run used, it gets that run's own flag back (``mismatches`` must be 0).

Made to choose a review margin for single slices on the training side and confirm it on the held-out
split; that margin was not kept (docs/EXPERIMENTS.md, "A lower review margin for single slices").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from script_errors import InputError

def _margin_reason_start() -> str:
    """How the review reason of the margin (``confidence.shift_warning``) opens."""
    from SpineNetLib.label.confidence import SHIFT_WARNING_START

    return SHIFT_WARNING_START


def _notes() -> tuple[str, ...]:
    """Starts of the warnings that are notes only: they never set the flag by themselves."""
    from SpineNetLib.label.confidence import S1_ENDS_ABOVE_EDGE_START, S1_NOT_FOUND

    return (S1_NOT_FOUND, S1_ENDS_ABOVE_EDGE_START)


def run_record(document: dict) -> dict:
    """What one run's flag rests on: its margin, the margin it used, whether another reason flags it."""
    labelling = document.get("labelling") or {}
    scan = document.get("scan") or {}
    shape, axis = scan.get("shape"), scan.get("slice_axis")
    single = shape is not None and axis is not None and int(shape[int(axis)]) == 1
    warnings = labelling.get("warnings") or []
    notes = _notes()
    others = [w for w in warnings if not w.startswith(_margin_reason_start()) and not w.startswith(notes)]
    margin = labelling.get("margin_nats")
    return {"single_slice": single, "margin": float("inf") if margin is None else float(margin),
            "used_margin": float(labelling.get("review_margin_nats") or 0.0), "other_reason": bool(others),
            "needs_review": bool(labelling.get("needs_review"))}


def flagged_at(record: dict, review_margin: float) -> bool:
    return record["other_reason"] or record["margin"] < review_margin


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, help="prediction folder of acquisition_variants.py")
    parser.add_argument("--split", choices=("val", "train"), default="val", help="the split the predictions are of")
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--margins", default="10,15,20,25,30,36.74", help="comma-separated review margins (nats)")
    args = parser.parse_args(argv)
    try:
        margins = [float(m) for m in args.margins.split(",") if m.strip()]
    except ValueError:
        raise InputError(f"--margins: numbers separated by commas, got {args.margins!r}") from None
    pred_root = Path(args.pred)
    variants = sorted(p.name for p in pred_root.iterdir() if p.is_dir()) if pred_root.is_dir() else []
    if not variants:
        raise InputError(f"no variant folders in {pred_root}: run acquisition_variants.py --pred {pred_root} first")

    from SpineNetLib.evaluation.evaluate import evaluate_directories
    from SpineNetLib.training.datasets import default_data_root

    data_root = Path(args.data) if args.data else default_data_root()
    records, mismatches = [], 0
    for variant in variants:
        folder = pred_root / variant
        ran = sorted(p.name for p in folder.iterdir() if (p / "vertebrae.json").is_file())
        summary = evaluate_directories(data_root, folder, case_ids=ran)
        for case, metrics in summary["cases"].items():
            record = run_record(json.loads((folder / case / "vertebrae.json").read_text(encoding="utf-8")))
            record.update(variant=variant, case=case, wrong=bool(metrics["wrong_levels"]))
            mismatches += flagged_at(record, record["used_margin"]) != record["needs_review"]
            records.append(record)
    print(f"{len(records)} runs ({args.split} split; variants {', '.join(variants)}); "
          f"mismatches {mismatches} (flags recomputed at each run's own margin that differ from its flag)")
    for kind, single in (("single sagittal slices", True), ("volumes", False)):
        runs = [r for r in records if r["single_slice"] == single]
        wrong = [r for r in runs if r["wrong"]]
        right = [r for r in runs if not r["wrong"]]
        print(f"\n{kind}: {len(runs)} runs, {len(wrong)} with a wrongly named body")
        print(f"{'margin':>8} {'wrong flagged':>14} {'others flagged':>15}")
        for margin in margins:
            print(f"{margin:8.2f} {sum(flagged_at(r, margin) for r in wrong):>7d} of {len(wrong):<4d}"
                  f" {sum(flagged_at(r, margin) for r in right):>7d} of {len(right):<5d}")
        by_margin_only = sorted(round(r["margin"], 1) for r in wrong if not r["other_reason"])
        print(f"  margins of the wrong runs that no other reason flags: {by_margin_only}")
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
