"""Batch normalisation folded into the convolution before it, for inference (issue 16).

In eval mode a BatchNorm after a convolution is an affine map per output channel, so it can be
multiplied into that convolution's weights and bias once, instead of being a second pass over
every activation.  The detector (ResNet-50 U-Net) applies each BatchNorm directly to a
convolution's output: ``convK`` -> ``bnK`` in its bottlenecks and ConvBlocks, and
``Conv -> BatchNorm`` inside ``nn.Sequential`` stems and shortcuts.

Folding changes the outputs only by float32 rounding (1e-7 of their size).  It pays under
bfloat16 autocast (probably because an unfolded BatchNorm there reads a bfloat16 convolution
output with float32 parameters): the official-size detector on the lumbar phantom took 10.1-10.7 s
folded against 12.8-13.7 s, with about 80 MB less peak memory; in float32 it gained nothing
(25.6-28.7 s against 24.4-25.0 s) (benchmarks/RESULTS.md, "BatchNorm folded").  The small bundled
detectors, whose many thin layers make the BatchNorm passes a larger share, gain in float32 too: a
bundled run of chu_02 2.03 instead of 2.13 s, of zukic_15 2.10 instead of 2.32 s, with every level,
review flag and warning of the 68 held-out scans as before (benchmarks/RESULTS.md, "The bundled
detectors folded in float32").  So ``pipeline.load_networks`` folds the detectors of the bundled
weights in both precisions, any other detector (the official weights, a weights folder) in bfloat16
only, and leaves their float32 numbers as they were.  Only the detector: the grader gained nothing
either way, and its hotspot maps
(``discs/hotspots.py``) read its BatchNorm layers apart from its convolutions (excitation
back-propagation passes through BatchNorm and takes the convolutions' positive weights); the
appearance and context networks put a ReLU between convolution and BatchNorm (official §3.2-3.3).
Folding is for inference only: a folded network has no BatchNorm left, so its state dict no longer
matches the checkpoints, and ``checkpoints.load_model`` (which training uses too) never folds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from SpineNetLib.models.detector import VFRDetector

_CONVOLUTIONS = (nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


def _fold_in_sequence(sequence: nn.Sequential) -> None:
    for i in range(len(sequence) - 1):
        if isinstance(sequence[i], _CONVOLUTIONS) and isinstance(sequence[i + 1], _BATCH_NORMS):
            sequence[i] = fuse_conv_bn_eval(sequence[i], sequence[i + 1])
            sequence[i + 1] = nn.Identity()


def _fold_named_pairs(module: nn.Module) -> None:
    children = dict(module.named_children())
    for name, conv in children.items():
        if not (name.startswith("conv") and isinstance(conv, _CONVOLUTIONS)):
            continue
        bn_name = "bn" + name[len("conv"):]
        if isinstance(children.get(bn_name), _BATCH_NORMS):
            setattr(module, name, fuse_conv_bn_eval(conv, children[bn_name]))
            setattr(module, bn_name, nn.Identity())


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """``model`` (in eval mode) with every BatchNorm folded into its convolution, in place.

    Only the detector is changed (module docstring); any other network is handed back as it is.
    Attributes such as ``config`` and ``weights_path`` stay."""
    if not isinstance(model, VFRDetector):
        return model
    if model.training:
        raise ValueError("fold_batch_norms needs a network in eval mode (it folds the running statistics)")
    with torch.no_grad():
        for module in list(model.modules()):
            if isinstance(module, nn.Sequential):
                _fold_in_sequence(module)
            _fold_named_pairs(module)
    left = [name for name, module in model.named_modules() if isinstance(module, _BATCH_NORMS)]
    if left:  # a BatchNorm not right after a convolution: the architecture changed, fold nothing silently
        raise ValueError(f"fold_batch_norms left {len(left)} BatchNorm(s) unfolded, first {left[0]}")
    return model
