"""Download and install the official SpineNetV2 checkpoints (optional, licence-bound).

The official weights are licensed by the Visual Geometry Group (University of
Oxford) for **non-commercial research only** (official §1), so they are never
bundled: the user fetches them, after accepting the licence, into a per-user
cache (``weights.official_weights_dir()``), never into the install folder,
which an update would wipe.  Each file's size and SHA-256 are recorded in
``manifest.json``; loading an official checkpoint that needs full unpickling
(official §2: it may hold numpy scalars) is allowed only for the hashes in
that manifest, i.e. for files the user downloaded or installed on purpose.

Downloads resume: bytes go to ``<file>.part`` and an interrupted download
continues with an HTTP Range request.  All four files are fetched even when
some exist (the official ``download_weights`` stops at the first existing file).
A file already at a checkpoint path is kept only if the manifest recorded it
with the same SHA-256; any other file (planted, or changed since) is replaced
by a fresh download, never recorded as trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from SpineNetLib.core.files import sha256_file
from SpineNetLib.core.errors import SpineNetError, WeightsError
from SpineNetLib.weights.resolve import official_weights_dir

#: Official base URL (official §2); override with --base-url or $SPINENET_OFFICIAL_URL.
DEFAULT_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/research/spinenet/weights/"

#: network kind -> path under the base URL and in the cache (official §2).
OFFICIAL_FILES = {
    "grading": "grading/ckpt1.pt",
    "appearance": "appearance/ckpt187.pt",
    "detector": "detect-vfr/ckpt435.pt",
    "context": "context/ckpt16.pt",
}

LICENCE_NOTICE = """\
The official SpineNetV2 weights are provided by the Visual Geometry Group,
University of Oxford, under the SpineNet licence (LICENCE.md of the official
repository). In short, and not replacing the licence text itself:
  * use is permitted for NON-COMMERCIAL RESEARCH ONLY, free of charge;
  * the licence covers the code, the pretrained network parameters and
    the output of either;
  * you must not try to recover information about the training data;
  * commercial use needs a separate licence from the University of Oxford.
These files are not part of SpineNet for 3D Slicer and are not redistributed
by it. By passing --accept-license you confirm that you have read and accept
the official licence for your use."""

MANIFEST = "manifest.json"
CHUNK = 1 << 20


def read_manifest(folder: Path | None = None) -> dict:
    path = Path(folder or official_weights_dir()) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def trusted_hashes(folder: Path | None = None) -> set[str]:
    """SHA-256 of the official files the user downloaded or installed."""
    return {entry["sha256"] for entry in read_manifest(folder).get("files", {}).values() if "sha256" in entry}


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def _record(manifest: dict, rel: str, path: Path, source: str) -> None:
    manifest.setdefault("files", {})[rel] = {
        "size": path.stat().st_size, "sha256": sha256_file(path), "source": source,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fetch(url: str, target: Path, progress: Callable[[int, int, str], None] | None, timeout: float) -> None:
    """Download ``url`` to ``target`` via ``target.part``, resuming a partial file."""
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the partial file is already complete
            os.replace(part, target)
            return
        raise SpineNetError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SpineNetError(f"cannot reach {url}: {reason}") from None
    with response:
        if have and response.status != 206:  # server ignored the range: start again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else 0
        done = have
        with open(part, "ab" if have else "wb") as handle:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except OSError as error:
                    raise SpineNetError(f"download of {url} interrupted after {done} bytes ({error}); "
                                        "run the same command again to resume") from None
                if not chunk:
                    break
                handle.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, max(total, done), f"downloading {target.parent.name}/{target.name}")
    if total and done < total:
        raise SpineNetError(f"download of {url} stopped at {done} of {total} bytes; run the same command again to resume")
    os.replace(part, target)


def download_official(*, base_url: str | None = None, folder: Path | None = None, force: bool = False,
                      progress: Callable[[int, int, str], None] | None = None,
                      timeout: float = 60.0) -> dict:
    """Fetch the four official checkpoints into ``folder`` (default: the user cache)."""
    base_url = base_url or os.environ.get("SPINENET_OFFICIAL_URL") or DEFAULT_BASE_URL
    if not base_url.endswith("/"):
        base_url += "/"
    folder = Path(folder or official_weights_dir())
    manifest = read_manifest(folder)
    manifest["base_url"] = base_url
    for kind, rel in OFFICIAL_FILES.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            recorded = manifest.get("files", {}).get(rel) or {}
            if not force and recorded.get("sha256") == sha256_file(target):
                continue  # downloaded or installed before, and unchanged since
            # A file this cache never recorded, or one changed since, is never trusted as it is
            # (loading an official checkpoint may unpickle it): it is replaced by a fresh download.
            target.unlink()
        _fetch(base_url + rel, target, progress, timeout)
        _record(manifest, rel, target, base_url + rel)
        _write_manifest(folder, manifest)
    _write_manifest(folder, manifest)
    return manifest


def install_official(source: Path, *, folder: Path | None = None) -> dict:
    """Copy official checkpoints from ``source`` (official folder layout) into the cache."""
    source = Path(source).expanduser()
    if not source.is_dir():
        raise WeightsError(f"weights folder not found: {source}")
    folder = Path(folder or official_weights_dir())
    manifest = read_manifest(folder)
    found = 0
    for kind, rel in OFFICIAL_FILES.items():
        sub = source / Path(rel).parent
        candidates = sorted(sub.glob("*.pt")) if sub.is_dir() else []
        if not candidates:
            continue
        src = sub / Path(rel).name if (sub / Path(rel).name).is_file() else candidates[-1]
        target = folder / Path(rel).parent / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
        _record(manifest, str(Path(rel).parent / src.name), target, f"installed from {src}")
        found += 1
    if not found:
        raise WeightsError(f"no official checkpoints in {source} (expected detect-vfr/, appearance/, context/, grading/ with .pt files)")
    _write_manifest(folder, manifest)
    return manifest
