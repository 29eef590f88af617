"""Hostile and broken inputs end in one clean InputError (exit status 2), never in a hang, a
memory blow-up or a silent 'no vertebrae' (issue 12)."""

from __future__ import annotations

import gzip
import os
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


class _FailingWrites:
    """A file handle whose writes fail as on a full disk (errno 28) or past ``ulimit -f`` (27)."""

    def __init__(self, handle, errno: int):
        self.handle, self.errno = handle, errno

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data):
        raise OSError(self.errno, os.strerror(self.errno))


def test_a_full_disk_leaves_no_part_file_and_a_failed_rename_restores_the_earlier_set(tmp_path, monkeypatch):
    import os

    from SpineNetLib.outputs import files

    out = tmp_path / "out"
    out.mkdir()
    (out / "vertebrae.json").write_text("old vertebrae")
    (out / "discs.csv").write_text("old discs")
    real_fdopen = os.fdopen

    monkeypatch.setattr(files.os, "fdopen", lambda fd, *a, **k: _FailingWrites(real_fdopen(fd, *a, **k), 28))
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


def test_a_renamed_map_moves_with_the_set_or_not_at_all(tmp_path, monkeypatch):
    """Maps renamed in a sub-folder (a level correction): the new names appear and the old ones go in one step;
    a failed rename puts every earlier file back, with no new sub-folder or temporary file left."""
    import os

    from SpineNetLib.outputs import files

    out = tmp_path / "out"
    (out / "hotspots").mkdir(parents=True)
    (out / "hotspots" / "L4-L5_H.nii.gz").write_bytes(b"map of the upper disc")
    (out / "hotspots" / "L5-S1_H.nii.gz").write_bytes(b"map of the lower disc")
    (out / "vertebrae.json").write_text("old vertebrae")
    earlier = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    moved = {"hotspots/L5-S1_H.nii.gz": b"map of the upper disc", "hotspots/S1-S2_H.nii.gz": b"map of the lower disc",
             "other/new.txt": "in a new sub-folder", "vertebrae.json": "new vertebrae"}

    real_replace, calls = os.replace, []

    def last_rename_fails(src, dst):
        calls.append(dst)
        if str(dst).endswith("vertebrae.json") and not str(src).endswith(".old"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", last_rename_fails)
    with pytest.raises(OSError):
        files.write_files_atomically(out, moved, remove=["hotspots/L4-L5_H.nii.gz", "hotspots/L5-S1_H.nii.gz"])
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier
    assert not (out / "other").exists()

    files.write_files_atomically(out, moved, remove=["hotspots/L4-L5_H.nii.gz", "hotspots/L5-S1_H.nii.gz"])
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == {
        name: data.encode() if isinstance(data, str) else data for name, data in moved.items()}
    files.write_files_atomically(out, {"vertebrae.json": "again"}, remove=["other/new.txt"])
    assert not (out / "other").exists()                     # a sub-folder left empty goes


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


def test_metaimage_reader_complaints_become_the_one_line_error(tmp_path, capfd):
    """ITK's MetaImage reader prints to the process's stderr itself; that text is the reason, not noise."""
    good = write_image(image(), sagittal_affine(0.8), tmp_path / "scan.mha")
    cut = tmp_path / "cut.mha"
    cut.write_bytes(good.read_bytes()[:64])
    with pytest.raises(InputError, match=r"cannot read .*cut\.mha: .*DimSize"):
        load_scan(cut)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("size", [0.0, float("nan"), float("inf")])
def test_a_nifti_voxel_size_of_zero_or_nan_is_refused(tmp_path, size):
    """ITK reads such a pixdim as 1 mm without a word."""
    raw = bytearray(write_image(image(), sagittal_affine(0.8), tmp_path / "scan.nii").read_bytes())
    struct.pack_into("<2f", raw, 80, size, size)      # pixdim[1], pixdim[2]
    struct.pack_into("<h", raw, 254, 0)               # sform_code 0: the spacing is pixdim's
    bad = tmp_path / "bad.nii"
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="invalid voxel size"):
        load_scan(bad)


def test_wide_voxels_are_read_with_one_narrow_copy(tmp_path):
    """64-bit voxels are narrowed in ITK and no full-size copy is sorted: an all-zero float64 volume at
    the voxel limit (1 GiB) once took 3.4 GB and a MemoryError.  Here 128^3 voxels, traced with tracemalloc."""
    import tracemalloc

    import SimpleITK as sitk

    from SpineNetLib.inputs.writers import ijk_to_ras_to_sitk

    def write_float64(voxels, path):      # write_image stores float64 as float32
        img = sitk.GetImageFromArray(np.asarray(voxels, np.float64))
        spacing, origin, direction = ijk_to_ras_to_sitk(sagittal_affine(0.8, 0.8))
        img.SetSpacing(spacing), img.SetOrigin(origin), img.SetDirection(direction)
        sitk.WriteImage(img, str(path))
        return path

    zeros = write_float64(np.zeros((128, 128, 128)), tmp_path / "zeros.nii.gz")
    wide = 8 * 128 ** 3
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="same value"):      # empty, not "a label map"
            load_scan(zeros)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * wide, f"{peak / 1e6:.1f} MB traced for a {wide / 1e6:.1f} MB volume"
    scan = load_scan(write_float64(image(), tmp_path / "f8.nii.gz"))
    assert scan.metadata["voxel_type"] == "float64" and scan.voxels.dtype == np.float32


def _patch_element(path, tag_bytes: bytes, new_value: bytes) -> None:
    """Replace the value of the explicit-VR element starting with ``tag_bytes`` (tag + 2-letter VR),
    writing its length as it is, right or wrong."""
    raw = path.read_bytes()
    at = raw.index(tag_bytes)
    length = struct.unpack_from("<H", raw, at + 6)[0]
    path.write_bytes(raw[:at + 6] + struct.pack("<H", len(new_value)) + new_value + raw[at + 8 + length:])


@pytest.mark.filterwarnings("ignore")
def test_a_malformed_binary_value_names_the_file_and_element_unless_unused(tmp_path):
    """A value pydicom cannot convert (a 1-byte US) once surfaced as an internal error."""
    folder = tmp_path / "dicom"
    files = write_dicom_series(image((5, 64, 48)), sagittal_affine(0.8), folder)
    for f in files:                         # an element the loader does not use, 3 bytes for 2 x US
        ds = pydicom.dcmread(f)
        ds.AcquisitionMatrix = [0, 64, 48, 0]
        ds.save_as(f)
        _patch_element(f, b"\x18\x00\x10\x13US", b"\x01\x02\x03")
    assert load_scan(folder).voxels.shape[:2] == (64, 48)      # dropped: not used
    ds = pydicom.dcmread(files[1], force=True)
    ds[0x0028, 0x1053]._value = "abc"          # RescaleSlope: once read as 1 without a word
    ds.save_as(files[1])
    with pytest.raises(InputError, match=r"IM0002\.dcm has an unusable RescaleSlope \('abc'\)"):
        load_scan(folder)
    _patch_element(files[2], b"\x28\x00\x10\x00US", b"\xff")   # Rows, 1 byte
    with pytest.raises(InputError, match=r"IM0003\.dcm has a malformed Rows"):
        load_scan(folder)
    files[2].unlink()
    for f in files[:2] + files[3:]:
        ds = pydicom.dcmread(f)
        ds.PixelSpacing, ds.RescaleSlope = [0, 0], 1
        ds.save_as(f)
    with pytest.raises(InputError, match=r"is not positive: 0 x 0 mm"):
        load_scan(folder)


def test_a_folder_that_cannot_be_listed_is_reported_not_skipped(tmp_path, monkeypatch):
    """os.walk skips folders it cannot list: slices in one would vanish without a word."""
    import os

    folder = tmp_path / "dicom"
    files = write_dicom_series(image((5, 64, 48)), sagittal_affine(0.8), folder)
    (folder / "more").mkdir()
    for f in files[3:]:
        f.rename(folder / "more" / f.name)
    real_scandir, blocked = os.scandir, {"more"}

    def scandir(path="."):      # what a folder without read permission does (root would read it anyway)
        if os.path.basename(os.fspath(path)) in blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=r"cannot read the folder .*more: Permission denied"):
        load_scan(folder)
    blocked.add("dicom")
    with pytest.raises(InputError, match=r"cannot read the folder .*dicom: Permission denied"):   # not "empty"
        load_scan(folder)


def test_a_failed_write_ends_in_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """The run's warnings come after its files are written, so a full disk gives the error line only."""
    import os
    from types import SimpleNamespace

    from SpineNetLib import pipeline
    from SpineNetLib.outputs import files

    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, *a, **k: _FailingWrites(real_fdopen(fd, *a, **k), 27))
    with pytest.raises(OSError) as info:
        files.write_files_atomically(tmp_path / "out", _documents())
    assert info.value.filename == str(tmp_path / "out" / "vertebrae.json")
    path = write_image(image(), sagittal_affine(0.8), tmp_path / "scan.nii.gz")
    result = SimpleNamespace(warnings=["a warning of the run"])
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: SimpleNamespace(grading=None, load_seconds=0.0))
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: result)
    monkeypatch.setattr(files, "write_results", lambda *a, **k: files.write_files_atomically(a[0], _documents()))
    assert cli.main(["run", str(path), "-o", str(tmp_path / "out2"), "--quiet", "--no-grade"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"spinenet: error: cannot access {tmp_path / 'out2' / 'vertebrae.json'}: File too large"]
    assert not [p for p in (tmp_path / "out2").iterdir()]


def test_no_vertebrae_always_comes_with_the_reason(monkeypatch):
    from SpineNetLib import pipeline
    from SpineNetLib.core.results import DetectionResult
    from SpineNetLib.detect.no_bodies import no_vertebrae_reason
    from SpineNetLib.inputs.canonical import scan_from_array
    from SpineNetLib.synthetic.phantom import make_phantom

    from oracles import oracle_networks

    rng = np.random.default_rng(0)
    nothing = DetectionResult(vertebrae=[])

    def reason(voxels, pixel_mm=1.0):
        return no_vertebrae_reason(scan_from_array(voxels, sagittal_affine(pixel_mm)), nothing,
                                   pipeline.PIXEL_SPACING_FACTORS_TO_TRY)

    assert "looks like noise" in reason(rng.uniform(0, 100, (3, 128, 128)).astype(np.float32))
    square = np.zeros((3, 128, 128), np.float32)
    square[:, 60:66, 60:66] = 1000 + rng.uniform(0, 1, (3, 6, 6))
    assert "% of the middle slice is background" in reason(square)
    assert "covers only 6 x 6 mm" in reason(rng.uniform(0, 100, (3, 4, 4)).astype(np.float32), 1.5)
    ramp = np.broadcast_to(np.linspace(0, 1, 128, dtype=np.float32), (3, 128, 128)).copy()
    assert "nothing like a vertebral body" in reason(ramp)
    assert "and at 0.5 to 2 times it" in reason(ramp)
    # and the run puts it into the warnings and the vertebrae document
    phantom = make_phantom(fov="lumbar", shape=(128, 128), pixel_spacing=(2.0, 2.0), n_slices=3)
    monkeypatch.setattr(pipeline, "detect_and_label", lambda *a, **k: DetectionResult(vertebrae=[]))
    result = pipeline.run(phantom.scan, oracle_networks(phantom), pipeline.RunOptions(grade=False))
    assert result.warnings[0].startswith("no vertebra was found at the header's pixel spacing (2 x 2 mm)")
    assert result.vertebrae_document["warnings"][0] == result.warnings[0]


def test_every_data_file_a_header_names_must_be_a_regular_file(tmp_path):
    """A named pipe in a MetaImage LIST or a NRRD header once hung the reader; /dev/zero fed it forever."""
    import os

    os.mkfifo(tmp_path / "pipe.raw")
    mhd = write_image(image(), sagittal_affine(0.8), tmp_path / "scan.mhd").read_text(encoding="latin-1")
    head = mhd[:mhd.index("ElementDataFile")]
    (tmp_path / "list.mhd").write_text(head + "ElementDataFile = LIST 2D\n" + "pipe.raw\n" * 5, encoding="latin-1")
    mha = write_image(image(), sagittal_affine(0.8), tmp_path / "scan.mha").read_bytes()
    (tmp_path / "device.mha").write_bytes(mha[:mha.index(b"ElementDataFile")] + b"ElementDataFile = /dev/zero\n")
    nrrd = write_image(image(), sagittal_affine(0.8), tmp_path / "scan.nrrd").read_bytes()
    header, _, data = nrrd.partition(b"\n\n")
    (tmp_path / "scan_data.raw").write_bytes(data)
    for name, data_file in (("zero.nhdr", "/dev/zero"), ("pipe.nhdr", "pipe.raw"), ("ok.nhdr", "scan_data.raw")):
        (tmp_path / name).write_bytes(header + f"\ndata file: {data_file}\n".encode())
    for name, words in (("list.mhd", "'pipe.raw', which is not a regular file"),
                        ("device.mha", "'/dev/zero', which is not a regular file"),
                        ("zero.nhdr", "'/dev/zero', which is not a regular file"),
                        ("pipe.nhdr", "'pipe.raw', which is not a regular file")):
        with pytest.raises(InputError, match=words):
            load_scan(tmp_path / name)
    assert load_scan(tmp_path / "ok.nhdr").voxels.shape[:2] == (64, 48)


@pytest.mark.filterwarnings("ignore")
def test_dicom_results_check_the_source_uids_before_the_work_and_drop_unusable_numbers(tmp_path):
    """A multi-valued SOPClassUID or SpacingBetweenSlices once crashed highdicom after the inference."""
    from SpineNetLib.outputs.dicom_results import _source_headers, check_dicom_source

    folder = tmp_path / "dicom"
    files = write_dicom_series(image((5, 64, 48)), sagittal_affine(0.8), folder)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SpacingBetweenSlices = "1\\2\\3"
        ds.save_as(f)
    scan = load_scan(folder)
    check_dicom_source(scan)
    assert all("SpacingBetweenSlices" not in h for h in _source_headers(scan))
    ds = pydicom.dcmread(files[4])
    ds[0x0008, 0x0016]._value = "NaN\\NaN"           # SOPClassUID
    ds.save_as(files[4])
    with pytest.raises(InputError, match=r"IM0005\.dcm has SOPClassUID 'NaN\\\\NaN'"):
        check_dicom_source(load_scan(folder))
    files[4].unlink()
    for keyword, value, words in (("PatientBirthDate", "abc", "a malformed one ('abc')"),
                                  ("PatientName", "1\\2\\3", "several values in it ('1\\2\\3')"),
                                  ("PatientSex", "Q", "not M, F or O")):
        ds = pydicom.dcmread(files[0])
        setattr(ds, keyword, value)
        ds.save_as(files[0])
        with pytest.raises(InputError) as info:
            check_dicom_source(load_scan(folder))
        assert f"copy {keyword} from the source images, and IM0001.dcm has" in str(info.value), str(info.value)
        assert words in str(info.value), str(info.value)
        ds = pydicom.dcmread(files[0])
        del ds[keyword]
        ds.save_as(files[0])


@pytest.mark.filterwarnings("ignore")
def test_bad_values_are_named_with_their_file_or_option(tmp_path, capsys):
    """NaN voxels of NRRD files, a RescaleSlope that overflows, a zero NRRD spacing, --pixel-spacing nan."""
    voxels = image()
    voxels[1, 5, 5] = np.nan
    with pytest.raises(InputError, match=r"^nan\.nrrd has 1 NaN or infinite voxel"):
        load_scan(write_image(voxels, sagittal_affine(0.8), tmp_path / "nan.nrrd"))
    folder = tmp_path / "dicom"
    files = write_dicom_series(image((5, 64, 48)), sagittal_affine(0.8), folder)
    ds = pydicom.dcmread(files[3])
    ds.RescaleSlope = "1e300"
    ds.save_as(files[3])
    with pytest.raises(InputError, match=r"RescaleSlope 1e\+300 and RescaleIntercept 0 of .*IM0004\.dcm scale"):
        load_scan(folder)
    nrrd = write_image(image(), sagittal_affine(0.8), tmp_path / "scan.nrrd").read_bytes()
    header, _, data = nrrd.partition(b"\n\n")
    lines = [b"space directions: (0,0,0) (0,0,0) (0,0,0)" if ln.startswith(b"space directions") else ln
             for ln in header.split(b"\n")]
    (tmp_path / "zero.nrrd").write_bytes(b"\n".join(lines) + b"\n\n" + data)
    with pytest.raises(InputError, match="zero.nrrd: invalid voxel size in the header"):
        load_scan(tmp_path / "zero.nrrd")
    assert cli.main(["run", str(tmp_path / "nan.nrrd"), "-o", str(tmp_path / "out"), "--pixel-spacing", "nan",
                     "nan"]) == 2
    assert capsys.readouterr().err.splitlines() == ["spinenet: error: --pixel-spacing must be 2 positive, finite "
                                                    "number(s) in mm, got nan x nan"]
