"""``spinenet train grader``: train the disc grading network (official §3.4) on graded IVD volumes.

Data
----
* ``--data DIR``: a SPIDER-format folder (:mod:`SpineNetLib.training.spider`): disc
  volumes are cut from the masks (body quads -> ``ivd.extract_ivd_volume``),
  labels come from ``radiological_gradings.csv``.  Validation = SPIDER's own
  "validation" subset when ``overview.csv`` gives one, else a seeded
  ``--val-fraction`` of the patients.
* ``--phantoms N``: N synthetic lumbar T2 phantoms (:mod:`SpineNetLib.synthetic.phantom`)
  with random endplate notches, narrowed discs and slips
  (``--phantom-pathology``, each at a lumbar disc with chance ``--phantom-rate``);
  ground-truth bodies; validation = a seeded ``--val-fraction`` of the phantoms.

Tasks and loss
--------------
Each grade a data set gives is a *task* (:data:`TASKS`) observed on one or two
heads.  A task value allows a set of classes of its head: SPIDER's binary
narrowing "1" allows narrowing classes 1-3 (mild..severe), so the loss is
``-log sum_{c allowed} p_c`` (ordinary cross-entropy when one class is
allowed).  Modic 1-3 says "a marrow change at the upper *or* the lower
endplate": ``-log(1 - p_umc(0) p_lmc(0))``; Modic 0 is ``-log p_umc(0) p_lmc(0)``.
Missing grades (-1) contribute nothing.  Class balance: samples are drawn
balanced (``--sampling balanced``: a task, then one of its grades, then a
disc with that grade, all uniformly), and every task value is weighted by
the inverse of its frequency *under that sampling* (so each grade of each
task carries the same expected weight, without correcting twice); the loss
of a task is the weighted mean over the batch's observed samples; tasks are
summed.

Schedule (the seed's two stages)
--------------------------------
``--steps`` of joint training of the whole network (AdamW, warm-up + cosine,
``train_common``), then ``--head-steps`` of head fine-tuning with the
backbone frozen (features computed without gradients, BatchNorm statistics
fixed), with its own warm-up-free cosine cycle from ``--head-lr``.  One
resumable run folder (``train_common.RunFolder``) covers both; balanced
accuracy per task on the validation split is written to
``val_metrics.json`` after each stage (and every ``--val-every`` steps to
``val_history.json``).  Training augmentation: in-plane shifts (rows +-8,
cols +-16 px, zero fill), reversed slice order (no left/right task is
trained), intensity x U(0.85, 1.15); with ``--degrade P``, first (chance P) the look of another
scanner or of a volume (:func:`degrade_image`: blur, contrast around the bodies' level, noise).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.results import Vertebra
from SpineNetLib.discs.extraction import extract_ivd_volumes
from SpineNetLib.discs.hotspots import MAX_SHIFT_RC, apply_augmentation
from SpineNetLib.models.grading import HEADS, GradingConfig, GradingNet
from SpineNetLib.synthetic import phantom
from SpineNetLib.training import spider
from SpineNetLib.training.common import (
    RunFolder, WeightAverage, add_ema_argument, add_run_arguments, check_fraction, check_non_negative,
    check_run_arguments, cosine_lr, load_initial, resolved_path, resolve_device, seed_everything, set_threads,
    setting_if_changed, train_loop,
)
from SpineNetLib.weights import checkpoints

HEAD_INDEX = {h.name: i for i, h in enumerate(HEADS)}


@dataclass(frozen=True)
class GradingTask:
    """A grade observed on one head ("set": value -> allowed classes) or two ("any", see module doc)."""

    name: str
    heads: tuple[str, ...]
    #: Value v allows classes ``allowed[v]`` of ``heads[0]`` (rule "set"); value names for "any".
    allowed: tuple[tuple[int, ...], ...]
    rule: str = "set"
    value_names: tuple[str, ...] = ()

    @property
    def n_values(self) -> int:
        return len(self.allowed)


#: Every task a data set can provide.  Value 1 of narrowing / spondylolisthesis means "present,
#: severity not given"; "modic" is 0 = no change, 1 = a change at the upper or lower endplate.
TASKS: dict[str, GradingTask] = {t.name: t for t in (
    GradingTask("pfirrmann", ("fc_pf",), ((0,), (1,), (2,), (3,), (4,)), value_names=("1", "2", "3", "4", "5")),
    GradingTask("narrowing", ("fc_nar",), ((0,), (1, 2, 3)), value_names=("none", "present")),
    GradingTask("spondylolisthesis", ("fc_spn",), ((0,), (1, 2)), value_names=("none", "present")),
    GradingTask("upper_endplate", ("fc_ued",), ((0,), (1,)), value_names=("normal", "defect")),
    GradingTask("lower_endplate", ("fc_led",), ((0,), (1,)), value_names=("normal", "defect")),
    GradingTask("herniation", ("fc_hrn",), ((0,), (1,)), value_names=("none", "present")),
    GradingTask("modic", ("fc_umc", "fc_lmc"), ((0,), (1,)), rule="any", value_names=("none", "upper or lower")),
    GradingTask("endplate_defect", ("fc_ued", "fc_led"), ((0,), (1,)), rule="any",
                value_names=("none", "upper or lower")),
)}
#: Tasks whose meaning depends on left and right (none yet): slice reversal is off when one is trained.
LATERAL_TASKS: tuple[str, ...] = ()


@dataclass
class GradingSample:
    """One disc volume with its task values (missing tasks absent)."""

    volume: np.ndarray                 # float16 (9, 112, 224)
    targets: dict[str, int]
    group: str                         # patient / phantom id (splits never separate a group)
    name: str = ""
    subset: str | None = None          # "training" / "validation" when the data set says
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- loss and metrics


def _allowed_matrix(task: GradingTask, device) -> torch.Tensor:
    k = HEADS[HEAD_INDEX[task.heads[0]]].n_classes
    m = torch.zeros(task.n_values, k, dtype=torch.bool, device=device)
    for v, classes in enumerate(task.allowed):
        m[v, list(classes)] = True
    return m


def task_log_likelihood(task: GradingTask, outputs: Sequence[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """``log P(value | logits)`` per sample (values must be valid, >= 0)."""
    if task.rule == "set":
        logp = F.log_softmax(outputs[HEAD_INDEX[task.heads[0]]], dim=1)
        allowed = _allowed_matrix(task, logp.device)[values]
        return torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), dim=1)
    if task.rule == "any":
        l0 = sum(F.log_softmax(outputs[HEAD_INDEX[h]], dim=1)[:, 0] for h in task.heads)
        l1 = torch.log(-torch.expm1(l0.clamp(max=-1e-7)))      # log(1 - P(all heads 0))
        return torch.where(values == 0, l0, l1)
    raise ValueError(f"unknown task rule {task.rule!r}")


def predict_task(task: GradingTask, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Predicted task value per sample from the argmax classes."""
    if task.rule == "any":
        return torch.stack([outputs[HEAD_INDEX[h]].argmax(dim=1) != 0 for h in task.heads]).any(dim=0).long()
    cls = outputs[HEAD_INDEX[task.heads[0]]].argmax(dim=1)
    table = torch.full((HEADS[HEAD_INDEX[task.heads[0]]].n_classes,), -1, dtype=torch.long, device=cls.device)
    for v, classes in enumerate(task.allowed):
        table[list(classes)] = v
    return table[cls]


def sampling_probabilities(samples: Sequence[GradingSample], tasks: Sequence[GradingTask],
                           mode: str = "balanced") -> np.ndarray:
    """Chance of drawing each sample.

    "uniform": every sample with an observed task alike.  "balanced": a task
    uniformly, then one of its values seen in training uniformly, then a
    sample with that value uniformly (rare grades are seen as often as
    common ones, as the appearance trainer draws levels).
    """
    n = len(samples)
    p = np.zeros(n)
    if mode == "uniform":
        obs = np.array([any(t.name in s.targets for t in tasks) for s in samples], float)
        return obs / max(obs.sum(), 1.0)
    if mode != "balanced":
        raise InputError(f"unknown sampling {mode!r}: use balanced or uniform")
    for t in tasks:
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(samples):
            v = s.targets.get(t.name)
            if v is not None and 0 <= v < t.n_values:
                groups.setdefault(v, []).append(i)
        for idx in groups.values():
            p[idx] += 1.0 / (len(tasks) * len(groups) * len(idx))
    return p / max(p.sum(), 1e-12)


def class_weights(samples: Sequence[GradingSample], tasks: Sequence[GradingTask],
                  probabilities: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Per task, the inverse frequency of each value in the batches drawn with ``probabilities``.

    ``probabilities`` None = uniform sampling (the plain training frequencies).
    Weights are normalised so that each present value gets the same expected
    share of the task's loss; values never seen get 0.
    """
    p = np.full(len(samples), 1.0 / max(len(samples), 1)) if probabilities is None else np.asarray(probabilities)
    out = {}
    for t in tasks:
        freq = np.zeros(t.n_values)
        for pi, s in zip(p, samples):
            v = s.targets.get(t.name)
            if v is not None and 0 <= v < t.n_values:
                freq[v] += pi
        present = freq > 0
        w = np.zeros(t.n_values)
        if present.any():
            w[present] = freq.sum() / (present.sum() * freq[present])
        out[t.name] = torch.tensor(w, dtype=torch.float32)
    return out


def grading_loss(outputs: Sequence[torch.Tensor], targets: torch.Tensor, tasks: Sequence[GradingTask],
                 weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Sum over tasks of the class-weighted mean negative log-likelihood; ``targets`` (N, T), -1 = missing."""
    total = outputs[0].sum() * 0.0
    info = {}
    for j, t in enumerate(tasks):
        v = targets[:, j]
        obs = v >= 0
        if not bool(obs.any()):
            continue
        sel = [o[obs] for o in outputs]
        ll = task_log_likelihood(t, sel, v[obs])
        w = weights[t.name].to(ll.device)[v[obs]]
        if float(w.sum()) <= 0:
            continue
        loss_t = -(w * ll).sum() / w.sum()
        total = total + loss_t
        info[f"loss_{t.name}"] = float(loss_t.detach())
    return total, info


def balanced_accuracy(pred: np.ndarray, true: np.ndarray, n_values: int) -> dict:
    """Mean recall over the values present in ``true`` (plus accuracy, counts and recalls)."""
    pred, true = np.asarray(pred), np.asarray(true)
    recalls = {}
    for v in range(n_values):
        sel = true == v
        if sel.any():
            recalls[v] = float((pred[sel] == v).mean())
    return {"balanced_accuracy": float(np.mean(list(recalls.values()))) if recalls else float("nan"),
            "accuracy": float((pred == true).mean()) if true.size else float("nan"),
            "n": int(true.size), "recall": {str(k): v for k, v in recalls.items()},
            "counts": {str(v): int((true == v).sum()) for v in range(n_values)}}


def evaluate(model: GradingNet, samples: Sequence[GradingSample], tasks: Sequence[GradingTask], *,
             device="cpu", batch_size: int = 8) -> dict:
    """Balanced accuracy of every task on ``samples`` (observed values only)."""
    was = model.training
    model.eval()
    preds: dict[str, list] = {t.name: [] for t in tasks}
    trues: dict[str, list] = {t.name: [] for t in tasks}
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            x = torch.from_numpy(np.stack([s.volume.astype(np.float32) for s in chunk]))[:, None].to(device)
            out = model(x)
            for t in tasks:
                p = predict_task(t, out).cpu().numpy()
                for s, pv in zip(chunk, p):
                    if t.name in s.targets:
                        preds[t.name].append(int(pv))
                        trues[t.name].append(int(s.targets[t.name]))
    model.train(was)
    res = {}
    for t in tasks:
        if trues[t.name]:
            res[t.name] = balanced_accuracy(np.array(preds[t.name]), np.array(trues[t.name]), t.n_values)
    return res


# --------------------------------------------------------------------------- data


#: Ranges of :func:`degrade_image`: in-plane Gaussian blur (sigma in disc-volume pixels of about
#: 0.5 mm, applied to half the discs), contrast around the bodies' level (log-uniform) and
#: additive noise (its standard deviation).
DEGRADE_BLUR_SIGMA = (0.5, 2.0)
DEGRADE_CONTRAST = (0.6, 1.6)
DEGRADE_NOISE = (0.0, 0.02)
#: The bodies' median intensity in a normalised disc volume (``discs.extraction.normalise_ivd``).
BODY_LEVEL = 0.25


def degrade_image(rng: np.random.Generator, vol: np.ndarray) -> np.ndarray:
    """The disc volume as another scanner, sequence or resolution could show it; values stay in [0, 1].

    Why: the clinical slices the bundled grader learns from are sharp 8-bit images with one
    typical contrast, while a disc cut from a 1 mm volume averaged into 3.5 mm slabs is blurred,
    and the contrast of disc and canal to the bodies differs between scanners and sequences.  A
    grader trained on the slices alone called 95 % of healthy volunteers' discs herniated, and its
    calls followed the contrast (x1.6 around the bodies' level: 25 %; ``benchmarks/
    grader_on_volumes.py``).  The contrast is changed around the bodies' level, which the disc-volume
    normalisation fixes at 0.25, so the network must not read it from the level itself."""
    from scipy.ndimage import gaussian_filter

    out = np.asarray(vol, np.float32)
    if rng.random() < 0.5:
        sigma = rng.uniform(*DEGRADE_BLUR_SIGMA)
        out = gaussian_filter(out, (0.0, sigma, sigma), mode="nearest")
    low, high = np.log(DEGRADE_CONTRAST)
    out = BODY_LEVEL + (out - BODY_LEVEL) * float(np.exp(rng.uniform(low, high)))
    out = out + rng.normal(0.0, rng.uniform(*DEGRADE_NOISE), out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


def augment_volume(rng: np.random.Generator, vol: np.ndarray, strength: float = 1.0,
                   allow_reverse: bool = True, degrade: float = 0.0) -> np.ndarray:
    """Random in-plane shift (zero fill), slice reversal and intensity scale; with chance ``degrade``
    first :func:`degrade_image`; values stay in [0, 1]."""
    vol = np.asarray(vol, np.float32)
    if degrade > 0 and rng.random() < degrade:
        vol = degrade_image(rng, vol)
    if strength <= 0:
        return vol
    dy = int(round(rng.uniform(-1, 1) * MAX_SHIFT_RC[0] * strength))
    dx = int(round(rng.uniform(-1, 1) * MAX_SHIFT_RC[1] * strength))
    rev = bool(allow_reverse and rng.random() < 0.5)
    out = apply_augmentation(vol, (dy, dx, rev))
    return np.clip(out * float(rng.uniform(1 - 0.15 * strength, 1 + 0.15 * strength)), 0.0, 1.0)


PHANTOM_PATHOLOGIES: tuple[str, ...] = ("endplate_notch", "narrow_disc", "slip")
_PHANTOM_TASKS = {"endplate_notch": ("upper_endplate", "lower_endplate"), "narrow_disc": ("narrowing",),
                  "slip": ("spondylolisthesis",)}
_PHANTOM_DISCS = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")


def phantom_pathology(rng: np.random.Generator, pathologies: Sequence[str], p: float = 0.3) -> dict[str, list[str]]:
    """Random phantom pathology dict: per lumbar disc, each pathology with probability ``p``.

    An endplate notch goes on the disc's upper endplate (disc key: the upper
    body's inferior endplate) or its lower endplate (level key of the lower
    body: its superior endplate), with equal chance.
    """
    out: dict[str, list[str]] = {}
    for disc in _PHANTOM_DISCS:
        upper, lower = disc.split("-")
        for path in pathologies:
            if rng.random() >= p:
                continue
            if path == "endplate_notch":
                key = disc if rng.random() < 0.5 else lower
                if key == "S1":
                    key = disc
            elif path == "slip":
                if disc == "T12-L1":
                    continue
                key = disc
            else:
                key = disc
            out.setdefault(key, []).append(path)
    return out


def phantom_disc_targets(ph, disc_name: str, pathologies: Sequence[str]) -> dict[str, int]:
    """Task values of one phantom disc from the phantom's pathology dict."""
    upper, lower = disc_name.split("-")
    pd = ph.params.pathology
    at_disc, at_lower, at_upper = pd.get(disc_name, []), pd.get(lower, []), pd.get(upper, [])
    t: dict[str, int] = {}
    if "endplate_notch" in pathologies:
        t["upper_endplate"] = int("endplate_notch" in at_disc)
        t["lower_endplate"] = int("endplate_notch" in at_lower)
    if "narrow_disc" in pathologies:
        t["narrowing"] = int("narrow_disc" in at_disc)
    if "slip" in pathologies:
        t["spondylolisthesis"] = int("slip" in at_disc or "slip" in at_upper)
    return t


def make_grading_phantom(rng: np.random.Generator, pathologies: Sequence[str], p: float = 0.3):
    """A random lumbar T2 phantom (random spacing, slices, tilt, noise, anatomy) with random pathology."""
    spacing = float(rng.uniform(0.7, 1.1))
    kwargs = dict(fov="lumbar", contrast="T2", pixel_spacing=(spacing, spacing),
                  n_slices=int(rng.integers(11, 14)), slice_thickness_mm=float(rng.uniform(3.5, 4.5)),
                  rotation_deg=float(rng.uniform(-10, 10)), noise=float(rng.uniform(0.01, 0.04)),
                  bias_field=float(rng.uniform(0.0, 0.25)), midline_offset_mm=float(rng.uniform(-1.5, 1.5)),
                  variability=1.0, seed=int(rng.integers(0, 2 ** 31 - 1)))
    return phantom.make_phantom(pathology=phantom_pathology(rng, pathologies, p), **kwargs)


def phantom_vertebrae(ph):
    """Ground-truth :class:`~SpineNetLib.core.results.Vertebra` list (top to bottom) of a phantom."""
    return [Vertebra(slices=list(v.slices), polygons=[np.asarray(v.quads[s], float) for s in v.slices],
                     level=v.level) for v in ph.vertebrae if not v.extra]


def phantom_samples(n_phantoms: int, seed: int, pathologies: Sequence[str] = PHANTOM_PATHOLOGIES,
                    p: float = 0.3, log=print) -> list[GradingSample]:
    """Disc samples of ``n_phantoms`` seeded random phantoms (ground-truth bodies, ``ivd.extract_ivd_volumes``)."""
    bad = sorted(set(pathologies) - set(PHANTOM_PATHOLOGIES))
    if bad:
        raise InputError(f"unknown phantom pathology {', '.join(bad)}: use {', '.join(PHANTOM_PATHOLOGIES)}")
    out = []
    for i in range(int(n_phantoms)):
        rng = np.random.default_rng([int(seed), 29, i])
        ph = make_grading_phantom(rng, pathologies, p)
        for vol in extract_ivd_volumes(ph.scan, phantom_vertebrae(ph)):
            if vol.level not in [d.name for d in ph.discs]:
                continue
            out.append(GradingSample(vol.volume.astype(np.float16), phantom_disc_targets(ph, vol.level, pathologies),
                                     group=f"phantom{i}", name=f"phantom{i}:{vol.level}"))
    if log:
        log(f"phantoms: {n_phantoms} -> {len(out)} discs")
    return out


def spider_samples(root, sequences: Sequence[str] | None = ("t2",), max_cases: int = 0,
                   log=print) -> list[GradingSample]:
    """Disc samples of a SPIDER folder; discs without any usable grade are left out."""
    root = Path(root)
    cases = spider.list_spider_cases(root, sequences)
    if max_cases:
        cases = cases[:max_cases]
    if not cases:
        raise InputError(f"no SPIDER series ({', '.join(sequences or ['any'])}) with image and mask in {root}")
    grad_path = root / spider.GRADINGS_FILE
    if not grad_path.is_file():
        raise InputError(f"{root} has no {spider.GRADINGS_FILE}")
    gradings = spider.read_gradings(grad_path)
    out, t0 = [], time.time()
    for k, case in enumerate(cases):
        for d in spider.case_discs(case, gradings, log=log):
            targets = spider.task_values(d.grades)
            if not targets:
                continue
            out.append(GradingSample(d.ivd.volume.astype(np.float16), targets, group=case.patient,
                                     name=f"{case.name}:{d.ivd.level}", subset=case.subset,
                                     meta={"ivd_label": d.ivd_label, "lower_stand_in": d.lower_stand_in}))
        if log and (k + 1) % 20 == 0:
            log(f"spider: {k + 1}/{len(cases)} series, {len(out)} discs ({time.time() - t0:.0f}s)")
    if log:
        log(f"spider: {len(cases)} series -> {len(out)} graded discs")
    return out


#: Disc tags of ``tianchi/`` (data README: v1 normal, v2 bulge, v3 protrusion, v4 extrusion, v5 Schmorl
#: node) as task values.  Herniation: a protrusion or extrusion (focal displacement of disc material
#: beyond the ring apophyses); a bulge (circumferential, not focal) and a normal disc are "none".  A
#: Schmorl node is a herniation through an endplate: an endplate defect above or below the disc
#: (the tag does not say which endplate, hence the "any" task).  Discs without a tag are left out.
TIANCHI_DISC_TASKS = {"herniation": ({"v3", "v4"}, {"v1", "v2", "v5"}),
                      "endplate_defect": ({"v5"}, {"v1", "v2", "v3", "v4"})}


def tianchi_disc_targets(tag: str) -> dict[str, int]:
    """Task values of one ``tianchi/`` disc tag ("v2", "v3,v5", ...); {} for an empty tag."""
    tags = {t.strip() for t in str(tag).split(",") if t.strip()}
    if not tags:
        return {}
    targets = {}
    for task, (present, absent) in TIANCHI_DISC_TASKS.items():
        if tags & present:
            targets[task] = 1
        elif tags <= absent:
            targets[task] = 0
    return targets


def tianchi_samples(data_root, targets_path, log=print, *, select_on_calibration: bool = False) -> list[GradingSample]:
    """Graded discs of the ``tianchi/`` studies, cut between the pseudo-labelled outlines of
    ``targets_path`` (``spinenet train tianchi-targets``) as ``spinenet run`` cuts them.  Studies of
    ``datasets.DEFAULT_VAL_CASES`` get subset "validation", the others "training"; the 5 studies
    with swapped labels are left out.  With ``select_on_calibration`` (for choosing a schedule
    without looking at the held-out studies) the calibration studies (``datasets.calibration_split``)
    validate and the held-out studies are left out altogether."""
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.training import datasets
    from SpineNetLib.training.tianchi import read_pseudo_labels

    outlines = read_pseudo_labels(targets_path)
    cases = datasets.list_cases(data_root, sources=datasets.POINT_SOURCES)
    validating = {c.case_id for c in datasets.calibration_split(cases)[1]} if select_on_calibration \
        else set(datasets.DEFAULT_VAL_CASES)
    out = []
    for case in cases:
        doc = json.loads((case.path / "case.json").read_text(encoding="utf-8"))
        targets = outlines.get(case.case_id)
        if doc.get("suspect_label_order") or targets is None:
            continue
        if select_on_calibration and case.case_id in datasets.DEFAULT_VAL_CASES:
            continue
        tags = {p["name"]: p.get("tianchi_tag", "") for p in doc["points"] if p["kind"] == "disc"}
        bodies = [Vertebra(slices=[0], polygons=[quad], level=level) for level, quad in targets.quads.items()]
        scan = load_scan(case.path / "image.nii.gz")
        subset = "validation" if case.case_id in validating else "training"
        for vol in extract_ivd_volumes(scan, sorted(bodies, key=lambda v: float(v.centroid_xy[1]))):
            values = tianchi_disc_targets(tags.get(vol.level, ""))
            if values:
                out.append(GradingSample(vol.volume.astype(np.float16), values, group=case.patient_id,
                                         name=f"{case.case_id}:{vol.level}", subset=subset))
    if log:
        log(f"tianchi: {len(out)} graded discs")
    return out


def split_samples(samples: Sequence[GradingSample], val_fraction: float, seed: int):
    """(train, val): the data set's own subsets if it has both, else a seeded split by group."""
    subsets = {s.subset for s in samples}
    if {"training", "validation"} <= subsets:
        return ([s for s in samples if s.subset != "validation"], [s for s in samples if s.subset == "validation"])
    groups = sorted({s.group for s in samples})
    rng = np.random.default_rng([int(seed), 41])
    order = [groups[i] for i in rng.permutation(len(groups))]
    n_val = int(round(val_fraction * len(groups)))
    if val_fraction > 0 and len(groups) > 1:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_groups = set(order[:n_val])
    return [s for s in samples if s.group not in val_groups], [s for s in samples if s.group in val_groups]


# --------------------------------------------------------------------------- training


def backbone_features(model: GradingNet, x: torch.Tensor) -> torch.Tensor:
    """The pooled features the heads see (captured at the first head's input)."""
    got = {}
    hook = getattr(model, HEADS[0].name).register_forward_pre_hook(lambda m, inp: got.setdefault("f", inp[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return got["f"]


def heads_forward(model: GradingNet, feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(model, h.name)(feats) for h in HEADS)


def _stage_lr(steps: int, head_steps: int, warmup: int, head_factor: float):
    def factor(s: int) -> float:
        if s < steps:
            return cosine_lr(s, steps, warmup)
        return head_factor * cosine_lr(s - steps, max(1, head_steps), 0)
    return factor


def _batch(rng, samples, probabilities, tasks, batch_size, augment, allow_reverse, device, degrade=0.0):
    idx = rng.choice(len(samples), size=batch_size, p=probabilities)
    vols = [augment_volume(rng, samples[i].volume, augment, allow_reverse, degrade) for i in idx]
    y = [[samples[i].targets.get(t.name, -1) for t in tasks] for i in idx]
    x = torch.from_numpy(np.stack(vols).astype(np.float32))[:, None].to(device)
    return x, torch.tensor(y, dtype=torch.long, device=device)


def train_grader(args, samples: Sequence[GradingSample] | None = None) -> Path:
    """Run ``spinenet train grader`` (see the module docstring); returns the final weights path.

    ``samples`` (with subsets "training" and "validation") replace the data the arguments name; a
    cross-validation (``benchmarks/crossval_grader.py``) assigns its folds this way."""
    set_threads(args.threads)
    device = resolve_device(args.device)
    pathologies, sequences, wanted = _checked_arguments(args)
    run = RunFolder(args.out, _run_config(args, pathologies, sequences), resume=args.resume)
    rng = seed_everything(args.seed)
    log = print

    train_set, val_set, tasks = _training_data(args, pathologies, sequences, wanted, log, samples)
    probabilities = sampling_probabilities(train_set, tasks, args.sampling)
    weights = class_weights(train_set, tasks, probabilities)

    def counts(t):
        return np.bincount([s.targets[t.name] for s in train_set if t.name in s.targets], minlength=t.n_values)
    log(f"data: {len(train_set)} training discs, {len(val_set)} validation discs; training grades per task: "
        + ", ".join(f"{t.name} {counts(t).tolist()}" for t in tasks))

    if args.init:
        model = load_initial("grading", args.init)
    else:
        model = GradingNet(GradingConfig(tuple(args.config_blocks), args.base_width, args.input_slices))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.steps + args.head_steps
    head_lr = args.head_lr if args.head_lr else args.lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _stage_lr(args.steps, args.head_steps, min(100, args.steps // 10), head_lr / args.lr))
    stages = _TwoStages(args, run, model, rng, train_set, val_set, tasks, probabilities, weights, device, log)
    reached = train_loop(run, model, opt, sched, rng, total, stages.step, save_every=args.save_every,
                         log_every=max(1, min(10, total // 10)), on_validate=stages.on_validate, val_every=1,
                         stop_after=getattr(args, "stop_after", None),
                         kept={"ema": stages.ema.module} if stages.ema is not None else None)
    for p in model.parameters():
        p.requires_grad_(True)
    final = run.path / "grading.pt"
    if reached < total:
        return final
    stages.finish(reached, total, final)
    return final


def _checked_arguments(args) -> tuple[list[str], list[str] | None, list[str]]:
    """(phantom pathologies, SPIDER sequences or None, wanted tasks) of valid ``train grader`` arguments."""
    if args.phantoms is not None and args.phantoms < 0:
        raise InputError(f"--phantoms must not be negative, got {args.phantoms}")
    if not args.data and not args.phantoms and not args.tianchi_targets:
        raise InputError("no training data: give --data DIR (SPIDER format), --tianchi-targets FILE or --phantoms N")
    check_run_arguments(args)
    if args.head_steps < 0:
        raise InputError("--head-steps must be at least 0")
    pathologies = [p.strip() for p in args.phantom_pathology.split(",") if p.strip()]
    sequences = [s.strip() for s in args.sequences.split(",") if s.strip()] or None
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TASKS))
    if unknown:
        raise InputError(f"unknown task {', '.join(unknown)}: use {', '.join(TASKS)}")
    return pathologies, sequences, wanted


def _run_config(args, pathologies: list[str], sequences: list[str] | None) -> dict:
    """The run's settings (``config.json``; a resume must use the same ones)."""
    return {
        "kind": "grading", "data": str(Path(args.data).resolve()) if args.data else None,
        "phantoms": args.phantoms, "phantom_pathology": pathologies, "phantom_rate": args.phantom_rate,
        "sequences": sequences, "tasks": args.tasks, "steps": args.steps, "head_steps": args.head_steps,
        "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr, "head_lr": args.head_lr,
        "weight_decay": args.weight_decay, "blocks": list(args.config_blocks), "base_width": args.base_width,
        "init": resolved_path(args.init), "val_fraction": args.val_fraction, "augment": args.augment,
        "sampling": args.sampling, "max_cases": args.max_cases, "tianchi_targets": resolved_path(args.tianchi_targets),
        "input_slices": args.input_slices,
        "select_on_calibration": args.select_on_calibration, "ema": args.ema,
        **setting_if_changed("degrade", args.degrade, 0.0),
        # the data root the targets' slices are read from: another one is other training data
        **setting_if_changed("tianchi_data", resolved_path(args.tianchi_data), None),
    }


def _training_data(args, pathologies: list[str], sequences: list[str] | None, wanted: list[str], log,
                   samples: Sequence[GradingSample] | None = None):
    """(training samples, validation samples, tasks to train): the tasks seen in training (and wanted)."""
    if samples is not None:
        samples = list(samples)
    elif args.tianchi_targets:
        from SpineNetLib.training.datasets import default_data_root

        samples = tianchi_samples(args.tianchi_data or default_data_root(), args.tianchi_targets, log,
                                  select_on_calibration=args.select_on_calibration)
    elif args.data:
        samples = spider_samples(args.data, sequences, args.max_cases, log)
    else:
        samples = phantom_samples(args.phantoms, args.seed, pathologies, args.phantom_rate, log=log)
    train_set, val_set = split_samples(samples, args.val_fraction, args.seed)
    tasks = [t for t in TASKS.values() if any(t.name in s.targets for s in train_set)
             and (not wanted or t.name in wanted)]
    if not train_set or not tasks:
        raise InputError("no training sample with a usable grade")
    return train_set, val_set, tasks


class _TwoStages:
    """Step function, validation and final files of one ``train`` run (joint training, then heads only)."""

    def __init__(self, args, run, model: GradingNet, rng: np.random.Generator, train_set, val_set, tasks,
                 probabilities: np.ndarray, weights: dict, device, log):
        self.args, self.run, self.model, self.rng, self.device, self.log = args, run, model, rng, device, log
        self.train_set, self.val_set, self.tasks = train_set, val_set, tasks
        self.probabilities, self.weights = probabilities, weights
        self.head_params = {id(p) for h in HEADS for p in getattr(model, h.name).parameters()}
        # exponential moving average of the weights (``--ema``): validated and saved instead of the raw
        # weights, whose balanced accuracy jumps by 0.1-0.2 between neighbouring checkpoints on the
        # few hundred clinical discs.  It starts here from the initial weights; checkpoint-latest.pt
        # keeps it (train_loop's ``kept``), so a --resume restores it and goes on as an uninterrupted run
        self.ema = WeightAverage(model, args.ema) if args.ema > 0 else None
        self.allow_reverse = not any(t.name in LATERAL_TASKS for t in tasks)

    def step(self, step: int):
        """``(loss, info)`` of one step; from ``--steps`` on: frozen backbone, fixed BN statistics."""
        args, model, tasks = self.args, self.model, self.tasks
        x, y = _batch(self.rng, self.train_set, self.probabilities, tasks, args.batch_size, args.augment,
                      self.allow_reverse, self.device, args.degrade)
        if step >= args.steps:          # stage 2: frozen backbone, fixed BN statistics
            model.eval()
            for p in model.parameters():
                p.requires_grad_(id(p) in self.head_params)
            with torch.no_grad():
                feats = backbone_features(model, x)
            out = heads_forward(model, feats)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
            out = model(x)
        if self.ema is not None:
            self.ema.update(model)  # the weights as the previous step left them
        loss, info = grading_loss(out, y, tasks, self.weights)
        info["stage"] = 1 if step < args.steps else 2
        return loss, info

    @property
    def result_model(self) -> GradingNet:
        """The network that is validated and saved: the weight average with ``--ema``, else the weights."""
        return self.ema.module if self.ema is not None else self.model

    def validate(self, tag: str, step: int) -> dict:
        res = evaluate(self.result_model, self.val_set, self.tasks, device=self.device) if self.val_set else {}
        summary = " ".join(f"{k}={v['balanced_accuracy']:.3f}" for k, v in res.items())
        self.log(f"validation ({tag}, step {step}): balanced accuracy {summary or 'n/a (no validation discs)'}")
        hist_path = self.run.path / "val_history.json"
        hist = json.loads(hist_path.read_text(encoding="utf-8")) if hist_path.is_file() else []
        hist = [h for h in hist if h.get("step") != step] + [{"step": step, "tag": tag, "metrics": res}]
        self.run.write_json("val_history.json", hist)
        return res

    def on_validate(self, step: int) -> None:
        args = self.args
        if step == args.steps or (args.val_every and step % args.val_every == 0):
            self.validate("after joint training" if step == args.steps else "periodic", step)

    def finish(self, reached: int, total: int, final: Path) -> None:
        """Final validation, ``val_metrics.json`` and the fp16 weights ``final``."""
        args, run, tasks = self.args, self.run, self.tasks
        final_metrics = self.validate("final", reached)
        hist = json.loads((run.path / "val_history.json").read_text(encoding="utf-8"))
        joint = next((h["metrics"] for h in hist if h["step"] == args.steps), None)
        run.write_json("val_metrics.json", {"tasks": [t.name for t in tasks],
                                            "task_heads": {t.name: list(t.heads) for t in tasks},
                                            "n_train": len(self.train_set),
                                            "n_val": len(self.val_set), "after_joint_training": joint,
                                            "final": final_metrics})
        checkpoints.save_checkpoint(final, "grading", self.result_model.cpu(), half=True,
                                    extra={"epoch_no": int(total), "seed": int(args.seed),
                                           **run.weights_extra(),
                                           "tasks": [t.name for t in tasks],
                                           # the heads the data graded; the others say "not trained"
                                           "trained_heads": ",".join(sorted({h for t in tasks for h in t.heads}))})
        self.log(f"wrote {final}")


# --------------------------------------------------------------------------- command line


def add_grader_parser(sub) -> None:
    """Register ``spinenet train grader`` on the ``train`` sub-parsers (called from ``training.cli.register``)."""
    p = sub.add_parser("grader", help="train the disc grading network (SPIDER-format data or phantoms)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="SPIDER-format folder: images/*.mha, masks/*.mha, radiological_gradings.csv")
    add_run_arguments(p, steps=2000, batch=8, lr=1e-3, data=False)
    p.add_argument("--phantoms", type=int, default=0, metavar="N",
                   help="train on N synthetic lumbar phantoms instead of --data")
    p.add_argument("--phantom-pathology", default=",".join(PHANTOM_PATHOLOGIES), metavar="LIST",
                   help=f"phantom pathologies (default {','.join(PHANTOM_PATHOLOGIES)})")
    p.add_argument("--phantom-rate", type=float, default=0.3, metavar="P",
                   help="chance of each phantom pathology at each lumbar disc (default 0.3)")
    p.add_argument("--sequences", default="t2", metavar="LIST",
                   help="SPIDER series to use: t1, t2, t2_SPACE (default t2, the grader's sequence)")
    p.add_argument("--tasks", default="", metavar="LIST", help=f"train only these tasks ({', '.join(TASKS)})")
    p.add_argument("--head-steps", type=int, default=None,
                   help="frozen-backbone head fine-tuning steps after --steps (default steps/5)")
    p.add_argument("--head-lr", type=float, default=None, help="peak learning rate of the head stage (default --lr)")
    p.add_argument("--config-blocks", type=int, nargs=4, default=[2, 2, 2, 2], metavar="N",
                   help="basic blocks per ResNet stage (default 2 2 2 2; official 3 4 6 3)")
    p.add_argument("--base-width", type=int, default=16, help="grader base width (default 16; official 64)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from these grading weights (their architecture; e.g. the official ones)")
    p.add_argument("--sampling", choices=("balanced", "uniform"), default="balanced",
                   help="draw samples by task and grade uniformly (balanced, default) or all alike (uniform)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of patients for validation when the data has no validation subset (default 0.2)")
    p.add_argument("--val-every", type=int, default=0, help="also validate every K steps (0: after each stage)")
    p.add_argument("--max-cases", type=int, default=0, help="use only the first N SPIDER series (tests)")
    p.add_argument("--tianchi-targets", default=None, metavar="FILE",
                   help="train on the graded discs of tianchi/, cut between these pseudo-labelled outlines "
                        "(`spinenet train tianchi-targets`); held-out studies validate")
    p.add_argument("--tianchi-data", default=None, metavar="DIR",
                   help="data root holding tianchi/ (default: $SPINENET_DATA or ../shared/data)")
    add_ema_argument(p)
    p.add_argument("--select-on-calibration", action="store_true",
                   help="with --tianchi-targets: validate on the calibration studies and leave the held-out "
                        "ones out (to choose a schedule without seeing them)")
    p.add_argument("--input-slices", type=int, default=9, choices=(1, 3, 5, 7, 9),
                   help="central slices of the disc volume the grader reads (default 9, official; 1 for single "
                        "mid-sagittal slices such as tianchi/)")
    p.add_argument("--augment", type=float, default=1.0, help="augmentation strength, 0 = none (default 1)")
    p.add_argument("--degrade", type=float, default=0.0, metavar="P",
                   help="chance that a training disc is blurred, flattened and made noisy first, as a volume "
                        "shows it (degrade_image; default 0)")
    p.set_defaults(func=command_train_grader)


def command_train_grader(args) -> int:
    if args.head_steps is None:
        args.head_steps = args.steps // 5
    check_fraction("--val-fraction", args.val_fraction, below_one=True)
    check_fraction("--ema", args.ema, below_one=True)
    check_fraction("--phantom-rate", args.phantom_rate)
    check_fraction("--degrade", args.degrade)
    check_non_negative("--augment", args.augment)
    if args.head_lr is not None and not (args.head_lr > 0 and np.isfinite(args.head_lr)):
        raise InputError(f"--head-lr must be a positive number, got {args.head_lr}")
    train_grader(args)
    return 0
