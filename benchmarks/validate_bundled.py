"""Validation tables of a weight set, from one command: the figures of the model card.

Runs detection and labelling (the same calls as ``spinenet run``) on every
held-out real case, writes ``<pred>/<case>/vertebrae.json``, scores them with
:func:`SpineNetLib.evaluation.evaluate.evaluate_directories` (paper §5.1
definitions; point-annotated ``tianchi/`` cases as described in
``ground_truth_from_points``) and prints the tables per source, per sequence,
per level and per scan.

Held out (never seen by any training run of the bundled weights): the 61
cases of ``training.datasets.DEFAULT_VAL_CASES`` (split by patient: 4 chu/,
6 myosegmentum/, the zukic/ T2 patient, 50 tianchi/ studies) and all of
``ivd/`` (a centre no run trains on).  The 5 tianchi/ studies with swapped
labels are left out everywhere.

    python benchmarks/validate_bundled.py [--weights bundled|official|DIR] [--pred DIR] [--json FILE] [--phantoms]
        [--split val|train|all] [--sources chu,...]

``--split all --sources chu`` scores every chu/ volume: with weights trained ``--leave-out-source chu``
(MODEL_CARD.md, "A centre the networks never saw") all 17 are scans of a centre they never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from script_errors import InputError, at_least


def held_out_cases(data_root):
    from SpineNetLib.training.datasets import DEFAULT_VAL_CASES, list_cases

    cases = list_cases(data_root, sources=("chu", "myosegmentum", "zukic", "ivd", "tianchi"))
    return [c for c in cases if c.case_id in DEFAULT_VAL_CASES or c.source == "ivd"]


def training_cases(data_root):
    """The training side of the default split (for choosing the review threshold on training data)."""
    from SpineNetLib.training.datasets import DEFAULT_VAL_CASES, list_cases

    cases = list_cases(data_root, sources=("chu", "myosegmentum", "zukic", "tianchi"))
    return [c for c in cases if c.case_id not in DEFAULT_VAL_CASES]


def cases_of(data_root, split: str, sources: str | None = None) -> list:
    """The cases of ``split`` ("val": held out, "train": the training side, "all": both, held out first), of
    the comma-separated ``sources`` only when given (an unknown source, or none left, is an InputError)."""
    held_out, training = held_out_cases(data_root), training_cases(data_root)
    cases = (held_out if split in ("val", "all") else []) + (training if split in ("train", "all") else [])
    if sources is None:
        return cases
    wanted = {name.strip() for name in sources.split(",") if name.strip()}
    known = {c.source for c in held_out + training}
    if not wanted or wanted - known:
        raise InputError(f"--sources {sources}: the sources are {', '.join(sorted(known))}")
    cases = [c for c in cases if c.source in wanted]
    if not cases:
        raise InputError(f"--sources {sources}: no case of the split {split!r}")
    return cases


def detection_params_for(plan: str | None):
    """``DetectionParams`` with the detection plan asked for (``--plan``); None keeps the pipeline's default."""
    from SpineNetLib.detect.plans import DetectionParams

    return DetectionParams(plan=plan) if plan else None


def predict(cases, weights: str, pred_root: Path, profile_name: str | None = None,
            precision: str = "fp32", runtime: str = "torch", plan: str | None = None,
            threads: int | None = None) -> None:
    """``vertebrae.json`` of every case from :func:`SpineNetLib.pipeline.run` (no grading), as ``spinenet run``."""
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.pipeline import RunOptions, load_networks, processing_profile, run

    networks = load_networks(weights, "cpu", precision=precision, runtime=runtime, threads=threads)
    profile = processing_profile(profile_name, networks.weights.source)
    options = RunOptions(grade=False, profile=profile.name, detection_params=detection_params_for(plan))
    reused = [c.case_id for c in cases if (pred_root / c.case_id / "vertebrae.json").is_file()]
    if reused:   # a resumed run; a folder left by another weight set would be scored as if it were this one
        print(f"reusing {len(reused)} predictions already in {pred_root} (delete them to predict again)",
              file=sys.stderr)
    for n, case in enumerate(cases, 1):
        target = pred_root / case.case_id / "vertebrae.json"
        if target.is_file():
            continue
        scan = load_scan(case.path / "image.nii.gz", resample_isotropic=profile.slab_average_thin_slices)
        result = run(scan, networks, options)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result.vertebrae_document), encoding="utf-8")
        (target.parent / "discs.json").write_text(json.dumps(result.discs_document), encoding="utf-8")
        print(f"\r{n}/{len(cases)} {case.case_id}          ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def print_tables(summary: dict) -> None:
    """The model card's tables; the two ranges are 95 % intervals (``SpineNetLib/evaluation/intervals.py``:
    Wilson's, over scans; for the IDR with the scan as the unit; over patients where a patient has several
    scans, as zukic's T1 and TIRM of one subject)."""
    from SpineNetLib.evaluation.tables import level_lines, percent_cell as _pct
    from SpineNetLib.evaluation.intervals import percent_range

    rows = [("overall", summary["overall"])]
    rows += [(f"source {k}", v) for k, v in summary.get("by_source", {}).items()]
    rows += [(f"sequence {k}", v) for k, v in summary.get("by_sequence", {}).items()]
    width = max(24, *(len(name) for name, _ in rows))
    print(f"{'':{width}} {'scans':>5} {'pat.':>4} {'bodies':>6} {'prec.':>6} {'recall':>6} {'IDR':>6} {'IDR 95% CI':>11} "
          f"{'IDR±1':>6} {'loc.mm':>6} {'all right':>9} {'95% CI':>11} {'shifted':>7}")
    for name, m in rows:
        loc = m["localisation_error_mm_mean"]
        print(f"{name:{width}} {m['n_cases']:5d} {m['n_patients']:4d} {m['n_gt']:6d} {_pct(m['precision'])} {_pct(m['recall'])} "
              f"{_pct(m['identification_rate'])} {percent_range(m['ci95']['identification_rate']):>11} "
              f"{_pct(m['identification_rate_within_1'])} {'   n/a' if loc is None else f'{loc:6.2f}'} "
              f"{_pct(m['share_of_scans_all_levels_right']):>9} "
              f"{percent_range(m['ci95']['share_of_scans_all_levels_right']):>11} {m['scans_shifted']:7d}")
    o = summary["overall"]
    print()
    if o.get("disc_points"):
        # a disc point lies between two bodies: inside an outline, that outline reaches into the disc
        inside = ", ".join(f"{disc} {row['inside_an_outline']}/{row['scored']}" for disc, row in o["disc_points"].items())
        print(f"disc points inside a detected body outline (the outline reaches into the disc; clinical slices: "
              f"the radiologists' points, ivd volumes: the disc mask's centre): {inside}")
    print()
    print("\n".join(level_lines(summary)))
    wrong = {k: v for k, v in summary["cases"].items() if not v["all_levels_right"]}
    print(f"\nscans not entirely right: {len(wrong)}")
    for case_id, m in wrong.items():
        shift = m["level_shift"]
        print(f"  {case_id}: wrong {', '.join(m['wrong_levels']) or '-'}; missed {', '.join(m['missed_levels']) or '-'}; "
              f"false positives {m['fp']}" + (f"; shifted by {shift:+d}" if shift else ""))


PHANTOM_FOVS = ("lumbar", "whole", "cervical")
PHANTOM_CONTRASTS = ("T1", "T2", "STIR")
PHANTOM_SEEDS = (9001, 9002)


def phantom_table(weights: str, precision: str = "fp32", runtime: str = "torch", plan: str | None = None) -> dict:
    """Held-out phantoms (seeds no training run uses) per field of view and contrast, with exact truth.

    ``make_phantom(fov, contrast, n_slices=9, seed, variability=1, rotation U(-10, 10) deg, include_s2)``;
    a body counts as right when it is found with its own level (``demo_check.check_against_phantom``).
    """
    import numpy as np

    from SpineNetLib.evaluation.demo_check import check_against_phantom
    from SpineNetLib.outputs.vertebrae import vertebrae_document
    from SpineNetLib.pipeline import detect_and_label, load_networks
    from SpineNetLib.synthetic.phantom import make_phantom

    networks = load_networks(weights, "cpu", precision=precision, runtime=runtime)
    detection_params = detection_params_for(plan)
    table = {}
    print(f"\nheld-out phantoms (seeds {PHANTOM_SEEDS}): bodies found / named right / scans all right")
    for fov in PHANTOM_FOVS:
        for contrast in PHANTOM_CONTRASTS:
            found = right = total = scans_right = 0
            for seed in PHANTOM_SEEDS:
                rotation = float(np.random.default_rng(seed).uniform(-10.0, 10.0))
                ph = make_phantom(fov=fov, contrast=contrast, n_slices=9, seed=seed, variability=1.0,
                                  rotation_deg=rotation, include_s2=True)
                found_bodies = detect_and_label(ph.scan, networks, detection_params=detection_params)
                check = check_against_phantom(vertebrae_document(ph.scan, found_bodies), ph)
                required = [r for r in check.rows if r.required]
                total += len(required)
                found += sum(r.found_level is not None for r in required)
                right += sum(r.right for r in required)
                scans_right += int(check.all_right)
            table[f"{fov}_{contrast}"] = {"bodies": total, "found": found, "right": right,
                                          "scans": len(PHANTOM_SEEDS), "scans_right": scans_right}
            print(f"  {fov:9} {contrast:5} {found:3d}/{total:<3d} found  {right:3d}/{total:<3d} right  "
                  f"{scans_right}/{len(PHANTOM_SEEDS)} scans")
    return table


def review_table(summary: dict, pred_root: Path) -> dict:
    """Which scans the weights' own review rule flags (``evaluate.review_summary``, printed), with each
    scan's flag and margin."""
    from SpineNetLib.evaluation.tables import review_lines

    print("\n" + "\n".join(review_lines(summary)))
    margins = {case_id: (json.loads((pred_root / case_id / "vertebrae.json").read_text(encoding="utf-8"))
                         .get("labelling") or {}).get("margin_nats") for case_id in summary["cases"]}
    flags = {case_id: m["needs_review"] for case_id, m in summary["cases"].items()}
    return {**summary["review"], "needs_review": flags, "margin_nats": margins}


def scored_discs(summary: dict, pred_root: Path) -> dict[str, list[dict]] | None:
    """The discs of each prediction's discs.json, for the cases with a disc scored (a point or a mask: only
    tianchi/ and ivd/ have them); None when such a prediction has no discs.json (an older folder)."""
    discs = {}
    for case_id, m in summary["cases"].items():
        if not m["discs_scored"]:
            continue
        path = pred_root / case_id / "discs.json"
        if not path.is_file():
            return None
        discs[case_id] = (json.loads(path.read_text(encoding="utf-8")) or {}).get("discs", [])
    return discs


def s1_outline_check_table(summary: dict, discs_by_case: dict[str, list[dict]] | None) -> dict | None:
    """How well the L5-S1 measurement warnings of discs.json (``discs.measurements.disc_measurement_warnings``:
    the disc above S1 under 3 mm in front or in the middle, a negative height, a mean over 25 mm) mark the
    scans whose radiologists' L5-S1 point lies inside a detected outline (``discs_by_case``:
    :func:`scored_discs`; None, an older folder, gives None)."""
    if discs_by_case is None:
        return None
    warned, inside = {}, {}
    for case_id, m in summary["cases"].items():
        if "L5-S1" not in m["discs_scored"]:
            continue
        discs = discs_by_case[case_id]
        lines = [line for d in discs if d.get("level") == "L5-S1" for line in d.get("measurement_warnings") or []]
        warned[case_id], inside[case_id] = bool(lines), "L5-S1" in m["disc_points_inside_outlines"]
    table = {"inside_warned": sum(warned[k] for k in inside if inside[k]), "inside": sum(inside.values()),
             "outside_warned": sum(warned[k] for k in inside if not inside[k]),
             "outside": sum(not v for v in inside.values())}
    print(f"L5-S1 measurement warning: on {table['inside_warned']}/{table['inside']} scans whose L5-S1 point "
          f"lies inside an outline, {table['outside_warned']}/{table['outside']} others")
    return table


def disc_warning_table(summary: dict, discs_by_case: dict[str, list[dict]] | None) -> dict | None:
    """How well the measurement warnings of discs.json mark, over every scored disc (radiologists' points on
    the clinical slices, disc masks' centres on the ivd volumes), the discs whose point lies inside a detected
    outline; and the share of that owed to the line for a body outlined from a weaker detection
    (``discs.measurements.rougher_outline_warning``). ``discs_by_case``: :func:`scored_discs` (None gives None)."""
    from SpineNetLib.discs.measurements import is_rougher_outline_warning

    if discs_by_case is None:
        return None
    table = {"inside": 0, "inside_warned": 0, "inside_warned_rougher_only": 0, "outside": 0, "outside_warned": 0,
             "outside_warned_rougher_only": 0, "beside_rougher": 0, "beside_rougher_inside": 0}
    for case_id, discs in discs_by_case.items():
        m = summary["cases"][case_id]
        for disc in discs:
            if disc.get("level") not in m["discs_scored"]:
                continue
            where = "inside" if disc["level"] in m["disc_points_inside_outlines"] else "outside"
            lines = disc.get("measurement_warnings") or []
            rougher = [line for line in lines
                       if line.startswith(f"{disc['level']}: ") and is_rougher_outline_warning(line)]
            table[where] += 1
            table[f"{where}_warned"] += bool(lines)
            table[f"{where}_warned_rougher_only"] += bool(rougher) and len(rougher) == len(lines)
            table["beside_rougher"] += bool(rougher)
            table["beside_rougher_inside"] += bool(rougher) and where == "inside"
    print(f"measurement warnings, every scored disc: on {table['inside_warned']}/{table['inside']} discs whose point "
          f"lies inside an outline ({table['inside_warned_rougher_only']} by the rougher-outline line alone), "
          f"{table['outside_warned']}/{table['outside']} others ({table['outside_warned_rougher_only']}); discs "
          f"beside a body outlined from a weaker detection: {table['beside_rougher']}, its point inside an outline "
          f"on {table['beside_rougher_inside']}")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--pred", default=None, help="prediction folder (kept; reused when it has a case)")
    parser.add_argument("--json", default=None, help="also write the full summary here")
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--split", choices=("val", "train", "all"), default="val",
                        help="held-out cases (default), the training side, or both")
    parser.add_argument("--sources", default=None, metavar="LIST",
                        help="only the cases of these sources, comma separated (e.g. chu: with --split all every "
                             "volume of a centre that a run trained with --leave-out-source never saw)")
    parser.add_argument("--profile", choices=("default", "official"), default=None,
                        help="processing profile (default: the weights' own, docs/PROFILES.md)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="network arithmetic (SpineNetLib/models/precision.py)")
    parser.add_argument("--runtime", choices=("torch", "openvino", "onnx"), default="torch",
                        help="where the networks run (SpineNetLib/models/runtimes.py); onnx never imports torch "
                             "here, so the resampling runs in numpy as in `spinenet run --runtime onnx`")
    parser.add_argument("--plan", choices=("patches", "whole_slice"), default=None,
                        help="detection plan (default: DetectionParams' own; SpineNetLib/detect/plans.py; the "
                             "official profile always uses the official patches)")
    parser.add_argument("--phantoms", action="store_true",
                        help="also score held-out phantoms of every field of view and contrast (T1, T2, STIR)")
    args = parser.parse_args(argv)

    from SpineNetLib.evaluation.evaluate import evaluate_directories
    from SpineNetLib.training.datasets import default_data_root

    if args.runtime == "onnx":   # as the command runs it (apps/cli._use_threads), without importing torch
        if args.phantoms:
            raise InputError("--phantoms makes the phantoms with torch: leave it out with --runtime onnx")
    else:
        import torch

        torch.set_num_threads(args.threads)
    data_root = Path(args.data) if args.data else default_data_root()
    cases = cases_of(data_root, args.split, args.sources)
    pred_root = Path(args.pred) if args.pred else Path(tempfile.mkdtemp(prefix="spinenet-validation-"))
    start = time.perf_counter()
    predict(cases, args.weights, pred_root, args.profile, args.precision, args.runtime, args.plan, args.threads)
    summary = evaluate_directories(data_root, pred_root, case_ids=[c.case_id for c in cases])
    side = {"val": "held-out", "train": "training", "all": "held-out and training"}[args.split]
    print(f"{len(cases)} {side} cases, weights {args.weights!r}, predictions in {pred_root} "
          f"({time.perf_counter() - start:.0f} s)\n")
    print_tables(summary)
    summary["review"] = review_table(summary, pred_root)
    discs_by_case = scored_discs(summary, pred_root)   # each discs.json read once, for both tables
    summary["s1_outline_check"] = s1_outline_check_table(summary, discs_by_case)
    summary["disc_warnings"] = disc_warning_table(summary, discs_by_case)
    if args.phantoms:
        summary["phantoms"] = phantom_table(args.weights, args.precision, args.runtime, args.plan)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
