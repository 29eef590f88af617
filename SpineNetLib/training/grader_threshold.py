"""``spinenet train grader-threshold``: the decision threshold of a binary grading head, chosen on the
calibration studies and built into the head's bias.

A grader trained with balanced sampling can still be biased towards the common class on studies
it has not seen (the bundled herniation grader found 57 % of held-out herniations at the argmax).
The threshold is chosen without the held-out studies: a *selection* grader, trained with
``--select-on-calibration`` (so it never saw the 30 calibration studies), scores their discs; the
shift ``s`` of the logit difference (present - absent) that maximises the balanced accuracy there
(ties: the smallest ``|s|``) is added to the present-class bias of the *final* grader, so that its
argmax reports "present" when ``logit_present - logit_absent > -s``.  The checkpoint records
``<task>_logit_shift``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from SpineNetLib.core.errors import InputError
from SpineNetLib.training.grader import HEAD_INDEX, TASKS, tianchi_samples
from SpineNetLib.weights import checkpoints

#: The shifts tried (nats of logit difference).
SHIFTS = np.round(np.arange(-4.0, 4.0001, 0.25), 2)


def best_shift(logit_difference: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(shift, balanced accuracy)`` maximising the balanced accuracy of ``difference + shift > 0``."""
    truth = np.asarray(truth).astype(int)
    if truth.min() == truth.max():
        raise InputError("the calibration discs hold one class only: no threshold can be chosen")
    scores = []
    for shift in SHIFTS:
        predicted = (np.asarray(logit_difference) + shift > 0).astype(int)
        scores.append(0.5 * ((predicted[truth == 1] == 1).mean() + (predicted[truth == 0] == 0).mean()))
    best = max(range(len(SHIFTS)), key=lambda i: (round(scores[i], 9), -abs(SHIFTS[i])))
    return float(SHIFTS[best]), float(scores[best])


def save_with_shift(grader: torch.nn.Module, weights, task_name: str, shift: float, out) -> None:
    """Write ``grader`` (loaded from ``weights``) with ``shift`` added to the present-class bias of the
    task's head, keeping the checkpoint's plain entries and recording ``<task>_logit_shift``;
    ``grader`` itself is left unchanged."""
    stored = checkpoints.read_checkpoint(checkpoints.resolve_weights_file(weights))
    extra = {k: v for k, v in stored.items() if k not in ("model_weights", checkpoints.ARCH_KEY)
             and isinstance(v, (bool, int, float, str, list))}
    extra[f"{task_name}_logit_shift"] = shift
    shifted = copy.deepcopy(grader)
    with torch.no_grad():
        getattr(shifted, TASKS[task_name].heads[0]).bias[1] += shift
    checkpoints.save_checkpoint(out, "grading", shifted, half=True, extra=extra)


def calibrate_grader_threshold(args) -> dict:
    task = TASKS.get(args.task)
    if task is None or task.rule != "set" or task.n_values != 2:
        raise InputError(f"--task must be a binary single-head task, e.g. herniation (got {args.task!r})")
    head = task.heads[0]
    from SpineNetLib.training.datasets import default_data_root

    samples = tianchi_samples(args.data or default_data_root(), args.tianchi_targets, log=None,
                              select_on_calibration=True)
    calibration = [s for s in samples if s.subset == "validation" and task.name in s.targets]
    if not calibration:
        raise InputError("no calibration disc with that grade")
    selector = checkpoints.load_model("grading", args.select)
    x = torch.from_numpy(np.stack([s.volume.astype(np.float32) for s in calibration]))[:, None]
    with torch.no_grad():
        logits = selector(x)[HEAD_INDEX[head]]
    shift, balanced = best_shift((logits[:, 1] - logits[:, 0]).numpy(), [s.targets[task.name] for s in calibration])
    save_with_shift(checkpoints.load_model("grading", args.grader), args.grader, task.name, shift, args.out)
    summary = {"task": task.name, "shift": shift, "calibration_balanced_accuracy": balanced,
               "calibration_discs": len(calibration),
               "calibration_present": int(sum(s.targets[task.name] for s in calibration))}
    print(f"{task.name}: logit shift {shift:+.2f} (balanced accuracy {balanced:.3f} on {len(calibration)} "
          f"calibration discs) -> {args.out}")
    return summary


def add_grader_threshold_parser(sub) -> None:
    """Register ``spinenet train grader-threshold`` (called from ``training.cli.register``)."""
    p = sub.add_parser("grader-threshold",
                       help="choose a binary grading head's threshold on the calibration studies and build it "
                            "into a grader's weights")
    p.add_argument("--select", required=True, metavar="WEIGHTS",
                   help="grader trained with --select-on-calibration (never saw the calibration studies)")
    p.add_argument("--grader", required=True, metavar="WEIGHTS", help="the grader to adjust (e.g. the final one)")
    p.add_argument("--tianchi-targets", required=True, metavar="FILE", help="pseudo-labelled tianchi/ outlines")
    p.add_argument("--data", default=None, metavar="DIR", help="data root (default: $SPINENET_DATA or ../shared/data)")
    p.add_argument("--task", default="herniation", help="binary task (default herniation)")
    p.add_argument("--out", required=True, metavar="FILE", help="adjusted grading weights to write")
    p.set_defaults(func=command_grader_threshold)


def command_grader_threshold(args) -> int:
    calibrate_grader_threshold(args)
    return 0
