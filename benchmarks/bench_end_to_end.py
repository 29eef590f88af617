"""Wall seconds and peak memory of ``spinenet run`` as a whole process on real lumbar scans.

    python benchmarks/bench_end_to_end.py [--threads 2] [--repeats 3] [--weights bundled] [--runtime auto|torch|onnx]
                                          [--in-process | --served] [CASE ...]

Each run is a fresh process, as a user starts it: Python and torch start-up, reading the scan,
detection, labelling, disc grading and measurements, ``preview.png`` and the result files (the
defaults of ``spinenet run``).  Cases are folders under ``../shared/data`` holding an ``image.nii.gz``,
named with their source (``chu/chu_02``; default: one volume of each source that has volumes); a
case not found is reported and left out, and when none is found the script stops with status 2.
Prints the median and the slowest of ``--repeats`` runs, after one unmeasured run that warms the
file cache, writes Python's bytecode cache (:func:`child_environment`) and, where ONNX Runtime runs the
networks, exports them the first time (``models/onnx_runtime.py``).  ``--runtime`` is the command's,
``auto`` by default (``models/runtime_choice.py``: ONNX Runtime for the bundled weights where it is installed).
Issue 16's goal for the bundled networks: 3 s.

``--in-process`` times the same command called again and again inside this one process
(``apps.cli.main``), after one unmeasured call: what a second scan costs where Python and torch are
already loaded, as in a notebook.  Each call still reads the weights, the scan, and writes every
result file and the preview.

``--served`` times what the Slicer module's panel waits for: one worker process kept running
(``python -m SpineNetLib.apps.worker --serve``, started once, as the module starts it when it is shown;
the seconds until it is ready are printed), each run a request to it as the panel makes it, timed
from the request to its ``END`` line (reading the scan, the pipeline with grading, every result file;
no preview, which the panel does not draw in its temporary folders).  The panel hands the worker the
volume as ``.npy``; here it reads the ``.nii.gz``, a little slower.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from script_errors import InputError, at_least
from SpineNetLib.models.runtime_choice import automatic_runtime
from served_worker import ServedWorker

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ("chu/chu_02", "myosegmentum/myo_01", "zukic/zukic_15_S01_T2", "ivd/ivd_20")


def child_environment(threads: int) -> dict[str, str]:
    """This process's environment for a measured process, on ``threads`` OpenMP threads, and with
    Python's bytecode cache on: an installed package has its ``.pyc`` files, and a run that compiles
    SpineNetLib's 50-odd modules from source each time (``PYTHONDONTWRITEBYTECODE`` set, as on the
    development machine) pays about 0.1 s more than a user's.  The unmeasured first run writes them."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def one_run(image: Path, out: Path, args) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of one ``spinenet run`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "SpineNetLib", "run", str(image), "-o", str(out), "--quiet",
                           "--threads", str(args.threads), "--weights", args.weights, "--runtime", args.runtime],
                          cwd=ROOT, capture_output=True, text=True,
                          env=child_environment(args.threads))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{image}: spinenet run failed: {done.stderr.strip().splitlines()[-1:]}")
    # ru_maxrss of children is the largest of any child so far (kB on Linux)
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return wall, peak


def one_call_in_process(image: Path, out: Path, args) -> tuple[float, float]:
    """(wall seconds, peak resident MB of this process so far) of one ``spinenet run`` called in-process."""
    from SpineNetLib.apps import cli

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = cli.main(["run", str(image), "-o", str(out), "--quiet", "--threads", str(args.threads),
                           "--weights", args.weights, "--runtime", args.runtime])
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{image}: spinenet run failed with status {status}")
    return wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_served_request(served: ServedWorker, image: Path, out: Path, args) -> tuple[float, float]:
    """(wall seconds from the request to its END line, peak resident MB of the served worker so far)."""
    lines, wall = served.ask(["--input", str(image), "--output", str(out), "--weights", args.weights, "--no-preview"])
    if not lines or lines[-1] != "END 0":
        errors = [line for line in lines if line.startswith("ERROR")] or ["the served worker ended"]
        raise SystemExit(f"{image}: the run failed: {errors}")
    return wall, served.peak_mb()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(DEFAULT_CASES),
                        help="folders under the data root, with their source (e.g. chu/chu_02)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                        help="spinenet run --runtime, default auto as the command's (not for --served: the worker "
                             "runs torch)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--in-process", action="store_true",
                     help="call the command again and again in this process (module docstring)")
    how.add_argument("--served", action="store_true",
                     help="requests to one worker process kept running, as the Slicer module runs them")
    args = parser.parse_args()
    if args.served and args.runtime == "onnx":
        raise InputError("--served times the Slicer module's worker, which runs torch: leave out --runtime")
    runtime = "torch, the worker's" if args.served else args.runtime
    if runtime == "auto":
        runtime = f"auto ({automatic_runtime(args.weights)} here)"
    data = Path(args.data)
    if not data.is_dir():
        raise InputError(f"no data folder at {data}")
    images = {case: data / case / "image.nii.gz" for case in args.cases}
    if not any(image.is_file() for image in images.values()):
        raise InputError(f"no case found: none of {', '.join(str(i) for i in images.values())} exists "
                         f"(a case is a folder under {data} with its source, e.g. chu/chu_02)")
    served = None
    if args.served:
        served = ServedWorker(env=child_environment(args.threads))
        served.start()
        run = functools.partial(one_served_request, served)
        where = f"requests to the served worker (ready {served.ready_seconds:.2f} s after its start)"
    else:
        run = one_call_in_process if args.in_process else one_run
        where = "called in one process" if args.in_process else "a fresh process each"
    print(f"spinenet run, {where}, {args.weights} weights, runtime {runtime}, {args.threads} threads, "
          f"median and slowest of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for case, image in images.items():
            if not image.is_file():
                print(f"  {case:28} not found under {args.data}")
                continue
            run(image, Path(tmp) / "warm", args)
            runs = [run(image, Path(tmp) / f"r{k}", args) for k in range(args.repeats)]
            walls = [w for w, _ in runs]
            print(f"  {case:28} {statistics.median(walls):5.2f} s (slowest {max(walls):5.2f} s)   "
                  f"peak so far {max(p for _, p in runs):6.0f} MB")
    if served is not None:
        served.close()
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
