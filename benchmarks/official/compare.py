"""Side by side with the official SpineNetV2 package: per-stage differences of the ``official`` profile.

Issue 11: with the same random official-layout weights and the same real scans, our ``official``
processing profile should give the official pipeline's outputs.  This script

1. writes random weights in the official checkpoint layout (``detect-vfr/``, ``appearance/``,
   ``context/``, ``grading/``; seeded) that both implementations load unchanged;
2. per real scan (``../shared/data``, native slices, the scan's canonical array given to both as
   float32, so both see identical voxels):
   a. **detection**: the official ``detect_and_group`` against our ``detect_vertebrae`` with the
      official profile's arithmetic; vertebrae matched by their average polygons;
   b. **later stages on identical vertebrae**: the vertebrae our bundled networks find are given to
      both (so the quads are real bodies, whatever random detector weights would find), and the
      appearance volumes, appearance and context probabilities, labels, disc volumes, grading
      logits and grades are compared;
3. prints one table per stage, and with ``--json`` writes every figure.

The official package runs in its own environment (benchmarks/official/README.md):

    python benchmarks/official/compare.py --official-python /tmp/official_env/bin/python \
        [--cases ivd_11 chu_02 ...] [--seed 0] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing" / "Python"))
sys.path.insert(0, str(REPO / "benchmarks"))

from official_conformance import randomise_batch_norm, save_official_layout  # noqa: E402
from script_errors import InputError, at_least  # noqa: E402

DEFAULT_CASES = ("ivd_11", "chu_02", "myo_01", "zukic_02_AKa3_T1")


# --------------------------------------------------------------------------- weights

def _calibrate_heat_maps(detector: torch.nn.Module, patches: np.ndarray) -> None:
    """Scale the output layer so that each heat map (channels 0-4) has mean 0.35 and spread 0.12 on
    ``patches``: a random detector's raw maps hardly vary (spread ~0.01) and never reach the 0.6
    thresholds (official §5), which would leave detection nothing to decode.  Displacements are
    made ten times larger, a few network pixels."""
    with torch.no_grad():
        maps = detector(torch.from_numpy(patches[:, None]).float())
        out = detector.out
        for c in range(maps.shape[1]):
            mean, std = float(maps[:, c].mean()), float(maps[:, c].std())
            gain = 0.12 / max(std, 1e-9) if c < 5 else 10.0
            target = 0.35 if c < 5 else mean * gain
            out.weight[c].mul_(gain)
            out.bias[c].copy_(out.bias[c] * gain + target - mean * gain)


def write_random_official_weights(folder: Path, seed: int, calibration_patches: np.ndarray) -> Path:
    """Seeded random networks of the official sizes, saved as the official checkpoints are (official §2)."""
    from SpineNetLib.models.appearance import AppearanceNet
    from SpineNetLib.models.context import ContextNet
    from SpineNetLib.models.detector import VFRDetector
    from SpineNetLib.models.grading import GradingNet

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    nets = {"detect-vfr": VFRDetector(), "appearance": AppearanceNet(), "context": ContextNet(),
            "grading": GradingNet()}
    with torch.no_grad():
        for net in nets.values():
            randomise_batch_norm(net, generator)
        nets["detect-vfr"].eval()
        _calibrate_heat_maps(nets["detect-vfr"], calibration_patches)
    return save_official_layout(nets, folder)


# --------------------------------------------------------------------------- the official side

def official_python(path: str) -> str:
    """``path`` (``--official-python``) as a program that can be started; a one-line error when it cannot."""
    found = shutil.which(path)
    if found is None:
        raise InputError(f"the official package's interpreter {path} was not found: make its environment as "
                         "benchmarks/official/README.md says and give its python with --official-python")
    return found


def run_official(python: str, volume: np.ndarray, spacing, weights: Path, work: Path,
                 vertebrae: list[dict] | None = None, detection_only: bool = False,
                 detector_checkpoint: Path | None = None) -> dict:
    """The official stages on ``volume`` (official_runner.py in the official environment)."""
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "input.npz", volume=volume.astype(np.float32), pixel_spacing=np.asarray(spacing, float))
    cmd = [python, str(HERE / "official_runner.py"), str(work / "input.npz"), str(weights), str(work / "out.npz")]
    if vertebrae is not None:
        (work / "vertebrae.json").write_text(json.dumps(vertebrae))
        cmd += ["--vertebrae", str(work / "vertebrae.json")]
    if detection_only:
        cmd.append("--detection-only")
    if detector_checkpoint is not None:
        cmd += ["--detector-checkpoint", str(detector_checkpoint)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE / "torchvision_shim"), str(REPO)]))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode == 2:   # the runner's one-line error (e.g. no official package in that environment)
        raise InputError(done.stderr.strip().splitlines()[-1].split(": error: ", 1)[-1])
    if done.returncode:
        raise RuntimeError(f"official runner failed:\n{done.stderr[-3000:]}")
    data = np.load(work / "out.npz")
    out = {k: data[k] for k in data.files if k != "result"}
    out.update(json.loads(str(data["result"])))
    return out


# --------------------------------------------------------------------------- our side

def calibration_patches(scan) -> np.ndarray:
    """The official detection patches of the scan's middle slice (to calibrate the random detector)."""
    from SpineNetLib.detect import vfr as detection
    params = detection.DetectionParams(official_arithmetic=True)
    middle = scan.voxels[:, :, scan.n_slices // 2]
    return detection.extract_patches(middle, detection.plan_patches(middle.shape, scan.spacing_mm[:2], params))


def middle_slices(scan, n: int):
    """The scan cut to its ``n`` middle sagittal slices (detection only looks at the voxels and spacing)."""
    first = max(0, scan.n_slices // 2 - n // 2)
    return replace(scan, voxels=np.ascontiguousarray(scan.voxels[:, :, first:first + n]))


def run_ours(scan, networks, vertebrae=None, stop_after_detection: bool = False) -> dict:
    """Our ``official`` profile's stages on ``scan``; with ``vertebrae``, labelling onwards on those."""
    from SpineNetLib.detect import vfr as detection
    from SpineNetLib.discs.extraction import extract_ivd_volumes
    from SpineNetLib.discs.grading import grade_volumes
    from SpineNetLib.label import labelling
    from SpineNetLib.pipeline import PROFILES, profiled_detection_params, profiled_labelling_params

    profile = PROFILES["official"]
    if vertebrae is None:
        params = profiled_detection_params(None, profile)
        predict = detection.network_predictor(networks.detector, device="cpu")
        vertebrae = detection.detect_vertebrae(scan, predict, params).vertebrae
    out = {"detected": [{"slice_nos": list(v.slices), "polys": [np.asarray(p).tolist() for p in v.polygons]}
                        for v in vertebrae]}
    if stop_after_detection:
        return out
    lparams = profiled_labelling_params(networks.context, None, profile)
    ordered = sorted(vertebrae, key=lambda v: float(np.mean(v.average_polygon[:, 1])))
    out["appearance_volumes"] = np.stack([labelling.extract_vertebra_volume(scan, v, lparams) for v in ordered]) \
        if ordered else np.zeros((0, 224, 224, 16), np.float32)
    labelled = labelling.label_vertebrae(scan, vertebrae, networks.appearance, networks.context, lparams)
    out["labels"] = [v.level for v in labelled]
    if labelled:
        out["appearance_probabilities"] = np.stack([v.appearance_probabilities for v in labelled])
        out["context_probabilities"] = np.stack([v.level_probabilities for v in labelled])
    ivds = extract_ivd_volumes(scan, labelled, across_missed_levels=profile.discs_across_missed_levels,
                               official_arithmetic=profile.official_disc_volumes)
    out["ivd_names"] = [d.level for d in ivds]
    if ivds:
        out["ivd_volumes"] = np.stack([d.volume for d in ivds])
        with torch.no_grad():
            batch = torch.from_numpy(out["ivd_volumes"])[:, None]
            out["grading_logits"] = torch.cat(list(networks.grading(batch)), dim=1).numpy()
        grades = grade_volumes(ivds, networks.grading)
        out["gradings"] = {d.level: [g[0] for g in grade.values()] for d, grade in zip(ivds, grades)}
    return out


# --------------------------------------------------------------------------- comparison

def _match(official: list[dict], ours: list[dict]) -> list[tuple[int, int]]:
    """Pairs (official, ours) of vertebrae whose average polygons' centres are closest, within 10 px."""
    def centre(v):
        return np.mean(np.asarray(v["polys"], float).reshape(-1, 4, 2), axis=(0, 1))
    pairs, used = [], set()
    for i, v in enumerate(official):
        if not ours:
            break
        d = [np.linalg.norm(centre(v) - centre(w)) if j not in used else np.inf for j, w in enumerate(ours)]
        j = int(np.argmin(d))
        if d[j] < 10:
            pairs.append((i, j))
            used.add(j)
    return pairs


def detection_figures(official: list[dict], ours: list[dict]) -> dict:
    pairs = _match(official, ours)
    same_slices, corner_err = 0, []
    for i, j in pairs:
        a, b = official[i], ours[j]
        if list(a["slice_nos"]) == list(b["slice_nos"]):
            same_slices += 1
            corner_err.append(float(np.abs(np.asarray(a["polys"], float) - np.asarray(b["polys"], float)).max()))
    return {"official": len(official), "ours": len(ours), "matched": len(pairs),
            "same_slice_sets": same_slices,
            "max_corner_px": max(corner_err) if corner_err else None,
            "quads_within_0.5px": int(sum(e <= 0.5 for e in corner_err))}


def _relative(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.shape != b.shape:
        return None
    span = float(max(np.ptp(a), 1e-12))
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() / span)


def later_stage_figures(official: dict, ours: dict) -> dict:
    official_discs = list(official.get("ivd_names", []))[::-1]  # official: bottom to top
    fig = {"labels_equal": official.get("labels") == ours.get("labels"),
           "labels": [official.get("labels"), ours.get("labels")],
           "ivd_names_equal": official_discs == ours.get("ivd_names"),
           "ivd_names": [official_discs, ours.get("ivd_names")]}
    for key in ("appearance_volumes", "appearance_probabilities", "context_probabilities"):
        if key in official and key in ours:
            fig[key + "_rel_max_diff"] = _relative(official[key], ours[key])
    # the official disc volumes and logits run bottom to top, ours top to bottom
    if "ivd_volumes" in official and "ivd_volumes" in ours:
        fig["ivd_volumes_rel_max_diff"] = _relative(official["ivd_volumes"][::-1], ours["ivd_volumes"])
        per_disc = [_relative(a, b) for a, b in zip(official["ivd_volumes"][::-1], ours["ivd_volumes"])]
        fig["ivd_volumes_rel_max_diff_per_disc"] = per_disc
        fig["grading_logits_max_abs_diff"] = float(np.abs(official["grading_logits"][::-1]
                                                         - ours["grading_logits"]).max()) \
            if official["grading_logits"].shape == ours["grading_logits"].shape else None
        fig["gradings_equal"] = official.get("gradings") == ours.get("gradings")
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-python", required=True, help="python of the official package's environment")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="case ids to compare")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random official-layout weights")
    parser.add_argument("--stages", choices=("all", "detection", "later"), default="all",
                        help="compare detection, the later stages on identical vertebrae, or both")
    parser.add_argument("--detection-slices", type=at_least(1), default=9,
                        help="compare detection on this many middle slices of each scan (the official-size "
                             "detector takes about 0.3 s per patch on 2 cores)")
    parser.add_argument("--detector", choices=("bundled", "random"), default="bundled",
                        help="detection network for the detection stage: the bundled one (real bodies) or the "
                             "random official-size one (whose random displacement fields assemble no quad)")
    parser.add_argument("--json", help="write all figures here")
    args = parser.parse_args(argv)
    python = official_python(args.official_python)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from SpineNetLib.core.results import Vertebra
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.pipeline import RunOptions, load_networks, run
    from SpineNetLib.training.datasets import list_cases

    cases = {c.case_id: c for c in list_cases(args.data)}
    unknown = [case_id for case_id in args.cases if case_id not in cases]
    if unknown:
        raise InputError(f"no case {', '.join(unknown)} under {args.data}")
    scans = {case_id: load_scan(cases[case_id].path / "image.nii.gz", resample_isotropic=False)
             for case_id in args.cases}
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="spinenet-official-") as tmp:
        weights = write_random_official_weights(Path(tmp) / "weights", args.seed,
                                                calibration_patches(scans[args.cases[0]]))
        networks = load_networks(str(weights), "cpu", with_grading=True)
        bundled = load_networks("bundled", "cpu")
        for case_id, scan in scans.items():
            figures = report.setdefault(case_id, {"shape": list(scan.shape), "spacing": list(scan.spacing_mm[:2])})
            if args.stages in ("all", "detection"):
                middle = middle_slices(scan, args.detection_slices)
                use_bundled = args.detector == "bundled"
                theirs = run_official(python, middle.voxels, middle.spacing_mm[:2], weights,
                                      Path(tmp) / case_id / "det", detection_only=True,
                                      detector_checkpoint=bundled.weights.path("detector") if use_bundled else None)
                ours = run_ours(middle, replace(networks, detector=bundled.detector) if use_bundled else networks,
                                stop_after_detection=True)
                figures["detection"] = detection_figures(theirs["detected"], ours["detected"])
            if args.stages in ("all", "later"):
                found = run(scan, bundled, RunOptions(grade=False, profile="official")).detection.vertebrae
                given = [{"slice_nos": list(v.slices), "polys": [np.asarray(p).tolist() for p in v.polygons]}
                         for v in found]
                theirs = run_official(python, scan.voxels, scan.spacing_mm[:2], weights,
                                      Path(tmp) / case_id / "later", vertebrae=given)
                ours = run_ours(scan, networks, [Vertebra(list(v.slices), [np.asarray(p) for p in v.polygons])
                                                 for v in found])
                figures["later"] = later_stage_figures(theirs, ours)
            print(case_id, json.dumps(figures, default=str), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path (above)

    run_main(main)
