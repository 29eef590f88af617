"""DICOM objects that are no image (this project's own segmentation.dcm and report.dcm, ...) are not read as
series (inputs/dicom.py)."""

from __future__ import annotations

import shutil

import pytest

from SpineNetLib import pipeline
from SpineNetLib.apps import cli
from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.synthetic.phantom import make_phantom

from oracles import oracle_networks


def test_the_dicom_results_beside_a_series_are_no_second_series(tmp_path, monkeypatch, capsys):
    phantom = make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.0, 1.0), n_slices=5)
    study = tmp_path / "study"
    phantom.write_dicom(study)
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    # the results written into the study's own folder, then the study run again
    assert cli.main(["run", str(study), "-o", str(study), "--quiet", "--dicom-out"]) == 0
    assert (study / "segmentation.dcm").is_file() and (study / "report.dcm").is_file()
    assert cli.main(["run", str(study), "-o", str(tmp_path / "again"), "--quiet"]) == 0
    assert load_scan(study).voxels.shape == phantom.scan.voxels.shape
    capsys.readouterr()
    # the DICOM results alone: no image series, and said so (not "contradictory slice positions")
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("segmentation.dcm", "report.dcm"):
        shutil.copy(study / name, alone / name)
    assert cli.main(["run", str(alone), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"spinenet: error: no image series in {alone} (found only: "), err
    assert "Segmentation" in err[0] and "SR" in err[0], err
    assert not (tmp_path / "out").exists()
    # the segmentation file given as the input names what it is
    with pytest.raises(InputError, match=r"is no image series \(a Segmentation object\)"):
        load_scan(study / "segmentation.dcm")


def test_mr_images_under_a_private_storage_class_are_still_read(tmp_path):
    """A vendor's private SOP class (pydicom does not name it) on MR pixel data is read as before: only the
    standard non-image classes are skipped."""
    import pydicom

    phantom = make_phantom(fov="lumbar", shape=(128, 128), pixel_spacing=(2.0, 2.0), n_slices=4)
    study = tmp_path / "study"
    for path in phantom.write_dicom(study):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.3.46.670589.11.0.0.12.4"
        ds.save_as(path)
    assert load_scan(study).voxels.shape == phantom.scan.voxels.shape
