"""Wall seconds of ``spinenet run`` when the machine's cores are busy with other work: figures, not a test.

    python benchmarks/bench_busy_machine.py [--case chu/chu_02] [--repeats 2] [--threads N] [--weights bundled]
        [--situations alone,second_run,other_work]

Three situations, each run as a user starts it (a fresh ``spinenet run`` process, the defaults of
``spinenet run``, the bundled networks):

* ``alone``: nothing else runs;
* ``second_run``: two runs of the same scan started together (two users, or a script that
  starts runs side by side); the slower of the two is printed;
* ``other_work``: one run while another program keeps every core busy (NumPy's matrix
  products, as a second analysis or a build would).

Each situation is run two ways, interleaved: as the command now runs (its idle OpenMP threads spin
3000 times before they sleep, ``SpineNetLib/core/process.py``) and as it ran before (libgomp's default:
300,000 times).  The second is obtained by importing torch before the
command's process settings are made, so that libgomp has read its (unset) wait policy by then.
Prints the median and the slowest of ``--repeats`` rounds.  ``--threads`` is handed to every run
(default: left out, PyTorch's choice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from script_errors import InputError, at_least

ROOT = Path(__file__).resolve().parents[1]

#: ``spinenet run`` as before: torch imported first, then the command (``python -m SpineNetLib``).
AS_BEFORE = "import torch, runpy; runpy.run_module('SpineNetLib', run_name='__main__')"

SITUATIONS = {"alone": "alone", "second_run": "beside a second run", "other_work": "beside other work"}

#: Another program that keeps every core busy until it is killed.
OTHER_WORK = "import numpy as np\na = np.random.rand(600, 600)\nwhile True: a @ a\n"


def run_command(image: Path, out: Path, args, as_before: bool) -> list[str]:
    start = ["-c", AS_BEFORE] if as_before else ["-m", "SpineNetLib"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    return [sys.executable, *start, "run", str(image), "-o", str(out), "--quiet", "--weights", args.weights, *threads]


def environment() -> dict[str, str]:
    """This environment without the variables that set OpenMP's waiting (both ways must choose their own)."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def timed_runs(commands: list[list[str]]) -> float:
    """Wall seconds until the last of ``commands``, started together, has ended."""
    start = time.perf_counter()
    running = [subprocess.Popen(c, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for c in commands]
    for process in running:
        _, errors = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"spinenet run failed: {errors.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def one_round(situation: str, image: Path, folder: Path, args, as_before: bool) -> float:
    command = lambda name: run_command(image, folder / name, args, as_before)  # noqa: E731
    if situation == "alone":
        return timed_runs([command("a")])
    if situation == "second_run":
        return timed_runs([command("a"), command("b")])
    other = subprocess.Popen([sys.executable, "-c", OTHER_WORK], env=environment())
    try:
        time.sleep(0.5)
        return timed_runs([command("a")])
    finally:
        other.kill()
        other.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="chu/chu_02", help="a folder under the data root holding image.nii.gz")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=at_least(1), default=2)
    parser.add_argument("--threads", type=at_least(1))
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--situations", default=",".join(SITUATIONS), help="of " + ", ".join(SITUATIONS))
    args = parser.parse_args()
    situations = [name.strip() for name in args.situations.split(",") if name.strip()]
    unknown = [name for name in situations if name not in SITUATIONS]
    if unknown or not situations:
        raise InputError(f"--situations: unknown {', '.join(unknown) or 'none given'} (of {', '.join(SITUATIONS)})")
    image = Path(args.data) / args.case / "image.nii.gz"
    if not image.is_file():
        raise InputError(f"no scan at {image}")
    print(f"spinenet run {args.case}, {args.weights} weights, threads {args.threads or 'default'}, "
          f"{os.cpu_count()} cores; median and slowest of {args.repeats} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        timed_runs([run_command(image, Path(tmp) / "warm", args, False)])   # the file cache
        for situation in situations:
            walls: dict[bool, list[float]] = {False: [], True: []}
            for k in range(args.repeats):
                for as_before in (True, False):
                    walls[as_before].append(one_round(situation, image, Path(tmp) / f"{k}", args, as_before))
            print(f"  {SITUATIONS[situation]:21} idle threads sleep soon (now) {statistics.median(walls[False]):6.2f} s "
                  f"(slowest {max(walls[False]):6.2f})   spin long (as before) {statistics.median(walls[True]):6.2f} s "
                  f"(slowest {max(walls[True]):6.2f})")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
