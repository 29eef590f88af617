"""A thoracolumbar series read with the exam's lumbar series beside it (issue 10): figures, not a test.

    python benchmarks/thoracolumbar_exam.py [--threads 2] [--data DIR] [--cases ID,...]

A field of view that ends above L3 holds no sacrum to count from, and the bundled networks name 40 % of
the held-out scans cut so one level off (``acquisition_variants.py``, ``ends_at_l2``; all of them flagged).
A radiologist counts such a series from the exam's lumbar series. This runs each of the 68 held-out scans of
``validate_bundled.py`` cut between L2 and L3 (``acquisition_variants.vary``) twice, as ``spinenet run``
runs it (no grading): on its own, and with the whole scan as the other sagittal series of its exam
(``RunOptions.other_series``: the patient did not move; ``label/other_series.py`` compares them and, where
only the cut series' own labelling asks for a review, takes the whole scan's levels,
``core.levels.series_to_take_levels_from``). Each run is scored against the case's annotation as
``spinenet evaluate`` scores it, and the line per outcome counts the scans.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from script_errors import InputError, at_least  # noqa: E402


def _wrong(data_root: Path, folder: Path, case_id: str, document: dict) -> bool:
    """Whether ``document`` names an annotated body wrongly (written to ``folder/case_id`` to be scored)."""
    from SpineNetLib.evaluation.evaluate import evaluate_directories

    (folder / case_id).mkdir(parents=True, exist_ok=True)
    (folder / case_id / "vertebrae.json").write_text(json.dumps(document), encoding="utf-8")
    return bool(evaluate_directories(data_root, folder, case_ids=[case_id])["cases"][case_id]["wrong_levels"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--cases", default=None, help="comma-separated case ids (default: all 68 held out)")
    args = parser.parse_args(argv)
    from acquisition_variants import vary
    from validate_bundled import held_out_cases

    from SpineNetLib.evaluation.evaluate import ground_truth_of_case
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.pipeline import RunOptions, load_networks, run
    from SpineNetLib.training.datasets import default_data_root

    data_root = Path(args.data) if args.data else default_data_root()
    cases = held_out_cases(data_root)
    if args.cases:
        wanted = set(args.cases.split(","))
        unknown = wanted - {c.case_id for c in cases}
        if unknown:
            raise InputError(f"not held-out cases: {', '.join(sorted(unknown))}")
        cases = [c for c in cases if c.case_id in wanted]
    networks = load_networks("bundled", "cpu", threads=args.threads)
    outcomes: Counter = Counter()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for n, case in enumerate(cases, 1):
            whole = load_scan(case.path / "image.nii.gz")
            whole = dataclasses.replace(whole, metadata={**whole.metadata, "series_description": "lumbar",
                                                         "series_number": "5"})
            cut = vary(whole, "ends_at_l2", ground_truth_of_case(case), 0)
            if cut is None:
                continue
            alone = run(cut, networks, RunOptions(grade=False)).vertebrae_document
            beside = run(cut, networks, RunOptions(grade=False, other_series=[whole])).vertebrae_document
            before = _wrong(data_root, Path(scratch) / "alone", case.case_id, alone)
            after = _wrong(data_root, Path(scratch) / "beside", case.case_id, beside)
            taken = "levels_taken_from_series" in beside["labelling"]
            outcomes[("wrong" if before else "right", "wrong" if after else "right", taken)] += 1
            if before or after:
                print(f"{case.case_id}: on its own {'wrong' if before else 'right'}, beside the lumbar series "
                      f"{'wrong' if after else 'right'}{', its levels taken' if taken else ''}", flush=True)
            print(f"\r{n}/{len(cases)}   ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"\n{sum(outcomes.values())} held-out scans cut between L2 and L3 ({time.perf_counter() - start:.0f} s):")
    for (before, after, taken), count in sorted(outcomes.items()):
        print(f"  on its own {before}, beside the exam's lumbar series {after}"
              f"{' (its levels taken)' if taken else ''}: {count}")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
