"""``--runtime openvino``: the detector on OpenVINO's CPU runtime (models/runtimes.py, issue 16).

What a user relies on: the same vertebrae and levels as with torch (float32: the detector's outputs
within float32 rounding; bfloat16: as ``--precision bf16`` with torch), the conversion done once per
weights file and then read from the cache, the documents saying which runtime ran, and a one-line
error with exit status 2 where OpenVINO is missing or asked to run on a GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from SpineNetLib.core.errors import InputError
from SpineNetLib.training.datasets import default_data_root
from missing_packages import block_package, run_on_a_noise_scan

openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")

CLINICAL_SLICE = default_data_root() / "tianchi" / "tianchi_039-000" / "image.nii.gz"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SPINENET_CACHE", str(folder))
    return folder / "openvino"


def _phantom_scan():
    from SpineNetLib.synthetic.phantom import make_phantom

    return make_phantom(seed=4, shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=5).scan


def test_openvino_detector_gives_torch_outputs_and_is_converted_once(cache):
    """The bundled detector's maps through OpenVINO in float32 are torch's up to float32 rounding, for
    patches and for a whole-slice frame; the converted network is kept in the cache and read back."""
    from SpineNetLib.detect.vfr import network_predictor
    from SpineNetLib.models.runtimes import openvino_detector_predictor
    from SpineNetLib.weights.checkpoints import load_model
    from SpineNetLib.weights.resolve import resolve_weights

    path = resolve_weights("bundled").path("detector")
    torch_predict = network_predictor(load_model("detector", path))
    ov_predict = openvino_detector_predictor(load_model("detector", path), path, "fp32", cache_dir=cache)
    assert len(list(cache.glob("detector-*.xml"))) == 1 and len(list(cache.glob("detector-*.bin"))) == 1
    rng = np.random.default_rng(0)
    for shape in ((3, 224, 224), (1, 288, 416)):
        x = rng.random(shape, dtype=np.float32)
        expected = torch_predict(x)
        got = ov_predict(x)
        assert got.shape == expected.shape == (shape[0], 13, *shape[1:]) and got.dtype == np.float32
        assert float(np.abs(got - expected).max()) < 1e-3 * float(np.abs(expected).max())
    again = openvino_detector_predictor(load_model("detector", path), path, "fp32", cache_dir=cache)   # from the cache
    assert np.array_equal(again(x), got)
    for f in cache.glob("detector-*"):              # a cache cut short (a full disk): converted again
        f.write_bytes(f.read_bytes()[:100])
    converted_again = openvino_detector_predictor(load_model("detector", path), path, "fp32", cache_dir=cache)
    assert np.array_equal(converted_again(x), got)
    assert min(f.stat().st_size for f in cache.glob("detector-*")) > 100
    folder = cache.parent / "official-layout" / "detect-vfr"     # weights given as an official-layout folder:
    folder.mkdir(parents=True)                                    # the cache is keyed by the file loaded
    (folder / "ckpt435.pt").write_bytes(Path(path).read_bytes())
    model = load_model("detector", folder)
    assert np.array_equal(openvino_detector_predictor(model, model.weights_path, "fp32", cache_dir=cache)(x), got)
    bf16 = openvino_detector_predictor(load_model("detector", path), path, "bf16", cache_dir=cache)(x)
    difference = float(np.abs(bf16 - expected).max()) / float(np.abs(expected).max())
    assert 0 < difference < 0.05                   # computed in bfloat16, handed back in float32


def test_a_cached_conversion_never_loads_the_torch_detector(cache):
    """The detector may be given as a function that loads it: called for the first conversion only,
    and, without a cache, the converted network (which uses the torch network's memory) keeps
    giving torch's outputs after everything else has let go of the torch network."""
    import gc

    from SpineNetLib.detect.vfr import network_predictor
    from SpineNetLib.models.runtimes import CONVERSION_MESSAGE, openvino_detector_predictor
    from SpineNetLib.weights.checkpoints import load_model
    from SpineNetLib.weights.resolve import resolve_weights

    path = resolve_weights("bundled").path("detector")
    loads = []

    def load():
        loads.append(path)
        return load_model("detector", path)

    x = np.random.default_rng(1).random((2, 224, 224), dtype=np.float32)
    heard = []   # the conversion is said (spinenet run prints it), the read from the cache is not
    first = openvino_detector_predictor(load, path, "fp32", cache_dir=cache, progress=lambda *a: heard.append(a))(x)
    assert heard == [(0, 1, CONVERSION_MESSAGE), (1, 1, CONVERSION_MESSAGE)]
    again = openvino_detector_predictor(load, path, "fp32", cache_dir=cache, progress=lambda *a: heard.append(a))(x)
    assert len(loads) == 1 and np.array_equal(first, again) and len(heard) == 2
    uncached = openvino_detector_predictor(load, path, "fp32", cache_dir=None)
    assert len(loads) == 2
    gc.collect()
    expected = network_predictor(load_model("detector", path))(x)
    assert float(np.abs(uncached(x) - expected).max()) < 1e-3 * float(np.abs(expected).max())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_runtime_gives_the_torch_levels(cache, precision):
    """A phantom and a real held-out clinical slice: the same bodies, slices and levels as torch in
    float32, corners within a pixel (bfloat16: 1.5 pixels; torch's own bfloat16 moves them about as
    much), and the document says the runtime. bfloat16 on the phantom only: a CPU without bfloat16
    instructions emulates it, and the clinical slice's many detector passes then take 40 s or more
    (torch's bfloat16, test_bundled_models.py, is checked on the same phantom)."""
    from SpineNetLib import pipeline

    scans = [_phantom_scan()]
    if CLINICAL_SLICE.is_file() and precision == "fp32":
        scans.append(pipeline.read_input(CLINICAL_SLICE, pipeline.processing_profile(None, "bundled"))[0])
    reference = pipeline.load_networks("bundled", "cpu")
    networks = pipeline.load_networks("bundled", precision=precision, runtime="openvino")
    assert networks.detector is None and networks.predictor is not None and networks.device.type == "cpu"
    for scan in scans:
        a = pipeline.run(scan, reference, pipeline.RunOptions(grade=False))
        b = pipeline.run(scan, networks, pipeline.RunOptions(grade=False))
        assert "runtime" not in a.vertebrae_document and b.vertebrae_document["runtime"] == "openvino"
        va, vb = a.detection.vertebrae, b.detection.vertebrae
        assert len(va) >= 5 and [v.level for v in va] == [v.level for v in vb]
        assert [v.slices for v in va] == [v.slices for v in vb]
        corners = max(float(np.abs(np.stack(x.polygons) - np.stack(y.polygons)).max()) for x, y in zip(va, vb))
        assert corners <= (1.0 if precision == "fp32" else 1.5)


def test_missing_openvino_or_a_gpu_is_a_one_line_error(cache, monkeypatch, tmp_path, capsys):
    from SpineNetLib import pipeline
    from SpineNetLib.apps import cli

    with pytest.raises(InputError, match="runs on the CPU"):
        pipeline.load_networks("bundled", "cuda", runtime="openvino")
    with pytest.raises(InputError, match="unknown runtime"):
        pipeline.load_networks("bundled", "cpu", runtime="tensorrt")
    block_package(monkeypatch, "openvino")
    status, err = run_on_a_noise_scan(cli, tmp_path, capsys, "--runtime", "openvino")
    assert status == 2 and len(err) == 1 and "pip install openvino" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
