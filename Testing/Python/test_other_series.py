"""`spinenet run` on an exam folder checks its levels against the exam's other sagittal series
(SpineNetLib/label/other_series.py): the networks are oracles (exact levels) unless a test makes one series
name its vertebrae a level off."""

from __future__ import annotations

import json

import pytest

from SpineNetLib import pipeline
from SpineNetLib.apps import cli
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.synthetic.phantom import make_phantom

from batch_script import batch_script
from oracles import name_series_a_level_lower, oracle_networks

EXAM = {"StudyInstanceUID": "1.2.826.0.1.48.1", "FrameOfReferenceUID": "1.2.826.0.1.48.2"}
TIMES = {"T1": {"EchoTime": 10, "RepetitionTime": 550}, "T2": {"EchoTime": 95, "RepetitionTime": 3500}}


@pytest.fixture()
def exam(tmp_path, monkeypatch):
    """A sagittal T2 (series 4) and T1 (series 3) of one phantom in one exam and frame of reference, two
    sagittal scouts of the exam (series 1: ImageType LOCALIZER; series 2: a Philips-style "SmartSurvey"),
    and a T1 of another frame of reference (series 7), with oracle networks."""
    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=5)
    folder = tmp_path / "exam"
    phantom.write_dicom(folder / "t2", series_description="T2 SAG",
                        extra_tags={**TIMES["T2"], **EXAM, "SeriesNumber": 4})
    phantom.write_dicom(folder / "t1", series_description="T1 SAG",
                        extra_tags={**TIMES["T1"], **EXAM, "SeriesNumber": 3})
    phantom.write_dicom(folder / "scout", series_description="SAG LOC", extra_tags={   # neither read nor compared,
        **EXAM, **TIMES["T2"], "SeriesNumber": 1, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})  # T2 or not
    phantom.write_dicom(folder / "survey", series_description="SmartSurvey", extra_tags={   # a scout by its name
        **EXAM, **TIMES["T2"], "SeriesNumber": 2, "ImageType": ["ORIGINAL", "PRIMARY", "M", "FFE"]})
    phantom.write_dicom(folder / "other", series_description="T1 SAG elsewhere",
                        extra_tags={**TIMES["T1"], "StudyInstanceUID": EXAM["StudyInstanceUID"],
                                    "FrameOfReferenceUID": "1.2.826.0.1.48.9", "SeriesNumber": 7})
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    return phantom, folder


def _labelling(out):
    return json.loads((out / "vertebrae.json").read_text())["labelling"]


def test_series_that_agree_are_recorded_and_ask_for_nothing(exam, tmp_path, capsys):
    phantom, folder = exam
    out = tmp_path / "out"
    assert cli.main(["run", str(folder), "-o", str(out), "--quiet", "--no-grade", "--no-preview"]) == 0
    labelling = _labelling(out)
    assert labelling["compared_with_series"] == ["'T1 SAG' (series 3)"]   # not the other frame of reference
    assert labelling["disagreeing_series"] == [] and labelling["agreeing_series"] == ["'T1 SAG' (series 3)"]
    assert json.loads((out / "vertebrae.json").read_text())["timings_s"]["other_series"] > 0
    assert labelling["needs_review"] is False and not any("series" in w for w in labelling["warnings"])
    assert json.loads((out / "vertebrae.json").read_text())["input"]["series_description"] == "T2 SAG"
    assert "; the exam's series 'T1 SAG' (series 3) names the vertebrae alike; wrote " in capsys.readouterr().out
    assert cli.main(["run", str(folder), "-o", str(tmp_path / "alone"), "--quiet", "--no-grade", "--no-preview",
                     "--no-compare-series"]) == 0
    assert "compared_with_series" not in _labelling(tmp_path / "alone")


def test_a_scout_is_known_by_its_image_type_or_its_name():
    """Scouts as scanners mark or name them; sagittal series whose names merely contain such letters are not."""
    from SpineNetLib.inputs.dicom import is_localizer

    for description in ("SAG LOC", "3-Plane Loc", "localizer", "AAHead_Scout", "SmartSurvey", "TriPilot"):
        assert is_localizer({"SeriesDescription": description}), description
    for description in ("T2 SAG", "t2_tse_sag_384", "STIR SAG", "BLOCK T2", "T1 SAG LOCAL", ""):
        assert not is_localizer({"SeriesDescription": description}), description
    assert is_localizer({"ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER", "SeriesDescription": "T2 SAG"})


def test_a_series_that_names_the_vertebrae_a_level_off_asks_for_a_review(exam, tmp_path, monkeypatch, capsys):
    """The T1 labelled one level lower (L1 named L2, ...): the T2's own labelling is confident, yet the
    levels ask for a review, with the T1's name and the vertebra in the warning, in vertebrae.json, the CSV
    and on stderr."""
    phantom, folder = exam
    name_series_a_level_lower(monkeypatch, "T1 SAG")
    out = tmp_path / "out"
    assert cli.main(["run", str(folder), "-o", str(out), "--quiet", "--no-grade", "--no-preview"]) == 0
    labelling = _labelling(out)
    top = phantom.levels[0]
    expected = (f"levels may be shifted: the series 'T1 SAG' (series 3) of the same exam names the vertebra {top} "
                f"here {LEVELS_TOP_DOWN[LEVELS_TOP_DOWN.index(top) + 1]} ({len(phantom.levels)} vertebrae differ); "
                "one of the two series is named wrongly")
    assert labelling["needs_review"] is True and labelling["warnings"][0] == expected
    assert labelling["disagreeing_series"] == ["'T1 SAG' (series 3)"] and labelling["agreeing_series"] == []
    # where the T1 puts its levels: at the T2's own vertebrae (one phantom), each a level lower
    (t1,) = labelling["other_series_levels"]
    t2 = json.loads((out / "vertebrae.json").read_text())["vertebrae"]
    assert t1["series"] == "'T1 SAG' (series 3)" and [v["level"] for v in t1["vertebrae"]] == \
        [LEVELS_TOP_DOWN[LEVELS_TOP_DOWN.index(v["level"]) + 1] for v in t2]
    for mine, theirs in zip(t2, t1["vertebrae"]):
        assert max(abs(a - b) for a, b in zip(mine["centroid_ras"], theirs["centroid_ras"])) < 0.5
    assert f"spinenet: warning: {expected}" in capsys.readouterr().err
    rows = (out / "vertebrae.csv").read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("levels_need_review")] == "true"
    assert [v["level"] for v in json.loads((out / "vertebrae.json").read_text())["vertebrae"]] == phantom.levels


@pytest.mark.parametrize("unsure, likely", [
    (("T1 SAG",), ", more likely that one: its own labelling asks for a review, this one's does not"),
    (("T1 SAG", "T2 SAG"), ""),
])
def test_the_warning_says_which_series_is_more_likely_wrong_where_only_one_asks_on_its_own(
        exam, tmp_path, monkeypatch, unsure, likely):
    """Where the two series disagree and only the other's own labelling asks for a review, the warning says that
    one is more likely named wrongly (measured: benchmarks/exam_comparison.py); where both ask, it does not say.
    (Where only the scan's own asks, it takes the other's levels: the next test.)"""
    phantom, folder = exam
    name_series_a_level_lower(monkeypatch, "T1 SAG", unsure=unsure)
    out = tmp_path / "out"
    assert cli.main(["run", str(folder), "-o", str(out), "--quiet", "--no-grade", "--no-preview"]) == 0
    shifted = [w for w in _labelling(out)["warnings"] if w.startswith("levels may be shifted: the series")]
    assert len(shifted) == 1 and shifted[0].endswith("one of the two series is named wrongly" + likely)


def test_a_series_whose_own_labelling_asks_takes_the_levels_of_a_sure_series_of_its_exam(
        exam, tmp_path, monkeypatch, capsys):
    """The T2's own labelling asks for a review (its S1 may be L5) and the T1's does not; the T1 names every
    vertebra one level lower. The T2 takes the T1's levels, in vertebrae.json, the CSV and the discs, and still
    asks for a review: the first reason says whose levels these are and what the T2 named them on its own."""
    phantom, folder = exam
    name_series_a_level_lower(monkeypatch, "T1 SAG", unsure=("T2 SAG",))
    out = tmp_path / "out"
    assert cli.main(["run", str(folder), "-o", str(out), "--quiet", "--no-preview"]) == 0
    document = json.loads((out / "vertebrae.json").read_text())
    labelling = document["labelling"]
    lower = [LEVELS_TOP_DOWN[LEVELS_TOP_DOWN.index(level) + 1] for level in phantom.levels]
    assert [v["level"] for v in document["vertebrae"]] == lower
    assert labelling["levels_taken_from_series"] == {"series": "'T1 SAG' (series 3)", "shift": 1,
                                                     "own_levels": phantom.levels, "rule": "sure_series"}
    assert labelling["needs_review"] is True and labelling["s1_found"] is ("S1" in lower)
    assert labelling["warnings"][0] == (
        f"levels taken from the series 'T1 SAG' (series 3) of the same exam, which names {lower[0]} the vertebra this "
        f"series named {phantom.levels[0]}: its own labelling does not ask for a review, this one's does; on its "
        f"own this series named the vertebrae {phantom.levels[0]}..{phantom.levels[-1]} (the reasons after this one "
        "are about those levels)")
    assert labelling["disagreeing_series"] == [] and labelling["agreeing_series"] == []
    rows = (out / "vertebrae.csv").read_text().splitlines()
    assert [row.split(",")[rows[0].split(",").index("level")] for row in rows[1:]] == lower
    discs = [d["level"] for d in json.loads((out / "discs.json").read_text())["discs"]]
    assert discs == [f"{a}-{b}" for a, b in zip(lower, lower[1:])]
    assert "levels taken from the series 'T1 SAG' (series 3)" in capsys.readouterr().err
    # a reader who moves them back to the T2's own levels: the correction records what the run gave
    assert cli.main(["correct", str(out), lower[0], phantom.levels[0]]) == 0, capsys.readouterr().err
    corrected = json.loads((out / "vertebrae.json").read_text())
    assert [v["level"] for v in corrected["vertebrae"]] == phantom.levels
    assert corrected["labelling"]["needs_review"] is False and corrected["labelling"]["corrected_by_user"] is True
    assert corrected["labelling"]["before_correction"]["levels"] == lower


def test_levels_are_taken_only_from_sure_series_that_name_every_shared_vertebra_by_one_shift():
    """The rule of taking another series' levels, on level lists: only the series whose own labelling does not
    ask, showing two or more of the scan's vertebrae, all named otherwise by the same number of levels; not where a
    sure series names them alike or by another number, nor where a name would fall below S2, nor where the scan shows
    a vertebra below the sure series' lowest."""
    from SpineNetLib.core.levels import LEVEL_CHOICES
    from SpineNetLib.core.levels import more_likely_wrong, series_to_take_levels_from

    levels = ["T12", "L1", "L2", "L3", "L4", "L5"]
    mine = [(level, (0.0, -30.0 * k)) for k, level in enumerate(levels)]

    def named(shift, k0=0, k1=6):
        return [(LEVEL_CHOICES[LEVEL_CHOICES.index(level) + shift], (1.0, -30.0 * k))
                for k, level in enumerate(levels) if k0 <= k < k1]

    assert series_to_take_levels_from(mine, levels, [("T1", named(1), False)]) == ("T1", 1)
    assert series_to_take_levels_from(mine, levels, [("T1", named(-1, 3), False)]) == ("T1", -1)
    assert series_to_take_levels_from(mine, levels, [("T1", named(1), True)]) is None      # it asks too
    assert series_to_take_levels_from(mine, levels, [("T1", named(1, 5), False)]) is None  # one vertebra shown
    assert series_to_take_levels_from(mine, levels, [("T1", named(1), False), ("STIR", named(0), False)]) is None
    assert series_to_take_levels_from(mine, levels, [("T1", named(1), False), ("STIR", named(2), False)]) is None
    assert series_to_take_levels_from(mine, levels, [("T1", named(1), False), ("STIR", named(0), True)]) == ("T1", 1)
    mixed = named(1, 0, 3) + named(2, 3)
    assert series_to_take_levels_from(mine, levels, [("T1", mixed, False)]) is None
    assert series_to_take_levels_from(mine, levels[:-1] + ["S2"], [("T1", named(1, 0, 5), False)]) is None
    # not from a series that does not see the bottom of the spine this one sees: its S1 may be this one's L5
    assert series_to_take_levels_from(mine, levels, [("T1", named(1, 0, 5), False)]) is None
    assert series_to_take_levels_from(mine, levels, [("T1", named(1, 1), False)]) == ("T1", 1)   # shows less above
    # nor does the warning call this one more likely wrong
    assert more_likely_wrong(True, False, mine, named(1, 0, 5)) == ""
    assert more_likely_wrong(True, False, mine, named(1)).startswith(", more likely this one")
    assert more_likely_wrong(False, True, named(1, 0, 5), mine) == ""


def test_where_no_series_is_sure_levels_are_taken_from_one_that_sees_the_spine_down_to_s1():
    """A thoracolumbar series (T10..L2 on its own, no S1) beside the exam's lumbar series, both asking for a review:
    the lumbar series, which names S1 and shows vertebrae below the thoracolumbar one's lowest, lends its levels;
    not where the scan names S1 itself, where the other names none S1 or does not see lower, where a sure series
    shows the vertebrae (its rule decides), or where two such series name them by different numbers."""
    from SpineNetLib.core.levels import (SERIES_DOWN_TO_S1, SURE_SERIES, levels_to_take_from, series_down_to_s1,
                                         taken_levels_reason)

    own = ["T10", "T11", "T12", "L1", "L2"]
    mine = [(level, (0.0, -30.0 * k)) for k, level in enumerate(own)]
    lumbar_levels = ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]   # the scan's T10 is its T11
    lumbar = [(level, (2.0, -30.0 * k)) for k, level in enumerate(lumbar_levels)]
    assert series_down_to_s1(mine, own, [("lumbar", lumbar, True)]) == ("lumbar", 1)
    assert levels_to_take_from(mine, own, [("lumbar", lumbar, True)]) == ("lumbar", 1, SERIES_DOWN_TO_S1)
    assert levels_to_take_from(mine, own, [("lumbar", lumbar, False)]) == ("lumbar", 1, SURE_SERIES)
    assert series_down_to_s1(mine, own[:-1] + ["S1"], [("lumbar", lumbar, True)]) is None   # it names S1 itself
    no_s1 = [(("L5" if level == "S1" else level), centroid) for level, centroid in lumbar]
    assert series_down_to_s1(mine, own, [("lumbar", no_s1, True)]) is None
    assert series_down_to_s1(mine, own, [("lumbar", lumbar[:5], True)]) is None            # it sees no lower
    alike = [(level, (2.0, -30.0 * k)) for k, level in enumerate(own + ["L3", "L4", "L5", "S1"])]
    assert series_down_to_s1(mine, own, [("lumbar", alike, True)]) is None
    sure = [(level, (1.0, -30.0 * k)) for k, level in enumerate(own)]
    assert series_down_to_s1(mine, own, [("lumbar", lumbar, True), ("T1", sure, False)]) is None
    two_down = [(level, (2.0, -30.0 * k)) for k, level in enumerate(["T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2"])]
    assert series_down_to_s1(mine, own, [("lumbar", lumbar, True), ("STIR", two_down, True)]) is None
    assert taken_levels_reason("the series 'lumbar'", "T10", "T11", own, SERIES_DOWN_TO_S1) == (
        "levels taken from the series 'lumbar' of the same exam, which names T11 the vertebra this series named T10: "
        "it shows the spine down to S1, below this series' lowest vertebra, and this series names none S1 (both "
        "series' own labellings ask for a review); on its own this series named the vertebrae T10..L2 (the reasons "
        "after this one are about those levels)")


def test_the_batch_script_compares_the_exams_series_as_spinenet_run(exam, tmp_path, monkeypatch, capsys):
    """SpineNetBatch.py (Slicer --python-script) on the exam folder: the T2 read, the T1 compared; with the
    T1 a level off, the run asks for a review and the script says "CHECK THE LEVELS"; --no-compare-series
    leaves the T1 alone."""
    phantom, folder = exam
    batch = batch_script()
    out = tmp_path / "batch"
    arguments = ["--input", str(folder), "--output", str(out), "--quiet", "--no-grading", "--no-scene", "--no-preview"]
    assert batch.main(arguments) == 0
    assert _labelling(out)["compared_with_series"] == ["'T1 SAG' (series 3)"]
    assert _labelling(out)["needs_review"] is False
    assert "The exam's series 'T1 SAG' (series 3) names the vertebrae alike." in capsys.readouterr().out
    name_series_a_level_lower(monkeypatch, "T1 SAG")
    capsys.readouterr()
    assert batch.main(arguments) == 0
    assert _labelling(out)["needs_review"] is True
    assert "CHECK THE LEVELS: Levels may be shifted: the series 'T1 SAG' (series 3)" in capsys.readouterr().out
    assert batch.main(arguments + ["--no-compare-series"]) == 0
    assert "compared_with_series" not in _labelling(out) and _labelling(out)["needs_review"] is False


def test_a_series_of_the_exam_that_cannot_be_read_is_named_and_left_out(exam, tmp_path, capsys):
    """One T1 image turned a little against the others: the T1 cannot be read, the T2's run goes on without
    the comparison and says which series was left out and why."""
    import pydicom

    phantom, folder = exam
    path = sorted((folder / "t1").iterdir())[1]
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.01, -1.0]
    ds.save_as(path)
    out = tmp_path / "out"
    assert cli.main(["run", str(folder), "-o", str(out), "--quiet", "--no-grade", "--no-preview"]) == 0
    labelling = _labelling(out)
    assert "compared_with_series" not in labelling and labelling["needs_review"] is False
    warnings = json.loads((out / "vertebrae.json").read_text())["warnings"]
    left_out = [w for w in warnings if "of the exam was not compared with the one read" in w]
    assert len(left_out) == 1 and "contradictory ImageOrientationPatient" in left_out[0], warnings


def test_the_benchmark_counts_which_of_two_disagreeing_runs_is_right():
    """benchmarks/exam_comparison.py's evidence for "more likely that one": pairs ordered either way."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "exam_comparison.py"
    spec = importlib.util.spec_from_file_location("exam_comparison_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    def run(wrong: bool, flagged: bool, bodies: int = 5) -> dict:
        return {"wrong": wrong, "flagged": flagged, "document": {"vertebrae": [
            {"level": f"V{k}", "centroid_ras": [0.0, 0.0, -30.0 * k]} for k in range(bodies)]}}

    sure_right, unsure_wrong = run(False, False), run(True, True)
    unsure_right, sure_wrong = run(False, True, bodies=6), run(True, False)   # it sees a vertebra below the other's
    lines = module.which_is_right([(sure_right, unsure_wrong), (unsure_wrong, sure_right), (sure_wrong, unsure_right),
                                   (unsure_right, unsure_wrong), (sure_right, sure_right)])
    assert [" ".join(line.split()) for line in lines] == [
        "disagreeing pairs 5",
        "one flagged by itself 3: the unflagged run right and the flagged one wrong 2, the other way round 1, "
        "both wrong 0, both right 0",
        "the warning names it 2: (the flagged one does not show a vertebra below the other's lowest) the unflagged "
        "run right and the flagged one wrong 2, the other way round 0",
        "both flagged 1: one of the two right 1, both wrong 0, both right 0",
        "neither flagged 1: one of the two right 0, both wrong 0, both right 1"]


def test_the_benchmark_takes_levels_by_the_rule_of_spinenet_run():
    """benchmarks/exam_comparison.py's runs that take the other run's levels: only a flagged run, from an
    unflagged one, every shared vertebra shifted alike, or, where both are flagged, from one that sees the spine
    down to S1."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "exam_comparison.py"
    spec = importlib.util.spec_from_file_location("exam_comparison_taking", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(levels, flagged):
        return {"flagged": flagged, "document": {"vertebrae": [
            {"level": level, "centroid_ras": [0.0, 0.0, -30.0 * k]} for k, level in enumerate(levels)]}}

    own, lower = ["L3", "L4", "L5", "S1"], ["L4", "L5", "S1", "S2"]
    taken, rule = module.taken_levels(run(own, True), run(lower, False))
    assert [v["level"] for v in taken["vertebrae"]] == lower and rule == "sure_series"
    assert module.taken_levels(run(own, False), run(lower, False)) is None
    assert module.taken_levels(run(own, True), run(lower, True)) is None
    assert module.taken_levels(run(own, True), run(["L4", "L5", "L5", "S1"], False)) is None
    # both flagged: from the run that sees the spine down to S1 where this one names none S1
    taken, rule = module.taken_levels(run(["L2", "L3", "L4"], True), run(["L3", "L4", "L5", "S1"], True))
    assert [v["level"] for v in taken["vertebrae"]] == ["L3", "L4", "L5"] and rule == "series_down_to_s1"


def test_the_levels_line_names_the_series_that_agree():
    """The panel's and batch script's line on the levels: the exam's series that name the vertebrae alike;
    those that do not are review reasons of their own."""
    from SpineNetLib.outputs.documents import labelling_status

    alike = ["'T1' (series 3)", "'STIR' (series 5)", "'T2 AX' (series 7)"]
    document = {"labelling": {"confidence": 0.999, "needs_review": False, "warnings": [],
                              "compared_with_series": alike, "disagreeing_series": [], "agreeing_series": alike}}
    assert labelling_status(document) == ("Level labelling confidence 0.99. The exam's series 'T1' (series 3), "
                                          "'STIR' (series 5) and 'T2 AX' (series 7) name the vertebrae alike.", False)
    document["labelling"].update(needs_review=True, disagreeing_series=alike[1:], agreeing_series=alike[:1],
                                 warnings=["levels may be shifted: the series 'STIR' (series 5) ..."])
    assert labelling_status(document)[0] == ("Levels may be shifted: the series 'STIR' (series 5) .... The exam's "
                                             "series 'T1' (series 3) names the vertebrae alike.")
    del document["labelling"]["agreeing_series"]   # a document of the forty-eighth session
    assert "alike" not in labelling_status(document)[0]


def test_a_series_that_shows_none_of_the_vertebrae_where_they_are_is_neither_alike_nor_different(exam):
    """The other series moved 25 mm up against the scan (beyond the 10 mm of the same body, short of a
    level): no vertebra is shared, so the levels are not said to agree; a note says why, no review."""
    import dataclasses

    import numpy as np

    from SpineNetLib.label.confidence import confidence_of_vertebrae
    from SpineNetLib.label.other_series import review_against_other_series

    phantom, _ = exam
    scan = phantom.scan
    vertebrae = pipeline.detect_and_label(scan, oracle_networks(phantom)).vertebrae
    moved = np.array(scan.canonical_to_ras, float)
    moved[2, 3] += 25.0
    elsewhere = dataclasses.replace(scan, canonical_to_ras=moved, metadata={"series_description": "T1 SAG",
                                                                           "series_number": "3"})
    confidence = confidence_of_vertebrae(vertebrae)
    entries = review_against_other_series(scan, vertebrae, [scan, elsewhere], lambda other: (vertebrae, False),
                                          confidence)
    assert entries["agreeing_series"] == [entries["compared_with_series"][0]] and entries["disagreeing_series"] == []
    assert confidence.needs_review is False
    assert confidence.warnings[-1].startswith("the series 'T1 SAG' (series 3) of the same exam shows fewer than 2 "
                                              "of these vertebrae within 10 mm")


def test_each_stack_of_a_dixon_series_of_the_exam_is_compared_and_named_by_its_label(exam, tmp_path):
    """A Dixon series of the exam (water and fat images under one UID) is two series to compare with, each
    named by its stack's label."""
    phantom, folder = exam
    uid = "1.2.826.0.1.3680043.8.498.78"
    for prefix, image_type in (("W", "W"), ("F", "F")):
        phantom.write_dicom(folder / "dixon", series_description="T2 mDixon", file_prefix=prefix, series_uid=uid,
                            extra_tags={**EXAM, **TIMES["T2"], "SeriesNumber": 6,
                                        "ImageType": ["ORIGINAL", "PRIMARY", image_type, "DERIVED"]})
    out = tmp_path / "out"
    assert cli.main(["run", str(folder), "-o", str(out), "--series", "4", "--quiet", "--no-grade",
                     "--no-preview"]) == 0
    assert _labelling(out)["compared_with_series"] == ["'T1 SAG' (series 3)", "'T2 mDixon' (series 6) [F]",
                                                       "'T2 mDixon' (series 6) [W]"]


def test_one_file_given_beside_a_broken_sub_folder_runs_without_the_comparison(exam, tmp_path):
    """One file of the T2 given, in a folder that holds the T1 too: its other series are read from the folder
    and its sub-folders, where a cut DICOM file stops them; the run goes on and says why."""
    import shutil

    phantom, folder = exam
    flat = tmp_path / "flat"
    flat.mkdir()
    for series in ("t2", "t1"):
        for path in (folder / series).iterdir():
            shutil.copy(path, flat / f"{series}_{path.name}")
    (flat / "extra").mkdir()
    cut = sorted(flat.glob("t1_*"))[0]
    (flat / "extra" / "cut.dcm").write_bytes(cut.read_bytes()[:200])   # no dataset left: refused
    out = tmp_path / "out"
    first = sorted(flat.glob("t2_*"))[0]
    assert cli.main(["run", str(first), "-o", str(out), "--quiet", "--no-grade", "--no-preview"]) == 0
    warnings = json.loads((out / "vertebrae.json").read_text())["warnings"]
    assert any(w.startswith("the exam's other series were not compared with the one read: DICOM file")
               and "truncated or corrupt" in w for w in warnings), warnings
    assert "compared_with_series" not in _labelling(out)


@pytest.fixture()
def nifti_exam(tmp_path, monkeypatch):
    """A NIfTI study as a converter writes one session: the T2 and the T1 as two files in the same patient
    coordinates (one phantom), with oracle networks."""
    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=5)
    t2 = phantom.write_nifti(tmp_path / "sub-01_T2w.nii.gz")
    t1 = phantom.write_nifti(tmp_path / "sub-01_T1w.nii.gz")
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    return phantom, t2, t1


def test_a_series_named_with_compare_with_is_compared_in_any_format(nifti_exam, tmp_path, monkeypatch, capsys):
    """Image files carry no exam: the user names the other series, and it is compared as the DICOM series of an
    exam are, named by its path as given; named a level off, it asks for a review."""
    phantom, t2, t1 = nifti_exam
    out = tmp_path / "alike"
    assert cli.main(["run", str(t2), "--compare-with", str(t1), "-o", str(out), "--quiet", "--no-grade",
                     "--no-preview"]) == 0
    assert _labelling(out)["compared_with_series"] == _labelling(out)["agreeing_series"] == [repr(str(t1))]
    assert _labelling(out)["needs_review"] is False
    assert f"the exam's series {str(t1)!r} names the vertebrae alike" in capsys.readouterr().out
    assert "compared_with_series" not in _labelling(_run_alone(t2, tmp_path / "alone"))

    name_series_a_level_lower(monkeypatch, t1.name)
    out = tmp_path / "off"
    assert cli.main(["run", str(t2), "--compare-with", str(t1), "-o", str(out), "--quiet", "--no-grade",
                     "--no-preview"]) == 0
    labelling = _labelling(out)
    assert labelling["needs_review"] is True and labelling["disagreeing_series"] == [repr(str(t1))]
    assert labelling["warnings"][0].startswith(f"levels may be shifted: the series {str(t1)!r} of the same exam "
                                               f"names the vertebra {phantom.levels[0]} here ")
    assert [v["level"] for v in json.loads((out / "vertebrae.json").read_text())["vertebrae"]] == phantom.levels


def test_the_batch_script_compares_a_series_named_with_compare_with_as_spinenet_run(nifti_exam, tmp_path, monkeypatch,
                                                                                   capsys):
    phantom, t2, t1 = nifti_exam
    batch = batch_script()
    out = tmp_path / "batch"
    arguments = ["--input", str(t2), "--output", str(out), "--quiet", "--no-grading", "--no-scene", "--no-preview",
                 "--compare-with", str(t1)]
    assert batch.main(arguments) == 0
    assert _labelling(out)["agreeing_series"] == [repr(str(t1))] and _labelling(out)["needs_review"] is False
    name_series_a_level_lower(monkeypatch, t1.name)
    capsys.readouterr()
    assert batch.main(arguments) == 0
    assert _labelling(out)["disagreeing_series"] == [repr(str(t1))] and _labelling(out)["needs_review"] is True
    assert f"CHECK THE LEVELS: Levels may be shifted: the series {str(t1)!r}" in capsys.readouterr().out
    assert batch.main(arguments + ["--no-compare-series"]) == 2
    assert "--compare-with and --no-compare-series contradict" in capsys.readouterr().err


def _run_alone(image, out):
    assert cli.main(["run", str(image), "-o", str(out), "--quiet", "--no-grade", "--no-preview"]) == 0
    return out


@pytest.mark.parametrize("extra, says", [
    (["--compare-with", "{missing}"], "--compare-with {missing}: "),
    (["--compare-with", "{t2}"], "that is the scan read itself"),
    (["--compare-with", "{t1}", "--no-compare-series"], "--compare-with and --no-compare-series contradict"),
    (["--compare-with", "{t1}"] * 4, "--compare-with names 4 series; at most 3 are compared"),
])
def test_a_series_named_with_compare_with_that_cannot_be_compared_is_refused_at_once(
        nifti_exam, tmp_path, capsys, extra, says):
    """The user asked for it: one line and exit status 2 before any inference, no results folder."""
    _, t2, t1 = nifti_exam
    names = {"missing": str(tmp_path / "sub-01_STIR.nii.gz"), "t2": str(t2), "t1": str(t1)}
    out = tmp_path / "out"
    assert cli.main(["run", str(t2), "-o", str(out), "--quiet", *[x.format(**names) for x in extra]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says.format(**names) in err
    assert not (out / "vertebrae.json").exists()


def test_a_dicom_series_named_with_compare_with_is_compared_once_and_in_its_frame_of_reference_only(exam, tmp_path,
                                                                                                    capsys):
    phantom, folder = exam
    out = tmp_path / "named"
    # the exam folder finds the T1 itself: named as well, it is compared once
    assert cli.main(["run", str(folder), "--compare-with", str(folder / "t1"), "-o", str(out), "--quiet",
                     "--no-grade", "--no-preview"]) == 0
    assert _labelling(out)["compared_with_series"] == ["'T1 SAG' (series 3)"]
    assert cli.main(["run", str(folder / "t2"), "--compare-with", str(folder / "other"), "-o",
                     str(tmp_path / "other"), "--quiet", "--no-grade", "--no-preview"]) == 2
    assert "its frame of reference is not the scan's" in capsys.readouterr().err
    assert cli.main(["run", str(folder / "t2"), "--compare-with", str(folder / "t2"), "-o",
                     str(tmp_path / "self"), "--quiet", "--no-grade", "--no-preview"]) == 2
    assert "that is the scan read itself" in capsys.readouterr().err


def test_a_real_exams_t1_and_tirm_as_nifti_files_name_the_vertebrae_alike(tmp_path, capsys):
    """The one real exam with two sagittal series in ../shared/data: zukic patient AKa's T1 and TIRM (held out,
    never trained on), two NIfTI files in the same patient coordinates. With the bundled networks each is named
    right on its own (model card), and the T1 checked against the TIRM finds the same vertebrae (centres within
    a few mm) named alike."""
    from SpineNetLib.training.datasets import default_data_root

    zukic = default_data_root() / "zukic"
    t1, tirm = (zukic / name / "image.nii.gz" for name in ("zukic_02_AKa3_T1", "zukic_03_AKa4_TIRM"))
    if not (t1.is_file() and tirm.is_file()):
        pytest.skip("../shared/data (real MRI) is not present")
    out = tmp_path / "out"
    assert cli.main(["run", str(t1), "--compare-with", str(tirm), "-o", str(out), "--quiet", "--no-grade",
                     "--no-preview", "--threads", "2"]) == 0
    labelling = _labelling(out)
    assert labelling["agreeing_series"] == [repr(str(tirm))] and labelling["disagreeing_series"] == []
    assert labelling["needs_review"] is False
    mine = json.loads((out / "vertebrae.json").read_text())["vertebrae"]
    (theirs,) = labelling["other_series_levels"]
    assert [v["level"] for v in mine] == [v["level"] for v in theirs["vertebrae"]] == list(LEVELS_TOP_DOWN[
        LEVELS_TOP_DOWN.index("T10"):LEVELS_TOP_DOWN.index("S1") + 1])


def _axial_stack(path, phantom):
    """The phantom's voxels written as a 2D stack of thick axial slices (a BIDS session's axial T2w)."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(phantom.voxels_kji[:, :, :12], np.float32).transpose(2, 1, 0).copy())
    image.SetSpacing((0.8, 0.8, 5.0))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))   # slices along S-I
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def test_spinenet_run_on_an_image_of_a_bids_session_compares_the_sessions_other_sagittal_images(tmp_path, monkeypatch,
                                                                                              capsys):
    """As an exam folder's series: the session's T1w is compared (named by its path), its axial stack is left
    out by its header, another subject's image is not of the session; --no-compare-series skips it, and the
    T1w named with --compare-with as well is compared once."""
    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=5)
    anat = tmp_path / "ds" / "sub-01" / "ses-1" / "anat"
    t2 = phantom.write_nifti(anat / "sub-01_ses-1_T2w.nii.gz")
    t1 = phantom.write_nifti(anat / "sub-01_ses-1_T1w.nii.gz")
    _axial_stack(anat / "sub-01_ses-1_acq-ax_T2w.nii.gz", phantom)
    phantom.write_nifti(anat / "sub-02_ses-1_T1w.nii.gz")            # misfiled: not this subject's
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    from SpineNetLib.inputs.image import other_sagittal_images_of_session

    assert other_sagittal_images_of_session(t2) == [t1]
    for extra in ([], ["--compare-with", str(t1)]):
        out = tmp_path / f"out{len(extra)}"
        assert cli.main(["run", str(t2), "-o", str(out), "--quiet", "--no-grade", "--no-preview", *extra]) == 0
        labelling = _labelling(out)
        assert labelling["compared_with_series"] == labelling["agreeing_series"] == [repr(str(t1))], extra
        assert not any("session" in w for w in labelling["warnings"])
    assert cli.main(["run", str(t2), "-o", str(tmp_path / "alone"), "--quiet", "--no-grade", "--no-preview",
                     "--no-compare-series"]) == 0
    assert "compared_with_series" not in _labelling(tmp_path / "alone")
    name_series_a_level_lower(monkeypatch, t1.name)
    assert cli.main(["run", str(t2), "-o", str(tmp_path / "off"), "--quiet", "--no-grade", "--no-preview"]) == 0
    assert _labelling(tmp_path / "off")["disagreeing_series"] == [repr(str(t1))]
    capsys.readouterr()
