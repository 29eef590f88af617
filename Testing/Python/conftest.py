import os
import sys
from pathlib import Path

# Tests import helper modules (oracles.py) from this folder and the package from the root.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

# The per-user cache (weights/resolve.user_cache_dir) is a folder of this test session's own, unless the caller
# named one: `spinenet run` exports the bundled networks for ONNX Runtime there on its first run
# (models/runtime_choice.py), and a test run should neither read nor leave files in the user's cache.
if "SPINENET_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _session_cache = tempfile.mkdtemp(prefix="spinenet-test-cache-")
    os.environ["SPINENET_CACHE"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)

# Under pytest-xdist two test processes share the machine's cores: each computes on one thread (torch, OpenMP
# and the BLAS, and the commands a test starts), so that they do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")

#: The test files that take longest (seconds of one thread, summed over their tests, in a `-n 2` run of the
#: sixty-sixth session: 320, 140, 86, 75, 69). They are collected first, so that with `-n 2 --dist loadfile`
#: each process starts on a long file and no long file is left to run alone at the end.
LONGEST_FILES = ("test_cohort.py", "test_bundled_models.py", "test_runtimes.py", "test_slicer_worker.py",
                 "test_training.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: file order kept
