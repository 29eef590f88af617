"""A results folder run into again: it holds the new run's files only, and nothing the project did not write
goes (outputs/files.py::write_results, `spinenet run`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from SpineNetLib import pipeline
from SpineNetLib.apps import cli
from SpineNetLib.outputs.files import write_results
from SpineNetLib.synthetic.phantom import make_phantom

from oracles import oracle_networks


def _listed(folder: Path) -> set[str]:
    """The files result.json lists, with the two CSV files written beside them."""
    manifest = json.loads((folder / "result.json").read_text())
    names = {"result.json", "vertebrae.csv", "discs.csv", manifest["vertebrae"], *manifest["images"],
             *manifest["dicom"], *manifest["hotspots"]}
    return names | ({manifest["discs"]} if manifest["discs"] else set())


def test_a_new_run_leaves_none_of_an_earlier_runs_files_in_the_folder(tmp_path, monkeypatch):
    phantom = make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.0, 1.0), n_slices=5)
    phantom.write_dicom(tmp_path / "dicom")
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    out = tmp_path / "out"
    assert cli.main(["run", str(tmp_path / "dicom"), "-o", str(out), "--quiet", "--dicom-out"]) == 0
    first = {p.name for p in out.iterdir()}
    assert {"preview.png", "segmentation.dcm", "report.dcm", "discs.json"} <= first and first == _listed(out)
    (out / "notes.txt").write_text("the user's own file")
    assert cli.main(["run", str(image), "-o", str(out), "--quiet", "--no-preview"]) == 0
    # only the second run's files, and the user's: no picture, no DICOM result of the first run
    assert {p.name for p in out.iterdir()} == _listed(out) | {"notes.txt"}
    assert not {"preview.png", "segmentation.dcm", "report.dcm"} & _listed(out)


def test_only_result_files_the_earlier_manifest_lists_are_removed(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "hotspots").mkdir(parents=True)
    (out / "sub").mkdir()
    outside.mkdir()
    (out / "linked").symlink_to(outside, target_is_directory=True)
    earlier = ["discs.json", "preview.png", "hotspots.png", "segmentation.dcm", "hotspots/L4-L5_Pfirrmann.nii.gz",
               "hotspots_Herniation.nii.gz", "notes.txt", "linked/hotspots_Herniation.nii.gz",
               "../outside/preview.png", "my_scan.nii.gz", "sub/inner.nii.gz"]
    for name in earlier + ["own.png"]:
        (out / name).write_bytes(b"x")
    (out / "result.json").write_text(json.dumps({
        "schema": "spinenet.result/1", "vertebrae": "vertebrae.json", "discs": "discs.json",
        # a hand-edited manifest may list the user's own images: not names of hotspot maps, so they stay
        "hotspots": ["hotspots/L4-L5_Pfirrmann.nii.gz", "hotspots_Herniation.nii.gz",
                     "linked/hotspots_Herniation.nii.gz", "notes.txt", "my_scan.nii.gz", "sub/inner.nii.gz"],
        "images": ["preview.png", "hotspots.png", "../outside/preview.png", "own.png"],
        "dicom": ["segmentation.dcm", "notes.txt"]}))
    result = SimpleNamespace(vertebrae_document={"schema": "spinenet.vertebrae/1", "vertebrae": []},
                             discs_document=None, hotspots=[])
    write_results(out, result)
    left = {(Path(root) / n).relative_to(tmp_path).as_posix() for root, _, names in os.walk(tmp_path) for n in names}
    # the listed result files of names this writer makes are gone (discs.json too: this run has no discs
    # document); what is no result of its, and what lies outside the folder, stays
    assert left == {"out/result.json", "out/vertebrae.json", "out/vertebrae.csv", "out/discs.csv", "out/notes.txt",
                    "out/own.png", "out/my_scan.nii.gz", "out/sub/inner.nii.gz", "outside/preview.png",
                    "outside/hotspots_Herniation.nii.gz"}
    assert json.loads((out / "result.json").read_text())["discs"] is None
    # a manifest that is no manifest of ours removes nothing
    (out / "result.json").write_text("{not json")
    (out / "discs.json").write_bytes(b"x")
    write_results(out, result)
    assert (out / "discs.json").is_file()
