"""Per-stage seconds and peak memory of detection + labelling with the OFFICIAL-size networks.

    python benchmarks/bench_pipeline.py [--threads 2] [--bf16] [--compile] [--scan lumbar|whole|both]
                                        [--bundled] [--plan whole_slice|patches|both]
                                        [--stride-fraction F] [--unfolded] [--runtime torch|openvino|onnx]
                                        [--default-malloc]

Each scan and detection plan (``DetectionParams.plan``: the overlapping 224-pixel patches, the
default, or whole slices at the network's scale) runs in its own subprocess so that its peak RSS is
its own; ``--stride-fraction`` sets ``DetectionParams.stride_fraction`` (the patches' stride as a
fraction of their edge; default: DetectionParams' own).  The
networks have the official architectures (139 M-parameter detector) with
random weights: speed does not depend on the weight values, but random
weights produce no vertebrae, so the detector's real forward passes are timed
while the maps handed to post-processing are the phantom's ground-truth maps
(the same work as with a trained network).  Scans: a lumbar phantom of
512x512x15 at 0.6 mm and a whole-spine phantom of 1024x512x15 at 0.9 mm,
written as DICOM and read back (the "load_scan" stage).

``--runtime openvino`` runs the detector on OpenVINO (``models/runtimes.py``; in bfloat16 with
``--bf16``), converted in the child process before the timed run (its seconds are printed as
"openvino_conversion"; ``spinenet`` keeps the converted detector in a cache, so a study pays this once per
weights file).

``--runtime onnx`` runs the three networks on ONNX Runtime (``models/onnx_runtime.py``, float32; not with
``--bf16``), exported in the child process before the timed run (its seconds are printed as
"onnx_export"; ``spinenet`` keeps the exports in a cache).  The child imports torch, to build and
export the networks, so the resampling stays torch's (``core/resample.py``).

``--bundled`` times the bundled networks as ``spinenet run`` loads them (fp32, torch, eager): it refuses
``--bf16``, ``--compile`` and ``--runtime openvino``, which only the official-size runs apply.  A child
that fails stops the benchmark with its last lines of stderr.

Each child sets glibc's malloc as the ``spinenet`` command does (``core/process.keep_freed_memory_for_reuse``:
freed memory kept for the next layer's output); ``--default-malloc`` leaves glibc's defaults.

``--compile`` runs the three networks through ``torch.compile`` (a measurement only: ``spinenet run``
has no such switch, benchmarks/RESULTS.md says why): detection and labelling run once untimed first,
which compiles (its seconds are printed as "compile_warmup"), then once timed, as every later study
of a cohort run in the same process would.  With ``--bf16 --compile`` the labelling networks run
under bfloat16 autocast too (without ``--compile`` only the detector does).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SpineNetLib.core.process import keep_freed_memory_for_reuse  # noqa: E402  (no torch: cheap)
from script_errors import InputError, at_least  # noqa: E402

SCANS = {
    "lumbar": dict(fov="lumbar", shape=(512, 512), pixel_spacing=(0.6, 0.6), n_slices=15),
    "whole": dict(fov="whole", shape=(1024, 512), pixel_spacing=(0.9, 0.9), n_slices=15),
}


def _inputs(scan, params) -> str:
    """What the plan sends to the network, e.g. ``60 patches`` or ``15 slices of 265x265 (input 288x288), 4 per call``."""
    from SpineNetLib.detect import vfr as detection

    boxes, per_call = detection.slice_plan(scan.shape[:2], scan.spacing_mm[:2], params)
    if len(boxes) > 1 or params.plan == "patches":
        return f"{len(boxes) * scan.n_slices} patches"
    rows, cols = detection.input_shape(boxes)
    return (f"{scan.n_slices} slices of {boxes[0].net_px[0]}x{boxes[0].net_px[1]} (input {rows}x{cols}), "
            f"{per_call} per call")


def _params(plan: str, stride_fraction: float | None):
    from SpineNetLib.detect.vfr import DetectionParams

    return DetectionParams(plan=plan) if stride_fraction is None else \
        DetectionParams(plan=plan, stride_fraction=stride_fraction)


def _phantom_scan(name: str, timings: dict[str, float]):
    """The benchmark phantom `name` (seed 1) and its scan, written as DICOM and read back as a user's
    series would be; the reading time goes into timings["load_scan"]."""
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.synthetic.phantom import make_phantom

    phantom = make_phantom(**SCANS[name], seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        phantom.write_dicom(Path(tmp) / "dicom")
        t = time.perf_counter()
        scan = load_scan(Path(tmp) / "dicom")
        timings["load_scan"] = time.perf_counter() - t
    return phantom, scan


def run_bundled(name: str, threads: int, plan: str, stride_fraction: float | None = None) -> dict:
    """The default path of `spinenet run`: bundled small networks, their own outputs, grading off."""
    import torch

    torch.set_num_threads(threads)
    from SpineNetLib.pipeline import detect_and_label, grade_discs, load_networks

    timings: dict[str, float] = {}
    _, scan = _phantom_scan(name, timings)
    networks = load_networks("bundled", "cpu")
    timings["load_networks"] = networks.load_seconds
    params = _params(plan, stride_fraction)
    result = detect_and_label(scan, networks, detection_params=params)
    for key in ("detection_network", "detection_postprocessing", "labelling"):
        timings[key] = result.timings_s[key]
    t = time.perf_counter()
    grade_discs(scan, result.vertebrae, networks, grade=False)
    timings["disc_measurements"] = time.perf_counter() - t
    timings["detection_and_labelling"] = result.timings_s["detection"] + result.timings_s["labelling"]
    return {
        "scan": name + " (bundled networks)", "shape": list(scan.shape),
        "spacing_mm": [round(s, 2) for s in scan.spacing_mm], "plan": plan, "inputs": _inputs(scan, params),
        "vertebrae": len(result.vertebrae), "threads": threads, "bf16": False,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_one(name: str, threads: int, bf16: bool, plan: str, compile_networks: bool = False,
            fold: bool = True, stride_fraction: float | None = None, runtime: str = "torch") -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from SpineNetLib.detect import vfr as detection
    from SpineNetLib.label import labelling
    from SpineNetLib.models import AppearanceNet, ContextNet, VFRDetector
    from SpineNetLib.models.folding import fold_batch_norms
    from SpineNetLib.weights.checkpoints import with_fast_memory_format
    from SpineNetLib.training.targets import oracle_predictor

    timings: dict[str, float] = {}
    phantom, scan = _phantom_scan(name, timings)

    torch.manual_seed(0)        # the detector's seeded weights first, then the labelling networks'
    if runtime == "openvino":   # as a user's first run: converted first, from a weights file, into an empty cache
        from SpineNetLib.models.runtimes import openvino_detector_predictor
        from SpineNetLib.weights.checkpoints import load_model, save_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            weights_file = Path(tmp) / "detector.pt"
            save_checkpoint(weights_file, "detector", VFRDetector().eval())
            t = time.perf_counter()
            network = openvino_detector_predictor(lambda: load_model("detector", weights_file), weights_file,
                                                  "bf16" if bf16 else "fp32", threads, cache_dir=Path(tmp) / "cache")
            timings["openvino_conversion"] = time.perf_counter() - t
        t = time.perf_counter()
    elif runtime == "onnx":     # exported first, as a user's first run exports them into the cache
        from SpineNetLib.models import onnx_runtime

        t = time.perf_counter()
        exported = {}
        with tempfile.TemporaryDirectory() as tmp:
            for kind, module in (("detector", VFRDetector()), ("appearance", AppearanceNet()), ("context", ContextNet())):
                model_file = Path(tmp) / f"{kind}.onnx"
                meta = onnx_runtime.export_network(kind, module.eval(), model_file, model_file.with_suffix(".pt"),
                                                   weights_sha256="none: seeded random weights")
                exported[kind] = onnx_runtime.OnnxNetwork(model_file, meta, threads)
        timings["onnx_export"] = time.perf_counter() - t
        network = onnx_runtime.onnx_predictor(exported["detector"])
        t = time.perf_counter()
    else:
        t = time.perf_counter()
        detector = VFRDetector().eval()
        # as pipeline.load_networks leaves it: channels-last, BatchNorm folded under bf16 (unless --unfolded)
        detector = with_fast_memory_format(fold_batch_norms(detector) if (fold and bf16) else detector)
        network = detection.network_predictor(torch.compile(detector) if compile_networks else detector)
    if runtime == "onnx":
        appearance, context = exported["appearance"], exported["context"]
    else:
        appearance, context = (with_fast_memory_format(n.eval()) for n in (AppearanceNet(), ContextNet()))
    timings["build_networks"] = time.perf_counter() - t
    if compile_networks:
        appearance, context = (torch.compile(n) for n in (appearance, context))
    truth: dict[int, list] = {}
    for v in phantom.vertebrae:
        for s, q in v.quads.items():
            truth.setdefault(s, []).append(q)
    oracle = oracle_predictor({s: np.stack(q) for s, q in truth.items()})
    oracle_seconds = 0.0

    def predict(patches, boxes):
        nonlocal oracle_seconds
        if bf16 and runtime == "torch":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                network(patches, boxes)
        else:
            network(patches, boxes)
        t0 = time.perf_counter()
        maps = oracle(patches, boxes)
        oracle_seconds += time.perf_counter() - t0
        return maps

    params = _params(plan, stride_fraction)

    def label(vertebrae, timings=None):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and compile_networks)
        with autocast:
            return labelling.label_vertebrae(scan, vertebrae, appearance, context, timings=timings)

    if compile_networks:
        t = time.perf_counter()
        label(detection.detect_vertebrae(scan, predict, params).vertebrae)
        timings["compile_warmup"] = time.perf_counter() - t
        oracle_seconds = 0.0
    result = detection.detect_vertebrae(scan, predict, params)
    timings["detection_network"] = result.timings_s["detection_network"] - oracle_seconds
    timings["detection_postprocessing"] = result.timings_s["detection_postprocessing"]
    lt = labelling.LabellingTimings() if hasattr(labelling, "LabellingTimings") else None
    t = time.perf_counter()
    result.vertebrae = label(result.vertebrae, lt)
    timings["labelling"] = time.perf_counter() - t
    timings["detection_and_labelling"] = (timings["detection_network"] + timings["detection_postprocessing"]
                                          + timings["labelling"])
    return {
        "scan": name, "shape": list(scan.shape), "spacing_mm": [round(s, 2) for s in scan.spacing_mm],
        "plan": plan, "inputs": _inputs(scan, params), "vertebrae": len(result.vertebrae), "threads": threads,
        "bf16": bf16, "compile": compile_networks, "batch_norm_folded": fold and bf16 and runtime == "torch",
        "runtime": runtime,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--bf16", action="store_true", help="run the detector under bfloat16 autocast")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the networks; a first untimed run compiles (official-size only)")
    parser.add_argument("--scan", choices=["lumbar", "whole", "both"], default="both")
    parser.add_argument("--bundled", action="store_true",
                        help="time the bundled small networks (the default of `spinenet run`) instead")
    parser.add_argument("--plan", choices=["whole_slice", "patches", "both"], default="both",
                        help="detection plan (DetectionParams.plan); both: one run each")
    parser.add_argument("--unfolded", action="store_true",
                        help="with --bf16: keep the detector's BatchNorm layers (pipeline.load_networks folds them)")
    parser.add_argument("--stride-fraction", type=float, default=None,
                        help="DetectionParams.stride_fraction of the patches (default: DetectionParams' own)")
    parser.add_argument("--runtime", choices=["torch", "openvino", "onnx"], default="torch",
                        help="where the detector (openvino) or every network (onnx) runs "
                             "(SpineNetLib/models/runtimes.py; official-size only)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (spinenet keeps freed memory for reuse: "
                             "core/process.keep_freed_memory_for_reuse)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runtime == "onnx" and (args.bf16 or args.compile):
        raise InputError("--runtime onnx runs in float32, uncompiled: leave out --bf16 and --compile")
    if args.child:
        # As the spinenet command does, unless asked not to.
        malloc_tuned = False if args.default_malloc else keep_freed_memory_for_reuse()
        report = (run_bundled(args.child, args.threads, args.plan, args.stride_fraction) if args.bundled
                  else run_one(args.child, args.threads, args.bf16, args.plan, args.compile, not args.unfolded,
                               args.stride_fraction, args.runtime))
        report["malloc_tuned"] = malloc_tuned
        print(json.dumps(report))
        return 0
    if args.bundled:
        ignored = [flag for flag, given in (("--bf16", args.bf16), ("--compile", args.compile),
                                            (f"--runtime {args.runtime}", args.runtime != "torch")) if given]
        if ignored:
            verb = "apply" if len(ignored) > 1 else "applies"
            raise InputError(f"--bundled times the bundled networks as spinenet run loads them (fp32, torch): "
                             f"{' and '.join(ignored)} {verb} to the official-size networks only")
    names = ["lumbar", "whole"] if args.scan == "both" else [args.scan]
    plans = ["whole_slice", "patches"] if args.plan == "both" else [args.plan]
    for name, plan in [(n, p) for n in names for p in plans]:
        cmd = [sys.executable, __file__, "--child", name, "--threads", str(args.threads), "--plan", plan]
        if args.bf16:
            cmd.append("--bf16")
        if args.compile:
            cmd.append("--compile")
        if args.bundled:
            cmd.append("--bundled")
        if args.unfolded:
            cmd.append("--unfolded")
        if args.stride_fraction is not None:
            cmd += ["--stride-fraction", str(args.stride_fraction)]
        if args.runtime != "torch":
            cmd += ["--runtime", args.runtime]
        if args.default_malloc:
            cmd.append("--default-malloc")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return _child_failed(name, plan, done)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{report['scan']}: {report['shape']} voxels at {report['spacing_mm']} mm, plan {report['plan']}: "
              f"{report['inputs']}; {report['vertebrae']} vertebrae, {report['threads']} threads"
              f"{', bf16' if report['bf16'] else ''}{', compiled' if report.get('compile') else ''}"
              f"{', BatchNorm folded' if report.get('batch_norm_folded') else ''}"
              f"{', OpenVINO' if report.get('runtime') == 'openvino' else ''}"
              f"{', ONNX Runtime' if report.get('runtime') == 'onnx' else ''}"
              f"{', malloc keeps freed memory' if report.get('malloc_tuned') else ', default malloc'}")
        for stage, seconds in report["seconds"].items():
            print(f"  {stage:<26} {seconds:8.2f} s")
        print(f"  {'peak memory (RSS)':<26} {report['peak_rss_mb']:8.1f} MB")
    return 0


#: Lines of a failed child's stderr shown (a traceback's last frames and its message).
CHILD_STDERR_LINES = 15


def _child_failed(name: str, plan: str, done: subprocess.CompletedProcess) -> int:
    """Pass a failed child's stderr on and its exit status: a user's error (status 2: the last line, the
    child's own ``run_main``'s) stays one line; anything else shows its last lines and which run failed."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    print("\n".join(lines[-1:] if done.returncode == 2 else lines[-CHILD_STDERR_LINES:]), file=sys.stderr)
    if done.returncode != 2:
        print(f"{Path(__file__).name}: the run of the {name} scan, plan {plan}, failed with exit status "
              f"{done.returncode}", file=sys.stderr)
    return done.returncode if done.returncode > 0 else 1


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
