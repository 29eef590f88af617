"""Training of the appearance and context networks of the labelling stage (paper §3.2, official §3.2-3.3).

Appearance: straightened 224x224x16 volumes cut by
``labelling.extract_vertebra_volume`` around ground-truth bodies, whose
average polygon is jittered (+-5 % size, +-3 deg, +-3 px) the way a detector
would err; the scan randomly cut above and below the body
(:func:`truncate_field_of_view`, so that where the image ends is no cue to
the level); intensity-augmented (``augment.augment_intensity``) and
re-normalised with ``labelling.normalise_volume`` (the inference
normalisation).  Real cases cover T10..S1 only, so half of the samples come
from a seeded pool of random phantoms (all levels C2..S1 and the first sacral
segment below S1 as class S1, T1/T2/STIR); the
level of every sample is drawn uniformly first (class balance), then a body of
that level.  Real volumes are the slab-averaged ~4 mm scans ``spinenet run``
makes from these 1 mm data (``canonical.scan_from_array``).  Loss:
cross-entropy of ``logits / T`` with T = ``LabellingParams.temperature`` (10),
so that the pipeline's ``softmax(logits / 10)`` is what was trained.
With ``--robust-distil W`` (fine-tuning only) the network reads each volume degraded as another centre's
poorer scan (:func:`degraded_volumes`), and its level probabilities are also held, with weight W, to those
its ``--init`` weights give on the clean volume (:func:`held_to_teacher`); ``--degradation t1-contrast``
shows it a T1-like contrast made from the T2 volume instead.  Both tried on the bundled network and not kept
(docs/EXPERIMENTS.md, "The appearance network taught to read a poorer scan"; "The detector and the appearance
network taught a T1-like contrast").

Context: the network only sees geometry and appearance vectors, so it is
trained on synthetic "label images" built exactly as
``labelling.build_height_map`` builds them (1 row per mm, a band of the
middle half of each body's vertical extent holds its appearance vector,
zero-padded to a multiple of 256 rows): random spines with textbook body
heights and disc heights (``phantom.BODY_TABLE`` / ``DISC_TABLE``) varied
per subject and per level, random fields of view (cervical, thoracic,
lumbar, whole, partial), 10 % dropped detections, a missed
sacrum (S1 and S2 left out of half the maps that reach it), runs of upper
bodies whose appearance is one level off together (:func:`block_shifts`), a detected S2 below S1
(target S1, as the official S2 rule expects), transitional anatomy
(lumbarised S1, sacralised L5) and appearance-like rows (noisy probability
vectors peaked at, or one or two levels off, the true level, or nearly flat).
Target: the true level on every band row; loss: cross-entropy of
``output / T`` on the band rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from SpineNetLib.training import augment
from SpineNetLib.weights import checkpoints
from SpineNetLib.training import datasets as dataset
from SpineNetLib.label import labelling
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVELS, LEVELS_TOP_DOWN, N_LEVELS, level_index
from SpineNetLib.models import AppearanceNet, ContextNet
from SpineNetLib.core.results import Vertebra
from SpineNetLib.training.common import (
    RunFolder,
    WeightAverage,
    WorkerBatches,
    check_held_to_init,
    frozen_copy,
    initial_weights,
    make_optimizer,
    random_phantom,
    real_data_config,
    resolved_path,
    resolve_device,
    seed_everything,
    set_threads,
    setting_if_changed,
    train_loop,
    training_volume_cases,
)

TEMPERATURE = labelling.LabellingParams().temperature


# =========================================================================== appearance


@dataclass
class BodySample:
    """One ground-truth vertebral body: which scan, its level class and its average polygon."""

    scan_index: int
    level: int            # class index in levels.LEVELS
    polygon: np.ndarray   # (4, 2) average polygon in the scan's pixels


def real_bodies(cases, scans: list, start_index: int = 0,
                pseudo_labelled: dict[str, dict[str, np.ndarray]] | None = None) -> list[BodySample]:
    """Bodies of real cases (average of their per-slice quads); appends the slab-averaged scans.

    ``pseudo_labelled``: further bodies by case id, level -> average polygon in the slab-averaged scan's
    pixels (the checked S1 outlines of ``training/volume_s1.py``)."""
    out = []
    for case in cases:
        if case.source not in dataset.DETECTION_SOURCES:
            continue
        native, thick, data = dataset.case_scans(case)
        ref = dataset.body_reference_areas(data.labels)
        polys: dict[str, list[np.ndarray]] = {}
        for s in range(data.labels.shape[2]):
            if not data.labels[:, :, s].any():
                continue
            for t in dataset.slice_targets(data.labels[:, :, s], data.level_names, reference_areas=ref):
                polys.setdefault(t.level, []).append(t.quad)
        idx = start_index + len(scans)
        scans.append(thick)
        for level, ps in polys.items():
            if level in LEVELS:
                out.append(BodySample(idx, level_index(level), np.mean(np.stack(ps), axis=0)))
        for level, quad in (pseudo_labelled or {}).get(case.case_id, {}).items():
            if level in LEVELS and level not in polys:
                out.append(BodySample(idx, level_index(level), np.asarray(quad, float)))
    return out


def tianchi_bodies(data_root, targets_path, scans: list) -> list[BodySample]:
    """Pseudo-labelled bodies (T12, L1-L5, S1) of the tianchi training studies (``training.tianchi``),
    less the calibration studies."""
    from SpineNetLib.training import tianchi
    out = []
    # the calibration studies stay unseen: the labelling's appearance weight and review threshold
    # are chosen on them (datasets.calibration_split, MODEL_CARD.md)
    for case, targets in tianchi.training_studies(data_root, targets_path, without_calibration=True):
        idx = len(scans)
        scans.append(dataset.case_scans(case)[1])
        out.extend(BodySample(idx, level_index(level), quad) for level, quad in targets.quads.items())
    return out


def phantom_bodies(n: int, seed: int, scans: list) -> list[BodySample]:
    """Bodies of a seeded pool of random phantoms (9-17 slices of 3-5 mm).

    The first fused sacral segment below S1 ("S2") is a sample of class S1:
    the official labelling has no S2 class and names a second S1 at the
    bottom "S2" (official §5.5), so a detected S2 must look like S1 to the
    appearance net, not like L5 (which would shift every level up by one).
    """
    rng = np.random.default_rng([int(seed), 11])
    out = []
    for _ in range(int(n)):
        ph = random_phantom(rng, n_slices=int(rng.integers(9, 18)), include_s2=True)
        idx = len(scans)
        scans.append(ph.scan)
        for v in ph.vertebrae:
            level = "S1" if v.level == "S2" else v.level
            if level not in LEVELS:
                continue
            avg = np.mean(np.stack([np.asarray(v.quads[s], float) for s in v.slices]), axis=0)
            out.append(BodySample(idx, level_index(level), avg))
    return out


def jitter_polygon(rng: np.random.Generator, poly: np.ndarray, amount: float = 1.0) -> np.ndarray:
    """+-5 % size, +-3 degrees, +-3 px shift (uniform), about the polygon's centroid."""
    c = poly.mean(axis=0)
    s = 1.0 + amount * rng.uniform(-0.05, 0.05)
    a = np.deg2rad(amount * rng.uniform(-3.0, 3.0))
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    corner_noise = rng.uniform(-1.0, 1.0, (4, 2)) * amount
    return (poly - c) @ r.T * s + c + amount * rng.uniform(-3.0, 3.0, 2) + corner_noise


#: A random field-of-view cut lies at least this many body heights from the body (``--edge-gap``).
MIN_EDGE_GAP_BODY_HEIGHTS = 0.3


def truncate_field_of_view(rng: np.random.Generator, scan, polygon: np.ndarray,
                           min_gap: float = MIN_EDGE_GAP_BODY_HEIGHTS):
    """The scan cut at random rows above and/or below the body, and the polygon moved with it.

    Every real training series of one source starts and ends at much the same
    anatomy (``chu/`` always shows T10-T11 at its top edge), so without this
    the network learns "zero padding at the top of the crop means T11" instead
    of the anatomy, and labels the top body of any other field of view
    wrongly.  Each edge is cut with probability 0.5 at a row drawn between
    1.5 crop-thirds and ``min_gap`` body heights away from the body, i.e. inside the
    appearance crop (which reaches one body size L beyond the body,
    official §5.4), so the crop sees an image edge at a random place.
    """
    import dataclasses

    height = scan.voxels.shape[0]
    ys = np.asarray(polygon, float)[:, 1]
    y_top, y_bottom = float(ys.min()), float(ys.max())
    body = max(y_bottom - y_top, 1.0)
    size = 1.5 * body
    first, end = 0, height
    if rng.random() < 0.5:
        lo, hi = max(0.0, y_top - size), y_top - min_gap * body
        if hi > lo:
            first = int(rng.uniform(lo, hi))
    if rng.random() < 0.5:
        lo, hi = y_bottom + min_gap * body, min(float(height), y_bottom + size)
        if hi > lo:
            end = int(np.ceil(rng.uniform(lo, hi)))
    if first == 0 and end == height:
        return scan, polygon
    cut = dataclasses.replace(scan, voxels=scan.voxels[first:end])
    return cut, np.asarray(polygon, float) - np.array([0.0, float(first)])


def appearance_volume(rng: np.random.Generator, scan, body: BodySample, *, augment_strength: float = 1.0,
                      min_edge_gap: float = MIN_EDGE_GAP_BODY_HEIGHTS):
    """One training volume ``(224, 224, 16)``: jittered crop, random slice range and field of view
    (:func:`truncate_field_of_view` with ``min_edge_gap``), intensity augmentation."""
    from SpineNetLib.core.scan import Scan

    vox = scan.voxels
    n = vox.shape[2]
    if augment_strength > 0 and n > 8 and rng.random() < 0.5:  # vary the lateral coverage
        a = int(rng.integers(0, max(1, n // 6)))
        b = n - int(rng.integers(0, max(1, n // 6)))
        scan = Scan(voxels=vox[:, :, a:b], spacing_mm=scan.spacing_mm, canonical_to_ras=scan.canonical_to_ras,
                    input_ijk_to_ras=scan.input_ijk_to_ras, input_shape_ijk=scan.input_shape_ijk,
                    canonical_to_input_ijk=scan.canonical_to_input_ijk, input_slice_axis=scan.input_slice_axis)
    poly = jitter_polygon(rng, body.polygon, augment_strength) if augment_strength > 0 else body.polygon
    if augment_strength > 0:
        scan, poly = truncate_field_of_view(rng, scan, poly, min_gap=min_edge_gap)
    vol = labelling.extract_vertebra_volume(scan, Vertebra(slices=[0], polygons=[poly]))
    if augment_strength > 0:
        vol = labelling.normalise_volume(augment.augment_intensity(rng, vol, strength=augment_strength))
    return vol


#: ``--body-pool`` files keep each scan's voxels as 8 bits of its own maximum: the training data of
#: the bundled appearance network then fit the 64 MiB a GPU machine's copy of the repository may carry
#: beside the code.  The real volumes are 8-bit scans averaged over slab slices, so the rounding moves
#: a voxel by at most half a grey level of 256, well inside ``augment.augment_intensity``'s changes.
POOL_LEVELS = 255


def appearance_bodies(args, config: dict) -> tuple[list, list[BodySample], list[BodySample], list[BodySample]]:
    """``(scans, real, clinical, phantom bodies)`` of an appearance run.  The real and clinical bodies come
    from ``--body-pool`` if given, else from the data folder and the tianchi targets; the phantoms are
    always made from the seed (a pool of them would not compress)."""
    if config.get("body_pool"):
        scans, real, clinical = load_body_pool(config["body_pool"])
    else:
        scans = []
        train_cases, _ = training_volume_cases(args)
        pseudo = None
        if config["volume_s1_targets"]:
            from SpineNetLib.training.volume_s1 import read_volume_s1_targets
            pseudo = read_volume_s1_targets(config["volume_s1_targets"])
        real = real_bodies(train_cases, scans, pseudo_labelled=pseudo)
        clinical = (tianchi_bodies(args.data, config["tianchi_targets"], scans)
                    if config["tianchi_targets"] and args.data else [])
    phantoms = phantom_bodies(args.n_phantoms, args.seed, scans) if args.phantom_fraction > 0 else []
    return scans, real, clinical, phantoms


def save_body_pool(path, scans: list, real: list[BodySample], clinical: list[BodySample]) -> Path:
    """One compressed ``.npz`` with the real and clinical bodies :func:`appearance_bodies` read and their
    scans (at 8 bits, ``POOL_LEVELS``), so that an appearance run can go where the data folder cannot
    (``spinenet train appearance-pool``)."""
    used = sorted({b.scan_index for b in real + clinical})
    new_index = {old: new for new, old in enumerate(used)}
    arrays: dict[str, np.ndarray] = {"n_scans": np.int64(len(used))}
    for new, old in enumerate(used):
        vox = np.clip(np.asarray(scans[old].voxels, np.float32), 0, None)
        top = float(vox.max()) if vox.size and vox.max() > 0 else 1.0
        arrays[f"voxels_{new}"] = np.round(vox / top * POOL_LEVELS).astype(np.uint8)
        arrays[f"scale_{new}"] = np.float64(top / POOL_LEVELS)
        arrays[f"spacing_{new}"] = np.asarray(scans[old].spacing_mm, np.float64)
        arrays[f"canonical_to_ras_{new}"] = np.asarray(scans[old].canonical_to_ras, np.float64)
    for name, bodies in (("real", real), ("clinical", clinical)):
        arrays[f"{name}_scan"] = np.array([new_index[b.scan_index] for b in bodies], np.int64)
        arrays[f"{name}_level"] = np.array([b.level for b in bodies], np.int64)
        arrays[f"{name}_polygon"] = np.array([b.polygon for b in bodies], np.float64).reshape(-1, 4, 2)
    path = Path(path)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def _not_a_body_pool(path, exc: Exception) -> InputError:
    return InputError(f"--body-pool {path}: not a body pool written by `spinenet train appearance-pool` "
                      f"({type(exc).__name__})")


def check_body_pool(path) -> None:
    """Refuse (one-line :class:`InputError`) a ``--body-pool`` that is missing or no pool, before a run starts."""
    if not Path(path).expanduser().is_file():
        raise InputError(f"--body-pool: no such file {path}")
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as data:
            int(data["n_scans"])
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise _not_a_body_pool(path, exc) from None


def load_body_pool(path) -> tuple[list, list[BodySample], list[BodySample]]:
    """Read :func:`save_body_pool`'s file back: ``(scans, real bodies, clinical bodies)``."""
    from SpineNetLib.core.scan import Scan

    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as data:
            scans = []
            for i in range(int(data["n_scans"])):
                vox = data[f"voxels_{i}"].astype(np.float32) * np.float32(data[f"scale_{i}"])
                to_ras = data[f"canonical_to_ras_{i}"]
                scans.append(Scan(voxels=vox, spacing_mm=tuple(float(v) for v in data[f"spacing_{i}"]),
                                  canonical_to_ras=to_ras, input_ijk_to_ras=to_ras,
                                  input_shape_ijk=tuple(int(v) for v in vox.shape),
                                  canonical_to_input_ijk=np.eye(4), input_slice_axis=2))
            real, clinical = ([BodySample(int(k), int(lv), np.asarray(poly, float)) for k, lv, poly in
                               zip(data[f"{name}_scan"], data[f"{name}_level"], data[f"{name}_polygon"])]
                              for name in ("real", "clinical"))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise _not_a_body_pool(path, exc) from None
    return scans, real, clinical


def train_appearance(args) -> Path:
    set_threads(args.threads)
    device = resolve_device(args.device)
    config = {"kind": "appearance", "data": str(Path(args.data).resolve()) if args.data else None,
              "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
              "weight_decay": args.weight_decay, "phantom_fraction": args.phantom_fraction,
              "n_phantoms": args.n_phantoms, "max_cases": args.max_cases, "augment": args.augment,
              "volume_s1_targets": resolved_path(getattr(args, "volume_s1_targets", None)),
              **real_data_config(args)}
    edge_gap = float(getattr(args, "edge_gap", MIN_EDGE_GAP_BODY_HEIGHTS))
    config.update(setting_if_changed("edge_gap_body_heights", edge_gap, MIN_EDGE_GAP_BODY_HEIGHTS))
    body_pool = resolved_path(getattr(args, "body_pool", None))
    config.update(setting_if_changed("body_pool", body_pool, None))   # its SHA-256 too (RunFolder)
    workers = int(getattr(args, "workers", 0) or 0)
    config.update(setting_if_changed("per_step_batches", workers > 0, False))
    ema = float(getattr(args, "ema", 0.0) or 0.0)
    config.update(setting_if_changed("ema", ema, 0.0))
    robust_distil = float(getattr(args, "robust_distil", 0.0) or 0.0)
    config.update(setting_if_changed("robust_distil", robust_distil, 0.0))
    asked = str(getattr(args, "degradation", augment.DEFAULT_DEGRADATION))
    config.update(setting_if_changed("degradation", asked, augment.DEFAULT_DEGRADATION))
    check_held_to_init(config["init"], {"--robust-distil": robust_distil}, False)
    run = RunFolder(args.out, config, resume=args.resume)
    rng = seed_everything(args.seed)
    model = AppearanceNet().to(device)
    initial_weights(model, config["init"])
    teacher = frozen_copy(model, training=False) if robust_distil > 0 else None
    degradation = config.get("degradation", augment.DEFAULT_DEGRADATION)
    opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.steps, warmup=min(100, args.steps // 10))
    # ``--ema``: the saved network is the weights' moving average; it uses no random numbers, so the
    # run draws the same batches and takes the same steps as one without it
    average = WeightAverage(model, ema) if ema > 0 else None
    t0 = time.time()
    scans, real, clinical, phantoms = appearance_bodies(args, config)
    if not real and not phantoms:
        raise InputError("no training data: give --data with cases or a --phantom-fraction > 0")
    print(f"data: {len(real)} real bodies, {len(clinical)} tianchi bodies, {len(phantoms)} phantom bodies "
          f"({time.time() - t0:.1f}s)", flush=True)
    by_level = lambda bodies: {k: [b for b in bodies if b.level == k] for k in sorted({b.level for b in bodies})}  # noqa: E731
    real_lv, ph_lv, clinical_lv = by_level(real), by_level(phantoms), by_level(clinical)
    pf = args.phantom_fraction if real else 1.0
    if not phantoms:
        pf = 0.0

    def make_batch(batch_rng: np.random.Generator):
        vols, labels = [], []
        for _ in range(args.batch_size):
            pool = ph_lv if batch_rng.random() < pf else real_lv
            if pool is real_lv and clinical_lv and batch_rng.random() < config["tianchi_fraction"]:
                pool = clinical_lv
            keys = list(pool)
            bodies = pool[keys[int(batch_rng.integers(len(keys)))]]
            body = bodies[int(batch_rng.integers(len(bodies)))]
            vols.append(appearance_volume(batch_rng, scans[body.scan_index], body, augment_strength=args.augment,
                                          min_edge_gap=edge_gap))
            labels.append(body.level)
        return np.stack(vols).astype(np.float32), np.array(labels, np.int64)

    def half_precision_batch(batch_rng: np.random.Generator):
        # workers hand over float16 volumes: half the bytes through the pipes (a batch of 32 is 103 MB
        # in float32); the normalised intensities keep 3 significant digits
        vols, labels = make_batch(batch_rng)
        return vols.astype(np.float16), labels

    ahead = WorkerBatches(half_precision_batch, args.seed, workers) if workers > 0 else None

    def step_fn(step):
        vols, labels = ahead.batch(step) if ahead is not None else make_batch(rng)
        x = torch.from_numpy(vols)[:, None].to(device).float()
        y = torch.from_numpy(labels).to(device)
        if average is not None:
            average.update(model)
        if teacher is None:
            logits = model(x)
            loss = F.cross_entropy(logits / TEMPERATURE, y)
            return loss, {"acc": float((logits.argmax(1) == y).float().mean())}
        degraded = torch.from_numpy(degraded_volumes(rng, vols, degradation))
        degraded = degraded[:, None].to(device).float()
        logits = model(degraded)
        l_held = held_to_teacher(logits, teacher, x)
        loss = F.cross_entropy(logits / TEMPERATURE, y) + robust_distil * l_held
        return loss, {"acc": float((logits.argmax(1) == y).float().mean()), "l_distil": float(l_held.detach())}

    try:
        train_loop(run, model, opt, sched, rng, args.steps, step_fn, save_every=args.save_every, log_every=5,
                   stop_after=getattr(args, "stop_after", None),
                   kept={"ema": average.module} if average is not None else None)
    finally:
        if ahead is not None:
            ahead.close()
    return _finish(run, "appearance", model, args, saved="ema" if average is not None else "model")


def degraded_volumes(rng: np.random.Generator, volumes: np.ndarray,
                     degradation: str = augment.DEFAULT_DEGRADATION) -> np.ndarray:
    """The normalised training volumes ``(B, 224, 224, 16)`` of a batch, each degraded as another centre's
    poorer scan (``augment.DEGRADATIONS[degradation]``, by default ``degrade_acquisition``; every slice alike)
    and normalised again as at inference: the student's inputs of ``train appearance --robust-distil``."""
    change = augment.DEGRADATIONS[degradation]
    return np.stack([labelling.normalise_volume(change(rng, v)) for v in volumes])


def held_to_teacher(logits: torch.Tensor, teacher: torch.nn.Module, clean: torch.Tensor) -> torch.Tensor:
    """KL divergence from the ``--init`` network's level probabilities on the clean volumes (evaluation mode:
    the probabilities inference gives, ``softmax(logits / T)``) to the student's: ``--robust-distil``'s term."""
    with torch.no_grad():
        target = F.softmax(teacher(clean) / TEMPERATURE, dim=1)
    return F.kl_div(F.log_softmax(logits / TEMPERATURE, dim=1), target, reduction="batchmean")


def write_appearance_pool(args) -> Path:
    """``spinenet train appearance-pool``: the bodies an appearance run with these options would read,
    in one file for ``--body-pool`` (``args.phantom_fraction`` is 0: no phantoms are made)."""
    config = {"volume_s1_targets": resolved_path(getattr(args, "volume_s1_targets", None)), **real_data_config(args)}
    scans, real, clinical, _ = appearance_bodies(args, config)
    out = save_body_pool(args.out, scans, real, clinical)
    print(f"wrote {out}: {len(real)} real and {len(clinical)} tianchi bodies of {len(scans)} scans "
          f"({out.stat().st_size / 1e6:.1f} MB)", flush=True)
    return out


# =========================================================================== context


def _body_table():
    from SpineNetLib.synthetic.phantom import BODY_TABLE, DISC_TABLE

    heights = np.array([BODY_TABLE[n][0] for n in LEVELS_TOP_DOWN])            # C2..S1
    discs = np.array([float(np.mean(DISC_TABLE[f"{a}-{b}"]))
                      for a, b in zip(LEVELS_TOP_DOWN[:-1], LEVELS_TOP_DOWN[1:])])  # below each but S1
    return heights, discs


def _appearance_row(rng: np.random.Generator, k: int) -> np.ndarray:
    """A noisy appearance-like probability vector for true class k (index into LEVELS)."""
    r = rng.random()
    logits = rng.normal(0.0, 0.5, N_LEVELS)
    if r < 0.85:
        u = rng.random()
        shift = 0 if u < 0.75 else int(rng.choice([-1, 1])) if u < 0.95 else int(rng.choice([-2, 2]))
        j = int(np.clip(k + shift, 0, N_LEVELS - 1))
        a = rng.uniform(0.5, 6.0)
        logits[j] += a
        for d in (-1, 1):
            if 0 <= j + d < N_LEVELS:
                logits[j + d] += a * rng.uniform(0.2, 0.8)
    p = np.exp(logits - logits.max())
    return (p / p.sum()).astype(np.float32)


#: Share of synthetic label images whose S1 (and detected S2) are left out (missed by the detector).
S1_MISSED_FRACTION = 0.5


#: Label images whose upper bodies all look one level off together (see :func:`block_shifts`).
TOP_BLOCK_SHIFT_FRACTION = 0.25
#: ... and, more rarely, whose lowest bodies do.
BOTTOM_BLOCK_SHIFT_FRACTION = 0.05


def block_shifts(rng: np.random.Generator, n_bodies: int, *, reaches_sacrum: bool) -> np.ndarray:
    """Level offset (0, +1 or -1) of the appearance row of each body, top to bottom.

    Real appearance errors are not independent per body: on clinical slices
    (issue 10, tianchi/) a whole run of upper bodies looks one level off
    together (the top of a lumbar field of view is arbitrary) while the
    bodies at the lumbosacral junction look right, and the old maps, with
    independent errors only, taught the context net to follow the longer
    run, however confident the other end.  So in a quarter of the maps that
    reach the sacrum, a run of upper bodies (ending at least two bodies above
    the lowest) gets one common offset; in 5 % the lowest two or three do.
    """
    shifts = np.zeros(n_bodies, int)
    if not reaches_sacrum or n_bodies < 4:
        return shifts
    r = rng.random()
    if r < TOP_BLOCK_SHIFT_FRACTION:
        end = int(rng.integers(2, n_bodies - 1))
        shifts[:end] = int(rng.choice([-1, 1]))
    elif r < TOP_BLOCK_SHIFT_FRACTION + BOTTOM_BLOCK_SHIFT_FRACTION:
        shifts[n_bodies - int(rng.integers(2, 4)):] = int(rng.choice([-1, 1]))
    return shifts


def synthetic_height_map(rng: np.random.Generator, *, pad: int = 256):
    """(height map (Hpad, 24) float32, targets (Hpad,) int64 with -1 off the bands).

    See the module docstring; the band rule is ``labelling.build_height_map``'s.
    """
    heights, discs = _body_table()
    names = list(LEVELS_TOP_DOWN)                 # C2 .. S1
    cls = [level_index(n) for n in names]
    scale = rng.uniform(0.85, 1.15)
    h = heights * scale * rng.uniform(0.93, 1.07, len(heights))
    d = discs * scale * rng.uniform(0.6, 1.4, len(discs))
    tilt = np.ones(len(names))
    tilt[-6:] = rng.uniform(1.0, 1.3, 6)          # lumbar bodies and S1 tilt: taller vertical extent
    tilt[-1] = rng.uniform(1.1, 1.7)
    extents = h * tilt * rng.uniform(0.95, 1.15, len(names))
    extra_s2 = rng.random() < 0.15
    trans = rng.random()
    if trans < 0.05:      # lumbarised S1: lumbar-like S1 with a real disc below, S2 seen as the sacrum top
        extents[-1] = h[-2] * rng.uniform(1.0, 1.3)
        extra_s2 = True
        s2_gap = d[-1] * rng.uniform(0.6, 1.0)
    elif trans < 0.10:    # sacralised L5: nearly no disc between L5 and S1
        d[-1] = rng.uniform(1.0, 4.0)
        s2_gap = rng.uniform(1.0, 3.0)
    else:
        s2_gap = rng.uniform(1.0, 3.0)
    # centres top to bottom
    centres = np.zeros(len(names))
    for i in range(1, len(names)):
        centres[i] = centres[i - 1] + h[i - 1] / 2 + d[i - 1] + h[i] / 2
    # field of view: (first, last) index in names
    n = len(names)
    r = rng.random()
    if r < 0.4:
        first, last = int(rng.integers(names.index("T8"), names.index("L1") + 1)), n - 1
    elif r < 0.55:
        first, last = 0, n - 1
    elif r < 0.7:
        first, last = 0, int(rng.integers(names.index("C7"), names.index("T5") + 1))
    elif r < 0.85:
        first = int(rng.integers(names.index("C5"), names.index("T4") + 1))
        last = int(rng.integers(names.index("T10"), names.index("L3") + 1))
    else:
        first = int(rng.integers(0, n - 3))
        last = int(rng.integers(first + 2, n))
    idx = list(range(first, last + 1))
    ys = [centres[i] for i in idx]
    ext = [extents[i] for i in idx]
    tgt = [cls[i] for i in idx]
    if extra_s2 and last == n - 1:
        ys.append(centres[-1] + h[-1] / 2 + s2_gap + 22.0 * scale / 2)
        ext.append(22.0 * scale * rng.uniform(1.1, 1.6))
        tgt.append(0)                              # detected S2 -> class S1 (official S2 rule)
    ys = np.array(ys)
    ys = ys - (ys[0] - np.array(ext)[0] / 2) + rng.uniform(5.0, 80.0)
    n_rows = int(ys[-1] + ext[-1] / 2 + rng.uniform(5.0, 80.0))
    total = max(1, int(np.ceil(n_rows / pad))) * pad
    hm = np.zeros((total, N_LEVELS), np.float32)
    target = np.full(total, -1, np.int64)
    # The detector misses the sacrum far more often than any other body (issue 10: S1 found in
    # 19 of 146 clinical tianchi slices), so S1 and the S2 below it are left out of half the maps
    # that reach the sacrum: the net must not learn "the lowest body is S1".
    sacrum_missed = last == n - 1 and rng.random() < S1_MISSED_FRACTION
    shifts = block_shifts(rng, len(tgt), reaches_sacrum=last == n - 1)
    for y, e, k, shift in zip(ys, ext, tgt, shifts):
        if rng.random() < 0.1 or (sacrum_missed and k == 0):  # dropped detection
            continue
        w = e / 2.0
        a, b = int(y) - int(w / 2.0), int(y) + int(w / 2.0)
        a, b = max(a, 0), min(b, n_rows)
        if b > a:
            hm[a:b] = _appearance_row(rng, int(np.clip(k + shift, 0, N_LEVELS - 1)))
            target[a:b] = k
    return hm, target


def synthetic_batch(rng: np.random.Generator, batch: int):
    maps, tgts = zip(*[synthetic_height_map(rng) for _ in range(batch)])
    rows = max(m.shape[0] for m in maps)
    x = np.zeros((batch, 1, rows, N_LEVELS), np.float32)
    y = np.full((batch, rows), -1, np.int64)
    for i, (m, t) in enumerate(zip(maps, tgts)):
        x[i, 0, : len(m)] = m
        y[i, : len(t)] = t
    return torch.from_numpy(x), torch.from_numpy(y)


def context_loss(out: torch.Tensor, y: torch.Tensor):
    logits = out[:, 0].reshape(-1, N_LEVELS) / TEMPERATURE
    yy = y.reshape(-1)
    loss = F.cross_entropy(logits, yy, ignore_index=-1)
    sel = yy >= 0
    acc = float((logits[sel].argmax(1) == yy[sel]).float().mean()) if bool(sel.any()) else float("nan")
    return loss, acc


def train_context(args) -> Path:
    set_threads(args.threads)
    device = resolve_device(args.device)
    config = {"kind": "context", "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
              "lr": args.lr, "weight_decay": args.weight_decay}
    run = RunFolder(args.out, config, resume=args.resume)
    rng = seed_everything(args.seed)
    model = ContextNet().to(device)
    opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.steps, warmup=min(100, args.steps // 10))

    def step_fn(step):
        x, y = synthetic_batch(rng, args.batch_size)
        loss, acc = context_loss(model(x.to(device)), y.to(device))
        return loss, {"acc": acc}

    train_loop(run, model, opt, sched, rng, args.steps, step_fn, save_every=args.save_every,
               stop_after=getattr(args, "stop_after", None))
    return _finish(run, "context", model, args)


# =========================================================================== shared


def _finish(run: RunFolder, kind: str, model, args, saved: str = "model") -> Path:
    """The fp16 ``<kind>.pt`` of a finished run: the checkpoint's weights, or its weight average
    (``saved="ema"``, kept by :func:`train_loop` among the checkpoint's extra entries)."""
    final = run.path / f"{kind}.pt"
    state = torch.load(run.path / "checkpoint-latest.pt", map_location="cpu", weights_only=False)
    if state["step"] >= args.steps:
        model.load_state_dict(state["model"] if saved == "model" else state["extra"][saved])
        extra = {"epoch": int(args.steps), "seed": int(args.seed), **run.weights_extra()}
        penalty = getattr(args, "repeat_s1_penalty", None)
        if kind == "context" and penalty is not None:
            extra["repeat_s1_penalty"] = float(penalty)  # used by labelling.params_for_context
        checkpoints.save_checkpoint(final, kind, model.cpu(), half=True, extra=extra)
        print(f"wrote {final}", flush=True)
        if kind == "context":
            model.eval()
            vrng = np.random.default_rng(12345)
            with torch.no_grad():
                n_val = int(getattr(args, "val_batches", 4))
                accs = [context_loss(model(x), y)[1] for x, y in (synthetic_batch(vrng, 8) for _ in range(n_val))]
            run.write_json("val_metrics.json", {"synthetic_band_row_accuracy": float(np.nanmean(accs))})
            print(f"context synthetic validation accuracy {np.nanmean(accs):.3f}", flush=True)
    return final


def validate_labelling(appearance, context, cases, device="cpu", log=print) -> dict:
    """Labelling with ground-truth bodies (oracle detection) on the slab-averaged val scans.

    Returns per-case and overall accuracy of the appearance argmax and of the
    full labelling (appearance + context + beam search).
    """
    res = {}
    tot = {"n": 0, "app": 0, "full": 0, "full1": 0}
    for case in cases:
        scans: list = []
        bodies = real_bodies([case], scans)
        if not bodies:
            continue
        scan = scans[0]
        inputs = [Vertebra(slices=[0], polygons=[b.polygon]) for b in bodies]
        verts = labelling.label_vertebrae(scan, inputs, appearance, context, labelling.params_for_context(context),
                                          device=str(device))
        # label_vertebrae returns sorted copies: find each one's body by its (unchanged) outline
        centres = np.array([np.asarray(b.polygon, float).mean(axis=0) for b in bodies])
        truth = [LEVELS[bodies[int(np.argmin(np.linalg.norm(centres - np.asarray(v.polygons[0], float).mean(axis=0),
                                                               axis=1)))].level] for v in verts]
        app = sum(LEVELS[int(np.argmax(v.appearance_probabilities))] == t for v, t in zip(verts, truth))
        full = sum(v.level == t for v, t in zip(verts, truth))
        order = list(LEVELS_TOP_DOWN) + ["S2"]
        full1 = sum(abs(order.index(v.level) - order.index(t)) <= 1 for v, t in zip(verts, truth))
        res[case.case_id] = {"n": len(verts), "appearance_acc": app / len(verts), "labelling_acc": full / len(verts),
                             "labelling_acc_within_1": full1 / len(verts),
                             "predicted": [v.level for v in verts], "truth": truth}
        for k, v in (("n", len(verts)), ("app", app), ("full", full), ("full1", full1)):
            tot[k] += v
        log(f"labelling {case.case_id:18s} app={app}/{len(verts)} full={full}/{len(verts)} "
            f"pred={[v.level for v in verts]}")
    n = max(tot["n"], 1)
    res["overall"] = {"n": tot["n"], "appearance_acc": tot["app"] / n, "labelling_acc": tot["full"] / n,
                      "labelling_acc_within_1": tot["full1"] / n}
    log(f"labelling overall {res['overall']}")
    return res
