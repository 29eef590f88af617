"""Training of the small VFR detector (paper §4.4.1) on real cases plus phantom slices, on CPU.

Samples (one per batch item): a random training case (or, with probability
``phantom_fraction``, a slice of a seeded pool of random phantoms), one of its
annotated sagittal slices, a patch of ``260 mm * U(0.8, 1.25)`` around a
point near a vertebral body (20 % anywhere), rotated by U(-20, 20) degrees (``--max-rotation``) and
flipped with p = 0.5 (corner labels re-assigned by image position), sampled
to 224x224 in one resampling, intensity-augmented, then normalised exactly
as at inference (``augment``).  With ``--frame-share P``, a share P of the batches
holds whole slices instead, framed as the whole-slice detection plan frames them
(:func:`sample_frame`).  Targets: ``targets.render_vfr_maps`` of the
patch-frame quads.  Pixels outside the annotated band of a real case (the
unannotated S1 and bodies above the annotated run) and around bodies with no
usable quad (``dataset.slice_targets_and_loss_mask``) are ignored.

Loss (our analogue of the seed's Eq. 3, a "balanced L1"): for each heat-map
channel c (corners rt, rb, lb, lt and centroid), with P_c the valid pixels
whose target exceeds 0.05 and N_c the other valid pixels of the batch,

    L_heat = sum_c [ 0.5 * mean_{P_c} |y - t| + 0.5 * mean_{N_c} |y - t| ]

so the ~1 % of peak pixels weigh as much as the ~99 % of background (plain
L1 would be minimised by predicting 0 everywhere).  The vector-field loss is
``L_vec = mean over defined, valid pixels of ((y - t) / 10 px)^2`` on the 8
displacement channels (defined = within the corner's radius, where the
target is non-zero).  Total = L_heat + L_vec.

With ``--distil W`` (fine-tuning only), the same loss with the outputs of the
``--init`` detector as targets, over every pixel outside a clinical slice's
S1 and L5-S1 disc (:func:`focus_region`), is added with weight W: a fine-tune
on new S1 outlines may then move S1's outline but is held, everywhere else,
to the detector it starts from (learning without forgetting).

With ``--robust-distil W`` (fine-tuning only) the detector sees each patch degraded as a poorer scan of
another centre (:func:`degraded_batch`), and its outputs are held with weight W, over every pixel, to
those of the ``--init`` detector on the clean patch; ``--annotation-weight A`` scales the loss against the
annotations (0: the held outputs alone); ``--degradation t1-contrast`` shows it a T1-like contrast made from
the T2 patch instead.  Both tried on the bundled detector and not kept (docs/EXPERIMENTS.md, "The detector
taught to see a poorer scan as it sees a clean one"; "The detector and the appearance network taught a T1-like
contrast").

With ``--frozen-batchnorm`` (fine-tuning only) every BatchNorm layer of the detector (and of the held copy)
normalises with the ``--init`` detector's running statistics and does not update them
(:func:`freeze_batchnorm_statistics`); its scale and shift are still trained.  Why: in training mode the
statistics follow the batches, which under ``--robust-distil`` are mostly degraded patches, so after a
fine-tune the detector would normalise a clean scan with a degraded mix's statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from SpineNetLib.training import augment
from SpineNetLib.weights import checkpoints
from SpineNetLib.training import datasets as dataset
from SpineNetLib.training.datasets import case_scans
from SpineNetLib.detect import vfr as detection
from SpineNetLib.evaluation import evaluate
from SpineNetLib.core.errors import InputError
from SpineNetLib.models import DetectorConfig, VFRDetector
from SpineNetLib.training.provenance import WEIGHTS_KEYS
from SpineNetLib.training.targets import render_vfr_maps
from SpineNetLib.training import tianchi
from SpineNetLib.training.common import (
    RunFolder,
    check_held_to_init,
    frozen_copy,
    initial_weights,
    make_optimizer,
    random_phantom,
    real_data_config,
    resolve_device,
    seed_everything,
    set_threads,
    setting_if_changed,
    train_loop,
    training_volume_cases,
)

PATCH = 224
#: Positive pixels of a heat-map target (for the balanced L1).
POSITIVE_T = 0.05
#: Share of a source's patches centred near its focus quad (S1 of a clinical slice: the body the
#: detector used to miss, issue 10), on top of the uniform choice among all its bodies.
FOCUS_SHARE = 0.3
#: Patches are turned by up to this many degrees either way (``--max-rotation``).  The lowest lumbar
#: body already leans 13-29 degrees in clinical slices (bundled MODEL_CARD.md, "Other acquisitions").
MAX_ROTATION_DEG = 20.0
#: Canvas sizes of whole-slice frames (``--frame-share``): a lumbar slice of 26-37 cm at the
#: patches' scale (224 px per 26 cm) is 224-320 network pixels, padded to multiples of 32.
FRAME_SIZES = (256, 288, 320)
#: Scale of the displacement error in the L2 term (patch pixels).
VECTOR_SCALE_PX = 10.0
#: Margin (patch pixels, about 1.2 mm each) around the focus region of a clinical slice, where the
#: ``--distil`` term does not hold the student to its initial weights (:func:`focus_region`).
FOCUS_REGION_MARGIN_PX = 6


@dataclass
class SliceSource:
    """One volume whose slices can be sampled: voxels, spacing and per-slice targets."""

    name: str
    voxels: np.ndarray                       # (H, W, S) float32
    spacing_rc: tuple[float, float]
    quads: dict[int, np.ndarray]             # slice -> (N, 4, 2)
    ignore: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> (H, W) bool, True = no loss
    #: slice -> index of a quad that patches centre on more often (the sacrum of clinical slices)
    focus: dict[int, int] = field(default_factory=dict)
    #: slice -> index of the quad above the focus quad (L5 above S1): the focus region reaches up to it
    focus_above: dict[int, int] = field(default_factory=dict)


def real_sources(cases) -> list[SliceSource]:
    """Targets and loss masks of every annotated slice of the given real cases (computed once)."""
    out = []
    for case in cases:
        if case.source not in dataset.DETECTION_SOURCES:
            continue
        data = dataset.load_case(case)
        band = dataset.annotated_band(data.labels, case.source, data.spacing_mm)
        ref = dataset.body_reference_areas(data.labels)
        quads, ignore = {}, {}
        for s in range(data.labels.shape[2]):
            if not data.labels[:, :, s].any():
                continue
            tg, keep = dataset.slice_targets_and_loss_mask(data.labels[:, :, s], band, data.level_names,
                                                           reference_areas=ref)
            if not tg:
                continue
            quads[s] = np.stack([t.quad for t in tg]).astype(np.float64)
            ignore[s] = ~keep
        if quads:
            out.append(SliceSource(case.case_id, data.voxels.astype(np.float32),
                                   (float(data.spacing_mm[0]), float(data.spacing_mm[1])), quads, ignore))
    return out


def tianchi_sources(data_root, targets_path) -> list[SliceSource]:
    """The pseudo-labelled training studies of ``tianchi/`` (``training.tianchi``) as one-slice sources."""
    out = []
    for case, targets in tianchi.training_studies(data_root, targets_path):
        data = dataset.load_case(case)
        voxels = data.voxels.astype(np.float32)
        levels = list(targets.quads)
        quads = np.stack([targets.quads[k] for k in levels]).astype(np.float64)
        ignore = tianchi.loss_ignore_mask(targets, voxels.shape[:2])
        focus = {0: levels.index("S1")} if "S1" in levels else {}
        above = {0: levels.index("L5")} if focus and "L5" in levels else {}
        out.append(SliceSource(case.case_id, voxels, (float(data.spacing_mm[0]), float(data.spacing_mm[1])),
                               {0: quads}, {0: ignore}, focus, above))
    return out


def phantom_sources(n: int, seed: int) -> list[SliceSource]:
    """A seeded pool of ``n`` random phantoms (5 slices each) with exact quads on every slice."""
    rng = np.random.default_rng([int(seed), 7])
    out = []
    for i in range(int(n)):
        ph = random_phantom(rng, n_slices=5)
        quads: dict[int, list] = {}
        for v in ph.vertebrae:
            if v.extra:
                continue
            for s, q in v.quads.items():
                quads.setdefault(int(s), []).append(np.asarray(q, float))
        quads_np = {s: np.stack(q) for s, q in quads.items() if q}
        out.append(SliceSource(f"phantom{i}_{ph.params.fov}_{ph.params.contrast}", ph.scan.voxels.astype(np.float32),
                               (float(ph.scan.spacing_mm[0]), float(ph.scan.spacing_mm[1])), quads_np, {}))
    return out


def sample_patch(rng: np.random.Generator, src: SliceSource, *, augment_strength: float = 1.0,
                 size: int = PATCH, focus_share: float = FOCUS_SHARE, with_focus_region: bool = False,
                 max_rotation_deg: float = MAX_ROTATION_DEG):
    """(input (P, P), targets (13, P, P), valid (P, P) bool, focus region (P, P) bool) of one random
    patch of ``src``; the focus region (:func:`focus_region`, a few ms) only ``with_focus_region``
    (``--distil``), else all False."""
    s = int(rng.choice(sorted(src.quads)))
    quads = src.quads[s]
    img = src.voxels[:, :, s]
    h, w = img.shape
    sr, sc = src.spacing_rc
    if s in src.focus and rng.random() < focus_share:
        c = quads[src.focus[s]].mean(axis=0)
        center = c + rng.normal(0.0, 40.0, 2) / np.array([sc, sr])
    elif rng.random() < 0.8:
        c = quads[int(rng.integers(len(quads)))].mean(axis=0)
        center = c + rng.normal(0.0, 40.0, 2) / np.array([sc, sr])
    else:
        center = np.array([rng.uniform(0, w - 1), rng.uniform(0, h - 1)])
    tf = augment.make_transform(center, (sr, sc), size=size, scale=float(rng.uniform(0.8, 1.25)),
                                rotation_deg=float(rng.uniform(-max_rotation_deg, max_rotation_deg)),
                                flip=bool(rng.random() < 0.5))
    patch, ign = augment.resample_with_ignore(img, src.ignore.get(s), tf)
    target, valid = _targets_and_valid(tf, quads, ign)
    x = augment.augment_intensity(rng, patch, strength=augment_strength)
    x = augment.normalise_patch(x)
    region = focus_region(tf, src, s) if with_focus_region else np.zeros((size, size), bool)
    return x, target, valid, region


def focus_region(tf: augment.PatchTransform, src: SliceSource, s: int) -> np.ndarray:
    """Patch pixels of slice ``s``'s focus region: the convex hull of the focus quad (S1) and the
    lower edge of the quad above it (L5), widened by ``FOCUS_REGION_MARGIN_PX``; all False where
    ``s`` has no focus.

    That is where S1's outline and the L5-S1 disc lie, the only place where the training outlines
    of a clinical slice differ between the S1 constructions (``training/tianchi.py``), so the only
    place where ``--distil`` lets the fine-tuned detector move away from the one it starts from.
    """
    from scipy import ndimage
    from scipy.spatial import ConvexHull
    from skimage.draw import polygon

    region = np.zeros((tf.size, tf.size), bool)
    if s not in src.focus:
        return region
    focus = src.quads[s][src.focus[s]]
    points = [focus]
    if s in src.focus_above:                          # the lower edge of the quad above: its 2 corners nearest
        above = src.quads[s][src.focus_above[s]]
        points.append(above[np.argsort(np.linalg.norm(above - focus.mean(axis=0), axis=1))[:2]])
    points = tf.scan_to_patch(np.concatenate(points))                        # (u, v) patch pixels
    hull = points[ConvexHull(points).vertices]
    rows, cols = polygon(hull[:, 1], hull[:, 0], shape=region.shape)
    region[rows, cols] = True
    if not region.any():
        return region
    return ndimage.distance_transform_edt(~region) <= FOCUS_REGION_MARGIN_PX


def _targets_and_valid(tf: augment.PatchTransform, quads: np.ndarray, ignore: np.ndarray | None):
    """Target maps of the quads that come within 40 px of the ``tf.size`` square, and its loss mask."""
    size = tf.size
    qp = tf.quads_to_patch(quads)
    lo, hi = qp.min(axis=1), qp.max(axis=1)
    keep = (hi[:, 0] > -40) & (lo[:, 0] < size + 40) & (hi[:, 1] > -40) & (lo[:, 1] < size + 40)
    valid = np.ones((size, size), bool) if ignore is None else ~ignore
    return render_vfr_maps(qp[keep], (size, size)), valid


def sample_frame(rng: np.random.Generator, src: SliceSource, *, size: int, augment_strength: float = 1.0,
                 max_rotation_deg: float = MAX_ROTATION_DEG):
    """(input, targets, valid, focus region (none)) of one whole slice framed as the whole-slice plan frames it (issue 16).

    The plan (``detect/plans.py``) resizes a slice to the patches' network scale, puts it at the
    top left of the input and pads the bottom and right with zeros (the normalised minimum); the
    frame is normalised as one.  The detector, trained on 224-pixel patches only, found S1 less
    often so framed (benchmarks/RESULTS.md, "Detection plans").  Here the slice gets the patches'
    scale jitter, rotation and flip, lands with its bounding box at the top left of a ``size``
    square canvas (a random crop of it where it is larger), is normalised over that box alone and
    padded with zeros beyond it.
    """
    s = int(rng.choice(sorted(src.quads)))
    quads, img = src.quads[s], src.voxels[:, :, s]
    h, w = img.shape
    sr, sc = src.spacing_rc
    tf = augment.make_transform(np.array([(w - 1) / 2.0, (h - 1) / 2.0]), (sr, sc), size=size,
                                patch_mm=260.0 * size / PATCH,       # the patches' pixel size, 26 cm per 224
                                scale=float(rng.uniform(0.8, 1.25)),
                                rotation_deg=float(rng.uniform(-max_rotation_deg, max_rotation_deg)),
                                flip=bool(rng.random() < 0.5))
    corners = tf.scan_to_patch(np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]]))
    low, extent = corners.min(axis=0), np.ptp(corners, axis=0)          # (u, v) canvas pixels
    offset = np.array([rng.uniform(min(0.0, size - e), 0.0) for e in extent])   # crop where larger
    tf = augment.PatchTransform(A=tf.A, b=tf.b + tf.A @ (low - offset), flipped=tf.flipped, size=size)
    canvas, ign = augment.resample_with_ignore(img, src.ignore.get(s), tf)
    cols, rows = (int(min(size, np.ceil(e + o))) for e, o in zip(extent, offset))
    frame = augment.augment_intensity(rng, canvas[:rows, :cols], strength=augment_strength)
    x = np.zeros((size, size), np.float32)
    x[:rows, :cols] = augment.normalise_patch(frame)
    return (x, *_targets_and_valid(tf, quads, ign), np.zeros((size, size), bool))


def freeze_batchnorm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each BatchNorm layer in evaluation mode: it normalises with its running statistics and
    leaves them unchanged (``--frozen-batchnorm``).  ``train_loop`` puts the model in training mode before
    each step, so call this after it, in the step."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def detector_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
    """Balanced L1 on channels 0-4 + scaled L2 on 5-12 (module docstring); returns (loss, parts)."""
    v = valid[:, None].float()                                   # (B, 1, H, W)
    heat_p, heat_t = pred[:, :5], target[:, :5]
    err = (heat_p - heat_t).abs()
    pos = (heat_t > POSITIVE_T).float() * v
    neg = (heat_t <= POSITIVE_T).float() * v
    l_pos = (err * pos).sum(dim=(0, 2, 3)) / pos.sum(dim=(0, 2, 3)).clamp(min=1.0)
    l_neg = (err * neg).sum(dim=(0, 2, 3)) / neg.sum(dim=(0, 2, 3)).clamp(min=1.0)
    l_heat = (0.5 * l_pos + 0.5 * l_neg).sum()
    vt = target[:, 5:]
    defined = ((vt[:, :4] != 0) | (vt[:, 4:] != 0)).float() * v  # (B, 4, H, W) per corner type
    defined = torch.cat([defined, defined], dim=1)
    l_vec = (((pred[:, 5:] - vt) / VECTOR_SCALE_PX) ** 2 * defined).sum() / defined.sum().clamp(min=1.0)
    return l_heat + l_vec, {"l_pos": float(l_pos.detach().mean()), "l_neg": float(l_neg.detach().mean()), "l_vec": float(l_vec.detach())}


# --------------------------------------------------------------------------- validation


def to_native_predictions(vertebrae, scan, native) -> list[evaluate.PredictedVertebra]:
    """Predictions on ``scan`` (e.g. slab-averaged) in ``native``'s canonical frame (fractional slices)."""
    m = np.linalg.inv(native.canonical_to_ras) @ scan.canonical_to_ras
    out = []
    for v in vertebrae:
        slices, polys = [], []
        for s, p in zip(v.slices, v.polygons):
            p = np.asarray(p, float)
            pts = np.column_stack([p[:, 1], p[:, 0], np.full(4, float(s)), np.ones(4)]) @ m.T
            slices.append(float(pts[:, 2].mean()))
            polys.append(np.column_stack([pts[:, 1], pts[:, 0]]))
        order = np.argsort(slices, kind="stable")
        out.append(evaluate.PredictedVertebra(level=v.level, slices=np.asarray(slices)[order],
                                              polygons=[polys[i] for i in order]))
    return out


def validate(detector, cases, device="cpu", *, appearance=None, context=None, thick_only: bool = False,
             log=print) -> dict:
    """Real pipeline on validation cases: full 1 mm stack and the slab-averaged stack.

    Detection with ``detection.detect_vertebrae`` + ``network_predictor``; with
    ``appearance`` and ``context`` also ``labelling.label_vertebrae`` (end to
    end, on the slab-averaged scan as ``spinenet run`` does).  Returns
    ``{"native": summary, "thick": summary}`` (``evaluate.summarise``).
    """
    from SpineNetLib.label import labelling

    predict = detection.network_predictor(detector, device=str(device))
    res = {"native": [], "thick": []}
    for case in cases:
        native, thick, data = case_scans(case)
        gt = evaluate.ground_truth_from_labels(data.labels, data.spacing_mm, data.level_names, case.case_id)
        for name, scan in (("native", native), ("thick", thick)):
            if thick_only and name == "native":
                continue
            t0 = time.time()
            det = detection.detect_vertebrae(scan, predict)
            verts = det.vertebrae
            if appearance is not None and context is not None and verts:
                verts = labelling.label_vertebrae(scan, verts, appearance, context,
                                                  labelling.params_for_context(context), device=str(device))
            m = evaluate.evaluate_case(gt, to_native_predictions(verts, scan, native))
            res[name].append(m)
            log(f"val {name:6s} {case.case_id:18s} P={m.precision:.3f} R={m.recall:.3f} "
                f"IDR={m.identification_rate:.3f} err={m.mean_localisation_error_mm:.2f}mm "
                f"tp={m.tp} fp={m.fp} fn={m.fn} levels={[v.level for v in verts]} ({time.time() - t0:.1f}s)")
    out = {k: evaluate.summarise(v) for k, v in res.items() if v}
    for k, v in out.items():
        o = v["overall"]
        log(f"val {k} overall: precision={o['precision']} recall={o['recall']} IDR={o['identification_rate']} "
            f"IDR1={o['identification_rate_within_1']} err_mm={o['localisation_error_mm_mean']}")
    return out


# --------------------------------------------------------------------------- heat-map gain calibration

#: Gains tried for the corner (channels 0-3) and centroid (channel 4) heat maps.
CORNER_GAINS = (1.0, 1.25, 1.5, 1.8, 2.2)
CENTROID_GAINS = (1.0, 1.2)
#: Training cases used for the calibration: three per source with volumes (zukic/ is all held out).
CALIBRATION_CASES = ("chu_04", "chu_12", "chu_16", "myo_02", "myo_17", "myo_24")


def scale_heat_outputs(model, corner_gain: float, centroid_gain: float) -> None:
    """Multiply the raw heat-map outputs by fixed gains, folded into the last 1x1 conv (in place)."""
    with torch.no_grad():
        model.out.weight[:4] *= corner_gain
        model.out.bias[:4] *= corner_gain
        model.out.weight[4] *= centroid_gain
        model.out.bias[4] *= centroid_gain


def calibrate_heat_gain(model_path, cases, device="cpu", log=print) -> dict:
    """Pick the heat-map gains that maximise detection F1 on (training) cases' slab-averaged scans.

    Why: the balanced L1 (module docstring) is minimised by the conditional
    median, which lies below 1 at peaks whose position is uncertain by a
    pixel or two, so a briefly trained small detector's corner peaks
    (~0.5) can stay under the official fixed 0.6 threshold.  A constant gain
    on the raw maps restores the peak height without touching the
    architecture or the decoder's threshold.
    """
    import itertools

    data = [case_scans(c) for c in cases]
    results, best = {}, None
    for gc, gm in itertools.product(CORNER_GAINS, CENTROID_GAINS):
        m = checkpoints.load_model("detector", model_path, device=str(device))
        scale_heat_outputs(m, gc, gm)
        pred = detection.network_predictor(m, device=str(device))
        res = []
        for c, (native, thick, d) in zip(cases, data):
            gt = evaluate.ground_truth_from_labels(d.labels, d.spacing_mm, d.level_names, c.case_id)
            r = detection.detect_vertebrae(thick, pred)
            res.append(evaluate.evaluate_case(gt, to_native_predictions(r.vertebrae, thick, native)))
        o = evaluate.summarise(res)["overall"]
        f1 = 2 * o["tp"] / max(1, 2 * o["tp"] + o["fp"] + o["fn"])
        results[f"{gc}_{gm}"] = {"corner_gain": gc, "centroid_gain": gm, "f1": f1, **o}
        log(f"calibration corner_gain={gc} centroid_gain={gm} P={o['precision']} R={o['recall']} F1={f1:.4f}")
        if best is None or f1 > best[0] + 1e-9:
            best = (f1, gc, gm)
    return {"cases": [c.case_id for c in cases], "results": results,
            "chosen": {"corner_gain": best[1], "centroid_gain": best[2]}}


# --------------------------------------------------------------------------- the command


def sample_batch(rng, real, clinical, phantoms, phantom_fraction: float, config: dict, args):
    """(inputs (B, P, P), targets (B, 13, P, P), valid (B, P, P), focus regions (B, P, P)) of one batch:
    whole-slice frames of one canvas size (``--frame-share``), or patches; each item from a phantom
    (``phantom_fraction``), a clinical slice (``--tianchi-fraction`` of the rest) or a real volume."""
    items = []
    frame_size = (int(rng.choice(FRAME_SIZES)) if config["frame_share"] > 0 and rng.random() < config["frame_share"]
                  else None)
    max_rotation_deg = config.get("max_rotation_deg", MAX_ROTATION_DEG)
    for _ in range(args.batch_size):
        pool = phantoms if rng.random() < phantom_fraction else real
        if pool is real and clinical and rng.random() < config["tianchi_fraction"]:
            pool = clinical
        src = pool[int(rng.integers(len(pool)))]
        if frame_size:
            items.append(sample_frame(rng, src, size=frame_size, augment_strength=args.augment,
                                      max_rotation_deg=max_rotation_deg))
        else:
            items.append(sample_patch(rng, src, augment_strength=args.augment, focus_share=config["focus_share"],
                                      with_focus_region=config["distil"] > 0,
                                      max_rotation_deg=max_rotation_deg))
    return tuple(np.stack(column) for column in zip(*items))


def degraded_batch(rng: np.random.Generator, inputs: np.ndarray,
                   degradation: str = augment.DEFAULT_DEGRADATION) -> np.ndarray:
    """The normalised inputs ``(B, P, P)`` of a batch, each degraded as another centre's poorer scan
    (``augment.DEGRADATIONS[degradation]``: by default ``degrade_acquisition``) and normalised again as at
    inference: the student's inputs of ``--robust-distil``.  Whole-slice frames (``FRAME_SIZES``, zero padding
    beyond the slice, which a second normalisation would move) are left as they are."""
    if inputs.shape[-1] != PATCH:
        return inputs
    change = augment.DEGRADATIONS[degradation]
    return np.stack([augment.normalise_patch(change(rng, x)) for x in inputs])


def _later_settings(args) -> dict:
    """The run-config entries of the options added after the bundled detector's run, each only where it is not
    its default (``setting_if_changed``: older run folders still resume)."""
    return {**setting_if_changed("robust_distil", float(getattr(args, "robust_distil", 0.0) or 0.0), 0.0),
            **setting_if_changed("annotation_weight", float(getattr(args, "annotation_weight", 1.0)), 1.0),
            **setting_if_changed("max_rotation_deg", float(getattr(args, "max_rotation", MAX_ROTATION_DEG)),
                                 MAX_ROTATION_DEG),
            **setting_if_changed("frozen_batchnorm", bool(getattr(args, "frozen_batchnorm", False)), False),
            **setting_if_changed("degradation", str(getattr(args, "degradation", augment.DEFAULT_DEGRADATION)),
                               augment.DEFAULT_DEGRADATION)}


def _holds_outputs(config: dict) -> bool:
    """Whether the run holds the detector's outputs to its ``--init`` weights (``--distil`` or ``--robust-distil``)."""
    return config["distil"] > 0 or config.get("robust_distil", 0.0) > 0


def held_copy(model: torch.nn.Module, config: dict) -> torch.nn.Module | None:
    """The frozen copy of the ``--init`` detector that ``--distil`` or ``--robust-distil`` holds the outputs to,
    else None.

    It stays in training mode: its BatchNorm layers normalise with the statistics of the same batch as the
    student's, so the two agree exactly at the first step (in evaluation mode they would differ by the gap
    between batch and running statistics, which the term would then try to close).  With
    ``--frozen-batchnorm`` both normalise with the running statistics instead, and agree as well."""
    if not _holds_outputs(config):
        return None
    held = frozen_copy(model, training=True)
    return freeze_batchnorm_statistics(held) if config.get("frozen_batchnorm", False) else held


def train(args) -> Path:
    """``spinenet train detector``: returns the path of the final fp16 model."""
    set_threads(args.threads)
    device = resolve_device(args.device)
    cfg = DetectorConfig(tuple(args.config_blocks), args.base_width)
    config = {"kind": "detector", "data": str(Path(args.data).resolve()) if args.data else None,
              "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
              "weight_decay": args.weight_decay, "phantom_fraction": args.phantom_fraction,
              "n_phantoms": args.n_phantoms, "blocks": list(cfg.blocks), "base_width": cfg.base_width,
              "max_cases": args.max_cases, "augment": args.augment, **real_data_config(args),
              "focus_share": getattr(args, "focus_share", FOCUS_SHARE),
              "frame_share": float(getattr(args, "frame_share", 0.0) or 0.0),
              "distil": float(getattr(args, "distil", 0.0) or 0.0)}
    config.update(_later_settings(args))
    robust_distil = config.get("robust_distil", 0.0)
    degradation = config.get("degradation", augment.DEFAULT_DEGRADATION)
    annotation_weight = config.get("annotation_weight", 1.0)
    frozen_batchnorm = config.get("frozen_batchnorm", False)
    check_held_to_init(config["init"], {"--distil": config["distil"], "--robust-distil": robust_distil},
                       frozen_batchnorm)
    run = RunFolder(args.out, config, resume=args.resume)
    rng = seed_everything(args.seed)
    model = VFRDetector(cfg).to(device)
    initial_weights(model, config["init"])
    teacher = held_copy(model, config)
    opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.steps, warmup=min(200, args.steps // 10))

    t0 = time.time()
    train_cases, val_cases = training_volume_cases(args)
    real = real_sources(train_cases)
    clinical = tianchi_sources(args.data, config["tianchi_targets"]) if config["tianchi_targets"] and args.data else []
    phantoms = phantom_sources(args.n_phantoms, args.seed) if args.phantom_fraction > 0 else []
    if not real and not phantoms:
        raise InputError("no training data: give --data with cases or a --phantom-fraction > 0")
    print(f"data: {len(real)} real cases, {len(clinical)} tianchi slices, {len(phantoms)} phantoms "
          f"({time.time() - t0:.1f}s)", flush=True)
    pf = args.phantom_fraction if real else 1.0
    if not phantoms:
        pf = 0.0

    def step_fn(step):
        batch = sample_batch(rng, real, clinical, phantoms, pf, config, args)
        student_input = (degraded_batch(rng, batch[0], degradation) if robust_distil > 0 else batch[0])
        x, t, v, focus = (torch.from_numpy(a).to(device) for a in batch)
        x_student = torch.from_numpy(student_input).to(device)[:, None]
        if frozen_batchnorm:
            freeze_batchnorm_statistics(model)
        pred = model(x_student)
        loss, parts = detector_loss(pred, t, v)
        loss = annotation_weight * loss
        if teacher is not None:
            with torch.no_grad():
                held = teacher(x[:, None])
            if robust_distil > 0:         # the teacher's outputs on the clean patch, everywhere
                weight, l_distil = robust_distil, detector_loss(pred, held, torch.ones_like(v))[0]
            else:
                weight, l_distil = config["distil"], detector_loss(pred, held, ~focus)[0]
            loss = loss + weight * l_distil
            parts["l_distil"] = float(l_distil.detach())
        return loss, parts

    val_every = int(args.val_every or 0)

    def on_validate(step):
        if val_cases:
            summary = validate(model.eval(), val_cases[:3], device, thick_only=True)
            run.write_json(f"val_metrics_step{step}.json", summary)

    train_loop(run, model, opt, sched, rng, args.steps, step_fn, save_every=args.save_every,
               on_validate=on_validate, val_every=val_every, stop_after=getattr(args, "stop_after", None))
    final = run.path / "detector.pt"
    if (run.path / "checkpoint-latest.pt").is_file():
        state = torch.load(run.path / "checkpoint-latest.pt", map_location="cpu", weights_only=False)
        if state["step"] >= args.steps:
            checkpoints.save_checkpoint(final, "detector", model.cpu(), half=True,
                                        extra={"epoch": int(args.steps), "seed": int(args.seed),
                                               **run.weights_extra()})
            print(f"wrote {final}", flush=True)
            n_cal = int(getattr(args, "calibrate_cases", 0) or 0)
            if train_cases and n_cal > 0:
                # the fixed calibration cases (training cases, two per source) if present, else
                # every k-th training case; never validation cases
                cal_cases = [c for c in train_cases if c.case_id in CALIBRATION_CASES][:n_cal]
                if not cal_cases:
                    cal_cases = train_cases[::max(1, len(train_cases) // n_cal)][:n_cal]
                cal = calibrate_heat_gain(final, cal_cases, device)
                run.write_json("calibration.json", cal)
                model = checkpoints.load_model("detector", final, device=str(device))
                scale_heat_outputs(model, cal["chosen"]["corner_gain"], cal["chosen"]["centroid_gain"])
                checkpoints.save_checkpoint(final, "detector", model.cpu(), half=True,
                                            extra={"epoch": int(args.steps), "seed": int(args.seed),
                                                   **run.weights_extra(),
                                                   "corner_heat_gain": cal["chosen"]["corner_gain"],
                                                   "centroid_heat_gain": cal["chosen"]["centroid_gain"]})
                print(f"calibrated heat gains {cal['chosen']}; rewrote {final}", flush=True)
            if val_cases and not args.no_val:
                model = checkpoints.load_model("detector", final, device=str(device))
                summary = validate(model, val_cases, device)
                run.write_json("val_metrics.json", summary)
    return final


def without_last_deep_block(model: VFRDetector) -> VFRDetector:
    """A copy of ``model`` without the last bottleneck of its deepest encoder stage.

    The block is residual (it adds to what passes through it), so the rest of the network works
    without it; the bundled S1-outline detector is a trained detector shrunk this way to fit the
    15 MB budget of the bundled weights (MODEL_CARD.md, "S1's outline").
    """
    blocks = list(model.config.blocks)
    if blocks[-1] < 2:
        raise InputError("the deepest stage has one block only: it cannot lose one")
    smaller = VFRDetector(DetectorConfig(tuple(blocks[:-1] + [blocks[-1] - 1]), model.config.base_width))
    dropped = f"down_blocks.{len(blocks) - 1}.{blocks[-1] - 1}."
    smaller.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}, strict=True)
    return smaller.eval()


def shrink_detector(source: Path, out: Path) -> Path:
    """``spinenet train drop-last-block``: :func:`without_last_deep_block` of the detector checkpoint
    ``source``, written fp16 to ``out`` with the source's heat-map gains, seed and step count."""
    model = checkpoints.load_model("detector", source)
    stored = model.checkpoint_meta   # the file's scalar entries, read with the weights
    kept = ("epoch", "seed", "corner_heat_gain", "centroid_heat_gain", *WEIGHTS_KEYS)
    extra = {k: stored[k] for k in kept if k in stored}
    return checkpoints.save_checkpoint(out, "detector", without_last_deep_block(model), half=True,
                                       extra={**extra, "shrunk_from_blocks": list(model.config.blocks)})
