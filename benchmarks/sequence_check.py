"""How the image alone tells a T1-weighted scan from a fluid-bright one, on every real scan here.

    python benchmarks/sequence_check.py [--data DIR] [--sources chu,ivd,...] [--threads 1] [--phantoms]

``spinenet run`` grades the discs of T2-weighted scans only (``SpineNetLib/discs/weighting.py``). A
NIfTI, NRRD or MHA file has no header to say the weighting, so the run reads it from the image: the
median, over the bodies named L2-L5 (else every body above S1), of the fluid behind each body divided by
its marrow (``weighting.fluid_to_marrow_ratio``); below ``weighting.T1_MAX_FLUID_TO_MARROW`` the scan
reads as T1-weighted and is not graded.

Every case of ``../shared/data`` (both sides of the split: nothing here is trained) is read, its bodies
detected and labelled with the bundled networks as ``spinenet run`` does (``pipeline.detect_and_label``),
and the ratio printed per case, then per source and sequence (``case.json``'s ``sequence``): the range,
and how many cases read as T1. ``--phantoms`` adds lumbar phantoms in T1, T2 and STIR
(``SpineNetLib.synthetic``), whose weighting is known exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_errors import InputError, at_least, run_main  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--sources", default=None, help="comma-separated sources (default: all)")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--phantoms", action="store_true", help="also 3 lumbar phantoms per sequence")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from SpineNetLib.discs.weighting import T1_MAX_FLUID_TO_MARROW, fluid_to_marrow_ratio, weighting_from_image
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.pipeline import detect_and_label, load_networks
    from SpineNetLib.training.datasets import list_cases

    sources = args.sources.split(",") if args.sources else None
    cases = list_cases(args.data, sources=sources)
    if not cases:
        raise InputError("no cases found")
    networks = load_networks("bundled", "cpu")
    start = time.perf_counter()
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    print(f"{'case':28s} {'sequence':26s} bodies  ratio  reads as")

    def measure(name: str, source: str, sequence: str, scan) -> None:
        found = detect_and_label(scan, networks)
        ratio, bodies = fluid_to_marrow_ratio(scan, found.vertebrae)
        ratio = float("nan") if ratio is None else ratio
        groups[(source, sequence)].append(ratio)
        print(f"{name:28s} {sequence:26s} {bodies:6d} {ratio:6.2f}  {weighting_from_image(scan, found.vertebrae).name}",
              flush=True)

    for case in cases:
        measure(case.case_id, case.source, case.sequence or "?", load_scan(case.path / "image.nii.gz"))
    if args.phantoms:
        from SpineNetLib.synthetic.phantom import PhantomParams, make_phantom

        for sequence in ("T1", "T2", "STIR"):
            for seed in (1, 2, 3):
                phantom = make_phantom(PhantomParams(fov="lumbar", contrast=sequence, seed=seed))
                measure(f"phantom_{sequence}_{seed}", "phantom", sequence, phantom.scan)

    print(f"\n{len(cases)} cases in {time.perf_counter() - start:.0f} s; reads as T1 below "
          f"{T1_MAX_FLUID_TO_MARROW:g}\n")
    print(f"{'source':14s} {'sequence':26s} cases  min    median max    read as T1")
    for (source, sequence), values in sorted(groups.items()):
        known = [v for v in values if np.isfinite(v)]
        t1 = sum(v < T1_MAX_FLUID_TO_MARROW for v in known)
        low, mid, high = (np.min(known), np.median(known), np.max(known)) if known else (np.nan,) * 3
        print(f"{source:14s} {sequence:26s} {len(values):5d}  {low:5.2f}  {mid:5.2f}  {high:5.2f}  "
              f"{t1} (unmeasured {len(values) - len(known)})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
