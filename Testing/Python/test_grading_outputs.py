"""Disc grading (SpineNetLib.discs.grading), discs.json / discs.csv (SpineNetLib.outputs.discs) and `spinenet run`."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from SpineNetLib.apps import cli
from SpineNetLib import pipeline
from SpineNetLib.outputs import documents
from SpineNetLib.outputs.discs import DISC_MEASUREMENTS, discs_csv_header, discs_csv_text, discs_document
from SpineNetLib.discs.grading import GRADE_COLUMNS, OFFICIAL_NAMES, grade_volumes
from SpineNetLib.discs.extraction import extract_ivd_volumes
from SpineNetLib.discs.measurements import measure_spine
from SpineNetLib.models.grading import HEADS, GradingConfig, GradingNet
from SpineNetLib.synthetic.phantom import make_phantom
from SpineNetLib.core.results import Vertebra

from oracles import oracle_networks

LEARNED = ["Pfirrmann", "DiscNarrowing", "CentralCanalStenosis", "Spondylolisthesis", "UpperEndplateDefect",
           "LowerEndplateDefect", "UpperMarrowChange", "LowerMarrowChange", "ForaminalStenosisLeft",
           "ForaminalStenosisRight", "Herniation"]


def small_grader() -> GradingNet:
    torch.manual_seed(0)
    net = GradingNet(GradingConfig(blocks=(1, 1, 1, 1), base_width=4))
    with torch.no_grad():  # spread the heads so that argmax differs between heads and discs
        for head in HEADS:
            getattr(net, head.name).weight.mul_(50.0)
    return net.eval()


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.2, 1.2), n_slices=7, seed=1,
                           pathology={"L4": ["slip"]})
    vertebrae = [Vertebra(slices=list(v.slices), polygons=[v.quads[s] for s in v.slices], level=v.level)
                 for v in phantom.vertebrae if not v.extra]
    ivds = extract_ivd_volumes(phantom.scan, vertebrae)
    return phantom, vertebrae, ivds, measure_spine(phantom.scan, vertebrae)


def test_columns_follow_the_network_heads_with_readable_names():
    assert list(GRADE_COLUMNS) == LEARNED
    assert [c.head for c in GRADE_COLUMNS.values()] == [h.name for h in HEADS]
    assert [OFFICIAL_NAMES[c] for c in GRADE_COLUMNS] == [h.column for h in HEADS]
    assert GRADE_COLUMNS["Pfirrmann"].values == (1, 2, 3, 4, 5)
    assert GRADE_COLUMNS["DiscNarrowing"].values == GRADE_COLUMNS["CentralCanalStenosis"].values == (1, 2, 3, 4)
    assert GRADE_COLUMNS["Spondylolisthesis"].values == (0, 1, 2)
    assert all(GRADE_COLUMNS[c].values == (0, 1) for c in LEARNED[4:])
    assert all(len(c.classes) == c.n_classes for c in GRADE_COLUMNS.values())


@pytest.fixture(scope="module")
def grades(case):
    return grade_volumes(case[2], small_grader(), "cpu", batch_size=4)


def test_grades_are_the_networks_argmax_with_probabilities_and_no_preprocessing(case, grades):
    ivds = case[2]
    net = small_grader()
    assert len(grades) == len(ivds)
    with torch.no_grad():  # the volumes as they are: no mean subtraction, no TTA (official §7)
        direct = net(torch.from_numpy(np.stack([d.volume for d in ivds]))[:, None])
    seen_values = set()
    for k, g in enumerate(grades):
        assert list(g) == LEARNED
        for (name, (value, probs)), head_logits in zip(g.items(), direct):
            column = GRADE_COLUMNS[name]
            expected = torch.softmax(head_logits[k], 0).numpy()
            assert probs.shape == (column.n_classes,) and probs.sum() == pytest.approx(1.0)
            assert np.allclose(probs, expected, atol=1e-5)
            assert value == int(np.argmax(expected)) + column.offset and value in column.values
            seen_values.add((name, value))
    assert len(seen_values) > len(LEARNED)  # not all constant: the test can tell columns and discs apart
    # Batching does not change anything (eval-mode BatchNorm); plain arrays are accepted too.
    singles = grade_volumes([d.volume for d in ivds[:2]], net, batch_size=1)
    assert all(a[k][0] == b[k][0] and np.allclose(a[k][1], b[k][1], atol=1e-5)
               for a, b in zip(grades, singles) for k in LEARNED)


def test_discs_document_with_grades(case, grades):
    phantom, vertebrae, ivds, measurements = case
    doc = discs_document(phantom.scan, vertebrae, ivds, grades, measurements, {"status": "done", "weights": "test"})
    json.dumps(doc, allow_nan=False)
    assert doc["schema"] == "spinenet.discs/1" and doc["grading"]["status"] == "done"
    assert "right to left" in doc["grading"]["slice_direction"]
    assert [d["level"] for d in doc["discs"]] == [d.name for d in phantom.discs]
    for d, g, gt in zip(doc["discs"], grades, phantom.discs):
        assert list(d["grades"]) == LEARNED
        for name in LEARNED:
            assert d["grades"][name]["value"] == g[name][0]
            assert np.allclose(d["grades"][name]["probabilities"], g[name][1], atol=1e-4)
        truth_ras = phantom.scan.xy_to_ras(gt.centre_xy, gt.mid_slice)[0]
        assert np.allclose(d["centre_ras"], truth_ras, atol=0.01)
        assert d["slice"] == phantom.scan.input_slice_index(gt.mid_slice)
        assert np.asarray(d["volume_to_ras"]).shape == (4, 4)
        assert set(d["measurements"]) == {key for key, _, _ in DISC_MEASUREMENTS.values()}
        assert d["measurements"]["disc_height_anterior_mm"] == pytest.approx(gt.anterior_height_mm, abs=0.01)
    slipped = next(d for d in doc["discs"] if d["level"] == "L4-L5")["measurements"]
    assert slipped["slip_mm"] == pytest.approx(6.0, abs=0.01) and slipped["meyerding_grade"] == 1
    assert [v["level"] for v in doc["vertebrae_measurements"]] == phantom.levels
    assert doc["spine_measurements"]["lumbar_lordosis_deg"] == pytest.approx(measurements.lumbar_lordosis_deg, abs=0.01)

    rows = list(csv.reader(io.StringIO(discs_csv_text(doc))))
    with_probabilities = [h for name in LEARNED for h in (name, f"{name}_probability")]
    assert rows[0] == ["Level", *with_probabilities, "Disc height anterior (mm)", "Disc height middle (mm)",
                       "Disc height posterior (mm)", "Disc height mean (mm)", "Disc height index", "Farfan index",
                       "Slip (mm)", "Slip (%)", "Meyerding grade", "Segmental angle (deg)", "Disc angle (deg)",
                       "Disc signal ratio", "measurement_warning", "grading_weights", "sequence"] == discs_csv_header()
    assert [r[0] for r in rows[1:]] == [d.name for d in phantom.discs]
    for r, d in zip(rows[1:], doc["discs"]):
        assert r[1:23:2] == [str(d["grades"][name]["value"]) for name in LEARNED]
        assert float(r[23]) == pytest.approx(d["measurements"]["disc_height_anterior_mm"], abs=0.01)
        assert r[-2:] == ["test", ""]   # grading_weights; sequence: this document records no weighting
    by_level = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert by_level["L4-L5"]["Slip (mm)"] == "6.00" and by_level["L4-L5"]["Meyerding grade"] == "I"
    assert by_level["L3-L4"]["Meyerding grade"] == "none"
    assert not any(cell.startswith("-0.0") for r in rows for cell in r)  # no negative zeros


def test_without_a_grader_the_learned_columns_are_empty_and_the_json_says_why(case):
    phantom, vertebrae, _, _ = case
    networks = oracle_networks(phantom)
    result = pipeline.grade_discs(phantom.scan, vertebrae, networks)
    assert result.grades is None and result.grading_status["status"] == "not run"
    assert "grading weights" in result.grading_status["reason"]
    off = pipeline.grade_discs(phantom.scan, vertebrae, networks, grade=False)
    assert "--no-grade" in off.grading_status["reason"]
    doc = discs_document(phantom.scan, vertebrae, result.ivds, result.grades, result.measurements,
                         result.grading_status)
    assert doc["grading"]["reason"] == result.grading_status["reason"]
    assert all(d["grades"] == {} and d["measurements"] for d in doc["discs"])
    rows = list(csv.DictReader(io.StringIO(discs_csv_text(doc))))
    assert [r["Level"] for r in rows] == [d.name for d in phantom.discs]
    assert all(r[c] == "" and r[f"{c}_probability"] == "" for r in rows for c in LEARNED)
    assert all(r["Disc height mean (mm)"] != "" for r in rows)
    # the grading source is named graded or not: the weight set's ("bundled", "official" or the folder)
    assert result.grading_status["weights"] == off.grading_status["weights"] == "oracle"
    assert doc["grading"]["weights"] == "oracle" and all(r["grading_weights"] == "oracle" for r in rows)
    networks.grading = small_grader()
    graded = pipeline.grade_discs(phantom.scan, vertebrae, networks, batch_size=3)
    assert graded.grading_status["status"] == "done" and len(graded.grades) == len(graded.ivds) == 6
    assert graded.grading_status["weights"] == "oracle" and "heads_not_trained" not in graded.grading_status


def test_probability_columns_hold_the_probability_of_the_reported_class(case, grades):
    phantom, vertebrae, ivds, measurements = case
    status = {"status": "done", "weights": "/data/my weights"}
    doc = json.loads(json.dumps(discs_document(phantom.scan, vertebrae, ivds, grades, measurements, status)))
    rows = list(csv.DictReader(io.StringIO(discs_csv_text(doc))))
    assert doc["grading"]["weights"] == "/data/my weights"
    assert [r["grading_weights"] for r in rows] == ["/data/my weights"] * len(doc["discs"])
    seen = set()
    for row, disc in zip(rows, doc["discs"]):
        for name in LEARNED:
            entry = disc["grades"][name]
            expected = entry["probabilities"][entry["value"] - GRADE_COLUMNS[name].offset]  # from discs.json
            assert row[name] == str(entry["value"])
            assert row[f"{name}_probability"] == f"{expected:.3f}"
            assert float(row[f"{name}_probability"]) == pytest.approx(max(entry["probabilities"]), abs=6e-4)
            seen.add(row[f"{name}_probability"])
    assert len(seen) > 5   # not a constant: the test tells classes and discs apart
    # the Slicer table (and its CSV export) shows the same probability after each grade
    columns, table_rows = documents.disc_table(None, doc)
    names = [c.name for c in columns]
    assert names[:5] == ["level", "Pfirrmann", "Pfirrmann_probability", "DiscNarrowing",
                         "DiscNarrowing_probability"]
    for table_row, row in zip(table_rows, rows):
        cells = dict(zip(names, table_row))
        assert all(cells[f"{n}_probability"] == pytest.approx(float(row[f"{n}_probability"])) for n in LEARNED)


def test_a_grader_for_some_heads_leaves_the_other_cells_empty(case):
    """Weights that trained only some heads (the bundled grader): the rest are absent, never a guess."""
    phantom, vertebrae, _, _ = case
    networks = oracle_networks(phantom)
    networks.grading = small_grader()
    networks.grading.checkpoint_meta = {"trained_heads": "fc_hrn,fc_ued"}
    result = pipeline.grade_discs(phantom.scan, vertebrae, networks)
    trained = ["UpperEndplateDefect", "Herniation"]
    assert all(list(g) == trained for g in result.grades)
    assert set(result.grading_status["heads_not_trained"]) == set(LEARNED) - set(trained)
    doc = discs_document(phantom.scan, vertebrae, result.ivds, result.grades, result.measurements,
                         result.grading_status)
    assert doc["grading"]["weights"] == "oracle" and doc["grading"]["heads_not_trained"]
    assert all(list(d["grades"]) == trained for d in doc["discs"])
    rows = list(csv.DictReader(io.StringIO(discs_csv_text(doc))))
    for row in rows:
        for name in LEARNED:
            filled = name in trained
            assert (row[name] != "") == filled and (row[f"{name}_probability"] != "") == filled, name
        assert 0.5 <= float(row["Herniation_probability"]) <= 1.0 and row["grading_weights"] == "oracle"
    # a hand-made grades dict lacking columns (and an entry without probabilities) gives empty cells too
    doc["discs"][0]["grades"] = {"Pfirrmann": {"value": 3}}
    first = next(csv.DictReader(io.StringIO(discs_csv_text(doc))))
    assert first["Pfirrmann"] == "3" and first["Pfirrmann_probability"] == "" and first["Herniation"] == ""
    columns, _ = documents.disc_table(None, doc)
    assert [c.name for c in columns][1:6] == ["Pfirrmann", "UpperEndplateDefect", "UpperEndplateDefect_probability",
                                              "Herniation", "Herniation_probability"]


@pytest.mark.parametrize("no_grade", [False, True])
def test_spinenet_run_writes_discs_files_with_and_without_grading(tmp_path, monkeypatch, no_grade):
    phantom = make_phantom(fov="lumbar", shape=(224, 224), pixel_spacing=(1.4, 1.4), n_slices=5, seed=2)
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    calls = []

    def fake_load_networks(*args, **kwargs):
        calls.append(kwargs.get("with_grading"))
        networks = oracle_networks(phantom)
        networks.grading = small_grader() if kwargs.get("with_grading") else None
        return networks

    monkeypatch.setattr(pipeline, "load_networks", fake_load_networks)
    out = tmp_path / "out"
    args = ["run", str(image), "-o", str(out), "--quiet"] + (["--no-grade"] if no_grade else [])
    assert cli.main(args) == 0
    assert calls == [not no_grade]
    assert sorted(p.name for p in out.iterdir()) == ["discs.csv", "discs.json", "preview.png", "result.json",
                                                     "vertebrae.csv", "vertebrae.json"]
    doc = json.loads((out / "discs.json").read_text())
    vertebrae = json.loads((out / "vertebrae.json").read_text())["vertebrae"]
    names = [f"{a['level']}-{b['level']}" for a, b in zip(vertebrae, vertebrae[1:])]
    assert [d["level"] for d in doc["discs"]] == names == [d.name for d in phantom.discs]
    rows = list(csv.DictReader((out / "discs.csv").open()))
    assert [r["Level"] for r in rows] == names
    assert doc["grading"]["weights"] == "oracle" and all(r["grading_weights"] == "oracle" for r in rows)
    if no_grade:
        assert doc["grading"]["status"] == "not run" and "--no-grade" in doc["grading"]["reason"]
        assert all(r["Pfirrmann"] == r["Pfirrmann_probability"] == "" for r in rows)
    else:
        assert doc["grading"]["status"] == "done"
        assert all(r["Pfirrmann"] in {"1", "2", "3", "4", "5"} for r in rows)
        assert all(0.2 <= float(r["Pfirrmann_probability"]) <= 1.0 for r in rows)
    assert all(r["Disc height anterior (mm)"] for r in rows)


def test_pipeline_run_builds_the_discs_document(case):
    """pipeline.run (what `spinenet run` and the worker call) grades with a grading network, else warns."""
    phantom, _, _, _ = case
    networks = oracle_networks(phantom)
    networks.grading = small_grader()
    result = pipeline.run(phantom.scan, networks)
    doc = result.discs_document
    assert doc["schema"] == "spinenet.discs/1" and doc["grading"]["status"] == "done" and result.warnings == []
    assert [d["level"] for d in doc["discs"]] == [d.name for d in phantom.discs]
    assert all(list(d["grades"]) == LEARNED for d in doc["discs"])
    assert result.discs.grades is not None and result.hotspots == []

    networks.grading = None
    result = pipeline.run(phantom.scan, networks, pipeline.RunOptions(hotspot_heads=["Pfirrmann"]))
    assert result.discs_document["grading"]["status"] == "not run" and result.hotspots == []
    assert result.warnings == ["the oracle weights have no grading network: disc measurements only, no grades"]


def test_hotspot_maps_only_for_the_heads_the_weights_trained(case):
    """A grader that records its trained heads (as the bundled one: Herniation only) gets no map for an
    untrained head: such a map would show where an untrained classifier looks, not where a grade comes
    from.  The run says so and still makes the maps of the trained heads asked for."""
    phantom, _, _, _ = case
    networks = oracle_networks(phantom)
    networks.grading = small_grader()
    networks.grading.checkpoint_meta = {"trained_heads": "fc_hrn"}
    both = pipeline.run(phantom.scan, networks, pipeline.RunOptions(hotspot_heads=["Pfirrmann", "Herniation"],
                                                                   hotspot_augmentations=1))
    assert [m.name for m in both.hotspots] == ["hotspots_Herniation.nii.gz"]
    note = [w for w in both.warnings if w.startswith("no hotspot map for Pfirrmann")]
    assert len(note) == 1 and "did not train that head" in note[0]

    untrained = pipeline.run(phantom.scan, networks, pipeline.RunOptions(hotspot_heads="fc_pf,fc_nar",
                                                                        hotspot_augmentations=1))
    assert untrained.hotspots == []
    assert any(w.startswith("no hotspot map for Pfirrmann, Narrowing") and "those heads" in w
               for w in untrained.warnings)
    assert untrained.discs_document["grading"]["status"] == "done"   # the grades themselves are unaffected
