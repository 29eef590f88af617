"""What a run may ask of the hotspot maps (methods, heads, arithmetic) and the map it gets back, without
torch: the pipeline checks a run's options before any work, and a run that asks for no map (or runs on
ONNX Runtime, ``models/onnx_runtime.py``) never imports :mod:`SpineNetLib.discs.hotspots`, which needs
torch's gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.models.grading_heads import HEADS, GradingHead

#: Saliency methods (``discs/hotspots.py``, its module docstring).
METHODS: tuple[str, ...] = ("gradient", "guided", "excitation", "contrastive_excitation")
DEFAULT_METHOD = "contrastive_excitation"
#: Largest in-plane shifts (rows, cols) of the test-time augmentation, pixels of the IVD volume.
MAX_SHIFT_RC: tuple[int, int] = (8, 16)
#: In-plane Gaussian (sigma, IVD-volume pixels ~ 0.3 mm) applied before boxes are taken and before maps
#: are resampled onto the (coarser) scan grid: two stem pixels, the resolution the excitation maps have.
SMOOTH_PX = 4.0
#: Accepted ``precision`` names of the maps (``discs/hotspots.py``), the default first.
HOTSPOT_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: Heads whose meaning depends on left/right: never augmented by reversing the slice order.
LATERAL_HEADS: tuple[str, ...] = ("fc_fsl", "fc_fsr")


def resolve_head(spec: str | GradingHead) -> GradingHead:
    """A head by module name (``fc_ued``), output column (``UpperEndplateDefect``) or index; any case."""
    if isinstance(spec, GradingHead):
        return spec
    key = str(spec).strip()
    if key.isdigit() and int(key) < len(HEADS):
        return HEADS[int(key)]
    low = key.lower()
    for h in HEADS:
        if low in (h.name.lower(), h.column.lower(), h.name[3:].lower()):
            return h
    names = ", ".join(f"{h.name} ({h.column})" for h in HEADS)
    raise InputError(f"unknown grading head {key!r}: use one of {names}")


def parse_heads(spec: str | Sequence[str]) -> list[GradingHead]:
    """``"fc_ued,Herniation"`` (or a list) -> heads, without duplicates, in the given order."""
    if isinstance(spec, GradingHead):
        spec = [spec]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[GradingHead] = []
    for item in items:
        if str(item).strip():
            h = resolve_head(item)
            if h not in out:
                out.append(h)
    if not out:
        raise InputError("no grading head given for the hotspots")
    return out


def check_hotspot_precision(precision: str) -> None:
    """InputError unless ``precision`` is one of :data:`HOTSPOT_PRECISIONS`."""
    if precision not in HOTSPOT_PRECISIONS:
        raise InputError(f"unknown hotspot precision {precision!r}: use one of {', '.join(HOTSPOT_PRECISIONS)}")


@dataclass
class HotspotMap:
    """One evidence map on a scan's input voxel grid: data, not yet a file.

    :func:`SpineNetLib.outputs.files.write_results` writes it as ``name``
    under the results folder (``documents.hotspot_files`` finds it by name).
    """

    #: File name relative to the results folder, e.g. ``hotspots_Pfirrmann.nii.gz``.
    name: str
    #: ``[k, j, i]`` float32 values in 0..1, as :func:`SpineNetLib.inputs.writers.write_image` takes them.
    voxels_kji: np.ndarray
    #: 4x4 IJK-to-RAS of that grid (the input scan's).
    ijk_to_ras: np.ndarray
