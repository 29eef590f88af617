"""A thoracolumbar series read with the exam's lumbar series beside it (issue 10): figures, not a test.

    python benchmarks/thoracolumbar_exam.py [--threads 2] [--data DIR] [--cases ID,...] [--cohort]

A field of view that ends above L3 holds no sacrum to count from, and the bundled networks name 40 % of
the held-out scans cut so one level off (``acquisition_variants.py``, ``ends_at_l2``; all of them flagged).
A radiologist counts such a series from the exam's lumbar series. This runs each of the 68 held-out scans of
``validate_bundled.py`` cut between L2 and L3 (``acquisition_variants.vary``) twice, as ``spinenet run``
runs it (no grading): on its own, and with the whole scan as the other sagittal series of its exam
(``RunOptions.other_series``: the patient did not move; ``label/other_series.py`` compares them and, where
only the cut series' own labelling asks for a review, takes the whole scan's levels,
``core.levels.series_to_take_levels_from``). Each run is scored against the case's annotation as
``spinenet evaluate`` scores it, and the line per outcome counts the scans.

``--cohort``: the same exams through ``spinenet cohort`` instead. Each case's whole scan and its cut are written
as two sagittal DICOM series of one exam (one StudyInstanceUID and FrameOfReferenceUID; 12-bit values), run as
studies of their own on a local Dask cluster of one worker (no grading, no pictures), after which the cut study
takes the whole scan's levels where the rule holds (``cohort/exam_levels.py``). The cut study's own levels
(``labelling.levels_taken_from_series.own_levels`` where it took some) and its final levels are scored.
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


def _as_dicom_series(scan, folder: Path, exam: dict, number: int, description: str) -> None:
    """Write ``scan`` (canonical voxels: rows S->I, columns A->P, slices R->L) as one sagittal DICOM series of
    the exam ``exam`` (its UIDs and patient), the values scaled to 0..4000."""
    import numpy as np

    from SpineNetLib.inputs.writers import write_dicom_series

    to_ras = np.asarray(scan.canonical_to_ras, float)
    ijk_to_ras = np.column_stack([to_ras[:, 1], to_ras[:, 0], to_ras[:, 2], to_ras[:, 3]])   # i: column, j: row
    top = float(scan.voxels.max()) or 1.0
    write_dicom_series(np.transpose(scan.voxels, (2, 0, 1)), ijk_to_ras, folder, rescale_slope=top / 4000.0,
                       series_description=description, patient_id=exam["PatientID"], file_prefix=f"S{number}",
                       extra_tags={**exam, "SeriesNumber": number})


def _through_the_cohort(data_root: Path, cases, threads: int, scratch: Path) -> Counter:
    """The outcomes of ``--cohort`` (module docstring): {(own levels, final levels, taken): scans}."""
    from acquisition_variants import vary

    from SpineNetLib.cohort.run import CohortSettings, run_cohort
    from SpineNetLib.evaluation.evaluate import ground_truth_of_case
    from SpineNetLib.inputs.load import load_scan

    root, cut_series = scratch / "exams", {}
    for n, case in enumerate(cases, 1):
        whole = load_scan(case.path / "image.nii.gz")
        cut = vary(whole, "ends_at_l2", ground_truth_of_case(case), 0)
        if cut is None:
            continue
        exam = {"PatientID": case.case_id, "StudyInstanceUID": f"1.2.826.0.1.3680043.8.498.{n}.1",
                "FrameOfReferenceUID": f"1.2.826.0.1.3680043.8.498.{n}.2"}
        _as_dicom_series(whole, root / case.case_id / "lumbar", exam, 5, "lumbar")
        _as_dicom_series(cut, root / case.case_id / "thoracolumbar", exam, 6, "thoracolumbar")
        cut_series[f"{case.case_id}/thoracolumbar"] = case.case_id
    out = scratch / "cohort"
    result = run_cohort(root, out, CohortSettings(grade=False, preview=False, threads=threads), workers=1,
                        progress=sys.stderr)
    outcomes: Counter = Counter()
    for study in result.studies:
        case_id = cut_series.get(study.relative)
        folder = out / "studies" / study.study_id
        if case_id is None or not (folder / "vertebrae.json").is_file():
            continue
        final = json.loads((folder / "vertebrae.json").read_text(encoding="utf-8"))
        # read from the DICOM series, not the case's image: scored by the outlines' RAS corners alone
        final["scan"] = {key: value for key, value in final["scan"].items() if key != "shape"}
        taken = (final.get("labelling") or {}).get("levels_taken_from_series")
        own = final if not taken else {**final, "vertebrae": [
            {**v, "level": level} for v, level in zip(final["vertebrae"], taken["own_levels"])]}
        before = _wrong(data_root, scratch / "alone", case_id, own)
        after = _wrong(data_root, scratch / "beside", case_id, final)
        outcomes[("wrong" if before else "right", "wrong" if after else "right", bool(taken))] += 1
        if before or after:
            print(f"{case_id}: on its own {'wrong' if before else 'right'}, after the cohort "
                  f"{'wrong' if after else 'right'}{', its levels taken' if taken else ''}", flush=True)
    return outcomes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--cases", default=None, help="comma-separated case ids (default: all 68 held out)")
    parser.add_argument("--cohort", action="store_true", help="through spinenet cohort (module docstring)")
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
    start = time.perf_counter()
    if args.cohort:
        with tempfile.TemporaryDirectory() as scratch:
            outcomes = _through_the_cohort(data_root, cases, args.threads, Path(scratch))
        _print_outcomes(outcomes, start, "after spinenet cohort")
        return 0
    networks = load_networks("bundled", "cpu", threads=args.threads)
    outcomes: Counter = Counter()
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
    _print_outcomes(outcomes, start, "beside the exam's lumbar series")
    return 0


def _print_outcomes(outcomes: Counter, start: float, where: str) -> None:
    print(f"\n{sum(outcomes.values())} held-out scans cut between L2 and L3 ({time.perf_counter() - start:.0f} s):")
    for (before, after, taken), count in sorted(outcomes.items()):
        print(f"  on its own {before}, {where} {after}{' (its levels taken)' if taken else ''}: {count}")


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
