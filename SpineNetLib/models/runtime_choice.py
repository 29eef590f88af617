"""What ``runtime="auto"``, the ``spinenet run`` and ``spinenet demo`` default, runs the networks on (issue 16).

A fresh ``spinenet run`` of the bundled networks spends about a second of its 2.5-4 s importing torch
(benchmarks/RESULTS.md, "A run without torch").  ONNX Runtime runs the same networks without it, and
names every body of the 68 held-out scans, and of the 816 runs of their acquisition variants, as torch
does (RESULTS.md, same section).  So "auto" means ONNX Runtime wherever it can stand in for torch:

- the bundled weights only: exporting the official-size networks takes 3.25 GB at its peak (issue 16's
  goal is under 2 GB) and a GPU, where there is one, runs them faster than ONNX Runtime's CPU provider;
- float32 (ONNX Runtime does not compute this project's bfloat16 autocast);
- ``device`` "auto" or "cpu": "auto" keeps the bundled networks on the CPU, where the figures above were
  measured, even on a machine with a GPU (not measured there); "cuda" asks for torch;
- ``onnxruntime`` and ``onnx`` (which writes the one-off export) both installed.

Callers that make hotspot maps (they need torch's gradients) or run the official profile (its exact
arithmetic) ask for torch themselves (``apps/cli.py``).  ``pipeline.load_networks`` goes on with torch
when the export cannot be made or read (a cache folder that cannot be written, say).

:func:`choose_device` turns ``--device`` into the torch device that the torch runtime uses.

This module imports neither numpy nor torch (torch only inside :func:`choose_device`): the command asks
it before it sets their thread pools.
"""
from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING

from SpineNetLib.core.errors import InputError, SpineNetError

if TYPE_CHECKING:   # annotations only: this module imports torch only where a device is chosen
    import torch

#: The runtime name that lets :func:`automatic_runtime` choose.
AUTO = "auto"


def onnx_runtime_installed() -> bool:
    """Whether ONNX Runtime and the onnx package (its export's writer) can be imported; imports neither."""
    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


def automatic_runtime(weights: str | None, device: str = "auto", precision: str = "fp32") -> str:
    """"onnx" where ``runtime="auto"`` runs the networks of ``weights`` on ONNX Runtime (the module's
    docstring says when), else "torch"."""
    bundled = weights in (None, "", "bundled")   # as weights/resolve.resolve_weights reads them
    if bundled and str(device) in ("auto", "cpu") and precision == "fp32" and onnx_runtime_installed():
        return "onnx"
    return "torch"


def choose_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SpineNetError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine")
    try:
        return torch.device(spec)
    except RuntimeError as error:
        raise InputError(f"unknown device {spec!r} (use auto, cpu or cuda)") from error


def slow_arithmetic_warnings(precision: str, device) -> list[str]:
    """The warning of bfloat16 arithmetic on a CPU that emulates it (``models/precision.py``), or none;
    float32 imports nothing (a run on ONNX Runtime never imports torch)."""
    if precision == "fp32":
        return []
    from SpineNetLib.models.precision import bfloat16_warning

    slow = bfloat16_warning(precision, device)
    return [slow] if slow is not None else []
