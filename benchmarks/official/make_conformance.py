"""Write the official package's outputs on synthetic scans to ``Testing/Python/data/official_conformance.json``.

``Testing/Python/test_official_conformance.py`` checks our ``official`` profile against this file
without the official package or its weights (issue 11, item 4): it rebuilds the same inputs
(seeded phantoms, the bundled detector, seeded random official-size appearance and context
networks, seeded random official-layout grading... see ``conformance_inputs``) and compares
stage by stage.  Regenerate only on purpose (a new official release), in the official package's
environment (benchmarks/official/README.md):

    python benchmarks/official/make_conformance.py --official-python /tmp/official_env/bin/python
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing" / "Python"))

from official_conformance import (FIXTURE, SAMPLES, conformance_cases, sample_positions,  # noqa: E402
                                  write_label_networks)
from compare import official_python, run_official  # noqa: E402  (benchmarks/official/compare.py)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-python", required=True, help="python of the official package's environment")
    args = parser.parse_args(argv)
    python = official_python(args.official_python)
    torch.set_num_threads(2)
    from SpineNetLib.weights.resolve import resolve_weights

    detector = resolve_weights("bundled").path("detector")
    out = {"package": "spinenet 2.1.4 (PyPI)", "samples_per_volume": SAMPLES, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="spinenet-conformance-") as tmp:
        weights = write_label_networks(Path(tmp) / "weights")
        for name, scan in conformance_cases().items():
            spacing = scan.spacing_mm[:2]
            found = run_official(python, scan.voxels, spacing, weights, Path(tmp) / name / "det",
                                 detection_only=True, detector_checkpoint=detector)
            later = run_official(python, scan.voxels, spacing, weights, Path(tmp) / name / "later",
                                 vertebrae=found["detected"])
            case = {"detected": [{"slice_nos": v["slice_nos"], "polys": v["polys"]} for v in found["detected"]],
                    "labels": later["labels"],
                    "appearance_probabilities": later["appearance_probabilities"].tolist(),
                    "context_probabilities": later["context_probabilities"].tolist(),
                    "ivd_names": later["ivd_names"][::-1]}  # top to bottom, as ours
            for key, volumes in (("appearance_volumes", later["appearance_volumes"]),
                                 ("ivd_volumes", later.get("ivd_volumes", np.zeros((0, 9, 112, 224)))[::-1])):
                positions = sample_positions(volumes.shape[1:])
                case[key] = [{"range": float(np.ptp(v)), "sum": float(v.astype(np.float64).sum()),
                              "samples": v[positions].astype(float).tolist()} for v in volumes]
            out["cases"][name] = case
            print(name, len(case["detected"]), "vertebrae", len(case["ivd_names"]), "discs", flush=True)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(out, separators=(",", ":")))
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # on the path: compare.py puts benchmarks/ there

    run_main(main)
