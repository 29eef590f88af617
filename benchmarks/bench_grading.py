"""Seconds and peak memory to grade the 7 discs of a lumbar scan with the OFFICIAL-size grader.

    python benchmarks/bench_grading.py [--threads 2] [--hotspots N_AUGMENT] [--precision fp32|bf16]

Random weights (speed does not depend on their values); the disc volumes are
extracted from a lumbar phantom's ground-truth vertebrae.  ``--hotspots N``
also times one contrastive-excitation hotspot map (one disc, one head) with N
test-time augmentations.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hotspots", type=int, default=0, metavar="N_AUGMENT")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="network arithmetic (SpineNetLib/models/precision.py)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from SpineNetLib.discs.grading import grade_volumes
    from SpineNetLib.discs.extraction import extract_ivd_volumes
    from SpineNetLib.models import GradingNet
    from SpineNetLib.models.precision import with_precision
    from SpineNetLib.synthetic.phantom import make_phantom
    from SpineNetLib.core.results import Vertebra

    phantom = make_phantom(fov="lumbar", seed=1)
    vertebrae = [Vertebra(slices=sorted(v.quads), polygons=[v.quads[s] for s in sorted(v.quads)], level=v.level)
                 for v in phantom.vertebrae if not v.extra]
    t = time.perf_counter()
    ivds = extract_ivd_volumes(phantom.scan, vertebrae)
    extract_s = time.perf_counter() - t
    torch.manual_seed(0)
    net = with_precision(GradingNet().eval(), args.precision)
    grade_volumes(ivds[:1], net)  # warm-up
    t = time.perf_counter()
    grade_volumes(ivds, net)
    grade_s = time.perf_counter() - t
    print(f"{len(ivds)} discs, official-size grader (63.5 M parameters), {args.threads} threads, {args.precision}")
    print(f"  extract volumes            {extract_s:8.2f} s")
    print(f"  grade                      {grade_s:8.2f} s")
    if args.hotspots:
        from SpineNetLib.discs.hotspots import hotspot_volume
        from SpineNetLib.models.grading import HEADS

        t = time.perf_counter()
        hotspot_volume(net, ivds[-1].volume, HEADS[0], n_augment=args.hotspots)
        print(f"  hotspots, 1 disc x 1 head, {args.hotspots} augmentations {time.perf_counter() - t:8.2f} s")
    print(f"  peak memory (RSS)          {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.1f} MB")


if __name__ == "__main__":
    main()
