"""Context net: a U-Net along the height of the 24-column "label image".

official §3.3.  Input and output ``[N, 1, H, 24]`` with H a multiple of 16
(the pipeline pads to a multiple of 256, official §5.5); output is raw.
All (5, 3) convs use dilation (2, 1) and padding (4, 1), which keep the size;
pooling and upsampling act on the height only.  Each conv is followed by
ReLU then BatchNorm (except the last).  Names match ``context/ckpt16.pt``.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import N_LEVELS

#: Height must be a multiple of this (four halvings).
CONTEXT_HEIGHT_MULTIPLE = 16


def _conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, (5, 3), padding=(4, 1), dilation=(2, 1))


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=(2, 1), mode="bilinear", align_corners=False)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, (2, 1))


class ContextNet(nn.Module):
    """Label image ``[N, 1, H, 24]`` -> refined ``[N, 1, H, 24]`` (raw)."""

    def __init__(self) -> None:
        super().__init__()
        # Registration order = official state_dict order.
        self.conv1 = _conv(1, 16)
        self.bnrm1 = nn.BatchNorm2d(16)
        self.conv2 = _conv(16, 32)
        self.bnrm2 = nn.BatchNorm2d(32)
        self.conv3 = _conv(32, 64)
        self.bnrm3 = nn.BatchNorm2d(64)
        self.conv4 = _conv(64, 128)
        self.bnrm4 = nn.BatchNorm2d(128)
        self.conv_mid = nn.Conv2d(128, 128, 3, padding=1)
        self.bnrm_mid = nn.BatchNorm2d(128)
        self.conv5 = _conv(128, 64)
        self.bnrm5 = nn.BatchNorm2d(64)
        self.conv6 = _conv(128, 32)
        self.bnrm6 = nn.BatchNorm2d(32)
        self.conv7 = _conv(64, 16)
        self.bnrm7 = nn.BatchNorm2d(16)
        self.conv8 = _conv(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[3] != N_LEVELS or x.shape[2] % CONTEXT_HEIGHT_MULTIPLE:
            raise InputError(
                f"context input must be [N, 1, H, {N_LEVELS}] with H a multiple of "
                f"{CONTEXT_HEIGHT_MULTIPLE}, got {list(x.shape)}")
        x = _pool(self.bnrm1(F.relu(self.conv1(x))))                    # H/2
        skip2 = x = _pool(self.bnrm2(F.relu(self.conv2(x))))            # H/4, 32 ch
        skip3 = x = _pool(self.bnrm3(F.relu(self.conv3(x))))            # H/8, 64 ch
        x = _pool(self.bnrm4(F.relu(self.conv4(x))))                    # H/16
        x = self.bnrm_mid(F.relu(self.conv_mid(x)))
        x = self.bnrm5(F.relu(self.conv5(_up(x))))                      # H/8, 64 ch
        x = torch.cat([x, skip3], dim=1)
        x = self.bnrm6(F.relu(self.conv6(_up(x))))                      # H/4, 32 ch
        x = torch.cat([x, skip2], dim=1)
        x = self.bnrm7(F.relu(self.conv7(_up(x))))                      # H/2, 16 ch
        return self.conv8(_up(x))                                       # H, 1 ch
