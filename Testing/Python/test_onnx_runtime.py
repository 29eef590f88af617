"""``--runtime onnx``: every network on ONNX Runtime, so that a run never imports torch
(models/onnx_runtime.py, issue 16).

What a user relies on: the same vertebrae, levels and grades as the torch runtime; the networks exported
once per weights file and then read from the cache, with nothing of torch imported by a run that finds
them there; and one-line errors (exit status 2) where ONNX Runtime is missing, or asked for what it cannot
do (bfloat16, hotspot maps, a GPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from SpineNetLib.core.errors import InputError
from SpineNetLib.training.datasets import default_data_root
from missing_packages import block_package, run_on_a_noise_scan

pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install onnxruntime onnx)")
pytest.importorskip("onnx", reason="the export needs the onnx package (pip install onnx)")

ROOT = Path(__file__).resolve().parents[2]
CLINICAL_SLICE = default_data_root() / "tianchi" / "tianchi_039-000" / "image.nii.gz"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A per-user cache with the bundled networks exported into it once for this module's tests."""
    folder = tmp_path_factory.mktemp("cache")
    before = os.environ.get("SPINENET_CACHE")
    os.environ["SPINENET_CACHE"] = str(folder)
    from SpineNetLib import pipeline

    pipeline.load_networks("bundled", runtime="onnx", with_grading=True, threads=2)
    yield folder
    if before is None:
        os.environ.pop("SPINENET_CACHE", None)
    else:
        os.environ["SPINENET_CACHE"] = before


def _phantom_scan():
    from SpineNetLib.synthetic.phantom import make_phantom

    return make_phantom(seed=4, shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=5).scan


def test_each_exported_network_gives_the_torch_outputs_at_other_shapes(cache):
    """Exported at one input shape, each network answers for the shapes a run gives it (other batches,
    whole-slice frames, taller label images) with torch's outputs up to float32 rounding."""
    from SpineNetLib import pipeline
    from SpineNetLib.models.inference import network_outputs

    torch_nets = pipeline.load_networks("bundled", "cpu", with_grading=True)
    onnx_nets = pipeline.load_networks("bundled", runtime="onnx", with_grading=True, threads=2)
    rng = np.random.default_rng(0)
    frames = rng.random((2, 288, 416), dtype=np.float32)
    expected, got = torch_nets.s1_outline(frames), onnx_nets.s1_outline(frames)
    assert got.shape == expected.shape == (2, 13, 288, 416)
    assert float(np.abs(got - expected).max()) <= 1e-4 * float(np.abs(expected).max())
    for name, x in (("appearance", rng.random((3, 1, 224, 224, 16), dtype=np.float32)),
                    ("context", rng.random((1, 1, 128, 24), dtype=np.float32)),
                    ("grading", rng.random((3, 1, 9, 112, 224), dtype=np.float32))):
        a = network_outputs(getattr(torch_nets, name), x)
        b = network_outputs(getattr(onnx_nets, name), x)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert u.shape == v.shape and float(np.abs(u - v).max()) <= 1e-4 * max(float(np.abs(u).max()), 1.0), name
    from SpineNetLib.label import labelling

    # the labelling numbers recorded in the context checkpoint travel with the export
    assert labelling.params_for_context(onnx_nets.context) == labelling.params_for_context(torch_nets.context)
    assert labelling.calibrated_review_margin(onnx_nets.context) == labelling.calibrated_review_margin(torch_nets.context)
    assert onnx_nets.grading.config == torch_nets.grading.config
    kinds = sorted(p.name.split("-")[0] for p in (cache / "onnx").glob("*.onnx"))
    assert kinds == ["appearance", "context", "detector", "grading", "s1_outline"]


def test_onnx_runtime_gives_the_torch_levels_and_grades(cache, monkeypatch):
    """A phantom and a real held-out clinical slice, run as a process without torch runs them (numpy's
    resampling): the same bodies, slices, levels and grades as torch, corners within 0.01 pixel."""
    from SpineNetLib import pipeline
    from SpineNetLib.core import resample
    from SpineNetLib.detect import plans

    scans = [_phantom_scan()]
    if CLINICAL_SLICE.is_file():
        scans.append(pipeline.read_input(CLINICAL_SLICE, pipeline.processing_profile(None, "bundled"))[0])
    reference = pipeline.load_networks("bundled", "cpu", with_grading=True)
    networks = pipeline.load_networks("bundled", runtime="onnx", with_grading=True, threads=2)
    assert networks.detector is None and networks.runtime == "onnx"
    expected = [pipeline.run(scan, reference) for scan in scans]
    monkeypatch.setattr(resample, "loaded_torch", lambda: None)
    monkeypatch.setattr(plans, "loaded_torch", lambda: None)
    for scan, a in zip(scans, expected):
        b = pipeline.run(scan, networks)
        assert "runtime" not in a.vertebrae_document and b.vertebrae_document["runtime"] == "onnx"
        va, vb = a.detection.vertebrae, b.detection.vertebrae
        assert len(va) >= 5 and [v.level for v in va] == [v.level for v in vb]
        assert [v.slices for v in va] == [v.slices for v in vb]
        corners = max(float(np.abs(np.stack(x.polygons) - np.stack(y.polygons)).max()) for x, y in zip(va, vb))
        assert corners <= 0.01
        grades = lambda r: [{k: v[0] for k, v in g.items()} for g in r.discs.grades]  # noqa: E731
        assert grades(a) == grades(b) and len(grades(a)) >= 4


def test_a_cached_run_never_imports_torch(cache, tmp_path):
    """``spinenet run --runtime onnx``, and ``spinenet run`` with its default runtime (auto), in a fresh
    process where importing torch fails: each runs, and writes every result file.  A damaged cached
    network is exported again (that run imports torch)."""
    from SpineNetLib.synthetic.phantom import make_phantom
    from SpineNetLib.synthetic.writing import write_phantom_image

    image = write_phantom_image(make_phantom(seed=4, shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=5),
                                tmp_path / "phantom.nii.gz")
    env = {**os.environ, "SPINENET_CACHE": str(cache)}
    for name, runtime in (("out", ["--runtime", "onnx"]), ("default", [])):
        probe = ("import sys; sys.modules['torch'] = None\n"
                 "from SpineNetLib.apps.cli import main\n"
                 f"sys.exit(main(['run', {str(image)!r}, '-o', {str(tmp_path / name)!r}, *{runtime!r}, "
                 "'--threads', '2', '--quiet']))")
        done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert {"vertebrae.json", "discs.json", "preview.png"} <= {p.name for p in (tmp_path / name).iterdir()}
        assert json.loads((tmp_path / name / "vertebrae.json").read_text())["runtime"] == "onnx"
    # a damaged export: read, found unusable, exported again from the torch network
    detector = next((cache / "onnx").glob("detector-*.onnx"))
    good = detector.read_bytes()
    detector.write_bytes(good[:1000])
    from SpineNetLib import pipeline

    pipeline.load_networks("bundled", runtime="onnx", threads=2)
    assert detector.stat().st_size == len(good)


def test_what_onnx_runtime_cannot_do_is_a_one_line_error(cache, monkeypatch, tmp_path, capsys):
    from SpineNetLib import pipeline
    from SpineNetLib.apps import cli

    with pytest.raises(InputError, match="float32"):
        pipeline.load_networks("bundled", runtime="onnx", precision="bf16")
    with pytest.raises(InputError, match="runs on the CPU"):
        pipeline.load_networks("bundled", "cuda", runtime="onnx")
    networks = pipeline.load_networks("bundled", runtime="onnx", with_grading=True, threads=2)
    with pytest.raises(InputError, match="use --runtime torch"):
        pipeline.run(_phantom_scan(), networks, pipeline.RunOptions(hotspot_heads=("fc_hrn",)))
    # an empty cache needs the export: without the onnx package, or where the cache cannot be written
    monkeypatch.setenv("SPINENET_CACHE", str(tmp_path / "not-a-folder"))
    (tmp_path / "not-a-folder").write_text("a file where the cache folder would be")
    with pytest.raises(InputError, match="cannot be written"):
        pipeline.load_networks("bundled", runtime="onnx")
    monkeypatch.setenv("SPINENET_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(InputError, match="pip install onnx"):
        pipeline.load_networks("bundled", runtime="onnx")
    assert not list((tmp_path / "empty-cache").rglob("*.onnx"))
    monkeypatch.setenv("SPINENET_CACHE", str(cache))
    block_package(monkeypatch, "onnxruntime")
    status, err = run_on_a_noise_scan(cli, tmp_path, capsys, "--runtime", "onnx")
    assert status == 2 and len(err) == 1 and "pip install onnxruntime" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_command_runs_onnx_runtime_by_default_where_it_can_stand_in_for_torch(cache, monkeypatch, tmp_path):
    """``--runtime auto``, the default of ``spinenet run`` and ``spinenet demo`` (models/runtime_choice.py):
    ONNX Runtime for the bundled weights on the CPU in float32; torch for other weights, a GPU, bfloat16,
    hotspot maps and the official profile, and where ONNX Runtime is missing or its export cannot be
    written, in which case the run goes on with torch instead of failing."""
    from SpineNetLib import pipeline
    from SpineNetLib.apps import cli
    from SpineNetLib.models.runtime_choice import automatic_runtime
    from SpineNetLib.synthetic.phantom import make_phantom
    from SpineNetLib.synthetic.writing import write_phantom_image

    assert automatic_runtime("bundled") == "onnx" and automatic_runtime(None, "cpu") == "onnx"
    assert {automatic_runtime("official"), automatic_runtime(str(tmp_path)), automatic_runtime("bundled", "cuda"),
            automatic_runtime("bundled", precision="bf16")} == {"torch"}
    with monkeypatch.context() as without:
        without.setitem(sys.modules, "onnxruntime", None)
        assert automatic_runtime("bundled") == "torch"
    assert cli.build_parser().parse_args(["run", "x", "-o", "y"]).runtime == "auto"
    assert cli.build_parser().parse_args(["cohort", "x", "-o", "y"]).runtime == "torch"

    image = write_phantom_image(make_phantom(seed=4, shape=(256, 256), pixel_spacing=(1.1, 1.1), n_slices=3),
                                tmp_path / "phantom.nii.gz")

    def runtime_of(name: str, *options: str) -> str:
        assert cli.main(["run", str(image), "-o", str(tmp_path / name), "--quiet", "--no-preview", *options]) == 0
        return json.loads((tmp_path / name / "vertebrae.json").read_text()).get("runtime", "torch")

    assert runtime_of("default") == "onnx"
    assert runtime_of("hotspots", "--hotspots", "Herniation", "--hotspot-augmentations", "1") == "torch"
    assert runtime_of("official_profile", "--profile", "official") == "torch"
    monkeypatch.setenv("SPINENET_CACHE", str(tmp_path / "not-a-folder"))
    (tmp_path / "not-a-folder").write_text("a file where the cache folder would be")
    assert runtime_of("unwritable_cache") == "torch"
    assert pipeline.load_networks("bundled", runtime="auto").runtime == "torch"
    with pytest.raises(InputError, match="cannot be written"):
        pipeline.load_networks("bundled", runtime="onnx")


def test_the_first_run_of_a_weights_file_says_that_it_exports_the_networks(cache, monkeypatch, tmp_path, capsys):
    """The first ONNX Runtime run of a weights file exports its networks, seconds that later runs do not
    take: the command says so on stderr (not with --quiet), and says nothing once they are in the cache."""
    import shutil

    from SpineNetLib.apps import cli
    from SpineNetLib.models.onnx_runtime import EXPORT_MESSAGE
    from SpineNetLib.synthetic.phantom import make_phantom
    from SpineNetLib.synthetic.writing import write_phantom_image

    fresh = tmp_path / "cache" / "onnx"
    fresh.mkdir(parents=True)
    for exported in (Path(cache) / "onnx").iterdir():   # all but the context network: only it is exported
        if not exported.name.startswith("context-"):
            shutil.copy(exported, fresh / exported.name)
    monkeypatch.setenv("SPINENET_CACHE", str(fresh.parent))
    image = write_phantom_image(make_phantom(seed=4, shape=(256, 256), pixel_spacing=(1.1, 1.1), n_slices=3),
                                tmp_path / "phantom.nii.gz")
    capsys.readouterr()

    def stderr_of(name: str, *options: str) -> str:
        assert cli.main(["run", str(image), "-o", str(tmp_path / name), "--no-preview", *options]) == 0
        assert json.loads((tmp_path / name / "vertebrae.json").read_text())["runtime"] == "onnx"
        return capsys.readouterr().err

    first = stderr_of("first")
    assert f"{EXPORT_MESSAGE}: 3/5" in first and f"{EXPORT_MESSAGE}: 5/5" in first
    assert len(list(fresh.glob("context-*.onnx"))) == 1
    assert EXPORT_MESSAGE not in stderr_of("again")
    (next(fresh.glob("context-*.onnx"))).unlink()
    assert EXPORT_MESSAGE not in stderr_of("quiet", "--quiet")
    assert len(list(fresh.glob("context-*.onnx"))) == 1
    # a cache folder that cannot be written: the run goes on with torch, and does not claim to export
    monkeypatch.setenv("SPINENET_CACHE", str(tmp_path / "not-a-folder"))
    (tmp_path / "not-a-folder").write_text("a file where the cache folder would be")
    assert cli.main(["run", str(image), "-o", str(tmp_path / "torch"), "--no-preview"]) == 0
    assert json.loads((tmp_path / "torch" / "vertebrae.json").read_text()).get("runtime", "torch") == "torch"
    assert EXPORT_MESSAGE not in capsys.readouterr().err
