"""The worker process protocol and the batch script, run as real subprocesses.

To test the protocol with exact expectations, the networks are replaced through the
documented ``--pipeline FILE.py:FUNCTION`` hook by Testing/Python/slicer_fake_pipeline.py,
which returns phantom ground truth.  The default pipeline is run up to the
point where it needs weights (a clear one-line error).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from SpineNetLib.outputs import documents
from SpineNetLib.apps import worker
from SpineNetLib.synthetic.phantom import make_phantom
from SpineNetLib.training.datasets import default_data_root

REPO = Path(__file__).resolve().parents[2]
from batch_script import BATCH_SCRIPT as BATCH, batch_script  # noqa: E402
from slicer_fake_pipeline import PIPELINE_SPEC as FAKE  # noqa: E402


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.9, 1.9), n_slices=7)


@pytest.fixture(scope="module")
def inputs(phantom, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    npy, geometry = worker.write_volume(folder / "input", phantom.voxels_kji, phantom.ijk_to_ras, {"path": "phantom"})
    doc_path = folder / "vertebrae_truth.json"
    doc_path.write_text(json.dumps(documents.vertebrae_document_from_truth(phantom.scan, phantom.vertebrae)))
    return {"folder": folder, "npy": npy, "geometry": geometry, "doc": doc_path}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _worker(args, timeout=120):
    return subprocess.run([sys.executable, "-m", "SpineNetLib.apps.worker", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- protocol

def test_parse_line():
    m = worker.parse_line("PROGRESS 3 17 detecting vertebrae\n")
    assert (m.kind, m.done, m.total, m.text) == ("PROGRESS", 3, 17, "detecting vertebrae")
    assert worker.parse_line("PROGRESS 0 1").text == ""
    assert worker.parse_line("RESULT /tmp/a b/result.json").text == "/tmp/a b/result.json"
    assert worker.parse_line("ERROR no weights in x").kind == "ERROR"
    assert worker.parse_line("WARNING grading unavailable").text == "grading unavailable"
    assert worker.parse_line("PROGRESS x y z").kind == "TEXT"
    assert worker.parse_line("loading torch").kind == "TEXT"
    assert worker.format_progress(2, 5, "a\nb  c") == "PROGRESS 2 5 a b c"


def test_worker_arguments_round_trip():
    args = worker.worker_arguments("v.npy", "out", geometry="v.json", weights="/w", device="cpu", grading=False,
                                   hotspot_head="Herniation", pipeline="m:f", options={"steps": 2})
    parsed = worker.build_parser().parse_args(args)
    assert (parsed.input, parsed.geometry, parsed.output, parsed.weights, parsed.device) == ("v.npy", "v.json", "out", "/w", "cpu")
    assert parsed.grading is False and parsed.hotspot_head == "Herniation"
    assert parsed.pipeline == "m:f" and parsed.option == ["steps=2"]
    assert parsed.precision == "fp32"
    bf16 = worker.build_parser().parse_args(worker.worker_arguments("v.npy", "out", precision="bf16"))
    assert bf16.precision == "bf16" and _batch_parser().parse_args(
        ["--input", "v", "--output", "o", "--precision", "bf16"]).precision == "bf16"
    assert parsed.runtime == "torch" and "--runtime" not in args
    ov = worker.build_parser().parse_args(worker.worker_arguments("v.npy", "out", runtime="openvino"))
    assert ov.runtime == "openvino" and worker._options(ov)["runtime"] == "openvino"
    assert _batch_parser().parse_args(["--input", "v", "--output", "o", "--runtime", "openvino"]).runtime == "openvino"
    # the scan's weighting (only T2-weighted scans are graded): from the scan unless given
    assert parsed.sequence is None and "--sequence" not in args and worker._options(parsed)["sequence"] is None
    t2 = worker.build_parser().parse_args(worker.worker_arguments("v.npy", "out", sequence="T2"))
    assert worker._options(t2)["sequence"] == "T2"
    assert _batch_parser().parse_args(["--input", "v", "--output", "o", "--sequence", "T2"]).sequence == "T2"
    # the exam's other series, each with its geometry, in order
    assert parsed.other_series == parsed.other_geometry == [] and "--other-series" not in args
    two = worker.build_parser().parse_args(worker.worker_arguments(
        "v.npy", "out", other_series=[("t1.npy", "t1.json"), ("stir.npy", "stir.json")]))
    assert (two.other_series, two.other_geometry) == (["t1.npy", "stir.npy"], ["t1.json", "stir.json"])


def _batch_parser():
    return batch_script().build_parser()


def test_hotspots_are_opt_in_for_the_worker_and_the_batch_script(monkeypatch):
    """No hotspot maps unless a head is named (a map takes minutes on a CPU), as with `spinenet run`."""
    from SpineNetLib import pipeline

    assert worker.build_parser().parse_args(["--input", "v", "--output", "o"]).hotspot_head is None
    assert _batch_parser().parse_args(["--input", "v", "--output", "o"]).hotspot_head is None
    assert _batch_parser().parse_args(["--input", "v", "--output", "o", "--hotspot-head", "Herniation"]).hotspot_head \
        == "Herniation"
    for none in (None, "", "none", "None"):
        assert worker.hotspot_head_option(none) is None
        assert "--hotspot-head" not in worker.worker_arguments("v.npy", "out", hotspot_head=none)
    assert worker.hotspot_head_option(" Pfirrmann ") == "Pfirrmann"

    seen = []
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: type("N", (), {"load_seconds": 0.0})())
    monkeypatch.setattr(pipeline, "run", lambda scan, networks, options, progress=None: seen.append(options))
    for head, heads in ((None, []), ("none", []), ("Herniation", ["Herniation"])):
        worker.run_pipeline(None, {"grading": True, "hotspot_head": head}, lambda *a: None)
        assert seen[-1].hotspot_heads == heads and seen[-1].grade is True


def test_worker_runs_and_reports(phantom, inputs, tmp_path):
    out = tmp_path / "results"
    proc = _worker(["--input", str(inputs["npy"]), "--geometry", str(inputs["geometry"]), "--output", str(out),
                    "--pipeline", FAKE, "--option", f"vertebrae={inputs['doc']}", "--option", "hotspot=L4-L5:Pfirrmann"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    kinds = [worker.parse_line(line).kind for line in lines]
    assert kinds == ["PROGRESS", "PROGRESS", "PROGRESS", "PROGRESS", "WARNING", "RESULT"], lines
    assert lines[0] == "PROGRESS 0 1 reading the scan"
    assert lines[1:4] == [f"PROGRESS {n} 3 fake detection" for n in (1, 2, 3)]
    manifest = Path(worker.parse_line(lines[-1]).text)
    assert manifest == (out / "result.json").resolve()
    assert json.loads(manifest.read_text())["hotspots"] == ["hotspots/L4-L5_Pfirrmann.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["discs.csv", "hotspots", "hotspots.png", "preview.png", "result.json",
                                                     "vertebrae.csv", "vertebrae.json"]
    vertebrae, discs, folder = documents.read_result(manifest)
    assert discs is None and [v["level"] for v in vertebrae["vertebrae"]] == phantom.levels
    # the voxels and IJK-to-RAS reached scan_from_array unchanged
    check = vertebrae["input_check"]
    assert tuple(check["shape"]) == phantom.scan.shape
    np.testing.assert_allclose(check["canonical_to_ras"], phantom.scan.canonical_to_ras, atol=1e-9)
    np.testing.assert_allclose(check["input_ijk_to_ras"], phantom.ijk_to_ras, atol=1e-9)
    assert documents.hotspot_files(folder, "L4-L5", "Pfirrmann")[0].name == "L4-L5_Pfirrmann.nii.gz"


@pytest.mark.parametrize("extra, message", [
    (["--option", "fail=the scan is axial"], "ERROR the scan is axial"),
    (["--pipeline", "no_such_module_xyz:run"], "ERROR cannot import pipeline module 'no_such_module_xyz'"),
    (["--option", "novalue"], "ERROR --option must be KEY=VALUE"),
    (["--other-series", "other.npy"], "ERROR each --other-series needs its --other-geometry"),
])
def test_worker_errors_are_one_line(inputs, tmp_path, extra, message):
    args = ["--input", str(inputs["npy"]), "--geometry", str(inputs["geometry"]), "--output", str(tmp_path / "o"),
            "--pipeline", FAKE, "--option", f"vertebrae={inputs['doc']}", *extra]
    proc = _worker(args)
    assert proc.returncode == 2
    last = proc.stdout.splitlines()[-1]
    assert last.startswith(message), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "o" / "result.json").exists()


def test_worker_usage_errors(inputs, tmp_path):
    proc = _worker(["--output", str(tmp_path)])
    assert proc.returncode == 2 and proc.stdout.startswith("ERROR the following arguments are required: --input")
    proc = _worker(["--input", str(inputs["npy"]), "--output", str(tmp_path), "--pipeline", FAKE])
    assert proc.returncode == 2 and proc.stdout.splitlines()[-1] == "ERROR volume.npy needs --geometry with its IJK-to-RAS matrix"


def test_default_pipeline_reports_missing_weights(inputs, tmp_path):
    """The real pipeline path: the scan is read, then loading the weights fails with one line."""
    proc = _worker(["--input", str(inputs["npy"]), "--geometry", str(inputs["geometry"]), "--output", str(tmp_path),
                    "--weights", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == f"ERROR weights folder not found: {tmp_path / 'nowhere'}"


def test_default_pipeline_with_small_random_networks(inputs, tmp_path):
    """The real pipeline end to end with untrained small networks (the mechanics, not the accuracy)."""
    import torch

    from SpineNetLib.weights import checkpoints
    from SpineNetLib.models import DetectorConfig

    torch.manual_seed(0)
    weights = tmp_path / "weights"
    weights.mkdir()
    for kind, config in (("detector", DetectorConfig(blocks=(1, 1, 1, 1), base_width=4)), ("appearance", None),
                         ("context", None)):
        checkpoints.save_checkpoint(weights / f"{kind}.pt", kind, checkpoints.build_model(kind, config), config=config)
    out = tmp_path / "results"
    proc = _worker(["--input", str(inputs["npy"]), "--geometry", str(inputs["geometry"]), "--output", str(out),
                    "--weights", str(weights), "--device", "cpu"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    messages = [worker.parse_line(line) for line in proc.stdout.splitlines()]
    assert {m.kind for m in messages} == {"PROGRESS", "WARNING", "RESULT"}
    texts = [m.text for m in messages if m.kind == "PROGRESS"]
    assert texts[:2] == ["reading the scan", "loading networks"] and "detecting vertebrae" in texts
    warnings = [m.text for m in messages if m.kind == "WARNING"]
    # random networks find nothing, and say why; these weights have no grading network
    assert len(warnings) == 2 and warnings[0].startswith("no vertebra was found")
    assert warnings[1].endswith("disc measurements only, no grades")
    vertebrae, discs, _ = documents.read_result(messages[-1].text)
    assert vertebrae["schema"] == documents.VERTEBRAE_SCHEMA
    # Untrained networks find no vertebrae, so there are no discs, but the disc document is there.
    assert discs is not None and discs["schema"] == documents.DISCS_SCHEMA and discs["grading"]["status"] != "done"
    assert "load_networks" in vertebrae["timings_s"] and "total" in vertebrae["timings_s"]


def test_worker_can_be_killed(inputs, tmp_path):
    out = tmp_path / "results"
    args = ["--input", str(inputs["npy"]), "--geometry", str(inputs["geometry"]), "--output", str(out),
            "--pipeline", FAKE, "--option", f"vertebrae={inputs['doc']}", "--option", "steps=50", "--option", "delay=0.2"]
    proc = subprocess.Popen([sys.executable, "-m", "SpineNetLib.apps.worker", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if line.startswith("PROGRESS 1 50"):
                break
        assert seen[-1].startswith("PROGRESS 1 50 fake detection"), seen
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode != 0
    assert not (out / "result.json").exists()


# --------------------------------------------------------------------------- serving mode

@contextlib.contextmanager
def _served():
    """A served worker that has said READY; at the end its input is closed, and it must end with status 0."""
    proc = subprocess.Popen([sys.executable, "-m", "SpineNetLib.apps.worker", worker.SERVE_ARGUMENT], cwd=REPO,
                            env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, bufsize=1)
    try:
        assert proc.stdout.readline() == "READY \n"
        yield proc
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def _ask(proc, request):
    """Send one request line; the answer's lines up to and with END."""
    proc.stdin.write((request if isinstance(request, str) else json.dumps(request)) + "\n")
    proc.stdin.flush()
    lines = []
    while not lines or not lines[-1].startswith("END"):
        line = proc.stdout.readline()
        assert line, f"the served worker ended: {lines}"
        lines.append(line.rstrip("\n"))
    return lines


def _without_timings(folder):
    doc = json.loads((folder / "vertebrae.json").read_text())
    doc.pop("timings_s")
    return json.dumps(doc).replace(str(folder), "<out>")


def test_served_worker_answers_runs_one_after_another(inputs, tmp_path):
    """One process, many runs: each answered as the worker process answers it, then END <status>; bad
    requests and failed runs are answered too, and the process goes on until its input ends."""
    with _served() as proc:
        fake = ["--input", str(inputs["npy"]), "--geometry", str(inputs["geometry"]), "--pipeline", FAKE,
                "--option", f"vertebrae={inputs['doc']}"]
        first = _ask(proc, fake + ["--output", str(tmp_path / "a")])
        assert [worker.parse_line(line).kind for line in first] == ["PROGRESS"] * 4 + ["WARNING", "RESULT", "END"], first
        assert first[-1] == "END 0" and Path(first[-2][len("RESULT "):]) == (tmp_path / "a" / "result.json").resolve()
        assert _ask(proc, "not json") == [
            "ERROR a request must be a JSON list of worker arguments (Expecting value: line 1 column 1 (char 0))",
            "END 2"]
        assert _ask(proc, '{"input": "x"}')[-1] == "END 2"
        assert _ask(proc, ["--output", str(tmp_path)]) == [
            "ERROR the following arguments are required: --input", "END 2"]
        failed = _ask(proc, fake + ["--output", str(tmp_path / "b"), "--option", "fail=the scan is axial"])
        assert failed[-2:] == ["ERROR the scan is axial", "END 2"] and not (tmp_path / "b" / "result.json").exists()
        again = _ask(proc, fake + ["--output", str(tmp_path / "c")])
        assert again[-1] == "END 0" and _without_timings(tmp_path / "c") == _without_timings(tmp_path / "a")


REAL_SCAN = default_data_root() / "myosegmentum" / "myo_01" / "image.nii.gz"


@pytest.mark.skipif(not REAL_SCAN.is_file(), reason="../shared/data (real MRI) is not present")
def test_served_worker_keeps_the_bundled_networks_and_gives_the_same_results(tmp_path):
    """A real scan twice through one served worker (the Slicer module's default), with the bundled
    networks: the results of a worker process of its own, byte for byte but the timings; the second run
    loads no networks (they stay loaded from the first, or from the start)."""
    alone = _worker(["--input", str(REAL_SCAN), "--output", str(tmp_path / "alone"), "--no-preview"], timeout=300)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    with _served() as proc:
        for name in ("first", "second"):
            answer = _ask(proc, ["--input", str(REAL_SCAN), "--output", str(tmp_path / name), "--no-preview"])
            assert answer[-1] == "END 0", answer
            assert _without_timings(tmp_path / name) == _without_timings(tmp_path / "alone")
            assert (tmp_path / name / "discs.csv").read_bytes() == (tmp_path / "alone" / "discs.csv").read_bytes()
            timings = json.loads((tmp_path / name / "vertebrae.json").read_text())["timings_s"]
            assert timings["load_networks"] == 0.0   # loaded before READY, as the panel asks by default


def test_served_networks_are_loaded_again_when_their_files_or_settings_change(tmp_path):
    """The networks kept by a served worker are those of the same files and settings only."""
    import shutil

    from SpineNetLib.weights.resolve import BUNDLED_DIR

    folder = tmp_path / "weights"
    shutil.copytree(BUNDLED_DIR, folder)
    settings = worker.network_settings({"weights": str(folder)})
    key = worker.networks_key(settings)
    assert worker.networks_key(dict(settings)) == key
    assert worker.networks_key({**settings, "precision": "bf16"}) != key
    assert worker.networks_key({**settings, "with_grading": False}) != key
    loaded, loads = worker.LoadedNetworks(), []
    assert loaded.get(key, lambda: loads.append(1) or "A") == ("A", False)
    assert loaded.get(key, lambda: loads.append(1) or "B") == ("A", True) and loads == [1]
    os.utime(folder / "context.pt", ns=(1, 1))             # a checkpoint replaced in the folder
    changed = worker.networks_key(settings)
    assert changed != key and loaded.get(changed, lambda: "C") == ("C", False)


# --------------------------------------------------------------------------- batch

def test_batch_script_on_a_dicom_folder(phantom, inputs, tmp_path):
    from SpineNetLib.slicer import mrml

    dicom = tmp_path / "dicom"
    phantom.write_dicom(dicom)
    out = tmp_path / "out"
    # a labelling the pipeline was unsure of: the batch script says so
    doc = json.loads(Path(inputs["doc"]).read_text())
    doc["labelling"] = {"confidence": 0.62, "margin_nats": 0.49, "needs_review": True, "s1_found": True,
                        "warnings": ["levels may be shifted by one (confidence 0.62): the next best labelling "
                                     "calls the lowest body L5 instead of S1"]}
    unsure = tmp_path / "unsure.json"
    unsure.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, str(BATCH), "--input", str(dicom), "--output", str(out), "--quiet",
                           "--pipeline", FAKE, "--option", f"vertebrae={unsure}",
                           "--option", "hotspot=L4-L5:Pfirrmann"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("7 vertebrae (T12..S1) in ")
    assert proc.stdout.splitlines()[1] == ("CHECK THE LEVELS: Levels may be shifted by one (confidence 0.62): the next "
                                           "best labelling calls the lowest body L5 instead of S1.")
    assert (out / "vertebrae.csv").read_text().splitlines()[1].endswith(
        ",0.620000,0.490,true,true,levels may be shifted by one (confidence 0.62): the next best labelling "
        "calls the lowest body L5 instead of S1")
    assert sorted(p.name for p in out.iterdir()) == ["discs.csv", "hotspots", "hotspots.png", "preview.png",
                                                     "result.json", "scene.mrb", "vertebrae.csv", "vertebrae.json"]
    assert (out / "vertebrae.csv").read_text().splitlines()[0].startswith("level,centroid_R_mm")
    assert (out / "discs.csv").read_text().splitlines()[1].startswith("T12-L1,")
    vertebrae, _, _ = documents.read_result(out)
    # the DICOM series was read as the same scan the pipeline saw
    assert tuple(vertebrae["input_check"]["shape"]) == phantom.scan.shape
    np.testing.assert_allclose(vertebrae["input_check"]["canonical_to_ras"], phantom.scan.canonical_to_ras, atol=1e-3)

    scene = mrml.load_mrb(out / "scene.mrb")
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsClosedCurveNode") == 7
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2   # the scan and one hotspot map
    curves = [scene.GetNthNodeByClass(n, "vtkMRMLMarkupsClosedCurveNode") for n in range(7)]
    (curve,) = [c for c in curves if c.GetName().endswith(" SpineNet L3")]
    points = np.array([curve.GetNthControlPointPositionVector(n) for n in range(4)])
    expected = documents.mid_polygon(vertebrae["vertebrae"][3])["corners_ras"]
    np.testing.assert_allclose(points, expected, atol=1e-3)
    volume = curve.GetNodeReference(mrml.SOURCE_REFERENCE)
    assert curve.GetName() == volume.GetName() + " SpineNet L3"      # named after the scan
    scan = mrml.scan_from_volume_node(volume)
    np.testing.assert_allclose(scan.voxels, phantom.scan.voxels)
    segmentation = mrml.result_nodes(scene, volume, "segmentation")[0]
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 13
    assert len(mrml.result_nodes(scene, volume, "hotspot")) == 1

    # a rerun into the same folder without a scene leaves no scene of the earlier run behind; the series given
    # as a ZIP archive is read as its folder is
    import shutil

    exam = shutil.make_archive(str(tmp_path / "exam"), "zip", dicom)
    proc = subprocess.run([sys.executable, str(BATCH), "--input", exam, "--output", str(out), "--quiet",
                           "--pipeline", FAKE, "--option", f"vertebrae={unsure}", "--no-scene", "--no-preview"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["discs.csv", "result.json", "vertebrae.csv", "vertebrae.json"]
    again, _, _ = documents.read_result(out)
    assert again["input_check"] == vertebrae["input_check"]


@pytest.mark.parametrize("args, message", [
    (["--input", "/no/such/folder", "--output", "OUT"], "SpineNetBatch: error: no such file or folder: /no/such/folder"),
    (["--output", "OUT"], "SpineNetBatch: error: the following arguments are required: --input"),
    (["--input", "IN", "--output", ""], "SpineNetBatch: error: --output needs a folder: an empty one would write"),
    (["--input", "IN", "--output", "OUT", "--sequence", "T3"], "SpineNetBatch: error: unknown --sequence 'T3'"),
])
def test_batch_script_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "in.nii.gz").write_bytes(b"")
    args = [a.replace("OUT", str(tmp_path / "out")).replace("IN", str(tmp_path / "in.nii.gz")) for a in args]
    proc = subprocess.run([sys.executable, str(BATCH), *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_batch_scene_holds_the_users_thin_slices_not_the_slabs(tmp_path):
    """A 1 mm scan is detected on ~4 mm slabs, but the scene and the documents keep the user's grid (issue 14)."""
    from SpineNetLib.slicer import mrml

    thin = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.4, 1.4), n_slices=13,
                        slice_thickness_mm=1.0)   # near-isotropic thin slices: detected on slabs
    image = thin.write_nifti(tmp_path / "thin.nii.gz")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BATCH), "--input", str(image), "--output", str(out), "--quiet",
                           "--no-preview", "--no-grading", "--device", "cpu"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    vertebrae, _, _ = documents.read_result(out)
    assert tuple(vertebrae["scan"]["shape"]) == tuple(thin.voxels_kji.shape[::-1])   # 13 native slices
    assert any(len(v["polygons"]) > 0 for v in vertebrae["vertebrae"])
    scene = mrml.load_mrb(out / "scene.mrb")
    volumes = [scene.GetNthNodeByClass(n, "vtkMRMLScalarVolumeNode")
               for n in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    assert len(volumes) == 1
    shown = mrml.volume_arrays(volumes[0])[0]
    assert sorted(shown.shape) == sorted(thin.voxels_kji.shape)       # every native slice, no slabs
    np.testing.assert_allclose(np.sort(shown, axis=None), np.sort(thin.voxels_kji.astype(np.float32), axis=None),
                               rtol=1e-5)                              # the user's own voxel values
