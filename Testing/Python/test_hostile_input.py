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


def _documents():
    """A minimal valid result set."""
    from SpineNetLib.outputs.files import document_texts

    vertebrae = {"schema": "spinenet.vertebrae/1", "input": {}, "scan": {}, "vertebrae": [], "timings_s": {}}
    return document_texts(vertebrae, None)


def test_a_full_disk_leaves_no_part_file_and_a_failed_rename_restores_the_earlier_set(tmp_path, monkeypatch):
    import os

    from SpineNetLib.outputs import files

    out = tmp_path / "out"
    out.mkdir()
    (out / "vertebrae.json").write_text("old vertebrae")
    (out / "discs.csv").write_text("old discs")
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    with pytest.raises(OSError):
        files.write_files_atomically(out, _documents())
    monkeypatch.setattr(files.os, "fdopen", real_fdopen)
    assert sorted(p.name for p in out.iterdir()) == ["discs.csv", "vertebrae.json"]

    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 3:        # vertebrae.json moved aside and replaced; then the CSV fails
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        files.write_files_atomically(out, _documents())
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert sorted(p.name for p in out.iterdir()) == ["discs.csv", "vertebrae.json"]
    assert (out / "vertebrae.json").read_text() == "old vertebrae" and (out / "discs.csv").read_text() == "old discs"


def test_an_unwritable_output_is_reported_before_the_work(tmp_path, capsys, monkeypatch):
    from SpineNetLib import pipeline
    from SpineNetLib.outputs.files import check_writable

    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        check_writable(afile)
    with pytest.raises(InputError, match="not a writable folder"):
        check_writable(afile / "results")          # its parent is a file: nothing can be created there
    path = write_image(image(), sagittal_affine(0.8), tmp_path / "scan.nii.gz")
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: pytest.fail("networks loaded before the check"))
    assert cli.main(["run", str(path), "-o", str(afile / "results"), "--quiet"]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()            # checked, not created


def test_nan_voxels_in_a_nifti_file_are_refused(tmp_path):
    """ITK reads NaN as 0 without a word; the file itself is checked."""
    voxels = image()
    voxels[2, 10, 10] = np.nan
    path = write_image(voxels, sagittal_affine(0.8), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="1 NaN or infinite voxel"):
        load_scan(path)


def test_a_field_of_view_no_spine_has_is_refused_and_numbers_read_plainly(tmp_path):
    path = write_image(image((5, 400, 300)), sagittal_affine(4.5), tmp_path / "wide.nii.gz")
    with pytest.raises(InputError, match=r"covers 1800 x 1350 mm"):   # rows (S-I) x columns (A-P)
        load_scan(path)
    with pytest.raises(InputError) as info:
        load_scan(write_image(image(), sagittal_affine(0.8), tmp_path / "ok.nii.gz"), pixel_spacing=(0.0, 0.8))
    assert "np.float64" not in str(info.value)


def test_a_truncated_dicom_file_stops_the_series_instead_of_being_dropped(tmp_path):
    folder = tmp_path / "dicom"
    write_dicom_series(image((7, 64, 48)), sagittal_affine(0.8), folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    (folder / "notes.txt").write_text("not DICOM: skipped")
    assert load_scan(folder).voxels.shape[2] == 7
    whole = files[-1].read_bytes()
    files[-1].write_bytes(whole[:len(whole) // 2])                # the header survives, the pixels do not
    with pytest.raises(InputError, match="cannot decode the pixel data of .*IM0007"):
        load_scan(folder)
    files[-1].write_bytes(whole[:200])                            # the preamble survives, the header does not
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_scan(folder)


def test_damaged_weights_with_nan_values_are_refused(tmp_path):
    import torch

    from SpineNetLib.core.errors import WeightsError
    from SpineNetLib.models import ContextNet
    from SpineNetLib.weights import checkpoints

    net = ContextNet()
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = float("nan")
    path = checkpoints.save_checkpoint(tmp_path / "context.pt", "context", net)
    with pytest.raises(WeightsError, match="NaN or infinite values in 1 tensor"):
        checkpoints.load_model("context", path)


@pytest.mark.filterwarnings("ignore")
def test_a_palette_colour_series_is_refused(tmp_path):
    folder = tmp_path / "dicom"
    write_dicom_series(image((5, 64, 48)), sagittal_affine(0.8), folder)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "PALETTE COLOR"
        ds.save_as(f)
    with pytest.raises(InputError, match="PALETTE COLOR"):
        load_scan(folder)


def test_library_warnings_do_not_come_before_the_one_line_error(tmp_path, monkeypatch, capsys):
    import warnings

    def noisy_run(args):
        np.float64(1.0) / np.float64(0.0)      # numpy: RuntimeWarning, divide by zero
        warnings.warn("Invalid value for VR IS", UserWarning)
        raise InputError("the scan is unusable")

    monkeypatch.setattr(cli, "command_run", noisy_run)
    assert cli.main(["run", str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == ["spinenet: error: the scan is unusable"]


def test_a_monochrome1_series_is_read_with_monochrome2_brightness(tmp_path):
    voxels = image((5, 64, 48))
    folder = tmp_path / "dicom"
    write_dicom_series(voxels, sagittal_affine(0.8), folder)
    plain = load_scan(folder).voxels
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(f)
    inverted = load_scan(folder).voxels
    np.testing.assert_allclose(inverted, plain.max() + plain.min() - plain, atol=1e-3)


@pytest.mark.filterwarnings("ignore")
def test_randomly_corrupted_dicom_headers_end_in_a_clean_error_or_a_scan(tmp_path):
    """A seeded sample of header mutations (the kind that once gave internal errors): every outcome is a
    scan or a SpineNetError, never another exception."""
    import random
    import shutil

    from SpineNetLib.core.errors import SpineNetError

    base = tmp_path / "base"
    write_dicom_series(image((5, 64, 48)), sagittal_affine(0.8), base)
    keys = ["Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope",
            "RescaleIntercept", "InstanceNumber", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated",
            "PixelRepresentation", "PhotometricInterpretation", "SeriesInstanceUID"]
    values = ["abc", "", "-1", "0", "1e400", "nan", "inf", "1\\2\\3", "65535", "1.5", "9" * 30]
    rng = random.Random(12)
    outcomes = {"scan": 0, "error": 0}
    for trial in range(60):
        folder = tmp_path / f"t{trial}"
        shutil.copytree(base, folder)
        target = sorted(folder.iterdir())[rng.randrange(5)]
        ds = pydicom.dcmread(target)
        key, value = rng.choice(keys), rng.choice(values)
        try:  # pydicom refuses some values itself: those mutations cannot be written
            if key in ds:
                ds[key]._value = value
            else:
                setattr(ds, key, value)
            ds.save_as(target)
        except Exception:
            continue
        try:
            load_scan(folder)
            outcomes["scan"] += 1
        except SpineNetError:
            outcomes["error"] += 1
        shutil.rmtree(folder)
    assert outcomes["scan"] > 0 and outcomes["error"] > 0


def test_a_metaimage_header_naming_a_device_or_a_short_data_file_is_refused(tmp_path):
    good = write_image(image(), sagittal_affine(0.8), tmp_path / "scan.mhd")
    assert load_scan(good).voxels.shape[:2] == (64, 48)
    header = good.read_text(encoding="latin-1")
    data_name = next(line.split("=")[1].strip() for line in header.splitlines() if line.startswith("ElementDataFile"))
    device = tmp_path / "device.mhd"
    device.write_text(header.replace(f"ElementDataFile = {data_name}", "ElementDataFile = /dev/zero"),
                      encoding="latin-1")
    with pytest.raises(InputError, match="not a regular file"):
        load_scan(device)
    raw = (tmp_path / data_name).read_bytes()
    (tmp_path / "short.raw").write_bytes(raw[: len(raw) // 2])
    short = tmp_path / "short.mhd"
    short.write_text(header.replace(f"ElementDataFile = {data_name}", "ElementDataFile = short.raw"),
                     encoding="latin-1")
    with pytest.raises(InputError, match="truncated"):
        load_scan(short)


def test_a_label_map_given_as_the_scan_is_refused(tmp_path):
    labels = np.zeros((5, 64, 48), np.uint8)
    for level, row in enumerate(range(5, 60, 11), start=20):
        labels[:, row:row + 8, 10:30] = level
    path = write_image(labels, sagittal_affine(0.8), tmp_path / "labels.nii.gz")
    with pytest.raises(InputError, match="label map"):
        load_scan(path)
    # an 8-bit scan with a dark background is an image
    scan = np.zeros((5, 64, 48), np.uint8)
    scan[:, 5:60, 5:40] = np.random.default_rng(1).integers(20, 255, (5, 55, 35))
    assert load_scan(write_image(scan, sagittal_affine(0.8), tmp_path / "scan.nii.gz")).voxels.shape[:2] == (64, 48)
