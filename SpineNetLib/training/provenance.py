"""Which code, on which machine, made a training run's weights.

Why: the forty-fifth session could not make the bundled detector again from its recipe (MODEL_CARD.md
of the bundled weights, "Repeating the recipe"): the commit that shipped it, run again with the same
command, takes other steps, so the detector was trained by code that was never committed or on
another machine, and nothing recorded which. A run now records both, and its final weights carry the
code's fingerprint, so a shipped file can be traced to the code that trained it.

The fingerprint, :func:`code_sha256`, is the SHA-256 of every Python file of ``SpineNetLib`` (its
path and content, in path order): it names the code exactly whether or not it sits in a git
checkout, and whether or not that checkout has uncommitted changes. Where git is at hand, the commit
and the files changed since it are recorded too, to find that code again.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

#: The package whose source is fingerprinted (SpineNetLib/).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
#: The entries :func:`weights_provenance` adds to a run's final weights (kept by derived files too).
WEIGHTS_KEYS = ("trained_code_sha256", "trained_same_code_throughout", "trained_git_commit",
                "trained_git_changed_count")
#: At most this many changed files are listed (a checkout in the middle of a large change).
MAX_LISTED_CHANGES = 50


def code_sha256(root: Path = PACKAGE_ROOT) -> str:
    """SHA-256 over the relative path and bytes of every ``.py`` file under ``root``, in path order."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(args: list[str], cwd: Path) -> str | None:
    """Output of one git command in ``cwd``, or None where git or the checkout is not there."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: Path = PACKAGE_ROOT) -> dict:
    """The commit the code sits on and the files of the package changed since it (not committed,
    untracked included); empty where the package is not tracked by a git checkout (an installed copy)."""
    commit = _git(["rev-parse", "HEAD"], root)
    # an installed copy inside some other checkout (a virtual environment in a project) is not tracked there
    if commit is None or _git(["ls-files", "--error-unmatch", "__init__.py"], root) is None:
        return {}
    status = _git(["status", "--porcelain", "--untracked-files=all", "--", "."], root) or ""
    changed = sorted(line[3:] for line in status.splitlines() if line.strip() and line[3:].endswith(".py"))
    return {"git_commit": commit.strip(), "git_changed_files": changed[:MAX_LISTED_CHANGES],
            "git_changed_count": len(changed)}


def code_identity() -> dict:
    """The code as a file it made records it (``spinenet train tianchi-targets``: a pseudo-label file
    made by other code is other training data): its fingerprint, and its commit where git has one."""
    state = git_state()
    return {"code_sha256": code_sha256(),
            **{key: state[key] for key in ("git_commit", "git_changed_count") if key in state}}


def run_provenance() -> dict:
    """What a run's ``provenance.json`` records for one start or resume (plain JSON values)."""
    from SpineNetLib import __version__

    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spinenet_version": __version__,
        "code_sha256": code_sha256(),
        **git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": _processor_name(),
        "torch_threads": torch.get_num_threads(),
    }


def _processor_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weights_provenance(runs: list[dict]) -> dict:
    """The entries a run's final weights carry: the code of the run's last start, and whether every
    start and resume ran that same code (a resumed run may have run on other code before)."""
    last = runs[-1]
    entry = {"trained_code_sha256": last["code_sha256"],
             "trained_same_code_throughout": all(r["code_sha256"] == last["code_sha256"] for r in runs)}
    if "git_commit" in last:
        entry["trained_git_commit"] = last["git_commit"]
        entry["trained_git_changed_count"] = last["git_changed_count"]
    return entry
