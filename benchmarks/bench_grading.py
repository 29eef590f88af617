"""Seconds and peak memory to grade the 6 discs of a lumbar phantom with the OFFICIAL-size grader.

    python benchmarks/bench_grading.py [--threads 2] [--hotspots N_AUGMENT] [--precision fp32|bf16]
        [--hotspot-precision auto|fp32|bf16] [--hotspot-heads K] [--batch-size 4] [--contiguous]
        [--default-malloc]

Random weights (speed does not depend on their values); the disc volumes are
extracted from a lumbar phantom's ground-truth vertebrae T12-S1: its 6 discs, T12-L1 to L5-S1
(issue 16's goal is for 7 discs: about 7/6 of the grading seconds).  ``--hotspots N``
also times one contrastive-excitation hotspot map (one disc, one head) with N
test-time augmentations, in ``--hotspot-precision`` (``discs/hotspots.py``; "auto", the default of
``spinenet run``, is bfloat16 on a CPU that computes it natively), and with ``--precision fp32``
also in the other arithmetic, to print how closely the smoothed bfloat16 map follows the float32 one.
That comparison is left out where the map would be in bfloat16 on a CPU without native bfloat16: it
is emulated there (``models/precision.native_bfloat16``), and on an AVX2 host it ran over 25 minutes
without finishing, where the float32 map took 90 s.
``--hotspot-heads K`` (K > 1) then also times the maps of K heads of that disc made together
(``hotspots.hotspot_volumes``: the heads share the forward passes), as ``--hotspots A,B,...`` does.
glibc's malloc is set as the ``spinenet`` command sets it (``core/process.keep_freed_memory_for_reuse``)
unless ``--default-malloc``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_errors import at_least  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--hotspots", type=at_least(0), default=0, metavar="N_AUGMENT",
                        help="also time one hotspot map with N test-time augmentations (default 0: not)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="network arithmetic (SpineNetLib/models/precision.py)")
    parser.add_argument("--hotspot-precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="arithmetic of the hotspot map (default auto, as spinenet run)")
    parser.add_argument("--hotspot-heads", type=at_least(1), default=1, metavar="K",
                        help="also time K heads' maps of the disc made together (default 1: not)")
    parser.add_argument("--batch-size", type=at_least(1), default=4, help="disc volumes per grading call (default 4)")
    parser.add_argument("--contiguous", action="store_true",
                        help="keep the grader's weights in the default (NCDHW) layout instead of channels-last")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (spinenet keeps freed memory for reuse)")
    args = parser.parse_args()
    from SpineNetLib.core.process import keep_freed_memory_for_reuse

    malloc_tuned = False if args.default_malloc else keep_freed_memory_for_reuse()
    print(f"malloc: {'keeps freed memory for reuse, as spinenet does' if malloc_tuned else 'glibc defaults'}")

    import torch

    torch.set_num_threads(args.threads)
    from SpineNetLib.discs.grading import grade_volumes
    from SpineNetLib.discs.extraction import extract_ivd_volumes
    from SpineNetLib.models import GradingNet
    from SpineNetLib.models.precision import with_precision
    from SpineNetLib.weights.checkpoints import with_fast_memory_format
    from SpineNetLib.synthetic.phantom import make_phantom
    from SpineNetLib.core.results import Vertebra

    phantom = make_phantom(fov="lumbar", seed=1)
    vertebrae = [Vertebra(slices=sorted(v.quads), polygons=[v.quads[s] for s in sorted(v.quads)], level=v.level)
                 for v in phantom.vertebrae if not v.extra]
    t = time.perf_counter()
    ivds = extract_ivd_volumes(phantom.scan, vertebrae)
    extract_s = time.perf_counter() - t
    torch.manual_seed(0)
    # channels-last as load_model leaves a loaded grader (weights/checkpoints.with_fast_memory_format)
    layout = GradingNet().eval() if args.contiguous else with_fast_memory_format(GradingNet().eval())
    net = with_precision(layout, args.precision)
    grade_volumes(ivds[:1], net)  # warm-up
    t = time.perf_counter()
    grade_volumes(ivds, net, batch_size=args.batch_size)
    grade_s = time.perf_counter() - t
    print(f"{len(ivds)} discs, official-size grader (63.5 M parameters), {args.threads} threads, {args.precision}, "
          f"{args.batch_size} discs per call, {'NCDHW' if args.contiguous else 'channels-last (NDHWC)'}")
    print(f"  extract volumes            {extract_s:8.2f} s")
    print(f"  grade                      {grade_s:8.2f} s")
    if args.hotspots:
        import numpy as np

        from SpineNetLib.discs.hotspots import box_iou, hotspot_box, hotspot_volume, map_arithmetic, smooth_map
        from SpineNetLib.models.grading import HEADS
        from SpineNetLib.models.precision import native_bfloat16

        arithmetic = type(map_arithmetic(net, torch.device("cpu"), args.hotspot_precision)[1]).__name__
        t = time.perf_counter()
        chosen = hotspot_volume(net, ivds[-1].volume, HEADS[0], n_augment=args.hotspots,
                                precision=args.hotspot_precision)
        print(f"  hotspots, 1 disc x 1 head, {args.hotspots} augmentations ({args.hotspot_precision}: "
              f"{'bf16' if arithmetic == 'autocast' else 'fp32'}) {time.perf_counter() - t:8.2f} s")
        if args.hotspot_heads > 1:
            from SpineNetLib.discs.hotspots import LATERAL_HEADS, hotspot_volumes

            heads = [h for h in HEADS if h.name not in LATERAL_HEADS][:args.hotspot_heads]
            t = time.perf_counter()
            hotspot_volumes(net, ivds[-1].volume, heads, n_augment=args.hotspots, precision=args.hotspot_precision)
            print(f"  hotspots, 1 disc x {len(heads)} heads together ({', '.join(h.column for h in heads)}) "
                  f"{time.perf_counter() - t:8.2f} s")
        if args.precision == "fp32":
            # what `spinenet run --hotspots` holds at most; the comparison map below is the benchmark's own
            print(f"  peak memory (RSS) so far   {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.1f} MB "
                  "(grading and the map, as spinenet run makes them)")
            other = "fp32" if arithmetic == "autocast" else "bf16"
            if other == "bf16" and not native_bfloat16(torch.device("cpu")):
                print("  the same map in bf16: left out (this CPU has no native bfloat16; emulated, it takes many "
                      "times the float32 map)")
            else:
                t = time.perf_counter()
                compared = hotspot_volume(net, ivds[-1].volume, HEADS[0], n_augment=args.hotspots, precision=other)
                print(f"  the same map in {other} {time.perf_counter() - t:8.2f} s")
                a, b = smooth_map(chosen), smooth_map(compared)
                print(f"  smoothed map against {other}: r = {np.corrcoef(a.ravel(), b.ravel())[0, 1]:.4f}, "
                      f"hotspot box IoU {box_iou(hotspot_box(a[4]), hotspot_box(b[4])):.2f}")
    print(f"  peak memory (RSS)          {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.1f} MB")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
