"""`spinenet cohort`: study discovery, a real local Dask cluster with the bundled networks, resuming,
failures, and a worker killed in the middle of a study (its study retried by Dask, or reported and
run by the next run; never lost, never written twice)."""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from SpineNetLib.apps import cli
from SpineNetLib.cohort import run as cohort_run
from SpineNetLib.cohort.discover import discover_studies, make_study_id
from SpineNetLib.cohort.run import CohortProgress, CohortSettings, StudyOutcome, process_study, run_cohort
from SpineNetLib.inputs.writers import write_dicom_series
from SpineNetLib.outputs.files import check_writable, write_results
from SpineNetLib.synthetic.phantom import make_phantom

#: Small lumbar phantoms: a study takes a few seconds with the bundled networks on one CPU thread.
PHANTOM = dict(fov="lumbar", shape=(128, 128), pixel_spacing=(2.3, 2.3), n_slices=7)
FAST = CohortSettings(preview=False, threads=1)


def _phantom(seed: int, **kwargs):
    return make_phantom(**{**PHANTOM, **kwargs}, seed=seed)


def _image_root(root: Path, n: int) -> Path:
    for i in range(n):
        _phantom(i).write_nifti(root / f"site{i % 2}" / f"patient{i}.nii.gz")
    return root


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _check_exactly_once(outdir: Path, studies, finished: set[str]) -> None:
    """Every finished study has one complete folder and its rows once in the tables; no folder else."""
    studies_dir = outdir / "studies"
    visible = sorted(p.name for p in studies_dir.iterdir() if not p.name.startswith("."))
    assert visible == sorted(finished)
    vertebrae_rows = _rows(outdir / "cohort_vertebrae.csv")
    disc_rows = _rows(outdir / "cohort_discs.csv")
    for study in studies:
        if study.study_id not in finished:
            assert not [r for r in vertebrae_rows if r["study"] == study.study_id]
            continue
        folder = studies_dir / study.study_id
        assert (folder / "result.json").is_file()
        doc = json.loads((folder / "vertebrae.json").read_text())
        discs = json.loads((folder / "discs.json").read_text())
        mine = [r for r in vertebrae_rows if r["study"] == study.study_id]
        assert [r["level"] for r in mine] == [v["level"] for v in doc["vertebrae"]]
        assert [r["Level"] for r in disc_rows if r["study"] == study.study_id] == [d["level"] for d in discs["discs"]]


@pytest.fixture(scope="module")
def cluster():
    """The local cluster `spinenet cohort` would start (2 workers), shared by this module's runs through
    --scheduler (a cluster of its own costs each command about 7 s of worker start and network loading;
    test_cohort_command_on_a_local_cluster_of_two_workers starts one), and so that a test can kill one of
    its workers."""
    with cohort_run.local_cluster(2) as local, Client(local) as client:
        yield local.scheduler_address, client


def _on(cluster) -> list[str]:
    """The command's options to run on the module's cluster."""
    address, _ = cluster
    return ["--scheduler", address]


# --------------------------------------------------------------------------- discovery (no cluster)

def test_discovery_finds_image_files_and_sagittal_series(tmp_path):
    root = tmp_path / "root"
    for i, name in enumerate(["a/scan.nii.gz", "a/scan.nrrd", "b/c d/scan (2).mha", ".hidden/x.nii.gz"]):
        _phantom(i, shape=(64, 64), n_slices=4).write_nifti(root / name)
    t2 = _phantom(5, shape=(64, 64), n_slices=4)
    t1 = _phantom(5, shape=(64, 64), n_slices=4, contrast="T1")
    exam = {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1"}
    t2.write_dicom(root / "exam1", series_description="T2 SAG", extra_tags={**exam, "SeriesNumber": 3})
    # the T1 series split over two sub-folders: still one study, read from their common folder
    files = t1.write_dicom(tmp_path / "t1", series_description="T1 SAG", extra_tags={**exam, "SeriesNumber": 2})
    for n, f in enumerate(files):
        target = root / "exam1" / "t1" / ("part1" if n % 2 else "part2") / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        f.rename(target)
    axial = np.diag([1.0, 1.0, 4.0, 1.0])
    write_dicom_series(t2.voxels_kji, axial, root / "exam1" / "axial", series_description="T2 AX",
                       extra_tags={**exam, "SeriesNumber": 4})
    write_dicom_series(t2.voxels_kji, axial, root / "exam2", series_description="only axial")
    # a sagittal scout of exam1 (ImageType LOCALIZER) is no study either
    write_dicom_series(t2.voxels_kji, t2.ijk_to_ras, root / "exam1" / "scout", series_description="SAG LOC",
                       seed=4, extra_tags={**exam, "SeriesNumber": 1,
                                           "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    (root / "exam2" / "notes.txt").write_text("not an image")
    # a sagittal CT beside exam1's MR series is no study; an exam of a sagittal CT alone is a failure
    ct = {"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}
    write_dicom_series(t2.voxels_kji, t2.ijk_to_ras, root / "exam1" / "ct", series_description="CT SAG",
                       extra_tags={**exam, "SeriesNumber": 5, **ct})
    write_dicom_series(t2.voxels_kji, t2.ijk_to_ras, root / "exam3", series_description="CT SAG", extra_tags=ct,
                       seed=3)   # UIDs of its own (they derive from the voxels and the seed)
    out = root / "out"   # the output folder under the root: its own images are no study
    _phantom(9, shape=(64, 64), n_slices=4).write_nifti(out / "studies" / "x" / "hotspots_P.nii.gz")

    found = discover_studies(root, exclude=[out])
    by_input = {(s.relative, s.kind): s for s in found.studies}
    assert sorted(by_input) == [("a/scan.nii.gz", "image"), ("a/scan.nrrd", "image"),
                                ("b/c d/scan (2).mha", "image"), ("exam1", "dicom"), ("exam1/t1", "dicom")]
    ids = [s.study_id for s in found.studies]
    assert len(set(i.lower() for i in ids)) == len(ids), "unique, even on a file system that ignores case"
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) and not i.startswith(".") for i in ids), ids
    assert by_input[("b/c d/scan (2).mha", "image")].study_id.startswith("b__c_d__scan_2-")
    assert by_input[("exam1", "dicom")].study_id.startswith("exam1__s3_T2_SAG-")
    assert by_input[("exam1/t1", "dicom")].study_id.startswith("exam1__t1__s2_T1_SAG-")
    assert by_input[("exam1/t1", "dicom")].series_uid != by_input[("exam1", "dicom")].series_uid
    # the exam without a sagittal series is a failure, with its reason; the axial series of exam1 is no study
    assert [(f.input, "no sagittal series" in f.reason, "axial" in f.reason) for f in found.failures] == \
        [("exam2", True, True), ("exam3", False, False)]
    assert found.failures[1].reason.startswith("no sagittal MR series in this DICOM exam: its sagittal series are CT")
    # stable: the same ids on a second look, and when the root is moved
    moved = tmp_path / "moved"
    root.rename(moved)
    again = discover_studies(moved, exclude=[moved / "out"])
    assert [s.study_id for s in again.studies] == ids
    assert make_study_id(["a", "b"], "k") == make_study_id(["a", "b"], "k") != make_study_id(["a", "b"], "k2")


def test_the_studies_in_zip_archives_are_found_and_run_from_them(tmp_path, monkeypatch):
    """A ZIP archive under the root is looked through as a folder: its image files and sagittal series are
    studies with stable ids, run from the archive (DICOM results included) with nothing left unpacked; an
    archive that cannot be unpacked is a failure."""
    import shutil
    import tempfile

    root = tmp_path / "root"
    exam = tmp_path / "exam"
    _phantom(3).write_dicom(exam / "SAG_T2", series_description="T2 SAG", extra_tags={"SeriesNumber": 3})
    (root / "site").mkdir(parents=True)
    shutil.make_archive(str(root / "site" / "p7"), "zip", exam)
    _phantom(4).write_nifti(tmp_path / "image" / "scan.nii.gz")
    shutil.make_archive(str(root / "p8"), "zip", tmp_path / "image")
    (root / "broken.zip").write_bytes(b"PK\x05\x06" + bytes(18))      # an empty archive: no files
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))

    found = discover_studies(root)
    assert [(s.relative, s.kind, s.inner) for s in found.studies] == [
        ("p8.zip/scan.nii.gz", "image", "scan.nii.gz"), ("site/p7.zip/SAG_T2", "dicom", "SAG_T2")]
    assert found.studies[0].study_id.startswith("p8__scan-")
    assert found.studies[1].study_id.startswith("site__p7__SAG_T2__s3_T2_SAG-")
    assert [(f.input, "holds no files" in f.reason) for f in found.failures] == [("broken.zip", True)]
    assert [s.study_id for s in discover_studies(root).studies] == [s.study_id for s in found.studies]
    assert not any(temporary.iterdir())

    settings = CohortSettings(preview=False, dicom=True)
    outcomes = [process_study(s, str(tmp_path / "studies"), settings) for s in found.studies]
    assert [o.status for o in outcomes] == ["done", "done"], outcomes
    dicom = tmp_path / "studies" / found.studies[1].study_id
    assert sorted(json.loads((dicom / "result.json").read_text()).get("dicom")) == ["report.dcm", "segmentation.dcm"]
    assert [v["level"] for v in json.loads((dicom / "vertebrae.json").read_text())["vertebrae"]][-1] == "S1"
    assert not any(temporary.iterdir())


def test_t2_only_runs_each_exams_sagittal_t2_series(tmp_path):
    """`spinenet cohort --t2-only`: of an exam's sagittal T1, T2 and STIR (told apart by their echo,
    repetition and inversion times only) the T2 alone is a study, inside a ZIP archive too; an exam
    without a T2-weighted sagittal series is a failure naming the series it has; image files, which carry
    no such header, are studies either way. Without it, every sagittal series is a study."""
    import shutil

    times = {"T1": {"EchoTime": 10, "RepetitionTime": 550}, "T2": {"EchoTime": 95, "RepetitionTime": 3500},
             "STIR": {"EchoTime": 40, "RepetitionTime": 4000, "InversionTime": 160, "ScanningSequence": "IR"}}
    root = tmp_path / "root"
    for number, name in enumerate(times, start=2):
        _phantom(number, n_slices=4).write_dicom(root / "p1" / f"sag{number}", series_description=f"sag {number}",
                                                 extra_tags={**times[name], "SeriesNumber": number,
                                                             "StudyInstanceUID": "1.2.3.1"})
    _phantom(5, n_slices=4).write_dicom(root / "p2" / "sag", series_description="sag tse",
                                        extra_tags={**times["T1"], "SeriesNumber": 7, "StudyInstanceUID": "1.2.3.2"})
    _phantom(6, n_slices=4).write_dicom(tmp_path / "exam3" / "sag", series_description="sag",
                                        extra_tags={**times["T2"], "StudyInstanceUID": "1.2.3.3"})
    _phantom(7, n_slices=4).write_dicom(tmp_path / "exam3" / "sag_t1", series_description="sag b",
                                        extra_tags={**times["T1"], "StudyInstanceUID": "1.2.3.3"})
    shutil.make_archive(str(root / "p3"), "zip", tmp_path / "exam3")
    _phantom(8).write_nifti(root / "p4.nii.gz")

    every = discover_studies(root)
    assert len(every.studies) == 7 and not every.failures
    found = discover_studies(root, only_t2=True)
    assert [s.relative for s in found.studies] == ["p1/sag3", "p3.zip/sag", "p4.nii.gz"]
    assert {s.study_id for s in found.studies} <= {s.study_id for s in every.studies}   # the same ids
    (failure,) = found.failures
    assert failure.input == "p2/sag"
    assert failure.reason == ("no sagittal series of this DICOM exam says T2-weighted in its header (--t2-only): "
                              "T1 series 7 'sag tse'")


def test_a_study_in_an_archive_of_several_unpacks_only_its_own_folder(tmp_path):
    """An archive holding a whole exam: each study unpacks the folder of its own series (or image file)
    alone, not the other series; a study whose folder the archive no longer holds says so."""
    import shutil
    import zipfile

    from SpineNetLib.cohort.discover import Study, study_input
    from SpineNetLib.core.errors import InputError

    exam = tmp_path / "exam"
    _phantom(3, n_slices=4).write_dicom(exam / "SAG_T2", series_description="T2 SAG")
    _phantom(4, n_slices=4).write_dicom(exam / "SAG_T1", series_description="T1 SAG")
    _phantom(5).write_nifti(exam / "images" / "scan.nii.gz")
    (tmp_path / "root").mkdir()
    shutil.make_archive(str(tmp_path / "root" / "p1"), "zip", exam)
    studies = discover_studies(tmp_path / "root").studies
    assert sorted(s.inner for s in studies) == ["SAG_T1", "SAG_T2", "images/scan.nii.gz"]
    for study in studies:
        with study_input(study) as path:
            root = path.parents[len(Path(study.inner).parts) - 1]     # the folder the archive unpacks into
            tops = {p.relative_to(root).parts[0] for p in root.rglob("*") if p.is_file()}
            assert tops == {Path(study.inner).parts[0]}, (study.inner, tops)
    with zipfile.ZipFile(tmp_path / "root" / "p1.zip", "w") as other:    # the archive changed since
        other.writestr("notes.txt", "no images")
    gone = next(s for s in studies if s.inner == "SAG_T1")
    with pytest.raises(InputError, match="p1.zip holds nothing under SAG_T1"):
        with study_input(gone):
            pass
    assert isinstance(gone, Study)


def test_a_folder_of_zip_archives_alone_is_a_cohort(tmp_path, capsys, cluster):
    """A cohort delivered as archives only (one per patient) runs; it is not 'no study found'."""
    import shutil

    _phantom(4).write_nifti(tmp_path / "image" / "scan.nii.gz")
    (tmp_path / "root").mkdir()
    shutil.make_archive(str(tmp_path / "root" / "p8"), "zip", tmp_path / "image")
    status = cli.main(["cohort", str(tmp_path / "root"), "-o", str(tmp_path / "out"), *_on(cluster),
                       "--no-preview"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert [r["input"] for r in _rows(tmp_path / "out" / "cohort_studies.csv")] == ["p8.zip/scan.nii.gz"]


def test_progress_line_counts_and_eta():
    import io

    stream = io.StringIO()
    meter = CohortProgress(total=4, finished_before=1, stream=stream, min_interval_s=0.0)
    meter.update()
    assert stream.getvalue().splitlines()[-1] == "studies: 1/4, failed 0, ETA --:--"
    meter.update(StudyOutcome("a", "done"))
    meter.update(StudyOutcome("b", "failed", "bad"))
    assert re.fullmatch(r"studies: 2/4, failed 1, ETA \d\d:\d\d", stream.getvalue().splitlines()[-1])
    meter.update(StudyOutcome("c", "done"))
    assert stream.getvalue().splitlines()[-1] == "studies: 3/4, failed 1, ETA 00:00"


# --------------------------------------------------------------------------- the command, a local cluster

def test_cohort_command_on_a_local_cluster_of_two_workers(tmp_path, capsys):
    import shutil

    root = _image_root(tmp_path / "root", 3)
    _phantom(7).write_dicom(root / "site2" / "exam")
    _phantom(6).write_dicom(tmp_path / "zipped" / "exam")     # a study in a ZIP archive: found and run by the workers
    shutil.make_archive(str(root / "site2" / "p6"), "zip", tmp_path / "zipped")
    (root / "site1" / "broken.nii.gz").write_bytes(b"\x1f\x8b not an image")
    # an exam with no sagittal series gives no study: it fails before any study runs, and counts
    write_dicom_series(_phantom(8, shape=(64, 64), n_slices=4).voxels_kji, np.diag([1.0, 1.0, 4.0, 1.0]),
                       root / "site3" / "axial_exam", series_description="only axial")
    out = tmp_path / "out"
    status = cli.main(["cohort", str(root), "-o", str(out), "--workers", "2", "--threads-per-worker", "1",
                       "--no-preview"])
    captured = capsys.readouterr()
    assert status == cli.EXIT_SOME_STUDIES_FAILED, captured.err
    assert "6 studies and 1 DICOM exam without one: 5 done now, 0 done before, 2 failed" in captured.out
    progress = captured.err.strip().splitlines()
    assert progress[0] == "studies: 0/7, failed 1, ETA --:--" and progress[-1] == "studies: 5/7, failed 2, ETA 00:00"
    assert "Traceback" not in captured.err

    studies = discover_studies(root).studies
    good = {s.study_id for s in studies if "broken" not in s.relative}
    _check_exactly_once(out, studies, good)
    assert not [p for p in (out / "studies").iterdir() if p.name.startswith(".")], "no partial folder left"
    failures = _rows(out / "cohort_failures.csv")
    assert [(f["input"], "broken.nii.gz" in f["reason"] or "no sagittal series" in f["reason"])
            for f in failures] == [("site3/axial_exam", True), ("site1/broken.nii.gz", True)]
    assert all("\n" not in f["reason"] for f in failures)
    discs = _rows(out / "cohort_discs.csv")
    assert {"study", "input", "Level", "Herniation", "Herniation_probability", "Disc height mean (mm)",
            "labelling_confidence", "labelling_warning", "measurement_warning"} <= set(discs[0])
    for folder in ("site2/exam", "site2/p6.zip/exam"):
        dicom_rows = [r for r in discs if r["input"] == folder]
        assert dicom_rows and all(r["series_uid"] for r in dicom_rows), folder
    assert all(r["Herniation_probability"] and r["labelling_confidence"] for r in discs), "graded, confidence"
    summary = _rows(out / "cohort_studies.csv")
    assert sorted(r["study"] for r in summary) == sorted(good)
    for row in summary:
        doc = json.loads((out / "studies" / row["study"] / "vertebrae.json").read_text())
        levels = [v["level"] for v in doc["vertebrae"]]
        assert row["vertebrae"] == str(len(levels)) and row["levels"] == f"{levels[0]}..{levels[-1]}"
        assert row["levels_need_review"] == str(doc["labelling"]["needs_review"]).lower()
        assert row["grading"] == "done" and row["corrected_by_user"] == "false" and row["preview"] == ""  # --no-preview
    flagged = sum(r["levels_need_review"] == "true" for r in summary)
    assert (f"{flagged} of the finished studies ask for a review of their levels" in captured.out) == (flagged > 0)
        # the networks were loaded once per worker: at most two studies paid for the loading
    loads = [json.loads((out / "studies" / i / "vertebrae.json").read_text())["timings_s"].get("load_networks")
             for i in good]
    assert 1 <= sum(x is not None for x in loads) <= 2, loads


def test_bad_cohort_inputs_are_one_line_errors(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    image_root = _image_root(tmp_path / "root", 1)
    t1_root = tmp_path / "t1"
    _phantom(2, n_slices=4).write_dicom(t1_root / "sag", series_description="T1 SAG")
    cases = [(["cohort", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")], "no such folder"),
             (["cohort", str(t1_root), "-o", str(tmp_path / "o"), "--t2-only", "--workers", "1"],
              "no study found under " + str(t1_root.resolve()) + " (DICOM series, .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd "
              "files); 1 DICOM exam(s) have no sagittal T2-weighted (--t2-only) series"),
             (["cohort", str(empty), "-o", str(tmp_path / "o")], "no study found"),
             (["cohort", str(image_root), "-o", str(tmp_path / "o"), "--scheduler", "nonsense"],
              "cannot connect to the Dask scheduler at nonsense"),
             (["cohort", str(image_root), "-o", str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:9"],
              "cannot connect to the Dask scheduler"),
             (["cohort", str(image_root), "-o", str(tmp_path / "o"), "--weights", str(tmp_path / "no-weights")],
              "weights folder not found"),
             (["cohort", str(image_root), "-o", str(tmp_path / "o"), "--scheduler", "tcp://1.2.3.4:1",
               "--workers", "2"], "--workers")]
    monkeypatch.setattr(cohort_run, "SCHEDULER_TIMEOUT_S", 1)
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("spinenet: error: ") and words in err[0], (argv, err)
        assert not (tmp_path / "o").exists()


def test_resuming_with_settings_that_change_the_results_is_refused(tmp_path, capsys):
    """The tables of one output folder never mix studies run two ways (graded and not, other weights):
    a rerun with such other options is a one-line error before any study runs; options that change no
    result (previews, threads) may differ."""
    root = _image_root(tmp_path / "root", 1)
    out = tmp_path / "out"
    cohort_run.check_same_result_settings(check_writable(out), cohort_run.CohortSettings())   # nothing recorded yet
    cohort_run.record_result_settings(out, cohort_run.CohortSettings())
    recorded = json.loads((out / cohort_run.SETTINGS_FILE).read_text())
    assert recorded["grade"] is True and recorded["weights"] == "bundled"
    # no study finished yet (a first run that failed or was stopped early): any settings may start again
    cohort_run.check_same_result_settings(out, cohort_run.CohortSettings(grade=False))
    (out / "studies" / "a-study").mkdir(parents=True)
    (out / "studies" / "a-study" / "result.json").write_text("{}")
    cohort_run.check_same_result_settings(out, cohort_run.CohortSettings(preview=False, threads=2, device="cpu"))
    # the default profile written out is the same setting as none given
    cohort_run.check_same_result_settings(out, cohort_run.CohortSettings(profile="default"))
    assert cli.main(["cohort", str(root), "-o", str(out), "--no-grade", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds studies run with other settings" in err[0], err
    assert "--no-grade: not given before, given now" in err[0] and '--precision: "fp32" before, "bf16" now' in err[0]
    assert json.loads((out / cohort_run.SETTINGS_FILE).read_text()) == recorded
    # a weights folder is the same folder however it is written
    weights = tmp_path / "w"
    weights.mkdir()
    cohort_run.record_result_settings(check_writable(tmp_path / "o2"), cohort_run.CohortSettings(weights=str(weights)))
    cohort_run.check_same_result_settings(tmp_path / "o2", cohort_run.CohortSettings(weights=str(weights / ".." / "w")))
    # a record from before an option existed: the setting is the default it was run with
    older = {k: v for k, v in recorded.items() if k not in ("precision", "runtime")}
    (out / cohort_run.SETTINGS_FILE).write_text(json.dumps(older))
    cohort_run.check_same_result_settings(out, cohort_run.CohortSettings())
    with pytest.raises(cohort_run.InputError, match='--runtime: "torch" before, "openvino" now'):
        cohort_run.check_same_result_settings(out, cohort_run.CohortSettings(runtime="openvino"))
    # finished studies without a record (an early version, or the file removed): cannot be compared
    (out / cohort_run.SETTINGS_FILE).unlink()
    with pytest.raises(cohort_run.InputError, match="holds finished studies but no cohort_settings.json"):
        cohort_run.check_same_result_settings(out, cohort_run.CohortSettings())
    (out / cohort_run.SETTINGS_FILE).write_text("[1, 2]")
    with pytest.raises(cohort_run.InputError, match="not a JSON object of settings"):
        cohort_run.check_same_result_settings(out, cohort_run.CohortSettings())


# --------------------------------------------------------------------------- a worker killed mid-run

def _kill_a_busy_worker(client: Client, pids: dict[str, int], running: threading.Thread) -> str | None:
    """SIGKILL the process of a worker that holds a study task, as soon as one does."""
    while running.is_alive():
        for worker, keys in client.processing().items():
            if any(str(k).startswith("spinenet-study-") for k in keys) and worker in pids:
                os.kill(pids[worker], signal.SIGKILL)
                return worker
        time.sleep(0.02)
    return None


def _run_and_kill(client: Client, address: str, root: Path, out: Path):
    results: dict = {}
    pids = client.run(os.getpid)
    running = threading.Thread(target=lambda: results.setdefault(
        "result", run_cohort(root, out, FAST, scheduler=address)))
    running.start()
    killed = _kill_a_busy_worker(client, pids, running)
    running.join(timeout=240)
    assert killed is not None and "result" in results
    return results["result"]


#: Seconds to wait for a killed worker's restart (its nanny starts a new process, which imports torch): a
#: minute was too short while another test process (pytest -n 2) loaded the machine.
WORKER_RESTART_S = 300


def test_the_local_workers_malloc_and_openmp_wait_as_the_commands_do(cluster):
    """Not Dask's MALLOC_TRIM_THRESHOLD_=65536 (glibc handing memory back at every large free made a study
    1.6 times slower): the settings of core/process.py, unless the user set glibc's malloc variables; and
    OpenMP's idle threads sleep soon (GOMP_SPINCOUNT=3000) unless the user set how they wait."""
    import os

    from SpineNetLib.core import process

    _, client = cluster
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GOMP_SPINCOUNT")
    seen = client.run(lambda: {name: os.environ.get(name) for name in names})
    assert len(seen) == 2
    if not process.user_tuned_malloc():
        assert all(env[name] == str(process.MALLOC_HEAP_BYTES) for env in seen.values() for name in names[:2])
    assert all(env["MALLOC_TRIM_THRESHOLD_"] != "65536" for env in seen.values())
    expected = os.environ.get("GOMP_SPINCOUNT", "3000" if "OMP_WAIT_POLICY" not in os.environ else None)
    assert all(env["GOMP_SPINCOUNT"] == expected for env in seen.values())


def test_the_local_cluster_serves_no_pages_and_keeps_port_8787_free(cluster):
    """Dask's scheduler and workers serve pages on the run's workers and tasks (named after the studies)
    even with the dashboard off, the scheduler on port 8787: here they serve none, on a free port."""
    import urllib.error
    import urllib.request

    _, client = cluster
    scheduler_port = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.http_server.port)
    assert scheduler_port != 8787
    for page in ("/info/main/workers.html", "/json/identity.json", "/health"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{scheduler_port}{page}", timeout=10)
        assert refused.value.code == 404
    served = client.run(lambda dask_worker: list(dask_worker.http_application.applications))
    assert len(served) == 2 and all(routes == [] for routes in served.values())


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_worker_killed_mid_run_loses_and_doubles_nothing(tmp_path, cluster):
    address, client = cluster
    root = _image_root(tmp_path / "root", 4)
    # Dask retries the killed worker's study elsewhere: every study done once, none failed
    first = _run_and_kill(client, address, root, tmp_path / "retried")
    # "already done": the killed task had renamed its folder into place before it died
    assert first.failures == [] and sorted(o.status for o in first.outcomes) in (
        ["done"] * 4, ["already done"] + ["done"] * 3)
    _check_exactly_once(tmp_path / "retried", first.studies, {s.study_id for s in first.studies})

    # without retries, the killed worker's studies are reported, and the next run does them
    client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    try:
        client.wait_for_workers(2, timeout=WORKER_RESTART_S)
        out = tmp_path / "reported"
        second = _run_and_kill(client, address, root, out)
    finally:
        client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 3))
    failed = {f.study_id for f in second.failures}
    assert failed and all("worker running this study died" in f.reason for f in second.failures)
    assert len(second.outcomes) == 4
    finished = {s.study_id for s in second.studies} - failed
    _check_exactly_once(out, second.studies, finished)
    assert {r["study"] for r in _rows(out / "cohort_failures.csv")} == failed

    mtimes = {i: (out / "studies" / i / "result.json").stat().st_mtime_ns for i in finished}
    third = run_cohort(root, out, FAST, scheduler=address)
    assert third.finished_before == len(finished) and {o.study_id for o in third.outcomes} == failed
    assert third.failures == [] and third.done == len(failed)
    _check_exactly_once(out, third.studies, {s.study_id for s in third.studies})
    assert {i: (out / "studies" / i / "result.json").stat().st_mtime_ns for i in finished} == mtimes
    assert not [p for p in (out / "studies").iterdir() if p.name.startswith(".")], "partial folders removed"
    assert _rows(out / "cohort_failures.csv") == []


class _InterruptAfterFirstStudy:
    """A progress stream that raises KeyboardInterrupt (as Ctrl-C would) once a study has finished."""

    def write(self, text: str) -> None:
        if not text.startswith("studies: 0/"):
            raise KeyboardInterrupt

    def flush(self) -> None:
        pass


def test_an_interrupted_run_keeps_its_finished_studies_and_resumes(tmp_path, cluster):
    address, client = cluster
    # one worker is enough: now and then Dask's nanny does not bring back the worker the test above killed
    # within WORKER_RESTART_S (once in CI; here once in 13 runs, with two busy processes loading the
    # machine, and never without them), and a run then goes on with the workers there are, as a user's does
    client.wait_for_workers(1, timeout=WORKER_RESTART_S)
    root = _image_root(tmp_path / "root", 4)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_cohort(root, out, FAST, scheduler=address, progress=_InterruptAfterFirstStudy())
    studies = discover_studies(root).studies
    # the tables were written on the way out, with the studies finished by then
    in_tables = {r["study"] for r in _rows(out / "cohort_vertebrae.csv")}
    assert in_tables and in_tables <= {s.study_id for s in studies}
    resumed = run_cohort(root, out, FAST, scheduler=address)
    assert resumed.finished_before >= len(in_tables) and resumed.failures == []
    assert resumed.finished_before + len(resumed.outcomes) == 4
    _check_exactly_once(out, studies, {s.study_id for s in studies})
    assert not [p for p in (out / "studies").iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- DICOM outputs

def test_cohort_dicom_out_writes_the_dicom_results_of_dicom_studies_only(tmp_path):
    if "dicom" not in inspect.signature(write_results).parameters:
        pytest.skip("write_results(dicom=) not there yet")
    root = tmp_path / "root"
    _phantom(3).write_dicom(root / "exam")
    _phantom(4).write_nifti(root / "image.nii.gz")
    studies = discover_studies(root).studies
    settings = CohortSettings(preview=False, dicom=True)
    outcomes = {s.kind: process_study(s, str(tmp_path / "studies"), settings) for s in studies}
    assert {k: o.status for k, o in outcomes.items()} == {"dicom": "done", "image": "done"}, outcomes
    by_kind = {s.kind: tmp_path / "studies" / s.study_id for s in studies}
    manifest = json.loads((by_kind["dicom"] / "result.json").read_text())
    assert manifest.get("dicom") and all((by_kind["dicom"] / name).is_file() for name in manifest["dicom"])
    assert not list(by_kind["image"].glob("*.dcm"))


def test_cohort_sequence_sets_the_weighting_of_every_study(tmp_path):
    """`spinenet cohort --sequence T2`: a study whose image reads as T1-weighted is graded as the user says;
    without it, each study's own image decides (a T1 phantom: measured, not graded), and the cohort
    table says which."""
    root = tmp_path / "root"
    _phantom(1, contrast="T1").write_nifti(root / "t1.nii.gz")
    study = discover_studies(root).studies[0]
    for sequence, status, source, said in ((None, "not run", "image", "T1 (image)"), ("T2", "done", "user", "T2 (as given)")):
        studies_dir = tmp_path / f"studies_{sequence}"
        outcome = process_study(study, str(studies_dir), CohortSettings(preview=False, threads=1, sequence=sequence))
        assert outcome.status == "done", outcome
        grading = json.loads((studies_dir / study.study_id / "discs.json").read_text())["grading"]
        assert grading["status"] == status and grading["weighting"]["source"] == source
        rows = _rows(studies_dir / study.study_id / "discs.csv")
        assert rows and {r["sequence"] for r in rows} == {said}
        assert all(bool(r["Herniation_probability"]) == (status == "done") for r in rows)


def test_the_studies_table_points_at_each_studys_preview_and_says_why_it_was_not_graded(tmp_path):
    from SpineNetLib.cohort.tables import COHORT_STUDIES_FILE, cohort_table_texts

    root = tmp_path / "root"
    _phantom(1, contrast="T1").write_nifti(root / "t1.nii.gz")
    study = discover_studies(root).studies[0]
    out = tmp_path / "out"
    assert process_study(study, str(out / "studies"), CohortSettings(threads=1)).status == "done"
    table = cohort_table_texts(out / "studies", [study], [])[COHORT_STUDIES_FILE]
    (row,) = csv.DictReader(table.splitlines())
    assert (out / row["preview"]).is_file() and row["preview"].endswith("/preview.png")
    assert row["grading"].startswith("not run: the grader reads T2-weighted scans") and row["sequence"] == "T1 (image)"
    assert "discs not graded" not in row["other_warnings"]   # said once, in its own column


def test_cohort_sequence_is_checked_at_once_and_kept_across_resumed_runs(tmp_path, capsys):
    root = _image_root(tmp_path / "root", 1)
    assert cli.main(["cohort", str(root), "-o", str(tmp_path / "o"), "--sequence", "T3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --sequence 'T3'" in err[0] and not (tmp_path / "o").exists()
    out = tmp_path / "out"
    cohort_run.record_result_settings(check_writable(out), CohortSettings(sequence="T2"))
    (out / "studies" / "a-study").mkdir(parents=True)
    (out / "studies" / "a-study" / "result.json").write_text("{}")
    cohort_run.check_same_result_settings(out, CohortSettings(sequence="T2"))
    with pytest.raises(cohort_run.InputError, match='--sequence: "T2" before, not given now'):
        cohort_run.check_same_result_settings(out, CohortSettings())
    # a record from before the option: the weighting was each study's own
    recorded = json.loads((out / cohort_run.SETTINGS_FILE).read_text())
    (out / cohort_run.SETTINGS_FILE).write_text(json.dumps({k: v for k, v in recorded.items() if k != "sequence"}))
    cohort_run.check_same_result_settings(out, CohortSettings())
    # the command records the name as the weighting module spells it: `t2` resumes a `T2` run
    assert cli._check_sequence(cli.build_parser(with_training=False).parse_args(
        ["cohort", str(root), "-o", str(out), "--sequence", "t2"])) == "T2"


def test_the_runtime_is_part_of_a_workers_network_cache(monkeypatch):
    """`spinenet cohort --runtime openvino`: each worker loads the networks with that runtime, and a
    worker that holds torch networks does not hand them out for it."""

    seen = {}
    monkeypatch.setattr(cohort_run.pipeline, "load_networks", lambda *a, **k: seen.update(k) or "networks")
    settings = CohortSettings(runtime="openvino", precision="bf16")
    assert settings.network_key() != CohortSettings(precision="bf16").network_key()
    assert cohort_run._load_networks(settings) == "networks"
    assert seen["runtime"] == "openvino" and seen["precision"] == "bf16"


def interrupt_main_thread() -> None:
    """SIGINT to this process's main thread.  Sent to the process, another thread (Dask's, of the module's
    cluster) may take it while the main thread blocks it, and Python then sees it a moment later,
    possibly after the test: the test failed so about one run in three on a busy machine."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


@pytest.fixture
def python_ctrl_c():
    """Ctrl-C as a ``spinenet`` started from a terminal has it (Python's KeyboardInterrupt): pytest started in
    the background (``cmd &``, some CI runners) begins with Ctrl-C ignored, as test_cli_process_exit.py says,
    and an ignored Ctrl-C is rightly not held back by ``deferred_interrupts`` (this test then failed)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_ctrl_c")
def test_ctrl_c_while_the_local_cluster_starts_waits_for_it_and_closes_it(monkeypatch):
    """Ctrl-C in the middle of starting the workers left them half started, and Dask's exit callback then
    printed a traceback (AssertionError: Status.init) after "spinenet: interrupted".  Now the interrupt
    waits until the cluster is up, which is then closed, and the run stops as interrupted."""
    events = []

    class StartingCluster:
        def __init__(self, workers):
            interrupt_main_thread()   # the user's Ctrl-C, half way through the start
            events.append("started")

        def close(self):
            events.append("closed")

    monkeypatch.setattr(cohort_run, "local_cluster", StartingCluster)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with cohort_run.dask_client(1):
            events.append("used")
    assert events == ["started", "closed"]
    assert signal.getsignal(signal.SIGINT) is handler

    def failing_start(workers):   # the same Ctrl-C reached a worker too, which then failed to start
        interrupt_main_thread()
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setattr(cohort_run, "local_cluster", failing_start)
    with pytest.raises(KeyboardInterrupt):      # not "internal error: RuntimeError"
        with cohort_run.dask_client(1):
            pass


def test_a_worker_started_by_a_nanny_leaves_ctrl_c_to_the_cohort_command(monkeypatch):
    """A terminal's Ctrl-C reaches the workers too: each printed a KeyboardInterrupt traceback while the
    command closed the cluster.  A nanny's worker ignores it once the plugin is set up; others keep theirs."""
    from types import SimpleNamespace

    handler = signal.getsignal(signal.SIGINT)
    try:
        cohort_run.NetworksPlugin().setup(SimpleNamespace(nanny=None))
        assert signal.getsignal(signal.SIGINT) is handler
        cohort_run.NetworksPlugin().setup(SimpleNamespace(nanny="tcp://127.0.0.1:1234"))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handler)


def _sigint_blocked() -> bool:
    """Whether this process's main thread blocks Ctrl-C (SIGINT), from /proc (Linux)."""
    from pathlib import Path   # (run on a worker too)
    import signal

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError("no SigBlk line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.usefixtures("python_ctrl_c")
def test_the_local_workers_and_their_nannies_never_see_ctrl_c_from_their_start():
    """A terminal's Ctrl-C reaches every process of the group: a worker still starting, before the plugin
    that makes it ignore Ctrl-C was set up, printed a KeyboardInterrupt traceback.  Ctrl-C is blocked while
    the cluster starts, and its processes keep it blocked (the cluster is closed through Dask); the command's
    own process gets it back (its local nannies are objects in it)."""
    with cohort_run.dask_client(1) as client:
        assert all(client.run(_sigint_blocked).values())
        assert not _sigint_blocked()


def test_the_cohort_command_counts_the_studies_that_ask_for_a_review(tmp_path):
    table = tmp_path / "cohort_studies.csv"
    table.write_text("study,levels_need_review\na,true\nb,false\nc,true\n")
    assert cli._studies_asking_for_review([tmp_path / "cohort_vertebrae.csv", table]) == 2
    assert cli._studies_asking_for_review([tmp_path / "cohort_vertebrae.csv"]) == 0


# --------------------------------------------------------------------------- correcting one study of a cohort

def test_a_cohort_study_is_corrected_from_where_the_cohort_read_it_and_its_table_rows_follow(tmp_path, capsys, cluster):
    """`spinenet correct OUTDIR/studies/<id> #1 LEVEL` needs no --input for a cohort study: the scan is read
    from where the cohort read it (a DICOM series inside a ZIP archive here), the preview and the DICOM results
    are drawn again, and the study's rows in the four cohort tables are replaced where they were, every other
    row as it was. Without the cohort's record, or with its input moved, it asks for --input."""
    import shutil

    from SpineNetLib.cohort.record import INPUTS_FILE

    root = tmp_path / "root"
    _phantom(6).write_dicom(tmp_path / "zipped" / "exam")
    root.mkdir()
    shutil.make_archive(str(root / "p6"), "zip", tmp_path / "zipped")
    _phantom(2).write_nifti(root / "a_first.nii.gz")
    _phantom(3).write_nifti(root / "z_last.nii.gz")
    out = tmp_path / "out"
    assert cli.main(["cohort", str(root), "-o", str(out), *_on(cluster), "--dicom-out"]) == 0
    capsys.readouterr()
    record = json.loads((out / INPUTS_FILE).read_text())["studies"]
    zipped = next(i for i, s in record.items() if s["relative"] == "p6.zip/exam")
    assert record[zipped]["inner"] == "exam" and record[zipped]["path"] == str(root / "p6.zip")
    folder = out / "studies" / zipped
    tables = {name: (out / name).read_text() for name in ("cohort_vertebrae.csv", "cohort_discs.csv",
                                                          "cohort_studies.csv", "cohort_failures.csv")}
    before = {name: (folder / name).read_bytes() for name in ("preview.png", "segmentation.dcm", "report.dcm")}
    levels = [v["level"] for v in json.loads((folder / "vertebrae.json").read_text())["vertebrae"]]
    shifted = {"L1": "T12", "T12": "T11", "T11": "T10"}.get(levels[0], "L1")

    assert cli.main(["correct", str(folder), "#1", shifted]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert str(out / "cohort_studies.csv") in said and str(folder / "segmentation.dcm") in said
    after = [v["level"] for v in json.loads((folder / "vertebrae.json").read_text())["vertebrae"]]
    assert after[0] == shifted and after != levels
    assert all((folder / name).read_bytes() != data for name, data in before.items()), "drawn again"
    for name, text in tables.items():   # the study's rows replaced in place; every other row unchanged
        old, new = _rows_of(text), _rows_of((out / name).read_text())
        assert [r for r in new if r["study"] != zipped] == [r for r in old if r["study"] != zipped], name
        assert [r["study"] == zipped for r in new] == [r["study"] == zipped for r in old], name
    (row,) = [r for r in _rows(out / "cohort_studies.csv") if r["study"] == zipped]
    assert row["corrected_by_user"] == "true" and row["levels"] == f"{after[0]}..{after[-1]}"
    assert (row["levels_by_network"], row["shift_by_reader"]) == (f"{levels[0]}..{levels[-1]}", "-1")
    page = (out / "cohort_review.html").read_text()   # the review page follows the tables
    assert f"<small>{zipped}</small>" in page and '<tr class="corrected">' in page and "1 corrected by hand" in page
    assert [r["level"] for r in _rows(out / "cohort_vertebrae.csv") if r["study"] == zipped] == after

    # the archive moved away: the scan cannot be found, and nothing changes
    shutil.move(str(root / "p6.zip"), str(tmp_path / "p6.zip"))
    kept = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert cli.main(["correct", str(folder), "#1", levels[0]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which is gone" in err and "--input" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept
    # given with --input, it is corrected, and the tables follow
    assert cli.main(["correct", str(folder), "#1", levels[0], "--input", str(tmp_path / "p6.zip")]) == 0
    capsys.readouterr()
    assert [r["level"] for r in _rows(out / "cohort_vertebrae.csv") if r["study"] == zipped] == levels
    (row,) = [r for r in _rows(out / "cohort_studies.csv") if r["study"] == zipped]
    assert row["shift_by_reader"] == "0"        # back where the network had them: the network was right

    # tables of another version's columns are left alone, with a warning; the folder is corrected
    (out / "cohort_discs.csv").write_text("study,something else\n")
    (out / INPUTS_FILE).unlink()
    image = next(i for i, s in record.items() if s["relative"] == "a_first.nii.gz")
    assert cli.main(["correct", str(out / "studies" / image), "#1", "T6"]) == 2   # a preview: needs the scan
    assert "no record of where study" in capsys.readouterr().err
    vertebrae_table = (out / "cohort_vertebrae.csv").read_text()
    assert cli.main(["correct", str(out / "studies" / image), "#1", "T6", "--input",
                     str(root / "a_first.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "the cohort tables were not updated" in err and "other columns" in err and err.count("\n") == 1
    assert (out / "cohort_vertebrae.csv").read_text() == vertebrae_table
    assert json.loads((out / "studies" / image / "vertebrae.json").read_text())["vertebrae"][0]["level"] == "T6"


def _rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


def test_the_review_page_lists_the_studies_to_review_first_with_their_pictures_and_commands():
    """cohort_review.html: the studies that ask for a review first (least sure first), then the corrected
    ones, then the others; each with its linked preview and the command that corrects it; the failures
    after; every cell escaped (file names are the users' own)."""
    import io

    from SpineNetLib.cohort.review_page import review_page_html
    from SpineNetLib.cohort.tables import FAILURE_COLUMNS, STUDIES_COLUMNS

    def row(study, review, confidence, corrected="false", preview="", levels="T11..S1", shift=""):
        cells = dict.fromkeys(STUDIES_COLUMNS, "")
        cells.update(study=study, input=f"{study}/<b>exam</b>", levels=levels, levels_need_review=review,
                     labelling_confidence=confidence, corrected_by_user=corrected, preview=preview,
                     labelling_warning="levels may be shifted by one" if review == "true" else "",
                     shift_by_reader=shift, levels_by_network="T12..S2" if shift == "-1" else levels)
        return [cells[c] for c in STUDIES_COLUMNS]

    def text(header, rows):
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
        return buffer.getvalue()

    studies = text(STUDIES_COLUMNS, [row("sure", "false", "1.000000", preview="studies/sure/preview.png"),
                                     row("fixed", "false", "0.900000", corrected="true", shift="-1"),
                                     row("checked", "false", "0.950000", corrected="true", shift="0"),
                                     row("unsure", "true", "0.700000", levels="T10..L5"),
                                     row("less_unsure", "true", "0.950000"),
                                     row("unlabelled", "false", "0.990000", levels="V1..V3")])
    failures = text(FAILURE_COLUMNS, [["broken", "site/broken.nii.gz", "cannot read it: <not an image>"]])
    page = review_page_html(studies, failures)
    order = [page.index(f"<small>{s}</small>") for s in ("unsure", "less_unsure", "fixed", "checked", "unlabelled",
                                                           "sure")]
    assert order == sorted(order)
    assert "6 finished studies: 2 ask for a review" in page and "2 corrected by hand; 1 without a result" in page
    assert "Of the 2 checked by a reader, the network had named the levels right on 1, one level off on 1," in page
    assert "corrected by hand: moved -1 from T12..S2" in page and "levels confirmed by hand" in page
    assert '<a href="studies/sure/preview.png"><img src="studies/sure/preview.png" width="260"' in page
    assert "<code>spinenet correct studies/unsure L5 LEVEL</code>" in page
    assert "spinenet correct studies/unlabelled" not in page          # no level to name it by
    assert "<b>exam</b>" not in page and "&lt;b&gt;exam&lt;/b&gt;" in page
    assert page.index("Studies without a result") > order[-1] and "&lt;not an image&gt;" in page
    assert page.count('<tr class="review">') == 2 and page.count('<tr class="corrected">') == 2


def test_the_review_page_orders_the_studies_to_review_by_their_margin_where_the_confidence_reads_one():
    """Most studies that ask for a review have a confidence of 1.000000 (from about 14.5 nats on; the bundled
    weights ask below 36.7): the page orders them by ``labelling_margin_nats``, and shows it."""
    import io

    from SpineNetLib.cohort.review_page import review_page_html
    from SpineNetLib.cohort.tables import FAILURE_COLUMNS, STUDIES_COLUMNS

    rows = []
    for study, margin in (("thirty", "30.000"), ("twelve", "12.400"), ("twenty", "20.000")):
        cells = dict.fromkeys(STUDIES_COLUMNS, "")
        cells.update(study=study, input=study, levels="T11..S1", levels_need_review="true",
                     labelling_confidence=f"{1 / (1 + math.exp(-float(margin))):.6f}", labelling_margin_nats=margin)
        rows.append([cells[c] for c in STUDIES_COLUMNS])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([STUDIES_COLUMNS, *rows])
    page = review_page_html(buffer.getvalue(), ",".join(FAILURE_COLUMNS) + "\n")
    order = [page.index(f"<small>{s}</small>") for s in ("twelve", "twenty", "thirty")]
    assert order == sorted(order)
    assert "confidence 1.00 (margin 30.0 nats)" in page and "(margin 12.4 nats)" in page


def test_a_record_of_study_inputs_that_is_not_as_written_counts_as_none(tmp_path):
    """cohort_inputs.json edited by hand or written by another version: the study has no record (the
    correction asks for --input), never a crash on its values."""
    from SpineNetLib.cohort.discover import Study
    from SpineNetLib.cohort.record import INPUTS_FILE, cohort_study_of, record_study_inputs

    out = tmp_path / "out"
    (out / "studies" / "a-1").mkdir(parents=True)
    record_study_inputs(out, [Study("a-1", str(tmp_path / "a.nii.gz"), "a.nii.gz", "image")])
    good = cohort_study_of(out / "studies" / "a-1")
    assert good.study == Study("a-1", str(tmp_path / "a.nii.gz"), "a.nii.gz", "image") and good.relative == "a.nii.gz"
    written = json.loads((out / INPUTS_FILE).read_text())
    for bad in ({"path": 7}, {"kind": None}, {"extra": "x"}, {"inner": ["x"]}, {"path_from_output_folder": 7},
                {"path_from_output_folder": ""}):
        entry = {**written["studies"]["a-1"], **bad}
        (out / INPUTS_FILE).write_text(json.dumps({"studies": {"a-1": entry}}))
        assert cohort_study_of(out / "studies" / "a-1").study is None, bad
    (out / INPUTS_FILE).write_text("[not, json")
    assert cohort_study_of(out / "studies" / "a-1").study is None
    assert cohort_study_of(tmp_path / "elsewhere" / "a-1") is None          # no cohort around it


def test_a_cohort_moved_with_its_data_is_corrected_from_the_data_where_it_now_lies(tmp_path, capsys, cluster):
    """A project folder holding the scans and the cohort's output folder, moved (copied to another machine,
    a drive mounted elsewhere): the recorded absolute path is gone, but the path relative to the output folder
    leads to the scan, so `spinenet correct` draws the pictures again without --input. Moved apart, it asks
    for --input as before."""
    from SpineNetLib.cohort.record import INPUTS_FILE, cohort_study_of

    project = tmp_path / "project"
    _phantom(4).write_nifti(project / "data" / "site" / "p4.nii.gz")
    out = project / "results"
    assert cli.main(["cohort", str(project / "data"), "-o", str(out), *_on(cluster)]) == 0
    capsys.readouterr()
    (entry,) = json.loads((out / INPUTS_FILE).read_text())["studies"].values()
    assert entry["path_from_output_folder"] == "../data/site/p4.nii.gz"

    moved = tmp_path / "mounted elsewhere" / "project"
    moved.parent.mkdir()
    project.rename(moved)
    (folder,) = (moved / "results" / "studies").iterdir()
    assert cohort_study_of(folder).study.path == str(moved / "data" / "site" / "p4.nii.gz")
    preview = (folder / "preview.png").read_bytes()
    assert cli.main(["correct", str(folder), "#1", "T6"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert (folder / "preview.png").read_bytes() != preview, "drawn again from the moved scan"
    assert [r["level"] for r in _rows(moved / "results" / "cohort_vertebrae.csv")][0] == "T6"

    (moved / "data").rename(tmp_path / "data elsewhere")    # the scans moved apart from the results
    assert cohort_study_of(folder).study.path == str(project / "data" / "site" / "p4.nii.gz")
    assert cli.main(["correct", str(folder), "#1", "T7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which is gone" in err and "--input" in err


def test_each_contrast_of_a_dixon_series_is_a_study_of_its_own(tmp_path, capsys, cluster):
    """A series that holds water and fat images at the same positions under one UID (as some scanners store
    a Dixon acquisition) is two studies, one per stack, each named by its label and read from its own images;
    spinenet cohort finishes both."""
    root = tmp_path / "root"
    uid = "1.2.826.0.1.3680043.8.498.77"
    for prefix, contrast, image_type in (("W", "T2", "W"), ("F", "T1", "F")):
        _phantom(5, contrast=contrast).write_dicom(
            root / "dixon", series_description="T2 mDixon", file_prefix=prefix, series_uid=uid,
            extra_tags={"SeriesNumber": 6, "ImageType": ["ORIGINAL", "PRIMARY", image_type, "DERIVED"]})
    found = discover_studies(root)
    assert sorted((s.relative, s.series_uid) for s in found.studies) == [("dixon", f"{uid} [F]"),
                                                                         ("dixon", f"{uid} [W]")]
    assert sorted(s.study_id.split("-")[0] for s in found.studies) == ["dixon__s6_T2_mDixon_F",
                                                                       "dixon__s6_T2_mDixon_W"]
    out = tmp_path / "out"
    assert cli.main(["cohort", str(root), "-o", str(out), *_on(cluster), "--no-grade"]) == 0
    capsys.readouterr()
    rows = _rows(out / "cohort_studies.csv")
    assert sorted(r["series_uid"] for r in rows) == sorted(s.series_uid for s in found.studies)
    assert not _rows(out / "cohort_failures.csv")


def _named(levels, step=30.0, exam=("1.2.3", "1.2.3.9")):
    """A vertebrae.json of bodies named ``levels``, top to bottom, one every ``step`` mm."""
    return {"input": {"study_uid": exam[0], "frame_of_reference_uid": exam[1]},
            "vertebrae": [{"level": level, "centroid_ras": [0.0, 10.0, -step * i]} for i, level in enumerate(levels)]}


def test_series_of_one_exam_that_name_a_vertebra_differently_are_found():
    """Two sagittal series of one exam (one frame of reference) show each vertebra at the same place: where
    their levels differ there, both are said to disagree; series of other exams or frames, image files
    without the UIDs, and bodies of one series alone are never compared."""
    from SpineNetLib.cohort.exams import exam_disagreements

    t2 = _named(["L1", "L2", "L3", "L4", "L5", "S1"])
    t1 = _named(["T12", "L1", "L2", "L3", "L4", "L5"])                 # shifted by one
    moved = {**t1, "vertebrae": [{**v, "centroid_ras": [3.0, 14.0, v["centroid_ras"][2] + 6.0]}
                                 for v in t2["vertebrae"]]}          # the same levels, the patient moved 8 mm
    reasons = exam_disagreements({"t2": t2, "t1": t1, "t2_moved": moved})
    assert set(reasons) == {"t2", "t1", "t2_moved"}
    assert reasons["t1"] == ("the levels disagree with study t2 of the same exam, which names the vertebra T12 here "
                             "L1 (6 vertebrae differ); the levels disagree with study t2_moved of the same exam, "
                             "which names the vertebra T12 here L1 (6 vertebrae differ)")
    assert reasons["t2"].startswith("the levels disagree with study t1") and "t2_moved" not in reasons["t2"]
    assert exam_disagreements({"t2": t2, "t2_moved": moved}) == {}   # 8 mm apart: the same vertebrae, agreeing
    # where only one study's own labelling asks for a review, that one is more likely the wrong one
    unsure = {**t1, "labelling": {"needs_review": True}}
    reasons = exam_disagreements({"t2": t2, "t1": unsure})
    assert reasons["t2"].endswith("(6 vertebrae differ); one of the two is named wrongly, more likely that one: "
                                  "its own labelling asks for a review, this one's does not")
    assert reasons["t1"].endswith("; one of the two is named wrongly, more likely this one: that series' own "
                                  "labelling does not ask for a review, this one's does; as spinenet run would, take "
                                  "the levels of study t2, whose own labelling does not ask for a review: "
                                  "`spinenet correct studies/t1 T12 L1` in the cohort's output folder")
    # not while another sure series of the exam names the vertebrae as the unsure one does
    reasons = exam_disagreements({"t2": t2, "t1": unsure, "t1_stir": t1})
    assert "as spinenet run would" not in reasons["t1"]
    other_frame = _named(["T12", "L1", "L2", "L3", "L4", "L5"], exam=("1.2.3", "1.2.3.10"))
    image_file = {**t1, "input": {}}
    longer = _named(["T10", "T11", "T12", "L1"], exam=("1.2.3", "1.2.3.9"))
    longer["vertebrae"] = [{**v, "centroid_ras": [0.0, 10.0, 90.0 - 30.0 * i]} for i, v in enumerate(longer["vertebrae"])]
    assert exam_disagreements({"t2": t2, "other": other_frame, "image": image_file, "above": longer}) == {}


def _t2_and_t1_exam(root: Path) -> dict:
    """A lumbar exam of two sagittal DICOM series, T2 (series 3) and T1 (series 2), of one patient in one frame of
    reference, under ``root/exam``; returns the two UIDs they share."""
    exam = {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.31", "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.32"}
    for number, contrast in ((3, "T2"), (2, "T1")):
        _phantom(5, contrast=contrast).write_dicom(root / "exam" / contrast, series_description=f"{contrast} SAG",
                                                   extra_tags={**exam, "SeriesNumber": number})
    return exam


def test_a_correction_that_leaves_another_series_of_the_exam_disagreeing_asks_for_its_review(tmp_path, capsys, cluster):
    """spinenet cohort over an exam of two sagittal series (T2 and T1, one frame of reference): they agree.
    A reader moves the T2's levels by one: its row records the disagreement but asks no review (corrected by
    hand); the T1's row now asks for one, with the reason, on the review page too. Moved back, both agree."""
    root = tmp_path / "root"
    exam = _t2_and_t1_exam(root)
    out = tmp_path / "out"
    assert cli.main(["cohort", str(root), "-o", str(out), *_on(cluster), "--no-grade"]) == 0
    capsys.readouterr()
    rows = {r["series_description"]: r for r in _rows(out / "cohort_studies.csv")}
    assert {r["exam"] for r in rows.values()} == {f"{exam['StudyInstanceUID']}/{exam['FrameOfReferenceUID']}"}
    assert [r["exam_disagreement"] for r in rows.values()] == ["", ""], rows
    t2, t1 = rows["T2 SAG"]["study"], rows["T1 SAG"]["study"]
    lowest = rows["T2 SAG"]["levels"].rpartition("..")[2]
    above = {"S1": "L5", "L5": "L4", "L4": "L3"}[lowest]

    assert cli.main(["correct", str(out / "studies" / t2), lowest, above]) == 0, capsys.readouterr().err
    capsys.readouterr()
    rows = {r["study"]: r for r in _rows(out / "cohort_studies.csv")}
    assert rows[t1]["exam_disagreement"].startswith(f"the levels disagree with study {t2} of the same exam")
    assert rows[t2]["exam_disagreement"].startswith(f"the levels disagree with study {t1}")
    from SpineNetLib.cohort.tables import studies_asking_for_review

    assert t1 in studies_asking_for_review(out) and t2 not in studies_asking_for_review(out)
    page = (out / "cohort_review.html").read_text()
    assert page.index(f"<small>{t1}</small>") < page.index(f"<small>{t2}</small>")
    assert f"the levels disagree with study {t2}" in page

    assert cli.main(["correct", str(out / "studies" / t2), above, lowest]) == 0
    capsys.readouterr()
    assert [r["exam_disagreement"] for r in _rows(out / "cohort_studies.csv")] == ["", ""]


def test_a_study_whose_own_labelling_asks_takes_the_levels_of_the_sure_study_of_its_exam():
    """By spinenet run's rule: only a study whose own labelling asks, only from a study whose own does not, only
    where every sure study names its vertebrae by one shift, and only once; the documents keep the study's own
    levels, ask for a review with whose levels they are first, and rename the discs."""
    from SpineNetLib.cohort.exams import LevelsToTake, levels_to_take
    from SpineNetLib.outputs.documents import apply_taken_levels

    t2 = _named(["L1", "L2", "L3", "L4", "L5", "S1"])
    unsure = {**_named(["T12", "L1", "L2", "L3", "L4", "L5"]),
              "labelling": {"needs_review": True, "warnings": ["levels may be shifted by one"]},
              "warnings": ["a single slice", "levels may be shifted by one"]}
    assert levels_to_take({"t2": t2, "t1": unsure}) == [LevelsToTake("t1", "t2", 1, "T12", "L1", "sure_series")]
    assert levels_to_take({"t2": t2, "t1": {**unsure, "labelling": {"needs_review": False}}}) == []
    assert levels_to_take({"t2": {**t2, "labelling": {"needs_review": True}}, "t1": unsure}) == []
    assert levels_to_take({"t2": t2, "t1": unsure, "stir": _named(["T12", "L1", "L2", "L3", "L4", "L5"])}) == []

    pairs = zip(["T12", "L1", "L2", "L3", "L4"], ["L1", "L2", "L3", "L4", "L5"])
    discs = {"discs": [{"level": f"{a}-{b}", "grades": {"Pfirrmann": {"value": i + 1}}}
                       for i, (a, b) in enumerate(pairs)]}
    taking = levels_to_take({"t2": t2, "t1": unsure})[0]
    reason = taking.reason(["T12", "L1", "L2", "L3", "L4", "L5"])
    assert reason == ("levels taken from study t2 of the same exam, which names L1 the vertebra this series named T12: "
                      "its own labelling does not ask for a review, this one's does; on its own this series named the "
                      "vertebrae T12..L5 (the reasons after this one are about those levels)")
    document, new_discs = apply_taken_levels(unsure, discs, taking.shift, "study t2", reason, taking.rule)
    assert [v["level"] for v in document["vertebrae"]] == ["L1", "L2", "L3", "L4", "L5", "S1"]
    assert document["labelling"] == {"needs_review": True, "s1_found": True,
                                     "warnings": [reason, "levels may be shifted by one"],
                                     "levels_taken_from_series": {"series": "study t2", "shift": 1, "own_levels": [
                                         "T12", "L1", "L2", "L3", "L4", "L5"], "rule": "sure_series"}}
    assert document["warnings"] == ["a single slice", reason, "levels may be shifted by one"]
    assert [(d["level"], d["grades"]["Pfirrmann"]["value"]) for d in new_discs["discs"]] == [
        ("L1-L2", 1), ("L2-L3", 2), ("L3-L4", 3), ("L4-L5", 4), ("L5-S1", 5)]   # grades stay with their discs
    assert [v["level"] for v in unsure["vertebrae"]][0] == "T12"             # the input is not changed
    assert levels_to_take({"t2": t2, "t1": document}) == []                   # alike now
    moved_on = {**document, "vertebrae": unsure["vertebrae"]}
    assert levels_to_take({"t2": t2, "t1": moved_on}) == []                    # levels are taken once


def test_spinenet_cohort_has_an_unsure_study_take_the_levels_of_the_sure_study_of_its_exam(tmp_path, capsys,
                                                                                            monkeypatch, cluster):
    """spinenet cohort over an exam of two sagittal series that agree; the T1's own labelling is then made to ask
    for a review and name every vertebra a level higher. The next run of the same command has it take the T2's
    levels: every file of its folder that names a level is written again, the preview too, and its table row
    says whose levels they are. A third run changes nothing. Where its scan cannot be read again, its folder stays as
    it was and its row gives the correction that takes them."""
    root = tmp_path / "root"
    _t2_and_t1_exam(root)
    out = tmp_path / "out"
    command = ["cohort", str(root), "-o", str(out), *_on(cluster), "--no-grade"]
    assert cli.main(command) == 0
    assert "took the levels" not in capsys.readouterr().out
    rows = {r["series_description"]: r for r in _rows(out / "cohort_studies.csv")}
    t2, t1 = rows["T2 SAG"]["study"], rows["T1 SAG"]["study"]
    folder = out / "studies" / t1
    right = json.loads((folder / "vertebrae.json").read_text())
    right_discs = [d["level"] for d in json.loads((folder / "discs.json").read_text())["discs"]]
    lowest = right["vertebrae"][-1]["level"]
    above = {"S1": "L5", "L5": "L4", "L4": "L3"}[lowest]
    assert cli.main(["correct", str(folder), lowest, above]) == 0, capsys.readouterr().err
    shifted = json.loads((folder / "vertebrae.json").read_text())   # as if the T1's own labelling had named them
    own = [v["level"] for v in shifted["vertebrae"]]
    labelling = {k: v for k, v in shifted["labelling"].items() if k not in ("corrected_by_user", "before_correction")}
    shifted.update(labelling={**labelling, "needs_review": True, "warnings": ["levels may be shifted by one"]})
    shifted.pop("corrections")
    (folder / "vertebrae.json").write_text(json.dumps(shifted))
    preview_shifted = (folder / "preview.png").read_bytes()

    def unreadable(*args, **kwargs):
        raise cohort_run.InputError("cannot read the scan")
    monkeypatch.setattr("SpineNetLib.cohort.exam_levels.read_scan_as_run", unreadable)
    assert cli.main(command) == 0   # its scan cannot be read again: its folder stays, its row says what would do it
    said = capsys.readouterr()
    assert f"spinenet: warning: study {t1} was not written again with the levels of study {t2} (cannot read the " \
           "scan); its exam_disagreement gives the spinenet correct that does" in said.err
    assert json.loads((folder / "vertebrae.json").read_text()) == shifted
    assert {r["study"]: r for r in _rows(out / "cohort_studies.csv")}[t1]["exam_disagreement"].endswith(
        f"`spinenet correct studies/{t1} {own[0]} {right['vertebrae'][0]['level']}` in the cohort's output folder")
    monkeypatch.undo()

    assert cli.main(command) == 0
    said = capsys.readouterr().out
    assert f"1 study took the levels of a sure study of the same exam, as spinenet run takes a sure series' ({t1}: " \
           f"{own[0]}..{own[-1]} -> {right['vertebrae'][0]['level']}..{lowest})" in said
    taken = json.loads((folder / "vertebrae.json").read_text())
    assert [v["level"] for v in taken["vertebrae"]] == [v["level"] for v in right["vertebrae"]]
    assert taken["labelling"]["needs_review"] is True
    assert taken["labelling"]["levels_taken_from_series"] == {"series": f"study {t2}", "shift": 1, "own_levels": own,
                                                              "rule": "sure_series"}
    top = right["vertebrae"][0]["level"]
    assert taken["labelling"]["warnings"][0].startswith(f"levels taken from study {t2} of the same exam, which "
                                                        f"names {top} the vertebra this series named {own[0]}:")
    assert [d["level"] for d in json.loads((folder / "discs.json").read_text())["discs"]] == right_discs
    csv_rows = _rows(folder / "vertebrae.csv")
    assert [r["level"] for r in csv_rows] == [v["level"] for v in right["vertebrae"]]
    assert csv_rows[0]["labelling_warning"].startswith(f"levels taken from study {t2}")
    assert (folder / "preview.png").read_bytes() != preview_shifted   # drawn again: the taken levels, its own too
    rows = {r["study"]: r for r in _rows(out / "cohort_studies.csv")}
    assert rows[t1]["levels"] == rows[t2]["levels"] and rows[t1]["exam_disagreement"] == ""
    assert rows[t1]["levels_need_review"] == "true"
    assert rows[t1]["labelling_warning"].startswith(f"levels taken from study {t2}")

    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert cli.main(command) == 0
    assert "took the levels" not in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_an_image_in_a_bids_datasets_anat_folder_knows_its_session():
    """Folders and file name must agree (sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_...); any other
    path is no session."""
    from SpineNetLib.inputs.image import bids_session

    root = Path("/data/ds001")
    assert bids_session(root / "sub-01/ses-02/anat/sub-01_ses-02_T2w.nii.gz") == str(root / "sub-01/ses-02")
    assert bids_session(root / "sub-01/anat/sub-01_acq-sag_T1w.nii.gz") == str(root / "sub-01")
    for other in ("sub-01/ses-02/anat/sub-01_T2w.nii.gz",           # the name lacks the folder's session
                  "sub-01/ses-02/anat/sub-02_ses-02_T2w.nii.gz",    # another subject
                  "sub-01/ses-02/func/sub-01_ses-02_bold.nii.gz",   # not anat
                  "sub-01/anat/sub-01_ses-02_T2w.nii.gz",           # a session the folders lack
                  "patients/p1/anat/scan.nii.gz", "sub-01.nii.gz"):
        assert bids_session(root / other) is None, other


def test_spinenet_cohort_compares_the_images_of_one_bids_session_as_one_exam(tmp_path, capsys, cluster):
    """A BIDS dataset: sub-01's T2w and T1w of one session (one phantom, the scanner's coordinates) are one
    exam, and agree; sub-02's T2w and an image outside the dataset's layout are compared with nothing. A reader
    moves the T2w's levels by one: the T1w's row then says the two disagree and asks for a review."""
    root = tmp_path / "root"
    anat = root / "ds" / "sub-01" / "ses-1" / "anat"
    for contrast in ("T2", "T1"):
        _phantom(5, contrast=contrast).write_nifti(anat / f"sub-01_ses-1_{contrast}w.nii.gz")
    _phantom(6).write_nifti(root / "ds" / "sub-02" / "anat" / "sub-02_T2w.nii.gz")
    _phantom(7).write_nifti(root / "other" / "scan.nii.gz")
    out = tmp_path / "out"
    assert cli.main(["cohort", str(root), "-o", str(out), *_on(cluster), "--no-grade", "--no-preview"]) == 0
    capsys.readouterr()
    rows = {Path(r["input"]).name: r for r in _rows(out / "cohort_studies.csv")}
    session = f"bids:{anat.parent}"
    assert {name: r["exam"] for name, r in rows.items()} == {
        "sub-01_ses-1_T2w.nii.gz": session, "sub-01_ses-1_T1w.nii.gz": session,
        "sub-02_T2w.nii.gz": f"bids:{root / 'ds' / 'sub-02'}", "scan.nii.gz": ""}
    assert [r["exam_disagreement"] for r in rows.values()] == ["", "", "", ""], rows
    t2, t1 = rows["sub-01_ses-1_T2w.nii.gz"]["study"], rows["sub-01_ses-1_T1w.nii.gz"]["study"]
    lowest = rows["sub-01_ses-1_T2w.nii.gz"]["levels"].rpartition("..")[2]
    above = {"S1": "L5", "L5": "L4", "L4": "L3"}[lowest]
    assert cli.main(["correct", str(out / "studies" / t2), lowest, above]) == 0, capsys.readouterr().err
    rows = {r["study"]: r for r in _rows(out / "cohort_studies.csv")}
    assert rows[t1]["exam_disagreement"].startswith(f"the levels disagree with study {t2} of the same exam")
