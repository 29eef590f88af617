"""Networks (official §3) and checkpoint handling (official §2).

The official checkpoints load with strict=True only if our module trees have
exactly the official parameter names, shapes and dtypes; the lists in
/work/shared/spec/official-spinenet/*.json were made from the official classes.
A SHA-256 of each list is kept here as well, so the check still runs (and can
fail) where that folder is absent.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from SpineNetLib.weights.checkpoints import (
    UntrustedWeightsError,
    build_model,
    load_model,
    resolve_weights_file,
    save_checkpoint,
    with_fast_memory_format,
)
from SpineNetLib.core.errors import InputError, WeightsError
from SpineNetLib.core.files import sha256_file
from SpineNetLib.models.folding import fold_batch_norms
from SpineNetLib.models import HEADS, AppearanceNet, ContextNet, DetectorConfig, GradingConfig, GradingNet, VFRDetector

SPEC_DIR = Path(os.environ.get("SPINENET_SPEC_DIR", "/work/shared/spec/official-spinenet"))

# kind -> (json file, sha256 of "name:shape:dtype" lines, entries, parameters, buffer elements)
OFFICIAL = {
    "detector": ("vfr_detector_state_dict.json",
                 "41fbf87b8d8189b938a821b3dce133edf0b4a19585eb23c0fc7336d5238359a2", 414, 139421581, 69313),
    "appearance": ("appearance_state_dict.json",
                   "97c34ca9b941f84e765672ca5ca00fec3df20babdbff842427372ebf26d8cd34", 39, 1937096, 501),
    "context": ("context_state_dict.json",
                "6c65e578cd9f2a5986e647af32ca9b652c6a1d9c3048bd55818994db7a840290", 58, 510337, 968),
    "grading": ("grading_state_dict.json",
                "80fd828507bf5aab36e7be1003994d43418a6b8e3f2f648120e6b367063e7f64", 239, 63472542, 17060),
}

SMALL_DETECTOR = DetectorConfig(blocks=(1, 1, 1, 1), base_width=8)
SMALL_GRADER = GradingConfig(blocks=(1, 1, 1, 1), base_width=8)


def _listing(model: torch.nn.Module) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


def _listing_sha(listing) -> str:
    text = "\n".join(f"{n}:{','.join(map(str, s))}:{d}" for n, s, d in listing)
    return hashlib.sha256(text.encode()).hexdigest()


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights AND BatchNorm statistics, so that a lost buffer changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 / max(1, t[0].numel()) ** 0.5))
    return model.eval()


def _run(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------- architecture


@pytest.mark.parametrize("kind", list(OFFICIAL))
def test_state_dict_equals_official(kind):
    """Names (in order), shapes and dtypes equal the official lists; built on 'meta' (no memory)."""
    fname, sha, n_entries, n_params, n_buffers = OFFICIAL[kind]
    with torch.device("meta"):
        model = build_model(kind)
    listing = _listing(model)
    assert len(listing) == n_entries
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sum(b.numel() for b in model.buffers()) == n_buffers
    assert _listing_sha(listing) == sha
    spec = SPEC_DIR / fname
    if spec.is_file():  # readable diff where the spec is available
        expected = [(e["name"], e["shape"], e["dtype"]) for e in json.loads(spec.read_text())["state_dict"]]
        assert listing == expected


def test_grading_heads_match_official_order_and_sizes():
    assert [h.name for h in HEADS] == ["fc_pf", "fc_nar", "fc_ccs", "fc_spn", "fc_ued", "fc_led",
                                       "fc_umc", "fc_lmc", "fc_fsl", "fc_fsr", "fc_hrn"]
    assert [h.n_classes for h in HEADS] == [5, 4, 4, 3, 2, 2, 2, 2, 2, 2, 2]
    assert [h.column for h in HEADS] == [
        "Pfirrmann", "Narrowing", "CentralCanalStenosis", "Spondylolisthesis", "UpperEndplateDefect",
        "LowerEndplateDefect", "UpperMarrow", "LowerMarrow", "ForaminalStenosisLeft",
        "ForaminalStenosisRight", "Herniation"]


def test_small_configs_scale_every_width():
    """base_width scales stem, encoder, bridge and decoder; blocks set the depth."""
    with torch.device("meta"):
        det = VFRDetector(DetectorConfig(blocks=(2, 2, 2, 2), base_width=8))
        grd = GradingNet(GradingConfig(blocks=(1, 2, 1, 1), base_width=8))
    sd = det.state_dict()
    assert sd["input_block.0.weight"].shape == (8, 1, 7, 7)
    assert sd["down_blocks.3.1.conv3.weight"].shape == (256, 64, 1, 1)
    assert "down_blocks.3.2.conv1.weight" not in sd
    assert sd["bridge.bridge.1.conv.weight"].shape == (256, 256, 3, 3)
    assert sd["up_blocks.3.conv_block_1.conv.weight"].shape == (16, 24, 3, 3)
    assert sd["up_blocks.4.conv_block_1.conv.weight"].shape == (8, 9, 3, 3)
    assert sd["out.weight"].shape == (13, 8, 1, 1)
    gsd = grd.state_dict()
    assert gsd["layer2.1.conv2.weight"].shape == (16, 16, 3, 3, 3)
    assert "layer1.1.conv1.weight" not in gsd
    assert gsd["fc_pf.weight"].shape == (5, 64)
    with pytest.raises(ValueError):
        DetectorConfig(blocks=(1, 1, 1), base_width=8)


# --------------------------------------------------------------------- forward shapes


def test_small_detector_forward_shape_and_size_check():
    model = _randomize(VFRDetector(SMALL_DETECTOR), 1)
    y = _run(model, torch.rand(2, 1, 224, 224))
    assert y.shape == (2, 13, 224, 224) and y.dtype == torch.float32
    assert _run(model, torch.rand(1, 1, 256, 192)).shape == (1, 13, 256, 192)
    with pytest.raises(InputError, match="multiples of 32"):
        _run(model, torch.rand(1, 1, 200, 224))


def test_detector_channels_last_gives_same_output():
    """The memory-format speed-up (used by load_model) must not change the numbers."""
    model = _randomize(VFRDetector(SMALL_DETECTOR), 2)
    x = torch.rand(2, 1, 224, 224)
    y = _run(model, x)
    y_cl = _run(model.to(memory_format=torch.channels_last), x)
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)


def test_channels_last_weights_give_the_same_numbers_for_every_network():
    """load_model leaves every network channels-last (faster on a CPU, benchmarks/RESULTS.md); the
    outputs must stay those of the default layout."""
    cases = ((_randomize(AppearanceNet(), 3), torch.rand(2, 1, 224, 224, 16)),
             (_randomize(ContextNet(), 4), torch.rand(1, 1, 256, 24)),
             (_randomize(GradingNet(SMALL_GRADER), 5), torch.rand(2, 1, 9, 112, 224)),
             (_randomize(VFRDetector(SMALL_DETECTOR), 2), torch.rand(2, 1, 224, 224)))
    for model, x in cases:
        y = _run(model, x)
        y_cl = _run(with_fast_memory_format(model), x)
        first_conv = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
        layout = torch.channels_last if isinstance(first_conv, torch.nn.Conv2d) else torch.channels_last_3d
        assert first_conv.weight.is_contiguous(memory_format=layout), type(model).__name__
        for a, b in zip(y_cl if isinstance(y_cl, tuple) else (y_cl,), y if isinstance(y, tuple) else (y,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()) + 1e-7)


def test_folded_batch_norms_give_the_same_numbers_and_leave_no_batch_norm():
    """pipeline.load_networks folds every BatchNorm of a bf16 detector into the convolution before it
    (models/folding.py); the outputs must stay those of the unfolded network (random BatchNorm
    statistics, so that a misplaced fold shows).  The other networks are handed back untouched: the
    grader's hotspot maps read its BatchNorm layers, the appearance network's follow a ReLU."""
    model, x = _randomize(VFRDetector(SMALL_DETECTOR), 2), torch.rand(2, 1, 224, 224)
    y = _run(model, x)
    folded = fold_batch_norms(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert folded.config == model.config
    y_folded = _run(with_fast_memory_format(folded), x)
    torch.testing.assert_close(y_folded, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()) + 1e-7)
    for other in (_randomize(GradingNet(SMALL_GRADER), 5), _randomize(AppearanceNet(), 3)):
        norms = [m for m in other.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert fold_batch_norms(other) is other and norms == [
            m for m in other.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(VFRDetector(SMALL_DETECTOR).train())


def test_appearance_forward_shape():
    y = _run(_randomize(AppearanceNet(), 3), torch.rand(2, 1, 224, 224, 16))
    assert y.shape == (2, 24)
    with pytest.raises(InputError):
        _run(AppearanceNet().eval(), torch.rand(1, 1, 224, 224, 15))


def _appearance_in_official_order(net: AppearanceNet, x: torch.Tensor) -> torch.Tensor:
    """conv -> ReLU -> BatchNorm -> max-pool at every stage, as official §3.2 writes the network."""
    import torch.nn.functional as F

    x = net.bnrm1(F.relu(net.conv1(x)))
    for i, pool in zip(range(2, 6), [(2, 2, 1), (2, 2, 1), 2, 2]):
        x = F.max_pool3d(getattr(net, f"bnrm{i}")(F.relu(getattr(net, f"conv{i}")(x))), pool)
    return net.fc2(F.relu(net.fc1(torch.flatten(x, 1))))


def test_appearance_net_pools_first_with_the_official_orders_exact_numbers():
    """Pooling before ReLU and BatchNorm gives the official order's bits, in both memory layouts; a
    BatchNorm with a negative weight (decreasing: it would turn max into min) keeps the official order."""
    x = torch.rand(3, 1, 224, 224, 16) * 4 - 1
    for seed, negative in ((3, False), (4, False), (5, True)):
        net = _randomize(AppearanceNet(), seed)
        with torch.no_grad():
            for i in range(1, 6):
                bn = getattr(net, f"bnrm{i}")
                bn.weight.abs_()
                if negative and i == 3:
                    bn.weight[::2] *= -1
            for layout in (torch.contiguous_format, torch.channels_last_3d):
                net.to(memory_format=layout)
                assert torch.equal(_run(net, x), _appearance_in_official_order(net, x))


def test_context_forward_shape():
    model = _randomize(ContextNet(), 4)
    assert _run(model, torch.rand(1, 1, 512, 24)).shape == (1, 1, 512, 24)
    assert _run(model, torch.rand(2, 1, 240, 24)).shape == (2, 1, 240, 24)  # 240 = 15 * 16 works
    with pytest.raises(InputError, match="multiple of 16"):
        _run(model, torch.rand(1, 1, 250, 24))


def test_small_grader_forward_shapes():
    out = _run(_randomize(GradingNet(SMALL_GRADER), 5), torch.rand(2, 1, 9, 112, 224))
    assert isinstance(out, tuple) and len(out) == len(HEADS)
    assert [tuple(t.shape) for t in out] == [(2, h.n_classes) for h in HEADS]


# --------------------------------------------------------------------- checkpoints


def test_official_layout_net_round_trip(tmp_path):
    """Plain torch.save of what the official code would store; folder picks the highest epoch."""
    x_app = torch.rand(1, 1, 224, 224, 16)
    x_ctx = torch.rand(1, 1, 256, 24)
    for kind, model, x, epoch in (("appearance", AppearanceNet(), x_app, 187), ("context", ContextNet(), x_ctx, 16)):
        model = _randomize(model, epoch)
        folder = tmp_path / kind
        folder.mkdir()
        torch.save({"net": model.state_dict(), "epoch": epoch, "loss": 0.25}, folder / f"ckpt{epoch}.pt")
        # a lower epoch, a non-numbered name and an 'encrypted' file must all be ignored
        torch.save({"net": _randomize(build_model(kind), 99).state_dict(), "epoch": 9, "loss": 1.0},
                   folder / "ckpt9.pt")
        (folder / "ckpt999_encrypted.pt").write_bytes(b"not a checkpoint")
        loaded = load_model(kind, folder)
        assert loaded.weights_path.name == f"ckpt{epoch}.pt"
        assert not loaded.training
        assert loaded.checkpoint_meta == {"epoch": epoch, "loss": 0.25}
        assert torch.equal(_run(loaded, x), _run(with_fast_memory_format(model), x))  # the same layout: bit-equal


def test_official_layout_model_weights_round_trip_full_size_grader(tmp_path):
    """'model_weights' key; no 'spinenet_arch' means the official (63M-parameter) grader."""
    model = GradingNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "grading" / "ckpt1.pt"
    path.parent.mkdir()
    torch.save({"model_weights": model.state_dict(), "epoch_no": 1}, path)
    loaded = load_model("grading", path.parent)
    assert loaded.config == GradingConfig()
    # NDHWC: 1.25-1.4x faster under bfloat16 on this CPU (benchmarks/RESULTS.md), same numbers
    assert loaded.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.rand(1, 1, 3, 32, 32)  # adaptive pooling: a tiny input exercises every weight
    for a, b in zip(_run(loaded, x), _run(with_fast_memory_format(copy.deepcopy(model)), x)):
        assert torch.equal(a, b)                              # the same layout: bit-equal
    for a, b in zip(_run(loaded, x), _run(model, x)):
        # the other layout sums in another order on some CPUs (not on AVX-512 ones): float32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_module_prefix_is_stripped(tmp_path):
    model = _randomize(ContextNet(), 6)
    path = tmp_path / "ckpt3.pt"
    torch.save({"net": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3, "loss": 0.1}, path)
    x = torch.rand(1, 1, 128, 24)
    assert torch.equal(_run(load_model("context", path), x), _run(with_fast_memory_format(model), x))


def test_fp16_round_trip_restores_config_and_float32(tmp_path):
    model = _randomize(VFRDetector(SMALL_DETECTOR), 7)
    path = save_checkpoint(tmp_path / "det" / "ckpt5.pt", "detector", model, half=True,
                           extra={"epoch": 5, "loss": 0.125})
    assert [p.name for p in path.parent.iterdir()] == ["ckpt5.pt"]  # no temp file left behind
    assert path.stat().st_size < 5e6  # ~1.94M parameters in fp16
    raw = torch.load(path, weights_only=True)  # readable without trust, official keys present
    assert set(raw) == {"net", "epoch", "loss", "spinenet_arch"}
    assert raw["net"]["out.weight"].dtype == torch.float16
    assert raw["spinenet_arch"] == {"kind": "detector", "config": {"blocks": [1, 1, 1, 1], "base_width": 8},
                                    "format_version": 1}
    loaded = load_model("detector", path)
    assert loaded.config == SMALL_DETECTOR
    assert loaded.out.weight.is_contiguous(memory_format=torch.channels_last)  # CPU speed-up
    for name, t in loaded.state_dict().items():
        assert t.dtype == (torch.int64 if name.endswith("num_batches_tracked") else torch.float32), name
    assert loaded.checkpoint_meta["epoch"] == 5
    x = torch.rand(2, 1, 224, 224)
    y, y16 = _run(model, x), _run(loaded, x)
    assert not torch.equal(y, y16)  # the weights really were rounded
    torch.testing.assert_close(y16, y, rtol=0, atol=2e-2 * float(y.abs().max()))


def test_save_refuses_values_that_would_need_trust(tmp_path):
    model = ContextNet()
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path / "c.pt", "context", model, extra={"loss": np.float64(0.5)})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c.pt", "detector", model)
    assert not any(tmp_path.iterdir())


def test_numpy_loss_needs_trusted_sha256(tmp_path):
    """torch>=2.6 weights_only=True cannot read a numpy scalar (official §2 risk)."""
    model = _randomize(ContextNet(), 8)
    path = tmp_path / "ckpt16.pt"
    torch.save({"net": model.state_dict(), "epoch": 16, "loss": np.float64(0.5)}, path)
    digest = sha256_file(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UntrustedWeightsError) as info:
        load_model("context", path)
    message = str(info.value)
    assert digest in message and "\n" not in message and "pickled Python objects" in message
    assert info.value.sha256 == digest
    with pytest.raises(WeightsError):
        load_model("context", path, trusted_sha256={"0" * 64})
    loaded = load_model("context", path, trusted_sha256={digest.upper()})
    x = torch.rand(1, 1, 64, 24)
    assert torch.equal(_run(loaded, x), _run(with_fast_memory_format(model), x))
    assert loaded.checkpoint_meta["loss"] == 0.5


def test_wrong_shapes_give_weights_error(tmp_path):
    narrow = GradingNet(GradingConfig(base_width=8))  # official depth, 1/8 width: same keys
    path = tmp_path / "ckpt1.pt"
    torch.save({"model_weights": narrow.state_dict(), "epoch_no": 1}, path)  # no arch -> official expected
    with pytest.raises(WeightsError, match=r"0 missing, 0 unexpected, 192 shape-mismatched") as info:
        load_model("grading", path)
    assert "conv1.weight is [8, 1, 3, 7, 7] in the file, [64, 1, 3, 7, 7] expected" in str(info.value)
    assert "\n" not in str(info.value)

    sd = ContextNet().state_dict()
    del sd["conv8.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"net": sd, "epoch": 1, "loss": 0.0}, path)
    with pytest.raises(WeightsError, match="1 missing, 1 unexpected, 0 shape-mismatched"):
        load_model("context", path)

    save_checkpoint(path, "appearance", AppearanceNet())
    with pytest.raises(WeightsError, match="'appearance' network, not a 'context'"):
        load_model("context", path)


def test_bad_files_give_weights_error(tmp_path):
    model = ContextNet()
    good = save_checkpoint(tmp_path / "good.pt", "context", model)
    data = good.read_bytes()
    for name, content in (("truncated.pt", data[: len(data) // 2]), ("empty.pt", b""),
                          ("garbage.pt", b"hello world" * 10)):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(WeightsError) as info:
            load_model("context", bad, trusted_sha256={sha256_file(bad)})
        assert not isinstance(info.value, UntrustedWeightsError)
        assert "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="not found"):
        load_model("context", tmp_path / "missing.pt")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(WeightsError, match="no .pt"):
        resolve_weights_file(empty)


def test_a_graders_trained_heads_are_read_without_torch_and_without_running_the_file(tmp_path):
    """The Slicer panel offers the hotspot heads the chosen grader trained before torch is installed
    (``documents.hotspot_heads``): the checkpoint's ``trained_heads`` entry is read from its archive
    with every object in it made opaque, so nothing the file names is ever called."""
    import pickle
    import subprocess
    import sys
    import zipfile

    from SpineNetLib.weights.resolve import BUNDLED_DIR, recorded_trained_heads, trained_grading_heads

    code = ("import json, sys; from SpineNetLib.outputs import documents; print(json.dumps(["
            "documents.hotspot_heads('bundled'), documents.hotspot_heads('official'), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    bundled, official, torch_imported = json.loads(out)
    assert bundled == ["Herniation"]                   # the bundled grader trained Herniation only
    assert len(official) == 11 and not torch_imported  # the official ones record none: all heads; no torch

    loaded = load_model("grading", BUNDLED_DIR / "grading.pt")
    assert recorded_trained_heads(BUNDLED_DIR / "grading.pt") == set(loaded.checkpoint_meta["trained_heads"].split(","))

    net = GradingNet(GradingConfig((1, 1, 1, 1), 4, input_slices=1))
    plain = save_checkpoint(tmp_path / "plain" / "grading.pt", "grading", net)        # as the official ones
    assert recorded_trained_heads(plain) is None
    some = save_checkpoint(tmp_path / "some" / "grading.pt", "grading", net, extra={"trained_heads": "fc_hrn,fc_pf"})
    assert recorded_trained_heads(some) == {"fc_hrn", "fc_pf"}
    ordered = tmp_path / "ordered.pt"            # torch's own state dict: an OrderedDict with _metadata
    torch.save({"model_weights": net.state_dict(), "trained_heads": "fc_hrn"}, ordered)
    assert recorded_trained_heads(ordered) == {"fc_hrn"}
    for name in ("detector.pt", "appearance.pt", "context.pt"):
        (tmp_path / "some" / name).write_bytes((BUNDLED_DIR / name).read_bytes())
    assert trained_grading_heads(tmp_path / "some") == {"fc_hrn", "fc_pf"}
    (tmp_path / "some" / "grading.pt").unlink()
    assert trained_grading_heads(tmp_path / "some") == set()                         # no grader: no head
    assert trained_grading_heads(tmp_path / "missing") is None                       # the run will say why
    (tmp_path / "not-a-checkpoint.pt").write_bytes(b"hello" * 20)
    assert recorded_trained_heads(tmp_path / "not-a-checkpoint.pt") is None

    marker = tmp_path / "written-by-the-file"

    class Opens:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hostile = tmp_path / "hostile.pt"
    with zipfile.ZipFile(hostile, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"trained_heads": "fc_hrn", "payload": Opens()}))
    assert recorded_trained_heads(hostile) == {"fc_hrn"} and not marker.exists()


def test_multiply_accumulates_are_counted_exactly_for_the_arithmetic_benchmark():
    """benchmarks/bench_arithmetic.py sets issue 16's goals against counted multiply-accumulates:
    each output value of a convolution costs (input channels per group) x (kernel size) of them,
    of a linear layer its input width; pooling and activations cost none."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_arithmetic.py"
    spec = importlib.util.spec_from_file_location("bench_arithmetic", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 6, 3, padding=1),               # 6 x 10 x 10 outputs x 2 x 9
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 6, (1, 3), padding=(0, 1), groups=3),   # 600 outputs x 2 x 3
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(150, 7))                             # 7 outputs x 150
    assert bench.count_macs(net, torch.zeros(1, 2, 10, 10)) == 600 * 18 + 600 * 6 + 7 * 150
    conv3d = torch.nn.Conv3d(1, 4, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2))
    assert bench.count_macs(conv3d, torch.zeros(2, 1, 9, 8, 8)) == 2 * 4 * 9 * 4 * 4 * 75
