"""Reading and writing network weights, in the official checkpoint layout.

Official files (official §2): a ``torch.save``d dict with the state dict under
``'net'`` (detector, appearance, context; plus ``'epoch'``, ``'loss'``) or
``'model_weights'`` (grading; plus ``'epoch_no'``), no ``module.`` prefix,
loaded strictly.  Files we write keep that layout, so the official code can
read them too, and add ``'spinenet_arch'`` = ``{'kind', 'config',
'format_version'}`` recording the architecture (small configs need it).

Safety: files are first read with ``torch.load(weights_only=True)``, which
cannot run code.  A file that needs full unpickling (e.g. an official
checkpoint holding a numpy scalar ``loss``, official §2 "inferred risk") is
only read that way when the caller passes its SHA-256 in ``trusted_sha256``;
otherwise :class:`UntrustedWeightsError` tells the user which hash to approve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from SpineNetLib.core.errors import WeightsError
from SpineNetLib.core.files import default_file_mode
from SpineNetLib.models import AppearanceNet, ContextNet, DetectorConfig, GradingConfig, GradingNet, VFRDetector
from SpineNetLib.weights.resolve import resolve_weights_file  # noqa: F401  (also this module's API)

#: Network kinds this module knows.
KINDS: tuple[str, ...] = ("detector", "appearance", "context", "grading")
#: Key of the state dict in each kind's checkpoint (official §2 table).
STATE_DICT_KEY: dict[str, str] = {
    "detector": "net", "appearance": "net", "context": "net", "grading": "model_weights",
}
#: Version of the 'spinenet_arch' entry we write; newer files are refused.
FORMAT_VERSION = 1
ARCH_KEY = "spinenet_arch"

_MODEL_CLASS: dict[str, type[nn.Module]] = {
    "detector": VFRDetector, "appearance": AppearanceNet, "context": ContextNet, "grading": GradingNet,
}
_CONFIG_CLASS: dict[str, type | None] = {
    "detector": DetectorConfig, "appearance": None, "context": None, "grading": GradingConfig,
}
_FP16_MAX = float(torch.finfo(torch.float16).max)


class UntrustedWeightsError(WeightsError):
    """The file needs full (code-running) unpickling and its SHA-256 was not approved.

    ``sha256`` and ``path`` let the caller offer the user a way to approve it.
    """

    def __init__(self, message: str, *, path: Path, sha256: str) -> None:
        super().__init__(message)
        self.path = path
        self.sha256 = sha256


# --------------------------------------------------------------------------- helpers

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown network kind {kind!r}; expected one of {', '.join(KINDS)}")


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: no half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def config_from_dict(kind: str, data: Mapping[str, Any] | None):
    """Config dataclass of ``kind`` from a stored dict (None -> official default; None for
    kinds without a config)."""
    _check_kind(kind)
    cls = _CONFIG_CLASS[kind]
    if cls is None:
        if data:
            raise WeightsError(f"the {kind} network has no configurable architecture, file has {dict(data)!r}")
        return None
    if data is None:
        return cls()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise WeightsError(f"unknown {kind} architecture setting(s) in weights file: {', '.join(unknown)}")
    try:
        return cls(**dict(data))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"invalid {kind} architecture in weights file: {_one_line(exc)}") from None


def build_model(kind: str, config=None) -> nn.Module:
    """A freshly initialised network of ``kind`` (official architecture if config is None)."""
    _check_kind(kind)
    cls = _MODEL_CLASS[kind]
    if _CONFIG_CLASS[kind] is None:
        if config is not None:
            raise ValueError(f"the {kind} network takes no config")
        return cls()
    return cls(config)


def _config_to_plain(config) -> dict | None:
    """dataclass -> dict of plain lists/ints (readable with weights_only=True)."""
    if config is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _check_plain(value: Any, where: str) -> None:
    """Only values torch.load(weights_only=True) can read, so our files never need trust."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        if type(value).__module__ == "numpy":
            raise TypeError(f"{where}: numpy value {value!r}; convert it with .item()")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a weights-only checkpoint")


# --------------------------------------------------------------------------- saving

def save_checkpoint(path: str | os.PathLike, kind: str, model: nn.Module, *, config=None,
                    half: bool = False, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` in the official layout of ``kind`` plus a 'spinenet_arch' entry.

    ``config`` defaults to ``model.config``.  ``half=True`` stores floating tensors
    as fp16 (bundled weights must be small; loading converts back to float32).
    ``extra`` entries (e.g. ``{'epoch': 12, 'loss': 0.03}``) are added at the top
    level and must be plain Python values.  Written to a temporary file in the
    same folder, then renamed, so a crash never leaves a half-written file.
    """
    _check_kind(kind)
    cls = _MODEL_CLASS[kind]
    if not isinstance(model, cls) and isinstance(getattr(model, "module", None), cls):
        model = model.module  # DataParallel / DDP wrapper: save without 'module.'
    if not isinstance(model, cls):
        raise TypeError(f"a {kind} checkpoint needs a {cls.__name__}, got {type(model).__name__}")
    model_config = getattr(model, "config", None)
    if config is None:
        config = model_config
    elif config != model_config:
        raise ValueError(f"config {config!r} does not describe the model ({model_config!r})")

    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        if half and t.is_floating_point():
            finite = t[torch.isfinite(t)]
            if finite.numel() and float(finite.abs().max()) > _FP16_MAX:
                raise ValueError(f"{name} has values beyond the fp16 range; save with half=False")
            t = t.half()
        state[name] = t

    if kind == "grading":
        ckpt: dict[str, Any] = {"model_weights": state, "epoch_no": 0}
    else:
        ckpt = {"net": state, "epoch": 0, "loss": float("nan")}
    for key, value in (extra or {}).items():
        if key in (STATE_DICT_KEY[kind], ARCH_KEY):
            raise ValueError(f"extra may not replace the {key!r} entry")
        _check_plain(value, f"extra[{key!r}]")
        ckpt[key] = value
    ckpt[ARCH_KEY] = {"kind": kind, "config": _config_to_plain(config), "format_version": FORMAT_VERSION}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(ckpt, path)
    return path


# --------------------------------------------------------------------------- loading

def _disallowed_global(message: str) -> str | None:
    m = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    return m.group(1) if m else None


def read_checkpoint(path: str | os.PathLike, *, trusted_sha256: Iterable[str] | None = None) -> Any:
    """Unpickle a checkpoint file safely (see module docstring); raises WeightsError."""
    p = resolve_weights_file(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = _disallowed_global(str(exc))
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ... on bad files
        raise WeightsError(f"cannot read weights file {p} (corrupt or truncated?): "
                           f"{type(exc).__name__}: {_one_line(exc)}") from None

    # Needs full unpickling: hash exactly the bytes we would load.
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {p}: {_one_line(exc)}") from None
    digest = hashlib.sha256(data).hexdigest()
    trusted = {h.strip().lower() for h in (trusted_sha256 or ())}
    if digest not in trusted:
        detail = f" (e.g. {what})" if what else ""
        raise UntrustedWeightsError(
            f"weights file {p} contains pickled Python objects beyond tensors{detail}, which could run code "
            f"when loaded; if you trust its source, approve its SHA-256 {digest} and load again",
            path=p, sha256=digest)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {p} (corrupt or truncated?): "
                           f"{type(exc).__name__}: {_one_line(exc)}") from None


def _extract_state_dict(kind: str, ckpt: Any, p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(float32 state dict without 'module.' prefixes, the file's other top-level entries)."""
    if isinstance(ckpt, Mapping):
        for key in (STATE_DICT_KEY[kind], "net", "model_weights", "state_dict"):
            if key in ckpt and isinstance(ckpt[key], Mapping):
                sd = ckpt[key]
                meta = {k: v for k, v in ckpt.items() if k != key}
                break
        else:
            if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
                sd, meta = ckpt, {}  # a bare state dict
            else:
                keys = ", ".join(map(repr, list(ckpt)[:6]))
                raise WeightsError(f"weights file {p} has no {STATE_DICT_KEY[kind]!r} entry (keys: {keys})")
    else:
        raise WeightsError(f"weights file {p} holds a {type(ckpt).__name__}, not a checkpoint dict")
    out = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"weights file {p}: entry {name!r} is a {type(t).__name__}, not a tensor")
        name = str(name)
        if name.startswith("module."):
            name = name[len("module."):]
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()  # fp16 bundles -> float32
        out[name] = t
    return out, meta


def _arch_config(kind: str, ckpt: Any, p: Path):
    arch = ckpt.get(ARCH_KEY) if isinstance(ckpt, Mapping) else None
    if arch is None:
        return config_from_dict(kind, None)
    if not isinstance(arch, Mapping):
        raise WeightsError(f"weights file {p}: malformed {ARCH_KEY!r} entry")
    if arch.get("kind") != kind:
        raise WeightsError(f"weights file {p} holds a {arch.get('kind')!r} network, not a {kind!r} one")
    version = arch.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightsError(f"weights file {p} has format version {version!r}; this SpineNet reads up to "
                           f"{FORMAT_VERSION}, please update")
    return config_from_dict(kind, arch.get("config"))


def _mismatch_summary(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> str | None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return None
    if wrong:
        k = wrong[0]
        example = f"{k} is {list(sd[k].shape)} in the file, {list(expected[k].shape)} expected"
    elif missing:
        example = f"missing {missing[0]}"
    else:
        example = f"unexpected {unexpected[0]}"
    return (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} shape-mismatched keys "
            f"(e.g. {example})")


def _small_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar entries (epoch, loss, ...) and the arch record; drops e.g. optimiser state."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0:
            v = v.item()
        if k == ARCH_KEY or v is None or isinstance(v, (bool, int, float, str)):
            out[str(k)] = v
    return out


def with_fast_memory_format(model: nn.Module) -> nn.Module:
    """``model`` with its convolution weights channels-last, which oneDNN runs faster on a CPU, in
    place; the outputs stay the same (within 1e-7 of their size) and the state-dict names and shapes
    do not change.

    Measured with 2 threads (benchmarks/RESULTS.md, "Channels-last weights for the labelling
    networks" and "Grading with bf16"): the appearance network, 8 crops, 0.89 -> 0.48 s in float32
    (its 3D convolutions have few channels, where the default layout is slow); the context network
    1.4x; the official-size grader, 7 discs under bfloat16 autocast, 2.99 -> 2.23 s (float32
    unchanged); the detector markedly faster in its full-resolution decoder convolutions."""
    if isinstance(model, (VFRDetector, ContextNet)):
        model.to(memory_format=torch.channels_last)
    elif isinstance(model, (GradingNet, AppearanceNet)):
        model.to(memory_format=torch.channels_last_3d)
    return model


def load_model(kind: str, path: str | os.PathLike, *, device: str | torch.device = "cpu",
               trusted_sha256: set[str] | None = None) -> nn.Module:
    """Network ``kind`` with the weights at ``path`` (file or official-layout folder), in eval mode.

    The architecture comes from the file's 'spinenet_arch' entry, else the
    official one.  Loading is strict; any mismatch raises WeightsError.
    The model gets ``weights_path`` and ``checkpoint_meta`` (the file's other
    top-level entries, e.g. 'epoch') attributes for reporting.
    """
    _check_kind(kind)
    p = resolve_weights_file(path)
    ckpt = read_checkpoint(p, trusted_sha256=trusted_sha256)
    sd, meta = _extract_state_dict(kind, ckpt, p)
    config = _arch_config(kind, ckpt, p)
    # Build without allocating/initialising memory (139M parameters for the detector):
    # the file's tensors are assigned directly.
    with torch.device("meta"):
        model = build_model(kind, config)
    problem = _mismatch_summary(model, sd)
    if problem:
        raise WeightsError(f"weights file {p} does not fit the {kind} network: {problem}")
    broken = [name for name, t in sd.items() if torch.is_tensor(t) and t.is_floating_point()
              and not bool(torch.isfinite(t).all())]
    if broken:  # NaN weights give NaN maps and silently "0 vertebrae"
        raise WeightsError(f"weights file {p} has NaN or infinite values in {len(broken)} tensor(s) "
                           f"(first: {broken[0]}): the file is damaged")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights file {p} does not fit the {kind} network: {_one_line(exc)}") from None
    model.to(device)
    with_fast_memory_format(model)
    model.eval()
    model.weights_path = p
    model.checkpoint_meta = _small_meta(meta)
    return model


def load_for_run(weight_set, kind: str, device, precision: str, trusted_sha256: set[str] | None,
                 fold: bool = True) -> nn.Module:
    """Network ``kind`` of ``weight_set`` (``weights/resolve.WeightSet``) as a run uses it: float32 on
    ``device``, its BatchNorms folded where that pays (bfloat16, or the bundled networks:
    ``models/folding.py``) unless ``fold`` is off; ``pipeline.load_networks`` applies the precision."""
    from SpineNetLib.models.folding import fold_batch_norms
    from SpineNetLib.weights.resolve import CHECKPOINT_KIND

    network = load_model(CHECKPOINT_KIND.get(kind, kind), weight_set.path(kind), device=str(device),
                         trusted_sha256=trusted_sha256)
    if fold and (precision == "bf16" or weight_set.source == "bundled"):
        network = with_fast_memory_format(fold_batch_norms(network))   # the layout again after it
    return network
