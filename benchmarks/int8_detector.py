"""ONNX Runtime's static int8 for the detectors: its speed, and what it does to the levels (issue 16, item 2).

Tried and not kept (benchmarks/RESULTS.md, "Static int8 on ONNX Runtime").  Two measurements:

* **Speed.** The official-size detector (``models.VFRDetector()``, seeded random weights: speed does not
  depend on the values) exported to ONNX as ``--runtime onnx`` exports it, then quantised to static int8
  (QDQ, unsigned 8-bit activations, signed 8-bit weights per output channel) by
  ``onnxruntime.quantization.quantize_static``.  Both run on ONNX Runtime's CPU provider, 8 patches of
  224 x 224 a call (``DetectionParams.batch_size``); the best and the median of ``--repeats`` calls.
* **Levels.** The bundled detector and S1-outline detector quantised the same way, put in place of their
  float32 exports in a cache folder of this script's own (``$SPINENET_CACHE``), and the held-out scans of
  ``validate_bundled.py`` run with ``--runtime onnx`` from there and from a float32 cache.  It prints both
  tables' overall rows and every scan whose levels, review flag or S1 differ.

Calibration (activation ranges): 1st-99.999th percentiles of patches cut from synthetic phantoms
(``synthetic.phantom.make_phantom``, six fields of view and contrasts, three slices each), as a user's machine
could make them; ``--real-calibration`` uses the middle slice of every sixth training-side scan of
``../shared/data`` instead (never held out), to see whether the ranges are the cause.  The last 1 x 1
convolution (``/out/Conv``), which writes the heat maps that the decoding thresholds, stays float32.

    python benchmarks/int8_detector.py [--threads 2] [--repeats 3] [--speed-only] [--real-calibration]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from script_errors import InputError, at_least

#: Nodes left in float32: the output convolution, whose values the decoding compares with 0.6 and 0.3.
FLOAT_NODES = ("/out/Conv",)
PATCHES_PER_CALL = 8
PHANTOMS = (("lumbar", "T2"), ("lumbar", "T1"), ("whole", "T2"), ("lumbar", "STIR"), ("thoracic", "T2"),
            ("cervical", "T1"))


def _patches_of(scan, slices) -> np.ndarray:
    from SpineNetLib.detect.plans import DetectionParams, extract_patches, slice_plan

    spacing_rc = (float(scan.spacing_mm[0]), float(scan.spacing_mm[1]))
    boxes, _ = slice_plan(scan.voxels.shape[:2], spacing_rc, DetectionParams())
    return np.concatenate([extract_patches(scan.voxels[:, :, s], boxes) for s in slices])


def phantom_patches() -> np.ndarray:
    """Detector inputs ``(N, 1, 224, 224)`` from synthetic phantoms: three slices around the middle of each."""
    from SpineNetLib.synthetic.phantom import make_phantom

    parts = []
    for seed, (fov, contrast) in enumerate(PHANTOMS):
        scan = make_phantom(seed=seed, fov=fov, contrast=contrast).scan
        middle = scan.voxels.shape[2] // 2
        parts.append(_patches_of(scan, (middle - 2, middle, middle + 2)))
    return np.concatenate(parts)[:, None].astype(np.float32)


def real_patches(data_root: Path) -> np.ndarray:
    """Detector inputs from the middle slice of every sixth training-side scan (never a held-out one)."""
    from SpineNetLib.inputs.load import load_scan
    from validate_bundled import training_cases

    parts = []
    for case in training_cases(data_root)[::6]:
        scan = load_scan(case.path / "image.nii.gz", resample_isotropic=True)
        parts.append(_patches_of(scan, (scan.voxels.shape[2] // 2,)))
    return np.concatenate(parts)[:, None].astype(np.float32)


@contextlib.contextmanager
def _working_folder(folder):
    """The working folder set to ``folder`` for the ``with`` block (``contextlib.chdir`` is Python 3.11+)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def quantise(model_file: Path, out_file: Path, calibration: np.ndarray) -> float:
    """``model_file`` quantised to static int8 into ``out_file`` (which may be the same file); the seconds taken."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    usable = len(calibration) // PATCHES_PER_CALL * PATCHES_PER_CALL   # its percentile histograms need equal batches
    if usable == 0:
        raise InputError(f"too few calibration patches ({len(calibration)}; {PATCHES_PER_CALL} at least)")

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter({"input": calibration[i:i + PATCHES_PER_CALL]}
                                for i in range(0, usable, PATCHES_PER_CALL))

        def get_next(self):
            return next(self.batches, None)

    start = time.perf_counter()
    model_file, out_file = Path(model_file).resolve(), Path(out_file).resolve()
    # in a folder of its own: ONNX Runtime's quantisation tools may leave files in the working folder
    # (a failed shape inference wrote a model and a 0.5 GB weights file there)
    with tempfile.TemporaryDirectory() as tmp, _working_folder(tmp):
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_file), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_file), Batches(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=list(FLOAT_NODES))
    return time.perf_counter() - start


def _session(model_file: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")   # as models/onnx_runtime.py
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def speed(calibration: np.ndarray, threads: int, repeats: int) -> None:
    """The official-size detector in float32 and int8 on ONNX Runtime, ``PATCHES_PER_CALL`` patches a call."""
    import torch

    from SpineNetLib.models.detector import VFRDetector
    from SpineNetLib.models.onnx_runtime import export_network

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_file, int8_file = Path(tmp) / "detector.onnx", Path(tmp) / "detector-int8.onnx"
        export_network("detector", VFRDetector().eval(), fp32_file, fp32_file, "random")
        quantise_s = quantise(fp32_file, int8_file, calibration)
        batch = calibration[:PATCHES_PER_CALL]
        outputs, rows = {}, []
        for name, model_file in (("float32", fp32_file), ("int8", int8_file)):
            session = _session(model_file, threads)
            outputs[name] = session.run(None, {"input": batch})[0]   # the warm-up call
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(None, {"input": batch})
                seconds.append(time.perf_counter() - start)
            rows.append((name, min(seconds), statistics.median(seconds)))
    base = rows[0][1]
    print(f"official-size detector on ONNX Runtime, {PATCHES_PER_CALL} patches of 224 x 224 a call, {threads} threads "
          f"(best / median of {repeats}):")
    for name, best, median in rows:
        print(f"  {name:8} {best:6.3f} / {median:6.3f} s   {base / best:4.2f}x")
    diff = float(np.abs(outputs["int8"] - outputs["float32"]).max())
    print(f"  int8 against float32 on these patches: max |diff| {diff:.2e} (largest output {float(np.abs(outputs['float32']).max()):.3f}); "
          f"quantising took {quantise_s:.1f} s")


def _documents(pred_root: Path, case_ids) -> dict:
    import json

    return {c: json.loads((pred_root / c / "vertebrae.json").read_text(encoding="utf-8")) for c in case_ids}


def levels(calibration: np.ndarray, data_root: Path, threads: int, keep: Path | None) -> None:
    """The held-out scans with the bundled detectors in float32 and in int8, both on ONNX Runtime."""
    from SpineNetLib.evaluation.evaluate import evaluate_directories
    from SpineNetLib.pipeline import load_networks
    from validate_bundled import held_out_cases, predict

    cases = held_out_cases(data_root)
    ids = [c.case_id for c in cases]
    root = keep or Path(tempfile.mkdtemp(prefix="spinenet-int8-"))
    summaries, documents = {}, {}
    for name in ("float32", "int8"):
        os.environ["SPINENET_CACHE"] = str(root / f"cache-{name}")   # read at each call (weights/resolve.py)
        if name == "int8":
            load_networks("bundled", "cpu", runtime="onnx", threads=threads)   # exports into this cache
            for kind in ("detector", "s1_outline"):
                (model_file,) = (root / f"cache-{name}" / "onnx").glob(f"{kind}-*.onnx")
                quantise(model_file, model_file, calibration)
        start = time.perf_counter()
        predict(cases, "bundled", root / f"pred-{name}", runtime="onnx", threads=threads)
        summaries[name] = evaluate_directories(data_root, root / f"pred-{name}", case_ids=ids)
        documents[name] = _documents(root / f"pred-{name}", ids)
        print(f"{name}: {len(ids)} held-out scans in {time.perf_counter() - start:.0f} s")
    print(f"\nheld-out scans ({len(ids)}), bundled weights on ONNX Runtime; predictions in {root}:")
    for name, summary in summaries.items():
        o = summary["overall"]
        wrong = [c for c, m in summary["cases"].items() if not m["all_levels_right"]]
        print(f"  {name:8} IDR {100 * o['identification_rate']:5.1f} %, scans entirely right "
              f"{100 * o['share_of_scans_all_levels_right']:5.1f} %, shifted {o['scans_shifted']}; "
              f"not entirely right: {', '.join(wrong)}")
    print("scans whose levels, review flag or S1 differ:")
    differ = 0
    for case_id in ids:
        a, b = (documents[n][case_id] for n in ("float32", "int8"))
        said = [(tuple(v["level"] for v in d["vertebrae"]), d["labelling"].get("needs_review"),
                 d["labelling"].get("s1_found")) for d in (a, b)]
        if said[0] != said[1]:
            differ += 1
            print(f"  {case_id}: float32 {' '.join(said[0][0])} (review {said[0][1]}), "
                  f"int8 {' '.join(said[1][0])} (review {said[1][1]})")
    print(f"  {differ} of {len(ids)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--speed-only", action="store_true", help="leave out the held-out scans (about 2 minutes)")
    parser.add_argument("--real-calibration", action="store_true",
                        help="calibrate on training-side scans of ../shared/data instead of phantoms")
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--keep", default=None, help="folder for the caches and predictions (default: a temporary one)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from SpineNetLib.models.onnx_runtime import onnxruntime_module
    from SpineNetLib.training.datasets import default_data_root

    onnxruntime_module()
    data_root = Path(args.data) if args.data else default_data_root()
    calibration = real_patches(data_root) if args.real_calibration else phantom_patches()
    print(f"calibration: {len(calibration)} patches from {'training-side scans' if args.real_calibration else 'phantoms'}")
    speed(calibration, args.threads, args.repeats)
    if not args.speed_only:
        levels(calibration, data_root, args.threads, Path(args.keep) if args.keep else None)
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
