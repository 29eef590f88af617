"""Run the official SpineNetV2 package's stages on one volume and save what each stage gives.

Runs in the official package's own environment (benchmarks/official/README.md), started by
``compare.py``; it imports from this repository only the torchvision stand-in and the benchmark
scripts' one-line errors (``benchmarks/script_errors.py``).  Started with a python that lacks the
package, it says so in one line (exit status 2).  It
calls the package's public functions, in the order ``SpineNet.detect_vb``,
``get_ivds_from_vert_dicts`` and ``grade_ivds`` call them, so that each stage's output can be
saved:

    python official_runner.py INPUT.npz WEIGHTS_DIR OUTPUT.npz [--vertebrae VERTS.json]

INPUT.npz holds ``volume`` (H, W, S) and ``pixel_spacing`` (row, col).  With ``--vertebrae``
detection is skipped and the given vertebrae (JSON list of {"slice_nos", "polys"}) are labelled
and graded instead, so that the later stages can be compared on identical detections.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_errors import InputError  # noqa: E402  (benchmarks/script_errors.py)


def _load(model, folder: str, key: str):
    path = max(glob.glob(os.path.join(folder, "*.pt")), key=os.path.getctime)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)[key])
    return model.eval()


def _networks(weights: str):
    from spinenet.models.appearance import AppearanceModel
    from spinenet.models.context import ContextModel
    from spinenet.models.grading import GradingModel
    from spinenet.models.vfr import VFRResNetDetector
    def optional(model, name, key):  # a folder without detect-vfr/ or grading/ leaves that stage out
        folder = os.path.join(weights, name)
        return _load(model(), folder, key) if os.path.isdir(folder) else None
    return (optional(VFRResNetDetector, "detect-vfr", "net"),
            _load(AppearanceModel(), os.path.join(weights, "appearance"), "net"),
            _load(ContextModel(), os.path.join(weights, "context"), "net"),
            optional(GradingModel, "grading", "model_weights"))


def _plain(vert_dicts) -> list[dict]:
    keep = ("slice_nos", "polys", "average_polygon", "predicted_label")
    return [{k: np.asarray(v[k]).tolist() if k != "predicted_label" else v[k] for k in keep if k in v}
            for v in vert_dicts]


def _given_vertebrae(path: str) -> list[dict]:
    """Vertebrae as the official grouping stores them: polys per slice and their average."""
    out = []
    for v in json.load(open(path)):
        polys = [np.asarray(p, float) for p in v["polys"]]
        out.append({"slice_nos": list(v["slice_nos"]), "polys": polys,
                    "average_polygon": np.mean(np.stack(polys), axis=0)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="INPUT.npz: volume (H, W, S) and pixel_spacing (row, col)")
    parser.add_argument("weights", help="folder of official-layout checkpoints")
    parser.add_argument("output", help="OUTPUT.npz: what each stage gives")
    parser.add_argument("--vertebrae", help="skip detection: label and grade these vertebrae (JSON)")
    parser.add_argument("--detection-only", action="store_true")
    parser.add_argument("--detector-checkpoint",
                        help="use this repository's detector checkpoint (any size) as the detection network")
    args = parser.parse_args()
    try:
        from spinenet.utils.classification import classify_ivd_v2_resnet
        from spinenet.utils.detect_and_group import detect_and_group
        from spinenet.utils.extract_volumes import extract_volumes
        from spinenet.utils.gen_utils import (format_gradings, get_all_ivd_vol, get_ivd_level_names,
                                              vert_dicts_to_classification_format)
        from spinenet.utils.label_verts import label_verts
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "spinenet":
            raise
        raise InputError(f"{sys.executable} has no official SpineNetV2 package (spinenet 2.1.4): run this in its "
                         "own environment, benchmarks/official/README.md") from None
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    data = np.load(args.input)
    volume, spacing = data["volume"], np.asarray(data["pixel_spacing"], float)
    detector, appearance, context, grading = _networks(args.weights)
    if args.detector_checkpoint:  # SpineNetLib is on the path for the torchvision stand-in anyway
        from SpineNetLib.weights.checkpoints import load_model
        detector = load_model("detector", args.detector_checkpoint)
    saved: dict[str, np.ndarray] = {}

    if args.vertebrae:
        vert_dicts = _given_vertebrae(args.vertebrae)
    else:  # as SpineNet.__init__ and detect_vb set it up (official §5)
        start = time.perf_counter()
        vert_dicts = detect_and_group(detector, volume, remove_excess_black_space=False, pixel_spacing=spacing,
                                      plot_outputs=False, using_resnet=True, corner_threshold=0.6,
                                      centroid_threshold=0.6, group_across_slices_threshold=0.2,
                                      remove_single_slice_detections=True, device="cpu", debug=False)
        saved["detection_seconds"] = np.array(time.perf_counter() - start)
    detected = _plain(vert_dicts)
    if args.detection_only:
        np.savez_compressed(args.output, **saved, result=np.array(json.dumps({"detected": detected})))
        return 0
    vert_dicts = extract_volumes(volume, vert_dicts, pixel_spacing=spacing)
    saved["appearance_volumes"] = np.stack([np.asarray(v["volume"], np.float32) for v in vert_dicts]) \
        if vert_dicts else np.zeros((0, 224, 224, 16), np.float32)
    if len(vert_dicts) > 0:
        labelled, height_map, context_out, centre_features, _ = label_verts(
            vert_dicts, volume, spacing, appearance, context, plot_outputs=False, penalise_skips=True, debug=True)
        saved["appearance_probabilities"] = np.stack([np.asarray(v["appearance_features"]) for v in labelled])
        saved["height_map"] = np.asarray(height_map, np.float32)
        saved["context_probabilities"] = np.asarray(centre_features, np.float64)
        labels = [v["predicted_label"] for v in labelled]
    else:
        labelled, labels = [], []

    ivd_names: list[str] = []
    gradings: dict[str, list[int]] = {}
    if len(labelled) > 1 and grading is not None:
        xs, ys, mids, present, names = vert_dicts_to_classification_format(copy.deepcopy(labelled), volume.shape[-1])
        ivds = get_all_ivd_vol(volume, xs, ys, mids, present, (9, 112, 224), pixel_spacing=spacing)
        saved["ivd_volumes"] = np.asarray(ivds, np.float32)
        ivd_names = get_ivd_level_names(names)
        with torch.no_grad():
            saved["grading_logits"] = np.stack([
                np.concatenate([o.squeeze(0).numpy() for o in grading(torch.tensor(ivd)[None, None].float())])
                for ivd in ivds])
        table = format_gradings(classify_ivd_v2_resnet(grading, list(ivds), "cpu"), list(ivd_names))
        gradings = {str(level): [int(x) for x in row] for level, row in zip(table.index, table.values)}
    np.savez_compressed(args.output, **saved, result=np.array(json.dumps({
        "detected": detected, "labels": labels, "ivd_names": list(ivd_names), "gradings": gradings})))
    return 0


if __name__ == "__main__":
    from script_errors import run_main

    run_main(main)
