"""Processing profiles (issue 11): ``default`` (this project's choices) and ``official`` (the
official code's arithmetic where it is implemented as a switch), checked against the official
algorithm as documented in docs/OFFICIAL_IMPLEMENTATION.md (official §5.4-6)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SpineNetLib import pipeline
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.discs.extraction import disc_pairs
from SpineNetLib.label.labelling import LabellingParams, extract_vertebra_volume, normalise_volume

OFFICIAL = LabellingParams(official_crop=True)


def scan_of(voxels: np.ndarray) -> Scan:
    eye = np.eye(4)
    return Scan(voxels=np.asarray(voxels, np.float32), spacing_mm=(1.0, 1.0, 4.0), canonical_to_ras=eye,
                input_ijk_to_ras=eye, input_shape_ijk=voxels.shape[::-1], canonical_to_input_ijk=eye,
                input_slice_axis=0)


def square_body(x_lt: float, y_lt: float, side: float) -> Vertebra:
    """An axis-aligned body (no straightening) with its lt corner at (x_lt, y_lt); corners rt, rb, lb, lt."""
    poly = np.array([[x_lt + side, y_lt], [x_lt + side, y_lt + side], [x_lt, y_lt + side], [x_lt, y_lt]])
    return Vertebra(slices=[0], polygons=[poly])


def reference_official_volume(voxels: np.ndarray, x_lt: float, y_lt: float, side: float) -> np.ndarray:
    """official §5.4 written out for an unrotated body: slice [int(y - L):+int(3L), int(x - L):+int(3L)],
    bicubic 224 x 224 (align_corners=False), 16 slices linearly, (v - min) / (P95 + 1e-6)."""
    x0, y0, k = int(x_lt - side), int(y_lt - side), int(3 * side)
    crop = voxels[max(y0, 0):y0 + k, x0:x0 + k, :].astype(np.float64)
    if y0 < 0:  # zero rows above the image
        crop = np.concatenate([np.zeros((-y0,) + crop.shape[1:]), crop], axis=0)
    crop = crop.transpose(2, 0, 1)
    planes = F.interpolate(torch.from_numpy(crop)[None], size=(224, 224), mode="bicubic", align_corners=False)[0]
    planes = planes.numpy()
    s = planes.shape[0]
    pos = np.minimum(np.arange(16) * s / 16, s - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, s - 1)
    frac = (pos - lo)[:, None, None]
    return normalise_volume((planes[lo] * (1 - frac) + planes[hi] * frac).transpose(1, 2, 0))


@pytest.fixture(scope="module")
def voxels():
    return np.random.default_rng(0).uniform(10.0, 200.0, (160, 150, 5))


def test_official_crop_is_the_official_arithmetic(voxels):
    """Inside the image, the official crop equals slicing at the truncated start and resizing."""
    for x_lt, y_lt, side in ((50.7, 60.2, 20.0), (41.3, 45.9, 13.6)):
        ours = extract_vertebra_volume(scan_of(voxels), square_body(x_lt, y_lt, side), OFFICIAL)
        np.testing.assert_allclose(ours, reference_official_volume(voxels, x_lt, y_lt, side), atol=1e-5)


def test_official_crop_starts_on_whole_pixels_and_ours_does_not(voxels):
    scan = scan_of(voxels)
    a, b = square_body(50.2, 60.0, 20.0), square_body(50.7, 60.0, 20.0)   # same int(x - L) = 30
    np.testing.assert_array_equal(extract_vertebra_volume(scan, a, OFFICIAL), extract_vertebra_volume(scan, b, OFFICIAL))
    assert not np.allclose(extract_vertebra_volume(scan, a), extract_vertebra_volume(scan, b))


def test_official_crop_stretches_at_the_bottom_edge_pads_at_the_top_and_gives_zeros_left_of_the_image():
    rows = np.tile((np.arange(100, dtype=np.float64) + 1.0)[:, None, None], (1, 80, 3))
    scan = scan_of(rows)
    low = square_body(30.0, 80.0, 15.0)                        # the crop runs 30 rows past the bottom
    official = extract_vertebra_volume(scan, low, OFFICIAL)
    default = extract_vertebra_volume(scan, low)
    # rows grow brighter downwards: stretched, the crop still brightens to its last row; zero-padded,
    # it falls back to the padding's value past the image's last row (row 99 is crop row 34 of 45)
    assert official[-1, 0, 0] > official[180, 0, 0] > official[100, 0, 0]
    assert default[-1, 0, 0] < default[150, 0, 0] and np.ptp(default[-20:]) == 0.0
    np.testing.assert_allclose(official, reference_official_volume(rows, 30.0, 80.0, 15.0), atol=1e-5)
    high = extract_vertebra_volume(scan, square_body(30.0, 5.0, 15.0), OFFICIAL)
    assert np.ptp(high[:20]) == 0.0 and high[0, 0, 0] < high[120, 0, 0]   # zero rows above a negative y0
    np.testing.assert_allclose(high, reference_official_volume(rows, 30.0, 5.0, 15.0), atol=1e-5)
    left = extract_vertebra_volume(scan, square_body(10.0, 40.0, 15.0), OFFICIAL)
    assert not left.any()                                      # the official error path: all zeros


def test_profiles_are_chosen_by_the_weights_and_by_name():
    assert pipeline.processing_profile(None, "official").name == "official"
    assert pipeline.processing_profile(None, "bundled").name == "default"
    assert pipeline.processing_profile("official", "bundled").name == "official"
    with pytest.raises(InputError, match="unknown processing profile"):
        pipeline.processing_profile("fast", "bundled")
    official = pipeline.PROFILES["official"]
    assert not official.slab_average_thin_slices and official.official_appearance_crop
    assert not official.drop_lower_sacral_segments and official.discs_across_missed_levels
    detection = pipeline.profiled_detection_params(None, official)
    assert detection.official_arithmetic and not detection.subpixel and not detection.drop_edge_corners
    assert pipeline.profiled_detection_params(None, pipeline.PROFILES["default"]).subpixel
    params = pipeline.profiled_labelling_params(None, LabellingParams(repeat_s1_penalty=7.0), official)
    assert (params.official_crop, params.drop_lower_sacral_segments, params.repeat_s1_penalty) == (True, False, 7.0)
    # ours only: no weaker detections to move a chain onto, no turned slices
    assert not params.move_up_to_weaker_s1 and not params.relabel_s1_at_image_edge
    assert detection.turned_min_lean_deg is None and detection.turned_further_deg == ()
    default = pipeline.PROFILES["default"]
    assert pipeline.profiled_labelling_params(None, None, default).move_up_to_weaker_s1
    assert not pipeline.profiled_labelling_params(None, LabellingParams(move_up_to_weaker_s1=False),
                                                  default).move_up_to_weaker_s1   # a caller's "off" stays off


def test_the_official_profile_makes_a_disc_across_a_missed_level():
    bodies = [replace(square_body(30.0, 20.0 * i, 15.0), level=name) for i, name in enumerate(["L3", "L5", "S1"])]
    assert [name for _, _, name in disc_pairs(bodies)] == ["L5-S1"]
    assert [name for _, _, name in disc_pairs(bodies, across_missed_levels=True)] == ["L3-L5", "L5-S1"]


def test_spinenet_run_records_its_profile(tmp_path):
    from SpineNetLib.apps import cli
    from SpineNetLib.synthetic.phantom import make_phantom

    phantom = make_phantom(fov="lumbar", n_slices=5, seed=3)
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    for extra, expected in (([], "default"), (["--profile", "official"], "official")):
        out = tmp_path / expected
        assert cli.main(["run", str(image), "-o", str(out), "--quiet", "--no-grade", *extra]) == 0
        assert json.loads((out / "vertebrae.json").read_text())["profile"] == expected
        assert json.loads((out / "discs.json").read_text())["profile"] == expected
        # and which weights made it (issue 13: the source in every output)
        assert json.loads((out / "vertebrae.json").read_text())["weights"] == "bundled"
        assert json.loads((out / "discs.json").read_text())["grading"]["weights"] == "bundled"


def test_official_patch_plan_is_the_official_one():
    from SpineNetLib.detect.vfr import DetectionParams, plan_patches

    official = DetectionParams(official_arithmetic=True)
    # official §5.1's own example: 512 x 512 at 0.5 mm gives L = 511, stride 306, 2 x 2 patches,
    # the second one spanning [-L, -1): 510 pixels from column 1, decoded with L = 511
    boxes = plan_patches((512, 512), (0.5, 0.5), official)
    assert [(b.y0, b.x0, b.height_px, b.width_px, b.decode_px) for b in boxes] == [
        (0, 0, 511, 511, (511, 511)), (1, 0, 510, 511, (511, 511)),
        (0, 1, 511, 510, (511, 511)), (1, 1, 510, 510, (511, 511))]
    # 300 x 200 at 1 mm: L = 199, stride 119; 3 patches down (the last two are the same), 2 across
    boxes = boxes_300x200 = plan_patches((300, 200), (1.0, 1.0), official)
    assert [(b.y0, b.x0, b.height_px, b.width_px) for b in boxes] == [
        (0, 0, 199, 199), (101, 0, 198, 199), (101, 0, 198, 199),
        (0, 1, 199, 198), (101, 1, 198, 198), (101, 1, 198, 198)]
    # the public package rounds the edge (official §9): 260 mm at 0.5859 mm is 443.76 -> 444 pixels
    assert plan_patches((512, 512), (0.5859, 0.5859), official)[0].decode_px == (444, 444)
    # anisotropic pixels: each axis its own edge in pixels, the same 260 mm (official §9)
    assert plan_patches((600, 400), (0.5, 1.0), official)[0].decode_px == (520, 260)
    # the official stride whatever stride_fraction says; the official profile sets it too, ours is 0.8
    assert plan_patches((300, 200), (1.0, 1.0), replace(official, stride_fraction=0.8)) == boxes_300x200
    assert pipeline.profiled_detection_params(None, pipeline.PROFILES["official"]).stride_fraction == 0.6
    assert pipeline.profiled_detection_params(None, pipeline.PROFILES["default"]).stride_fraction == 0.8


def test_official_corners_use_whole_pixel_displacements_and_the_patch_edge_l():
    from SpineNetLib.detect.vfr import DetectionParams, PatchBox, decode_corners

    outputs = np.zeros((1, 13, 224, 224), np.float32)
    outputs[0, 0, 100, 50] = 1.0                      # an rt corner at patch (x 50, y 100)
    outputs[0, 5, 100, 50] = 3.7                      # its displacement in network pixels: x 3.7, y -2.6
    outputs[0, 9, 100, 50] = -2.6
    box = PatchBox(0, 10, 1, 447, 447, decode_px=(448, 448))   # an official end patch: 447 wide, decoded with 448
    official = DetectionParams(official_arithmetic=True, subpixel=False, drop_edge_corners=False)
    points, disps = decode_corners(outputs, [box], official)
    np.testing.assert_allclose(points[0], [[1 + 50 * 2.0, 10 + 100 * 2.0]])
    np.testing.assert_allclose(disps[0], [[3.0 * 2.0, -2.0 * 2.0]])
    ours, ours_d = decode_corners(outputs, [PatchBox(0, 10, 1, 448, 448)], DetectionParams(drop_edge_corners=False))
    np.testing.assert_allclose(ours_d[0], [[3.7 * 2.0, -2.6 * 2.0]], rtol=1e-6)


def test_the_worker_follows_the_weights_profile_and_keeps_thin_slices_for_official(tmp_path):
    """The Slicer worker decides slab averaging by the profile, as spinenet run does."""
    from SpineNetLib.apps import worker
    from SpineNetLib.synthetic.phantom import make_phantom

    phantom = make_phantom(fov="lumbar", n_slices=5, seed=3)
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    args = worker.build_parser().parse_args(worker.worker_arguments(image, tmp_path / "out", profile="official"))
    assert args.profile == "official" and worker._options(args)["profile"] == "official"
    thin = np.zeros((40, 64, 64), np.float32)
    thin[:, 20:40, 20:40] = 1.0
    affine = np.array([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    np.save(tmp_path / "thin.npy", thin)
    (tmp_path / "thin.json").write_text(json.dumps({"ijk_to_ras": affine.tolist()}))
    native = worker.read_scan(tmp_path / "thin.npy", tmp_path / "thin.json", resample_isotropic=False)
    slabs = worker.read_scan(tmp_path / "thin.npy", tmp_path / "thin.json")
    assert native.voxels.shape[2] == 40 and slabs.voxels.shape[2] < 40


def test_official_detection_decodes_every_slice_with_its_plan_boxes():
    """The whole-scan loop batches patches across slices; each slice must still be decoded with the
    plan's boxes, end patches decoded with L (a lost ``decode_px`` moved official corners by 0.4-1 px)."""
    from SpineNetLib.detect import vfr
    from SpineNetLib.synthetic.phantom import make_phantom
    from SpineNetLib.weights.checkpoints import load_model
    from SpineNetLib.weights.resolve import resolve_weights

    scan = make_phantom(seed=2, shape=(300, 260), pixel_spacing=(1.0, 1.0), n_slices=3).scan
    params = pipeline.profiled_detection_params(None, pipeline.PROFILES["official"])
    params = replace(params, batch_size=3)   # batches that straddle slices
    predict = vfr.network_predictor(load_model("detector", resolve_weights("bundled").path("detector")))
    found = vfr.detect_vertebrae(scan, predict, params).vertebrae
    assert len(found) >= 4
    by_slice = {}
    for s in range(scan.n_slices):
        boxes = vfr.plan_patches(scan.shape[:2], scan.spacing_mm[:2], params, slice_index=s)
        assert any(b.decode_px != (b.height_px, b.width_px) for b in boxes)   # end patches present
        maps = predict(vfr.extract_patches(scan.voxels[:, :, s], boxes))
        by_slice[s] = vfr.decode_slice(maps, boxes, scan.shape[:2], params, spacing_rc=scan.spacing_mm[:2])
    expected = vfr.group_across_slices(by_slice, params)
    assert [v.slices for v in found] == [v.slices for v in expected]
    for v, e in zip(found, expected):
        np.testing.assert_allclose(np.stack(v.polygons), np.stack(e.polygons), atol=1e-6)


def test_official_body_mask_is_scikit_images_polygon_fill():
    """The disc intensity reference of the official profile samples the pixels scikit-image's
    ``draw.polygon`` fills (official §6): a pixel centre exactly on a vertex counts, which the
    even-odd rule of the default profile leaves to chance."""
    from SpineNetLib.discs.extraction import body_intensity_samples

    voxels = np.zeros((40, 40, 2), np.float32)
    voxels[30, 12, :] = 1000.0                       # the pixel under the lb vertex (x 12, y 30)
    poly = np.array([[30.0, 10.5], [31.5, 29.0], [12.0, 30.0], [10.25, 11.0]])
    body = Vertebra(slices=[0, 1], polygons=[poly, poly])
    official = body_intensity_samples(scan_of(voxels), body, official_fill=True)
    ours = body_intensity_samples(scan_of(voxels), body)
    assert np.count_nonzero(official == 1000.0) == 2   # on both slices where the body was found
    assert np.count_nonzero(ours == 1000.0) == 0
