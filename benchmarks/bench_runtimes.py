"""CPU runtimes for each official-size network: seconds per call and the difference from fp32 eager.

Issue 16, item 2: measure before choosing.  For the detector (a batch of 4 patches of 224 x 224),
the appearance network (one 224 x 224 x 16 volume), the context network (one 512 x 24 height map)
and the grading network (one 9 x 112 x 224 disc volume), with seeded random weights (speed does
not depend on the values; the differences are indicative only), this prints the best of
``--repeats`` calls per runtime and the largest absolute output difference from fp32 eager:

* ``fp32``: torch eager, float32 (what the pipeline runs);
* ``bf16``: torch eager under ``torch.autocast("cpu", torch.bfloat16)``;
* ``channels_last``: fp32 with the 2D networks' inputs and weights in channels-last memory order;
* ``onnxruntime``: the network exported to ONNX and run by ONNX Runtime (CPU), when installed
  (``pip install onnx onnxruntime``; not a project dependency);
* ``compile`` / ``compile_bf16``: ``torch.compile`` (Inductor, C++ kernels), float32 and under
  bfloat16 autocast; the first call's seconds (compiling) are printed apart;
* ``int8``: static int8 quantisation (PT2E with torchao's ``X86InductorQuantizer``, calibrated on
  the input itself, then ``torch.compile``), when torchao is installed (``pip install --no-deps
  torchao``; not a project dependency; torch 2.13 itself no longer ships PT2E quantisation);
* ``openvino`` / ``openvino_bf16``: the network converted by ``openvino.convert_model`` and compiled
  for the CPU with the float32 or the bfloat16 inference precision hint (OpenVINO picks bfloat16 by
  itself on CPUs with AMX unless told otherwise), when OpenVINO is installed (``pip install
  openvino``; not a project dependency); "first call" then holds the conversion and compilation.

    python benchmarks/bench_runtimes.py [--threads 2] [--repeats 3] [--networks detector grading ...]
        [--runtimes fp32 bf16 channels_last onnxruntime compile compile_bf16 int8 openvino openvino_bf16]

A requested runtime whose package is not installed is skipped, with one line saying so and how to
install it.

Dynamic int8 quantisation (``quantize_dynamic``) only covers linear layers, and these networks spend
their time in convolutions.
"""
from __future__ import annotations

import argparse
import importlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_errors import at_least  # noqa: E402

NETWORKS = ("detector", "appearance", "context", "grading")


def _networks() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    from SpineNetLib.models.appearance import AppearanceNet
    from SpineNetLib.models.context import ContextNet
    from SpineNetLib.models.detector import VFRDetector
    from SpineNetLib.models.grading import GradingNet

    torch.manual_seed(0)
    return {"detector": (VFRDetector().eval(), torch.rand(4, 1, 224, 224)),
            "appearance": (AppearanceNet().eval(), torch.rand(1, 1, 224, 224, 16)),
            "context": (ContextNet().eval(), torch.rand(1, 1, 512, 24)),
            "grading": (GradingNet().eval(), torch.rand(1, 1, 9, 112, 224))}


def _flat(out) -> np.ndarray:
    parts = out if isinstance(out, (tuple, list)) else (out,)
    return np.concatenate([p.float().detach().numpy().ravel() for p in parts])


def _best(call, repeats: int) -> tuple[float, np.ndarray]:
    out = call()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        best = min(best, time.perf_counter() - start)
    return best, _flat(out)


def _onnx_session(net: torch.nn.Module, x: torch.Tensor, threads: int):
    import onnxruntime

    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=False, opset_version=17)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]


def _int8_compiled(net: torch.nn.Module, x: torch.Tensor):
    """``net`` quantised to static int8 by PT2E (torchao's x86 Inductor quantizer), then compiled."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(net, (x,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    prepared(x)  # calibration
    return torch.compile(convert_pt2e(prepared))


def _openvino_call(net: torch.nn.Module, x: torch.Tensor, threads: int, precision: str):
    """``net`` converted to OpenVINO and compiled for the CPU with ``precision`` ("f32" or "bf16") as
    its inference precision, and the seconds that took."""
    import openvino

    start = time.perf_counter()
    model = openvino.convert_model(net, example_input=x)
    compiled = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                            "INFERENCE_NUM_THREADS": threads,
                                                            "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    prepare_s = time.perf_counter() - start
    return (lambda: [torch.from_numpy(request.infer([x.numpy()])[o].copy()) for o in compiled.outputs]), prepare_s


def _timed_first_call(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


RUNTIMES = ("fp32", "bf16", "channels_last", "onnxruntime", "compile", "compile_bf16", "int8", "openvino",
            "openvino_bf16")

#: The runtimes that need a package this project does not depend on: the modules they import, and how to
#: install them.
OPTIONAL_PACKAGES = {
    "onnxruntime": (("onnx", "onnxruntime"), "pip install onnx onnxruntime"),
    "int8": (("torchao.quantization.pt2e.quantize_pt2e",), "pip install --no-deps torchao"),
    "openvino": (("openvino",), "pip install openvino"),
    "openvino_bf16": (("openvino",), "pip install openvino"),
}


def missing_package(runtime: str) -> str | None:
    """Why ``runtime`` cannot run here (a package it needs is not installed), or None when it can."""
    modules, install = OPTIONAL_PACKAGES.get(runtime, ((), ""))
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{module.split('.')[0]} not installed ({install})"
    return None


def measure(name: str, net: torch.nn.Module, x: torch.Tensor, repeats: int, threads: int,
            runtimes=RUNTIMES) -> list[tuple]:
    """(network, runtime, seconds, max |diff| from fp32, first-call seconds or None) per runtime
    (the optional ones only where their package is installed: :func:`missing_package`)."""
    rows = []

    def bf16(module):
        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return module(x)
        return call

    with torch.no_grad():  # not inference_mode: its tensors could not be exported to ONNX afterwards
        base_s, base = _best(lambda: net(x), repeats)
        rows.append(("fp32", base_s, 0.0, None))
        if "bf16" in runtimes:
            s, out = _best(bf16(net), repeats)
            rows.append(("bf16", s, float(np.abs(out - base).max()), None))
        if "channels_last" in runtimes and x.dim() == 4:
            net_cl = net.to(memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            s, out = _best(lambda: net_cl(x_cl), repeats)
            rows.append(("channels_last", s, float(np.abs(out - base).max()), None))
            net.to(memory_format=torch.contiguous_format)
    if "onnxruntime" in runtimes:
        with torch.no_grad():
            session = _onnx_session(net, x, threads)
        s, out = _best(session, repeats)
        rows.append(("onnxruntime", s, float(np.abs(out - base).max()), None))
    for runtime, precision in (("openvino", "f32"), ("openvino_bf16", "bf16")):
        if runtime in runtimes:
            with torch.no_grad():
                call, prepare_s = _openvino_call(net, x, threads, precision)
            first = prepare_s + _timed_first_call(call)
            s, out = _best(call, repeats)
            rows.append((runtime, s, float(np.abs(out - base).max()), first))
    with torch.no_grad():
        for runtime in ("compile", "compile_bf16", "int8"):
            if runtime not in runtimes:
                continue
            torch._dynamo.reset()
            if runtime == "int8":
                compiled = _int8_compiled(net, x)
                call = lambda: compiled(x)  # noqa: E731
            else:
                compiled = torch.compile(net)
                call = bf16(compiled) if runtime == "compile_bf16" else (lambda: compiled(x))
            first = _timed_first_call(call)
            s, out = _best(call, repeats)
            rows.append((runtime, s, float(np.abs(out - base).max()), first))
    return [(name, *r, float(np.abs(base).max())) for r in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=at_least(1), default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="timed calls per runtime (the best is shown)")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS,
                        help="which networks to measure")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES,
                        help="which runtimes to measure (fp32 eager always runs: it is the reference)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runtimes = []
    for runtime in args.runtimes:
        reason = missing_package(runtime)
        if reason:
            print(f"{runtime}: {reason}, skipped")
        else:
            runtimes.append(runtime)
    networks = _networks()
    print(f"{'network':<11} {'runtime':<14} {'seconds':>8} {'x fp32':>7} {'max |diff|':>11} {'max |out|':>10}"
          f" {'first call':>10}")
    for name in args.networks:
        net, x = networks[name]
        rows = measure(name, net, x, args.repeats, args.threads, runtimes)
        for net_name, runtime, seconds, diff, first, scale in rows:
            first_text = "" if first is None else f"{first:9.1f}s"
            print(f"{net_name:<11} {runtime:<14} {seconds:8.3f} {rows[0][2] / seconds:7.2f} {diff:11.2e} {scale:10.2e}"
                  f" {first_text:>10}", flush=True)
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
