"""Validation tables of a weight set, from one command: the figures of the model card.

Runs detection and labelling (the same calls as ``spinenet run``) on every
held-out real case, writes ``<pred>/<case>/vertebrae.json``, scores them with
:func:`SpineNetLib.evaluation.evaluate.evaluate_directories` (paper §5.1
definitions; point-annotated ``tianchi/`` cases as described in
``ground_truth_from_points``) and prints the tables per source, per sequence,
per level and per scan.

Held out (never seen by any training run of the bundled weights): the 11
cases of ``training.datasets.DEFAULT_VAL_CASES`` (split by patient), all of
``ivd/`` (a centre not used in training) and every usable ``tianchi/`` study
(not used in training; the 5 with swapped labels are left out).

    python benchmarks/validate_bundled.py [--weights bundled|official|DIR] [--pred DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def held_out_cases(data_root):
    from SpineNetLib.training.datasets import DEFAULT_VAL_CASES, list_cases

    cases = list_cases(data_root, sources=("chu", "myosegmentum", "zukic", "ivd", "tianchi"))
    return [c for c in cases if c.case_id in DEFAULT_VAL_CASES or c.source in ("ivd", "tianchi")]


def predict(cases, weights: str, pred_root: Path) -> None:
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.outputs.vertebrae import vertebrae_document
    from SpineNetLib.pipeline import detect_and_label, load_networks

    networks = load_networks(weights, "cpu")
    for n, case in enumerate(cases, 1):
        target = pred_root / case.case_id / "vertebrae.json"
        if target.is_file():
            continue
        scan = load_scan(case.path / "image.nii.gz")
        result = detect_and_label(scan, networks)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(vertebrae_document(scan, result)), encoding="utf-8")
        print(f"\r{n}/{len(cases)} {case.case_id}          ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def _pct(x) -> str:
    return "   n/a" if x is None else f"{100 * x:5.1f}%"


def print_tables(summary: dict) -> None:
    header = f"{'':24} {'scans':>5} {'bodies':>6} {'prec.':>6} {'recall':>6} {'IDR':>6} {'IDR±1':>6} " \
             f"{'loc.mm':>6} {'all right':>9}"
    rows = [("overall", summary["overall"])]
    rows += [(f"source {k}", v) for k, v in summary.get("by_source", {}).items()]
    rows += [(f"sequence {k}", v) for k, v in summary.get("by_sequence", {}).items()]
    print(header)
    for name, m in rows:
        loc = m["localisation_error_mm_mean"]
        print(f"{name:24} {m['n_cases']:5d} {m['n_gt']:6d} {_pct(m['precision'])} {_pct(m['recall'])} "
              f"{_pct(m['identification_rate'])} {_pct(m['identification_rate_within_1'])} "
              f"{'   n/a' if loc is None else f'{loc:6.2f}'} {_pct(m['share_of_scans_all_levels_right']):>9}")
    print()
    print(f"{'level':8} {'bodies':>6} {'recall':>7} {'IDR':>7}")
    for level, row in summary["by_level"].items():
        print(f"{level:8} {row['n']:6d} {_pct(row['recall']):>7} {_pct(row['identification_rate']):>7}")
    wrong = {k: v for k, v in summary["cases"].items() if not v["all_levels_right"]}
    print(f"\nscans not entirely right: {len(wrong)}")
    for case_id, m in wrong.items():
        print(f"  {case_id}: wrong {', '.join(m['wrong_levels']) or '-'}; missed {', '.join(m['missed_levels']) or '-'}; "
              f"false positives {m['fp']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--pred", default=None, help="prediction folder (kept; reused when it has a case)")
    parser.add_argument("--json", default=None, help="also write the full summary here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from SpineNetLib.evaluation.evaluate import evaluate_directories
    from SpineNetLib.training.datasets import default_data_root

    torch.set_num_threads(args.threads)
    data_root = Path(args.data) if args.data else default_data_root()
    cases = held_out_cases(data_root)
    pred_root = Path(args.pred) if args.pred else Path(tempfile.mkdtemp(prefix="spinenet-validation-"))
    start = time.perf_counter()
    predict(cases, args.weights, pred_root)
    summary = evaluate_directories(data_root, pred_root, case_ids=[c.case_id for c in cases])
    print(f"{len(cases)} held-out cases, weights {args.weights!r}, predictions in {pred_root} "
          f"({time.perf_counter() - start:.0f} s)\n")
    print_tables(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
