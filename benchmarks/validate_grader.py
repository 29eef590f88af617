"""Disc grades of a weight set against the radiologists' tags of the held-out clinical slices.

Runs ``spinenet run`` (detection, labelling, disc volumes between the
*detected* bodies, grading: :func:`SpineNetLib.pipeline.run`) on every
held-out ``tianchi/`` study (``training.datasets.DEFAULT_VAL_CASES``; the 5
studies with swapped labels left out), pairs each graded disc with the tag of
the disc point of the same level, and prints balanced accuracy per finding:

* herniation: the ``Herniation`` column against "protrusion or extrusion"
  (tags v3, v4) versus "normal or bulge" (v1, v2) (``training.grader.TIANCHI_DISC_TASKS``);
* endplate defect: ``UpperEndplateDefect`` or ``LowerEndplateDefect`` present
  against a Schmorl node (v5).

Discs are paired by the level names the run gave them (on these studies the
levels are right in 98 %, bundled MODEL_CARD.md); a tagged disc without a
graded disc of its name (a body above or below it not found) is counted as
"not graded".

    python benchmarks/validate_grader.py [--weights bundled|official|DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from script_errors import InputError, at_least


def held_out_studies(data_root):
    from SpineNetLib.training.datasets import DEFAULT_VAL_CASES, POINT_SOURCES, list_cases

    cases = list_cases(data_root, sources=POINT_SOURCES)
    out = []
    for case in cases:
        doc = json.loads((case.path / "case.json").read_text(encoding="utf-8"))
        if case.case_id in DEFAULT_VAL_CASES and not doc.get("suspect_label_order"):
            out.append((case, {p["name"]: p.get("tianchi_tag", "") for p in doc["points"] if p["kind"] == "disc"}))
    return out


def _present(grades: dict, columns: tuple[str, ...]) -> int | None:
    values = [grades[c]["value"] for c in columns if c in grades]
    return None if not values else int(any(v > 0 for v in values))


FINDINGS = {"herniation": ("Herniation",), "endplate_defect": ("UpperEndplateDefect", "LowerEndplateDefect")}


def score(weights: str, data_root, log=print) -> dict:
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.pipeline import RunOptions, load_networks, run
    from SpineNetLib.training.grader import balanced_accuracy, tianchi_disc_targets

    networks = load_networks(weights, "cpu", with_grading=True)
    if networks.grading is None:
        raise InputError(f"the {weights!r} weights have no grading network")
    pairs: dict[str, list[tuple[int, int]]] = {k: [] for k in FINDINGS}
    not_graded = {k: 0 for k in FINDINGS}
    studies = held_out_studies(data_root)
    start = time.perf_counter()
    for n, (case, tags) in enumerate(studies, 1):
        result = run(load_scan(case.path / "image.nii.gz"), networks, RunOptions(grade=True))
        graded = {d["level"]: d.get("grades") or {} for d in result.discs_document["discs"]}
        for level, tag in tags.items():
            truth = tianchi_disc_targets(tag)
            for finding, columns in FINDINGS.items():
                if finding not in truth:
                    continue
                predicted = _present(graded.get(level, {}), columns)
                if predicted is None:
                    not_graded[finding] += 1
                else:
                    pairs[finding].append((predicted, truth[finding]))
        print(f"\r{n}/{len(studies)} {case.case_id}   ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    summary = {"weights": weights, "studies": len(studies), "seconds": round(time.perf_counter() - start, 1)}
    for finding in FINDINGS:
        p = np.array([a for a, _ in pairs[finding]], int)
        t = np.array([b for _, b in pairs[finding]], int)
        summary[finding] = {**balanced_accuracy(p, t, 2), "not_graded": not_graded[finding]}
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--threads", type=at_least(1), default=2)
    args = parser.parse_args(argv)
    import torch

    from SpineNetLib.training.datasets import default_data_root

    torch.set_num_threads(args.threads)
    summary = score(args.weights, args.data or default_data_root())
    print(f"{summary['studies']} held-out tianchi studies, weights {summary['weights']!r} ({summary['seconds']} s)")
    print(f"{'finding':16} {'discs':>5} {'absent':>6} {'present':>7} {'recall-':>7} {'recall+':>7} "
          f"{'bal.acc':>7} {'not graded':>10}")
    for finding in FINDINGS:
        m = summary[finding]
        print(f"{finding:16} {m['n']:5d} {m['counts']['0']:6d} {m['counts']['1']:7d} "
              f"{100 * m['recall'].get('0', float('nan')):6.1f}% {100 * m['recall'].get('1', float('nan')):6.1f}% "
              f"{100 * m['balanced_accuracy']:6.1f}% {m['not_graded']:10d}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
