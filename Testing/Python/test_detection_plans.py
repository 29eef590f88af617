"""Detection plans (issue 16, item 1): whole slices at the network's scale against overlapping patches.

The whole-slice plan (``DetectionParams.plan = "whole_slice"``, ``detect/plans.py``) sends each
slice to the detector once, resized to the patches' network scale and padded to multiples of 32.
These tests check that its frames are the ones documented, that a peak at a known network pixel
decodes to the scan pixel computed by hand (non-square and padded frames; peaks in the padding are
ignored), that it finds what the patch plan finds on a lumbar phantom with the bundled detector,
and that both profiles keep the patch plan (the ``official`` one always: official §5.1).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from SpineNetLib import pipeline
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.scan import Scan
from SpineNetLib.detect import vfr as D

WHOLE = D.DetectionParams(plan="whole_slice")


def _scan(shape_hw, spacing_rc, n_slices=3) -> Scan:
    geom = np.diag([spacing_rc[0], spacing_rc[1], 4.0, 1.0])
    vox = np.random.default_rng(0).normal(300, 30, (*shape_hw, n_slices)).astype(np.float32)
    return Scan(voxels=vox, spacing_mm=(*spacing_rc, 4.0), canonical_to_ras=geom, input_ijk_to_ras=geom,
                input_shape_ijk=vox.shape, canonical_to_input_ijk=np.eye(4), input_slice_axis=2)


@pytest.mark.parametrize("shape, spacing, frame, padded", [
    # 260 mm at 0.6 mm is L = 433 scan pixels per 224 network pixels: 512 -> 264.9, 448 -> 231.8
    ((512, 448), (0.6, 0.6), (265, 232), (288, 256)),
    # a slice narrower than 260 mm (180 mm): the patch edge, and with it the scale, follows it (L = 300)
    ((512, 300), (0.6, 0.6), (382, 224), (384, 224)),
    # 512 x 400 at 0.5 x 0.8 mm: the edge is the image's 256 mm height, L = (512, 320): 224 x 280
    ((512, 400), (0.5, 0.8), (224, 280), (224, 288)),
    # 1024 x 512 at 0.9 mm (whole spine): L = 288: 796.4 -> 796, 398.2 -> 398
    ((1024, 512), (0.9, 0.9), (796, 398), (800, 416)),
])
def test_whole_slice_frame_is_the_patch_scale_padded_to_32(shape, spacing, frame, padded):
    box = D.plan_whole_slice(shape, spacing, slice_index=4)
    assert (box.slice_index, box.y0, box.x0, box.height_px, box.width_px) == (4, 0, 0, *shape)
    assert box.net_px == frame and D.input_shape([box]) == padded
    boxes, per_call = D.slice_plan(shape, spacing, WHOLE)
    assert boxes == [dataclasses.replace(box, slice_index=0)]
    assert per_call == 8 * 224 * 224 // (padded[0] * padded[1])
    assert D.slice_plan(shape, spacing) == (D.plan_patches(shape, spacing), 8)   # the default plan
    # a slice beyond one call's pixels falls back on the patches
    boxes, per_call = D.slice_plan(shape, spacing, dataclasses.replace(WHOLE, batch_size=1))
    assert boxes == D.plan_patches(shape, spacing) and per_call == 1
    with pytest.raises(InputError, match="plan"):
        D.DetectionParams(plan="tiles")


BODY = np.array([[90, 100], [90, 130], [50, 130], [50, 100]])    # rt, rb, lb, lt as network [u, v]


def _peak_predictor(bodies, inputs_seen: list):
    """Vertebrae drawn straight into network pixels: each corner (rt, rb, lb, lt) and the centroid
    (the corners' mean) a symmetric 3 x 3 peak whose maximum is the given pixel, each corner with its
    exact displacement to the centroid."""
    blob = np.exp(-(np.arange(-1, 2)[:, None] ** 2 + np.arange(-1, 2)[None, :] ** 2) / 4.5).astype(np.float32)

    def predict(inputs, boxes):
        inputs_seen.append(inputs.shape)
        out = np.zeros((len(boxes), 13, *inputs.shape[1:]), np.float32)
        for corners in bodies:
            centroid = corners.mean(axis=0).astype(int)
            for t, (u, v) in enumerate(corners):
                out[:, t, v - 1:v + 2, u - 1:u + 2] = blob
                out[:, 5 + t, v, u] = centroid[0] - u
                out[:, 9 + t, v, u] = centroid[1] - v
            u, v = centroid
            out[:, 4, v - 1:v + 2, u - 1:u + 2] = blob
        return out

    return predict


def test_a_network_pixel_maps_back_to_its_scan_pixel_exactly():
    scan = _scan((512, 448), (0.6, 0.6))
    in_padding = np.array([[80, 268], [80, 284], [60, 284], [60, 268]])   # below the 265-row frame
    seen: list = []
    predict = _peak_predictor([BODY, in_padding], seen)
    found = D.detect_vertebrae(scan, predict, WHOLE).vertebrae
    assert seen == [(3, 288, 256)]            # three whole slices in one call, padded 265 x 232 frames
    # network pixel (u, v) of a 265 x 232 frame over 512 x 448 scan pixels: x = u 448 / 232, y = v 512 / 265
    expected = BODY * np.array([448 / 232, 512 / 265])
    assert len(found) == 1 and found[0].slices == [0, 1, 2]   # the vertebra in the padding is not decoded
    for polygon in found[0].polygons:
        np.testing.assert_allclose(polygon, expected, rtol=0, atol=1e-9)
    # ... though it would be, were the padding part of the frame
    box = D.plan_whole_slice((512, 448), (0.6, 0.6))
    maps = predict(np.zeros((1, 288, 256), np.float32), [box])
    assert len(D.decode_slice(maps, [box], (512, 448))) == 1
    assert len(D.decode_slice(maps, [dataclasses.replace(box, net_px=(288, 256))], (512, 448))) == 2


def test_anisotropic_frames_map_back_per_axis():
    scan = _scan((512, 400), (0.5, 0.8), n_slices=2)
    seen: list = []
    lower = BODY + [100, 60]
    found = D.detect_vertebrae(scan, _peak_predictor([BODY, lower], seen), WHOLE).vertebrae
    assert seen == [(2, 224, 288)]                            # frame 224 x 280, padded to 224 x 288
    scale = np.array([400 / 280, 512 / 224])
    assert len(found) == 2
    np.testing.assert_allclose(found[0].polygons[0], BODY * scale, rtol=0, atol=1e-9)
    np.testing.assert_allclose(found[1].polygons[1], lower * scale, rtol=0, atol=1e-9)


def test_whole_slice_inputs_are_normalised_per_slice_and_padded_with_zeros():
    img = np.random.default_rng(1).gamma(2.0, 100.0, (512, 448)).astype(np.float32)
    box = D.plan_whole_slice(img.shape, (0.6, 0.6))
    x = D.extract_patches(img, [box])[0]
    frame = x[:265, :232]
    assert x.shape == (288, 256) and not x[265:].any() and not x[:, 232:].any()
    assert frame.min() == pytest.approx(0.0, abs=1e-6)
    lo, hi = np.percentile(frame, [0.5, 99.5])
    assert hi - lo == pytest.approx(1.0, rel=1e-4)             # (p - min) / (P99.5 - P0.5), official §5.1


def test_the_normalising_percentiles_are_numpys_bit_for_bit():
    """The patches' P0.5 and P99.5 (official §5.1) come from torch.topk; they must equal np.percentile
    exactly, with ties, one row or several, and frames of one to a few pixels."""
    from SpineNetLib.detect import plans

    rng = np.random.default_rng(4)
    for trial in range(300):
        n = int(rng.choice([1, 2, 3, 57, 201, 50176, int(rng.integers(4, 70000))]))
        flat = (rng.gamma(2.0, 1.0, (int(rng.integers(1, 6)), n)) * rng.choice([1.0, 300.0, 3e4])).astype(np.float32)
        if trial % 3 == 0:
            flat = np.round(flat)   # ties, as in 8-bit and 12-bit scans
        expected = np.percentile(flat, [0.5, 99.5], axis=1)
        got = np.stack(plans._percentiles_half_and_99_half(flat))
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def test_the_official_profile_keeps_the_official_patch_plan():
    official = pipeline.profiled_detection_params(None, pipeline.PROFILES["official"])
    assert official.plan == "patches"
    assert pipeline.profiled_detection_params(WHOLE, pipeline.PROFILES["official"]).plan == "patches"
    # the default profile keeps the patches too (the whole slice costs the bundled detector accuracy)
    assert pipeline.profiled_detection_params(None, pipeline.PROFILES["default"]).plan == "patches"
    # official arithmetic means the official patches whatever the plan says
    also = dataclasses.replace(official, plan="whole_slice")
    assert D.slice_plan((512, 512), (0.5, 0.5), also) == (D.plan_patches((512, 512), (0.5, 0.5), official), 8)
    seen: list = []
    D.detect_vertebrae(_scan((512, 512), (0.5, 0.5), n_slices=2), _peak_predictor([BODY], seen), official)
    assert seen == [(8, 224, 224)]                            # 2 slices x 4 official patches of 224 x 224


def test_both_plans_find_the_same_vertebrae_on_a_phantom_with_the_bundled_detector():
    """Same vertebrae and slices; corners as close as the patch plan is to itself when its patch grid
    moves by 7 pixels (the small detector is not shift-invariant: benchmarks/RESULTS.md)."""
    from SpineNetLib.synthetic.phantom import make_phantom
    from SpineNetLib.weights.checkpoints import load_model
    from SpineNetLib.weights.resolve import resolve_weights

    predict = D.network_predictor(load_model("detector", resolve_weights("bundled").path("detector")))
    scan = make_phantom(fov="lumbar", shape=(448, 400), pixel_spacing=(0.7, 0.7), n_slices=7, seed=9001,
                        rotation_deg=8.0).scan
    patches = D.detect_vertebrae(scan, predict, D.DetectionParams(plan="patches")).vertebrae
    whole = D.detect_vertebrae(scan, predict, WHOLE).vertebrae
    assert len(patches) == len(whole) >= 5
    diffs = []
    for p, w in zip(patches, whole):
        assert p.slices == w.slices
        diffs += [np.abs(p.polygon_on(s) - w.polygon_on(s)).max() for s in p.slices]
    assert np.median(diffs) < 1.0 and max(diffs) < 3.0, diffs
