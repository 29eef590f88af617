"""Options of ``spinenet train ...`` a user can get wrong: one stderr line and exit status 2, before any work
(never exit 1 "internal error"); run settings that a resume from another folder must still match."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from SpineNetLib.apps.cli import main
from SpineNetLib.core.errors import InputError

RUN_COMMANDS = {
    "detector": ["--phantom-fraction", "1"],
    "appearance": ["--phantom-fraction", "1"],
    "context": [],
    "grader": ["--phantoms", "2"],
}


def _refused(capsys, cmd, *words):
    """Exit 2 with one stderr line holding every word, no traceback."""
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("command", sorted(RUN_COMMANDS))
@pytest.mark.parametrize("option, value", [
    ("--lr", "-1"), ("--lr", "nan"), ("--lr", "0"), ("--weight-decay", "-1"), ("--save-every", "0"),
    ("--threads", "-1"), ("--threads", "0"), ("--device", "banana"),
])
def test_a_bad_run_option_is_a_one_line_error_before_the_run_folder(tmp_path, capsys, command, option, value):
    out = tmp_path / "run"
    _refused(capsys, ["train", command, "--out", str(out), "--steps", "1", *RUN_COMMANDS[command], option, value],
             option)
    assert not out.exists()


@pytest.mark.parametrize("command, options, word", [
    ("grader", ["--phantoms", "2", "--ema", "1"], "--ema"),
    ("grader", ["--phantoms", "2", "--ema", "-0.5"], "--ema"),
    ("grader", ["--phantoms", "2", "--head-lr", "-1"], "--head-lr"),
    ("grader", ["--phantoms", "2", "--augment", "nan"], "--augment must be a finite number"),
    ("detector", ["--tianchi-fraction", "3"], "--tianchi-fraction"),
    ("detector", ["--focus-share", "-2"], "--focus-share"),
    ("detector", ["--val-every", "-1"], "--val-every"),
    ("detector", ["--max-rotation", "120"], "--max-rotation"),
    ("detector", ["--max-rotation", "nan"], "--max-rotation"),
    ("appearance", ["--tianchi-fraction", "1.5"], "--tianchi-fraction"),
    ("appearance", ["--phantom-fraction", "nan"], "--phantom-fraction"),
    ("appearance", ["--edge-gap", "-0.1"], "--edge-gap"),
    ("appearance", ["--edge-gap", "nan"], "--edge-gap"),
    ("appearance", ["--ema", "1"], "--ema"),
    ("appearance", ["--ema", "nan"], "--ema"),
    ("appearance", ["--robust-distil", "-1"], "--robust-distil must not be negative"),
    ("appearance", ["--robust-distil", "nan"], "--robust-distil must be a finite number"),
    ("detector", ["--distil", "inf"], "--distil must be a finite number"),
    ("detector", ["--annotation-weight", "nan"], "--annotation-weight must be a finite number"),
    ("detector", ["--augment", "-1"], "--augment must not be negative"),
    ("appearance", ["--augment", "nan"], "--augment must be a finite number"),
    ("context", ["--repeat-s1-penalty", "-5"], "--repeat-s1-penalty"),
    ("context", ["--val-batches", "0"], "--val-batches"),
])
def test_a_nonsense_value_is_refused(tmp_path, capsys, command, options, word):
    out = tmp_path / "run"
    _refused(capsys, ["train", command, "--out", str(out), "--steps", "1", *options], word)
    assert not out.exists()


@pytest.mark.parametrize("command", ["detector", "appearance"])
def test_a_missing_default_data_root_is_an_error_unless_phantoms_only_is_asked_for(tmp_path, capsys, monkeypatch,
                                                                                   command):
    monkeypatch.setenv("SPINENET_DATA", str(tmp_path / "nonexistent"))
    _refused(capsys, ["train", command, "--out", str(tmp_path / "run"), "--steps", "1"],
             "no data folder", "--phantom-fraction 1")
    assert not (tmp_path / "run").exists()


def test_phantom_only_training_without_a_data_root_still_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPINENET_DATA", str(tmp_path / "nonexistent"))
    out = tmp_path / "run"
    assert main(["train", "detector", "--out", str(out), "--steps", "1", "--batch-size", "1",
                 "--phantom-fraction", "1", "--n-phantoms", "1", "--config-blocks", "1", "1", "1", "1",
                 "--base-width", "2", "--no-val", "--calibrate-cases", "0"]) == 0
    assert (out / "detector.pt").is_file()
    assert json.loads((out / "config.json").read_text())["data"] is None


def test_an_init_file_that_is_no_checkpoint_is_said_to_be_so(tmp_path, capsys):
    bad = tmp_path / "corrupt.json"
    bad.write_text('{"not": "a checkpoint"}\n')
    err = _refused(capsys, ["train", "detector", "--out", str(tmp_path / "run"), "--steps", "1",
                            "--phantom-fraction", "1", "--init", str(bad)], "not a readable checkpoint")
    assert "approve" not in err


def test_calibrate_labelling_checks_its_output_and_threads_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    nodata = str(tmp_path / "nodata")
    # the output's folder is checked (created where missing) before the data is even looked at
    _refused(capsys, ["train", "calibrate-labelling", "--weights", "bundled", "--data", nodata,
                      "--out", str(blocker / "ctx.pt")], "afile")
    _refused(capsys, ["train", "calibrate-labelling", "--weights", "bundled", "--data", nodata,
                      "--out", str(tmp_path / "new" / "ctx.pt")], "no data folder")
    assert (tmp_path / "new").is_dir()
    _refused(capsys, ["train", "calibrate-labelling", "--weights", "bundled", "--data", nodata,
                      "--out", str(tmp_path / "ctx.pt"), "--threads", "-2"], "--threads")


def test_calibration_refuses_when_no_study_could_be_scored():
    import numpy as np

    from SpineNetLib.training.calibrate_labelling import StudyInputs, calibrate

    studies = [StudyInputs(f"case{i}", None, [], np.zeros((0, 24)), np.zeros((0, 24))) for i in range(3)]
    with pytest.raises(InputError, match="no calibration study could be scored"):
        calibrate(studies, log=lambda *a: None)


def test_a_resume_from_another_folder_with_the_absolute_file_path_finds_the_same_settings(tmp_path, monkeypatch):
    from SpineNetLib.training.common import CHECKPOINT_NAME, RunFolder, real_data_config

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    targets = tmp_path / "a" / "targets.json"

    def config(typed):
        return {"kind": "detector", **real_data_config(argparse.Namespace(init=None, tianchi_targets=typed,
                                                                          tianchi_fraction=0.4))}

    monkeypatch.chdir(tmp_path / "a")
    RunFolder(tmp_path / "run", config("targets.json"), resume=False)
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tianchi_targets"] == str(targets)
    monkeypatch.chdir(tmp_path / "b")
    RunFolder(tmp_path / "run", config(str(targets)), resume=True)
    with pytest.raises(InputError, match="tianchi_targets"):
        RunFolder(tmp_path / "run", config("targets.json"), resume=True)   # b/targets.json: another file


def test_a_run_records_its_targets_contents_and_a_resume_refuses_them_written_again(tmp_path):
    """The pseudo-label file is training data: another version of ``train tianchi-targets`` writes other
    outlines at the same path, and the run must say which it learned from."""
    from SpineNetLib.core.files import sha256_file
    from SpineNetLib.training.common import CHECKPOINT_NAME, RunFolder, real_data_config

    targets = tmp_path / "targets.json"
    targets.write_text('{"cases": [1]}')
    config = {"kind": "detector", **real_data_config(argparse.Namespace(init=None, tianchi_targets=str(targets),
                                                                      tianchi_fraction=0.4))}
    RunFolder(tmp_path / "run", config, resume=False)
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"")
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["tianchi_targets_sha256"] == sha256_file(targets)
    assert "init_sha256" not in recorded
    RunFolder(tmp_path / "run", config, resume=True)
    targets.write_text('{"cases": [2]}')
    with pytest.raises(InputError, match="different settings.*tianchi_targets_sha256"):
        RunFolder(tmp_path / "run", config, resume=True)


def test_a_run_folder_of_an_older_version_without_file_contents_still_resumes(tmp_path):
    from SpineNetLib.training.common import CHECKPOINT_NAME, RunFolder

    targets = tmp_path / "t.json"
    targets.write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "detector", "tianchi_targets": str(targets), "init": None}))
    (run / CHECKPOINT_NAME).write_bytes(b"")
    folder = RunFolder(run, {"kind": "detector", "tianchi_targets": str(targets), "init": None}, resume=True)
    assert "tianchi_targets_sha256" not in folder.config


def test_a_run_folder_of_an_older_version_with_a_relative_path_still_resumes_from_its_folder(tmp_path, monkeypatch):
    from SpineNetLib.training.common import CHECKPOINT_NAME, RunFolder

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "detector", "tianchi_targets": "t.json", "init": None}))
    (run / CHECKPOINT_NAME).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    RunFolder(run, {"kind": "detector", "tianchi_targets": str(tmp_path / "t.json"), "init": None}, resume=True)


@pytest.mark.parametrize("command", [
    ["tianchi-targets", "--detector", "missing.pt", "--data", "nodata"],
    ["volume-s1-targets", "--data", "nodata"],
    ["drop-last-block", "--detector", "missing.pt"],
])
def test_a_one_file_command_checks_its_output_folder_first(tmp_path, capsys, monkeypatch, command):
    """Its --out folder is made (here: refused, a file is in the way) before the detector or data are read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    _refused(capsys, ["train", *command, "--out", "afile/x"], "afile")


def test_a_stride_outside_0_to_1_is_refused_before_the_output_folder(tmp_path, capsys):
    _refused(capsys, ["train", "tianchi-targets", "--detector", "missing.pt", "--stride-fraction", "1.5",
                      "--out", str(tmp_path / "new" / "t.json")], "--stride-fraction must be in (0, 1]")
    assert not (tmp_path / "new").exists()


def test_missing_target_files_and_negative_phantoms_are_refused_at_once(tmp_path, capsys):
    """A missing --tianchi-targets / --volume-s1-targets / --init is named before any data is loaded (it
    used to fail after half a minute of loading), and --phantoms -1 is no count of phantoms."""
    from SpineNetLib.apps import cli

    missing = str(tmp_path / "missing.json")
    for argv in (["train", "detector", "--out", str(tmp_path / "d"), "--tianchi-targets", missing],
                 ["train", "appearance", "--out", str(tmp_path / "a"), "--volume-s1-targets", missing],
                 ["train", "detector", "--out", str(tmp_path / "i"), "--init", missing]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"no such file {missing}" in err[0], err
        assert not Path(argv[3]).exists()   # no run folder made
    assert cli.main(["train", "grader", "--out", str(tmp_path / "g"), "--phantoms", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--phantoms must not be negative" in err[0], err


def test_a_grader_resume_reading_the_clinical_slices_from_another_data_root_is_refused(tmp_path):
    """--tianchi-data names where the targets' slices are read: another root is other training data."""
    from SpineNetLib.training.common import CHECKPOINT_NAME, RunFolder
    from SpineNetLib.training.grader import _run_config, add_grader_parser

    parser = argparse.ArgumentParser()
    add_grader_parser(parser.add_subparsers())

    def config(*extra):
        args = parser.parse_args(["grader", "--tianchi-targets", str(tmp_path / "t.json"), "--out",
                                  str(tmp_path / "run"), *extra])
        return _run_config(args, [], None)

    RunFolder(tmp_path / "run", config("--tianchi-data", str(tmp_path / "a")), resume=False)
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"")
    RunFolder(tmp_path / "run", config("--tianchi-data", str(tmp_path / "a")), resume=True)
    with pytest.raises(InputError, match="tianchi_data"):
        RunFolder(tmp_path / "run", config("--tianchi-data", str(tmp_path / "b")), resume=True)
    with pytest.raises(InputError, match="tianchi_data"):
        RunFolder(tmp_path / "run", config(), resume=True)
