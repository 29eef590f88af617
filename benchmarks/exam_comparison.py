"""What the comparison of an exam's series would catch (``spinenet cohort``'s ``exam_disagreement``, ``spinenet run``'s
``compared_with_series``: one rule, ``core.levels.level_differences``): figures, not a test.

    python benchmarks/exam_comparison.py --pred DIR [--split val|train] [--data DIR]

``DIR`` is a prediction folder of ``acquisition_variants.py`` (``DIR/<variant>/<case>/vertebrae.json``,
made with the same ``--split``).  ``../shared/data`` holds no real exam with several sagittal DICOM series,
so this stands in for one: each case as acquired and the same case as a variant (another intensity
mapping, noise, a coil falloff, a blur, another pixel size, another field of view, the image grid turned)
are taken as two series of one exam.  The variants keep the patient where they were (the scan's geometry
follows the new grid), so this is an exam whose patient did not move between series: the comparison's
best case for finding the same vertebra in both; a patient who moves by more than
``core.levels.SAME_BODY_MM`` between series is not measured.

For every such pair the cohort's own rule (``SpineNetLib.cohort.exams.exam_disagreements``) says whether
the two runs name a vertebra differently.  A study asks for a review when its own flag (``needs_review``)
is set or the pair disagrees, as in ``cohort_studies.csv``.  Printed per variant and over all pairs, for the
variant's run and for the as-acquired run of each pair: the runs with a wrongly named body (scored as
``spinenet evaluate`` scores them), those their own flag misses, and of these the ones the disagreement
catches; the runs with every body right, those their own flag asks about, and those the disagreement alone
adds (its false alarms). Then, of the pairs that disagree, which run is right where only one's own flag asks
for a review (:func:`which_is_right`: what the warning's "more likely that one" rests on), and what the runs
whose own flag is set make of the other run's levels where ``spinenet run``'s rule takes them
(:func:`levels_taken`), and how many of the runs whose own flag is set are wrong where the other run, unflagged,
agrees with them (:func:`agreeing_with_a_sure_run`: why agreement does not lift a flag).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from script_errors import InputError  # noqa: E402

AS_ACQUIRED = "as_acquired"


def _as_series_of_one_exam(document: dict, case: str, series: str) -> dict:
    """``document`` with the two UIDs that make its run a series of the exam ``case`` (the variants are
    image files, which record none)."""
    described = dict(document.get("input") or {})
    described.update(study_uid=f"exam-{case}", frame_of_reference_uid="frame-1", series_uid=series)
    return {**document, "input": described}


def pair_outcomes(first: dict, second: dict, case: str) -> tuple[bool, bool]:
    """(whether the first run's levels disagree with the second's, and the other way round), by the
    cohort's rule."""
    from SpineNetLib.cohort.exams import exam_disagreements

    reasons = exam_disagreements({"first": _as_series_of_one_exam(first, case, "1"),
                                  "second": _as_series_of_one_exam(second, case, "2")})
    return "first" in reasons, "second" in reasons


def _scored(data_root: Path, folder: Path) -> dict[str, dict]:
    """{case: {"wrong": a body named wrongly, "flagged": needs_review, "document": vertebrae.json}}."""
    from SpineNetLib.evaluation.evaluate import evaluate_directories

    ran = sorted(p.name for p in folder.iterdir() if (p / "vertebrae.json").is_file())
    summary = evaluate_directories(data_root, folder, case_ids=ran)
    out = {}
    for case, metrics in summary["cases"].items():
        document = json.loads((folder / case / "vertebrae.json").read_text(encoding="utf-8"))
        out[case] = {"wrong": bool(metrics["wrong_levels"]),
                     "flagged": bool((document.get("labelling") or {}).get("needs_review")), "document": document}
    return out


def _line(name: str, runs: list[tuple[dict, bool, bool]]) -> str:
    """One table line over ``runs`` (scored run, whether its pair disagrees, whether the other run of the
    pair has a body named wrongly)."""
    wrong = [(r, d) for r, d, _ in runs if r["wrong"]]
    missed = [(r, d) for r, d in wrong if not r["flagged"]]
    right = [(r, d, o) for r, d, o in runs if not r["wrong"]]
    added = [o for r, d, o in right if d and not r["flagged"]]
    return (f"{name:<26} {len(runs):>5} {len(wrong):>6} {len(missed):>9} {sum(d for _, d in missed):>7}"
            f" {sum(d for r, d in wrong if r['flagged']):>6} {len(right):>6}"
            f" {sum(r['flagged'] for r, _, _ in right):>8}"
            f" {len(added):>6} {sum(added):>13}")


def which_is_right(pairs: list[tuple[dict, dict]]) -> list[str]:
    """Lines on the pairs whose runs disagree (both scored runs of each): where one run's own flag asks for a
    review and the other's does not, how often the unflagged run is the right one; where both or neither
    ask, how often one of them is right. What ``spinenet run``'s warning says about which of two
    disagreeing series is more likely wrong (``core.levels.more_likely_wrong``)."""
    def counts(group) -> tuple[int, int, int]:
        """(pairs with one run right, both wrong, both right: a difference outside the annotation)."""
        return (sum(a["wrong"] != b["wrong"] for a, b in group), sum(a["wrong"] and b["wrong"] for a, b in group),
                sum(not a["wrong"] and not b["wrong"] for a, b in group))

    from SpineNetLib.core.levels import more_likely_wrong

    one = [(a, b) if not a["flagged"] else (b, a) for a, b in pairs if a["flagged"] != b["flagged"]]  # unflagged first
    _, both_wrong, both_right = counts(one)
    named = [(a, b) for a, b in one if more_likely_wrong(False, True, _in_plane_levels(a["document"]),
                                                          _in_plane_levels(b["document"]))]
    lines = [f"{'disagreeing pairs':<22} {len(pairs):>4}",
             f"{'one flagged by itself':<22} {len(one):>4}: the unflagged run right and the flagged one wrong "
             f"{sum(b['wrong'] and not a['wrong'] for a, b in one)}, the other way round "
             f"{sum(a['wrong'] and not b['wrong'] for a, b in one)}, both wrong {both_wrong}, both right {both_right}",
             f"{'  the warning names it':<22} {len(named):>4}: (the flagged one does not show a vertebra below the "
             f"other's lowest) the unflagged run right and the flagged one wrong "
             f"{sum(b['wrong'] and not a['wrong'] for a, b in named)}, the other way round "
             f"{sum(a['wrong'] and not b['wrong'] for a, b in named)}"]
    for name, flagged in (("both flagged", True), ("neither flagged", False)):
        group = [(a, b) for a, b in pairs if a["flagged"] == b["flagged"] == flagged]
        one_right, both_wrong, both_right = counts(group)
        lines.append(f"{name:<22} {len(group):>4}: one of the two right {one_right}, both wrong {both_wrong}, "
                     f"both right {both_right}")
    return lines


def _in_plane_levels(document: dict) -> list[tuple[str, tuple[float, float]]]:
    """(level, in-plane centroid: A and S in mm) of each named vertebra of a ``vertebrae.json``."""
    return [(v["level"], tuple(v["centroid_ras"][1:])) for v in document.get("vertebrae") or [] if v.get("level")]


def taken_levels(scan_run: dict, other_run: dict) -> tuple[dict, str] | None:
    """``scan_run``'s ``vertebrae.json`` with the levels it would take from ``other_run`` taken as another series
    of its exam (``core.levels.levels_to_take_from``, the rule of ``spinenet run``), and the rule it took them by;
    or None where it takes none: its own flag must be set."""
    from SpineNetLib.core.levels import levels_to_take_from, shifted_by

    if not scan_run["flagged"]:
        return None
    document = scan_run["document"]
    levels = [v.get("level") for v in document["vertebrae"]]
    taken = levels_to_take_from(_in_plane_levels(document), levels,
                                [("other", _in_plane_levels(other_run["document"]), other_run["flagged"])])
    if taken is None:
        return None
    vertebrae = [{**v, "level": level} for v, level in zip(document["vertebrae"], shifted_by(levels, taken[1]))]
    return {**document, "vertebrae": vertebrae}, taken[2]


def levels_taken(data_root: Path, pairs: list[tuple[str, str, dict, dict]]) -> list[str]:
    """Lines on the runs that take the other run's levels (``pairs``: variant, case, the run as acquired and the
    variant's run, both scored; each in turn the scan, the other its exam's other series): how many were wrong
    and are now right, were right and are now wrong, stay wrong, stay right; for the variants' runs and for the
    runs as acquired, and by the rule they took them by (from a sure run; from a run that sees the spine down to
    S1 where neither is sure)."""
    import tempfile

    from SpineNetLib.core.levels import SERIES_DOWN_TO_S1, SURE_SERIES
    from SpineNetLib.evaluation.evaluate import evaluate_directories

    roles = ("the variants' runs", "the runs as acquired")
    rules = {SURE_SERIES: "from a sure run", SERIES_DOWN_TO_S1: "from a run down to S1"}
    outcomes = {(role, rule): {"wrong -> right": 0, "right -> wrong": 0, "wrong -> wrong": 0, "right -> right": 0}
                for role in roles for rule in rules}
    with tempfile.TemporaryDirectory() as scratch:
        for n, (_, case, acquired, variant) in enumerate(pairs):
            for role, scan_run, other_run in ((roles[0], variant, acquired), (roles[1], acquired, variant)):
                taken = taken_levels(scan_run, other_run)
                if taken is None:
                    continue
                document, rule = taken
                folder = Path(scratch) / f"{n}-{roles.index(role)}"
                (folder / case).mkdir(parents=True)
                (folder / case / "vertebrae.json").write_text(json.dumps(document), encoding="utf-8")
                scored = evaluate_directories(data_root, folder, case_ids=[case])["cases"][case]
                before, after = ("wrong" if wrong else "right" for wrong in (scan_run["wrong"], scored["wrong_levels"]))
                outcomes[(role, rule)][f"{before} -> {after}"] += 1
    return [f"{role:<22} {rules[rule]:<22} taking the other's levels {sum(counts.values()):>3}: "
            + ", ".join(f"{key} {count}" for key, count in counts.items()) for (role, rule), counts in outcomes.items()]


def agreeing_with_a_sure_run(pairs: list[tuple[str, str, dict, dict]]) -> list[str]:
    """Lines on the runs whose own flag is set and whose pair's other run, unflagged, names at least
    ``core.levels.MIN_SAME_BODIES_ALIKE`` shared vertebrae all alike (``pairs``: variant, case, the run as acquired
    and the variant's run, both scored): how many are right and how many wrong, for the variants' runs and for the
    runs as acquired. What lifting the flag of a series that a sure series of its exam agrees with would do:
    a wrong one among them is named wrongly by the sure series too, without its flag."""
    from SpineNetLib.core.levels import MIN_SAME_BODIES_ALIKE, same_bodies

    counts = {"the variants' runs": [0, 0, []], "the runs as acquired": [0, 0, []]}
    for variant, case, acquired, other in pairs:
        for role, run, partner in (("the variants' runs", other, acquired), ("the runs as acquired", acquired, other)):
            if not run["flagged"] or partner["flagged"]:
                continue
            shared = same_bodies(_in_plane_levels(run["document"]), _in_plane_levels(partner["document"]))
            if len(shared) >= MIN_SAME_BODIES_ALIKE and all(mine == theirs for mine, theirs in shared):
                counts[role][run["wrong"]] += 1
                if run["wrong"]:
                    counts[role][2].append(f"{case} beside {variant}")
    return [f"{role:<22} flagged, beside an unflagged run that names the same vertebrae alike {right + wrong:>4}: "
            f"right {right}, wrong {wrong}" + (f" ({', '.join(which)})" if which else "")
            for role, (right, wrong, which) in counts.items()]


HEADER = (f"{'runs':<26} {'pairs':>5} {'wrong':>6} {'unflagged':>9} {'caught':>7} {'both':>6} {'right':>6}"
          f" {'flagged':>8} {'added':>6} {'partner wrong':>13}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, help="prediction folder of acquisition_variants.py")
    parser.add_argument("--split", choices=("val", "train"), default="val", help="the split the predictions are of")
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    args = parser.parse_args(argv)
    pred_root = Path(args.pred)
    if not (pred_root / AS_ACQUIRED).is_dir():
        raise InputError(f"no {AS_ACQUIRED} folder in {pred_root}: run acquisition_variants.py --pred {pred_root} "
                         "first (with the as_acquired variant)")
    from SpineNetLib.training.datasets import default_data_root

    data_root = Path(args.data) if args.data else default_data_root()
    acquired = _scored(data_root, pred_root / AS_ACQUIRED)
    variants = sorted(p.name for p in pred_root.iterdir() if p.is_dir() and p.name != AS_ACQUIRED)
    print(f"{args.split} split: {len(acquired)} cases as acquired; each variant's run and the same case's run as "
          "acquired taken as two series of one exam\n")
    print("wrong: runs with a body named wrongly; unflagged: of these, without their own review flag; caught: of "
          "these, the pair disagrees; both: wrong, flagged, and the pair disagrees too; right: runs with every "
          "annotated body right; flagged: of these, with their own flag; added: of these, without it but the pair "
          "disagrees (the comparison alone asks for their review); partner wrong: of those, the other run of the "
          "pair has a body named wrongly (one of the two is wrong: the reader must look at both)\n")
    print(HEADER)
    every_second, every_first, disagreeing, taking, every_pair = [], [], [], [], []
    for variant in variants:
        runs = _scored(data_root, pred_root / variant)
        second, first = [], []
        for case, run in runs.items():
            if case not in acquired:
                continue
            first_disagrees, second_disagrees = pair_outcomes(acquired[case]["document"], run["document"], case)
            every_pair.append((variant, case, acquired[case], run))
            second.append((run, second_disagrees, acquired[case]["wrong"]))
            first.append((acquired[case], first_disagrees, run["wrong"]))
            if first_disagrees or second_disagrees:
                disagreeing.append((acquired[case], run))
                taking.append((variant, case, acquired[case], run))
        print(_line(f"{variant}", second))
        every_second += second
        every_first += first
    print(_line("every variant's run", every_second))
    print(_line("the runs as acquired", every_first))
    print("\nWhich of two disagreeing runs is right, by their own review flags:")
    print("\n".join(which_is_right(disagreeing)))
    print("\nA run whose own flag is set takes the levels of the other run of its pair where that one's is not, or, "
          "where both are set, where the other sees the spine down to S1 and it names none S1 (spinenet run's rule, "
          "core/levels.levels_to_take_from):")
    print("\n".join(levels_taken(data_root, taking)))
    print("\nA run whose own flag is set beside an unflagged run that agrees (its flag is kept: lifting it would hide "
          "the wrong ones):")
    print("\n".join(agreeing_with_a_sure_run(every_pair)))
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
