"""Grading net: a 3D ResNet-34 layout with 11 classification heads.

official §3.4 and §7.  Input ``[N, 1, 9, 112, 224]`` = [batch, ch, slices,
rows, cols]; the slice axis is never downsampled (strides are (1, s, s)).
Output: a tuple of 11 logit tensors in :data:`HEADS` order.  Names match
``grading/ckpt1.pt``.  Width and depth are configurable (:class:`GradingConfig`)
so that a small grader can be trained; the defaults are the official network.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from SpineNetLib.core.errors import InputError
# the heads, the input shape and the configuration need no torch (the ONNX runtime reads them too)
from SpineNetLib.models.grading_heads import (  # noqa: F401  (part of this module's API)
    GRADING_INPUT_SHAPE, HEADS, GradingConfig, GradingHead, reads_one_slice,
)


class BasicBlock3d(nn.Module):
    """Two 3x3x3 convs (no bias) with BatchNorm and a residual; stride (1, s, s) in conv1."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        st = (1, stride, stride)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=st, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, stride=st, bias=False),
                nn.BatchNorm3d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out, inplace=True)


def _layer(in_ch: int, out_ch: int, n_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock3d(in_ch, out_ch, stride)]
    blocks += [BasicBlock3d(out_ch, out_ch) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


class GradingNet(nn.Module):
    """IVD volume ``[N, 1, 9, 112, 224]`` -> tuple of 11 logit tensors (:data:`HEADS` order)."""

    def __init__(self, config: GradingConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else GradingConfig()
        w = self.config.base_width
        self.conv1 = nn.Conv3d(1, w, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=True)
        self.bn1 = nn.BatchNorm3d(w)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        b = self.config.blocks
        # layer2 keeps stride 1 (official §3.4); layer3/4 halve rows and cols only.
        self.layer1 = _layer(w, w, b[0], 1)
        self.layer2 = _layer(w, 2 * w, b[1], 1)
        self.layer3 = _layer(2 * w, 4 * w, b[2], 2)
        self.layer4 = _layer(4 * w, 8 * w, b[3], 2)
        for head in HEADS:
            self.add_module(head.name, nn.Linear(8 * w, head.n_classes))

    def read_slices(self, x: torch.Tensor) -> torch.Tensor:
        """The central ``config.input_slices`` slices of ``[N, 1, S, 112, 224]`` (all S when fewer)."""
        if x.dim() != 5 or x.shape[1] != 1:
            raise InputError(f"grading input must be [N, 1, {GRADING_INPUT_SHAPE[0]}, 112, 224], "
                             f"got {list(x.shape)}")
        k = self.config.input_slices
        first = max(0, (x.shape[2] - k) // 2)
        return x[:, :, first:first + k]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits of every head for ``[N, 1, S, 112, 224]``; of S >= ``config.input_slices`` slices the
        central ``input_slices`` are read (S - input_slices must be even)."""
        x = self.read_slices(x)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool3d(x, 1), 1)
        return tuple(getattr(self, head.name)(x) for head in HEADS)
