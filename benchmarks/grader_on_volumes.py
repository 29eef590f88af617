"""How often a grader calls a disc herniated on the real volumes of healthy volunteers.

    python benchmarks/grader_on_volumes.py [--grader FILE ...] [--sources chu,myosegmentum,ivd]
        [--cache runs/volume_discs.npz] [--threads 2]

Why: the bundled grader learned on single 8-bit clinical slices (``tianchi/``).  On volumes it
reads each disc's mid slice, and on the T2 volumes of healthy volunteers (``chu/``: 1.5 T, healthy;
``ivd/``: young adults; ``myosegmentum/``: water images of healthy volunteers) it called nearly
every disc herniated (issue 13).  None of these discs carries a herniation grade, so this is a
plausibility check, not an accuracy figure: in asymptomatic adults a protrusion is found at one or
more lumbar levels in about 30 % of people of 20-40 years (Brinjikji W. et al., AJNR 2015), so per
disc the rate of a sound grader should stay well below that.

Every volume of the chosen sources is read, its bodies are detected and labelled with the bundled
networks (:func:`SpineNetLib.pipeline.detect_and_label`) and its discs cut
(:func:`SpineNetLib.pipeline.grade_discs` without grading) once; the disc volumes are cached in
``--cache`` so that several graders compare on the same discs.  Each ``--grader`` (default: the
bundled one) then grades them; the script prints, per grader and source, the discs, the share
called herniated and the median herniation probability, and then the same for the L5-S1 discs and
the discs of the other levels of all sources together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_errors import InputError, at_least  # noqa: E402

DEFAULT_SOURCES = ("chu", "myosegmentum", "ivd")


def disc_volumes(sources, cache: Path | None, log=print) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Source -> float16 (N, 9, 112, 224) disc volumes of all its volumes, and source -> their N level
    names ("L5-S1", ...), from the cache when it has them."""
    if cache is not None and cache.exists():
        with np.load(cache) as stored:
            if all(s in stored and f"{s}_levels" in stored for s in sources):
                return {s: stored[s] for s in sources}, {s: stored[f"{s}_levels"] for s in sources}
    from SpineNetLib.pipeline import detect_and_label, grade_discs, load_networks
    from SpineNetLib.training.datasets import list_cases
    from SpineNetLib.inputs.load import load_scan

    networks = load_networks("bundled")
    out: dict[str, np.ndarray] = {}
    levels: dict[str, np.ndarray] = {}
    for source in sources:
        volumes, names = [], []
        for case in list_cases(sources=[source]):
            scan = load_scan(case.path / "image.nii.gz")
            found = detect_and_label(scan, networks)
            discs = grade_discs(scan, found.vertebrae, networks, grade=False)
            volumes += [ivd.volume.astype(np.float16) for ivd in discs.ivds]
            names += [str(ivd.level) for ivd in discs.ivds]
            log(f"{source}/{case.case_id}: {len(discs.ivds)} discs")
        out[source] = np.stack(volumes) if volumes else np.zeros((0, 9, 112, 224), np.float16)
        levels[source] = np.array(names, dtype=str)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, **out, **{f"{s}_levels": names for s, names in levels.items()})
    return out, levels


def load_grader(grader_path: str):
    """The grading network of a file, or the bundled one for "bundled"."""
    from SpineNetLib.weights import checkpoints
    from SpineNetLib.weights.resolve import resolve_weights

    path = resolve_weights("bundled").path("grading") if grader_path == "bundled" else grader_path
    return checkpoints.load_model("grading", path)


def herniation_calls(grader, volumes: np.ndarray) -> np.ndarray:
    """Herniation probability of each disc volume under the grader (a path, "bundled" or a loaded
    network; its calibrated decision: p > 0.5)."""
    from SpineNetLib.discs.grading import grade_volumes

    net = load_grader(grader) if isinstance(grader, str) else grader
    grades = grade_volumes(list(volumes.astype(np.float32)), net, batch_size=16)
    return np.array([g["Herniation"][1][1] for g in grades])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grader", action="append", default=None, metavar="FILE",
                   help="grading weights to check (repeatable; default: the bundled grader)")
    p.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="volume sources (default %(default)s)")
    p.add_argument("--cache", default="runs/volume_discs.npz", help="disc volume cache ('' for none)")
    p.add_argument("--threads", type=at_least(1), default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not sources:
        raise InputError(f"--sources: none given (default {','.join(DEFAULT_SOURCES)})")
    graders = {grader: load_grader(grader) for grader in args.grader or ["bundled"]}   # before the discs are cut
    volumes, levels = disc_volumes(sources, Path(args.cache) if args.cache else None)
    print("| grader | discs | number | called herniated | median p |")
    print("|---|---|---|---|---|")
    for grader, net in graders.items():
        probs = {s: herniation_calls(net, volumes[s]) if len(volumes[s]) else np.zeros(0) for s in sources}
        every_p, every_level = np.concatenate(list(probs.values())), np.concatenate([levels[s] for s in sources])
        rows = [(source, probs[source]) for source in sources]
        rows += [("L5-S1, all sources", every_p[every_level == "L5-S1"]),
                 ("other levels, all sources", every_p[every_level != "L5-S1"])]
        for name, p in rows:
            share = f"{(p > 0.5).sum()} ({100 * (p > 0.5).mean():.0f} %)" if p.size else "-"
            median = f"{np.median(p):.2f}" if p.size else "-"
            print(f"| {grader} | {name} | {p.size} | {share} | {median} |")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
