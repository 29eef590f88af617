"""Radiological measurements (SpineNetLib.discs.measurements) against phantoms of known geometry.

The phantom's ground truth (SpineNetLib.synthetic.phantom) gives body and disc heights
along each segment's bisector, the slip of "slip" pathology (6.0 mm along the
disc), the wedge of each body and disc (from the tables), so every number is
checked to 0.5 mm / 1 degree using the ground-truth quads as detections, on
anisotropic pixels and a tilted patient as well.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from SpineNetLib.discs.measurements import LISTHESIS_THRESHOLD_MM, genant_grade, measure_spine, meyerding_grade
from SpineNetLib.synthetic.phantom import BODY_TABLE, DISC_TABLE, NARROW_DISC_FACTOR, SLIP_MM, make_phantom
from SpineNetLib.core.results import Vertebra

MM, DEG = 0.5, 1.0

CASES = {
    "normal": dict(),
    "tilted_anisotropic": dict(rotation_deg=-18.0, pixel_spacing=(0.9, 1.4), shape=(340, 220)),
    "slip": dict(pathology={"L4": ["slip"]}),
    "wedge": dict(pathology={"L1": ["wedge_fracture"]}),
    "narrow": dict(pathology={"L4-L5": ["narrow_disc"]}),
    "dark": dict(pathology={"L4-L5": ["dark_disc"]}),
}


def build(kind: str):
    kw = dict(fov="lumbar", shape=(200, 200), pixel_spacing=(1.5, 1.5), n_slices=5)
    kw.update(CASES[kind])
    phantom = make_phantom(**kw)
    vertebrae = [Vertebra(slices=list(v.slices), polygons=[v.quads[s] for s in v.slices], level=v.level)
                 for v in phantom.vertebrae if not v.extra]
    return phantom, measure_spine(phantom.scan, vertebrae)


@pytest.fixture(scope="module")
def measured():
    return {kind: build(kind) for kind in CASES}


def mean_length(level: str) -> float:
    _, l1, l2, _, _ = BODY_TABLE[level]
    return 0.5 * (l1 + l2)


def body_wedge_deg(v) -> float:
    """Ground-truth wedge of a phantom body (phantom._segment: sin(w/2) = (Ha - Hp) / (2 * mean length))."""
    return 2 * math.degrees(math.asin((v.anterior_height_mm - v.posterior_height_mm) / (2 * mean_length(v.level))))


def disc_wedge_deg(d) -> float:
    depth = 0.5 * (BODY_TABLE[d.upper][2] + BODY_TABLE[d.lower][1])
    return 2 * math.degrees(math.asin((d.anterior_height_mm - d.posterior_height_mm) / (2 * depth)))


@pytest.mark.parametrize("kind", list(CASES))
def test_body_and_disc_heights_match_the_phantom(measured, kind):
    phantom, m = measured[kind]
    assert [v.level for v in m.vertebrae] == phantom.levels
    for vm, gt in zip(m.vertebrae, phantom.vertebrae):
        assert vm.anterior_height_mm == pytest.approx(gt.anterior_height_mm, abs=MM)
        assert vm.posterior_height_mm == pytest.approx(gt.posterior_height_mm, abs=MM)
        assert vm.middle_height_mm == pytest.approx(gt.height_mm, abs=MM)
        assert vm.wedge_ratio == pytest.approx(gt.anterior_height_mm / gt.posterior_height_mm, abs=0.02)
    assert [d.level for d in m.discs] == [d.name for d in phantom.discs]
    for dm, gt in zip(m.discs, phantom.discs):
        assert dm.anterior_height_mm == pytest.approx(gt.anterior_height_mm, abs=MM)
        assert dm.posterior_height_mm == pytest.approx(gt.posterior_height_mm, abs=MM)
        mid = 0.5 * (gt.anterior_height_mm + gt.posterior_height_mm)  # the phantom's disc axis length
        assert dm.middle_height_mm == pytest.approx(mid, abs=MM)
        assert dm.mean_height_mm == pytest.approx(mid, abs=MM)
        assert np.allclose(dm.centre_xy, gt.centre_xy, atol=0.05)


@pytest.mark.parametrize("kind", list(CASES))
def test_segmental_angles_and_lordosis_match_the_phantom(measured, kind):
    phantom, m = measured[kind]
    for dm, gt in zip(m.discs, phantom.discs):
        disc = disc_wedge_deg(gt)
        assert dm.disc_angle_deg == pytest.approx(disc, abs=DEG)
        assert dm.segmental_angle_deg == pytest.approx(body_wedge_deg(phantom.vertebra(gt.upper)) + disc, abs=DEG)
    lumbar = [phantom.vertebra(level) for level in ("L1", "L2", "L3", "L4", "L5")]
    lordosis = sum(body_wedge_deg(v) for v in lumbar) + sum(
        disc_wedge_deg(d) for d in phantom.discs if d.upper in ("L1", "L2", "L3", "L4", "L5"))
    assert m.lumbar_lordosis_deg == pytest.approx(lordosis, abs=DEG)
    assert 40 < m.lumbar_lordosis_deg < 70 or kind == "wedge"


@pytest.mark.parametrize("kind", ["normal", "tilted_anisotropic", "slip"])
def test_slip_and_meyerding_grade(measured, kind):
    phantom, m = measured[kind]
    for dm, gt in zip(m.discs, phantom.discs):
        # Posterior corners line up except where the endplate lengths differ (S1 is 3 mm deeper than L5).
        offset = 0.5 * (BODY_TABLE[gt.lower][1] - BODY_TABLE[gt.upper][2])
        expected = offset + (SLIP_MM if "slip" in gt.pathology else 0.0)
        assert dm.slip_mm == pytest.approx(expected, abs=MM), gt.name
        assert dm.slip_percent == pytest.approx(100 * expected / BODY_TABLE[gt.lower][1], abs=1.5)
        assert dm.meyerding_grade == (1 if "slip" in gt.pathology else 0)
    l4l5 = next(d for d in m.discs if d.level == "L4-L5")
    if kind == "slip":
        assert l4l5.slip_mm > LISTHESIS_THRESHOLD_MM and l4l5.slip_percent == pytest.approx(15.8, abs=0.5)


def test_wedge_fracture_is_graded_by_genant(measured):
    phantom, m = measured["wedge"]
    grades = {v.level: v.genant_grade for v in m.vertebrae}
    assert grades["L1"] == 2 and sum(grades.values()) == 2
    l1 = next(v for v in m.vertebrae if v.level == "L1")
    assert l1.height_reduction_percent == pytest.approx(
        100 * (1 - l1.anterior_height_mm / l1.posterior_height_mm), abs=0.1)
    assert 25 < l1.height_reduction_percent < 40 and l1.wedge_ratio < 0.7
    assert l1.biconcavity_ratio == pytest.approx(l1.middle_height_mm / l1.posterior_height_mm)
    normal = {v.level: v.genant_grade for v in measured["normal"][1].vertebrae}
    assert set(normal.values()) == {0}


def test_narrowed_disc_and_its_height_index(measured):
    normal = {d.level: d for d in measured["normal"][1].discs}
    narrow = {d.level: d for d in measured["narrow"][1].discs}
    ha, hp = DISC_TABLE["L4-L5"]
    assert narrow["L4-L5"].anterior_height_mm == pytest.approx(ha * NARROW_DISC_FACTOR, abs=MM)
    assert narrow["L4-L5"].posterior_height_mm == pytest.approx(hp * NARROW_DISC_FACTOR, abs=MM)
    assert narrow["L4-L5"].disc_height_index == pytest.approx(NARROW_DISC_FACTOR * normal["L4-L5"].disc_height_index,
                                                              rel=0.02)
    body = 0.5 * (BODY_TABLE["L4"][0] + BODY_TABLE["L5"][0])
    assert normal["L4-L5"].disc_height_index == pytest.approx(0.5 * (ha + hp) / body, abs=0.02)
    assert normal["L4-L5"].farfan_index == pytest.approx((ha + hp) / 38.0, abs=0.02)
    assert narrow["L3-L4"].disc_height_index == pytest.approx(normal["L3-L4"].disc_height_index, abs=1e-6)


def test_disc_signal_ratio_separates_a_dark_disc(measured):
    normal = {d.level: d.signal_ratio for d in measured["normal"][1].discs}
    dark = {d.level: d.signal_ratio for d in measured["dark"][1].discs}
    assert all(r > 1.5 for r in normal.values())  # hydrated nucleus brighter than marrow on T2
    assert dark["L4-L5"] < 0.8
    assert dark["L3-L4"] == pytest.approx(normal["L3-L4"], abs=0.1)


def test_grade_boundaries():
    assert [genant_grade(r) for r in (0.0, 0.199, 0.20, 0.249, 0.25, 0.40, 0.401, 0.9)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert meyerding_grade(2.9, 0.2) == 0                  # under 3 mm: no listhesis
    assert [meyerding_grade(10.0, f) for f in (0.1, 0.25, 0.5, 0.75, 1.0, 1.01)] == [1, 2, 3, 4, 4, 5]
    assert meyerding_grade(-8.0, -0.3) == 2                # retrolisthesis graded by its size


def test_impossible_disc_heights_are_flagged_in_the_outputs():
    """Overlapping outlines give a negative disc height, a missed body a 40 mm "disc": both are said,
    in discs.json, discs.csv and the run's warnings, instead of being reported as findings."""
    from SpineNetLib.discs.measurements import disc_measurement_warnings
    from SpineNetLib.outputs.discs import discs_csv_text, discs_document

    scan = make_phantom(fov="lumbar", n_slices=3, seed=1).scan
    row_mm, col_mm = scan.spacing_mm[:2]

    def _body(x0, x1, y0, y1):
        """A box body on slice 1, in mm from the image corner: x anterior -> posterior, y down."""
        x0, x1, y0, y1 = x0 / col_mm, x1 / col_mm, y0 / row_mm, y1 / row_mm
        quad = np.array([[x1, y0], [x1, y1], [x0, y1], [x0, y0]], float)      # rt, rb, lb, lt
        return Vertebra(slices=[1], polygons=[quad])

    upper, lower = _body(60, 100, 30, 60), _body(60, 100, 55, 80)   # overlapping by 5 mm
    m = measure_spine(scan, [upper, lower])
    (disc,) = m.discs
    assert disc.anterior_height_mm < 0
    problems = disc_measurement_warnings(disc)
    assert problems and all("negative" in p for p in problems)
    doc = discs_document(scan, [upper, lower], [], None, m, {"status": "not run"})
    assert doc["discs"][0]["measurement_warnings"] == problems
    assert "negative" in discs_csv_text(doc).splitlines()[1]
    far = measure_spine(scan, [upper, _body(60, 100, 100, 125)])
    assert any("probably missed" in p for p in disc_measurement_warnings(far.discs[0]))
    normal = measure_spine(scan, [upper, _body(60, 100, 70, 95)])
    assert disc_measurement_warnings(normal.discs[0]) == []


@pytest.mark.parametrize("gap_mm, level_above, warned", [
    (2.0, "L5", True),     # S1's outline up against L5: the L5-S1 measurements need a look at S1 first
    (8.0, "L5", False),    # an ordinary L5-S1 disc
    (2.0, "L3", False),    # a thin disc elsewhere is a finding, not an S1 outline to check
])
def test_a_thin_disc_above_s1_asks_to_check_s1s_outline(gap_mm, level_above, warned):
    """The bundled detector's S1 outline often takes in part of the L5-S1 disc (model card, "Outlines
    around the discs"): a disc above S1 under 3 mm high in front or in the middle says so, once."""
    from SpineNetLib.discs.measurements import S1_OUTLINE_CHECK_HEIGHT_MM, disc_measurement_warnings

    scan = make_phantom(fov="lumbar", n_slices=3, seed=1).scan
    row_mm, col_mm = scan.spacing_mm[:2]

    def _body(y0, y1, level):
        """A 40 mm deep box body on slice 1, y in mm from the image top."""
        x0, x1, y0, y1 = 60 / col_mm, 100 / col_mm, y0 / row_mm, y1 / row_mm
        return Vertebra(slices=[1], polygons=[np.array([[x1, y0], [x1, y1], [x0, y1], [x0, y0]], float)],
                        level=level)

    below = "S1" if level_above == "L5" else "L4"
    (disc,) = measure_spine(scan, [_body(30, 60, level_above), _body(60 + gap_mm, 90, below)]).discs
    assert disc.middle_height_mm == pytest.approx(gap_mm, abs=0.01)
    lines = disc_measurement_warnings(disc)
    assert len(lines) == int(warned)
    if warned:
        assert gap_mm < S1_OUTLINE_CHECK_HEIGHT_MM
        assert lines[0].startswith(f"L5-S1 anterior disc height {gap_mm:.1f} mm") and "check S1" in lines[0]


@pytest.mark.parametrize("spacing_factor, warned", [(1.0, None), (0.6, "under"), (1.6, "over"), (0.8, None),
                                                   (1.3, None)])
def test_lumbar_bodies_of_an_implausible_size_say_to_check_the_pixel_spacing(spacing_factor, warned):
    """The phantom's textbook lumbar bodies (25-27 mm high) measured with its pixel spacing scaled as a
    wrong header would scale it: 0.6 and 1.6 times put them outside the adult range and the line says
    so with the spacing it used; 0.8 and 1.3 times stay inside (the range is a factor 1.43 either way)."""
    from SpineNetLib.discs.measurements import LUMBAR_BODY_HEIGHT_RANGE_MM, lumbar_body_size_warning

    phantom, _ = build("normal")
    row_mm = phantom.scan.spacing_mm[0]
    scan = replace_spacing(phantom.scan, spacing_factor)
    vertebrae = [Vertebra(slices=list(v.slices), polygons=[v.quads[s] for s in v.slices], level=v.level)
                 for v in phantom.vertebrae if not v.extra]
    line = lumbar_body_size_warning(measure_spine(scan, vertebrae), scan.spacing_mm)
    if warned is None:
        assert line is None
    else:
        assert line is not None and warned in line and f"{row_mm * spacing_factor:.3g} x" in line
        low, high = LUMBAR_BODY_HEIGHT_RANGE_MM
        assert f"{low:.1f}-{high:.1f} mm" in line


def test_the_body_size_check_needs_three_lumbar_bodies():
    """Two lumbar bodies, or thoracic ones however small, say nothing: too little to judge a spacing by."""
    from SpineNetLib.discs.measurements import lumbar_body_size_warning

    phantom, _ = build("normal")
    tiny = replace_spacing(phantom.scan, 0.3)
    lumbar = [v for v in phantom.vertebrae if not v.extra and v.level in ("L1", "L2")]
    thoracic = [v for v in phantom.vertebrae if not v.extra and v.level.startswith("T")]
    for bodies in (lumbar, thoracic):
        vertebrae = [Vertebra(slices=list(v.slices), polygons=[v.quads[s] for s in v.slices], level=v.level)
                     for v in bodies]
        assert lumbar_body_size_warning(measure_spine(tiny, vertebrae), tiny.spacing_mm) is None


def replace_spacing(scan, factor: float):
    from dataclasses import replace as replaced

    row_mm, col_mm, slice_mm = scan.spacing_mm
    return replaced(scan, spacing_mm=(row_mm * factor, col_mm * factor, slice_mm))


def test_the_rough_outline_line_is_told_apart_from_the_other_height_lines():
    """``benchmarks/validate_bundled.py`` counts the discs that the rough-outline line marks: the line is told apart
    from the other lines of a disc (an overlap, a thin disc above S1) in both its wordings (one rough body, two)."""
    from SpineNetLib.discs.measurements import disc_height_warnings, is_rougher_outline_warning

    other = disc_height_warnings("L5-S1", -1.0, 2.0, 6.0, 2.3)
    assert other and not any(is_rougher_outline_warning(line) for line in other)
    for rough in (["L5"], ["L5", "S1"]):
        lines = disc_height_warnings("L5-S1", -1.0, 2.0, 6.0, 2.3, rough)
        assert [is_rougher_outline_warning(line) for line in lines] == [False] * len(other) + [True]
        assert " and ".join(rough) in lines[-1]
