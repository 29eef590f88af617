"""Pseudo-labelled outlines of the point-annotated tianchi/ slices (SpineNetLib.training.tianchi), the
derived S1 point of the evaluation, and the missed-sacrum label images of the context training."""

from __future__ import annotations

import numpy as np
import pytest

from SpineNetLib.core import polygons
from SpineNetLib.evaluation import evaluate as E
from SpineNetLib.training import datasets as D
from SpineNetLib.training import tianchi as T

DATA = D.default_data_root()
needs_data = pytest.mark.skipif(not (DATA / "tianchi").is_dir(), reason=f"tianchi/ not found under {DATA}")


def box(cx, cy, half_w=12.0, half_h=8.0):
    """Axis-aligned quad rt, rb, lb, lt (x right, y down)."""
    return np.array([[cx + half_w, cy - half_h], [cx + half_w, cy + half_h],
                     [cx - half_w, cy + half_h], [cx - half_w, cy - half_h]], float)


def column(n=7, top=30.0, pitch=20.0):
    """Bodies T12 .. S1 at 20 px pitch (16 px high, 4 px discs) with their points, all at x = 50."""
    names = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"][:n]
    quads = {name: box(50.0, top + i * pitch) for i, name in enumerate(names)}
    points = {name: np.array([50.0, top + i * pitch]) for i, name in enumerate(names) if name.startswith("L")}
    for i in range(n - 1):
        points[f"{names[i]}-{names[i + 1]}"] = np.array([50.0, top + i * pitch + pitch / 2])
    return quads, points


def test_constructed_s1_lies_across_the_disc_below_l5_and_the_disc_opens_in_front():
    l5 = box(50.0, 100.0)
    s1 = T.constructed_s1(l5, np.array([50.0, 110.0]))   # disc 2 px below L5's lower edge (y = 108): 4 px high
    wedge = 4.0 * T.L5_S1_WEDGE
    # upper edge mirrored across the disc point, the front (low x, canonical columns run A->P) lower
    np.testing.assert_allclose(s1[[3, 0]], [[38.0, 112.0 + wedge], [62.0, 112.0 - wedge]])
    np.testing.assert_allclose(s1[[2, 1]], [[38.0, 112.0 + wedge + 0.9 * 16], [62.0, 112.0 - wedge + 0.9 * 16]])
    assert (s1[3, 1] - 108.0) == pytest.approx(2.0 * (s1[0, 1] - 108.0))   # 2:1 front to back
    flipped = T.constructed_s1(l5[[3, 2, 1, 0]], np.array([50.0, 110.0]))  # the same body named mirror-wise
    np.testing.assert_allclose(sorted(map(tuple, flipped)), sorted(map(tuple, s1)))


def test_the_even_construction_the_bundled_networks_were_trained_with_is_kept():
    l5 = box(50.0, 100.0)
    s1 = T.constructed_s1(l5, np.array([50.0, 110.0]), "even")
    np.testing.assert_allclose(s1[[3, 0]], [[38.0, 112.0], [62.0, 112.0]])  # upper edge: mirrored across the disc
    np.testing.assert_allclose(s1[[2, 1]], [[38.0, 112.0 + 0.9 * 16], [62.0, 112.0 + 0.9 * 16]])
    quads, points = column()
    high_s1 = quads["S1"] + [0.0, -6.0]
    t = T.match_points([q for name, q in quads.items() if name != "S1"] + [high_s1], points, s1_construction="even")
    assert not t.s1_constructed and np.array_equal(t.quads["S1"], high_s1)


def test_a_disc_point_on_l5s_lower_edge_still_leaves_a_disc_between_l5_and_the_constructed_s1():
    l5 = box(50.0, 100.0)                                   # 16 px high, lower edge at y = 108
    s1 = T.constructed_s1(l5, np.array([50.0, 108.0]))
    floor = T.MIN_L5_S1_DISC_OVER_L5 * 16
    np.testing.assert_allclose(s1[[3, 0], 1], [108.0 + floor * (1 + T.L5_S1_WEDGE), 108.0 + floor * (1 - T.L5_S1_WEDGE)])


def test_points_name_the_detections_and_s1_is_taken_from_a_detection_when_there_is_one():
    quads, points = column()
    t = T.match_points(list(quads.values()), points)
    assert sorted(t.quads) == sorted(quads) and not t.s1_constructed and t.unmatched_points == []
    for name in quads:
        np.testing.assert_array_equal(t.quads[name], quads[name])


def test_missing_s1_is_constructed_and_an_unmatched_body_is_kept_out_of_the_loss():
    quads, points = column()
    detections = [q for name, q in quads.items() if name not in ("S1", "L3")]
    t = T.match_points(detections, points)
    assert "L3" not in t.quads and t.s1_constructed
    assert polygons.point_in_polygon(np.array([50.0, 150.0]), t.quads["S1"])  # where S1 really is
    assert t.unmatched_points == [(50.0, 90.0)]
    ignore = T.loss_ignore_mask(t, (200, 100))
    assert ignore[90, 50] and not ignore[70, 50]          # around L3's point, not on L2
    assert ignore[5, 50] and ignore[190, 50]              # above T12 and below S1
    assert not ignore[150, 50]


def test_a_detected_s1_reaching_over_the_l5_s1_disc_point_is_replaced_by_a_constructed_one():
    quads, points = column()
    high_s1 = quads["S1"] + [0.0, -6.0]          # its upper edge above the disc point (y = 130)
    t = T.match_points([q for name, q in quads.items() if name != "S1"] + [high_s1], points)
    assert t.s1_constructed and not polygons.point_in_polygon(points["L5-S1"], t.quads["S1"])


def test_a_detection_holding_two_body_points_names_neither():
    quads, points = column()
    merged = np.vstack([quads["L2"][:2] + [0, 20], quads["L2"][2:]])  # spans L2 and L3
    others = [q for name, q in quads.items() if name not in ("L2", "L3")]
    t = T.match_points(others + [merged], points)
    assert "L2" not in t.quads and "L3" not in t.quads and len(t.unmatched_points) == 2


@needs_data
def test_s1_point_of_a_clinical_slice_lies_below_the_l5_s1_disc_and_is_scored_apart():
    case = D.list_cases(DATA, sources=("tianchi",))[0]
    gt = E.ground_truth_of_case(case)
    l5 = [v for v in gt.vertebrae if v.level == "L5"][0]
    assert gt.s1_point[1] > gt.range_bottom_row > l5.centroid[1]
    square = lambda c, lv: E.PredictedVertebra(level=lv, slices=np.array([0.0]), polygons=[box(c[0], c[1], 6, 6)])
    preds = [square(v.centroid, v.level) for v in gt.vertebrae]
    found = E.evaluate_case(gt, preds + [square(gt.s1_point, "S1")])
    missed = E.evaluate_case(gt, preds)
    assert (found.s1_detected, found.s1_named, found.all_levels_right) == (True, True, True)
    assert (missed.s1_detected, missed.s1_named, missed.all_levels_right) == (False, False, True)
    pooled = E.summarise([found, missed])["overall"]
    assert (pooled["s1_point_scans"], pooled["s1_point_detected"], pooled["s1_point_named_s1"]) == (2, 1, 1)


@needs_data
def test_an_outline_reaching_into_a_disc_is_counted_by_the_radiologists_disc_point():
    case = D.list_cases(DATA, sources=("tianchi",))[0]
    gt = E.ground_truth_of_case(case)
    assert list(gt.disc_points) == ["T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    square = lambda c, lv, half=6.0: E.PredictedVertebra(level=lv, slices=np.array([0.0]),
                                                         polygons=[box(c[0], c[1], half, half)])
    bodies = [square(v.centroid, v.level) for v in gt.vertebrae]
    disc = gt.disc_points["L5-S1"][1]
    clear = E.evaluate_case(gt, bodies + [square(gt.s1_point, "S1")])
    # an S1 outline whose upper part covers the L5-S1 disc point, as a misplaced one does
    into_disc = E.evaluate_case(gt, bodies + [square((gt.s1_point + disc) / 2, "S1", float(np.linalg.norm(gt.s1_point - disc)))])
    assert clear.discs_scored == list(gt.disc_points) and clear.disc_points_inside_outlines == []
    assert into_disc.disc_points_inside_outlines == ["L5-S1"] and into_disc.s1_named
    pooled = E.summarise([clear, into_disc])["overall"]["disc_points"]
    assert pooled["L5-S1"] == {"scored": 2, "inside_an_outline": 1}
    assert pooled["L4-L5"] == {"scored": 2, "inside_an_outline": 0}


@needs_data
def test_tianchi_training_studies_exclude_the_validation_studies(tmp_path):
    cases = D.list_cases(DATA, sources=("tianchi",))
    quads, _ = column()
    doc_cases = [{"case_id": c.case_id, "quads": {k: v.tolist() for k, v in quads.items()}, "s1_constructed": False,
                  "unmatched_points": [], "body_height_px": 16.0} for c in cases]
    path = tmp_path / "targets.json"
    path.write_text(__import__("json").dumps({"detector": "x", "counts": {}, "cases": doc_cases}))
    studies = T.training_studies(DATA, path)
    ids = {c.case_id for c, _ in studies}
    assert len(ids) == 146 - 50 and not ids & set(D.DEFAULT_VAL_CASES)


def test_context_maps_miss_the_sacrum_in_about_half_of_the_spines_that_reach_it():
    from SpineNetLib.training.labelling import synthetic_height_map

    rng = np.random.default_rng(3)
    with_s1 = without = 0
    for _ in range(300):
        hm, target = synthetic_height_map(rng)
        classes = set(target[target >= 0].tolist())
        if 1 in classes:                   # L5 (class 1) on the map: the spine reaches the sacrum
            with_s1 += 0 in classes        # S1 is class 0
            without += 0 not in classes
    # half missed on purpose, plus the 10 % of bodies every map drops at random
    assert with_s1 + without > 100 and 0.45 < without / (with_s1 + without) < 0.65


def test_calibration_picks_the_appearance_weight_that_names_the_studies_right():
    """Two studies whose context net shifts the spine down by one (calls L5 "S1") while the appearance
    net is sure of L5: the official labelling (w = 0) gets both wrong; the chosen w gets both right."""
    from SpineNetLib.core.levels import LEVELS, N_LEVELS
    from SpineNetLib.core.results import Vertebra
    from SpineNetLib.training.calibrate_labelling import StudyInputs, calibrate

    def probs(names, gap):
        logits = np.zeros((len(names), N_LEVELS))
        logits[np.arange(len(names)), [LEVELS.index(n) for n in names]] = gap
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    truth = ["L1", "L2", "L3", "L4", "L5"]
    studies = []
    for k in range(2):
        gt = E.CaseGroundTruth(case_id=f"s{k}", spacing_mm=(1.0, 1.0, 4.0), range_top_row=0.0, range_bottom_row=200.0,
                               vertebrae=[E.GroundTruthVertebra(level=n, mid_slice=0, centroid=np.array([50.0, 30.0 + 20 * i]))
                                          for i, n in enumerate(truth)])
        vertebrae = [Vertebra(slices=[0], polygons=[box(50.0, 30.0 + 20 * i)]) for i in range(5)]
        appearance = probs(truth, 1.0)
        appearance[-1] = probs(["L5"], 12.0)[0]
        studies.append(StudyInputs(f"s{k}", gt, vertebrae, probs(["L2", "L3", "L4", "L5", "S1"], 2.5), appearance))
    result = calibrate(studies, log=lambda *a: None)
    by_weight = {(r["appearance_weight"], r["repeat_s1_penalty"]): r["scans_right"] for r in result["grid"]}
    assert by_weight[(0.0, 3.0)] == 0
    assert result["chosen"]["appearance_weight"] > 0 and max(by_weight.values()) == 2
    assert result["review"]["wrong"] == 0 and result["review"]["right"] == 2 and result["warnings"] == []


@needs_data
def test_the_detection_stride_of_the_targets_is_chosen_and_recorded(tmp_path):
    """``train tianchi-targets --stride-fraction``: the bundled detector's and appearance network's targets
    were made at 0.6, the default stride before 2026-12-01; the default 0.8 outlines other bodies on a wide
    field of view (tianchi_105: 1.44 mm pixels in its header, 74 cm across), so the recipe names the stride
    to make the same targets again."""
    import json

    from SpineNetLib.detect.plans import DetectionParams
    from SpineNetLib.weights.resolve import BUNDLED_DIR

    case = [c for c in D.list_cases(DATA, sources=D.POINT_SOURCES) if c.case_id == "tianchi_105-000"]
    made = {}
    for stride in (0.6, 0.8):
        out = tmp_path / f"targets_{stride}.json"
        T.make_pseudo_labels(case, BUNDLED_DIR / "detector.pt", out, log=lambda *a: None, s1_construction="even",
                             params=DetectionParams(stride_fraction=stride))
        made[stride] = json.loads(out.read_text())
        assert made[stride]["stride_fraction"] == stride
    assert made[0.6]["cases"] != made[0.8]["cases"]
    assert len(made[0.6]["cases"][0]["unmatched_points"]) > len(made[0.8]["cases"][0]["unmatched_points"])


def test_a_targets_file_names_the_code_that_made_it(tmp_path):
    """Pseudo-labels made by other code are other training data: the file records the code's fingerprint
    (training/provenance.py), which the grader's targets of the bundled weights did not (MODEL_CARD.md,
    "Repeating the recipe")."""
    import json

    from SpineNetLib.training.provenance import code_sha256, git_state
    from SpineNetLib.weights.resolve import BUNDLED_DIR

    case = [c for c in D.list_cases(DATA, sources=D.POINT_SOURCES) if c.case_id == "tianchi_002-000"]
    out = tmp_path / "targets.json"
    T.make_pseudo_labels(case, BUNDLED_DIR / "detector.pt", out, log=lambda *a: None, s1_construction="even")
    made_by = json.loads(out.read_text())["made_by"]
    assert made_by["code_sha256"] == code_sha256()
    assert made_by.get("git_commit") == git_state().get("git_commit")
