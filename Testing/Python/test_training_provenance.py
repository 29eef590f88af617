"""A training run says which code and machine made its weights (training/provenance.py): the run folder's
``provenance.json`` holds every start and resume, and the final weights carry the code's fingerprint, so a
shipped network can be traced to the code that trained it (MODEL_CARD.md, "Repeating the recipe")."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from SpineNetLib.apps.cli import main
from SpineNetLib.training.common import CHECKPOINT_NAME, PROVENANCE_NAME, RunFolder
from SpineNetLib.training.provenance import PACKAGE_ROOT, code_sha256, git_state
from SpineNetLib.weights import checkpoints

TINY_DETECTOR = ["--batch-size", "1", "--phantom-fraction", "1", "--n-phantoms", "1", "--base-width", "2",
                 "--no-val", "--calibrate-cases", "0"]


def test_a_finished_and_resumed_run_names_the_code_that_trained_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SPINENET_DATA", str(tmp_path / "nonexistent"))
    out = tmp_path / "run"
    assert main(["train", "detector", "--out", str(out), "--steps", "1", *TINY_DETECTOR,
                 "--config-blocks", "1", "1", "1", "1"]) == 0
    assert main(["train", "detector", "--out", str(out), "--steps", "2", "--resume", *TINY_DETECTOR,
                 "--config-blocks", "1", "1", "1", "1"]) == 0

    runs = json.loads((out / PROVENANCE_NAME).read_text())
    assert [r["resume"] for r in runs] == [False, True]
    assert {r["code_sha256"] for r in runs} == {code_sha256()}
    meta = checkpoints.load_model("detector", out / "detector.pt").checkpoint_meta
    assert meta["trained_code_sha256"] == code_sha256()
    assert meta["trained_same_code_throughout"] is True
    commit = git_state().get("git_commit")
    assert meta.get("trained_git_commit") == commit


def test_the_shrunk_detector_keeps_the_code_that_trained_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPINENET_DATA", str(tmp_path / "nonexistent"))
    out = tmp_path / "run"
    assert main(["train", "detector", "--out", str(out), "--steps", "1", *TINY_DETECTOR,
                 "--config-blocks", "1", "1", "1", "2"]) == 0
    assert main(["train", "drop-last-block", "--detector", str(out / "detector.pt"),
                 "--out", str(tmp_path / "small.pt")]) == 0
    meta = checkpoints.load_model("detector", tmp_path / "small.pt").checkpoint_meta
    assert meta["trained_code_sha256"] == code_sha256()


def test_a_run_resumed_from_unrecorded_or_other_code_does_not_claim_one_code(tmp_path):
    def folder_with(provenance):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"kind": "detector"}))
        (run / CHECKPOINT_NAME).write_bytes(b"")
        if provenance is not None:
            (run / PROVENANCE_NAME).write_text(json.dumps(provenance))
        return RunFolder(run, {"kind": "detector"}, resume=True)

    older_version = folder_with(None)
    assert older_version.weights_extra()["trained_same_code_throughout"] is False
    assert older_version.provenance[0]["code_sha256"] is None
    other_code = folder_with([{"resume": False, "code_sha256": "0" * 64}])
    assert other_code.weights_extra()["trained_same_code_throughout"] is False
    assert other_code.weights_extra()["trained_code_sha256"] == code_sha256()   # the last start's code
    same_code = folder_with([{"resume": False, "code_sha256": code_sha256()}])
    assert same_code.weights_extra()["trained_same_code_throughout"] is True


def test_the_fingerprint_follows_every_source_file_and_nothing_else(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub" / "__pycache__").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    first = code_sha256(package)
    (package / "sub" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\0")
    (package / "notes.txt").write_text("not code")
    assert code_sha256(package) == first
    (package / "sub" / "b.py").write_text("y = 3\n")
    assert code_sha256(package) != first
    (package / "sub" / "b.py").write_text("y = 2\n")
    assert code_sha256(package) == first
    (package / "sub" / "b.py").rename(package / "sub" / "c.py")
    assert code_sha256(package) != first
    assert len(code_sha256(PACKAGE_ROOT)) == 64


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_uncommitted_changes_of_the_code_are_listed(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "__init__.py").write_text("")
    assert git_state(tmp_path) == {}    # no commit yet
    git("add", "a.py", "__init__.py")
    git("commit", "-q", "-m", "a")
    clean = git_state(tmp_path)
    assert len(clean["git_commit"]) == 40 and clean["git_changed_files"] == [] and clean["git_changed_count"] == 0
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "new.py").write_text("")
    (tmp_path / "data.json").write_text("{}")
    changed = git_state(tmp_path)
    assert changed["git_commit"] == clean["git_commit"]
    assert changed["git_changed_files"] == ["a.py", "new.py"] and changed["git_changed_count"] == 2
    # a package copied into another checkout without being tracked there (installed in a project's venv)
    (tmp_path / "venv" / "pkg").mkdir(parents=True)
    (tmp_path / "venv" / "pkg" / "__init__.py").write_text("")
    assert git_state(tmp_path / "venv" / "pkg") == {}


def test_weights_info_prints_what_each_network_file_records(tmp_path, monkeypatch, capsys):
    from SpineNetLib.weights.resolve import BUNDLED_DIR

    monkeypatch.setenv("SPINENET_DATA", str(tmp_path / "nonexistent"))
    assert main(["train", "detector", "--out", str(tmp_path / "run"), "--steps", "1", *TINY_DETECTOR,
                 "--config-blocks", "1", "1", "1", "1"]) == 0
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(tmp_path / "run" / "detector.pt", folder / "detector.pt")
    for name in ("appearance.pt", "context.pt", "grading.pt"):
        shutil.copy(BUNDLED_DIR / name, folder / name)
    capsys.readouterr()
    assert main(["weights", "info", str(folder)]) == 0
    lines = {line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines()[1:]}
    assert sorted(lines) == ["appearance", "context", "detector", "grading"]
    assert f"trained_code_sha256 {code_sha256()[:12]}," in lines["detector"] and "seed 0" in lines["detector"]
    assert "herniation_logit_shift 1.0" in lines["grading"] and "trained_heads fc_hrn" in lines["grading"]
    assert "loss" not in lines["appearance"]    # the official layout's NaN placeholder is not printed


def test_weights_info_reads_no_torch_and_refuses_a_missing_folder_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys; from SpineNetLib.apps.cli import main; "
                           "code = main(['weights', 'info', 'bundled']); print('torch' in sys.modules, code)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False 0", done.stdout + done.stderr
    missing = subprocess.run([sys.executable, "-m", "SpineNetLib", "weights", "info", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr
