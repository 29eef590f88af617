"""Detection seconds of the official package and of ours, same official-size weights, same scan.

Issue 16, item 4.  Detection is the stage that dominates (benchmarks/RESULTS.md); both sides run
the same seeded random official-size detector (compare.py's weights) on the lumbar phantom of
bench_pipeline.py (512 x 512 x 15, 0.6 mm), with 2 torch threads:

    python benchmarks/official/bench_speed.py --official-python /tmp/official_env/bin/python

The official time is measured inside its runner around ``detect_and_group`` (no start-up, no
model loading); ours around ``detect_vertebrae``, for our patch plan and the opt-in whole-slice
plan, in fp32 and bf16, with the detector on torch and, when OpenVINO is installed, on OpenVINO
(``--runtime openvino``; its conversion happens when the networks are loaded, outside the timing, as the
official model loading does, into a temporary cache).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from compare import calibration_patches, official_python, run_official, write_random_official_weights  # noqa: E402
from script_errors import at_least  # noqa: E402  (benchmarks/: compare.py puts it on the path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-python", required=True, help="python of the official package's environment")
    parser.add_argument("--threads", type=at_least(1), default=2, help="torch threads on both sides")
    args = parser.parse_args(argv)
    python = official_python(args.official_python)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from SpineNetLib.detect import vfr
    from SpineNetLib.pipeline import load_networks
    from SpineNetLib.synthetic.phantom import make_phantom

    scan = make_phantom(fov="lumbar", shape=(512, 512), pixel_spacing=(0.6, 0.6), n_slices=15, seed=1).scan
    rows = []
    with tempfile.TemporaryDirectory(prefix="spinenet-speed-") as tmp:
        weights = write_random_official_weights(Path(tmp) / "weights", 0, calibration_patches(scan))
        official = run_official(python, scan.voxels, scan.spacing_mm[:2], weights,
                                Path(tmp) / "official", detection_only=True)
        rows.append(("official package 2.1.4", float(official["detection_seconds"])))
        os.environ["SPINENET_CACHE"] = str(Path(tmp) / "cache")
        try:
            import openvino  # noqa: F401
            runtimes = ("torch", "openvino")
        except ImportError:
            runtimes = ("torch",)
        for runtime in runtimes:
            for precision in ("fp32", "bf16"):
                networks = load_networks(str(weights), "cpu", precision=precision, runtime=runtime)
                predict = networks.predictor or vfr.network_predictor(networks.detector)
                for plan in ("patches", "whole_slice"):
                    start = time.perf_counter()
                    vfr.detect_vertebrae(scan, predict, vfr.DetectionParams(plan=plan))
                    rows.append((f"ours, {plan}, {precision}, {runtime}", time.perf_counter() - start))
    base = rows[0][1]
    print(f"lumbar phantom 512x512x15 at 0.6 mm, official-size detector, {args.threads} threads")
    for name, seconds in rows:
        print(f"  {name:<37} {seconds:7.1f} s   {base / seconds:5.2f}x the official speed")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # on the path: compare.py puts benchmarks/ there

    run_main(main)
