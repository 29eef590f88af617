"""SpineNet/Scripts/SpineNetBatch.py imported as a module, for tests that call its functions in this process
(the script is installed as a script, not as a module: test_slicer_cmake.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BATCH_SCRIPT = Path(__file__).resolve().parents[2] / "SpineNet" / "Scripts" / "SpineNetBatch.py"


def batch_script():
    """A fresh module of SpineNetBatch.py."""
    spec = importlib.util.spec_from_file_location("SpineNetBatch_under_test", BATCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
