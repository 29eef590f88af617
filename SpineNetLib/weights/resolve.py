"""Where network weights come from: bundled, the official download, or a folder.

Three sources, chosen with ``--weights``:

* ``bundled`` (default): small fp16 checkpoints shipped in ``SpineNetLib/weights/``
  (``detector.pt``, ``appearance.pt``, ``context.pt``, optionally ``grading.pt`` and
  ``s1_outline.pt``, a second detector that draws S1's outline, ``detect/s1_outline.py``).
* ``official``: the VGG SpineNetV2 checkpoints, which the user downloads
  under their non-commercial licence into a per-user cache
  (``$SPINENET_CACHE`` or ``$XDG_CACHE_HOME/spinenet`` or ``~/.cache/spinenet``),
  in the official folder layout (``detect-vfr/``, ``appearance/``, ``context/``,
  ``grading/``; official §2).  They are never bundled (licence, official §1).
* a folder: either layout above.
"""

from __future__ import annotations

import filecmp
import io
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from SpineNetLib.core.errors import WeightsError

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

#: network kind -> (file name in our layout, folder name in the official layout; None: not official)
LAYOUT = {
    "detector": ("detector.pt", "detect-vfr"),
    "appearance": ("appearance.pt", "appearance"),
    "context": ("context.pt", "context"),
    "grading": ("grading.pt", "grading"),
    "s1_outline": ("s1_outline.pt", None),
}
REQUIRED = ("detector", "appearance", "context")
#: The checkpoint kind (``checkpoints.KINDS``) of a network whose kind above is not one.
CHECKPOINT_KIND = {"s1_outline": "detector"}


def user_cache_dir() -> Path:
    """Per-user cache folder for downloaded weights (not the install folder)."""
    if os.environ.get("SPINENET_CACHE"):
        return Path(os.environ["SPINENET_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spinenet"


def official_weights_dir() -> Path:
    return user_cache_dir() / "official"


@dataclass(frozen=True)
class WeightSet:
    """Checkpoint paths per network (a file, or an official-layout folder)."""

    source: str
    detector: Path
    appearance: Path
    context: Path
    grading: Path | None = None
    #: A detector (checkpoint kind "detector") used for S1 only: its outline, and an S1 below an L5
    #: (``detect/s1_outline.py``).
    s1_outline: Path | None = None
    #: The networks were made and validated for lumbar scans only (the bundled ones: real training and
    #: validation scans of T10-S1, also when copied into a folder, :func:`_bundled_labelling_networks`);
    #: a labelled chain beyond a lumbar field of view asks for a review
    #: (``label/confidence.beyond_lumbar_field``).
    lumbar_only: bool = False

    def path(self, kind: str) -> Path | None:
        return getattr(self, kind)


def _find(folder: Path, kind: str) -> Path | None:
    file_name, official_folder = LAYOUT[kind]
    if (folder / file_name).is_file():
        return folder / file_name
    sub = folder / official_folder if official_folder else None
    if sub is not None and sub.is_dir() and any(p.suffix == ".pt" for p in sub.iterdir()):
        return sub
    return None


#: The networks that find and name the levels: where all three are the bundled files, the weights are
#: the bundled weights for the levels' purposes, whatever the folder and the grader beside them.
LABELLING_KINDS = ("detector", "appearance", "context")


def _bundled_labelling_networks(found: dict[str, Path | None]) -> bool:
    """Whether the detector, appearance and context files found are byte for byte the bundled ones."""
    bundled = {kind: _find(BUNDLED_DIR, kind) for kind in LABELLING_KINDS}
    return all(found[k] is not None and bundled[k] is not None and found[k].is_file()
               and filecmp.cmp(found[k], bundled[k], shallow=False) for k in LABELLING_KINDS)


def resolve_weights(spec: str | os.PathLike | None = None) -> WeightSet:
    """Find the checkpoints for ``spec`` ("bundled", "official" or a folder)."""
    spec_text = "bundled" if spec in (None, "", "bundled") else str(spec)
    if spec_text == "bundled":
        folder, how_to_fix = BUNDLED_DIR, (
            "this installation has no bundled weights; pass --weights DIR, "
            "or fetch the official ones with `spinenet weights download --official --accept-license`")
    elif spec_text == "official":
        folder, how_to_fix = official_weights_dir(), (
            "run `spinenet weights download --official --accept-license` "
            "or `spinenet weights install DIR` first")
    else:
        folder = Path(spec_text).expanduser()
        if not folder.is_dir():
            raise WeightsError(f"weights folder not found: {folder}")
        how_to_fix = "expected detector.pt/appearance.pt/context.pt or the official detect-vfr/, appearance/, context/ folders"
    found = {kind: _find(folder, kind) for kind in LAYOUT}
    missing = [k for k in REQUIRED if found[k] is None]
    if missing:
        raise WeightsError(f"no {', '.join(missing)} weights in {folder} ({spec_text}): {how_to_fix}")
    return WeightSet(source=spec_text, detector=found["detector"], appearance=found["appearance"],
                     context=found["context"], grading=found["grading"], s1_outline=found["s1_outline"],
                     lumbar_only=spec_text == "bundled" or _bundled_labelling_networks(found))


def resolve_weights_file(path: str | os.PathLike) -> Path:
    """The checkpoint file itself, or the one to use from an official-layout folder.

    In a folder: ``*.pt`` files whose names do not contain 'encrypted'; the one
    with the highest number in its name (``ckpt435.pt``), ties broken by name;
    else the only one.  Deterministic, unlike the official newest-by-ctime rule.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise WeightsError(f"weights not found: {p}")
    if not p.is_dir():
        raise WeightsError(f"weights path is neither a file nor a folder: {p}")
    files = sorted(f for f in p.glob("*.pt") if f.is_file() and "encrypted" not in f.name.lower())
    if not files:
        raise WeightsError(f"no .pt weights file in folder {p}")
    numbered = []
    for f in files:
        digits = re.findall(r"\d+", f.stem)
        if digits:
            numbered.append((int(digits[-1]), f.name, f))
    if numbered:
        best = max(n for n, _, _ in numbered)
        return min((name, f) for n, name, f in numbered if n == best)[1]
    if len(files) == 1:
        return files[0]
    raise WeightsError(
        f"folder {p} has {len(files)} .pt files and none has an epoch number in its name; give the file itself")


class _Opaque:
    """Stands for any object a checkpoint's pickle builds (tensors, storages, classes): it is never
    the real thing, so reading a checkpoint's small entries this way runs no code from the file."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass


class _Entries(dict):
    """A checkpoint's dictionaries, plain or ordered; an ordered one's attributes (a state dict's
    ``_metadata``) are dropped."""

    def __setstate__(self, state) -> None:
        pass


class _EntriesOnlyUnpickler(pickle.Unpickler):
    """Unpickles a torch checkpoint's ``data.pkl`` with every global and stored tensor made opaque,
    except the dictionaries that hold its entries."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "dict")):
            return _Entries
        return _Opaque

    def persistent_load(self, pid):
        return None


def recorded_entries(path: str | os.PathLike) -> dict[str, bool | int | float | str] | None:
    """A checkpoint's plain top-level entries (numbers, strings, booleans: ``epoch``, ``seed``, heat-map
    gains, ``trained_code_sha256``, ...), read without torch and without running any code from the file.

    None when the file is not a torch archive that can be read this way.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            entries = _EntriesOnlyUnpickler(io.BytesIO(archive.read(name))).load()
    except Exception:   # not a zip, a damaged one, or a pickle this reader cannot follow
        return None
    if not isinstance(entries, dict):
        return None
    return {str(k): v for k, v in entries.items() if isinstance(v, (bool, int, float, str))}


def recorded_trained_heads(path: str | os.PathLike) -> frozenset[str] | None:
    """The grading network's heads a checkpoint records as trained (``trained_heads``, written by
    ``spinenet train grader``, e.g. ``{"fc_hrn"}``), read without torch, so that the Slicer panel can
    offer only those heads' hotspot maps before torch is even installed.

    None when the file records none (the official checkpoints: all their heads were trained) or is
    not a torch archive that can be read this way (it is then read, and judged, when it is loaded).
    """
    recorded = (recorded_entries(path) or {}).get("trained_heads")
    if not isinstance(recorded, str):
        return None
    return frozenset(h.strip() for h in recorded.split(",") if h.strip())


def trained_grading_heads(spec: str | os.PathLike | None = None) -> frozenset[str] | None:
    """The grading network's heads that the weights ``spec`` trained (:func:`recorded_trained_heads`
    of its grader): an empty set when the weights have no grader; None when every head was trained,
    or when the weights cannot be found (the run then says why)."""
    try:
        weights = resolve_weights(spec)
    except WeightsError:
        return None
    if weights.grading is None:
        return frozenset()
    try:
        return recorded_trained_heads(resolve_weights_file(weights.grading))
    except WeightsError:
        return None
