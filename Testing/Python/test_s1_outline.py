"""S1's outline from a second detector (``detect/s1_outline.py``): what a user relies on.

The main detector's S1 outline reaching into the L5-S1 disc is the bundled detector's known fault
(MODEL_CARD.md, "S1's outline"); these tests reproduce it exactly with ground-truth stand-in
detectors on a phantom (``oracles.py``) and check that the second detector fixes the outline of S1
and touches nothing else: not the bodies, not their levels, not the official profile.
"""

from __future__ import annotations

import numpy as np
import pytest

from SpineNetLib import pipeline
from SpineNetLib.detect import s1_outline
from SpineNetLib.synthetic.phantom import make_phantom
from SpineNetLib.training.targets import oracle_predictor

from oracles import oracle_networks

#: How far the faulty S1's upper corners reach up into the L5-S1 disc, in pixels.
REACH_PX = 6.0


@pytest.fixture(scope="module")
def phantom():
    # few, central slices: every body is on every slice
    return make_phantom(fov="lumbar", n_slices=5, slice_thickness_mm=3.0, seed=4)


def _quads(phantom, s1_reach_px: float = 0.0, with_s1: bool = True, missing: tuple[str, ...] = ()
           ) -> dict[int, np.ndarray]:
    """Ground-truth quads per slice but those of the ``missing`` levels (and S1 unless ``with_s1``); S1's
    upper corners (rt, lt) moved up by ``s1_reach_px``."""
    by_slice: dict[int, list] = {}
    for v in phantom.vertebrae:
        if v.extra or (v.level == "S1" and not with_s1) or v.level in missing:
            continue
        for s, q in v.quads.items():
            q = np.array(q, float)
            if v.level == "S1":
                q[[0, 3], 1] -= s1_reach_px
            by_slice.setdefault(s, []).append(q)
    return {s: np.stack(q) for s, q in by_slice.items()}


def _run(phantom, second_detector, profile: str | None = None) -> pipeline.RunResult:
    networks = oracle_networks(phantom)
    networks.predictor = oracle_predictor(_quads(phantom, REACH_PX))   # the main detector, with the fault
    networks.s1_outline = second_detector
    return pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False, profile=profile))


def _truth_quads(phantom, level: str) -> list[np.ndarray]:
    return [np.array(q) for q in next(v for v in phantom.vertebrae if v.level == level and not v.extra).quads.values()]


def _truth(phantom, level: str, slice_index: int) -> np.ndarray:
    return np.array(next(v for v in phantom.vertebrae if v.level == level and not v.extra).quads[slice_index])


def test_s1_takes_the_second_detectors_outline_and_nothing_else_changes(phantom):
    plain = _run(phantom, None)
    refined = _run(phantom, oracle_predictor(_quads(phantom)))
    levels = [v.level for v in plain.detection.vertebrae]
    assert "S1" in levels and [v.level for v in refined.detection.vertebrae] == levels
    assert refined.detection.labelling["s1_outline_from_second_detector"] is True
    assert "s1_outline_from_second_detector" not in plain.detection.labelling
    assert refined.vertebrae_document["labelling"]["s1_outline_from_second_detector"] is True
    for key in ("needs_review", "warnings", "margin_nats"):   # the review checks ran on the main outline
        assert refined.vertebrae_document["labelling"][key] == plain.vertebrae_document["labelling"][key]
    for before, after in zip(plain.detection.vertebrae, refined.detection.vertebrae):
        assert after.slices == before.slices
        for s, p_before, p_after in zip(before.slices, before.polygons, after.polygons):
            truth = _truth(phantom, before.level, s)
            if before.level == "S1":   # the fault, then mended
                assert np.abs(p_before[[0, 3], 1] - (truth[[0, 3], 1] - REACH_PX)).max() < 1.0
                assert np.abs(p_after - truth).max() < 1.0
            else:
                np.testing.assert_array_equal(p_after, p_before)


def test_s1_keeps_its_outline_when_the_second_detector_finds_nothing_there(phantom):
    plain = _run(phantom, None)
    kept = _run(phantom, oracle_predictor(_quads(phantom, with_s1=False)))
    assert kept.detection.labelling["s1_outline_from_second_detector"] is False
    for before, after in zip(plain.detection.vertebrae, kept.detection.vertebrae):
        assert after.level == before.level
        for p_before, p_after in zip(before.polygons, after.polygons):
            np.testing.assert_array_equal(p_after, p_before)


def test_the_official_profile_never_uses_a_second_detector(phantom):
    def must_not_run(patches, boxes):
        raise AssertionError("the official profile ran the S1-outline detector")

    official = _run(phantom, must_not_run, profile="official")
    assert "s1_outline_from_second_detector" not in official.detection.labelling
    assert "S1" in [v.level for v in official.detection.vertebrae]


def test_a_weights_folder_with_s1_outline_pt_loads_it_as_a_detector(tmp_path):
    import shutil

    from SpineNetLib.detect.vfr import network_predictor
    from SpineNetLib.weights.resolve import BUNDLED_DIR

    for name in ("detector.pt", "appearance.pt", "context.pt"):
        shutil.copyfile(BUNDLED_DIR / name, tmp_path / name)
    assert pipeline.load_networks(str(tmp_path), "cpu").s1_outline is None
    shutil.copyfile(BUNDLED_DIR / "detector.pt", tmp_path / "s1_outline.pt")
    networks = pipeline.load_networks(str(tmp_path), "cpu")
    patches = np.random.default_rng(0).random((2, 224, 224), dtype=np.float32)
    np.testing.assert_array_equal(networks.s1_outline(patches), network_predictor(networks.detector)(patches))


def test_a_detector_loses_only_the_last_block_of_its_deepest_stage():
    import torch

    from SpineNetLib.core.errors import InputError
    from SpineNetLib.models import DetectorConfig, VFRDetector
    from SpineNetLib.training.detector import without_last_deep_block

    torch.manual_seed(0)
    model = VFRDetector(DetectorConfig((1, 1, 2, 2), 4)).eval()
    smaller = without_last_deep_block(model)
    assert smaller.config.blocks == (1, 1, 2, 1)
    kept = smaller.state_dict()
    dropped = {k for k in model.state_dict() if k not in kept}
    assert dropped and all(k.startswith("down_blocks.3.1.") for k in dropped)
    assert all(torch.equal(kept[k], model.state_dict()[k]) for k in kept)
    with pytest.raises(InputError):
        without_last_deep_block(smaller)


def test_the_second_detector_runs_only_the_patches_near_s1_and_finds_what_the_whole_plan_finds():
    """On a whole-spine slice S1 lies in the lowest patches; the others are not run, and S1 comes out
    exactly as from every patch (each patch is normalised on its own)."""
    from SpineNetLib.core.results import Vertebra
    from SpineNetLib.detect.s1_outline import SEARCH_MARGIN_MM, best_match, bodies_on_slices, patches_near
    from SpineNetLib.detect.vfr import DetectionParams, detect_vertebrae, slice_plan

    whole = make_phantom(fov="whole", n_slices=3, slice_thickness_mm=3.0, seed=4)
    s1 = next(v for v in whole.vertebrae if v.level == "S1" and not v.extra)
    body = Vertebra(slices=sorted(s1.quads), polygons=[np.array(s1.quads[s], float) for s in sorted(s1.quads)])
    params = DetectionParams()
    shape, spacing = whole.scan.voxels.shape[:2], tuple(whole.scan.spacing_mm[:2])
    plan, _ = slice_plan(shape, spacing, params)
    near = patches_near(body, shape, spacing, params)
    assert near is not None and len(near) == len(plan) / 2   # the lower of 4 x 2 patches
    top_row = min(float(np.min(p[:, 1])) for p in body.polygons)
    assert all(b.y1 <= top_row - SEARCH_MARGIN_MM / spacing[0] for b in plan if b not in near)

    truth = oracle_predictor(_quads(whole))
    seen = []

    def spy(patches, boxes):
        seen.extend(boxes)
        return truth(patches, boxes)

    found = bodies_on_slices(whole.scan, body, spy, params)
    assert len(seen) == len(near) * len(body.slices)
    everything = detect_vertebrae(whole.scan, truth, params)
    match, reference = best_match(body, found), best_match(body, everything.vertebrae)
    assert match is not None and match.slices == reference.slices
    for a, b in zip(match.polygons, reference.polygons):
        np.testing.assert_array_equal(a, b)


def test_no_patch_is_left_out_when_every_patch_reaches_s1(phantom):
    from SpineNetLib.core.results import Vertebra
    from SpineNetLib.detect.s1_outline import patches_near
    from SpineNetLib.detect.vfr import DetectionParams

    body = Vertebra(slices=[0], polygons=[np.array([[300, 200], [300, 250], [200, 250], [200, 200]], float)])
    assert patches_near(body, (512, 512), (0.6, 0.6), DetectionParams()) is None   # 2 x 2 patches overlap there
    assert patches_near(body, (512, 512), (0.6, 0.6), DetectionParams(plan="whole_slice")) is None


def test_an_s1_the_main_detector_misses_below_l5_comes_from_the_second_detector(phantom):
    """Where the chain still ends at L5, the second detector's body one step below it is taken as S1."""
    networks = oracle_networks(phantom)
    networks.predictor = oracle_predictor(_quads(phantom, with_s1=False))   # the main detector misses S1
    without = pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False))
    levels = [v.level for v in without.detection.vertebrae]
    assert levels[-1] == "L5" and without.vertebrae_document["labelling"]["s1_found"] is False
    networks.s1_outline = oracle_predictor(_quads(phantom))
    found = pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False))
    assert [v.level for v in found.detection.vertebrae] == levels + ["S1"]
    assert found.detection.labelling["bodies_from_weaker_detections"] == 1
    assert found.vertebrae_document["labelling"]["s1_found"] is True
    assert found.vertebrae_document["labelling"]["s1_from_second_detector"] is True
    assert "s1_from_second_detector" not in without.vertebrae_document["labelling"]
    s1 = found.detection.vertebrae[-1]
    for s, p in zip(s1.slices, s1.polygons):
        assert np.abs(p - _truth(phantom, "S1", s)).max() < 1.0
    official = pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False, profile="official"))
    assert [v.level for v in official.detection.vertebrae] == levels


def test_l5_and_s1_the_main_detector_misses_below_l4_come_from_the_second_detector(phantom, monkeypatch):
    """Where the chain still ends at L4, the second detector's bodies below it are taken when the labelling
    names them L5 and S1 and keeps every other level; a search that stops above S1 adds nothing."""
    networks = oracle_networks(phantom)
    networks.predictor = oracle_predictor(_quads(phantom, missing=("L5", "S1")))   # the main detector misses both
    without = pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False))
    levels = [v.level for v in without.detection.vertebrae]
    assert levels[-1] == "L4"
    networks.s1_outline = oracle_predictor(_quads(phantom))
    detections_near_s1 = []
    monkeypatch.setattr(s1_outline, "_detection_on_slices",
                        lambda *args, _real=s1_outline._detection_on_slices: detections_near_s1.append(1) or _real(*args))
    found = pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False))
    assert [v.level for v in found.detection.vertebrae] == levels + ["L5", "S1"]
    # S1 is the second detector's own body: its outline is not detected a second time
    assert detections_near_s1 == [] and found.detection.labelling["s1_outline_from_second_detector"] is True
    assert found.detection.labelling["bodies_from_weaker_detections"] == 2
    labelling_doc = found.vertebrae_document["labelling"]
    assert labelling_doc["s1_from_second_detector"] is True
    # the lowest levels rest on the second detector alone: a review is asked for, that reason first
    assert labelling_doc["levels_from_second_detector"] == ["L5", "S1"] and labelling_doc["needs_review"] is True
    assert labelling_doc["warnings"][0].startswith("levels may be shifted: L5 and S1 were found only by the second")
    for level, body in zip(("L5", "S1"), found.detection.vertebrae[-2:]):
        for s, p in zip(body.slices, body.polygons):
            assert np.abs(p - _truth(phantom, level, s)).max() < 1.0

    networks.s1_outline = oracle_predictor(_quads(phantom, with_s1=False))   # finds L5 but not S1 either
    stopped = pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False))
    assert [v.level for v in stopped.detection.vertebrae] == levels
    assert "s1_from_second_detector" not in stopped.vertebrae_document["labelling"]
    assert "levels_from_second_detector" not in stopped.vertebrae_document["labelling"]


def test_no_s1_is_taken_from_a_second_detector_body_cut_by_the_lower_edge(phantom, monkeypatch):
    """A body reaching the image's last row below an L5 cannot be told from an L5 cut there: the image
    ends at S1's lower corners, which the second detector puts on its last row."""
    from dataclasses import replace

    s1_bottom = max(float(q[[1, 2], 1].max()) for q in _truth_quads(phantom, "S1"))
    last_row = int(np.ceil(s1_bottom))
    scan = replace(phantom.scan, voxels=np.ascontiguousarray(phantom.scan.voxels[:last_row + 1]))
    networks = oracle_networks(phantom)
    networks.predictor = oracle_predictor(_quads(phantom, with_s1=False))
    networks.s1_outline = oracle_predictor(_quads(phantom))
    from SpineNetLib.detect import s1_outline

    detect = s1_outline.detect_vertebrae

    def lower_corners_on_the_last_row(image, predict, *args, **kw):
        result = detect(image, predict, *args, **kw)
        if predict is networks.s1_outline:
            lowest = max(result.vertebrae, key=lambda v: float(np.mean(v.average_polygon[:, 1])))
            lowest.polygons = [np.vstack([p[:1], [[p[1, 0], last_row], [p[2, 0], last_row]], p[3:]])
                               for p in lowest.polygons]
        return result

    monkeypatch.setattr(s1_outline, "detect_vertebrae", lower_corners_on_the_last_row)
    assert pipeline.run(scan, networks, pipeline.RunOptions(grade=False)).detection.vertebrae[-1].level == "L5"
    monkeypatch.setattr(s1_outline, "detect_vertebrae", detect)   # the same S1 a little above the edge
    assert pipeline.run(scan, networks, pipeline.RunOptions(grade=False)).detection.vertebrae[-1].level == "S1"


def _faint_s1(phantom, amplitude: float):
    """A second detector that finds every body at full strength but S1, whose maps peak at ``amplitude``
    (above DetectionParams.faint_threshold, below candidate_threshold: only the faint pass finds it)."""
    others = oracle_predictor(_quads(phantom, with_s1=False))
    s1_only = oracle_predictor({s: np.stack([q]) for q, s in zip(_truth_quads(phantom, "S1"),
                                                                 next(v for v in phantom.vertebrae
                                                                      if v.level == "S1" and not v.extra).quads)})

    def predict(patches, boxes):
        out = others(patches, boxes)
        faint = s1_only(patches, boxes)
        out[:, :5] += amplitude * faint[:, :5]   # heat maps and centroid map
        out[:, 5:] += faint[:, 5:]                 # displacements, where S1's corners are
        return out
    return predict


def test_faint_detections_are_decoded_for_s1_only_when_no_stronger_one_overlaps_it(phantom, monkeypatch):
    """S1's outline comes from the second detector's faint detections too, but they are decoded only
    when its full-strength and weaker ones give no match (MIN_OVERLAP_IOU)."""
    from SpineNetLib.detect import s1_outline

    detect = s1_outline.detect_vertebrae
    faint_decoded = []

    def spying(image, predict, *args, **kw):
        result = detect(image, predict, *args, **kw)
        decode = result.faint_decoding
        if decode is not None:
            result.faint_decoding = lambda: faint_decoded.append(True) or decode()
        return result

    monkeypatch.setattr(s1_outline, "detect_vertebrae", spying)
    strong = _run(phantom, oracle_predictor(_quads(phantom)))
    assert strong.detection.labelling["s1_outline_from_second_detector"] is True and not faint_decoded
    faint = _run(phantom, _faint_s1(phantom, 0.2))
    assert faint_decoded and faint.detection.labelling["s1_outline_from_second_detector"] is True
    s1 = next(v for v in faint.detection.vertebrae if v.level == "S1")
    for s, p in zip(s1.slices, s1.polygons):
        assert np.abs(p - _truth(phantom, "S1", s)).max() < 1.0
