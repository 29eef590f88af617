"""A level corrected after review (outputs/documents.apply_level_correction, `spinenet correct`): the
documents become what a run naming those levels writes, and a results folder is written again as a
whole, pictures and DICOM results included, or not at all."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from SpineNetLib import pipeline
from SpineNetLib.apps import cli
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.core.results import Vertebra
from SpineNetLib.discs.extraction import extract_ivd_volumes
from SpineNetLib.discs.hotspot_options import HotspotMap
from SpineNetLib.discs.measurements import disc_height_warnings, measure_spine
from SpineNetLib.outputs import documents
from SpineNetLib.outputs.discs import discs_document
from SpineNetLib.outputs.files import write_results
from SpineNetLib.synthetic.phantom import make_phantom

from oracles import oracle_networks


def _one_lower(level: str) -> str:
    order = [*LEVELS_TOP_DOWN, "S2"]   # S2: a corrected name, not a level the networks give
    return order[order.index(level) + 1]


def _discs_doc(scan, vertebrae) -> dict:
    ivds = extract_ivd_volumes(scan, vertebrae)
    return discs_document(scan, vertebrae, ivds, None, measure_spine(scan, vertebrae), {"status": "not run"})


def test_a_corrected_discs_document_is_what_a_run_naming_those_levels_writes():
    """The network named every body one level too low (T12 as L1, ..., S1 as S2); the reader corrects the
    top one. Every level-bound part of discs.json then equals the document of the same bodies named
    right: disc names, the vertebrae's measurements, and the lordosis between the real L1 and S1 (which
    the wrong names put on other bodies)."""
    phantom = make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.2, 1.2), n_slices=7, seed=1)
    right = [Vertebra(slices=list(v.slices), polygons=[v.quads[s] for s in v.slices], level=v.level)
             for v in phantom.vertebrae if not v.extra]
    wrong = [dataclasses.replace(v, level=_one_lower(v.level)) for v in right]
    scan = phantom.scan
    truth = _discs_doc(scan, right)
    named_wrong = _discs_doc(scan, wrong)
    vertebrae_doc = documents.vertebrae_document_from_truth(scan, [dataclasses.replace(t, level=_one_lower(t.level))
                                                                  for t in phantom.vertebrae if not t.extra])
    assert named_wrong["spine_measurements"]["lumbar_lordosis_deg"] != pytest.approx(
        truth["spine_measurements"]["lumbar_lordosis_deg"], abs=1.0)

    corrected_vertebrae, corrected = documents.apply_level_correction(vertebrae_doc, 0, right[0].level, named_wrong)
    assert [v["level"] for v in corrected_vertebrae["vertebrae"]] == [v.level for v in right]
    assert [d["level"] for d in corrected["discs"]] == [d["level"] for d in truth["discs"]]
    assert [d["measurements"] for d in corrected["discs"]] == [d["measurements"] for d in truth["discs"]]
    assert corrected["vertebrae_measurements"] == truth["vertebrae_measurements"]
    # the lordosis of the corrected document comes from the angles as written (3 decimals)
    assert corrected["spine_measurements"]["lumbar_lordosis_deg"] == pytest.approx(
        truth["spine_measurements"]["lumbar_lordosis_deg"], abs=0.011)
    assert corrected["spine_measurements"]["pixel_spacing_mm"] == [1.2, 1.2]
    # and correcting it back gives the document as it was, to the byte
    _, back = documents.apply_level_correction(corrected_vertebrae, 0, _one_lower(right[0].level), corrected)
    assert back == named_wrong


def test_the_line_for_a_rougher_outline_stays_with_its_body_when_a_level_is_corrected():
    """A body outlined from a weaker detection (``Vertebra.outline_from``) puts a line on both its discs, naming
    it; after the reader corrects the levels the lines name the body's and discs' new levels, as a run naming
    those levels writes them, and the body keeps its ``outline_from``."""
    phantom = make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.2, 1.2), n_slices=7, seed=1)
    right = [Vertebra(slices=list(v.slices), polygons=[v.quads[s] for s in v.slices], level=v.level)
             for v in phantom.vertebrae if not v.extra]
    right[2] = dataclasses.replace(right[2], outline_from="weaker detection")
    wrong = [dataclasses.replace(v, level=_one_lower(v.level)) for v in right]
    scan = phantom.scan
    truth, named_wrong = _discs_doc(scan, right), _discs_doc(scan, wrong)

    def rougher(doc):
        return {d["level"]: w for d in doc["discs"] for w in d["measurement_warnings"] if "weaker detection" in w}

    body = right[2].level
    assert rougher(truth) == {
        f"{right[1].level}-{body}": f"{right[1].level}-{body}: {body}'s outline comes from a weaker detection and may "
                                    "be rough; check it before using these measurements",
        f"{body}-{right[3].level}": f"{body}-{right[3].level}: {body}'s outline comes from a weaker detection and may "
                                    "be rough; check it before using these measurements"}
    assert rougher(named_wrong) != rougher(truth)
    vertebrae_doc = documents.vertebrae_document_from_truth(scan, [dataclasses.replace(t, level=_one_lower(t.level))
                                                                  for t in phantom.vertebrae if not t.extra])
    _, corrected = documents.apply_level_correction(vertebrae_doc, 0, right[0].level, named_wrong)
    assert [d["measurement_warnings"] for d in corrected["discs"]] == \
        [d["measurement_warnings"] for d in truth["discs"]]
    assert [r["outline_from"] for r in corrected["vertebrae_measurements"]] == [v.outline_from for v in right]


def test_the_thin_disc_line_follows_the_disc_above_s1_and_the_warnings_are_renamed():
    """The line "check S1's upper endplate" belongs to the disc above S1: when the levels move, it moves,
    in the disc's measurement_warnings and in the document's warnings; a missing disc's line is renamed."""
    levels = ["L2", "L3", "L5", "S1", "S2"]   # L4 missed: no disc between L3 and L5
    vertebrae_doc = {"schema": "spinenet.vertebrae/1", "vertebrae": [{"level": name, "polygons": []} for name in levels],
                     "labelling": {"confidence": 0.9, "needs_review": True, "warnings": ["levels may be shifted"]}}
    heights = {"L2-L3": (9.0, 9.0, 7.0), "L5-S1": (8.0, 7.0, 6.0), "S1-S2": (2.0, 4.0, 5.0)}
    discs = []
    for name, (a, m, p) in heights.items():
        upper = levels.index(name.split("-")[0])
        discs.append({"level": name, "upper_vertebra": upper, "lower_vertebra": upper + 1, "grades": {},
                      "measurements": {"disc_height_anterior_mm": a, "disc_height_middle_mm": m,
                                       "disc_height_posterior_mm": p, "disc_height_mean_mm": (a + m + p) / 3},
                      "measurement_warnings": disc_height_warnings(name, a, m, p, (a + m + p) / 3)})
    skipped = ("no disc between L3 and L5: the vertebra between them was not found, and a volume across a whole "
               "vertebra would not be a disc")
    discs_doc = {"schema": "spinenet.discs/1", "discs": discs, "grading": {"status": "not run"},
                 "vertebrae_measurements": [{"level": name, "index": k, "middle_height_mm": 25.0}
                                            for k, name in enumerate(levels)],
                 "spine_measurements": {"lumbar_lordosis_deg": None, "pixel_spacing_mm": [1.0, 1.0]},
                 "warnings": [skipped, "the grader reads T2-weighted scans"]}
    assert discs_doc["discs"][2]["measurement_warnings"] == []   # S1-S2: not the disc above S1
    _, corrected = documents.apply_level_correction(vertebrae_doc, 4, "S1", discs_doc)
    assert [d["level"] for d in corrected["discs"]] == ["L1-L2", "L4-L5", "L5-S1"]
    thin = corrected["discs"][2]["measurement_warnings"]
    assert len(thin) == 1 and thin[0].startswith("L5-S1 anterior disc height 2.0 mm is under 3 mm")
    assert corrected["warnings"] == [skipped.replace("L3 and L5", "L2 and L4"), "the grader reads T2-weighted scans",
                                     thin[0]]
    assert [r["level"] for r in corrected["vertebrae_measurements"]] == ["L1", "L2", "L4", "L5", "S1"]
    # back again: the line leaves with S1, and the document is the one it was
    _, back = documents.apply_level_correction(vertebrae_doc | {"vertebrae": [{"level": n} for n in
                                                                               ["L1", "L2", "L4", "L5", "S1"]]},
                                               4, "S2", corrected)
    assert back == discs_doc


# --------------------------------------------------------------------------- spinenet correct


@pytest.fixture()
def results(tmp_path, monkeypatch):
    """A DICOM phantom's results folder with every file that names a level: JSON, CSV, both pictures
    (a hotspot map on the input grid) and the DICOM results; the networks are oracles (exact levels)."""
    phantom = make_phantom(fov="lumbar", shape=(192, 192), pixel_spacing=(1.4, 1.4), n_slices=5, seed=2)
    dicom = tmp_path / "dicom"
    phantom.write_dicom(dicom)
    scan = pipeline.read_input(dicom, pipeline.processing_profile(None))[0]
    result = pipeline.run(scan, oracle_networks(phantom), pipeline.RunOptions(grade=False))
    values = np.random.default_rng(0).random(scan.input_shape_ijk[::-1]).astype(np.float32)
    result.hotspots = [HotspotMap("hotspots_Herniation.nii.gz", values, np.asarray(scan.input_ijk_to_ras))]
    out = tmp_path / "out"
    write_results(out, result, scan=scan, dicom=True)
    return phantom, dicom, out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _segment_labels(path: Path) -> list[str]:
    return [s.SegmentLabel for s in pydicom.dcmread(path).SegmentSequence]


def test_spinenet_correct_writes_every_file_again_with_the_scan(results, capsys):
    phantom, dicom, out = results
    before = _files(out)
    assert {"preview.png", "hotspots.png", "segmentation.dcm", "report.dcm", "hotspots_Herniation.nii.gz"} <= set(before)
    levels = [v["level"] for v in json.loads(before["vertebrae.json"])["vertebrae"]]
    assert levels == phantom.levels
    wrong = [_one_lower(level) for level in levels]

    # the pictures and DICOM results show the levels: without the scan nothing changes
    assert cli.main(["correct", str(out), levels[0], wrong[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "preview.png, hotspots.png, segmentation.dcm, report.dcm" in err[0] and "--input" in err[0]
    assert _files(out) == before

    assert cli.main(["correct", str(out), levels[0], wrong[0], "--input", str(dicom)]) == 0
    assert f"corrected: {len(levels)} vertebrae, {levels[0]}..{levels[-1]} -> {wrong[0]}..{wrong[-1]}; wrote" in \
        capsys.readouterr().out
    after = _files(out)
    vertebrae_doc = json.loads(after["vertebrae.json"])
    assert [v["level"] for v in vertebrae_doc["vertebrae"]] == wrong
    assert vertebrae_doc["labelling"]["corrected_by_user"] is True
    assert vertebrae_doc["corrections"] == [{"vertebra": 0, "level": wrong[0]}]
    assert [line.split(",")[0] for line in after["vertebrae.csv"].decode().splitlines()[1:]] == wrong
    assert after["discs.csv"].decode().splitlines()[1].startswith(f"{wrong[0]}-{wrong[1]},")
    assert {name for name in before if before[name] != after[name]} == {
        "vertebrae.json", "vertebrae.csv", "discs.json", "discs.csv", "preview.png", "hotspots.png",
        "segmentation.dcm", "report.dcm"}   # the hotspot map holds no level; result.json lists the same files
    assert after["result.json"] == before["result.json"]
    assert [label for label in _segment_labels(out / "segmentation.dcm") if "-" not in label] == wrong

    # "#N" names the N-th vertebra from the top; the chain moves back to the network's levels
    assert cli.main(["correct", str(out / "result.json"), "#1", levels[0], "--input", str(dicom)]) == 0
    again = _files(out)
    assert [v["level"] for v in json.loads(again["vertebrae.json"])["vertebrae"]] == levels
    assert again["discs.json"] == before["discs.json"]   # the same bodies, named as the run named them
    # the levels are the reader's now: no review asked for, the run's warnings gone
    rows = [line.split(",") for line in again["vertebrae.csv"].decode().splitlines()]
    assert {row[rows[0].index("levels_need_review")] for row in rows[1:]} == {"false"}


def test_spinenet_correct_refuses_what_it_cannot_do_and_changes_nothing(results, tmp_path, capsys):
    phantom, dicom, out = results
    before = _files(out)
    other = tmp_path / "other"
    make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=3).write_dicom(other)
    top = phantom.levels[0]
    cases = [(["correct", str(out), top, "L9", "--input", str(dicom)], "unknown level 'L9'"),
             (["correct", str(out), "C3", "L1", "--input", str(dicom)], "no vertebra is named C3"),
             (["correct", str(out), "#99", "L1", "--input", str(dicom)], "there is no vertebra #99"),
             (["correct", str(out), top, "L1", "--input", str(other)], "not the one these results were made from"),
             (["correct", str(out), top, "L1", "--series", "2"], "--series names the series of --input"),
             (["correct", str(tmp_path / "nowhere"), top, "L1"], "not found")]
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("spinenet: error: ") and words in err[0], (argv, err)
        assert _files(out) == before, argv


def test_a_folder_without_pictures_is_corrected_without_the_scan(tmp_path, monkeypatch, capsys):
    phantom = make_phantom(fov="lumbar", shape=(192, 192), pixel_spacing=(1.4, 1.4), n_slices=5, seed=4)
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    out = tmp_path / "out"
    assert cli.main(["run", str(image), "-o", str(out), "--quiet", "--no-preview", "--no-grade"]) == 0
    capsys.readouterr()
    assert cli.main(["correct", str(out), phantom.levels[-1], _one_lower(phantom.levels[-1])]) == 0
    assert [v["level"] for v in json.loads((out / "vertebrae.json").read_text())["vertebrae"]] == [
        _one_lower(level) for level in phantom.levels]
    assert capsys.readouterr().err == ""
    # the lowest body (S2 now) named L5 moves the chain two levels up; the top body then named two levels
    # below its right level moves it three down: the lowest would lie below S2, is left without a level,
    # and that is said
    assert cli.main(["correct", str(out), "S2", "L5"]) == 0
    assert cli.main(["correct", str(out), "#1", _one_lower(_one_lower(phantom.levels[0]))]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["spinenet: warning: the correction moved 1 vertebra beyond S2: it has no level now"], err
    assert json.loads((out / "vertebrae.json").read_text())["vertebrae"][-1]["level"] is None


def test_an_exam_folder_is_read_again_at_the_series_the_run_read(tmp_path, monkeypatch, capsys):
    """A run told `--series` of an exam folder whose default is another series (its T2): the correction,
    given the folder alone, draws the pictures from the series the run read, not the folder's default."""
    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=5)
    exam = tmp_path / "exam"
    phantom.write_dicom(exam / "t1", series_description="T1 SAG", extra_tags={"SeriesNumber": 3})
    make_phantom(fov="lumbar", shape=(150, 150), pixel_spacing=(1.6, 1.6), n_slices=5, seed=6).write_dicom(
        exam / "t2", series_description="T2 SAG", extra_tags={"SeriesNumber": 4})
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    out = tmp_path / "out"
    assert cli.main(["run", str(exam), "-o", str(out), "--quiet", "--no-grade", "--series", "3"]) == 0
    capsys.readouterr()
    top = phantom.levels[0]
    assert cli.main(["correct", str(out), top, _one_lower(top), "--input", str(exam)]) == 0, capsys.readouterr().err
    assert [v["level"] for v in json.loads((out / "vertebrae.json").read_text())["vertebrae"]][0] == _one_lower(top)


def test_naming_a_vertebra_its_own_level_records_the_review_and_moves_nothing(tmp_path, monkeypatch, capsys):
    """README: levels found right on review are confirmed by naming a vertebra its own level: nothing
    moves, the review flag goes and the reader's decision is recorded."""
    phantom = make_phantom(fov="lumbar", shape=(192, 192), pixel_spacing=(1.4, 1.4), n_slices=5, seed=4)
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    out = tmp_path / "out"
    assert cli.main(["run", str(image), "-o", str(out), "--quiet", "--no-preview", "--no-grade"]) == 0
    doc = json.loads((out / "vertebrae.json").read_text())
    doc["labelling"].update(needs_review=True, warnings=["levels may be shifted by one (a reason)"])
    (out / "vertebrae.json").write_text(json.dumps(doc))      # as a run that asked for a review left it
    capsys.readouterr()
    assert cli.main(["correct", str(out), "#2", phantom.levels[1]]) == 0
    confirmed = json.loads((out / "vertebrae.json").read_text())
    assert [v["level"] for v in confirmed["vertebrae"]] == list(phantom.levels)
    assert confirmed["labelling"]["needs_review"] is False and confirmed["labelling"]["corrected_by_user"] is True
    assert confirmed["corrections"] == [{"vertebra": 1, "level": phantom.levels[1]}]
    rows = list(csv.DictReader((out / "vertebrae.csv").read_text().splitlines()))
    assert [r["level"] for r in rows] == list(phantom.levels)
    assert {(r["levels_need_review"], r["labelling_warning"]) for r in rows} == {("false", "")}


def test_a_cohort_study_corrected_reaches_the_cohort_tables(tmp_path, capsys):
    """README: correct a study's folder, and the cohort tables (made from the study folders whenever
    `spinenet cohort` runs) carry the corrected levels and no review flag."""
    from SpineNetLib.cohort.discover import discover_studies
    from SpineNetLib.cohort.run import CohortSettings, process_study
    from SpineNetLib.cohort.tables import COHORT_STUDIES_FILE, COHORT_VERTEBRAE_FILE, cohort_table_texts

    root = tmp_path / "root"
    make_phantom(fov="lumbar", shape=(128, 128), pixel_spacing=(2.3, 2.3), n_slices=7, seed=5).write_nifti(
        root / "p1.nii.gz")
    study = discover_studies(root).studies[0]
    studies_dir = tmp_path / "studies"
    assert process_study(study, str(studies_dir), CohortSettings(preview=False, threads=1, grade=False)).status == "done"
    folder = studies_dir / study.study_id
    doc = json.loads((folder / "vertebrae.json").read_text())
    levels = [v["level"] for v in doc["vertebrae"]]
    expected = documents.corrected_levels(doc, 0, _one_lower(levels[0]))
    assert expected[:2] == [_one_lower(level) for level in levels[:2]]
    assert cli.main(["correct", str(folder), "#1", _one_lower(levels[0])]) == 0
    capsys.readouterr()
    table = cohort_table_texts(studies_dir, [study], [])[COHORT_VERTEBRAE_FILE].splitlines()
    header = table[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in table[1:]]
    assert [r["level"] or None for r in rows] == expected
    assert {r["levels_need_review"] for r in rows} == {"false"}
    summary = cohort_table_texts(studies_dir, [study], [])[COHORT_STUDIES_FILE].splitlines()
    row = dict(zip(summary[0].split(","), summary[1].split(",")))
    assert row["corrected_by_user"] == "true" and row["levels_need_review"] == "false"
    assert row["levels"] == f"{expected[0]}..{expected[-1] or 'V' + str(len(expected))}"


def test_maps_of_single_discs_move_to_their_discs_new_names(tmp_path, capsys):
    """A plug-in pipeline's map of one disc (``hotspots/<disc>_<head>.nii.gz``) stays with its disc: after the
    correction it is filed under the disc's new name, in the same step as the documents, and result.json
    lists it there."""
    phantom = make_phantom(fov="lumbar", shape=(192, 192), pixel_spacing=(1.4, 1.4), n_slices=5, seed=2)
    dicom = tmp_path / "dicom"
    phantom.write_dicom(dicom)
    scan = pipeline.read_input(dicom, pipeline.processing_profile(None))[0]
    result = pipeline.run(scan, oracle_networks(phantom), pipeline.RunOptions(grade=False))
    discs = [d["level"] for d in result.discs_document["discs"]]
    rng = np.random.default_rng(1)
    grid = scan.input_shape_ijk[::-1]
    result.hotspots = [HotspotMap(f"hotspots/{disc}_Herniation.nii.gz", rng.random(grid).astype(np.float32),
                                  np.asarray(scan.input_ijk_to_ras)) for disc in discs]
    out = tmp_path / "out"
    write_results(out, result, scan=scan)
    before = {disc: (out / "hotspots" / f"{disc}_Herniation.nii.gz").read_bytes() for disc in discs}
    top = phantom.levels[0]

    assert cli.main(["correct", str(out), top, _one_lower(top), "--input", str(dicom)]) == 0
    capsys.readouterr()
    renamed = [d["level"] for d in json.loads((out / "discs.json").read_text())["discs"]]
    assert renamed != discs and len(renamed) == len(discs)
    assert sorted(p.name for p in (out / "hotspots").iterdir()) == sorted(f"{d}_Herniation.nii.gz" for d in renamed)
    for old, new in zip(discs, renamed):
        assert (out / "hotspots" / f"{new}_Herniation.nii.gz").read_bytes() == before[old], (old, new)
    assert json.loads((out / "result.json").read_text())["hotspots"] == sorted(
        f"hotspots/{d}_Herniation.nii.gz" for d in renamed)
    assert not [p for p in out.rglob(".*") if p.is_file()]        # no temporary or moved-aside file left

    # and back: every map under the name it was written with
    assert cli.main(["correct", str(out), "#1", top, "--input", str(dicom)]) == 0
    for disc in discs:
        assert (out / "hotspots" / f"{disc}_Herniation.nii.gz").read_bytes() == before[disc], disc
