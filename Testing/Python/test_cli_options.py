"""Options of `spinenet` that cannot be right are refused at once, on one line with exit 2, before any work:
an empty output path, more threads than make sense, spacings outside those of spinal MRI."""

from __future__ import annotations

import numpy as np
import pytest

from SpineNetLib import pipeline
from SpineNetLib.apps import cli
from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.inputs.writers import write_image


def _one_error_line(capsys, words: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spinenet: error: ") and words in err[0], err


def _sagittal_volume(path, slice_mm: float = 4.0):
    affine = np.array([[0.0, 0.0, slice_mm, 0.0], [-0.8, 0.0, 0.0, 0.0], [0.0, -0.8, 0.0, 0.0], [0, 0, 0, 1]])
    voxels = np.random.default_rng(1).uniform(0, 1000, (5, 64, 48)).astype(np.float32)
    return write_image(voxels, affine, path)


@pytest.fixture
def no_networks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the networks were loaded")

    monkeypatch.setattr(pipeline, "load_networks", refuse)


@pytest.mark.parametrize("command", [["run", "scan.nii.gz"], ["demo"], ["cohort", "studies"]])
def test_an_empty_output_path_is_refused(tmp_path, monkeypatch, capsys, no_networks, command):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*command, "-o", ""]) == 2
    _one_error_line(capsys, "-o/--output needs a path")
    assert not list(tmp_path.iterdir()), "nothing written into the current folder"


def test_more_threads_than_four_per_core_are_refused(tmp_path, monkeypatch, capsys, no_networks):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    assert cli.main(["run", str(tmp_path), "-o", str(tmp_path / "out"), "--threads", "9"]) == 2
    _one_error_line(capsys, "--threads 9 is more than 4 threads per CPU core of this machine (2 cores: at most 8)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, words", [
    (["--threads-per-worker", "9"], "--threads-per-worker 9 is more than 4 threads per CPU core"),
    (["--workers", "3", "--threads-per-worker", "3"], "--workers 3 x --threads-per-worker 3 is more than 4 threads "
                                                      "per CPU core of this machine (2 cores: at most 8)"),
])
def test_a_local_cohort_cluster_of_more_threads_than_four_per_core_is_refused(tmp_path, monkeypatch, capsys,
                                                                            no_networks, options, words):
    """Before this check, each study failed on its own when torch could not start the threads."""
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    _sagittal_volume(tmp_path / "studies" / "a.nii")
    assert cli.main(["cohort", str(tmp_path / "studies"), "-o", str(tmp_path / "out"), *options]) == 2
    _one_error_line(capsys, words)
    assert not (tmp_path / "out" / "studies").exists()


@pytest.mark.parametrize("option, words", [
    (["--pixel-spacing", "1e-9", "1e-9"], "--pixel-spacing 1e-09 x 1e-09 mm is not plausible for spinal MRI "
                                          "(0.05 to 5 mm)"),
    (["--pixel-spacing", "0.8", "1e308"], "--pixel-spacing 0.8 x 1e+308 mm is not plausible"),
    (["--slice-spacing", "1e9"], "--slice-spacing 1e+09 mm is not plausible for spinal MRI (0.05 to 50 mm)"),
    (["--slice-spacing", "0"], "--slice-spacing must be 1 positive, finite number(s) in mm, got 0"),
    (["--pixel-spacing", "nan", "0.8"], "--pixel-spacing must be 2 positive, finite number(s) in mm, got nan x 0.8"),
])
def test_spacing_overrides_outside_spinal_mri_are_refused(tmp_path, capsys, no_networks, option, words):
    scan = _sagittal_volume(tmp_path / "scan.nii")
    assert cli.main(["run", str(scan), "-o", str(tmp_path / "out"), *option]) == 2
    _one_error_line(capsys, words)
    assert not (tmp_path / "out").exists()


def test_slices_a_metre_apart_are_refused_and_named(tmp_path, capsys, no_networks):
    scan = _sagittal_volume(tmp_path / "scan.nii", slice_mm=1000.0)
    assert cli.main(["run", str(scan), "-o", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "slice spacing 1000 mm is not plausible for spinal MRI (0.05 to 50 mm): check the "
                            "header, or give --slice-spacing")
    assert load_scan(scan, slice_spacing=4.0).spacing_mm[2] == pytest.approx(4.0)   # the way out it names
    # the library's callers (the Slicer module, scripts) get the same range
    with pytest.raises(InputError, match=r"slice_spacing override 60 mm is not plausible"):
        load_scan(scan, slice_spacing=60.0)
