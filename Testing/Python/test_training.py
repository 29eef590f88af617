"""Tests of the training code (augmentation geometry, losses going down, exact resume, the CLI).

All on CPU with tiny networks and a handful of steps; no real data needed.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from SpineNetLib.training import augment, datasets
from SpineNetLib.weights import checkpoints
from SpineNetLib.label import labelling
from SpineNetLib.core import polygons
from SpineNetLib.apps.cli import main
from SpineNetLib.core.levels import N_LEVELS
from SpineNetLib.models import AppearanceNet, ContextNet, DetectorConfig, VFRDetector
from SpineNetLib.core.results import Vertebra
from SpineNetLib.training.targets import render_vfr_maps


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP spinning when the 2 cores are shared
    yield
    torch.set_num_threads(old)


def _quad_image(shape, quad):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(float)
    return polygons.points_in_polygon(pts, quad).reshape(h, w).astype(np.float32)


def _shrink(quad, f):
    c = quad.mean(axis=0)
    return (quad - c) * f + c


# --------------------------------------------------------------------------- augmentation geometry

QUAD = np.array([[150.0, 90.0], [155.0, 130.0], [110.0, 135.0], [105.0, 95.0]])  # rt, rb, lb, lt


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("rotation", [-18.0, 0.0, 12.0])
def test_transformed_quad_covers_the_bright_region(flip, rotation):
    """Geometric augmentation moves the image and the quad together (anisotropic pixels too)."""
    spacing = (0.9, 1.2)  # (row_mm, col_mm)
    img = _quad_image((240, 260), QUAD)
    tf = augment.make_transform(QUAD.mean(axis=0) + [7, -5], spacing, patch_mm=200.0, size=128,
                                scale=1.1, rotation_deg=rotation, flip=flip)
    patch = augment.resample(img, tf, "bilinear")
    q = tf.quads_to_patch(QUAD[None])[0]
    inner = _quad_image(patch.shape, _shrink(q, 0.8)).astype(bool)
    outer = _quad_image(patch.shape, _shrink(q, 1.25)).astype(bool)
    assert inner.sum() > 50
    assert patch[inner].min() > 0.9
    assert patch[~outer].max() < 0.1
    assert polygons.is_valid_polygon(q)


def test_flip_relabels_corners_by_image_position():
    """After a horizontal flip rt is still the right-top corner of the patch quad."""
    tf = augment.make_transform(QUAD.mean(axis=0), (1.0, 1.0), patch_mm=224.0, size=224, flip=True)
    q = tf.quads_to_patch(QUAD[None])[0]
    rt, rb, lb, lt = q
    assert rt[0] > lt[0] and rb[0] > lb[0]          # r = larger x
    assert rt[1] < rb[1] and lt[1] < lb[1]          # t = smaller y
    # the flipped rt is the old lt (mirrored), within rounding
    old = tf.scan_to_patch(QUAD[3])
    np.testing.assert_allclose(rt, old, atol=1e-9)
    # and the heat map of the relabelled quad peaks where the image corner is
    maps = render_vfr_maps(q[None], (224, 224))
    r, c = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    assert abs(c - rt[0]) <= 1 and abs(r - rt[1]) <= 1


def test_no_flip_keeps_corner_order_and_scale():
    tf = augment.make_transform([100.0, 100.0], (0.5, 0.5), patch_mm=112.0, size=224)
    q = tf.quads_to_patch(QUAD[None])[0]
    # 0.5 mm pixels and 0.5 mm patch pixels: a pure shift
    np.testing.assert_allclose(q - QUAD, np.broadcast_to(q[0] - QUAD[0], q.shape), atol=1e-9)


def test_intensity_augmentation_then_inference_normalisation():
    rng = np.random.default_rng(3)
    img = np.random.default_rng(0).uniform(0, 800, (224, 224)).astype(np.float32)
    for _ in range(5):
        x = augment.augment_intensity(rng, img)
        assert x.shape == img.shape and np.all(np.isfinite(x))
        n = augment.normalise_patch(x)
        assert n.min() == pytest.approx(0.0, abs=1e-6)
        lo, hi = np.percentile(n, [0.5, 99.5])
        assert hi - lo == pytest.approx(1.0, rel=1e-3)
    vol = np.random.default_rng(1).uniform(0, 1, (32, 32, 4)).astype(np.float32)
    out = labelling.normalise_volume(augment.augment_intensity(rng, vol))
    assert out.shape == vol.shape and np.all(np.isfinite(out))


# --------------------------------------------------------------------------- losses go down


def _fit(model, batch_fn, loss_fn, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        x, y = batch_fn()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_detector_steps_lower_the_loss():
    from SpineNetLib.training.detector import detector_loss, phantom_sources, sample_patch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    src = phantom_sources(1, seed=0)[0]
    xs, ts, vs, _ = zip(*[sample_patch(rng, src, augment_strength=0.0, size=64) for _ in range(2)])
    x = torch.from_numpy(np.stack(xs))[:, None]
    t = torch.from_numpy(np.stack(ts))
    v = torch.from_numpy(np.stack(vs))
    model = VFRDetector(DetectorConfig((1, 1, 1, 1), 4))
    losses = _fit(model, lambda: (x, (t, v)), lambda p, y: detector_loss(p, *y)[0], 25, 5e-3)
    assert losses[-1] < 0.7 * losses[0]


def test_appearance_steps_lower_the_loss():
    from SpineNetLib.training.labelling import TEMPERATURE

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 224, 224, 16, generator=g)
    y = torch.tensor([3, 17])
    model = AppearanceNet()
    model.dropout.p = 0.0
    losses = _fit(model, lambda: (x, y),
                  lambda out, yy: torch.nn.functional.cross_entropy(out / TEMPERATURE, yy), 6, 2e-3)
    assert losses[-1] < losses[0]


def test_context_steps_lower_the_loss_and_maps_follow_the_band_rule():
    from SpineNetLib.training.labelling import context_loss, synthetic_batch, synthetic_height_map

    rng = np.random.default_rng(5)
    hm, tgt = synthetic_height_map(rng)
    assert hm.shape[0] % 256 == 0 and hm.shape[1] == N_LEVELS
    rows = np.any(hm > 0, axis=1)
    np.testing.assert_array_equal(rows, tgt >= 0)             # targets exactly on the band rows
    np.testing.assert_allclose(hm[rows].sum(axis=1), 1.0, rtol=1e-5)
    torch.manual_seed(0)
    x, y = synthetic_batch(np.random.default_rng(0), 2)
    model = ContextNet()
    losses = _fit(model, lambda: (x, y), lambda out, yy: context_loss(out, yy)[0], 8, 2e-3)
    assert losses[-1] < losses[0]


def test_context_band_rule_matches_build_height_map():
    """The synthetic band of a body equals labelling.build_height_map's for the same geometry."""
    from SpineNetLib.synthetic.phantom import make_phantom

    ph = make_phantom(fov="lumbar", n_slices=3, seed=0)
    verts = [Vertebra(slices=v.slices, polygons=[v.quads[s] for s in v.slices]) for v in ph.vertebrae]
    probs = np.eye(N_LEVELS)[np.arange(len(verts)) % N_LEVELS]
    hm = labelling.build_height_map(verts, probs, ph.scan)
    row_mm = ph.scan.spacing_mm[0]
    for k, v in enumerate(verts):
        ys = v.average_polygon[:, 1] * row_mm
        yc, w = ys.mean(), np.ptp(ys) / 2
        a, b = int(yc) - int(w / 2), int(yc) + int(w / 2)   # the rule synthetic_height_map uses
        assert np.all(hm[a:b].argmax(axis=1) == k % N_LEVELS)


# --------------------------------------------------------------------------- resume and CLI


def _context_args(out, steps, stop_after=None, resume=False):
    return argparse.Namespace(out=str(out), steps=steps, batch_size=2, seed=7, lr=1e-3, weight_decay=1e-4,
                              resume=resume, device="cpu", threads=None, save_every=100,
                              stop_after=stop_after, val_batches=1)


def _latest_params(run):
    return torch.load(run / "checkpoint-latest.pt", map_location="cpu", weights_only=False)["model"]


def test_resume_reproduces_an_uninterrupted_context_run(tmp_path):
    from SpineNetLib.training.labelling import train_context

    train_context(_context_args(tmp_path / "full", 4))
    train_context(_context_args(tmp_path / "split", 4, stop_after=2))
    assert torch.load(tmp_path / "split" / "checkpoint-latest.pt", weights_only=False)["step"] == 2
    train_context(_context_args(tmp_path / "split", 4, resume=True))
    a, b = _latest_params(tmp_path / "full"), _latest_params(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_reproduces_an_uninterrupted_detector_run(tmp_path):
    from SpineNetLib.training.detector import train

    def args(out, stop_after=None, resume=False):
        return argparse.Namespace(out=str(out), data=None, steps=3, batch_size=1, seed=3, lr=1e-3,
                                  weight_decay=1e-4, phantom_fraction=1.0, n_phantoms=1,
                                  config_blocks=[1, 1, 1, 1], base_width=2, max_cases=0, augment=1.0,
                                  resume=resume, device="cpu", threads=None, save_every=100, val_every=0,
                                  no_val=True, stop_after=stop_after)

    train(args(tmp_path / "full"))
    train(args(tmp_path / "split", stop_after=1))
    train(args(tmp_path / "split", resume=True))
    a, b = _latest_params(tmp_path / "full"), _latest_params(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model = checkpoints.load_model("detector", tmp_path / "split" / "detector.pt")
    assert model.config == DetectorConfig((1, 1, 1, 1), 2)


def _tiny_detector_args(out, **extra):
    """``spinenet train detector``'s arguments for a two-step run of a tiny detector on one phantom."""
    return argparse.Namespace(**{**dict(out=str(out), data=None, steps=2, batch_size=2, seed=3, lr=1e-3,
                                        weight_decay=1e-4, phantom_fraction=1.0, n_phantoms=1,
                                        config_blocks=[1, 1, 1, 1], base_width=2, max_cases=0, augment=1.0,
                                        resume=False, device="cpu", threads=None, save_every=1, val_every=0,
                                        no_val=True, calibrate_cases=0), **extra})


@pytest.mark.parametrize("extra, message", [
    ({"distil": 1.0}, "--distil needs --init"),
    ({"robust_distil": 1.0}, "--robust-distil needs --init"),
    ({"frozen_batchnorm": True}, "--frozen-batchnorm needs --init"),
])
def test_a_direct_call_of_the_detector_trainer_refuses_a_fine_tune_option_without_init(tmp_path, extra, message):
    """The check the CLI makes (``training.common.check_held_to_init``) holds for a direct call too: refused
    before the run folder is written."""
    from SpineNetLib.core.errors import InputError
    from SpineNetLib.training.detector import train

    with pytest.raises(InputError, match=message):
        train(_tiny_detector_args(tmp_path / "run", **extra))
    assert not (tmp_path / "run").exists()


def test_a_robust_distil_run_with_annotation_weight_0_learns_only_from_its_init_detector(tmp_path):
    """``--robust-distil W --annotation-weight 0``: the loss is the distillation term alone (the degraded
    patches' outputs held to the ``--init`` detector's on the clean ones); both settings are recorded in
    ``config.json``, and a run without them records neither (older run folders still resume)."""
    import csv
    import json

    from SpineNetLib.training.detector import train

    train(_tiny_detector_args(tmp_path / "start"))
    start_config = json.loads((tmp_path / "start" / "config.json").read_text())
    assert {"robust_distil", "annotation_weight"}.isdisjoint(start_config)
    init = str(tmp_path / "start" / "detector.pt")
    for weight in (0.0, 1.0):
        out = tmp_path / f"robust_{weight}"
        train(_tiny_detector_args(out, init=init, robust_distil=2.0, annotation_weight=weight))
        rows = list(csv.DictReader((out / "log.csv").open()))
        loss, distil = float(rows[-1]["loss"]), float(rows[-1]["l_distil"])
        assert (loss == pytest.approx(2.0 * distil)) == (weight == 0.0)
        config = json.loads((out / "config.json").read_text())
        assert config["robust_distil"] == 2.0 and config.get("annotation_weight", 1.0) == weight


def test_a_frozen_batchnorm_fine_tune_keeps_the_init_detectors_statistics_and_trains_the_rest(tmp_path):
    """``--frozen-batchnorm``: every BatchNorm layer keeps the ``--init`` detector's running statistics (a
    clean scan is normalised after the fine-tune as before it, however degraded the training batches were),
    while the convolutions and the BatchNorm layers' own scale and shift are still trained; recorded in
    ``config.json``.  Without it the statistics follow the batches."""
    import json

    from SpineNetLib.training.detector import train

    train(_tiny_detector_args(tmp_path / "start"))
    init = tmp_path / "start" / "detector.pt"
    before = checkpoints.load_model("detector", init).state_dict()
    statistics = [k for k in before if k.endswith(("running_mean", "running_var"))]
    scales = [k for k in before if k.endswith(".weight") and k.replace(".weight", ".running_mean") in before]
    assert statistics and scales
    for frozen in (True, False):
        out = tmp_path / f"frozen_{frozen}"
        train(_tiny_detector_args(out, init=str(init), robust_distil=1.0, frozen_batchnorm=frozen, lr=1e-2))
        after = checkpoints.load_model("detector", out / "detector.pt").state_dict()
        kept = all(torch.equal(before[k], after[k]) for k in statistics)
        assert kept == frozen
        assert not all(torch.equal(before[k], after[k]) for k in scales)   # scale and shift still learn
        assert json.loads((out / "config.json").read_text()).get("frozen_batchnorm", False) == frozen


@pytest.mark.skipif(not (datasets.default_data_root() / "chu").is_dir(), reason="real MRI data not found")
def test_leaving_a_source_out_trains_on_none_of_its_volumes_and_says_so_in_the_config():
    """``--leave-out-source chu``: no chu volume among the training cases (so all 17 measure a centre the
    networks never saw), the held-out cases unchanged; ``config.json`` records it only when set."""
    from SpineNetLib.training.common import real_data_config, training_volume_cases

    def args(**extra):
        return argparse.Namespace(data=str(datasets.default_data_root()), phantom_fraction=0.4, max_cases=0, **extra)

    train, val = training_volume_cases(args())
    left_train, left_val = training_volume_cases(args(leave_out_source="chu"))
    assert {c.source for c in train} == {"chu", "myosegmentum"}
    assert {c.source for c in left_train} == {"myosegmentum"}
    assert [c.case_id for c in left_train] == [c.case_id for c in train if c.source != "chu"]
    assert [c.case_id for c in left_val] == [c.case_id for c in val]
    assert "leave_out_source" not in real_data_config(args())
    assert real_data_config(args(leave_out_source="chu"))["leave_out_source"] == "chu"


@pytest.mark.parametrize("option, message", [
    (["--leave-out-source", "ivd"], "invalid choice: 'ivd'"),
    (["--leave-out-source", "chu", "--body-pool", "pool.npz"], "--leave-out-source does not apply to a --body-pool"),
])
def test_a_bad_source_to_leave_out_is_a_one_line_error(tmp_path, capsys, option, message):
    try:
        status = main(["train", "appearance", "--out", str(tmp_path / "run"), "--steps", "1", *option])
    except SystemExit as done:   # argparse's own errors (a choice not offered), on one line too
        status = done.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_existing_run_needs_resume(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = ["train", "context", "--out", str(out), "--steps", "1", "--batch-size", "1", "--val-batches", "1"]
    assert main(cmd) == 0
    assert main(cmd) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_train_context_writes_a_loadable_fp16_checkpoint(tmp_path):
    out = tmp_path / "ctx"
    assert main(["train", "context", "--out", str(out), "--steps", "3", "--batch-size", "2", "--seed", "1",
                 "--val-batches", "1"]) == 0
    for name in ("config.json", "checkpoint-latest.pt", "log.csv", "context.pt"):
        assert (out / name).is_file(), name
    raw = torch.load(out / "context.pt", weights_only=True)
    assert all(t.dtype == torch.float16 for t in raw["net"].values() if t.is_floating_point())
    model = checkpoints.load_model("context", out / "context.pt")
    assert isinstance(model, ContextNet) and not model.training
    y = model(torch.zeros(1, 1, 256, N_LEVELS))
    assert y.shape == (1, 1, 256, N_LEVELS)


def test_field_of_view_truncation_keeps_the_body_and_moves_the_image_edge_into_the_crop():
    """The appearance net must not learn "image edge at the top of the crop = T11" (train_labelling)."""
    import dataclasses

    from SpineNetLib.synthetic.phantom import make_phantom
    from SpineNetLib.training.labelling import truncate_field_of_view

    voxels = np.arange(300 * 200 * 3, dtype=np.float32).reshape(300, 200, 3)
    scan = dataclasses.replace(make_phantom(fov="lumbar", n_slices=3, seed=1).scan, voxels=voxels)
    polygon = np.array([[120.0, 130.0], [120.0, 160.0], [80.0, 160.0], [80.0, 130.0]])  # rt rb lb lt
    rng = np.random.default_rng(5)
    cut_top = cut_bottom = 0
    for _ in range(200):
        cut, moved = truncate_field_of_view(rng, scan, polygon)
        first = int(round(polygon[0, 1] - moved[0, 1]))
        end = first + cut.voxels.shape[0]
        # The same voxels lie under the moved polygon: the body is intact.
        assert np.array_equal(cut.voxels, voxels[first:end])
        assert first <= 130 - 0.3 * 30 + 1 and end >= 160 + 0.3 * 30 - 1
        # A cut lies within the reach of the appearance crop (1.5 body sizes), never far away.
        assert first == 0 or first >= 130 - 45 - 1
        assert end == 300 or end <= 160 + 45 + 1
        cut_top += first > 0
        cut_bottom += end < 300
    assert 60 < cut_top < 140 and 60 < cut_bottom < 140
    # --edge-gap 0: the image may end right at the body (an L5 on the lower edge is no S1), never inside it
    nearest = []
    for _ in range(200):
        cut, moved = truncate_field_of_view(rng, scan, polygon, min_gap=0.0)
        first = int(round(polygon[0, 1] - moved[0, 1]))
        end = first + cut.voxels.shape[0]
        assert first <= 130 and end >= 160
        nearest.append(min(130 - first if first else 99, end - 160 if end < 300 else 99))
    assert min(nearest) < 0.3 * 30 - 1


def test_appearance_phantom_pool_teaches_the_segment_below_s1_as_s1():
    """A detected first sacral segment must look like S1 (official S2 rule), not like L5."""
    from SpineNetLib.core.levels import level_index
    from SpineNetLib.training.labelling import phantom_bodies

    scans: list = []
    bodies = phantom_bodies(6, 3, scans)
    s1 = level_index("S1")
    lowest_pairs = 0
    for k in range(len(scans)):
        sacral = sorted((b.polygon[:, 1].mean() for b in bodies if b.scan_index == k and b.level == s1))
        assert len(sacral) <= 2
        if len(sacral) == 2:  # S1 and the segment below it, which is lower in the image
            lowest_pairs += 1
            assert sacral[1] - sacral[0] > 15.0
    assert lowest_pairs >= 1


def test_whole_slice_frames_sit_at_the_top_left_with_targets_on_the_bodies():
    """A training frame is framed as the whole-slice plan frames a slice (``detect/plans.py``): the
    slice at the top left of the input, zeros beyond it, and the centroid targets on its bodies."""
    from scipy import ndimage

    from SpineNetLib.training.detector import SliceSource, sample_frame

    img = np.full((200, 100), 0.3, np.float32)
    quads = []
    for k in range(4):
        y0, y1, x0, x1 = 20 + 45 * k, 50 + 45 * k, 40, 70
        img[y0:y1 + 1, x0:x1 + 1] = 1.0
        quads.append([[x1, y0], [x1, y1], [x0, y1], [x0, y0]])             # rt, rb, lb, lt
    src = SliceSource("synthetic", img[:, :, None], (1.0, 1.0), {0: np.asarray(quads, float)})
    rng = np.random.default_rng(3)
    for _ in range(6):
        x, t, valid, focus = sample_frame(rng, src, size=256, augment_strength=0.0)
        assert x.shape == t.shape[1:] == valid.shape == (256, 256)
        content = np.argwhere(x > 0)
        assert content[:, 0].min() <= 1 and content[:, 1].min() <= 1          # the slice starts at the top left
        assert content[:, 0].max() < 240 and content[:, 1].max() < 176         # <= 222 x 163 mm turned 20 degrees
        assert not x[240:].any() and not x[:, 176:].any()                      # zeros beyond it
        peaks = np.argwhere((t[4] == ndimage.maximum_filter(t[4], size=9)) & (t[4] > 0.5))
        assert len(peaks) == 4
        assert all(x[r, c] > 0.9 * x.max() for r, c in peaks)                  # each on a bright body
        assert not focus.any()                                                 # frames have no focus region


def test_the_focus_region_covers_s1_and_the_disc_above_it_and_nothing_else():
    """``--distil`` holds the fine-tuned detector to its start everywhere but S1 and the L5-S1 disc:
    the region spans S1's outline, the disc up to L5's lower edge, a margin, and no other body."""
    from SpineNetLib.training import augment
    from SpineNetLib.training.detector import FOCUS_REGION_MARGIN_PX, SliceSource, focus_region

    quads = []
    for k in range(4):                                                       # L3, L4, L5, S1 (rows 20..209)
        y0, y1, x0, x1 = 20 + 50 * k, 60 + 50 * k, 40, 80
        quads.append([[x1, y0], [x1, y1], [x0, y1], [x0, y0]])
    src = SliceSource("synthetic", np.zeros((240, 120, 1), np.float32), (1.0, 1.0), {0: np.asarray(quads, float)},
                      focus={0: 3}, focus_above={0: 2})
    tf = augment.make_transform(np.array([59.5, 119.5]), (1.0, 1.0), patch_mm=240.0, size=240)  # 1 px per mm
    region = focus_region(tf, src, 0)
    rows, cols = np.nonzero(region)
    off_r, off_c = tf.scan_to_patch(np.array([[0.0, 0.0]]))[0][::-1]              # scan (0, 0) in the patch
    assert np.isclose(rows.min() - off_r, 160 - FOCUS_REGION_MARGIN_PX, atol=1.5)   # L5's lower edge, less the margin
    assert np.isclose(rows.max() - off_r, 210 + FOCUS_REGION_MARGIN_PX, atol=1.5)   # S1's lower edge, plus the margin
    assert np.isclose(cols.min() - off_c, 40 - FOCUS_REGION_MARGIN_PX, atol=1.5)
    assert not region[: int(off_r) + 150].any()                                     # L3, L4 and most of L5
    assert not focus_region(tf, SliceSource("none", src.voxels, (1.0, 1.0), src.quads), 0).any()


def test_a_batch_carries_focus_regions_only_when_distilling():
    """The focus region costs a few ms a patch, so a batch computes it only for ``--distil``."""
    from SpineNetLib.training.detector import SliceSource, sample_batch

    quads = [[[80, 20 + 50 * k], [80, 60 + 50 * k], [40, 60 + 50 * k], [40, 20 + 50 * k]] for k in range(4)]
    src = SliceSource("synthetic", np.random.default_rng(0).random((240, 120, 1), np.float32), (1.0, 1.0),
                      {0: np.asarray(quads, float)}, focus={0: 3}, focus_above={0: 2})
    args = argparse.Namespace(batch_size=4, augment=0.0)
    for distil in (0.0, 1.0):
        config = {"frame_share": 0.0, "tianchi_fraction": 1.0, "focus_share": 1.0, "distil": distil}
        x, t, valid, focus = sample_batch(np.random.default_rng(1), [src], [src], [], 0.0, config, args)
        assert x.shape == focus.shape == (4, 224, 224)
        assert focus.any(axis=(1, 2)).all() == (distil > 0) and focus.any() == (distil > 0)


@pytest.mark.parametrize("option, message", [
    (["--frame-share", "1.5"], "--frame-share must be between 0 and 1"),
    (["--distil", "-1"], "--distil must not be negative"),
    (["--distil", "1"], "--distil needs --init"),
    (["--robust-distil", "1"], "--robust-distil needs --init"),
    (["--robust-distil", "-0.5"], "--robust-distil must not be negative"),
    (["--init", "x.pt", "--distil", "1", "--robust-distil", "1"], "give --distil or --robust-distil, not both"),
    (["--annotation-weight", "-1"], "--annotation-weight must not be negative"),
    (["--annotation-weight", "0"], "--annotation-weight 0 needs --distil or --robust-distil"),
    (["--frozen-batchnorm"], "--frozen-batchnorm needs --init"),
])
def test_a_bad_detector_training_option_is_a_one_line_error(tmp_path, capsys, option, message):
    cmd = ["train", "detector", "--out", str(tmp_path / "run"), "--steps", "1", *option]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_robust_distil_degrades_patches_as_a_poorer_scan_and_leaves_frames_alone():
    """``--robust-distil``'s student inputs: each patch degraded (coarser pixels, gamma, falloff, noise) in most
    of the batches, normalised again as at inference, some left clean; whole-slice frames never touched."""
    from SpineNetLib.training import augment, detector

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:224, 0:224]
    stripes = (cols % 2).astype(np.float32)                           # fine detail that coarser pixels blur
    patches = np.stack([augment.normalise_patch(stripes * (0.5 + rows / 448.0)) for _ in range(40)])
    degraded = detector.degraded_batch(rng, patches)
    assert degraded.shape == patches.shape and degraded.dtype == np.float32
    changed = [not np.array_equal(d, p) for d, p in zip(degraded, patches)]
    assert 0.6 < np.mean(changed) < 0.95                              # DEGRADE_SHARE 0.8 of the patches
    for d, p in zip(degraded, patches):                               # normalised as at inference
        assert np.allclose(d, augment.normalise_patch(d), atol=1e-5)
    detail = [np.abs(np.diff(d, axis=1)).mean() / np.abs(np.diff(p, axis=1)).mean()
              for d, p, c in zip(degraded, patches, changed) if c]
    assert min(detail) < 0.5                                          # some lost their fine detail
    frames = np.zeros((3, 256, 256), np.float32)
    frames[:, :200, :180] = 0.5
    assert detector.degraded_batch(rng, frames) is frames


def test_t1_contrast_makes_bright_fluid_dark_and_mid_grey_marrow_the_brightest():
    """``--degradation t1-contrast``: a T2-like patch (dark background, mid-grey marrow, bright fluid) comes out
    with the fluid darker than the marrow and the background still the darkest, in most patches of a batch,
    normalised again as at inference; some patches are left as they were."""
    from SpineNetLib.training import augment, detector

    patch = np.zeros((224, 224), np.float32)
    patch[20:200, 30:110] = 0.3          # marrow
    patch[20:200, 120:140] = 1.0         # cerebrospinal fluid
    patch[20:200, 150:210] = 0.15        # muscle
    patches = np.stack([augment.normalise_patch(patch)] * 30)
    out = detector.degraded_batch(np.random.default_rng(0), patches, "t1-contrast")
    assert out.shape == patches.shape and out.dtype == np.float32
    changed = [not np.array_equal(o, p) for o, p in zip(out, patches)]
    assert 0.6 < np.mean(changed) < 0.95                               # DEGRADE_SHARE 0.8 of the patches
    for o, c in zip(out, changed):
        assert np.allclose(o, augment.normalise_patch(o), atol=1e-5)
        if c:
            marrow, fluid, background = o[100, 70], o[100, 130], o[210, 10]
            assert background < fluid < marrow
    with pytest.raises(KeyError):
        detector.degraded_batch(np.random.default_rng(0), patches, "no-such-change")
    from SpineNetLib.training import labelling as training_labelling      # the appearance network's volumes
    volumes = np.repeat(patches[:8, :, :, None], 4, axis=3)
    out = training_labelling.degraded_volumes(np.random.default_rng(1), volumes, "t1-contrast")
    assert out.shape == volumes.shape
    changed = [not np.allclose(o, v, atol=1e-4) for o, v in zip(out, volumes)]   # normalised again: not equal
    assert any(changed)
    for o, c in zip(out, changed):
        if c:
            assert np.allclose(o[..., 0], o[..., 3])                      # every slice alike
            assert o[210, 10, 0] < o[100, 130, 0] < o[100, 70, 0]


def test_the_t1_like_benchmark_row_darkens_fluid_below_marrow_and_keeps_the_background_dark():
    """``benchmarks/acquisition_variants.py``'s ``t1_like`` row (a fixed member of ``t1-contrast``'s family) on a
    scan with exactly known tissues: the marrow comes out the brightest, the fluid dark grey, the background
    still the darkest, and the scan's geometry is kept."""
    import dataclasses
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "acquisition_variants.py"
    spec = importlib.util.spec_from_file_location("acquisition_variants", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    @dataclasses.dataclass
    class Scan:
        voxels: np.ndarray
        spacing_mm: tuple

    voxels = np.zeros((120, 100, 3), np.float32)
    voxels[10:110, 10:50] = 90.0        # marrow
    voxels[10:110, 55:62] = 250.0       # cerebrospinal fluid
    voxels[10:110, 65:95] = 40.0        # muscle
    out = bench.vary(Scan(voxels, (1.0, 1.0, 4.0)), "t1_like", None, 0)
    marrow, fluid, muscle, background = out.voxels[50, 30, 1], out.voxels[50, 58, 1], out.voxels[50, 80, 1], \
        out.voxels[115, 5, 1]
    assert background == 0.0 < fluid < marrow and muscle < marrow and out.spacing_mm == (1.0, 1.0, 4.0)


def test_a_volume_is_degraded_slice_by_slice_alike_and_a_patch_as_a_volume_of_one_slice():
    """``augment.degrade_acquisition`` on a volume (last axis the slices): the same coarser pixels, gamma and
    falloff on every slice, only the noise differs; a 2-D patch comes out exactly as that patch made a
    volume of one slice, so the detector's ``--robust-distil`` inputs are what they were."""
    rows, cols = np.mgrid[0:64, 0:64]
    plane = ((cols % 2) * (0.5 + rows / 128.0)).astype(np.float32)
    for seed in range(20):
        flat = augment.degrade_acquisition(np.random.default_rng(seed), plane)
        one = augment.degrade_acquisition(np.random.default_rng(seed), plane[:, :, None])
        np.testing.assert_array_equal(flat, one[:, :, 0])
    changed = 0
    for seed in range(20):
        volume = np.repeat(plane[:, :, None], 5, axis=2)
        out = augment.degrade_acquisition(np.random.default_rng(seed), volume)
        assert out.shape == volume.shape and out.dtype == np.float32
        means = out.mean(axis=(0, 1))
        assert means.max() - means.min() < 0.02 * means.mean()      # one change for all slices but the noise
        changed += not np.array_equal(out, volume)
    assert changed >= 12                                            # DEGRADE_SHARE 0.8 of them


def test_an_appearance_robust_distil_run_holds_its_levels_to_its_init_network(tmp_path, capsys):
    """``train appearance --robust-distil W``: refused without ``--init`` (before the run folder, from the CLI
    and from a direct call); with it, the student reads degraded volumes normalised again as at inference, its
    level probabilities held to those the ``--init`` network gives on the clean volumes (zero where the two are
    the same network on the same volume), the term logged and the weight recorded in ``config.json``."""
    import csv
    import json

    from SpineNetLib.apps.cli import build_parser
    from SpineNetLib.core.errors import InputError
    from SpineNetLib.training.common import frozen_copy
    from SpineNetLib.training.labelling import degraded_volumes, held_to_teacher, train_appearance

    def argv(name, *extra):
        return ["train", "appearance", "--out", str(tmp_path / name), "--steps", "2", "--batch-size", "2",
                "--seed", "3", "--phantom-fraction", "1", "--n-phantoms", "1", "--threads", "1", *extra]

    assert main(argv("no_init", "--robust-distil", "1")) == 2
    assert "--robust-distil needs --init" in capsys.readouterr().err
    with pytest.raises(InputError, match="--robust-distil needs --init"):
        train_appearance(build_parser().parse_args(argv("direct", "--robust-distil", "1")))
    assert not (tmp_path / "no_init").exists() and not (tmp_path / "direct").exists()

    assert main(argv("start")) == 0
    assert "robust_distil" not in json.loads((tmp_path / "start" / "config.json").read_text())
    assert main(argv("held", "--init", str(tmp_path / "start" / "appearance.pt"), "--robust-distil", "2")) == 0
    rows = list(csv.DictReader((tmp_path / "held" / "log.csv").open()))
    assert all(float(r["l_distil"]) >= 0.0 for r in rows)
    assert json.loads((tmp_path / "held" / "config.json").read_text())["robust_distil"] == 2.0

    torch.manual_seed(0)
    model = AppearanceNet().eval()
    teacher = frozen_copy(model, training=False)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    clean = labelling.normalise_volume(np.random.default_rng(1).uniform(0, 1, (224, 224, 16)).astype(np.float32))
    batch = np.stack([clean] * 2)
    x = torch.from_numpy(batch)[:, None]
    assert float(held_to_teacher(model(x), teacher, x)) == pytest.approx(0.0, abs=1e-6)
    degraded = degraded_volumes(np.random.default_rng(2), np.stack([clean] * 8))
    assert degraded.shape == (8, 224, 224, 16) and any(not np.array_equal(v, clean) for v in degraded)
    for volume in degraded:           # normalised as at inference: (v - min) / P95 of v
        assert volume.min() == pytest.approx(0.0, abs=1e-6) and np.percentile(volume, 95) <= 1.0 + 1e-5


def test_detector_patches_are_turned_within_max_rotation(monkeypatch):
    """``--max-rotation``: every patch and whole-slice frame is turned by at most that many degrees either way,
    and the range is used."""
    from SpineNetLib.training import augment, detector

    src = detector.phantom_sources(1, seed=0)[0]
    turned = []
    make_transform = augment.make_transform

    def recording(*args, **kwargs):
        turned.append(kwargs["rotation_deg"])
        return make_transform(*args, **kwargs)

    monkeypatch.setattr(augment, "make_transform", recording)
    rng = np.random.default_rng(0)
    for limit in (detector.MAX_ROTATION_DEG, 35.0):
        turned.clear()
        for _ in range(40):
            detector.sample_patch(rng, src, augment_strength=0.0, size=32, max_rotation_deg=limit)
        assert max(abs(a) for a in turned) <= limit and max(abs(a) for a in turned) > 0.8 * limit
        turned.clear()   # the whole-slice frames (--frame-share) too
        for _ in range(40):
            detector.sample_frame(rng, src, size=64, augment_strength=0.0, max_rotation_deg=limit)
        assert max(abs(a) for a in turned) <= limit and max(abs(a) for a in turned) > 0.8 * limit
