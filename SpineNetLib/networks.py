"""The networks of one weight set, loaded once for many runs: :func:`load_networks` resolves the weights
(``weights/resolve.py``) and loads them on the runtime asked for (torch, OpenVINO for the detector, or ONNX
Runtime for every network, which never imports torch), into :class:`Networks`, which
:func:`SpineNetLib.pipeline.run` takes.  ``SpineNetLib.pipeline`` re-exports both names, the API's."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # annotations only: torch is imported where it is used
    import torch

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.progress import ProgressCallback
from SpineNetLib.detect import vfr as detection
from SpineNetLib.models.runtime_choice import AUTO, automatic_runtime, choose_device
from SpineNetLib.models.runtimes import check_runtime
from SpineNetLib.weights.resolve import WeightSet, resolve_weights, resolve_weights_file, user_cache_dir
# torch and its networks are imported where a run needs them: --runtime onnx never does (models/onnx_runtime.py)


@dataclass
class Networks:
    """The loaded networks of one weight set, in eval mode on one device."""

    #: None when another runtime runs it (``predictor``; ``models/runtimes.py``).
    detector: torch.nn.Module | None
    appearance: torch.nn.Module
    context: torch.nn.Module
    device: torch.device
    weights: WeightSet
    grading: torch.nn.Module | None = None
    load_seconds: float = 0.0
    #: Optional ``predict(patches, boxes)`` used instead of running ``detector``
    #: (e.g. another runtime, or ground-truth "oracle" maps in tests).
    predictor: detection.Predictor | None = None
    extra: dict = field(default_factory=dict)
    #: "fp32" or "bf16" (:mod:`SpineNetLib.models.precision`), recorded in the documents.
    precision: str = "fp32"
    #: Where the networks run, "torch", "openvino" (the detector) or "onnx" (all; ``models/runtimes.py``).
    runtime: str = "torch"
    #: ``predict`` of the weight set's second detector, for S1 only: its outline, and an S1 below an L5
    #: (``detect/s1_outline.py``); None when the weight set has none.
    s1_outline: detection.Predictor | None = None


def load_networks(weights: str | None = "bundled", device: str = "auto", *,
                  trusted_sha256: set[str] | None = None, with_grading: bool = False,
                  precision: str = "fp32", runtime: str = "torch", threads: int | None = None,
                  progress: ProgressCallback | None = None) -> Networks:
    """The networks of a weight set; ``precision`` "bf16" runs them under bfloat16 autocast
    (``models/precision.py``); ``runtime`` "openvino" runs the detector with OpenVINO on the CPU
    (``models/runtimes.py``), "onnx" every network on ONNX Runtime on ``threads`` threads, never
    importing torch (``models/onnx_runtime.py``), "auto" ONNX Runtime where it can stand in for torch
    (``models/runtime_choice.py``), going on with torch when its export cannot be made or read.
    ``progress`` hears the networks' export or conversion, the first time ONNX Runtime or OpenVINO runs a
    weights file."""
    start = time.perf_counter()
    check_runtime(runtime)
    weight_set = resolve_weights(weights)
    if runtime == AUTO:
        runtime = automatic_runtime(weights, device, precision)
        if runtime == "onnx":
            try:
                return _onnx_networks(weight_set, with_grading, trusted_sha256, threads, start, progress)
            except (InputError, OSError, RuntimeError, ImportError):
                runtime = "torch"   # Networks.runtime, and so the vertebrae document, says which ran
    if runtime != "torch" and str(device) not in ("auto", "cpu"):
        raise InputError(f"--runtime {runtime} runs on the CPU: use --device cpu (or auto)")
    if runtime == "onnx":
        if precision != "fp32":
            raise InputError("--runtime onnx computes in float32: leave out --precision bf16 (or use --runtime torch)")
        return _onnx_networks(weight_set, with_grading, trusted_sha256, threads, start, progress)
    from SpineNetLib.models.precision import with_precision
    from SpineNetLib.models.runtimes import openvino_detector_predictor
    from SpineNetLib.weights.checkpoints import load_for_run

    dev = choose_device("cpu" if runtime != "torch" else device)
    load = lambda kind: with_precision(load_for_run(weight_set, kind, dev, precision, trusted_sha256),  # noqa: E731
                                       precision)
    detector, predictor = None, None
    if runtime == "openvino":   # first, while little else is loaded: converting takes memory (runtimes.py)
        predictor = openvino_detector_predictor(
            lambda: load_for_run(weight_set, "detector", dev, "fp32", trusted_sha256, fold=False),
            resolve_weights_file(weight_set.path("detector")), precision,
            cache_dir=user_cache_dir() / "openvino", progress=progress)
    else:
        detector = load("detector")
    grading = load("grading") if (with_grading and weight_set.grading is not None) else None
    return Networks(detector=detector, appearance=load("appearance"), context=load("context"),
                    grading=grading, device=dev, weights=weight_set, predictor=predictor,
                    s1_outline=(detection.network_predictor(load("s1_outline"), device=dev)
                                if weight_set.s1_outline is not None else None),
                    load_seconds=time.perf_counter() - start, precision=precision, runtime=runtime)


def _onnx_networks(weight_set: WeightSet, with_grading: bool, trusted_sha256: set[str] | None,
                   threads: int | None, start: float, progress: ProgressCallback | None = None) -> Networks:
    """:func:`load_networks` for ``runtime="onnx"`` (``models/onnx_runtime.py``)."""
    from SpineNetLib.models import onnx_runtime

    def load_torch(kind: str):   # imports torch: only when a network is exported
        from SpineNetLib.weights.checkpoints import load_for_run

        return load_for_run(weight_set, kind, "cpu", "fp32", trusted_sha256)

    kinds = [k for k in onnx_runtime.KINDS if weight_set.path(k) is not None and (k != "grading" or with_grading)]
    nets = onnx_runtime.onnx_networks(
        {k: resolve_weights_file(weight_set.path(k)) for k in kinds},
        load_torch,
        user_cache_dir() / "onnx", threads=int(threads or 0), progress=progress)
    return Networks(detector=None, appearance=nets["appearance"], context=nets["context"],
                    grading=nets.get("grading"), device="cpu", weights=weight_set,
                    predictor=onnx_runtime.onnx_predictor(nets["detector"]),
                    s1_outline=(onnx_runtime.onnx_predictor(nets["s1_outline"]) if "s1_outline" in nets else None),
                    load_seconds=time.perf_counter() - start, precision="fp32", runtime="onnx")
