"""The `spinenet run` command: result files on a phantom, and one-line errors on bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from SpineNetLib.apps import cli
from SpineNetLib import pipeline
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.synthetic.phantom import make_phantom

from oracles import ground_truth_centroid_ras, oracle_networks

ROOT = Path(__file__).resolve().parents[2]


def check_vertebrae_schema(doc: dict) -> None:
    """Structural check of a ``spinenet.vertebrae/1`` document."""
    assert doc["schema"] == "spinenet.vertebrae/1"
    assert isinstance(doc["input"], dict)
    scan = doc["scan"]
    assert len(scan["shape"]) == 3 and all(isinstance(n, int) for n in scan["shape"])
    assert len(scan["spacing_mm"]) == 3
    assert np.asarray(scan["ijk_to_ras"]).shape == (4, 4)
    assert isinstance(doc["timings_s"], dict)
    for v in doc["vertebrae"]:
        assert isinstance(v["level"], str)
        assert abs(sum(v["level_probabilities"].values()) - 1) < 0.01
        assert len(v["centroid_ras"]) == 3
        assert v["polygons"], "every vertebra has at least one polygon"
        for p in v["polygons"]:
            assert isinstance(p["slice"], int) and 0 <= p["slice"] < scan["shape"][scan["slice_axis"]]
            assert np.asarray(p["corners_ras"]).shape == (4, 3)


@pytest.mark.parametrize("reverse_slices", [False, True])
def test_run_writes_files_that_land_on_the_phantom_vertebrae(tmp_path, monkeypatch, reverse_slices):
    phantom = make_phantom(fov="lumbar", pixel_spacing=(0.6, 0.7), shape=(448, 400), n_slices=9,
                           rotation_deg=8.0, reverse_slices=reverse_slices, seed=3)
    dicom = tmp_path / "dicom"
    phantom.write_dicom(dicom, shuffle_files=True, shuffle_instance_numbers=True, rescale_slope=0.5)
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    out = tmp_path / "out"
    assert cli.main(["run", str(dicom), "-o", str(out), "--quiet"]) == 0

    doc = json.loads((out / "vertebrae.json").read_text())
    check_vertebrae_schema(doc)
    truth = [v for v in phantom.vertebrae if not v.extra]
    assert [v["level"] for v in doc["vertebrae"]] == [v.level for v in truth]
    # DICOM slices are ordered along the slice normal, whatever order the phantom wrote them in,
    # so the input's own slice index is the loaded series' one; the canonical frame is the phantom's.
    loaded = load_scan(dicom)
    assert np.allclose(loaded.canonical_to_ras, phantom.scan.canonical_to_ras, atol=1e-3)
    assert np.allclose(doc["scan"]["ijk_to_ras"], loaded.input_ijk_to_ras, atol=1e-3)
    pixel = min(phantom.scan.spacing_mm[:2])
    for found, gt in zip(doc["vertebrae"], truth):
        assert np.linalg.norm(np.subtract(found["centroid_ras"], ground_truth_centroid_ras(phantom, gt))) < pixel
        # Every slice index is the input's own index, and each polygon sits on the true corners.
        expected_slices = sorted(loaded.input_slice_index(s) for s in gt.slices)
        assert [p["slice"] for p in found["polygons"]] == expected_slices
        by_input_slice = {loaded.input_slice_index(s): s for s in gt.slices}
        for p in found["polygons"]:
            s = by_input_slice[p["slice"]]
            true_ras = phantom.scan.xy_to_ras(gt.quads[s], s)
            assert np.abs(np.asarray(p["corners_ras"]) - true_ras).max() < pixel
            # The slice index really is the input voxel's k: map RAS back to input IJK.
            ijk = np.linalg.inv(loaded.input_ijk_to_ras) @ np.append(np.asarray(p["corners_ras"][0]), 1.0)
            assert round(ijk[2]) == p["slice"]

    rows = list(csv.DictReader((out / "vertebrae.csv").open()))
    assert [r["level"] for r in rows] == [v.level for v in truth]
    assert list(rows[0]) == ["level", "centroid_R_mm", "centroid_A_mm", "centroid_S_mm",
                             "first_slice", "last_slice", "level_probability", "next_best_level", "outline_from",
                             "labelling_confidence", "labelling_margin_nats", "s1_found", "levels_need_review",
                             "labelling_warning"]
    assert float(rows[0]["level_probability"]) > 0.9
    assert {r["next_best_level"] for r in rows} == {""}             # no review asked: no alternative
    assert {r["outline_from"] for r in rows} == {"detector"}        # every body seen at full strength
    # the oracle is sure of every level (this phantom reaches down to S1): nothing to review
    assert truth[-1].level == "S1"
    # The phantom's image ends a few mm below S1: said in a note, which asks for no review.
    edge_note = doc["labelling"]["warnings"]
    assert len(edge_note) == 1 and edge_note[0].startswith("the body named S1 ends ") and "not L5" in edge_note[0]
    assert {(r["labelling_confidence"], r["s1_found"], r["levels_need_review"], r["labelling_warning"])
            for r in rows} == {("1.000000", "true", "false", edge_note[0])}
    assert doc["labelling"]["needs_review"] is False and doc["labelling"]["s1_at_image_edge"] is True
    assert doc["warnings"] == edge_note
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_no_output_is_left_when_the_pipeline_fails(tmp_path, monkeypatch):
    phantom = make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.0, 1.0), n_slices=5)
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in the middle of the run")

    monkeypatch.setattr(pipeline, "detect_and_label", broken)
    out = tmp_path / "out"
    assert cli.main(["run", str(image), "-o", str(out), "--quiet"]) == 1
    assert not out.exists() or not any(out.iterdir())


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SpineNetLib", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp / "empty"
    empty.mkdir()
    not_dicom = tmp / "notdicom"
    not_dicom.mkdir()
    (not_dicom / "readme.txt").write_text("hello")
    corrupt = tmp / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a nifti file")
    axial = make_phantom(fov="lumbar", shape=(64, 64), pixel_spacing=(1.0, 1.0), n_slices=4)
    # Write the phantom's array with an axial geometry (slice normal along S-I).
    axial_affine = np.diag([1.0, 1.0, 4.0, 1.0])
    from SpineNetLib.inputs.writers import write_dicom_series
    axial_dir = tmp / "axial"
    write_dicom_series(axial.voxels_kji, axial_affine, axial_dir)
    return {
        "missing path": (tmp / "does-not-exist", "no such file"),
        "empty folder": (empty, "empty"),
        "no DICOM": (not_dicom, "DICOM"),
        "corrupt file": (corrupt, "corrupt.nii.gz"),
        "axial scan": (axial_dir, "axial"),
    }


def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path):
    for name, (path, words) in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = _run_cli("run", str(path), "-o", str(out))
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spinenet: error: "), (name, result.stderr)
        assert words.lower() in lines[0].lower(), (name, lines[0])
        assert "Traceback" not in result.stderr
        assert not out.exists(), name


def test_missing_weights_folder_is_a_one_line_error(tmp_path):
    phantom = make_phantom(fov="lumbar", shape=(128, 128), pixel_spacing=(2.0, 2.0), n_slices=4)
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    result = _run_cli("run", str(image), "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("spinenet: error: weights folder not found")
    assert not (tmp_path / "out").exists()


def test_bad_overrides_are_refused(tmp_path):
    result = _run_cli("run", str(tmp_path), "-o", str(tmp_path / "o"), "--pixel-spacing", "0", "1")
    assert result.returncode == 2 and "pixel-spacing" in result.stderr


def test_run_writes_hotspot_maps_in_the_input_space(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from SpineNetLib.weights.checkpoints import load_model

    phantom = make_phantom(fov="lumbar", shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9,
                           pathology={"L3": ["endplate_notch"]}, seed=5)
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    networks = oracle_networks(phantom)
    networks.grading = load_model("grading", ROOT / "Testing" / "Data" / "grader_notch" / "grading.pt")
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: networks)
    out = tmp_path / "out"
    assert cli.main(["run", str(image), "-o", str(out), "--quiet", "--hotspots", "LowerEndplateDefect",
                     "--hotspot-augmentations", "2"]) == 0
    heat = sitk.ReadImage(str(out / "hotspots_LowerEndplateDefect.nii.gz"))
    source = sitk.ReadImage(str(image))
    assert heat.GetSize() == source.GetSize()
    assert np.allclose(heat.GetDirection(), source.GetDirection()) and np.allclose(heat.GetOrigin(), source.GetOrigin())
    values = sitk.GetArrayFromImage(heat)
    assert np.isfinite(values).all() and values.max() > 0 and values.min() >= 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no staging folder left"
    discs = json.loads((out / "discs.json").read_text())
    assert discs["discs"][0]["grades"], "graded with the fixture grader"
    # --hotspot-precision fp32: the map "auto" wrote (bfloat16 where the CPU has it) up to rounding
    assert cli.main(["run", str(image), "-o", str(tmp_path / "fp32"), "--quiet", "--hotspots",
                     "LowerEndplateDefect", "--hotspot-augmentations", "2", "--hotspot-precision", "fp32"]) == 0
    fp32 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "fp32" / "hotspots_LowerEndplateDefect.nii.gz")))
    assert np.corrcoef(fp32.ravel(), values.ravel())[0, 1] > 0.99


def test_unknown_hotspot_head_is_refused_before_any_work(tmp_path):
    result = _run_cli("run", str(tmp_path), "-o", str(tmp_path / "o"), "--hotspots", "Bogus")
    assert result.returncode == 2 and "--hotspots" in result.stderr
    assert not (tmp_path / "o").exists()


def test_version_is_printed_and_matches_the_package(capsys):
    import SpineNetLib

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"spinenet {SpineNetLib.__version__}"


def test_the_command_as_a_process_returns_mains_status_and_freezes_only_there(tmp_path, monkeypatch, capsys):
    """``spinenet`` and ``python -m SpineNetLib`` run cli.command_line: cli.program (main, then gc.freeze before
    the exit), then the process's exit; main alone, as Slicer or a notebook calls it, freezes nothing."""
    import gc
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["spinenet"] == "SpineNetLib.apps.cli:command_line"
    assert (Path(cli.__file__).parents[1] / "__main__.py").read_text().strip().endswith("command_line()")
    gc.unfreeze()
    words = ["run", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "out")]
    assert cli.main(words) == 2 and gc.get_freeze_count() == 0
    monkeypatch.setattr(sys, "argv", ["spinenet", *words])
    tuned = []
    from SpineNetLib.core import process

    monkeypatch.setattr(process, "keep_freed_memory_for_reuse", lambda: tuned.append(True))
    monkeypatch.setattr(process, "spin_briefly_in_openmp", lambda: tuned.append("openmp"))
    thresholds = gc.get_threshold()
    interrupt_handler = signal.getsignal(signal.SIGINT)
    try:
        assert cli.program() == 2 and gc.get_freeze_count() > 0 and gc.get_threshold()[0] == 20_000
        assert tuned == [True, "openmp"]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN    # main is done: Ctrl-C no longer stops the exit
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        signal.signal(signal.SIGINT, interrupt_handler)
    assert "spinenet: error:" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_command_keeps_freed_memory_for_the_next_block_unless_the_user_tuned_malloc(monkeypatch):
    """After core.process.keep_freed_memory_for_reuse (spinenet, the Slicer worker), a freed 32 MB block is
    reused without new page faults; a user's own MALLOC_* setting is left alone, also for child processes."""
    probe = ("import resource, sys, numpy as np\n"
             "from SpineNetLib.core.process import keep_freed_memory_for_reuse\n"
             "tuned = keep_freed_memory_for_reuse() if sys.argv[1] == 'tune' else False\n"
             "def faults():\n"
             "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "    block = np.ones(32 << 17)\n"
             "    del block\n"
             "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
             "faults()\n"
             "print(tuned, faults())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def run(mode, extra=None):
        done = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True,
                              env={**env, **(extra or {})})
        tuned, faults = done.stdout.split()
        return tuned == "True", int(faults)

    tuned, faults_tuned = run("tune")
    untuned, faults_untuned = run("leave")
    assert tuned and not untuned and faults_tuned * 4 < faults_untuned
    assert run("tune", {"MALLOC_ARENA_MAX": "2"})[0] is False
    from SpineNetLib.core import process

    for name in [n for n in os.environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    dask_like = {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    assert process.environment_keeping_freed_memory(dask_like) == {
        "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(process.MALLOC_HEAP_BYTES),
        "MALLOC_TRIM_THRESHOLD_": str(process.MALLOC_HEAP_BYTES)}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert process.environment_keeping_freed_memory(dask_like) == dask_like


def _openmp_spin_count(script: str, environ: dict[str, str]) -> int:
    """How many times libgomp's idle threads spin before they sleep, as it reports it (``OMP_DISPLAY_ENV``)
    when torch loads it in ``python -c script``: 0 when they wait passively, 300000 by default."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**environ, "OMP_DISPLAY_ENV": "verbose"})
    counts = [line.split("=", 1)[1].strip().strip("'") for line in done.stderr.splitlines()
              if line.strip().startswith("GOMP_SPINCOUNT")]
    assert counts, done.stderr[-500:]
    return int(counts[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp, the OpenMP of torch's Linux wheels")
def test_the_command_lets_idle_openmp_threads_sleep_soon_unless_the_user_chose(monkeypatch):
    """The spinenet process and the Slicer worker (run_as_process) load torch with OpenMP's idle threads
    spinning 3000 times, not libgomp's 300000, before they sleep: spinning threads took the cores from a
    second run (benchmarks/bench_busy_machine.py).  libgomp itself says how long its threads spin.  A
    user's own setting stays; a process that imported torch first is not changed; a local Dask worker's
    environment gets the setting unless the user chose."""
    from SpineNetLib.core import process

    environ = {k: v for k, v in os.environ.items() if k not in process.OPENMP_WAIT_VARIABLES}
    as_command = ("from SpineNetLib.core.process import run_as_process\n"
                  "run_as_process(lambda: 0 if __import__('torch') else 1)\n")
    assert _openmp_spin_count(as_command, environ) == process.OPENMP_SPIN_COUNT == 3000
    assert _openmp_spin_count(as_command, {**environ, "OMP_WAIT_POLICY": "PASSIVE"}) == 0
    assert _openmp_spin_count(as_command, {**environ, "GOMP_SPINCOUNT": "1000"}) == 1000
    assert _openmp_spin_count("import torch\n" + as_command, environ) == 300_000   # libgomp's default
    for name in process.OPENMP_WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert process.environment_spinning_briefly({"OMP_NUM_THREADS": "1"}) == {
        "OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "3000"}
    assert process.environment_spinning_briefly({"GOMP_SPINCOUNT": "10"}) == {"GOMP_SPINCOUNT": "10"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert process.environment_spinning_briefly({}) == {}


def test_evaluate_with_nothing_to_score_exits_2(tmp_path, capsys):
    case = tmp_path / "data" / "chu" / "chu_99"
    case.mkdir(parents=True)
    (case / "case.json").write_text('{"source": "chu", "sequence": "T2"}')
    (tmp_path / "pred").mkdir()
    assert cli.main(["evaluate", "--data", str(case), "--pred", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to score" in err[0]
    # an empty metrics file name would silently write nothing
    assert cli.main(["evaluate", "--data", str(case), "--pred", str(tmp_path / "pred"), "-o", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-o/--output needs a file name" in err[0]


def test_every_option_of_every_command_has_help():
    import argparse

    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not action.help and action.dest != "help":
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(cli.build_parser(), "spinenet")
    assert missing == []


def test_threads_are_set_before_the_networks_load(tmp_path, monkeypatch):
    import os

    import torch

    from SpineNetLib.core.errors import SpineNetError

    calls, seen_at_load = [], []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("intra-op", n)))
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: calls.append(("inter-op", n)))
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(variable, "7")      # restored after the test

    def load_networks(*args, **kwargs):
        seen_at_load.append(list(calls))
        raise SpineNetError("stop before any inference")

    monkeypatch.setattr(pipeline, "load_networks", load_networks)
    image = make_phantom(fov="lumbar", shape=(96, 96), pixel_spacing=(2.0, 2.0), n_slices=3).write_nifti(
        tmp_path / "scan.nii.gz")
    assert cli.main(["run", str(image), "-o", str(tmp_path / "out"), "--quiet", "--threads", "1",
                     "--runtime", "torch"]) == 2   # ONNX Runtime's threads: test_onnx_runtime.py
    assert seen_at_load == [[("intra-op", 1), ("inter-op", 1)]]
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"
    assert cli.build_parser().parse_args(["demo", "-o", "x", "--threads", "2"]).threads == 2
    assert cli.build_parser().parse_args(["run", "x", "-o", "y"]).threads is None   # torch's default


@pytest.mark.parametrize("value, words", [("0", "--threads must be at least 1"), ("-2", "--threads must be at least 1"),
                                          ("abc", "invalid int value")])
def test_a_bad_thread_count_is_a_one_line_error(tmp_path, capsys, value, words):
    try:
        status = cli.main(["run", str(tmp_path), "-o", str(tmp_path / "out"), "--threads", value])
    except SystemExit as done:          # argparse's own errors, on one line too
        status = done.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_version_and_argument_errors_answer_without_loading_torch():
    """`spinenet --version` and a mistyped command answer at once: only `train` (and help) loads torch."""
    code = ("import sys\n"
            "from SpineNetLib.apps.cli import main\n"
            "for argv in (['--version'], ['run'], ['run', 'x', '-o', 'y', '--bogus'], ['weights', 'nonsense']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, 2), (argv, e.code)\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no torch"
    assert "train" in cli.build_parser().format_help()      # the full parser still offers it
