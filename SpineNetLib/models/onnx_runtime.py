"""The networks on ONNX Runtime, so that a run never imports torch (issue 16, ``--runtime onnx``).

A fresh ``spinenet run`` spends 1.0-1.5 s of its wall time importing torch (benchmarks/RESULTS.md,
"A run without torch").  With ``--runtime onnx`` every network of the weight set (detector, S1-outline
detector, appearance, context, grader) runs on ONNX Runtime's CPU provider, from ONNX files exported
once per weights file and kept in the per-user cache (``onnx/`` in ``weights/resolve.user_cache_dir``).
The first run with a weights file imports torch to load and export its networks (as they run in torch:
BatchNorm folded where the torch runtime folds it, float32); every later run reads the files and never
imports torch, nor does anything else in the run path then (its resampling runs in numpy,
``core/resample.py``).  Hotspot maps need gradients: this runtime refuses them (``pipeline.run``).  The
official profile's arithmetic (``--profile official``) imports torch for its one bilinear resize.

Each exported network has a JSON file beside it with what the run reads from the torch module
(``checkpoint_meta``: the labelling numbers and the grader's trained heads; the grader's ``config``;
the weights file), so that nothing depends on loading the checkpoint again.  Files are keyed by the
weights file's SHA-256 and :data:`EXPORT_FORMAT`; a cached pair that cannot be read is exported again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.files import sha256_file
from SpineNetLib.core.progress import ProgressCallback, no_progress
from SpineNetLib.models.grading_heads import GRADING_INPUT_SHAPE, GradingConfig

#: Increased whenever the export changes, so that older cached files are not read.
EXPORT_FORMAT = 1
#: The networks of a weight set, by the name :class:`~SpineNetLib.weights.resolve.WeightSet` gives them.
KINDS = ("detector", "s1_outline", "appearance", "context", "grading")
#: ONNX operator set of the export (GridSample-free networks; 17 is read by every ONNX Runtime since 1.13).
OPSET = 17


def onnxruntime_module():
    """The ``onnxruntime`` package, or a one-line InputError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise InputError("--runtime onnx needs the ONNX Runtime package, which is not installed "
                         "(pip install onnxruntime onnx)") from None
    return onnxruntime


class OnnxNetwork:
    """One exported network on an ONNX Runtime session: called on a float32 array, it returns one array or,
    for the grader, the tuple of its heads' logits.  ``checkpoint_meta``, ``config`` and ``weights_path``
    are those of the torch module it was exported from (``weights.checkpoints.load_model``).  ``threads``
    0 leaves the number of threads to ONNX Runtime (one per physical core)."""

    training = False

    def __init__(self, model_file: Path, meta: dict, threads: int) -> None:
        onnxruntime = onnxruntime_module()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        # idle threads sleep at once: zukic_15 beside two busy loops took 5.6-6.0 s instead of 7.5-7.7 s
        # with ONNX Runtime's spinning, and alone 3.3-3.6 s instead of 3.7 s (benchmarks/RESULTS.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3   # errors only: its notes on unused initialisers are not the user's
        self.session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.kind = str(meta["kind"])
        self.checkpoint_meta = dict(meta.get("checkpoint_meta") or {})
        self.config = GradingConfig(**meta["config"]) if meta.get("config") is not None else None
        self.weights_path = Path(meta["weights_path"]) if meta.get("weights_path") else None

    def __call__(self, inputs: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(inputs, dtype=np.float32)})
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def onnx_predictor(net: OnnxNetwork):
    """A ``detect.vfr.Predictor`` running the exported detector ``net`` (boxes are ignored)."""

    def predict(patches: np.ndarray, boxes: Sequence = ()) -> np.ndarray:
        return net(np.asarray(patches, np.float32)[:, None])

    return predict


def _check_exporter() -> None:
    """A one-line InputError unless the export can run: torch's exporter writes through the onnx package."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise InputError("the first --runtime onnx run of a weights file exports its networks, which needs the "
                         "onnx package (pip install onnx)") from None


def _example_input(kind: str, network):
    """(an input the export traces, its axes that vary) for network ``kind``."""
    import torch

    if kind in ("detector", "s1_outline"):
        return torch.zeros(1, 1, 224, 224), {0: "batch", 2: "rows", 3: "columns"}
    if kind == "appearance":
        return torch.zeros(1, 1, 224, 224, 16), {0: "batch"}
    if kind == "context":
        return torch.zeros(1, 1, 64, 24), {0: "batch", 2: "rows"}
    return torch.zeros(1, 1, *GRADING_INPUT_SHAPE), {0: "batch"}   # a one-slice grader takes the 9 too


def _json_safe(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def export_network(kind: str, network, model_file: Path, weights_file: Path, weights_sha256: str) -> dict:
    """Write ``network`` (a torch module as the run uses it, loaded from ``weights_file`` of that SHA-256)
    to ``model_file`` as ONNX, and its description to the JSON file beside it; returns the description."""
    import dataclasses
    import warnings

    import torch

    example, axes = _example_input(kind, network)
    network = network.float().eval().to(memory_format=torch.contiguous_format)
    n_outputs = len(network(example)) if kind == "grading" else 1
    outputs = [f"output{i}" for i in range(n_outputs)]
    partial = model_file.with_name(f"{model_file.stem}.partial{os.getpid()}.onnx")
    try:
        with warnings.catch_warnings():   # the tracer's notes on the input-shape checks, harmless here
            warnings.simplefilter("ignore")
            torch.onnx.export(network, (example,), str(partial), input_names=["input"], output_names=outputs,
                              dynamic_axes={"input": axes, **{name: {0: "batch"} for name in outputs}},
                              opset_version=OPSET, dynamo=False)
    except BaseException:
        partial.unlink(missing_ok=True)   # no half-written file left in the cache
        raise
    config = getattr(network, "config", None) if kind == "grading" else None
    meta = {"kind": kind, "format": EXPORT_FORMAT, "weights_path": str(weights_file),
            "weights_sha256": weights_sha256,
            "checkpoint_meta": {k: _json_safe(v) for k, v in (getattr(network, "checkpoint_meta", None) or {}).items()},
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None}
    partial.replace(model_file)
    partial_meta = partial.with_suffix(".json")
    partial_meta.write_text(json.dumps(meta, indent=1))
    partial_meta.replace(model_file.with_suffix(".json"))
    return meta


def _cached_files(cache_dir: Path, kind: str, weights_sha256: str) -> tuple[Path, Path]:
    key = f"{kind}-{weights_sha256[:16]}-format{EXPORT_FORMAT}"
    return cache_dir / f"{key}.onnx", cache_dir / f"{key}.json"


def _read_cached(model_file: Path, meta_file: Path, threads: int) -> OnnxNetwork | None:
    if not (model_file.is_file() and meta_file.is_file()):
        return None
    try:
        return OnnxNetwork(model_file, json.loads(meta_file.read_text()), threads)
    except Exception:   # noqa: BLE001  (a file cut short by a full disk, say: exported again)
        return None


#: What the progress callback of :func:`onnx_networks` hears while networks are exported: the first run of a
#: weights file takes a few seconds longer (about 4 s for the bundled ones, benchmarks/RESULTS.md), and says why.
EXPORT_MESSAGE = "exporting the networks for ONNX Runtime (once per weights file)"


def onnx_networks(weight_files: dict[str, Path], load_torch: Callable[[str], object], cache_dir: Path,
                  threads: int, progress: ProgressCallback | None = None) -> dict[str, OnnxNetwork]:
    """The exported networks of a weight set (``{kind: checkpoint file}``, the kinds it has), read from
    ``cache_dir`` where they were exported before, else loaded with ``load_torch(kind)`` (which imports
    torch), exported there and read back, so that the first run computes as every later one.
    ``progress(done, total, message)`` hears each export (:data:`EXPORT_MESSAGE`), and nothing when every
    network is read from the cache."""
    onnxruntime_module()
    report = progress or no_progress
    networks: dict[str, OnnxNetwork] = {}
    exported = False
    for done, (kind, weights_file) in enumerate(weight_files.items()):
        digest = sha256_file(weights_file)   # once: the key, and the export's record of its source
        model_file, meta_file = _cached_files(Path(cache_dir), kind, digest)
        net = _read_cached(model_file, meta_file, threads)
        if net is None:
            _check_exporter()
            try:
                model_file.parent.mkdir(parents=True, exist_ok=True)
                report(done, len(weight_files), EXPORT_MESSAGE)   # not before: an unwritable cache exports nothing
                exported = True
                export_network(kind, load_torch(kind), model_file, Path(weights_file), digest)
            except OSError as exc:
                raise InputError(f"--runtime onnx keeps its exported networks in {model_file.parent}, "
                                 f"where the {kind} network cannot be written ({exc.strerror or exc})") from None
            net = _read_cached(model_file, meta_file, threads)
            if net is None:
                raise InputError(f"the {kind} network exported to {model_file} cannot be read back by ONNX Runtime")
        networks[kind] = net
    if exported:
        report(len(weight_files), len(weight_files), EXPORT_MESSAGE)
    return networks
