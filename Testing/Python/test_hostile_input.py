"""Hostile and broken inputs end in one clean InputError (exit status 2), never in a hang, a
memory blow-up or a silent 'no vertebrae' (issue 12)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pydicom
import pytest

from SpineNetLib.apps import cli
from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.canonical import MAX_VOXELS
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.inputs.writers import write_dicom_series, write_image

def sagittal_affine(pixel_mm: float, slice_mm: float = 4.0) -> np.ndarray:
    """i -> A, j -> S (down the rows: inferior), k -> R."""
    a = np.zeros((4, 4))
    a[1, 0] = pixel_mm          # i: anterior
    a[2, 1] = -pixel_mm         # j: inferior
    a[0, 2] = slice_mm          # k: right
    a[3, 3] = 1.0
    return a


def image(shape=(5, 64, 48), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)


def test_absurd_pixel_spacing_is_refused_before_any_work(tmp_path):
    path = write_image(image(), sagittal_affine(100.0), tmp_path / "huge_pixels.nii.gz")
    with pytest.raises(InputError, match="not plausible for spinal MRI"):
        load_scan(path)
    ok = write_image(image(), sagittal_affine(0.8), tmp_path / "ok.nii.gz")
    with pytest.raises(InputError, match="not plausible"):
        load_scan(ok, pixel_spacing=(1000.0, 1000.0))
    assert load_scan(ok).voxels.shape[:2] == (64, 48)


def test_a_constant_image_is_refused(tmp_path):
    path = write_image(np.full((5, 64, 48), 7.0, np.float32), sagittal_affine(0.8), tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match="same value"):
        load_scan(path)


def test_a_small_nifti_claiming_gigabytes_is_refused_from_its_header(tmp_path):
    path = write_image(image(), sagittal_affine(0.8), tmp_path / "scan.nii")
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 2048, 2048, 256, 1, 1, 1, 1)   # 1 G voxels
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb") as fh:
        fh.write(bytes(raw))
    with pytest.raises(InputError, match=f"more than the {MAX_VOXELS}"):
        load_scan(bomb)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_dicom_with_malformed_instance_numbers_loads_and_huge_rows_are_refused(tmp_path, capsys):
    folder = tmp_path / "dicom"
    write_dicom_series(image((5, 64, 48)), sagittal_affine(0.8), folder)
    files = sorted(folder.glob("*.dcm")) or sorted(p for p in folder.iterdir() if p.is_file())
    for f in files:
        ds = pydicom.dcmread(f)
        ds.add_new((0x0020, 0x0013), "IS", None)
        ds[0x0020, 0x0013]._value = "abc"        # not a number: slices are ordered by position anyway
        ds.save_as(f)
    scan = load_scan(folder)
    assert scan.voxels.shape[2] == 5
    ds = pydicom.dcmread(files[0])
    ds.Rows = 65535
    ds.Columns = 65535
    ds.save_as(files[0])
    assert cli.main(["run", str(folder), "-o", str(tmp_path / "out"), "--quiet", "--no-grade"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Rows = 65535" in err[0]
    assert not (tmp_path / "out").exists()
