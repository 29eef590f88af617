"""Inputs shared by the official conformance fixture and its test (issue 11, item 4).

``benchmarks/official/make_conformance.py`` runs the official package (spinenet 2.1.4) on these
inputs once and stores its outputs in :data:`FIXTURE`; ``test_official_conformance.py`` runs our
``official`` profile on the same inputs.  Everything here is seeded, so both sides see identical
scans and networks:

* scans: synthetic phantoms (no shared data in the repository), one with square pixels and a
  10 degree tilt (rotated crops), one with anisotropic pixels;
* detection network: the bundled detector (real bodies; a random official-size detector's
  displacement fields assemble no quadrilateral at all);
* appearance and context networks: official size, seeded random weights with non-trivial
  BatchNorm statistics, saved in the official checkpoint layout;
* grading network: official size, seeded random weights, used only for the disc names and
  volumes that the official code cuts before grading (grades follow from the volumes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).resolve().parent / "data" / "official_conformance.json"
#: Voxels compared per volume (at seeded positions), besides each volume's sum.
SAMPLES = 400
WEIGHT_SEED = 11


def conformance_cases() -> dict:
    from SpineNetLib.synthetic.phantom import make_phantom

    return {"square_tilted": make_phantom(seed=5, shape=(300, 260), pixel_spacing=(1.0, 1.0), n_slices=5,
                                          rotation_deg=10.0).scan,
            "anisotropic": make_phantom(seed=6, shape=(320, 240), pixel_spacing=(0.8, 1.1), n_slices=5).scan}


def sample_positions(shape) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    return tuple(rng.integers(0, n, SAMPLES) for n in shape)


def label_networks(with_grading: bool = True) -> dict[str, torch.nn.Module]:
    """Seeded random official-size appearance, context (and grading) networks, in eval mode.

    The grading network is made last, so leaving it out changes none of the others."""
    from SpineNetLib.models.appearance import AppearanceNet
    from SpineNetLib.models.context import ContextNet
    from SpineNetLib.models.grading import GradingNet

    torch.manual_seed(WEIGHT_SEED)
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    nets = {"appearance": AppearanceNet(), "context": ContextNet()}
    if with_grading:
        nets["grading"] = GradingNet()
    with torch.no_grad():
        for net in nets.values():
            randomise_batch_norm(net, generator)
    return {k: v.eval() for k, v in nets.items()}


def randomise_batch_norm(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics, so eval-mode BatchNorm is not the identity."""
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=generator))


def save_official_layout(nets: dict[str, torch.nn.Module], folder: Path) -> Path:
    """``{folder name: network}`` saved as the official checkpoints are (official §2): one
    ``<name>/ckpt1.pt`` each, under ``model_weights`` for ``grading`` and ``net`` otherwise."""
    for name, net in nets.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        key = "model_weights" if name == "grading" else "net"
        torch.save({key: net.state_dict(), "epoch": 1, "loss": 0.0}, folder / name / "ckpt1.pt")
    return folder


def write_label_networks(folder: Path) -> Path:
    """:func:`label_networks` saved as the official checkpoints are (no ``detect-vfr/``)."""
    return save_official_layout(label_networks(), folder)
