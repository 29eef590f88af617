"""What the levels come out as on phantoms with a lumbosacral transitional vertebra: figures, not a test.

    python benchmarks/transitional_phantoms.py [--weights bundled] [--seeds 1,2,3] [--threads 2]

Why: the levels are counted up from the body the networks take for S1, and nothing recognises a sacralised
L5 (fused to the sacrum, its disc thin) or a lumbarised S1 (a lumbar-shaped first sacral segment with a disc
below it).  With one, the names may differ by one from a count down from C2 (README, "Not yet good enough").
No real scan in ../shared is known to have one, so this runs lumbar T2 phantoms
(``SpineNetLib.synthetic.phantom.make_phantom``) without and with each kind, ``variability=1.0``, and prints,
per phantom, the check of ``spinenet demo`` against its truth (``evaluation/demo_check.check_against_phantom``:
the bodies named wrongly, or all right; the phantom calls the lumbarised segment S1), whether the run asks for a
review, and its first reason.  Phantoms only hint at what real anatomy does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_errors import InputError, at_least  # noqa: E402

KINDS = (None, "sacralised_L5", "lumbarised_S1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--seeds", default="1,2,3", help="phantom seeds, comma separated")
    parser.add_argument("--threads", type=at_least(1), default=2)
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise InputError(f"--seeds must be whole numbers separated by commas, not {args.seeds!r}") from None

    import torch

    torch.set_num_threads(args.threads)
    from SpineNetLib import pipeline
    from SpineNetLib.evaluation.demo_check import check_against_phantom
    from SpineNetLib.synthetic.phantom import make_phantom

    networks = pipeline.load_networks(args.weights, "cpu")
    print("transitional     seed review  levels against the phantom's truth | first reason")
    for kind in KINDS:
        for seed in seeds:
            phantom = make_phantom(fov="lumbar", contrast="T2", transitional=kind, seed=seed, variability=1.0,
                                   include_s2=True)
            result = pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False))
            labelling = result.vertebrae_document["labelling"]
            reason = (labelling.get("warnings") or [""])[0]
            verdict = check_against_phantom(result.vertebrae_document, phantom).verdict()
            print(f"{str(kind):16s} {seed:4d} {'yes' if labelling.get('needs_review') else 'no':6s}  "
                  f"{verdict} | {reason[:90]}")
    return 0


if __name__ == "__main__":
    from script_errors import run_main

    run_main(main)
