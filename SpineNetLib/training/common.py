"""What every trainer shares: seeding, a resumable run folder, logging, the final fp16 model,
random phantoms and the command-line options of ``spinenet train``.

Run folder layout (one per training run)::

    config.json            the run's settings (a resume must use the same ones), with the SHA-256 of
                           the files it learns from (CONTENT_SETTINGS)
    provenance.json        the code and machine of each start and resume (training/provenance.py)
    checkpoint-latest.pt   model + optimizer + scheduler + step + RNG states (atomic rewrite)
    log.csv                one row per logged step
    <kind>.pt              the final model, fp16, via checkpoints.save_checkpoint(half=True)
    val_metrics.json       validation metrics (where the trainer validates)

Reproducibility: python, numpy and torch are seeded from ``--seed``; the
trainers draw all their samples from one ``numpy.random.Generator`` whose
state is saved with the checkpoint, so ``--resume`` continues exactly where
the interrupted run stopped (same parameters after the same total steps).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.files import sha256_file
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.synthetic import phantom
from SpineNetLib.training.provenance import run_provenance, weights_provenance
from SpineNetLib.weights import checkpoints

CHECKPOINT_NAME = "checkpoint-latest.pt"
PROVENANCE_NAME = "provenance.json"
#: File options of a run's settings, stored as absolute paths (:func:`resolved_path`); a run folder of
#: older versions may hold them as typed, compared after resolving them in the current folder.
PATH_SETTINGS = ("init", "tianchi_targets", "volume_s1_targets")
#: File options whose contents decide what a run learns: the run's settings hold each file's SHA-256
#: beside its path (``<option>_sha256``), so that a run can be traced to the exact file, and a resume
#: refuses one written again at the same path. A pseudo-label file made by another version of the code
#: is other training data (MODEL_CARD.md of the bundled weights, "Training").
CONTENT_SETTINGS = PATH_SETTINGS + ("body_pool",)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy's legacy RNG and torch; return the trainer's own numpy Generator."""
    random.seed(int(seed))
    np.random.seed(int(seed) % (2 ** 32))
    torch.manual_seed(int(seed))
    return np.random.default_rng(int(seed))


def set_threads(threads: int | None) -> None:
    """``--threads``: None leaves torch's own choice; fewer than 1 is refused."""
    if threads is None:
        return
    if int(threads) < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(int(threads))


def resolve_device(spec: str) -> torch.device:
    spec = (spec or "cpu").lower()
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {spec!r} is no device: use cpu or cuda (or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {spec!r} is not supported: use cpu or cuda (or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    return device


def check_fraction(name: str, value, *, below_one: bool = False) -> None:
    """Refuse a share outside [0, 1] (outside [0, 1) with ``below_one``), NaN included."""
    if value is not None and not (0.0 <= float(value) < 1.0 if below_one else 0.0 <= float(value) <= 1.0):
        raise InputError(f"{name} must be {'in [0, 1)' if below_one else 'between 0 and 1'}, got {value}")


def check_non_negative(name: str, value: float) -> None:
    """A loss weight or strength option must be a finite number of at least 0 (one-line :class:`InputError`):
    a NaN would pass ``< 0`` and make every loss NaN, or turn the augmentation off unsaid."""
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if value < 0.0:
        raise InputError(f"{name} must not be negative")


def check_held_to_init(init, held: dict, frozen_batchnorm: bool) -> None:
    """Refuse a fine-tune's option without ``--init`` (one-line :class:`InputError`): ``held`` maps
    ``--distil`` and ``--robust-distil`` to their weights. Both the CLI and a direct call of
    ``training.detector.train`` or ``training.labelling.train_appearance`` ask it."""
    for name, weight in held.items():
        if weight > 0.0 and not init:
            raise InputError(f"{name} needs --init: the network to stay close to")
    if frozen_batchnorm and not init:
        raise InputError("--frozen-batchnorm needs --init: the detector whose BatchNorm statistics are kept")


def frozen_copy(model: torch.nn.Module, *, training: bool) -> torch.nn.Module:
    """A copy of ``model`` that no optimiser step changes: the network a fine-tune's outputs are held to
    (``--distil``, ``--robust-distil``), in training mode or, with ``training`` False, in evaluation mode
    (running BatchNorm statistics, no dropout: the outputs inference gives)."""
    import copy

    held = copy.deepcopy(model).train(training)
    for p in held.parameters():
        p.requires_grad_(False)
    return held


def check_run_arguments(args) -> None:
    """The options of :func:`add_run_arguments` (one-line :class:`InputError` for a bad one); also
    ``--threads`` and ``--device``, before any data is read."""
    if args.steps < 1 or args.batch_size < 1:
        raise InputError("--steps and --batch-size must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise InputError(f"--weight-decay must be a number of at least 0, got {args.weight_decay}")
    if args.save_every < 1:
        raise InputError(f"--save-every must be at least 1, got {args.save_every}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    resolve_device(args.device)


def output_file(path) -> Path:
    """``--out FILE`` of a command that writes one file at its end: its folder is created first (as
    the run folders are), so that a bad path is refused before the work rather than after it."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--out {path} is a folder: give the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def resolved_path(value) -> str | None:
    """A file option as stored in a run's ``config.json``: the absolute path, so that a resume from
    another working folder finds the same settings (None stays None)."""
    return str(Path(value).expanduser().resolve()) if value else None


def setting_if_changed(key: str, value, default) -> dict:
    """``{key: value}`` for a run's ``config.json`` when ``value`` is not the option's ``default``, else
    ``{}``: a run folder made before the option existed has no such key, and a resume with the option
    left at its default still matches it (:class:`RunFolder` compares the settings)."""
    return {key: value} if value != default else {}


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """LR factor: linear warm-up, then cosine decay to 2 % of the peak."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    checkpoints.atomic_torch_save(obj, path)


def with_content_hashes(config: dict) -> dict:
    """``config`` with the SHA-256 of each :data:`CONTENT_SETTINGS` file it names (``<option>_sha256``)."""
    hashes = {f"{key}_sha256": sha256_file(config[key]) for key in CONTENT_SETTINGS
              if isinstance(config.get(key), str) and Path(config[key]).is_file()}
    return {**config, **hashes}


def _setting(key: str, value):
    """A setting as a resume compares it: file options as absolute paths."""
    return resolved_path(value) if key in PATH_SETTINGS and isinstance(value, str) else value


class RunFolder:
    """A resumable training run folder (see module docstring)."""

    def __init__(self, path, config: dict, *, resume: bool) -> None:
        self.path = Path(path)
        self.config = json.loads(json.dumps(with_content_hashes(config)))  # plain JSON values only
        ckpt = self.path / CHECKPOINT_NAME
        cfg_path = self.path / "config.json"
        if resume:
            if not ckpt.is_file():
                raise InputError(f"--resume: no {CHECKPOINT_NAME} in {self.path}")
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
            # a run folder of an older version recorded no file contents: its files are taken as they are
            for key in [k for k in self.config if k.endswith("_sha256") and k not in old]:
                del self.config[key]
            # --steps may change on resume (to shorten or extend a run; the LR schedule then
            # follows the new total, so only an unchanged total reproduces an uninterrupted run).
            ignore = {"resume", "threads", "device", "out", "steps", "steps_history"}
            diff = sorted(k for k in set(old) | set(self.config)
                          if k not in ignore and _setting(k, old.get(k)) != _setting(k, self.config.get(k)))
            if diff:
                raise InputError(f"--resume with different settings than the run in {self.path}: {', '.join(diff)}")
            if old.get("steps") != self.config.get("steps"):
                old.setdefault("steps_history", []).append(old.get("steps"))
                old["steps"] = self.config.get("steps")
                cfg_path.write_text(json.dumps(old, indent=2) + "\n", encoding="utf-8")
        else:
            if ckpt.exists():
                raise InputError(f"{self.path} already holds a run; pass --resume or choose a new --out")
            self.path.mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        self.resume = resume
        self._record_provenance()
        self._t0 = time.time()

    def _record_provenance(self) -> None:
        """Add this start or resume to ``provenance.json`` (a folder of an older version has none yet)."""
        path = self.path / PROVENANCE_NAME
        if not self.resume:
            runs = []
        elif path.is_file():
            runs = json.loads(path.read_text(encoding="utf-8"))
        else:
            runs = [{"resume": False, "code_sha256": None, "note": "started by a version that recorded no provenance"}]
        self.provenance = [*runs, {"resume": self.resume, **run_provenance()}]
        path.write_text(json.dumps(self.provenance, indent=2) + "\n", encoding="utf-8")

    def weights_extra(self) -> dict:
        """Entries for the run's final weights: the fingerprint of the code that trained them."""
        return weights_provenance(self.provenance)

    # ------------------------------------------------------------------ state
    def save_state(self, step: int, model, optimizer, scheduler, rng: np.random.Generator,
                   extra: dict | None = None) -> None:
        state = {
            "step": int(step),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng_numpy_generator": rng.bit_generator.state,
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rng_python": random.getstate(),
            "rng_numpy_legacy": np.random.get_state(),
            "extra": extra or {},
        }
        _atomic_torch_save(state, self.path / CHECKPOINT_NAME)

    def load_state(self, model, optimizer, scheduler, rng: np.random.Generator) -> tuple[int, dict]:
        """Restore everything; returns (step, extra)."""
        state = torch.load(self.path / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng_numpy_generator"]
        torch.set_rng_state(state["rng_torch"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        random.setstate(state["rng_python"])
        np.random.set_state(state["rng_numpy_legacy"])
        return int(state["step"]), dict(state.get("extra") or {})

    # ------------------------------------------------------------------ logging
    def log(self, row: dict) -> None:
        path = self.path / "log.csv"
        row = {"time_s": round(time.time() - self._t0, 2), **row}
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    def write_json(self, name: str, data: dict) -> Path:
        p = self.path / name
        p.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
        return p


def make_optimizer(model, lr: float, weight_decay: float, total_steps: int, warmup: int):
    """AdamW + LambdaLR cosine schedule (both resumable through their state dicts)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total_steps, warmup))
    return opt, sched


def train_loop(run: RunFolder, model, optimizer, scheduler, rng, total_steps: int, step_fn, *,
               save_every: int = 100, log_every: int = 10, clip: float = 5.0,
               on_validate=None, val_every: int = 0, stop_after: int | None = None,
               kept: dict[str, torch.nn.Module] | None = None) -> int:
    """Run ``step_fn(step) -> (loss tensor, info dict)`` until ``total_steps``; resumable.

    ``stop_after`` ends the call after that many steps (for tests of resuming).  ``kept``: other
    modules whose state the checkpoint holds beside the model's (the grader's weight average), by
    name; a resume restores them too.  Returns the step reached.
    """
    step = 0
    kept = kept or {}
    if run.resume:
        step, extra = run.load_state(model, optimizer, scheduler, rng)
        _restore_kept(kept, extra, model)
    done_here = 0
    t_last = time.time()
    while step < total_steps:
        if stop_after is not None and done_here >= stop_after:
            break
        model.train()
        loss, info = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        optimizer.step()
        scheduler.step()
        step += 1
        done_here += 1
        if step % log_every == 0 or step == total_steps:
            now = time.time()
            run.log({"step": step, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                     "grad_norm": gnorm, "s_per_step": (now - t_last) / log_every, **info})
            t_last = now
        if step % save_every == 0 or step == total_steps:
            run.save_state(step, model, optimizer, scheduler, rng, extra=_kept_state(kept))
        if on_validate is not None and val_every and step % val_every == 0 and step < total_steps:
            on_validate(step)
    if stop_after is not None and step < total_steps:
        run.save_state(step, model, optimizer, scheduler, rng, extra=_kept_state(kept))
    return step


class WorkerBatches:
    """Training batches made ahead in forked worker processes (``--workers N``).

    The batch of step ``k`` is ``make_batch(np.random.default_rng([seed, k]))``, whichever worker makes
    it, so a run gives the same batches with any number of workers, and a resumed run goes on with the
    batches an uninterrupted one would have drawn.  (The single-process path, ``--workers 0``, draws
    every batch from the trainer's one Generator instead, as the bundled networks were trained.)
    ``make_batch`` reaches the workers by ``fork``, not by pickling, so it may hold large arrays;
    only step numbers and the batches themselves cross between processes.
    """

    def __init__(self, make_batch, seed: int, workers: int, ahead: int | None = None):
        import multiprocessing

        self._seed = int(seed)
        self._ahead = int(ahead or 2 * workers)
        self._pool = multiprocessing.get_context("fork").Pool(
            int(workers), initializer=_install_batch_maker, initargs=(make_batch,))
        self._pending: dict[int, Any] = {}
        self._next_to_submit = None

    def batch(self, step: int):
        """The batch of ``step``; steps must be asked for in increasing order (a jump restarts the queue)."""
        if step not in self._pending:
            self._pending.clear()
            self._next_to_submit = step
        while self._next_to_submit < step + self._ahead:
            k = self._next_to_submit
            self._pending[k] = self._pool.apply_async(_batch_of_step, (self._seed, k))
            self._next_to_submit += 1
        return self._pending.pop(step).get()

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()


_BATCH_MAKER = None   # set in each worker process only, by WorkerBatches' pool initializer


def _install_batch_maker(make_batch) -> None:
    global _BATCH_MAKER
    _BATCH_MAKER = make_batch
    torch.set_num_threads(1)


def _batch_of_step(seed: int, step: int):
    return _BATCH_MAKER(np.random.default_rng([seed, step]))


def _kept_state(kept: dict[str, torch.nn.Module]) -> dict:
    return {name: module.state_dict() for name, module in kept.items()}


def _restore_kept(kept: dict[str, torch.nn.Module], extra: dict, model) -> None:
    """Load the ``kept`` modules of :func:`train_loop` from a checkpoint's extra entries; one missing
    there (a run folder from before it was kept) restarts from the resumed model's weights."""
    for name, module in kept.items():
        if name in extra:
            module.load_state_dict(extra[name])
        else:
            print(f"note: {CHECKPOINT_NAME} holds no {name} (an older run): it restarts from the resumed "
                  "weights, so the result differs from an uninterrupted run's", flush=True)
            module.load_state_dict(model.state_dict())



class WeightAverage:
    """Exponential moving average of a network's weights (``--ema DECAY``), saved instead of the weights.

    ``average = decay * average + (1 - decay) * weights`` once per step, BatchNorm's running
    statistics too (its step counter is copied).  It starts from the weights it is made from; pass
    ``module`` to :func:`train_loop` as ``kept={"ema": average.module}`` so that a resumed run
    restores it and ends as an uninterrupted one.  Call :meth:`update` in the step function before
    the step's own update, as the grader always has: the average then holds every step but the last.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        import copy

        if not 0.0 < float(decay) < 1.0:
            raise InputError(f"--ema must lie between 0 and 1 (exclusive), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()

    def update(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for average, current in zip(self.module.state_dict().values(), model.state_dict().values()):
                if average.is_floating_point():
                    average.mul_(self.decay).add_(current.detach(), alpha=1.0 - self.decay)
                else:
                    average.copy_(current)


def add_ema_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate (where the trainer validates) and save an exponential moving average of "
                        "the weights with this decay per step (e.g. 0.99; default 0: the weights themselves)")


# --------------------------------------------------------------------------- phantoms

_BODY_PATHOLOGIES = ("wedge_fracture", "endplate_notch", "slip")
_DISC_PATHOLOGIES = ("narrow_disc", "dark_disc")


def random_phantom(rng: np.random.Generator, *, n_slices: int = 5, fov: str | None = None,
                   include_s2: bool = False):
    """A :func:`SpineNetLib.synthetic.phantom.make_phantom` with random FOV, contrast, rotation, spacing, pathology.

    Used as a seeded pool of synthetic slices (all levels C2..S1, T1/T2/STIR
    contrasts) beside the real lumbar T2/water data.
    """
    fov = fov or str(rng.choice(["lumbar", "lumbar", "whole", "thoracic", "cervical", "cervical"]))
    contrast = str(rng.choice(["T1", "T2", "STIR"]))
    spacing = float(rng.uniform(0.4, 1.2)) if fov != "whole" else float(rng.uniform(0.6, 1.2))
    pathology: dict[str, list[str]] = {}
    for _ in range(int(rng.integers(0, 3))):
        i = int(rng.integers(1, len(LEVELS_TOP_DOWN) - 1))
        if rng.random() < 0.5:
            pathology.setdefault(LEVELS_TOP_DOWN[i], []).append(str(rng.choice(_BODY_PATHOLOGIES[:2])))
        else:
            key = f"{LEVELS_TOP_DOWN[i]}-{LEVELS_TOP_DOWN[i + 1]}"
            pathology.setdefault(key, []).append(str(rng.choice(_DISC_PATHOLOGIES)))
    transitional = None
    r = rng.random()
    if r < 0.07:
        transitional = "lumbarised_S1"
    elif r < 0.14:
        transitional = "sacralised_L5"
    kwargs = dict(fov=fov, contrast=contrast, pixel_spacing=(spacing, spacing), n_slices=int(n_slices),
                  slice_thickness_mm=float(rng.uniform(3.0, 5.0)), rotation_deg=float(rng.uniform(-15, 15)),
                  noise=float(rng.uniform(0.005, 0.05)), bias_field=float(rng.uniform(0.0, 0.3)),
                  midline_offset_mm=float(rng.uniform(-3, 3)), variability=1.0,
                  seed=int(rng.integers(0, 2 ** 31 - 1)), transitional=transitional, include_s2=include_s2)
    try:
        return phantom.make_phantom(pathology=pathology, **kwargs)
    except Exception:  # an unlucky pathology combination: fall back to a healthy spine
        return phantom.make_phantom(**kwargs)


# --------------------------------------------------------------------------- command line


def add_run_arguments(p: argparse.ArgumentParser, *, steps: int, batch: int, lr: float, data: bool = True) -> None:
    """The options every ``spinenet train`` sub-command shares (run folder, steps, batch, seed, optimiser, device)."""
    if data:
        p.add_argument("--data", default=None, metavar="DIR",
                       help="real cases (shared/data layout); default: $SPINENET_DATA or ../shared/data")
    p.add_argument("--out", required=True, metavar="RUNDIR", help="run folder (created; reused with --resume)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"samples per step (default {batch})")
    p.add_argument("--seed", type=int, default=0, help="seed of python, numpy and torch (default 0)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate of AdamW (default {lr})")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUNDIR from checkpoint-latest.pt")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoint-latest.pt saves")


#: The volume sources a detector or appearance run trains on that ``--leave-out-source`` can leave out
#: (zukic/ and ivd/ are held out or unused already; tianchi/ slices come in through ``--tianchi-targets``).
LEAVE_OUT_SOURCES: tuple[str, ...] = ("chu", "myosegmentum")


def add_real_data_arguments(p: argparse.ArgumentParser) -> None:
    """``--init`` (start from a checkpoint) and the tianchi pseudo-label options of detector and appearance."""
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint (same architecture) instead of random weights")
    p.add_argument("--tianchi-targets", default=None, metavar="FILE",
                   help="pseudo-labelled tianchi/ outlines (`spinenet train tianchi-targets`); "
                        "their training studies join the real data")
    p.add_argument("--tianchi-fraction", type=float, default=0.3,
                   help="share of the real samples drawn from tianchi/ when --tianchi-targets is given (default 0.3)")
    p.add_argument("--leave-out-source", default=None, choices=LEAVE_OUT_SOURCES, metavar="SOURCE",
                   help="train on no volume of this source (chu or myosegmentum), so that all of its volumes "
                        "measure a centre the networks never saw (default: none left out)")


def real_data_config(args) -> dict:
    """The run-config entries of :func:`add_real_data_arguments` (absent options: no fine-tuning, no tianchi,
    no source left out; the last recorded only when set, so older run folders still resume)."""
    return {"init": resolved_path(getattr(args, "init", None)),
            "tianchi_targets": resolved_path(getattr(args, "tianchi_targets", None)),
            "tianchi_fraction": getattr(args, "tianchi_fraction", 0.0),
            **setting_if_changed("leave_out_source", getattr(args, "leave_out_source", None), None)}


def training_volume_cases(args) -> tuple[list, list]:
    """``(train, val)`` volume cases of the default split for a trainer: none without ``--data`` or with
    ``--phantom-fraction 1``; ``--leave-out-source`` drops that source's training cases; ``--max-cases`` then
    keeps the first N."""
    from SpineNetLib.training import datasets

    if not args.data or args.phantom_fraction >= 1.0:
        return [], []
    train, val = datasets.default_split(datasets.list_cases(args.data, sources=datasets.DETECTION_SOURCES))
    left_out = getattr(args, "leave_out_source", None)
    train = [case for case in train if case.source != left_out]
    return (train[: args.max_cases] if args.max_cases else train), val


def initial_weights(model, checkpoint) -> None:
    """Load ``checkpoint``'s weights into ``model`` (fine-tuning); the architectures must match."""
    if not checkpoint:
        return
    kind = {"VFRDetector": "detector", "AppearanceNet": "appearance", "ContextNet": "context"}[type(model).__name__]
    model.load_state_dict(load_initial(kind, checkpoint).state_dict())


def load_initial(kind: str, path):
    """The ``--init`` network of a trainer.  A file needing full unpickling is refused as no readable
    checkpoint: the train commands have no way to approve one (``checkpoints.UntrustedWeightsError``)."""
    try:
        return checkpoints.load_model(kind, path)
    except checkpoints.UntrustedWeightsError:
        raise InputError(f"--init {path} is not a readable checkpoint: no file of plain tensors as "
                         "`spinenet train` writes them (the train commands load no other)") from None
