"""``spinenet train appearance-pool`` and ``train appearance --body-pool / --workers``: an appearance run that
can go where the data folder cannot (a lent GPU machine) and make its batches in several processes, with
the bodies of the data folder and batches that do not depend on how many processes made them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from SpineNetLib.apps.cli import main
from SpineNetLib.training.datasets import default_data_root

DATA = default_data_root()
HAS_DATA = (DATA / "chu" / "chu_04").is_dir()


def _one_line_error(capsys, argv, *words) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


@pytest.mark.skipif(not HAS_DATA, reason="../shared/data (real MRI) is not present")
def test_a_body_pool_holds_the_data_folders_bodies_and_scans(tmp_path):
    """Every real body as the data folder gives it (level, outline, scan) and its scan to half a grey level
    in 256 of the scan's maximum; no phantoms (the run makes them from its seed)."""
    import argparse

    from SpineNetLib.training.labelling import appearance_bodies, load_body_pool

    pool = tmp_path / "pool.npz"
    assert main(["train", "appearance-pool", "--data", str(DATA), "--max-cases", "1", "--out", str(pool)]) == 0
    args = argparse.Namespace(data=str(DATA), max_cases=1, phantom_fraction=0.0, n_phantoms=0, seed=0)
    scans, real, clinical, _ = appearance_bodies(args, {"volume_s1_targets": None, "tianchi_targets": None})
    pooled_scans, pooled_real, pooled_clinical = load_body_pool(pool)
    assert len(real) >= 5 and not clinical and not pooled_clinical
    assert [(b.scan_index, b.level) for b in pooled_real] == [(b.scan_index, b.level) for b in real]
    for a, b in zip(pooled_real, real):
        np.testing.assert_array_equal(a.polygon, b.polygon)
    assert len(pooled_scans) == len(scans) == 1
    top = float(scans[0].voxels.max())
    assert pooled_scans[0].spacing_mm == scans[0].spacing_mm
    assert np.abs(pooled_scans[0].voxels - scans[0].voxels).max() <= top / 255 / 2 + 1e-4


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    argv = ["train", "appearance", "--out", str(out), "--steps", "2", "--batch-size", "2", "--seed", "3",
            "--phantom-fraction", "1", "--n-phantoms", "1", "--threads", "1", "--save-every", "1", *extra]
    return argv, out


def test_the_batches_do_not_depend_on_the_number_of_workers_nor_on_a_resume(tmp_path):
    """Each step's batch is seeded by (seed, step): one worker, two workers, and two workers stopped after
    the first step and resumed end with the same weights."""
    import torch

    from SpineNetLib.apps.cli import build_parser

    finals = []
    for name, workers in (("one", "1"), ("two", "2")):
        argv, out = _train(tmp_path, name, "--workers", workers)
        assert main(argv) == 0
        finals.append(out / "appearance.pt")
    argv, out = _train(tmp_path, "resumed", "--workers", "2")
    args = build_parser().parse_args(argv)
    args.stop_after = 1      # what an interruption after the first step leaves
    assert args.func(args) == 0
    assert not (out / "appearance.pt").exists()
    assert main(argv + ["--resume"]) == 0
    finals.append(out / "appearance.pt")
    weights = [torch.load(f, map_location="cpu", weights_only=True)["net"] for f in finals]
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        for key in weights[0]:
            assert torch.equal(other[key], weights[0][key]), key


def test_a_wrong_body_pool_or_worker_count_is_a_one_line_error_before_the_run_folder(tmp_path, capsys):
    (tmp_path / "not_a_pool.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    for extra, words in (
        (["--body-pool", str(tmp_path / "missing.npz")], ["no such file"]),
        (["--body-pool", str(tmp_path / "not_a_pool.npz")], ["not a body pool"]),
        (["--body-pool", str(tmp_path / "other.npz")], ["not a body pool"]),
        (["--body-pool", str(tmp_path / "other.npz"), "--data", str(tmp_path)], ["not a body pool"]),
        (["--workers", "-1"], ["--workers"]),
    ):
        argv, out = _train(tmp_path, "run", *extra)
        _one_line_error(capsys, argv, *words)
        assert not out.exists()


@pytest.mark.skipif(not HAS_DATA, reason="../shared/data (real MRI) is not present")
def test_a_body_pool_is_not_mixed_with_a_data_folder(tmp_path, capsys):
    pool = tmp_path / "pool.npz"
    np.savez(pool, n_scans=np.int64(0))
    for extra in (["--data", str(DATA)], ["--tianchi-targets", str(pool)]):
        argv, out = _train(tmp_path, "run", "--body-pool", str(pool), *extra)
        _one_line_error(capsys, argv, "--body-pool", "leave out", extra[0])
        assert not out.exists()


def test_workers_where_processes_cannot_be_forked_are_a_one_line_error(tmp_path, capsys, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    argv, out = _train(tmp_path, "run", "--workers", "2")
    _one_line_error(capsys, argv, "--workers", "fork")
    assert not out.exists()


def test_a_resume_with_the_pool_written_again_is_refused(tmp_path, capsys):
    """The run's settings hold the pool's checksum, not only its path: other bodies are another run."""
    from SpineNetLib.core.scan import Scan
    from SpineNetLib.training.labelling import BodySample, save_body_pool

    def pool_with(value: float):
        scan = Scan(voxels=np.full((64, 64, 3), value, np.float32), spacing_mm=(1.0, 1.0, 4.0),
                    canonical_to_ras=np.eye(4), input_ijk_to_ras=np.eye(4), input_shape_ijk=(64, 64, 3),
                    canonical_to_input_ijk=np.eye(4), input_slice_axis=2)
        body = BodySample(0, 20, np.array([[20.0, 20.0], [40.0, 20.0], [40.0, 40.0], [20.0, 40.0]]))
        save_body_pool(tmp_path / "pool.npz", [scan], [body], [])

    pool_with(100.0)
    argv, out = _train(tmp_path, "run", "--body-pool", str(tmp_path / "pool.npz"), "--steps", "3")
    argv[argv.index("--phantom-fraction") + 1] = "0"
    from SpineNetLib.apps.cli import build_parser

    args = build_parser().parse_args(argv)
    args.stop_after = 1
    assert args.func(args) == 0
    pool_with(50.0)
    _one_line_error(capsys, argv + ["--resume"], "different settings", "body_pool_sha256")


def test_a_weight_average_is_saved_takes_the_same_steps_and_survives_a_resume(tmp_path):
    """``--ema``: the saved network is the weights' moving average, not the last weights; the run takes the
    same steps as one without it (the average draws no random numbers); an interrupted run resumed saves
    what an uninterrupted one saves."""
    import json

    import torch

    from SpineNetLib.apps.cli import build_parser

    def states(out):
        latest = torch.load(out / "checkpoint-latest.pt", map_location="cpu", weights_only=False)
        final = torch.load(out / "appearance.pt", map_location="cpu", weights_only=True)["net"]
        return latest, final

    argv, plain = _train(tmp_path, "plain", "--steps", "3")
    assert main(argv) == 0
    argv, averaged = _train(tmp_path, "averaged", "--steps", "3", "--ema", "0.5")
    assert main(argv) == 0
    (plain_latest, plain_final), (avg_latest, avg_final) = states(plain), states(averaged)
    assert json.loads((averaged / "config.json").read_text())["ema"] == 0.5
    for key, value in plain_latest["model"].items():          # the same steps taken
        assert torch.equal(value, avg_latest["model"][key]), key
    floating = [k for k, v in plain_final.items() if v.is_floating_point()]
    assert any(not torch.equal(plain_final[k], avg_final[k]) for k in floating)
    for key in floating:                                       # the average saved, in half precision
        assert torch.equal(avg_final[key], avg_latest["extra"]["ema"][key].half()), key

    argv, resumed = _train(tmp_path, "resumed", "--steps", "3", "--ema", "0.5")
    args = build_parser().parse_args(argv)
    args.stop_after = 2
    assert args.func(args) == 0 and not (resumed / "appearance.pt").exists()
    assert main(argv + ["--resume"]) == 0
    _, resumed_final = states(resumed)
    for key in avg_final:
        assert torch.equal(resumed_final[key], avg_final[key]), key
