"""Where the detector runs: torch (the default) or OpenVINO (issue 16, item 2).

Measured per network on a 2-core Intel Xeon with AMX (``benchmarks/bench_runtimes.py``,
benchmarks/RESULTS.md, "OpenVINO"): for the official-size detector OpenVINO runs a batch of 224 x 224
patches 1.3-1.9x faster than torch in float32, with outputs within 1e-7 of torch's, and 2.6-3x faster
than torch's bfloat16 autocast in bfloat16 (5x torch float32); for the grader, whose 3D convolutions
it handles badly, 0.07x (float32) and 0.29x (bfloat16); the labelling networks take a fraction of a
second either way.  So the switch moves the detector only.  It is opt-in: OpenVINO is not a
dependency (``pip install openvino``), converting the official-size detector takes about 25 s, and
its converted form, 557 MB for the official weights, is kept in a cache folder so that this happens
once per weights file (``pipeline.load_networks``: ``openvino/`` in the per-user cache of
``weights/resolve.user_cache_dir``).

The detector is converted from the float32 network as loaded; the ``precision`` of the run ("fp32",
"bf16", ``models/precision.py``) becomes OpenVINO's inference precision (f32 or bf16), so
``--precision bf16 --runtime openvino`` computes in bfloat16 as ``--precision bf16`` alone does.
"""
from __future__ import annotations

import ctypes
import gc
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:   # annotations only: torch is imported where it is used
    import torch

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.files import sha256_file
from SpineNetLib.core.progress import ProgressCallback, no_progress

#: Accepted names, the library's default first ("onnx": every network on ONNX Runtime, ``models/onnx_runtime.py``;
#: "auto": ONNX Runtime where it can stand in for torch, ``models/runtime_choice.py``).
RUNTIMES: tuple[str, ...] = ("torch", "openvino", "onnx", "auto")
#: OpenVINO's name of each precision of ``models/precision.py``.
_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def check_runtime(runtime: str) -> None:
    """InputError unless ``runtime`` is one of :data:`RUNTIMES`."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r} (use {' or '.join(RUNTIMES)})")


def _openvino():
    try:
        import openvino
    except ImportError:
        raise InputError("--runtime openvino needs the OpenVINO package, which is not installed "
                         "(pip install openvino)") from None
    return openvino


def _give_back_freed_memory() -> None:
    """Hand the heap freed after a conversion back to the system: glibc keeps about 0.2-0.5 GB of the
    official-size detector's conversion otherwise, which the rest of the run then adds to.  The
    conversion leaves reference cycles, hence the collection first (25-40 ms, so only after a
    conversion).  The trim is a no-op where the C library is not glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: What the progress callback of :func:`openvino_detector_predictor` hears while the detector is converted
#: (10-25 s, once per weights file where the cache can be written; benchmarks/RESULTS.md, "OpenVINO's first run").
CONVERSION_MESSAGE = "converting the detector for OpenVINO (once per weights file)"


def _converted_detector(detector: torch.nn.Module | Callable[[], torch.nn.Module], weights_path: Path | None,
                        cache_dir: Path | None, openvino,
                        progress: ProgressCallback | None = None) -> tuple[object, torch.nn.Module | None]:
    """The detector as an OpenVINO model taking any batch and frame ``(N, 1, R, C)``, and the torch
    network whose memory that model uses (None when it owns its weights), which must be kept as long
    as the model or anything compiled from it runs.

    The model is read from the cache when this weights file (by SHA-256) was converted by this OpenVINO
    version before, else converted and, where the cache folder can be written, kept there and read
    back.  A cached file that cannot be read (cut short by a full disk, say) is converted and written
    again.  ``detector`` may be a function that loads the network, called only when no usable
    conversion is cached, so that a cached run never reads the torch checkpoint.  The network is
    converted in the default memory format (in place), in which OpenVINO uses its weights where they
    lie instead of copying them; with the model read back from the cache, neither the torch network
    nor the converted copy outlives the conversion (benchmarks/RESULTS.md, "OpenVINO's first run")."""
    import torch

    cached = None
    if weights_path is not None and cache_dir is not None:
        key = f"detector-{sha256_file(weights_path)[:16]}-openvino-{openvino.__version__.split('-')[0]}"
        cached = Path(cache_dir) / f"{key}.xml"
        if cached.is_file() and cached.with_suffix(".bin").is_file():
            try:
                return openvino.Core().read_model(cached), None
            except (RuntimeError, OSError):
                pass
    report = progress or no_progress
    report(0, 1, CONVERSION_MESSAGE)
    network = detector if isinstance(detector, torch.nn.Module) else detector()
    network = network.float().eval().to(memory_format=torch.contiguous_format)
    with warnings.catch_warnings():   # the tracer's note on the input-shape check, harmless here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = openvino.convert_model(network, example_input=torch.zeros(1, 1, 224, 224),
                                       input=[openvino.PartialShape([-1, 1, -1, -1])])
    report(1, 1, CONVERSION_MESSAGE)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(f"{cached.stem}.partial{os.getpid()}.xml")
            openvino.save_model(model, partial, compress_to_fp16=False)   # the weights exactly as loaded
            partial.with_suffix(".bin").replace(cached.with_suffix(".bin"))
            partial.replace(cached)
            written = openvino.Core().read_model(cached)   # mapped from the file, as a cached run reads it
        except (OSError, RuntimeError):
            pass   # a read-only home or a full disk: convert again next time
        else:
            del model, network
            _give_back_freed_memory()
            return written, None
    return model, network


def openvino_detector_predictor(detector: torch.nn.Module | Callable[[], torch.nn.Module], weights_path: Path | None,
                                precision: str = "fp32", threads: int | None = None, cache_dir: Path | None = None,
                                progress: ProgressCallback | None = None):
    """A ``detect.vfr.Predictor`` running ``detector`` (float32, as loaded; or a function loading it,
    called only when no conversion is cached) with OpenVINO on the CPU in ``precision`` ("fp32" or
    "bf16"), on ``threads`` threads (default: torch's).  The converted network is kept in
    ``cache_dir``, keyed by ``weights_path``, the checkpoint file it is loaded from (``load_model``
    sets ``weights_path`` on the network); without either it is converted every time.  ``progress(done,
    total, message)`` hears a conversion (:data:`CONVERSION_MESSAGE`), and nothing when it is read from the cache."""
    if precision not in _OPENVINO_PRECISION:
        raise InputError(f"unknown precision {precision!r} (use {' or '.join(_OPENVINO_PRECISION)})")
    import torch

    openvino = _openvino()
    model, weights_owner = _converted_detector(detector, weights_path, cache_dir, openvino, progress)
    compiled = openvino.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    output = compiled.outputs[0]
    del model
    runs_on = (request, output, weights_owner)   # the torch weights, where the model uses them, stay alive

    def predict(patches: np.ndarray, boxes: Sequence = ()) -> np.ndarray:
        x = np.ascontiguousarray(patches, dtype=np.float32)[:, None]
        infer, out, _ = runs_on
        return np.array(infer.infer([x])[out], dtype=np.float32, copy=True)

    return predict
