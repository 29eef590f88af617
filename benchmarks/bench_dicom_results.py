"""Seconds and peak memory that ``--dicom-out`` adds to ``spinenet run`` on a large series: figures, not a test.

    python benchmarks/bench_dicom_results.py [--case chu/chu_02] [--pixels 0.5] [--threads 2] [--repeats 3]

The DICOM Segmentation (``outputs/dicom_results.py``) holds one binary frame per segment and source image, so
its cost grows with the series' grid. A 3D sagittal series such as T2 SPACE has about 760 x 760 pixels on 70
images (0.47 mm pixels, 0.9 mm slices). This writes such a series as DICOM from a real volume (``--case``, a
folder under ../shared/data holding a 1 mm ``image.nii.gz``; its pixels resampled to ``--pixels`` mm by
``acquisition_variants``' resampler, its 1 mm slices kept), then times ``spinenet run`` on it, each run a fresh
process (``--no-preview``), without and with ``--dicom-out``: the median and slowest wall seconds of
``--repeats`` runs after one unmeasured one, and the largest peak resident memory of a run. Where slicer-core is
installed, it then times the Slicer scene's segmentation of the same run (``slicer/mrml.add_segmentation``) in a
process of its own: the seconds, and how far it raises the process's peak above reading the series.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from script_errors import InputError, at_least

ROOT = Path(__file__).resolve().parents[1]

#: A ``spinenet run`` process (``cli.program``: the command's process settings) that prints its own peak resident
#: memory (kB, Linux) on its last stderr line.
_MEASURED_RUN = ("import resource, sys\n"
                 "from SpineNetLib.apps.cli import program\n"
                 "status = program()\n"
                 "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
                 "sys.exit(status)\n")


def write_series(case: Path, pixels_mm: float, folder: Path) -> tuple[int, int, int]:
    """The case's volume as a sagittal DICOM series with ``pixels_mm`` pixels and its 1 mm slices; its shape
    (images, rows, columns)."""
    import numpy as np

    from acquisition_variants import _pixels_scaled
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.inputs.writers import write_dicom_series

    scan = load_scan(case / "image.nii.gz", resample_isotropic=False)
    fine = _pixels_scaled(scan, pixels_mm / float(scan.spacing_mm[0]))
    # the series' (i, j, k) are the scan's (col, row, slice): voxels [k: slice, j: row, i: col]
    to_canonical = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    voxels = np.ascontiguousarray(np.clip(fine.voxels, 0, None).transpose(2, 0, 1))
    write_dicom_series(voxels, fine.canonical_to_ras @ to_canonical, folder)
    return voxels.shape


def one_run(series: Path, out: Path, threads: int, dicom: bool) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of one ``spinenet run`` process."""
    command = [sys.executable, "-c", _MEASURED_RUN, "run", str(series), "-o", str(out), "--quiet", "--no-preview",
               "--threads", str(threads)] + (["--dicom-out"] if dicom else [])
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("PEAK_KB "):
        raise SystemExit(f"spinenet run failed: {lines[-2:]}")
    return wall, int(lines[-1].split()[1]) / 1024


#: The Slicer segmentation of a run's vertebrae.json on its series, in a process of its own: one stdout line.
_MEASURED_SCENE = ("import json, resource, sys, time\n"
                   "import numpy as np\n"
                   "from SpineNetLib.inputs.load import load_scan\n"
                   "from SpineNetLib.slicer import mrml\n"
                   "scan = load_scan(sys.argv[1], resample_isotropic=False)\n"
                   "doc = json.loads(open(sys.argv[2]).read())\n"
                   "scene = mrml.new_scene()\n"
                   "volume = mrml.add_volume(scene, np.zeros(scan.input_shape_ijk[::-1], np.int16),\n"
                   "                         scan.input_ijk_to_ras, 'series')\n"
                   "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                   "start = time.perf_counter()\n"
                   "node = mrml.add_segmentation(scene, volume, doc)\n"
                   "print(node.GetSegmentation().GetNumberOfSegments(), time.perf_counter() - start,\n"
                   "      (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")


def scene_segmentation(series: Path, vertebrae_json: Path) -> str:
    """The line for the Slicer scene's segmentation of a run, or why there is none."""
    import importlib.util

    if importlib.util.find_spec("slicer") is None:
        return "  Slicer scene: slicer-core is not installed"
    done = subprocess.run([sys.executable, "-c", _MEASURED_SCENE, str(series), str(vertebrae_json)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the Slicer segmentation failed: {done.stderr.strip().splitlines()[-1:]}")
    segments, seconds, raised_mb = done.stdout.split()
    return (f"  Slicer scene: mrml.add_segmentation, {segments} segments, {float(seconds):.2f} s, peak raised "
            f"{float(raised_mb):.0f} MB above reading the series")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="chu/chu_02", help="a folder under the data root (default %(default)s)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                        help="data root (default ../shared/data)")
    parser.add_argument("--pixels", type=float, default=0.5, help="in-plane pixel size in mm (default %(default)s)")
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--write-series-to", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    case = Path(args.data) / args.case
    if not (case / "image.nii.gz").is_file():
        raise InputError(f"no image.nii.gz in {case}")
    if not 0.2 <= args.pixels <= 2.0:
        raise InputError(f"--pixels {args.pixels:g} mm is outside 0.2-2 mm")
    if args.write_series_to is not None:    # the child that writes the series (below)
        print(" ".join(str(n) for n in write_series(case, args.pixels, args.write_series_to)))
        return 0
    with tempfile.TemporaryDirectory(prefix="spinenet-bench-dicom-") as tmp:
        series = Path(tmp) / "series"
        # written by a process of its own: Linux counts the memory of this process at the fork into each
        # measured child's peak, so this one stays small
        written = subprocess.run([sys.executable, __file__, "--case", args.case, "--data", args.data, "--pixels",
                                  str(args.pixels), "--write-series-to", str(series)],
                                 capture_output=True, text=True, check=True)
        shape = [int(n) for n in written.stdout.split()]
        print(f"{args.case} as a sagittal DICOM series of {shape[0]} images of {shape[1]} x {shape[2]} pixels "
              f"({args.pixels:g} mm, 1 mm slices); spinenet run --no-preview, a fresh process each, "
              f"{args.threads} threads, median and slowest of {args.repeats}")
        for dicom in (False, True):
            one_run(series, Path(tmp) / "warm", args.threads, dicom)          # unmeasured: file cache, exports
            runs = [one_run(series, Path(tmp) / f"out{n}", args.threads, dicom) for n in range(args.repeats)]
            walls = [w for w, _ in runs]
            print(f"  {'with --dicom-out' if dicom else 'without':18} {statistics.median(walls):6.2f} s "
                  f"(slowest {max(walls):5.2f} s)   peak {max(p for _, p in runs):6.0f} MB")
        print(scene_segmentation(series, Path(tmp) / "out0" / "vertebrae.json"))
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
