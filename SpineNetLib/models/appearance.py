"""Appearance net: a small 3D CNN giving 24 level logits per vertebra volume.

official §3.2.  Input ``[N, 1, 224, 224, 16]`` = [batch, ch, rows, cols,
sagittal slices] (slices LAST, unlike the grading net); output ``[N, 24]``
logits over ``levels.LEVELS``.  Each stage is conv -> ReLU -> BatchNorm (BN
after the ReLU) -> max-pool; parameter names match ``appearance/ckpt187.pt``.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import N_LEVELS

#: Fixed input size (rows, cols, slices); fc1 expects exactly 128*5*5*2 = 6400 features.
APPEARANCE_INPUT_SHAPE = (224, 224, 16)


class AppearanceNet(nn.Module):
    """Vertebra volume ``[N, 1, 224, 224, 16]`` -> ``[N, 24]`` level logits."""

    def __init__(self) -> None:
        super().__init__()
        # Registration order = official state_dict order (conv_i, bnrm_i, ..., fc1, fc2).
        self.conv1 = nn.Conv3d(1, 8, (3, 3, 1), stride=(2, 2, 1), padding=(3, 3, 0))
        self.bnrm1 = nn.BatchNorm3d(8)
        self.conv2 = nn.Conv3d(8, 16, (3, 3, 1), padding=(3, 3, 0))
        self.bnrm2 = nn.BatchNorm3d(16)
        self.conv3 = nn.Conv3d(16, 32, 3)
        self.bnrm3 = nn.BatchNorm3d(32)
        self.conv4 = nn.Conv3d(32, 64, 3)
        self.bnrm4 = nn.BatchNorm3d(64)
        self.conv5 = nn.Conv3d(64, 128, 3)
        self.bnrm5 = nn.BatchNorm3d(128)
        self.fc1 = nn.Linear(128 * 5 * 5 * 2, 256)
        self.fc2 = nn.Linear(256, N_LEVELS)
        self.dropout = nn.Dropout(0.5)

    def _stage(self, x: torch.Tensor, conv: nn.Conv3d, bnrm: nn.BatchNorm3d, pool) -> torch.Tensor:
        """conv -> ReLU -> BatchNorm -> max-pool (``pool`` None: none), as the official network does.

        In inference, ReLU and a BatchNorm whose weights are all >= 0 are non-decreasing functions of
        each value (every rounding step is), so they commute exactly with max-pooling: pooling first
        gives the same bits on 4 or 8 times fewer values (8 vertebrae: 0.23-0.27 -> 0.16-0.18 s, 2 threads).
        """
        x = conv(x)
        if pool is None:
            return bnrm(F.relu(x))
        if not self.training and not bool((bnrm.weight < 0).any()):
            return bnrm(F.relu(F.max_pool3d(x, pool)))
        return F.max_pool3d(bnrm(F.relu(x)), pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 1 or tuple(x.shape[2:]) != APPEARANCE_INPUT_SHAPE:
            raise InputError(f"appearance input must be [N, 1, 224, 224, 16], got {list(x.shape)}")
        x = self._stage(x, self.conv1, self.bnrm1, None)                       # 114x114x16
        x = self._stage(x, self.conv2, self.bnrm2, (2, 2, 1))                  # 59x59x16
        x = self._stage(x, self.conv3, self.bnrm3, (2, 2, 1))                  # 28x28x14
        x = self._stage(x, self.conv4, self.bnrm4, 2)                          # 13x13x6
        x = self._stage(x, self.conv5, self.bnrm5, 2)                          # 5x5x2
        x = self.dropout(torch.flatten(x, 1))
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)
