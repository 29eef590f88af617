"""Studies per hour of `spinenet cohort` on a local Dask cluster of 1 and of 2 workers.

    python benchmarks/bench_cohort.py [N] [--threads-per-worker T] [--workers 1 2] [--size 256] [--no-grade]

N lumbar phantoms (default 8; NIfTI, SIZE x SIZE pixels of 300/SIZE mm, 9 slices of 4 mm) are run
through :func:`SpineNetLib.cohort.run.run_cohort` with the bundled networks, once per worker
count, each time into an empty output folder, without preview pictures.  Two rates are printed:

* ``wall``: N studies over the whole run, cluster start-up, discovery and the tables included
  (what a user waits for);
* ``steady``: N studies over ceil(N / workers) times the median study's seconds (as measured inside
  the workers), i.e. the rate without the start-up, which a cohort of thousands does not notice.

Workers run one study at a time with T torch threads each (the cohort's own set-up); the machine's
CPU count and the threads are printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_errors import at_least  # noqa: E402


def _phantoms(root: Path, n: int, size: int) -> None:
    from SpineNetLib.synthetic.phantom import make_phantom

    spacing = 300.0 / size
    for i in range(n):
        make_phantom(fov="lumbar", shape=(size, size), pixel_spacing=(spacing, spacing), n_slices=9,
                     seed=100 + i).write_nifti(root / f"patient{i:03d}.nii.gz")


def _measure(root: Path, workers: int, threads: int, grade: bool) -> dict:
    from SpineNetLib.cohort.run import CohortSettings, run_cohort

    settings = CohortSettings(preview=False, grade=grade, threads=threads)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = run_cohort(root, out, settings, workers=workers)
        wall = time.perf_counter() - start
    if result.failures:
        raise SystemExit(f"{len(result.failures)} studies failed: {result.failures[0].reason}")
    n = len(result.outcomes)
    per_study = sorted(o.seconds for o in result.outcomes)
    # the busiest worker's share when the studies are spread evenly: ceil(n / workers) median studies
    median = per_study[n // 2]
    steady = -(-n // workers) * median
    return {"workers": workers, "studies": n, "wall_s": wall, "study_median_s": median,
            "wall_per_hour": 3600.0 * n / wall, "steady_per_hour": 3600.0 * n / steady}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=at_least(1), nargs="?", default=8, help="number of phantom studies (default 8)")
    parser.add_argument("--threads-per-worker", type=at_least(1), default=1,
                        help="torch threads per worker (default 1)")
    parser.add_argument("--workers", type=at_least(1), nargs="+", default=[1, 2], help="worker counts to measure")
    parser.add_argument("--size", type=at_least(60), default=256,
                        help="phantom size in pixels (default 256; at least 60: pixels of 300/SIZE mm, at most 5 mm)")
    parser.add_argument("--no-grade", action="store_true", help="measure without disc grading")
    args = parser.parse_args()

    print(f"{args.n} lumbar phantoms {args.size}x{args.size}x9, bundled networks, grading "
          f"{'off' if args.no_grade else 'on'}, no preview; {os.cpu_count()} CPUs; each worker runs one study "
          f"at a time with torch.set_num_threads({args.threads_per_worker}); "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} here (Dask sets 1 in its workers)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        _phantoms(root, args.n, args.size)
        print(f"{'workers':>7} {'studies':>7} {'wall s':>8} {'median study s':>15} {'studies/h wall':>15} "
              f"{'studies/h steady':>17}")
        for workers in args.workers:
            m = _measure(root, workers, args.threads_per_worker, not args.no_grade)
            print(f"{m['workers']:>7} {m['studies']:>7} {m['wall_s']:>8.1f} {m['study_median_s']:>15.2f} "
                  f"{m['wall_per_hour']:>15.0f} {m['steady_per_hour']:>17.0f}")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
