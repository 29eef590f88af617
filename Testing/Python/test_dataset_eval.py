"""Real-data cases, detection targets, patient split (SpineNetLib.training.datasets) and the
seed paper's §5.1 metrics (SpineNetLib.evaluation.evaluate).

Tests on the real data skip when ``../shared/data`` (or ``$SPINENET_DATA``)
is absent; everything else runs on hand-made masks, label volumes and NIfTI
files written to a temporary folder.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from SpineNetLib.inputs import canonical
from SpineNetLib.outputs import vertebrae as outputs
from SpineNetLib.core import polygons
from SpineNetLib.training import datasets as D
from SpineNetLib.evaluation import evaluate as E
from SpineNetLib.evaluation import tables as T
from SpineNetLib.evaluation.intervals import (patient_unit_interval, percent_range, rounded, scan_unit_interval,
                                               wilson_interval)
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.results import DetectionResult, Vertebra

DATA = D.default_data_root()
needs_data = pytest.mark.skipif(not (DATA / "chu").is_dir(),
                                reason=f"real MRI data not found at {DATA} (shared/data beside the repository)")


@pytest.fixture(scope="module")
def real_cases():
    return {c.case_id: c for c in D.list_cases(DATA)}


# --------------------------------------------------------------------------- quads on hand-made masks


def rect_mask(shape, center, half_w, half_h, angle_deg):
    """Mask of a rectangle whose "width" axis points at angle_deg (image frame, y down)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    a = np.deg2rad(angle_deg)
    u = (xx - center[0]) * np.cos(a) + (yy - center[1]) * np.sin(a)
    v = -(xx - center[0]) * np.sin(a) + (yy - center[1]) * np.cos(a)
    mask = (np.abs(u) <= half_w) & (np.abs(v) <= half_h)
    corners = []
    for su, sv in ((1, -1), (1, 1), (-1, 1), (-1, -1)):  # rt, rb, lb, lt
        cu, cv = su * half_w, sv * half_h
        corners.append((center[0] + cu * np.cos(a) - cv * np.sin(a), center[1] + cu * np.sin(a) + cv * np.cos(a)))
    return mask, np.array(corners)


def check_quad(quad, mask, steep=False):
    assert quad.shape == (4, 2)
    for x, y in quad:
        assert x == int(x) and y == int(y) and mask[int(y), int(x)], "every corner is a mask pixel"
    rt, rb, lb, lt = quad
    assert rt[0] > lt[0] and rb[0] > lb[0], "r corners are posterior (larger x)"
    assert rb[1] > rt[1], "b corners are inferior (larger y)"
    if not steep:  # a wedge-shaped sacrum tilted ~55 degrees can have lt below lb in the image
        assert lb[1] > lt[1]
    assert polygons.is_valid_polygon(quad) and polygons.signed_area(quad) > 0, "clockwise rt, rb, lb, lt"


def test_quad_of_axis_aligned_rectangle_is_its_corners():
    mask = np.zeros((40, 50), bool)
    mask[10:21, 5:31] = True  # rows 10..20, cols 5..30
    quad = D.vertebra_quad_from_mask(mask)
    np.testing.assert_array_equal(quad, [[30, 10], [30, 20], [5, 20], [5, 10]])


@pytest.mark.parametrize("angle", [-25.0, -10.0, 0.0, 15.0, 30.0])
def test_quad_of_tilted_near_square_body(angle):
    # 30 x 26 px: principal axes would be ill-defined; the min-area frame is not.
    mask, true = rect_mask((80, 80), (40, 40), 15, 13, angle)
    quad = D.vertebra_quad_from_mask(mask)
    check_quad(quad, mask)
    assert np.max(np.linalg.norm(quad - true, axis=1)) < 1.6


def test_quad_of_steep_sacrum_needs_its_prior():
    # S1 tilted 55 degrees (posterior end up): with the default prior the AP axis is taken as the
    # other rectangle side, with the L5-like prior the corners are right.
    mask, true = rect_mask((90, 90), (45, 45), 20, 12, -55.0)
    quad = D.vertebra_quad_from_mask(mask, prior_angle_deg=-35.0)
    check_quad(quad, mask)
    assert np.max(np.linalg.norm(quad - true, axis=1)) < 2.5  # blunt pixelated corners at 55 degrees
    wrong = D.vertebra_quad_from_mask(mask)
    assert np.max(np.linalg.norm(wrong - true, axis=1)) > 10


def test_quad_rejects_tiny_clipped_and_fragmentary_masks():
    tiny = np.zeros((30, 30), bool)
    tiny[10:15, 10:15] = True  # 25 px
    assert D.vertebra_quad_from_mask(tiny) is None
    clipped = np.zeros((30, 30), bool)
    clipped[0:10, 5:20] = True
    assert D.vertebra_quad_from_mask(clipped) is None
    two = np.zeros((40, 40), bool)
    two[5:15, 5:15] = True
    two[20:30, 20:28] = True
    assert D.vertebra_quad_from_mask(two) is None
    speck = np.zeros((40, 40), bool)
    speck[5:20, 5:25] = True
    speck[30, 30] = True  # a 1-px speck is dropped, not fatal
    np.testing.assert_array_equal(D.vertebra_quad_from_mask(speck), [[24, 5], [24, 19], [5, 19], [5, 5]])
    ring = np.zeros((40, 40), bool)  # a thin L shape: its "quad" is mostly outside it
    ring[5:35, 5:8] = True
    ring[32:35, 5:35] = True
    assert D.vertebra_quad_from_mask(ring) is None


def test_slice_targets_order_centroid_and_discs_ignored():
    lab = np.zeros((80, 60), np.uint8)
    lab[10:25, 20:45] = 23     # L4
    lab[26:30, 20:45] = 123    # L4-L5 disc: not a body
    lab[31:47, 18:44] = 24     # L5
    names = {23: "L4", 24: "L5", 123: "L4-L5"}
    targets = D.slice_targets(lab, names)
    assert [t.level for t in targets] == ["L4", "L5"]
    np.testing.assert_allclose(targets[0].centroid, [32.0, 17.0])
    np.testing.assert_allclose(targets[1].centroid, [30.5, 38.5])
    # lateral edge slice: below a quarter of the body's largest area -> no target, masked from the loss
    refs = {23: int((lab == 23).sum()) * 5, 24: int((lab == 24).sum())}
    assert [t.level for t in D.slice_targets(lab, names, reference_areas=refs)] == ["L5"]
    band = D.AnnotatedBand(None, None)
    keep = D.detection_loss_mask(lab, band, names, reference_areas=refs)
    assert not keep[17, 32] and not keep[8, 32] and keep[38, 30] and keep[70, 5]
    targets, keep2 = D.slice_targets_and_loss_mask(lab, band, names, reference_areas=refs)
    assert [t.level for t in targets] == ["L5"] and np.array_equal(keep, keep2)


def test_annotated_band_follows_tilted_endplates_and_source():
    lab = np.zeros((140, 100, 3), np.uint8)
    for code, (top, tilt) in {22: (20, 0.0), 23: (50, 0.0), 24: (80, -0.3)}.items():
        for c in range(30, 70):
            t = int(round(top + tilt * (c - 30)))
            lab[t:t + 25, c, :] = code
    band = D.annotated_band(lab, "chu", (1.0, 1.0, 1.0), margin_mm=2.0)
    assert band.upper == pytest.approx((18.0, 0.0))
    a, b = band.lower  # L5's lower endplate rises towards posterior (larger x)
    assert b == pytest.approx(-0.3, abs=0.02)
    m = band.mask((140, 100))
    assert m[(lab > 0).any(axis=2)].all(), "every annotated body is inside the band"
    assert not m[17, 50] and m[18, 50]
    for c in (30, 69):  # 2 mm below the endplate kept, 4 mm below masked, at both ends of it
        bottom = int(round(80 - 0.3 * (c - 30))) + 24
        assert m[bottom + 2, c] and not m[bottom + 4, c]
    assert band.row_band(100) == (18, int(np.floor(a + b * 99)))
    zuk = D.annotated_band(lab, "zukic")
    assert zuk.lower is None and zuk.mask((140, 100))[139, 50]
    assert D.annotated_band(np.zeros((5, 5, 2), np.uint8), "ivd").mask((5, 5)).sum() == 0
    assert D.ignore_below_row(lab, "myosegmentum") == 104 + 2
    assert D.ignore_below_row(lab, "zukic") is None


# --------------------------------------------------------------------------- patients and split


def fake_cases():
    ids = ([("chu", f"chu_{i:02d}") for i in range(1, 11)] + [("myosegmentum", f"myo_{i:02d}") for i in range(1, 16)]
           + [("zukic", z) for z in ("zukic_02_AKa3_T1", "zukic_03_AKa4_TIRM", "zukic_15_S01_T2")])
    return [D.RealCase(cid, src, D.patient_of(src, cid), "T2", None) for src, cid in ids]


def test_patient_ids():
    assert D.patient_of("zukic", "zukic_02_AKa3_T1") == D.patient_of("zukic", "zukic_03_AKa4_TIRM") == "zukic_AKa"
    assert D.patient_of("zukic", "zukic_15_S01_T2") == "zukic_S01"
    assert D.patient_of("chu", "chu_06") == "chu_06"


@pytest.mark.parametrize("seed", range(8))
def test_patient_split_never_splits_a_patient_and_is_deterministic(seed):
    cases = fake_cases()
    train, val = D.patient_split(cases, 9, seed=seed)
    assert D.patient_split(cases, 9, seed=seed) == (train, val)
    assert len({c.patient_id for c in val}) == 9
    assert not {c.patient_id for c in train} & {c.patient_id for c in val}
    assert len(train) + len(val) == len(cases)
    aka = [c for c in cases if c.patient_id == "zukic_AKa"]
    assert all(c in train for c in aka) or all(c in val for c in aka)


def test_patient_split_explicit_and_per_source():
    cases = fake_cases()
    train, val = D.patient_split(cases, {"chu": 2, "myosegmentum": 3}, val_patients=["zukic_AKa"], seed=1)
    assert [c.case_id for c in val if c.source == "zukic"] == ["zukic_02_AKa3_T1", "zukic_03_AKa4_TIRM"]
    assert sum(c.source == "chu" for c in val) == 2 and sum(c.source == "myosegmentum" for c in val) == 3
    with pytest.raises(InputError):
        D.patient_split(cases, val_patients=["nobody"])


def test_wilson_interval_is_never_a_point_at_none_or_all_right():
    """A figure from a few scans says how little it rests on: 5 of 5 right is 57-100 %, not 100 %."""
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(5, 5) == pytest.approx((5 / (5 + z2), 1.0))   # closed form at n of n
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    low, high = wilson_interval(66, 68)
    assert 0.89 < low < 0.90 and 0.99 < high < 0.993 and low < 66 / 68 < high
    # more scans, a narrower interval around the same share
    assert np.ptp(wilson_interval(660, 680)) < np.ptp(wilson_interval(66, 68)) / 3
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    assert percent_range(wilson_interval(5, 5)) == "56.6-100.0" and percent_range(None) == "n/a"


def test_body_rates_take_the_scan_as_the_unit():
    """Forty bodies of four scans, one scan shifted (all ten wrong): as wide as 3 of 4 scans, not 30 of 40
    bodies; scans without scored bodies do not count."""
    rate = scan_unit_interval([10, 10, 10, 0, 0], [10, 10, 10, 10, 0])
    assert rate == pytest.approx(wilson_interval(3, 4))
    assert np.ptp(rate) > 2 * np.ptp(wilson_interval(30, 40))
    assert scan_unit_interval([0], [0]) is None
    with pytest.raises(ValueError):
        scan_unit_interval([1, 2], [2])


def test_cases_sharing_one_dicom_patient_id_are_pointed_out(tmp_path):
    """An anonymised export may give every scan one PatientID: the user is told which cases count as one
    patient for that reason, not for a patient named in case.json, and not below three cases."""
    from SpineNetLib.evaluation.own_cases import shared_patient_warnings

    def case(name, patient_id, named=None):
        folder = tmp_path / "mycentre" / name
        folder.mkdir(parents=True)
        (folder / "case.json").write_text(json.dumps({"sequence": "T2", **({"patient": named} if named else {})}))
        return D.RealCase(case_id=name, source="mycentre", patient_id=f"mycentre/{patient_id}", sequence="T2",
                          path=folder)

    cases = [case("case_a", "ANON"), case("case_b", "ANON"), case("case_c", "ANON"),
             case("case_d", "ANON", named="ANON"),           # the user says so: no warning for it
             case("case_e", "case_e"),                       # a patient of its own
             case("case_f", "P2"), case("case_g", "P2")]     # two series of one spine: not pointed out
    lines = shared_patient_warnings(cases)
    assert len(lines) == 1
    assert lines[0].startswith("3 cases of mycentre (case_a, case_b, case_c) share the DICOM PatientID 'ANON'")
    assert "case.json" in lines[0] and "\n" not in lines[0]
    assert shared_patient_warnings(cases[3:]) == []


def test_scans_of_one_patient_are_one_unit_of_the_intervals():
    """A T1 and a T2 of one spine are named wrongly together: four scans of three patients, the two of one
    patient both wrong, give the interval of 1.5 of 3 units, wider than 2 of 4 scans; with one scan per
    patient everything is as over scans.  The tables say how many patients the scans are of."""
    assert patient_unit_interval([0, 0, 1, 1], [1, 1, 1, 1], ["A", "A", "B", "C"]) == pytest.approx(wilson_interval(1.5, 3))
    assert patient_unit_interval([0, 0, 1, 1], [1, 1, 1, 1], ["A", "B", "C", "D"]) == pytest.approx(wilson_interval(2, 4))
    assert patient_unit_interval([0, 1], [1, 1]) == pytest.approx(wilson_interval(1, 2))
    with pytest.raises(ValueError):
        patient_unit_interval([1, 1], [1, 1], ["A"])

    def scan(case_id: str, right: bool):
        return E.CaseMetrics(case_id=case_id, n_gt=5, tp=5, fp=0, fn=0, n_identified=5 if right else 0,
                             n_identified_within_1=5)

    metrics = [scan("a_t1", False), scan("a_t2", False), scan("b", True), scan("c", True)]
    groups = {m.case_id: {"source": "mycentre", "sequence": "T2", "patient": m.case_id.split("_")[0]} for m in metrics}
    overall = E.summarise(metrics, groups)["overall"]
    assert (overall["n_cases"], overall["n_patients"], overall["scans_all_levels_right"]) == (4, 3, 2)
    assert overall["ci95"]["share_of_scans_all_levels_right"] == rounded(wilson_interval(1.5, 3))
    assert overall["ci95"]["identification_rate"] == rounded(wilson_interval(1.5, 3))
    assert np.ptp(overall["ci95"]["share_of_scans_all_levels_right"]) > np.ptp(wilson_interval(2, 4))
    summary = E.summarise(metrics, groups)
    assert summary["by_source"]["mycentre"]["n_patients"] == 3
    assert "2/4 scans of 3 patients right 50.0 %" in T.share_lines(summary)[1]
    # each scan's S1 outlined: named S1 on the two of patient a, named L5 on b, missed on c
    for m, named in zip(metrics, ("S1", "S1", "L5")):
        m.matches = [E.Match(gt_level="S1", pred_index=0, pred_level=named, error_mm=1.0)]
    metrics[3].missed_levels = ["S1"]
    s1 = E.summarise(metrics, groups)["by_level"]["S1"]
    assert (s1["n"], s1["found"], s1["identified"], s1["n_patients"]) == (4, 3, 2, 3)
    assert s1["ci95"]["identification_rate"] == rounded(wilson_interval(1.5, 3))   # 2 of 4 bodies, 3 patients
    assert any(line.startswith("S1 where it is outlined: found 3 of 4 (of 3 patients)")
               for line in T.level_lines(E.summarise(metrics, groups)))
    alone = E.summarise(metrics)["overall"]   # no patients known: each scan its own
    assert alone["n_patients"] == 4 and alone["ci95"]["share_of_scans_all_levels_right"] == rounded(wilson_interval(2, 4))
    assert "2/4 scans right" in T.share_lines({"overall": alone})[1]
    cases = {k: {"wrong_levels": [] if v["all_levels_right"] else ["L4->L5"], "all_levels_right": v["all_levels_right"]}
             for k, v in summary["cases"].items()}
    review = E.review_summary(cases, {"a_t1": True, "a_t2": True, "b": False, "c": False},
                              {k: g["patient"] for k, g in groups.items()})
    assert review["ci95"]["wrong_flagged"] == rounded(wilson_interval(1, 1))     # two scans, one patient
    assert review["ci95"]["unflagged_none_wrong"] == rounded(wilson_interval(2, 2))


def test_review_summary_sorts_scans_by_the_flag_and_says_what_an_unflagged_scan_is_worth():
    """Scans with a wrongly named body should be flagged, right ones rarely; a scan with a missed body but
    none named wrongly counts in neither group; an unflagged wrong scan is named and counts against the
    unflagged share."""
    cases = {"shifted": {"wrong_levels": ["L5->S1"], "all_levels_right": False},
             "shifted_unflagged": {"wrong_levels": ["L4->L5"], "all_levels_right": False},
             "missed_l5": {"wrong_levels": [], "all_levels_right": False},
             "right": {"wrong_levels": [], "all_levels_right": True},
             "right_flagged": {"wrong_levels": [], "all_levels_right": True}}
    flags = {"shifted": True, "shifted_unflagged": False, "missed_l5": True, "right": False, "right_flagged": True}
    review = E.review_summary(cases, flags)
    assert (review["wrong_flagged"], review["wrong"], review["right_flagged"], review["right"]) == (1, 2, 1, 2)
    assert (review["unflagged"], review["unflagged_none_wrong"]) == (2, 1)
    assert review["wrong_not_flagged"] == ["shifted_unflagged"]
    assert review["ci95"]["unflagged_none_wrong"] == rounded(wilson_interval(1, 2))
    lines = T.review_lines({"review": review})
    assert lines[0].endswith("; not flagged: shifted_unflagged")
    assert lines[1] == "scans not flagged: 2, with no body named wrongly 1 (9.5-90.5 %)"


# --------------------------------------------------------------------------- real data


@needs_data
def test_point_annotated_case_is_scored_by_its_points(tmp_path):
    """A tianchi/ study (one slice, centre points): a point counts when it lies inside a predicted
    outline on its slice, and detections above the T12-L1 / below the L5-S1 disc point are not scored."""
    case = [c for c in D.list_cases(DATA, sources=("tianchi",))][0]
    gt = E.ground_truth_of_case(case)
    assert [v.level for v in gt.vertebrae] == ["L1", "L2", "L3", "L4", "L5"]
    assert gt.range_top_row < gt.vertebrae[0].centroid[1] and gt.range_bottom_row > gt.vertebrae[-1].centroid[1]
    square = lambda c: np.array([[c[0] + 5, c[1] - 5], [c[0] + 5, c[1] + 5], [c[0] - 5, c[1] + 5], [c[0] - 5, c[1] - 5]])
    preds = [E.PredictedVertebra(level=v.level, slices=np.array([0.0]), polygons=[square(v.centroid)])
             for v in gt.vertebrae]
    shifted = [E.PredictedVertebra(level=lv, slices=p.slices, polygons=p.polygons)
               for lv, p in zip(["L2", "L3", "L4", "L5", "S1"], preds)]
    above = E.PredictedVertebra(level="T12", slices=np.array([0.0]),
                                polygons=[square((gt.vertebrae[0].centroid[0], gt.range_top_row - 20))])
    right = E.evaluate_case(gt, preds + [above])
    assert (right.tp, right.fp, right.n_identified, right.all_levels_right) == (5, 0, 5, True)
    wrong = E.evaluate_case(gt, shifted)
    assert (wrong.tp, wrong.n_identified, wrong.all_levels_right) == (5, 0, False)
    summary = E.summarise([right, wrong], {case.case_id: {"source": "tianchi", "sequence": "T2"}})
    assert summary["overall"]["share_of_scans_all_levels_right"] == 0.5
    # one of two scans right: Wilson's 95 % interval; the shifted scan's five wrong bodies count as one unit
    wide = rounded(wilson_interval(1, 2))
    assert summary["overall"]["ci95"]["share_of_scans_all_levels_right"] == wide
    assert summary["overall"]["ci95"]["identification_rate"] == wide
    wide_all = rounded(wilson_interval(2, 2))
    assert summary["overall"]["ci95"]["recall"] == wide_all
    lines = T.level_lines(summary)
    assert lines[1].split() == ["L1", "2", "100.0%", "50.0%"]
    assert "S1 where it is outlined: in no scored scan" in lines
    s1_points = summary["overall"]["s1_point_scans"]
    (s1_line,) = [line for line in lines if line.startswith("S1 below an annotated L5-S1 disc")]
    assert f"of {s1_points}" in s1_line and "by source" not in s1_line   # one source: no split
    assert summary["by_level"]["L1"] == {"n": 2, "found": 2, "identified": 1, "recall": 1.0,
                                         "identification_rate": 0.5, "n_patients": 2,
                                         "ci95": {"recall": wide_all, "identification_rate": wide}}
    # issue 10's "no scan shifted": every found body named one level too low is a shift of +1; a scan
    # with one body named wrongly and the others right is wrong, but not shifted
    mixed = E.evaluate_case(gt, [E.PredictedVertebra(level="L3" if p.level == "L2" else p.level, slices=p.slices,
                                                     polygons=p.polygons) for p in preds])
    up = E.evaluate_case(gt, [E.PredictedVertebra(level=lv, slices=p.slices, polygons=p.polygons)
                              for lv, p in zip(["T12", "L1", "L2", "L3", "L4"], preds)])
    assert (right.level_shift, wrong.level_shift, mixed.level_shift, up.level_shift) == (0, 1, None, -1)
    assert summary["overall"]["scans_shifted"] == 1 and summary["overall"]["scans_shifted_by"] == {"+1": 1}
    assert summary["cases"][case.case_id]["level_shift"] in (0, 1)
    four = E.summarise([right, wrong, mixed, up])["overall"]
    assert (four["scans_shifted"], four["scans_shifted_by"]) == (2, {"-1": 1, "+1": 1})
    assert four["ci95"]["share_of_scans_shifted"] == rounded(wilson_interval(2, 4))
    assert "shifted 2 (" in T.share_lines({"overall": four})[1]


@needs_data
def test_real_case_list(real_cases):
    cases = D.list_cases(DATA)
    assert [c.case_id for c in cases] == [c.case_id for c in D.list_cases(DATA)]
    # 55 volumes with masks + the 146 usable tianchi/ studies (151, less the 5 with swapped labels)
    assert len(cases) == 55 + 146
    assert sum(c.source == "tianchi" for c in cases) == 146
    assert {c.source for c in cases} == set(D.SOURCES)
    patients = {c.patient_id for c in cases}
    assert len(patients) == 54 + 146
    assert real_cases["zukic_02_AKa3_T1"].patient_id == real_cases["zukic_03_AKa4_TIRM"].patient_id
    assert real_cases["zukic_15_S01_T2"].sequence == "T2"


@needs_data
def test_default_split_on_real_data():
    cases = D.list_cases(DATA)
    train, val = D.default_split(cases)
    assert tuple(c.case_id for c in val) == D.DEFAULT_VAL_CASES
    assert D.default_split(cases) == (train, val)
    assert not {c.case_id for c in train} & {"zukic_02_AKa3_T1", "zukic_03_AKa4_TIRM", "zukic_15_S01_T2"}
    assert sum(c.source == "tianchi" for c in val) == 50
    assert not {c.patient_id for c in train} & {c.patient_id for c in val}


@needs_data
def test_load_case_is_the_stored_array_transposed(real_cases):
    import SimpleITK as sitk

    case = real_cases["chu_06"]
    data = D.load_case(case)
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(case.path / "labels.nii.gz")))
    assert data.voxels.dtype == np.float32 and data.labels.dtype == np.uint8
    assert data.voxels.shape == (381, 381, 69) and data.spacing_mm == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(data.labels, raw.transpose(2, 1, 0))
    geo = D.case_geometry(case)
    # canonical rows run inferior, columns posterior (RAS -S, -A)
    np.testing.assert_allclose(geo.canonical_to_ras[:3, 0], [0, 0, -1], atol=1e-6)
    np.testing.assert_allclose(geo.canonical_to_ras[:3, 1], [0, -1, 0], atol=1e-6)
    rows = {name: np.nonzero((data.labels == code).any(axis=(1, 2)))[0].mean()
            for code, name in data.level_names.items()}
    assert rows["T11"] < rows["L1"] < rows["L5"], "head at the top"
    assert data.level_names[24] == "L5"


@needs_data
@pytest.mark.parametrize("case_id", ["chu_06", "myo_01", "zukic_02_AKa3_T1", "zukic_15_S01_T2"])
def test_real_targets(real_cases, case_id):
    case = real_cases[case_id]
    data = D.load_case(case)
    refs = D.body_reference_areas(data.labels)
    codes = {name: code for code, name in data.level_names.items()}
    n = 0
    for s in range(data.labels.shape[2]):
        lab = data.labels[:, :, s]
        for t in D.slice_targets(lab, data.level_names, reference_areas=refs):
            mask = lab == codes[t.level]
            check_quad(t.quad, mask, steep=t.level == "S1")
            cx, cy = np.rint(t.centroid).astype(int)
            assert mask[cy, cx], "centroid inside its mask"
            n += 1
    assert n > 150
    gt = E.ground_truth_from_labels(data.labels, data.spacing_mm, data.level_names, case_id)
    for v in gt.vertebrae:  # every body has a target on its mid slice
        assert v.level in [t.level for t in D.slice_targets(data.labels[:, :, v.mid_slice], data.level_names,
                                                             reference_areas=refs)]
    if case.source == "zukic":
        assert gt.vertebrae[-1].level == "S1"
    # Sides right: on each mid slice, a body's superior edge (lt-rt) faces the inferior edge (lb-rb)
    # of the body above, closer than any of its other three edges (catches frames turned by 90
    # degrees, e.g. the sacrum of zukic AKa, whose minimum-area rectangle is 45 degrees off).
    for upper, lower in zip(gt.vertebrae, gt.vertebrae[1:]):
        for s in {upper.mid_slice, lower.mid_slice}:
            t = {q.level: q.quad for q in D.slice_targets(data.labels[:, :, s], data.level_names)}
            if upper.level in t and lower.level in t:
                target = t[upper.level][[1, 2]].mean(axis=0)
                q = t[lower.level]
                edges = [q[[3, 0]], q[[0, 1]], q[[1, 2]], q[[2, 3]]]  # superior, posterior, inferior, anterior
                d = [np.linalg.norm(e.mean(axis=0) - target) for e in edges]
                assert int(np.argmin(d)) == 0, (s, upper.level, lower.level, d)


@needs_data
@pytest.mark.parametrize("case_id", ["chu_06", "myo_01", "zukic_15_S01_T2"])
def test_real_loss_band(real_cases, case_id):
    case = real_cases[case_id]
    data = D.load_case(case)
    band = D.annotated_band(data.labels, case.source, data.spacing_mm)
    m = band.mask(data.labels.shape[:2])
    bodies = np.isin(data.labels, list(D.VERTEBRA_CODES)).any(axis=2)
    assert m[bodies].all()
    gt = E.ground_truth_from_labels(data.labels, data.spacing_mm, data.level_names, case_id)
    top, bottom = gt.vertebrae[0], gt.vertebrae[-1]
    tx, ty = np.rint(top.centroid).astype(int)
    assert not m[max(ty - 25, 0), tx], "the unannotated body above the first one is masked"
    bx, by = np.rint(bottom.centroid).astype(int)
    below = m[min(by + 30, m.shape[0] - 1), bx]
    if case.source == "zukic":
        assert band.lower is None and D.ignore_below_row(data.labels, case.source) is None
    else:  # S1, ~30 mm below L5's centre, is unannotated: masked
        assert not below
        assert D.ignore_below_row(data.labels, case.source) < by + 30


@needs_data
def test_real_round_trip_through_vertebrae_json(real_cases, tmp_path):
    """GT quads written by outputs.py on the slab-averaged scan the pipeline uses score perfectly."""
    case = real_cases["myo_01"]
    data = D.load_case(case)
    arr, affine = D.read_volume(case.path / "image.nii.gz")
    scan = canonical.scan_from_array(arr, affine)  # the pipeline's ~3.5 mm slabs
    centre = [float((scan.canonical_to_input_ijk @ [0, 0, t, 1])[2]) for t in range(scan.n_slices)]
    gt = E.ground_truth_from_labels(data.labels, data.spacing_mm, data.level_names, case.case_id)
    refs = D.body_reference_areas(data.labels)
    verts = []
    for v in gt.vertebrae:
        slabs, polys = [], []
        for t in range(scan.n_slices):
            native = int(round(centre[t]))
            quads = [q for q in D.slice_targets(data.labels[:, :, native], data.level_names, reference_areas=refs)
                     if q.level == v.level]
            if quads and abs(centre[t] - v.mid_slice) <= 8:
                slabs.append(t)
                polys.append(quads[0].quad)
        verts.append(Vertebra(slices=slabs, polygons=polys, level=v.level))
    verts.append(Vertebra(slices=[2, 3], polygons=[np.array([[120., 5], [120, 25], [95, 25], [95, 5]])] * 2,
                          level="T12"))  # above the annotated range: ignored
    (tmp_path / case.case_id).mkdir()
    path = tmp_path / case.case_id / "vertebrae.json"
    path.write_text(json.dumps(outputs.vertebrae_document(scan, DetectionResult(verts))))
    preds = E.predictions_from_vertebrae_json(path, D.case_geometry(case))
    assert len(preds) == 6
    # one polygon per native slice the vertebra's slabs cover (issue 14), slab centres inside that run
    first_centre, last_centre = centre[min(verts[0].slices)], centre[max(verts[0].slices)]
    half = (centre[1] - centre[0]) / 2.0
    np.testing.assert_allclose(preds[0].slices, np.arange(first_centre - half + 0.5, last_centre + half), atol=1e-3)
    m = E.evaluate_case(gt, preds)
    assert (m.tp, m.fp, m.fn, m.n_identified, m.n_ignored_predictions) == (5, 0, 0, 5, 1)
    assert m.mean_localisation_error_mm < 2.5
    summary = E.evaluate_directories(DATA, tmp_path, case_ids=["myo_01", "myo_02"])
    assert summary["missing_predictions"] == ["myo_02"]
    assert summary["overall"]["recall"] == 1.0 and summary["overall"]["precision"] == 1.0
    # --data may also name the source folder or the case folder itself (issue 14)
    for data in (DATA / "myosegmentum", case.path):
        one = E.evaluate_directories(data, tmp_path)
        assert set(one["cases"]) == {"myo_01"} and one["overall"]["recall"] == 1.0
    # nothing to score is an error, not an all-zero table
    with pytest.raises(InputError, match="nothing to score"):
        E.evaluate_directories(DATA / "myosegmentum" / "myo_02", tmp_path)
    with pytest.raises(InputError, match="no annotated case"):
        E.evaluate_directories(tmp_path, tmp_path)


# --------------------------------------------------------------------------- metrics on hand-made cases


def box(x0, y0, x1, y1):
    return np.array([[x1, y0], [x1, y1], [x0, y1], [x0, y0]], float)


def pred(level, poly, slices=(4, 5, 6)):
    return E.PredictedVertebra(level=level, slices=np.asarray(slices, float), polygons=[np.asarray(poly, float)] * len(slices))


def gt_case(spacing=(1.0, 1.0, 1.0)):
    """Three bodies L3, L4, L5 on mid slice 5, centroids (30, 20), (30, 50), (30, 80)."""
    vs = [E.GroundTruthVertebra(level=n, mid_slice=5, centroid=np.array([30.0, y]))
          for n, y in (("L3", 20.0), ("L4", 50.0), ("L5", 80.0))]
    return E.CaseGroundTruth("hand", spacing, vs, range_top_row=8.0, range_bottom_row=92.0)


def test_hits_misses_and_identification():
    preds = [pred("L3", box(18, 10, 42, 30)), pred("L4", box(18, 40, 42, 60))]
    m = E.evaluate_case(gt_case(), preds)
    assert (m.n_gt, m.tp, m.fp, m.fn) == (3, 2, 0, 1)
    assert m.missed_levels == ["L5"]
    assert m.precision == 1.0 and m.recall == pytest.approx(2 / 3)
    assert m.identification_rate == pytest.approx(2 / 3)
    assert m.localisation_errors_mm == [0.0, 0.0]


def test_double_hit_is_one_tp_and_one_fp():
    preds = [pred("L3", box(18, 10, 42, 30)), pred("L3", box(20, 12, 44, 34)),
             pred("L4", box(18, 40, 42, 60)), pred("L5", box(18, 70, 42, 90))]
    m = E.evaluate_case(gt_case(), preds)
    assert (m.tp, m.fp, m.fn) == (3, 1, 0)
    assert m.matches[0].pred_index == 0, "the nearer of the two is matched"
    assert m.precision == pytest.approx(0.75)


def test_merged_detection_counts_once():
    m = E.evaluate_case(gt_case(), [pred("L4", box(18, 40, 42, 90))])  # covers L4 and L5 centroids
    assert (m.tp, m.fp, m.fn) == (1, 0, 2)


def test_out_of_range_predictions_are_ignored_but_in_range_spurious_ones_are_fp():
    good = [pred("L3", box(18, 10, 42, 30)), pred("L4", box(18, 40, 42, 60)), pred("L5", box(18, 70, 42, 90))]
    above = pred("L2", box(18, -15, 42, 5))       # unannotated L2 above: centroid row -5 < 8
    below = pred("S1", box(18, 95, 42, 115))      # unannotated S1 below: centroid row 105 > 92
    spurious = pred("L4", box(60, 40, 80, 60))    # beside the spine at L4 height
    m = E.evaluate_case(gt_case(), good + [above, below, spurious])
    assert (m.tp, m.fp, m.fn, m.n_ignored_predictions) == (3, 1, 0, 2)


def test_wrong_level_and_off_by_one():
    preds = [pred("L2", box(18, 10, 42, 30)), pred("L5", box(18, 40, 42, 60)), pred("S1", box(18, 70, 42, 90))]
    m = E.evaluate_case(gt_case(), preds)
    assert m.tp == 3 and m.n_identified == 0
    assert m.n_identified_within_1 == 3  # L3->L2, L4->L5, L5->S1: all one off
    preds[1] = pred("L2", box(18, 40, 42, 60))  # L4 called L2: two off
    m = E.evaluate_case(gt_case(), preds)
    assert m.n_identified_within_1 == 2 and m.identification_rate_within_1 == pytest.approx(2 / 3)
    assert E.level_distance("S1", "S2") == 1 and E.level_distance("C7", "T1") == 1
    assert E.level_distance(None, "L1") == math.inf


def test_localisation_error_uses_anisotropic_spacing():
    # polygon centroid (33, 24) vs GT (30, 20): 3 columns x 2.0 mm, 4 rows x 0.5 mm
    preds = [pred("L3", box(21, 14, 45, 34))]
    m = E.evaluate_case(gt_case(spacing=(0.5, 2.0, 1.0)), preds)
    assert m.tp == 1
    assert m.localisation_errors_mm[0] == pytest.approx(math.sqrt(6.0 ** 2 + 2.0 ** 2))
    m = E.evaluate_case(gt_case(), preds, spacing_mm=(1.0, 1.0, 1.0))
    assert m.localisation_errors_mm[0] == pytest.approx(5.0)


def test_slice_tolerance():
    near = pred("L3", box(18, 10, 42, 30), slices=(1.75, 5.25 + 1.5))   # 1.75 mm from slice 5
    far = pred("L4", box(18, 40, 42, 60), slices=(8.0, 9.0))            # 3 mm away
    m = E.evaluate_case(gt_case(), [near, far])
    assert m.tp == 1 and m.missed_levels == ["L4", "L5"] and m.fp == 1
    m = E.evaluate_case(gt_case(spacing=(1.0, 1.0, 0.5)), [near, far])   # 1.5 mm away at 0.5 mm slices
    assert m.tp == 2


def test_ground_truth_from_labels_and_summary():
    lab = np.zeros((60, 40, 9), np.uint8)
    lab[10:20, 10:30, 2:9] = 23   # slices 2..8 -> mid 5
    lab[25:35, 12:28, 0:4] = 24   # slices 0..3 -> median 1.5 -> 2
    lab[21:24, 10:30, :] = 123    # disc: ignored
    gt = E.ground_truth_from_labels(lab, (1.0, 1.0, 3.0), {23: "L4", 24: "L5", 123: "L4-L5"}, "c")
    assert [(v.level, v.mid_slice) for v in gt.vertebrae] == [("L4", 5), ("L5", 2)]
    np.testing.assert_allclose(gt.vertebrae[0].centroid, [19.5, 14.5])
    assert (gt.range_top_row, gt.range_bottom_row) == (10.0, 34.0)
    m1 = E.evaluate_case(gt, [E.PredictedVertebra("L4", np.array([5.0]), [box(9, 9, 31, 21)])])
    m2 = E.evaluate_case(gt_case(), [pred("L3", box(18, 10, 42, 30)), pred("L9", box(60, 40, 80, 60))])
    s = E.summarise([m1, m2])
    assert s["overall"]["n_gt"] == 5 and s["overall"]["tp"] == 2 and s["overall"]["fp"] == 1
    assert s["overall"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["overall"]["recall"] == pytest.approx(0.4) and s["overall"]["identification_rate"] == pytest.approx(0.4)
    assert s["cases"]["c"]["missed_levels"] == ["L5"]
    json.dumps(s)


def test_border_cut_vertebra_is_ignored():
    lab = np.zeros((60, 40, 9), np.uint8)
    lab[0:8, 10:30, 1:8] = 22     # L3 cut by the top of the image
    lab[12:22, 10:30, 1:8] = 23
    gt = E.ground_truth_from_labels(lab, (1.0, 1.0, 1.0), {22: "L3", 23: "L4"})
    assert [v.ignored for v in gt.vertebrae] == [True, False]
    preds = [E.PredictedVertebra("L3", np.array([1.0, 2.0]), [box(9, 0, 31, 9)] * 2),   # far from mid slice 4
             E.PredictedVertebra("L4", np.array([4.0]), [box(9, 11, 31, 23)])]
    m = E.evaluate_case(gt, preds)
    assert (m.n_gt, m.tp, m.fp, m.fn, m.n_ignored_predictions) == (1, 1, 0, 0, 1)


def write_synthetic_case(root, *, ijk_spacing=(0.9, 1.2, 1.0)):
    """A chu-like case stored with i = posterior->anterior, j = superior->inferior, k = right->left."""
    import SimpleITK as sitk

    H, W, S = 70, 50, 12
    canon = np.zeros((H, W, S), np.uint8)
    canon[10:24, 15:40, 2:10] = 22
    canon[28:42, 14:39, 2:10] = 23
    canon[46:60, 13:38, 2:10] = 24
    ijk = canon.transpose(1, 0, 2)[::-1]            # i = W-1-col, j = row, k = slice
    folder = root / "chu" / "syn_01"
    folder.mkdir(parents=True)
    lps_dirs = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], float).T  # columns: i -> +A, j -> -S, k -> +L
    for name, arr in (("labels", ijk), ("image", ijk.astype(np.float32) * 3 + 10)):
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
        img.SetSpacing(ijk_spacing)
        img.SetDirection(lps_dirs.ravel().tolist())
        img.SetOrigin((5.0, -7.0, 11.0))
        sitk.WriteImage(img, str(folder / f"{name}.nii.gz"))
    (folder / "case.json").write_text(json.dumps({"sequence": "T2", "labels": {"22": "L3", "23": "L4", "24": "L5"}}))
    return canon


def test_synthetic_nifti_case_and_vertebrae_json_round_trip(tmp_path):
    canon = write_synthetic_case(tmp_path)
    (case,) = D.list_cases(tmp_path)
    assert (case.case_id, case.source, case.patient_id) == ("syn_01", "chu", "syn_01")
    data = D.load_case(case)
    np.testing.assert_array_equal(data.labels, canon)
    assert data.spacing_mm == pytest.approx((1.2, 0.9, 1.0))
    gt = E.ground_truth_from_labels(data.labels, data.spacing_mm, data.level_names, case.case_id)
    assert [(v.level, v.mid_slice) for v in gt.vertebrae] == [("L3", 6), ("L4", 6), ("L5", 6)]
    # The pipeline's scan of the same file (slab-averaged to ~3.5 mm) and its vertebrae.json.
    arr, affine = D.read_volume(case.path / "image.nii.gz")
    scan = canonical.scan_from_array(arr, affine)
    assert scan.n_slices < 12  # slabs of several native slices
    centre = [float((scan.canonical_to_input_ijk @ [0, 0, t, 1])[2]) for t in range(scan.n_slices)]
    quads = {n: box(c0, r0, c1 - 1, r1 - 1) for n, (r0, r1, c0, c1) in
             {"L3": (10, 24, 15, 40), "L4": (28, 42, 14, 39), "L5": (46, 60, 13, 38)}.items()}
    slabs = list(range(scan.n_slices))
    verts = [Vertebra(slices=slabs, polygons=[quads[n] + [1.0, 0.0]] * len(slabs), level=n) for n in ("L3", "L4", "L5")]
    verts[2].level = "L4"
    path = tmp_path / "vertebrae.json"
    path.write_text(json.dumps(outputs.vertebrae_document(scan, DetectionResult(verts))))
    preds = E.predictions_from_vertebrae_json(path, D.case_geometry(case))
    half = (centre[1] - centre[0]) / 2.0     # one polygon per native slice the slabs cover (issue 14)
    np.testing.assert_allclose(preds[0].slices, np.arange(centre[min(slabs)] - half + 0.5, centre[max(slabs)] + half),
                               atol=1e-3)
    np.testing.assert_allclose(preds[1].polygons[-1], quads["L4"] + [1.0, 0.0], atol=1e-3)
    m = E.evaluate_case(gt, preds)
    assert (m.tp, m.fp, m.fn, m.n_identified, m.n_identified_within_1) == (3, 0, 0, 2, 3)
    assert m.localisation_errors_mm == pytest.approx([0.9] * 3, abs=1e-3)  # one column at 0.9 mm
    doc = json.loads(path.read_text())
    doc["scan"]["shape"] = [1, 2, 3]
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="shape"):
        E.predictions_from_vertebrae_json(path, D.case_geometry(case))


def test_ground_truth_from_discs_only():
    """ivd/ annotates discs only: the bodies between two annotated discs are scored (L2 from L1-L2 and L2-L3)."""
    lab = np.zeros((80, 40, 7), np.uint8)
    lab[10:14, 10:30, 1:6] = 120   # L1-L2
    lab[40:44, 12:32, 2:7] = 121   # L2-L3: the pair overlaps on slices 2..5, largest product on 2
    lab[70:74, 14:34, 0:7] = 122   # L3-L4
    names = {120: "L1-L2", 121: "L2-L3", 122: "L3-L4"}
    gt = E.ground_truth_from_disc_labels(lab, (1.0, 1.0, 3.0), names, "d")
    assert [(v.level, v.mid_slice) for v in gt.vertebrae] == [("L2", 2), ("L3", 2)]
    np.testing.assert_allclose(gt.vertebrae[0].centroid, [(19.5 + 21.5) / 2, (11.5 + 41.5) / 2])
    assert (gt.range_top_row, gt.range_bottom_row) == (11.5, 71.5)
    # A detection of L2 containing that point is a hit; one of L1 above the highest disc is not scored.
    hit = E.PredictedVertebra("L2", np.array([2.0]), [box(8, 16, 34, 38)])
    above = E.PredictedVertebra("L1", np.array([2.0]), [box(8, 0, 34, 9)])
    m = E.evaluate_case(gt, [hit, above])
    assert (m.tp, m.fp, m.fn, m.n_identified, m.n_ignored_predictions) == (1, 0, 1, 1, 1)
    # Each disc's centroid on the slice where its mask is largest scores the outlines around it:
    # the L2 box (rows 16..34) leaves every disc free; one reaching down to row 42 takes in L2-L3.
    assert {k: (s, tuple(c)) for k, (s, c) in gt.disc_points.items()} == {
        "L1-L2": (1, (19.5, 11.5)), "L2-L3": (2, (21.5, 41.5)), "L3-L4": (0, (23.5, 71.5))}
    assert (m.discs_scored, m.disc_points_inside_outlines) == (["L1-L2", "L2-L3", "L3-L4"], [])
    into_disc = E.PredictedVertebra("L2", np.array([2.0]), [box(8, 16, 34, 42)])
    assert E.evaluate_case(gt, [into_disc]).disc_points_inside_outlines == ["L2-L3"]
    elsewhere = E.PredictedVertebra("L2", np.array([5.0]), [box(8, 16, 34, 42)])   # 9 mm away from slice 2
    assert E.evaluate_case(gt, [elsewhere]).disc_points_inside_outlines == []


@needs_data
def test_t12_of_a_clinical_slice_is_the_body_above_its_t12_l1_disc_point():
    """T12 is not annotated on the clinical slices, but the radiologists' T12-L1 disc point pins it: the L1
    point mirrored through it lies inside T12. A body named T12 there is right; one named T12 a body higher
    stands above a T12 the detector missed, its level one too low, though every annotated body is right."""
    case = next(c for c in D.list_cases(DATA, sources=("tianchi",))
                if E.ground_truth_of_case(c).t12_point is not None)
    gt = E.ground_truth_of_case(case)
    l1 = next(v for v in gt.vertebrae if v.level == "L1")
    np.testing.assert_allclose(gt.t12_point, 2 * gt.disc_points["T12-L1"][1] - l1.centroid)
    square = lambda c: np.array([[c[0] + 5, c[1] - 5], [c[0] + 5, c[1] + 5], [c[0] - 5, c[1] + 5],  # noqa: E731
                                 [c[0] - 5, c[1] - 5]])
    bodies = [E.PredictedVertebra(level=v.level, slices=np.array([0.0]), polygons=[square(v.centroid)])
              for v in gt.vertebrae]
    on_t12 = E.PredictedVertebra("T12", np.array([0.0]), [square(gt.t12_point)])
    higher = E.PredictedVertebra("T12", np.array([0.0]), [square(2 * gt.t12_point - l1.centroid)])   # T11's place
    right, missed = E.evaluate_case(gt, bodies + [on_t12]), E.evaluate_case(gt, bodies + [higher])
    assert (right.t12_named, right.t12_named_elsewhere, right.all_levels_right) == (True, False, True)
    assert (missed.t12_named, missed.t12_named_elsewhere, missed.all_levels_right) == (False, True, True)
    assert E.evaluate_case(gt, bodies).t12_named is False and E.evaluate_case(gt, bodies).t12_named_elsewhere is False
    groups = {"right": {"source": "tianchi", "sequence": "T2"}, "missed": {"source": "tianchi", "sequence": "T2"}}
    right.case_id, missed.case_id = "right", "missed"
    summary = E.summarise([right, missed], groups)
    assert (summary["overall"]["t12_point_scans"], summary["overall"]["t12_point_named_t12"]) == (2, 1)
    assert summary["overall"]["t12_named_elsewhere"] == ["missed"]
    (line,) = [line for line in T.level_lines(summary) if line.startswith("T12 above an annotated T12-L1 disc")]
    assert "named T12 1 of 2; another body named T12 on 1: missed" in line
    assert line.endswith("; of them entirely right by the annotated bodies: missed")


def test_s1_below_a_tilted_lumbosacral_disc_mask_is_scored_on_l5s_mid_slice():
    """With disc masks (``ivd/``) S1 is scored as on the clinical slices, at the centre of the body below the
    L5-S1 disc: L5's centre carried across the disc along the disc's own normal, on L5's mid slice."""
    lab = np.zeros((120, 90, 5), np.uint8)
    lab[20:24, 20:60, :] = 123                                  # L4-L5, level
    rows, cols = np.mgrid[0:120, 0:90]
    # L5-S1 tilted by 45 degrees: a band 4 px thick about the line through (x 45, y 60) along (1, -1)
    along, across = ((cols - 45) - (rows - 60)) / np.sqrt(2), ((cols - 45) + (rows - 60)) / np.sqrt(2)
    lab[(np.abs(along) <= 14) & (np.abs(across) <= 2), :] = 124
    names = {123: "L4-L5", 124: "L5-S1"}
    gt = E.ground_truth_from_disc_labels(lab, (1.0, 1.0, 3.0), names, "tilted")
    (l5,) = gt.vertebrae
    disc_centre = np.array([45.0, 60.0])
    distance = np.linalg.norm(l5.centroid - disc_centre)
    np.testing.assert_allclose(gt.s1_point, disc_centre + distance * np.array([1.0, 1.0]) / np.sqrt(2), atol=0.05)
    assert gt.s1_slice == l5.mid_slice
    mirrored = 2 * disc_centre - l5.centroid                 # what the points of a clinical slice give
    assert np.linalg.norm(mirrored - gt.s1_point) > 10        # the disc's tilt, not L5's axis, points to S1
    x, y = gt.s1_point
    on_s1 = E.PredictedVertebra("S1", np.array([float(gt.s1_slice)]), [box(x - 6, y - 6, x + 6, y + 6)])
    m = E.evaluate_case(gt, [on_s1])
    assert (m.s1_detected, m.s1_named, m.fp) == (True, True, 0)   # below the last disc: not a false body
    named_l5 = E.PredictedVertebra("L5", np.array([float(gt.s1_slice)]), [box(x - 6, y - 6, x + 6, y + 6)])
    assert (E.evaluate_case(gt, [named_l5]).s1_detected, E.evaluate_case(gt, [named_l5]).s1_named) == (True, False)
    far_slice = E.PredictedVertebra("S1", np.array([float(gt.s1_slice) + 1.0]), [box(x - 6, y - 6, x + 6, y + 6)])
    assert E.evaluate_case(gt, [far_slice]).s1_detected is False   # 3 mm away: not on S1's slice
    no_l5_s1 = E.ground_truth_from_disc_labels(np.where(lab == 124, 0, lab), (1.0, 1.0, 3.0), names, "no")
    assert no_l5_s1.s1_point is None and E.evaluate_case(no_l5_s1, [on_s1]).s1_detected is None


@needs_data
def test_ground_truth_of_a_real_disc_only_case(real_cases):
    case = real_cases["ivd_11"]
    gt = E.ground_truth_of_case(case)
    assert [v.level for v in gt.vertebrae] == ["L2", "L3", "L4", "L5"]
    labels = D.load_case(case).labels
    for v in gt.vertebrae:  # between its two discs, on a slice where both are annotated
        assert labels[:, :, v.mid_slice].max() > 0
        x, y = (int(round(c)) for c in v.centroid)
        assert labels[y, x, v.mid_slice] == 0  # in the body, not in a disc
    assert gt.range_top_row < gt.vertebrae[0].centroid[1] and gt.vertebrae[-1].centroid[1] < gt.range_bottom_row
    # S1 below the L5-S1 disc: in a body (not a disc), below the disc, within the image
    x, y = (int(round(c)) for c in gt.s1_point)
    assert gt.s1_slice == gt.vertebrae[-1].mid_slice and labels[y, x, gt.s1_slice] == 0
    assert gt.range_bottom_row < y < labels.shape[0]


def test_outlines_on_every_native_slice_interpolated_between_slab_centres():
    """Detection on slabs, outlines on the user's slices: each native slice the vertebra's slabs cover gets
    a polygon, interpolated linearly between the slab centres around it (issue 14)."""
    from SpineNetLib.inputs.canonical import scan_from_array
    from SpineNetLib.outputs.vertebrae import vertebra_polygons_ras

    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = 1.0, -1.0, -1.0, 1.0   # k: R, j: P, i: I; 1 mm
    voxels = np.random.default_rng(0).uniform(0, 100, (24, 120, 120)).astype(np.float32)
    scan = scan_from_array(voxels, affine)
    assert scan.n_slices < 24                                                  # slab-averaged
    lo = np.array([[60.0, 40], [60, 60], [40, 60], [40, 40]])
    hi = lo + [10.0, 0.0]                                                       # 10 px more posterior
    polygons = vertebra_polygons_ras(scan, Vertebra(slices=[1, 3], polygons=[lo, hi]))
    slices = [p["slice"] for p in polygons]
    assert slices == list(range(slices[0], slices[-1] + 1)) and len(slices) > 2 * 24 / scan.n_slices
    corners = np.array([p["corners_ras"] for p in polygons])
    anterior = corners[:, 0, 1]                                                 # A of the first corner
    steps = np.diff(anterior)
    assert np.all(steps >= -1e-6) or np.all(steps <= 1e-6)                      # moves steadily, one way
    assert abs(anterior[0] - anterior[-1]) == pytest.approx(10.0, abs=1e-3)     # by the whole 10 px
    assert len(set(np.round(anterior, 3))) > 3                                  # interpolated, not two steps


@needs_data
def test_own_cases_are_scored_as_the_same_cases_of_the_data_set(tmp_path, capsys):
    """Issue 10's goal is measured on scans outside the project: a folder of one's own annotated cases
    (any folder name, README "Measuring on your own scans") is scored exactly as the same cases under
    their source, outlines and centre points alike; the folder's name is their source."""
    import shutil

    from SpineNetLib.apps import cli

    mine = tmp_path / "mycentre"
    pred = tmp_path / "pred"
    for name, case_id in (("volume_a", "myo_05"), ("slice_b", "tianchi_002-000")):
        source = "myosegmentum" if case_id.startswith("myo") else "tianchi"
        shutil.copytree(DATA / source / case_id, mine / name)
        assert cli.main(["run", str(mine / name / "image.nii.gz"), "-o", str(pred / name), "--quiet",
                         "--no-grade", "--no-preview", "--device", "cpu"]) == 0
        shutil.copytree(pred / name, pred / case_id)
    capsys.readouterr()
    own = E.evaluate_directories(mine, pred)
    known = E.evaluate_directories(DATA, pred, case_ids=["myo_05", "tianchi_002-000"])
    assert set(own["by_source"]) == {"mycentre"} and set(own["cases"]) == {"volume_a", "slice_b"}
    for name, case_id in (("volume_a", "myo_05"), ("slice_b", "tianchi_002-000")):
        # but for S1 below L5, scored only in the data set's volumes that show S1 unannotated (its README says so)
        assert own["cases"][name] == known["cases"][case_id] | {"s1_below_l5": None}
    assert known["cases"]["myo_05"]["s1_below_l5"] is True and known["overall"]["s1_below_l5_scans"] == 1
    assert own["overall"]["s1_point_scans"] == 1   # the slice's points: its S1 is scored as tianchi's are
    # one case folder alone; and the same slice told nothing of its points is scored as outlines
    assert set(E.evaluate_directories(mine / "slice_b", pred)["cases"]) == {"slice_b"}
    meta = json.loads((mine / "slice_b" / "case.json").read_text())
    meta.pop("annotation")
    (mine / "slice_b" / "case.json").write_text(json.dumps(meta))
    assert E.evaluate_directories(mine / "slice_b", pred)["overall"]["s1_point_scans"] == 0
    # scans of one patient, as case.json says: one unit of the intervals
    before = E.evaluate_directories(mine, pred)
    assert before["overall"]["n_patients"] == 2
    for name in ("volume_a", "slice_b"):
        meta = json.loads((mine / name / "case.json").read_text())
        (mine / name / "case.json").write_text(json.dumps({**meta, "patient": "P1"}))
    one = E.evaluate_directories(mine, pred)
    assert one["cases"] == before["cases"] and one["overall"]["n_patients"] == 1
    assert one["overall"]["ci95"]["recall"] == rounded(wilson_interval(1, 1))
    meta = json.loads((mine / "slice_b" / "case.json").read_text())
    (mine / "slice_b" / "case.json").write_text(json.dumps({**meta, "patient": ["P1"]}))
    assert cli.main(["evaluate", "--data", str(mine), "--pred", str(pred)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'patient' must be a name or number" in err[0], err
    (mine / "slice_b" / "case.json").write_text(json.dumps(meta))
    # a case.json without its labels table: one line, exit 2
    (mine / "volume_a" / "case.json").write_text(json.dumps({"sequence": "T2"}))
    assert cli.main(["evaluate", "--data", str(mine), "--pred", str(pred)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no 'labels' table" in err[0], err


def test_level_names_of_segments_as_hospitals_write_them():
    """References come named as Slicer, this project's Slicer module, TotalSegmentator or a radiologist
    name them; the level is read from the name, and a name that names no level is left out."""
    from SpineNetLib.evaluation.own_cases import code_of_level, level_of_name

    assert [level_of_name(n) for n in ("L4", "vertebrae_L4", "L4 vertebra", "t12", "C2", "S1")] == \
        ["L4", "L4", "L4", "T12", "C2", "S1"]
    assert [level_of_name(n) for n in ("L4-L5", "L4/L5", "L4-5", "L5-S1", "T12 - L1", "disc L5/S1")] == \
        ["L4-L5", "L4-L5", "L4-L5", "L5-S1", "T12-L1", "L5-S1"]
    assert [level_of_name(n) for n in ("sacrum", "spinal canal", "Segment_1", "L6", "CL4")] == [None] * 5
    assert [code_of_level(n) for n in ("C1", "T1", "L1", "L5", "S1", "L4-L5", "L5-S1")] == [1, 8, 20, 24, 26, 123, 124]
    with pytest.raises(InputError, match="not neighbours"):
        level_of_name("L3-L5")


def _slicer_segmentation_file(path, image_kji, ijk_to_ras, masks: dict[str, np.ndarray]) -> None:
    """A ``.seg.nrrd`` written by Slicer's own segmentation storage node (slicer-core), cropped to the
    segments' extent as Slicer can save it."""
    from SpineNetLib.slicer import mrml

    scene = mrml.new_scene()
    volume = mrml.add_volume(scene, image_kji, ijk_to_ras, "image")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, mask in masks.items():
        node.AddSegmentFromBinaryLabelmapRepresentation(mrml._oriented_labelmap(mask, ijk_to_ras), name, [1.0, 0.5, 0.0])
    node.GetSegmentation().CollapseBinaryLabelmaps(False)
    node.AddDefaultStorageNode()
    storage = node.GetStorageNode()
    storage.SetCropToMinimumExtent(True)
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1


def _dicom_segmentation_file(path, source_files, masks: dict[str, np.ndarray]) -> None:
    """A DICOM Segmentation (highdicom) of ``[k, j, i]`` masks on a series written one file per ``k``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in source_files]
    algorithm = hd.AlgorithmIdentificationSequence(name="hand", family=codes.DCM.ArtificialIntelligence, version="1")
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=name, segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Vertebra, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        algorithm_identification=algorithm) for n, name in enumerate(masks, start=1)]
    pixels = np.stack(list(masks.values()), axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1")
    seg.save_as(str(path))


@needs_data
def test_own_cases_drawn_in_slicer_or_stored_as_dicom_seg_are_scored_as_the_data_set(tmp_path, capsys):
    """Scans from other centres come as DICOM series with references drawn in 3D Slicer or stored as a
    DICOM Segmentation.  The same real case as (a) a NIfTI scan with a Slicer ``.seg.nrrd`` cropped to
    its segments (no case.json: the segment names say the levels) and (b) a DICOM series with a DICOM
    SEG whose segments are named as TotalSegmentator names them is scored as under its own source."""
    import shutil

    import SimpleITK as sitk

    from SpineNetLib.apps import cli
    from SpineNetLib.inputs.image import image_ijk_to_ras
    from SpineNetLib.inputs.writers import write_dicom_series

    case = DATA / "myosegmentum" / "myo_05"
    image = sitk.ReadImage(str(case / "image.nii.gz"))
    image_kji, ijk_to_ras = sitk.GetArrayFromImage(image), image_ijk_to_ras(image)
    labels_kji = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nii.gz")))
    names = json.loads((case / "case.json").read_text())["labels"]
    masks = {names[str(int(code))]: labels_kji == code for code in np.unique(labels_kji) if code}

    mine, pred = tmp_path / "mycentre", tmp_path / "pred"
    (mine / "drawn_in_slicer").mkdir(parents=True)
    shutil.copy(case / "image.nii.gz", mine / "drawn_in_slicer" / "image.nii.gz")
    _slicer_segmentation_file(mine / "drawn_in_slicer" / "labels.seg.nrrd", image_kji, ijk_to_ras, masks)
    header = (mine / "drawn_in_slicer" / "labels.seg.nrrd").read_bytes()[:2000].decode("latin-1")
    assert "Segment0_Name:=" in header and f"sizes: {' '.join(map(str, image.GetSize()))}" not in header  # cropped
    files = write_dicom_series(image_kji, ijk_to_ras, mine / "from_pacs" / "image", patient_id="CASE2",
                               extra_tags={"PatientName": "Case^Two", "PatientBirthDate": "", "PatientSex": "",
                                           "StudyID": "1", "AccessionNumber": "", "ReferringPhysicianName": "",
                                           "StudyDate": "20260101", "StudyTime": "120000"})
    _dicom_segmentation_file(mine / "from_pacs" / "labels.dcm", files,
                             {f"vertebrae_{n}" if "-" not in n else n.replace("-", "/"): m for n, m in masks.items()})
    (mine / "from_pacs" / "case.json").write_text(json.dumps({"sequence": "water"}))

    assert cli.main(["run", str(case / "image.nii.gz"), "-o", str(pred / "myo_05"), "--quiet", "--no-grade",
                     "--no-preview", "--device", "cpu"]) == 0
    assert cli.main(["run", str(mine / "from_pacs" / "image"), "-o", str(pred / "from_pacs"), "--quiet", "--no-grade",
                     "--no-preview", "--device", "cpu"]) == 0
    shutil.copytree(pred / "myo_05", pred / "drawn_in_slicer")
    capsys.readouterr()
    known = E.evaluate_directories(DATA, pred, case_ids=["myo_05"])["cases"]["myo_05"]
    own = E.evaluate_directories(mine, pred)
    assert set(own["cases"]) == {"drawn_in_slicer", "from_pacs"} and set(own["by_source"]) == {"mycentre"}
    # the DICOM scan's patient is its PatientID; the NIfTI case is its own patient
    from SpineNetLib.evaluation.own_cases import own_case
    assert own_case(mine / "from_pacs").patient_id == "mycentre/CASE2"
    assert own_case(mine / "drawn_in_slicer").patient_id == "mycentre/drawn_in_slicer"
    assert own["overall"]["n_patients"] == 2 and own["warnings"] == []
    assert own["cases"]["drawn_in_slicer"] == known | {"s1_below_l5": None}   # scored in the data set's volumes only
    from_pacs = own["cases"]["from_pacs"]
    assert from_pacs["n_gt"] == known["n_gt"] >= 5 and from_pacs["all_levels_right"] == known["all_levels_right"]
    assert from_pacs["tp"] == known["tp"] and from_pacs["fp"] == known["fp"]
    assert own["by_sequence"]["water"]["n_cases"] == 1
    # the same outlines read from the SEG as from the label map, on the scan's own voxels
    from SpineNetLib.evaluation.own_cases import load_own_case
    from SpineNetLib.training.datasets import load_case

    # one command for the whole folder (README): spinenet run on each case without a prediction, then the scores
    capsys.readouterr()
    assert cli.main(["evaluate", "--data", str(mine), "--pred", str(tmp_path / "ran"), "--run", "--threads", "2",
                     "-o", str(tmp_path / "metrics.json")]) == 0
    printed = capsys.readouterr()
    assert "spinenet run on drawn_in_slicer (1 of 2)" in printed.err and "spinenet run on from_pacs (2 of 2)" in printed.err
    ran = json.loads((tmp_path / "metrics.json").read_text())
    assert ran["cases"] == own["cases"] and not ran["missing_predictions"]
    assert cli.main(["evaluate", "--data", str(mine), "--pred", str(pred), "--threads", "2"]) == 2   # --run only
    assert "apply with --run only" in capsys.readouterr().err
    assert cli.main(["evaluate", "--data", str(mine), "--pred", str(tmp_path / "none"), "--run",
                     "--weights", str(tmp_path / "no_weights")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"spinenet: error: spinenet run failed on drawn_in_slicer: weights folder not found: {tmp_path / 'no_weights'}"
    reference = load_case(D.RealCase("myo_05", "myosegmentum", "myo_05", "", case)).labels
    for name in ("drawn_in_slicer", "from_pacs"):
        data, _ = load_own_case(D.RealCase(name, "mycentre", name, "", mine / name))
        assert np.array_equal(data.labels, reference)
    # an export with a second sagittal series beside the annotated one: case.json's series names the one to read,
    # for the scoring and for --run alike; without it the case is refused in one line
    two = tmp_path / "two_series"
    shutil.copytree(mine / "from_pacs", two / "from_pacs")
    write_dicom_series(image_kji, ijk_to_ras, two / "from_pacs" / "image", file_prefix="T1_", series_description="T1 SAG",
                       patient_id="CASE2")
    capsys.readouterr()
    assert cli.main(["evaluate", "--data", str(two), "--pred", str(tmp_path / "ran2"), "--run"]) == 2
    assert "2 sagittal series" in capsys.readouterr().err
    import pydicom

    annotated = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    (two / "from_pacs" / "case.json").write_text(json.dumps({"sequence": "water", "series": annotated}))
    assert cli.main(["evaluate", "--data", str(two), "--pred", str(tmp_path / "ran2"), "--run",
                     "-o", str(tmp_path / "metrics2.json")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "metrics2.json").read_text())["cases"]["from_pacs"] == own["cases"]["from_pacs"]
    (two / "from_pacs" / "case.json").write_text(json.dumps({"series": ["5"]}))
    assert cli.main(["evaluate", "--data", str(two), "--pred", str(tmp_path / "ran2")]) == 2
    assert "'series' must be a SeriesInstanceUID" in capsys.readouterr().err
    # an export that gave three scans one PatientID: the command says which cases count as one patient
    for copy in ("from_pacs_2", "from_pacs_3"):
        shutil.copytree(mine / "from_pacs", mine / copy)
        shutil.copytree(pred / "from_pacs", pred / copy)
    capsys.readouterr()
    assert cli.main(["evaluate", "--data", str(mine), "--pred", str(pred)]) == 0
    printed = capsys.readouterr()
    assert "scans of 2 patients" in printed.out
    assert ("spinenet evaluate: warning: 3 cases of mycentre (from_pacs, from_pacs_2, from_pacs_3) share the DICOM "
            "PatientID 'CASE2' and count as one patient") in printed.err


def test_a_slicer_segmentation_with_overlapping_segments_and_bad_references(tmp_path, capsys):
    """Where segments overlap Slicer saves several label layers (a 4D ``.seg.nrrd``): each level is read
    from its own layer, the later segment keeping a voxel both claim, and segments naming no level are
    left out.  A reference that names a level twice, or none, stops ``spinenet evaluate`` with one line."""
    from SpineNetLib.apps import cli
    from SpineNetLib.evaluation.own_cases import reference_codes

    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    ijk_to_ras[:3, 3] = [10.0, 20.0, 30.0]
    image = np.zeros((6, 40, 30), np.int16)
    body, disc, muscle = (np.zeros(image.shape, bool) for _ in range(3))
    body[1:4, 5:15, 5:20] = True
    disc[2:5, 12:25, 8:22] = True     # overlaps the body
    muscle[0:2, 30:38, 2:6] = True
    path = tmp_path / "labels.seg.nrrd"
    _slicer_segmentation_file(path, image, ijk_to_ras, {"L4": body, "L4-L5": disc, "psoas": muscle})
    assert b"dimension: 4" in path.read_bytes()[:400]
    codes, names = reference_codes(path, {}, ijk_to_ras, image.shape[::-1])
    assert names == {23: "L4", 123: "L4-L5"}
    assert np.array_equal(codes == 123, disc) and np.array_equal(codes == 23, body & ~disc) and not codes[muscle].any()

    case = tmp_path / "mine" / "case_1"
    case.mkdir(parents=True)
    from SpineNetLib.inputs.writers import write_image
    write_image(image.astype(np.float32) + np.arange(30, dtype=np.float32), ijk_to_ras, case / "image.nii.gz")
    (tmp_path / "pred" / "case_1").mkdir(parents=True)   # the reference is read before the prediction
    (tmp_path / "pred" / "case_1" / "vertebrae.json").write_text(json.dumps({"schema": "spinenet.vertebrae/1"}))
    elsewhere = ijk_to_ras.copy()
    elsewhere[:3, 3] += 500.0   # the segmentation of another scan, half a metre away
    for masks, affine, message in (({"L4": body, "vertebra L4": disc}, ijk_to_ras, "two segments or points name L4"),
                                   ({"psoas": muscle}, ijk_to_ras, "no segment or label names a vertebra"),
                                   ({"L4": body}, elsewhere, "is it the reference of another scan?")):
        _slicer_segmentation_file(case / "labels.seg.nrrd", image, affine, masks)
        assert cli.main(["evaluate", "--data", str(tmp_path / "mine"), "--pred", str(tmp_path / "pred")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    # a DICOM file that is no Segmentation (an MR image) given as labels.dcm
    from SpineNetLib.inputs.writers import write_dicom_series

    (case / "labels.seg.nrrd").unlink()
    write_dicom_series(image, ijk_to_ras, tmp_path / "mr")[0].rename(case / "labels.dcm")
    assert cli.main(["evaluate", "--data", str(tmp_path / "mine"), "--pred", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "as a DICOM Segmentation" in err[0], err


@needs_data
def test_own_case_marked_with_slicer_points_is_scored_as_the_clinical_slice(tmp_path, capsys):
    """The quickest reference to make in Slicer: a point in each body (and disc) placed with the Markups
    module and saved as ``labels.mrk.json``, labelled by level.  A real clinical slice whose radiologist
    points are given that way is scored as the same slice of ``tianchi/`` (points drawn as 3 mm disks)."""
    import shutil

    import SimpleITK as sitk
    import vtk

    from SpineNetLib.apps import cli
    from SpineNetLib.inputs.image import image_ijk_to_ras
    from SpineNetLib.slicer import mrml

    case = DATA / "tianchi" / "tianchi_002-000"
    labels = sitk.ReadImage(str(case / "labels.nii.gz"))
    labels_kji, ijk_to_ras = sitk.GetArrayFromImage(labels), image_ijk_to_ras(labels)
    names = json.loads((case / "case.json").read_text())["labels"]
    scene = mrml.new_scene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "reference points")
    for code in np.unique(labels_kji)[1:]:
        k, j, i = (float(np.mean(axis)) for axis in np.nonzero(labels_kji == code))
        r, a, s, _ = ijk_to_ras @ np.array([i, j, k, 1.0])
        node.AddControlPoint(vtk.vtkVector3d(r, a, s), names[str(int(code))].replace(" disc", "").replace("-", "/"))
    mine = tmp_path / "mine" / "clicked"
    mine.mkdir(parents=True)
    shutil.copy(case / "image.nii.gz", mine / "image.nii.gz")
    node.AddDefaultStorageNode()
    node.GetStorageNode().SetFileName(str(mine / "labels.mrk.json"))
    assert node.GetStorageNode().WriteData(node) == 1
    assert '"coordinateSystem": "LPS"' in (mine / "labels.mrk.json").read_text()

    pred = tmp_path / "pred"
    assert cli.main(["run", str(case / "image.nii.gz"), "-o", str(pred / case.name), "--quiet", "--no-grade",
                     "--no-preview", "--device", "cpu"]) == 0
    shutil.copytree(pred / case.name, pred / "clicked")
    known = E.evaluate_directories(DATA, pred, case_ids=[case.name])["cases"][case.name]
    own = E.evaluate_directories(tmp_path / "mine", pred)
    clicked = own["cases"]["clicked"]
    assert own["overall"]["s1_point_scans"] == 1        # scored as points: S1 from the L5 and L5-S1 points
    for key in ("n_gt", "tp", "fp", "fn", "all_levels_right", "level_shift", "missed_levels", "wrong_levels",
                "s1_detected", "s1_named", "discs_scored", "disc_points_inside_outlines"):
        assert clicked[key] == known[key], key
    assert clicked["localisation_error_mm_mean"] == pytest.approx(known["localisation_error_mm_mean"], abs=0.3)
    # a point off the scan is one line naming it
    doc = json.loads((mine / "labels.mrk.json").read_text())
    doc["markups"][0]["controlPoints"][0]["position"] = [900.0, 900.0, 900.0]
    (mine / "labels.mrk.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert cli.main(["evaluate", "--data", str(tmp_path / "mine"), "--pred", str(pred)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lies outside the scan" in err[0], err


def test_s1_below_an_annotated_l5_is_scored_where_the_volume_shows_it_whole():
    """chu/ and myosegmentum/ show S1 without annotating it: the next predicted body below L5 must be named S1,
    none there counts as missed, and where the image ends before S1's foot it is not scored."""
    def box(level, row):
        return E.PredictedVertebra(level=level, slices=np.array([0.0]),
                                   polygons=[np.array([[60, row - 10], [60, row + 10], [40, row + 10], [40, row - 10]],
                                                      float)])

    def truth(rows):
        return E.CaseGroundTruth(case_id="c", spacing_mm=(1.0, 1.0, 1.0), s1_shown_not_annotated=True,
                                 image_rows=rows, vertebrae=[E.GroundTruthVertebra("L4", 0, np.array([50.0, 100.0])),
                                                             E.GroundTruthVertebra("L5", 0, np.array([50.0, 130.0]))])

    chain = [box("L4", 100), box("L5", 130)]
    assert E.evaluate_case(truth(220), chain + [box("S1", 158)]).s1_below_l5 is True
    assert E.evaluate_case(truth(220), chain + [box("L5", 158)]).s1_below_l5 is False    # named otherwise
    assert E.evaluate_case(truth(220), chain).s1_below_l5 is False                     # not found
    assert E.evaluate_case(truth(220), chain + [box("S1", 200)]).s1_below_l5 is False  # 2.3 steps down: not next
    # one step below L5 is row 160, S1's foot 0.35 steps further (170.5): an image of 170 rows may cut it
    assert E.evaluate_case(truth(170), chain + [box("S1", 158)]).s1_below_l5 is None
    assert E.evaluate_case(truth(172), chain + [box("S1", 158)]).s1_below_l5 is True
    assert E.evaluate_case(truth(172), chain + [box("S1", 158)]).s1_cut_below_l5 is None    # whole: scored above
    summary = E.summarise([E.evaluate_case(truth(220), chain + [box("S1", 158)]), E.evaluate_case(truth(220), chain)])
    assert (summary["overall"]["s1_below_l5_scans"], summary["overall"]["s1_below_l5_named_s1"]) == (2, 1)
    assert summary["overall"]["s1_cut_below_l5_scans"] == 0


def test_s1_cut_by_the_image_below_its_centre_is_scored_apart():
    """Most myosegmentum volumes end inside S1: where the image shows S1's centre (one L4-L5 step below L5's)
    but not its foot, the next body below L5 is scored as S1 on its own line, not with the whole ones; where
    even its centre is cut off, not at all."""
    def box(level, row):
        return E.PredictedVertebra(level=level, slices=np.array([0.0]),
                                   polygons=[np.array([[60, row - 10], [60, row + 10], [40, row + 10], [40, row - 10]],
                                                      float)])

    def truth(rows):
        return E.CaseGroundTruth(case_id=f"rows{rows}", spacing_mm=(1.0, 1.0, 1.0), s1_shown_not_annotated=True,
                                 image_rows=rows, vertebrae=[E.GroundTruthVertebra("L4", 0, np.array([50.0, 100.0])),
                                                             E.GroundTruthVertebra("L5", 0, np.array([50.0, 130.0]))])

    chain = [box("L4", 100), box("L5", 130)]
    named = E.evaluate_case(truth(165), chain + [box("S1", 158)])       # S1's centre (row 160) in view, foot cut
    assert (named.s1_below_l5, named.s1_cut_below_l5) == (None, True)
    assert E.evaluate_case(truth(165), chain).s1_cut_below_l5 is False                   # not found
    assert E.evaluate_case(truth(165), chain + [box("L5", 158)]).s1_cut_below_l5 is False  # named otherwise
    assert E.evaluate_case(truth(160), chain + [box("S1", 152)]).s1_cut_below_l5 is None   # its centre on the edge
    summary = E.summarise([named, E.evaluate_case(truth(165), chain), E.evaluate_case(truth(220), chain)])
    overall = summary["overall"]
    assert (overall["s1_cut_below_l5_scans"], overall["s1_cut_below_l5_named_s1"]) == (2, 1)
    assert overall["s1_cut_below_l5_not_named"] == ["rows165"] and overall["s1_below_l5_scans"] == 1
    assert "whose image cuts S1 below its centre" in "\n".join(T.level_lines(summary))
