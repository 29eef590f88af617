"""Scan input: DICOM / image loading and the canonical orientation (SpineNetLib.inputs.canonical, io*)."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from SpineNetLib.inputs.canonical import TARGET_SLICE_MM, scan_from_array, slab_factor
from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.inputs.dicom import load_dicom_series
from SpineNetLib.inputs.image import load_image_file
from SpineNetLib.inputs.writers import write_dicom_series, write_enhanced_dicom, write_image

_CODES = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


def affine(codes: str, spacing, origin=(10.0, -20.0, 30.0), rotation=None) -> np.ndarray:
    """IJK-to-RAS whose i, j, k axes point towards the RAS letters in ``codes``."""
    a = np.eye(4)
    for ax, (code, sp) in enumerate(zip(codes, spacing)):
        a[:3, ax] = np.array(_CODES[code], float) * sp
    if rotation is not None:
        a[:3, :3] = rotation @ a[:3, :3]
    a[:3, 3] = origin
    return a


def rot(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r = np.eye(3)
    i, j = [x for x in range(3) if x != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def ras_of_voxels(shape_kji, a) -> np.ndarray:
    """RAS of every voxel centre, array (nk, nj, ni, 3)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk @ a.T)[..., :3]


def asymmetric_volume(shape_kji, seed=0) -> np.ndarray:
    """Random values with a ramp along every axis, so any flip or permutation shows."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    return (400.0 + 30.0 * k + 7.0 * j + 3.0 * i + rng.uniform(0, 50, shape_kji)).astype(np.float32)


def sagittal_standard(shape_kji=(6, 30, 24)):
    """Typical sagittal TSE geometry: i -> posterior (col 0.8 mm), j -> inferior (row 0.6 mm), k -> right, 4 mm."""
    return asymmetric_volume(shape_kji), affine("PIR", (0.8, 0.6, 4.0))


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------
# DICOM with every trap vs. the NIfTI of the same volume
# --------------------------------------------------------------------------------------------

def test_dicom_with_traps_matches_nifti(tmp_path):
    vol, a = sagittal_standard()
    slope, intercept = 0.5, -100.0
    folder = tmp_path / "dicom"
    write_dicom_series(vol, a, folder, rescale_slope=slope, rescale_intercept=intercept, shuffle_files=True,
                       shuffle_instance_numbers=True, seed=3, series_description="T2 SAG")
    # stray files: text, a non-DICOM file with a .dcm name, a fake DICOMDIR, a hidden file, a subfolder
    (folder / "README.txt").write_text("not dicom")
    (folder / "junk.dcm").write_bytes(b"\x00" * 300)
    (folder / "DICOMDIR").write_bytes(b"garbage")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes").write_text("x")
    # a second, axial series in the same folder
    ax = asymmetric_volume((8, 20, 20), seed=1)
    write_dicom_series(ax, affine("RAI", (0.9, 0.9, 5.0)), folder, file_prefix="AX", series_description="T2 AX")
    files = sorted(folder.glob("IM*.dcm"))
    instance_numbers = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files]
    positions = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[0]) for f in files]
    assert instance_numbers != sorted(instance_numbers) and positions != sorted(positions)  # the traps are set

    nifti = tmp_path / "vol.nii.gz"
    write_image(vol, a, nifti)
    d, n = load_scan(folder), load_scan(nifti)

    # i -> P = canonical cols, j -> I = canonical rows, k -> R: reversed for slices R -> L
    expected = vol.transpose(1, 2, 0)[:, :, ::-1]
    assert d.voxels.dtype == np.float32 and n.voxels.dtype == np.float32
    assert d.shape == n.shape == (30, 24, 6)
    np.testing.assert_array_equal(n.voxels, expected)
    np.testing.assert_allclose(d.voxels, expected, atol=slope / 2 + 1e-4, rtol=0)
    assert np.abs(d.voxels - expected).max() > 0.01  # the quantisation did happen: values came via the slope
    np.testing.assert_allclose(d.canonical_to_ras, n.canonical_to_ras, atol=1e-4)
    np.testing.assert_allclose(d.spacing_mm, (0.6, 0.8, 4.0), atol=1e-6)
    np.testing.assert_allclose(n.spacing_mm, (0.6, 0.8, 4.0), atol=1e-6)
    assert d.input_slice_axis == n.input_slice_axis == 2
    assert d.metadata["series_description"] == "T2 SAG" and d.metadata["modality"] == "MR"
    assert d.metadata["n_files"] == 6 and d.metadata["acquisition"] == "2D sagittal"
    assert d.metadata["dicom_pixel_spacing_mm"] == [0.6, 0.8]


def test_dicom_slice_index_and_round_trip(tmp_path):
    vol, a = sagittal_standard()
    vol = np.round(vol)
    write_dicom_series(vol, a, tmp_path, shuffle_files=True, seed=5, rescale_intercept=-100)
    scan = load_scan(tmp_path)
    # the loader's own k follows the position along the slice normal, cross(row dir, col dir), which
    # points to the patient's right here (rows P, columns I): DICOM k=0 is the leftmost slice (R = 10),
    # so canonical slice s (R -> L) is DICOM k = 5 - s and the loader's array equals the written one.
    first = pydicom.dcmread(scan.metadata["files_in_slice_order"][0], stop_before_pixels=True)
    assert float(first.ImagePositionPatient[0]) == pytest.approx(-10.0)  # LPS x = -R
    assert [scan.input_slice_index(s) for s in range(6)] == [5, 4, 3, 2, 1, 0]
    assert scan.input_slice_axis == 2 and scan.input_shape_ijk == (24, 30, 6)
    assert_round_trip(scan, vol)


# --------------------------------------------------------------------------------------------
# canonical orientation for many sagittal geometries
# --------------------------------------------------------------------------------------------

def assert_round_trip(scan, vol_kji):
    """Every canonical voxel is the input voxel that canonical_to_input_ijk points to."""
    h, w, s = scan.shape
    r, c, sl = np.meshgrid(np.arange(h), np.arange(w), np.arange(s), indexing="ij")
    rcs1 = np.stack([r, c, sl, np.ones_like(r)], axis=-1).reshape(-1, 4).astype(float)
    ijk = rcs1 @ scan.canonical_to_input_ijk.T
    assert np.allclose(ijk, np.rint(ijk))
    ijk = np.rint(ijk).astype(int)
    np.testing.assert_array_equal(scan.voxels.reshape(-1), vol_kji[ijk[:, 2], ijk[:, 1], ijk[:, 0]])
    np.testing.assert_allclose(scan.canonical_to_ras, scan.input_ijk_to_ras @ scan.canonical_to_input_ijk)
    back = np.linalg.inv(scan.canonical_to_input_ijk) @ np.array([*ijk[7, :3], 1.0])
    np.testing.assert_allclose(back[:3], rcs1[7, :3], atol=1e-9)


SAGITTAL_VARIANTS = {
    # i, j, k axis directions (RAS letters): the L-R axis gets 4 mm, the others 0.7 and 0.9 mm
    "dicom-like, slices to L": "PIL",
    "dicom-like, slices to R": "PIR",
    "all flipped": "ASL",
    "in-plane transposed": "IPR",
    "in-plane transposed, flipped": "SAL",
    "RAS nifti, slices along i": "RAS",
    "LPS-ish, slices along i": "LPI",
    "slices along j": "ARI",
    "slices along j, flipped": "PLS",
}


@pytest.mark.parametrize("codes", list(SAGITTAL_VARIANTS.values()), ids=list(SAGITTAL_VARIANTS))
def test_canonical_orientation_marker(codes):
    lr_axis = next(ax for ax, c in enumerate(codes) if c in "RL")
    spacing = [0.7, 0.9, 0.0]
    spacing.insert(lr_axis, 4.0)
    spacing = spacing[:3]
    sizes_ijk = [12, 10, 9]
    sizes_ijk.insert(lr_axis, 5)
    sizes_ijk = sizes_ijk[:3]
    a = affine(codes, spacing)
    shape_kji = tuple(reversed(sizes_ijk))
    vol = asymmetric_volume(shape_kji) * 0.01
    marker_ijk = (1, 1, 1)
    vol[marker_ijk[2], marker_ijk[1], marker_ijk[0]] = 1000.0
    scan = scan_from_array(vol, a)

    ras = ras_of_voxels(shape_kji, a)
    marker_ras = ras[marker_ijk[2], marker_ijk[1], marker_ijk[0]]
    # expected canonical index: how many distinct voxel positions are more superior / anterior / right
    exp_row = len(np.unique(np.round(ras[..., 2][ras[..., 2] > marker_ras[2] + 1e-6], 6)))
    exp_col = len(np.unique(np.round(ras[..., 1][ras[..., 1] > marker_ras[1] + 1e-6], 6)))
    exp_slice = len(np.unique(np.round(ras[..., 0][ras[..., 0] > marker_ras[0] + 1e-6], 6)))
    found = np.unravel_index(np.argmax(scan.voxels), scan.shape)
    assert tuple(int(x) for x in found) == (exp_row, exp_col, exp_slice)
    n_s = len(np.unique(np.round(ras[..., 2], 6)))
    n_a = len(np.unique(np.round(ras[..., 1], 6)))
    assert scan.shape == (n_s, n_a, 5)
    assert scan.input_slice_axis == lr_axis
    np.testing.assert_allclose(scan.canonical_to_ras_points(*found)[0], marker_ras, atol=1e-9)
    # rows go inferior, columns posterior, slices left
    d = scan.canonical_to_ras[:3, :3]
    assert d[2, 0] < 0 and d[1, 1] < 0 and d[0, 2] < 0
    np.testing.assert_allclose(scan.spacing_mm, (spacing[[c in "SI" for c in codes].index(True)],
                                                 spacing[[c in "AP" for c in codes].index(True)], 4.0))
    assert_round_trip(scan, vol)


@pytest.mark.parametrize("tilt", [(0, 20.0), (2, 12.0), (1, 25.0)], ids=["about-R", "about-S", "about-A"])
def test_oblique_sagittal_is_only_permuted(tilt):
    a = affine("PIL", (0.8, 0.6, 4.0), rotation=rot(*tilt))
    vol = asymmetric_volume((5, 20, 16)) * 0.01
    vol[3, 2, 4] = 1000.0
    scan = scan_from_array(vol, a)
    assert scan.shape == (20, 16, 5)  # no interpolation, no resampling
    found = np.unravel_index(np.argmax(scan.voxels), scan.shape)
    np.testing.assert_allclose(scan.canonical_to_ras_points(*found)[0], (a @ [4, 2, 3, 1])[:3], atol=1e-9)
    assert_round_trip(scan, vol)
    d = scan.canonical_to_ras[:3, :3]
    assert d[2, 0] < 0 and d[1, 1] < 0 and d[0, 2] < 0


def test_oblique_dicom_matches_nifti(tmp_path):
    a = affine("PIL", (0.8, 0.6, 4.0), rotation=rot(0, 15.0) @ rot(2, 10.0))
    vol = asymmetric_volume((5, 20, 16))
    write_dicom_series(vol, a, tmp_path / "d", shuffle_files=True, seed=2)
    write_image(vol, a, tmp_path / "v.nrrd")
    d, n = load_scan(tmp_path / "d"), load_scan(tmp_path / "v.nrrd")
    np.testing.assert_allclose(d.voxels, n.voxels, atol=0.5 + 1e-4)
    np.testing.assert_allclose(d.canonical_to_ras, n.canonical_to_ras, atol=1e-4)


# --------------------------------------------------------------------------------------------
# near-isotropic 3D: slab averaging along L-R with exact geometry
# --------------------------------------------------------------------------------------------

def test_isotropic_axial_3d_resampled_to_sagittal_slabs():
    # an axial 3D acquisition, 1 mm isotropic: i -> L (30 voxels), j -> P, k -> S
    shape_kji = (40, 24, 30)
    a = affine("LPS", (1.0, 1.0, 1.0))
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    vol = (i * 1.0).astype(np.float32)          # value = input L-R index: slab means are checkable
    vol[20, 5, 14] += 1000.0                     # marker at i=14, j=5, k=20
    scan = scan_from_array(vol, a)
    assert scan.input_slice_axis == 0
    # round(3.5 mm / 1 mm) = 4 slices per slab: 30 // 4 = 7 slabs, 2 edge slices dropped (one per side)
    assert scan.shape == (40, 24, 7)
    np.testing.assert_allclose(scan.spacing_mm, (1.0, 1.0, 4.0))
    assert scan.metadata["acquisition"] == "3D thin-slice"
    assert scan.metadata["resampled"]["slices_per_slab"] == 4
    assert scan.metadata["resampled"]["dropped_edge_slices"] == 2
    # slices run R -> L, i runs to L: canonical slice t = mean of i = 1+4t .. 4+4t, centre 4t + 2.5
    centres = (scan.canonical_to_input_ijk @ np.array([[0, 0, t, 1.0] for t in range(7)]).T)[0]
    np.testing.assert_allclose(centres, 4 * np.arange(7) + 2.5)
    # rows S->I: k=20 is row 19; cols A->P: j=5 is col 5.  Away from the marker every slab holds its centre.
    row, col = 39 - 20, 5
    background = scan.voxels.copy()
    background[row, col, :] = background[0, 0, :]
    np.testing.assert_allclose(background, np.broadcast_to(centres, scan.shape), atol=1e-4)
    # voxel i=14 is in slab 3 (i = 13..16): it adds 1000 / 4 there and nothing elsewhere
    np.testing.assert_allclose(scan.voxels[row, col] - centres, 250.0 * (np.arange(7) == 3), atol=1e-3)
    ras = scan.canonical_to_ras_points(row, col, 3)[0]
    marker_ras = (a @ [14, 5, 20, 1])[:3]
    np.testing.assert_allclose(ras[1:], marker_ras[1:], atol=1e-9)   # A and S exact
    assert ras[0] == pytest.approx(marker_ras[0] - 0.5)                # slab centre i=14.5, 1 mm voxels to L
    assert_round_trip(scan_from_array(vol, a, resample_isotropic=False), vol)
    native = scan_from_array(vol, a, resample_isotropic=False)
    assert native.shape == (40, 24, 30) and native.metadata["acquisition"] == "3D thin-slice"


@pytest.mark.parametrize("mm, per_slab", [(0.5, 7), (0.8, 4), (0.9, 4), (1.2, 3), (1.5, 2), (2.0, 2)])
def test_slab_thickness_stays_in_training_range(mm, per_slab):
    scan = scan_from_array(np.zeros((40, 40, 40), np.float32), affine("PIR", (mm, mm, mm)))
    assert scan.metadata["resampled"]["slices_per_slab"] == per_slab == slab_factor(40, mm)
    assert abs(scan.spacing_mm[2] - TARGET_SLICE_MM) <= mm / 2 + 1e-9
    assert 3.0 <= scan.spacing_mm[2] <= 4.5


def test_isotropic_sagittal_3d_slab_average_is_a_mean(tmp_path):
    a = affine("PIR", (1.0, 1.0, 1.0))
    rng = np.random.default_rng(7)
    vol = rng.uniform(0, 100, (21, 12, 10)).astype(np.float32)   # 21 slices along R
    scan = load_scan(write_image(vol, a, tmp_path / "iso.mha"))
    assert scan.shape == (12, 10, 5)             # 21 // 4 = 5 slabs; slices R -> L = k reversed
    canon_native = scan_from_array(vol, a, resample_isotropic=False).voxels
    for t in range(5):   # exactly the float32 voxels' mean (float64 sums), slices in the canonical order
        np.testing.assert_array_equal(
            scan.voxels[:, :, t], canon_native[:, :, 4 * t:4 * t + 4].mean(axis=2, dtype=np.float64).astype(np.float32))
    # other stored types are taken as float32 first, as every scan is
    assert np.array_equal(scan_from_array(vol.astype(np.float64) / 3, a).voxels,
                          scan_from_array((vol.astype(np.float64) / 3).astype(np.float32), a).voxels)
    whole = np.round(vol).astype(np.int16)
    assert np.array_equal(scan_from_array(whole, a).voxels, scan_from_array(whole.astype(np.float32), a).voxels)
    c = scan.canonical_to_ras_points(0, 0, np.arange(5))
    np.testing.assert_allclose(c[:, 0], 10.0 + 20 - (4 * np.arange(5) + 1.5))   # R of the slab centres


@pytest.mark.parametrize("slice_mm, averaged", [(0.9, True), (2.0, True), (2.5, False), (3.3, False)])
def test_a_sagittal_stack_of_thin_slices_is_read_as_slabs(tmp_path, slice_mm, averaged):
    """A 3D sagittal sequence such as T2 SPACE (0.47 mm pixels, 0.9 mm slices: its slices are over 1.5 times its
    pixels, so it reads as a 2D sagittal stack) is averaged into ~3.5 mm slabs as a near-isotropic volume is, up to
    2 mm apart; thicker 2D slices stay as they are. Each slab is the mean of whole slices, its place exact."""
    a = affine("PIR", (0.47, 0.47, slice_mm))              # i -> P, j -> I, k -> R: k holds the sagittal slices
    rng = np.random.default_rng(3)
    vol = rng.uniform(0, 100, (30, 16, 12)).astype(np.float32)   # 30 slices along R
    scan = load_scan(write_image(vol, a, tmp_path / "stack.nii.gz"))
    native = scan_from_array(vol, a, resample_isotropic=False)
    assert native.shape == (16, 12, 30)
    from SpineNetLib.outputs.vertebrae import input_description

    said = input_description(scan)              # vertebrae.json's "input" block tells how the scan was read
    if not averaged:
        assert scan.shape == native.shape and scan.metadata["acquisition"] == "2D sagittal"
        assert "resampled" not in scan.metadata and said["acquisition"] == "2D sagittal" and "resampled" not in said
        return
    assert said["acquisition"] == "thin-slice sagittal" and said["resampled"]["to_mm"] == pytest.approx(
        slab_factor(30, slice_mm) * slice_mm)
    f = slab_factor(30, slice_mm)
    assert scan.metadata["acquisition"] == native.metadata["acquisition"] == "thin-slice sagittal"
    assert scan.metadata["resampled"]["slices_per_slab"] == f and 3.0 <= scan.spacing_mm[2] <= 4.5
    np.testing.assert_allclose(scan.spacing_mm[:2], (0.47, 0.47))
    start = (30 - (30 // f) * f) // 2
    for t in range(scan.shape[2]):
        np.testing.assert_allclose(scan.voxels[:, :, t],
                                   native.voxels[:, :, start + f * t:start + f * t + f].mean(axis=2), rtol=1e-6)
        # each slab lies at the mean place of its slices, in the scan's own coordinates
        np.testing.assert_allclose(scan.canonical_to_ras_points(0, 0, t)[0],
                                   native.canonical_to_ras_points(0, 0, start + f * t + (f - 1) / 2)[0], atol=1e-9)


# --------------------------------------------------------------------------------------------
# compressed DICOM and other transfer syntaxes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", ["implicit_little", "rle_lossless", "jpeg_lossless"])
def test_compressed_dicom_loads(tmp_path, syntax):
    vol, a = sagittal_standard((4, 20, 18))
    vol = np.round(vol)
    paths = write_dicom_series(vol, a, tmp_path, transfer_syntax=syntax)
    ts = pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts == {"implicit_little": pydicom.uid.ImplicitVRLittleEndian, "rle_lossless": pydicom.uid.RLELossless,
                  "jpeg_lossless": pydicom.uid.JPEGLosslessSV1}[syntax]
    scan = load_scan(tmp_path)
    np.testing.assert_array_equal(scan.voxels, vol.transpose(1, 2, 0)[:, :, ::-1])
    assert scan.metadata["transfer_syntax"] == ts.name


def test_enhanced_multiframe_dicom(tmp_path):
    vol, a = sagittal_standard((5, 20, 18))
    write_enhanced_dicom(vol, a, tmp_path / "mf" / "enhanced", rescale_slope=0.5, rescale_intercept=-100,
                         shuffle_frames=True, seed=1)
    write_image(vol, a, tmp_path / "v.nii.gz")
    d, n = load_scan(tmp_path / "mf"), load_scan(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(d.voxels, n.voxels, atol=0.25 + 1e-4)
    np.testing.assert_allclose(d.canonical_to_ras, n.canonical_to_ras, atol=1e-4)
    assert d.metadata["n_files"] == 1 and d.metadata["n_slices"] == 5
    # the single file given directly loads too
    np.testing.assert_array_equal(load_scan(tmp_path / "mf" / "enhanced").voxels, d.voxels)


def test_multiframe_without_geometry_is_refused(tmp_path):
    vol, a = sagittal_standard((3, 16, 16))
    path = write_enhanced_dicom(vol, a, tmp_path / "mf.dcm")
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InputError, match=r"^multi-frame DICOM .*mf\.dcm has no per-frame geometry"):
        load_scan(tmp_path)


def test_undecodable_compressed_dicom(tmp_path):
    vol, a = sagittal_standard((3, 20, 18))
    paths = write_dicom_series(np.round(vol), a, tmp_path, transfer_syntax="jpeg_lossless")
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xc3" + b"\x01" * 50])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(paths[1], enforce_file_format=True)
    with pytest.raises(InputError) as exc:
        load_scan(tmp_path)
    msg = assert_one_line(exc)
    assert re.search(r"cannot decode the pixel data of .*IM0002\.dcm \(transfer syntax JPEG Lossless.*"
                     r"python-gdcm", msg)


#: The compressed transfer syntaxes scanners and PACS write, and pydicom's decoder of each.
_COMPRESSED = ("JPEGBaseline8Bit", "JPEGExtended12Bit", "JPEGLossless", "JPEGLosslessSV1", "JPEGLSLossless",
               "JPEGLSNearLossless", "JPEG2000Lossless", "JPEG2000", "RLELossless")


@pytest.mark.parametrize("name", _COMPRESSED)
def test_compressed_dicom_is_decoded_by_what_spinenet_installs(name):
    """A plain `pip install spinenet-slicer` decodes every compressed syntax of _COMPRESSED: pydicom's own RLE
    decoder or python-gdcm, a dependency."""
    from pydicom.pixels import decoders

    decoder = getattr(decoders, f"{name}Decoder")
    assert {"gdcm", "pydicom"} & set(decoder.available_plugins), decoder.available_plugins


def test_a_jpeg_lossless_series_loads_with_python_gdcm_alone(tmp_path, monkeypatch):
    """JPEG lossless, the compression of many PACS exports, read with any other decoder out of the way (a
    pylibjpeg installed beside): python-gdcm decodes it, every voxel as written."""
    from pydicom.pixels import decoders

    decoder = decoders.JPEGLosslessSV1Decoder
    for label in [k for k in decoder.available_plugins if k != "gdcm"]:
        monkeypatch.delitem(decoder._available, label)
    assert decoder.available_plugins == ("gdcm",)
    vol, a = sagittal_standard((4, 20, 18))
    vol = np.round(vol)
    write_dicom_series(vol, a, tmp_path, transfer_syntax="jpeg_lossless")
    np.testing.assert_array_equal(load_scan(tmp_path).voxels, vol.transpose(1, 2, 0)[:, :, ::-1])


# --------------------------------------------------------------------------------------------
# series selection, single files, overrides
# --------------------------------------------------------------------------------------------

def two_sagittal_series(folder: Path, descriptions=("T1 SAG", "T2 SAG")):
    vol, a = sagittal_standard((4, 20, 18))
    p1 = write_dicom_series(vol, a, folder, file_prefix="T1_", series_description=descriptions[0])
    p2 = write_dicom_series(vol * 2, a, folder, file_prefix="T2_", series_description=descriptions[1])
    return [str(pydicom.dcmread(p[0], stop_before_pixels=True).SeriesInstanceUID) for p in (p1, p2)], vol


def test_series_selection(tmp_path):
    """Two sagittal series that do not tell which is T2-weighted: the reader asks which, listing both;
    a named one is read (by UID, or as the series of one of its files)."""
    uids, vol = two_sagittal_series(tmp_path, descriptions=("SAG TSE", "SAG TSE repeat"))
    with pytest.raises(InputError) as exc:
        load_scan(tmp_path)
    msg = assert_one_line(exc)
    assert uids[0] in msg and uids[1] in msg and "SAG TSE repeat" in msg and "(series 1, 4 slices)" in msg
    assert "choose one with --series (its UID, its series number or a part of its description)" in msg
    scan = load_scan(tmp_path, series_uid=uids[1])
    assert scan.metadata["series_uid"] == uids[1]
    assert not scan.metadata.get("warnings")
    np.testing.assert_allclose(scan.voxels, 2 * vol.transpose(1, 2, 0)[:, :, ::-1], atol=0.5 + 1e-3)
    # one file of the folder -> its own series
    scan1 = load_scan(tmp_path / "T1_0002.dcm")
    assert scan1.metadata["series_uid"] == uids[0]
    with pytest.raises(InputError, match="not found"):
        load_scan(tmp_path, series_uid="1.2.3.4")


def test_an_exam_folder_is_read_at_its_sagittal_t2_series(tmp_path):
    """A lumbar exam as PACS exports it: sagittal T1, T2 and STIR and an axial T2, told apart by their
    echo, repetition and inversion times only (descriptions that name no weighting). Without --series the
    sagittal T2 is read, and a warning names the sagittal series left unread with their weightings;
    --series still reads any other. Two sagittal T2 series (a repeat) still ask which."""
    vol, a = sagittal_standard((4, 20, 18))
    times = {"T1": {"EchoTime": 10, "RepetitionTime": 550, "ScanningSequence": "SE"},
             "T2": {"EchoTime": 95, "RepetitionTime": 3500, "ScanningSequence": "SE"},
             "STIR": {"EchoTime": 40, "RepetitionTime": 4000, "InversionTime": 160, "ScanningSequence": "IR"}}
    uids = {}
    for k, (name, tags) in enumerate(times.items()):
        paths = write_dicom_series(vol * (k + 1), a, tmp_path / "exam", file_prefix=f"S{k}_",
                                   series_description=f"sag {k}",
                                   extra_tags={**tags, "SeriesNumber": k + 2, "StudyInstanceUID": "1.2.3.9",
                                               "FrameOfReferenceUID": "1.2.3.9.1" if name != "STIR" else "1.2.3.9.2"})
        uids[name] = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    write_dicom_series(np.zeros((4, 16, 16)) + 50, np.diag([1.0, 1.0, 4.0, 1.0]), tmp_path / "exam",
                       file_prefix="AX_", series_description="ax 2", extra_tags=times["T2"])
    scan = load_scan(tmp_path / "exam")
    assert scan.metadata["series_uid"] == uids["T2"]
    np.testing.assert_allclose(scan.voxels, 2 * vol.transpose(1, 2, 0)[:, :, ::-1], atol=0.5 + 1e-3)
    (warning,) = scan.metadata["warnings"]
    assert f"3 sagittal series in {tmp_path / 'exam'}: read the T2-weighted one, {uids['T2']} 'sag 1'" in warning
    assert f"not read: T1 {uids['T1']} 'sag 0'" in warning and f"STIR {uids['STIR']} 'sag 2'" in warning
    assert "\n" not in warning
    # the other sagittal series of its exam and frame of reference, to compare its levels with (not the STIR)
    assert scan.metadata["other_sagittal_series"] == [uids["T1"]]
    named = load_scan(tmp_path / "exam", series_uid="sag 2")
    assert named.metadata["series_uid"] == uids["STIR"] and not named.metadata.get("warnings")
    write_dicom_series(vol, a, tmp_path / "exam", file_prefix="R_", series_description="sag 1 repeat",
                       extra_tags=times["T2"])
    with pytest.raises(InputError, match=r"^4 sagittal series in .*choose one with --series"):
        load_scan(tmp_path / "exam")


def test_a_dicomdir_reads_the_medium_it_indexes(tmp_path):
    """A CD or PACS export: the user points at its DICOMDIR; the series in the folders below it are read,
    as when the medium's folder is given."""
    from pydicom.fileset import FileSet

    vol, a = sagittal_standard((4, 20, 18))
    written = write_dicom_series(vol, a, tmp_path / "series", series_description="T2 SAG",
                                 extra_tags={"StudyDate": "20260101", "StudyTime": "120000", "StudyID": "1"})
    medium = FileSet()
    for path in written:
        medium.add(pydicom.dcmread(path))
    medium.write(tmp_path / "medium")
    dicomdir = tmp_path / "medium" / "DICOMDIR"
    assert dicomdir.is_file() and not list((tmp_path / "medium").glob("*.dcm"))   # the images lie below it
    scan = load_scan(dicomdir)
    np.testing.assert_allclose(scan.voxels, load_scan(tmp_path / "series").voxels)
    assert scan.metadata["series_description"] == "T2 SAG"
    assert load_scan(dicomdir, series_uid="T2").metadata["series_uid"] == scan.metadata["series_uid"]


def test_a_series_is_chosen_by_its_number_or_a_part_of_its_description(tmp_path):
    """A radiologist names a series as the viewer shows it (`--series 5`, `--series t2`), not by its UID."""
    vol, a = sagittal_standard((4, 20, 18))
    uids = {}
    for number, description, prefix, scale in ((3, "T1 TSE SAG", "T1_", 1), (5, "T2 TSE SAG", "T2_", 2),
                                                (6, "STIR SAG", "STIR_", 3)):
        paths = write_dicom_series(vol * scale, a, tmp_path, file_prefix=prefix, series_description=description,
                                   extra_tags={"SeriesNumber": number})
        uids[number] = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    unnamed = load_scan(tmp_path)   # the one whose description says T2, with a warning naming the others
    assert unnamed.metadata["series_uid"] == uids[5]
    assert "not read: T1 " in unnamed.metadata["warnings"][0] and "STIR " in unnamed.metadata["warnings"][0]
    for selector, number in (("5", 5), (" 3 ", 3), ("t2", 5), ("T1 TSE", 3), ("stir", 6), (uids[6], 6)):
        assert load_scan(tmp_path, series_uid=selector).metadata["series_uid"] == uids[number], selector
    with pytest.raises(InputError) as exc:
        load_scan(tmp_path, series_uid="TSE")   # two descriptions hold it
    msg = assert_one_line(exc)
    assert "--series 'TSE' names 2 series" in msg and uids[3] in msg and uids[5] in msg and uids[6] not in msg
    with pytest.raises(InputError, match="^series FLAIR not found in .*available: .*'STIR SAG' \\(series 6"):
        load_scan(tmp_path, series_uid="FLAIR")


def test_a_description_prefers_the_sagittal_series_it_names(tmp_path):
    """`--series T2` in an exam with a sagittal and an axial T2 series reads the sagittal one."""
    vol, a = sagittal_standard((4, 20, 18))
    sagittal = write_dicom_series(vol, a, tmp_path, file_prefix="SAG_", series_description="T2 SAG",
                                  extra_tags={"SeriesNumber": 2})
    axial = np.diag([1.0, 1.0, 4.0, 1.0])
    write_dicom_series(np.zeros((4, 16, 16)) + 50, axial, tmp_path, file_prefix="AX_", series_description="T2 AX",
                       extra_tags={"SeriesNumber": 4})
    uid = str(pydicom.dcmread(sagittal[0], stop_before_pixels=True).SeriesInstanceUID)
    assert load_scan(tmp_path, series_uid="t2").metadata["series_uid"] == uid


CT_TAGS = {"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}   # CT Image Storage


def test_a_ct_series_is_never_read_as_an_mr_scan(tmp_path):
    """A sagittal CT reformat beside the MR series of the same exam is passed over; named, or alone, it is
    refused in one line: the networks were trained on MR and would read a CT without a word of doubt."""
    vol, a = sagittal_standard((4, 20, 18))
    mr = write_dicom_series(vol, a, tmp_path / "exam", file_prefix="MR_", series_description="T2 SAG")
    ct = write_dicom_series(vol * 3, a, tmp_path / "exam", file_prefix="CT_", series_description="CT SAG",
                            extra_tags=CT_TAGS)
    mr_uid, ct_uid = (str(pydicom.dcmread(p[0], stop_before_pixels=True).SeriesInstanceUID) for p in (mr, ct))
    assert load_scan(tmp_path / "exam").metadata["series_uid"] == mr_uid
    with pytest.raises(InputError) as exc:
        load_scan(tmp_path / "exam", series_uid=ct_uid)
    assert "'CT SAG'" in assert_one_line(exc) and "is CT, not MR" in str(exc.value)
    for path in mr:
        path.unlink()
    with pytest.raises(InputError) as exc:
        load_scan(tmp_path / "exam")
    assert assert_one_line(exc).startswith(f"no sagittal MR series in {tmp_path / 'exam'}: its sagittal series is CT")
    write_dicom_series(vol, a, tmp_path / "other", extra_tags={"Modality": "OT"})   # "other": read
    assert load_scan(tmp_path / "other").shape == (20, 18, 4)


def test_pixel_and_slice_spacing_overrides(tmp_path):
    vol, a = sagittal_standard((4, 20, 18))
    write_dicom_series(vol, a, tmp_path / "d", extra_tags={"PixelSpacing": None})
    with pytest.raises(InputError, match=r"PixelSpacing \(0028,0030\) missing .*IM000\d\.dcm"):
        load_scan(tmp_path / "d")
    scan = load_scan(tmp_path / "d", pixel_spacing=(0.5, 0.7))
    np.testing.assert_allclose(scan.spacing_mm, (0.5, 0.7, 4.0), atol=1e-6)
    assert scan.metadata["overrides"] == {"pixel_spacing": [0.5, 0.7]}
    scan = load_scan(tmp_path / "d", pixel_spacing=(0.5, 0.7), slice_spacing=3.3)
    np.testing.assert_allclose(scan.spacing_mm, (0.5, 0.7, 3.3), atol=1e-6)
    # image files: the same (row, col) meaning
    write_image(vol, a, tmp_path / "v.nii")
    scan = load_scan(tmp_path / "v.nii", pixel_spacing=(0.5, 0.7), slice_spacing=3.3)
    np.testing.assert_allclose(scan.spacing_mm, (0.5, 0.7, 3.3), atol=1e-6)
    with pytest.raises(InputError, match="pixel_spacing override"):
        load_scan(tmp_path / "v.nii", pixel_spacing=(0.5, -1))


def test_missing_slice_is_refused_unless_slice_spacing_given(tmp_path):
    vol, a = sagittal_standard((6, 20, 18))
    paths = write_dicom_series(vol, a, tmp_path)
    paths[2].unlink()
    with pytest.raises(InputError) as exc:   # said as what it is: an image missing, and where
        load_scan(tmp_path)
    assert re.search(r"lacks 1 image \(gap of 8 mm, 2 times the step of 4 mm, after .*IM000[24]\.dcm\): export it "
                     r"again", assert_one_line(exc))
    scan = load_scan(tmp_path, slice_spacing=4.0)
    assert scan.shape == (20, 18, 5) and scan.spacing_mm[2] == pytest.approx(4.0)
    paths[4].unlink()                        # two gaps: both counted
    with pytest.raises(InputError, match=r"lacks 2 images"):
        load_scan(tmp_path)
    uneven = write_dicom_series(vol, a, tmp_path / "uneven")   # a position off by part of a step: no missing image
    ds = pydicom.dcmread(uneven[3])
    ds.ImagePositionPatient = [float(v) + 1.5 * float(n) for v, n in zip(ds.ImagePositionPatient, np.cross(
        [float(x) for x in ds.ImageOrientationPatient[:3]], [float(x) for x in ds.ImageOrientationPatient[3:]]))]
    ds.save_as(uneven[3], enforce_file_format=True)
    with pytest.raises(InputError, match=r"inconsistent slice positions .*missing or extra slices"):
        load_scan(tmp_path / "uneven")


# --------------------------------------------------------------------------------------------
# one error message per bad input
# --------------------------------------------------------------------------------------------

def _empty(tmp):
    (tmp / "e").mkdir()
    return tmp / "e", {}


def _not_dicom(tmp):
    (tmp / "n").mkdir()
    (tmp / "n" / "a.txt").write_text("hello")
    (tmp / "n" / "b.dcm").write_bytes(b"\x00" * 1000)
    return tmp / "n", {}


def _image_files(tmp):
    vol, a = sagittal_standard((4, 20, 18))
    for name in ("image.nii.gz", "labels.nii.gz"):
        write_image(vol, a, tmp / "case" / name)
    return tmp / "case", {}


def _only_axial(tmp):
    write_dicom_series(asymmetric_volume((5, 16, 16)), affine("RAI", (0.9, 0.9, 5.0)), tmp / "ax")
    return tmp / "ax", {}


def _only_coronal(tmp):
    write_dicom_series(asymmetric_volume((5, 16, 16)), affine("RIP", (0.9, 0.9, 5.0)), tmp / "cor")
    return tmp / "cor", {}


def _two_sagittal(tmp):
    two_sagittal_series(tmp / "two", descriptions=("T1 SAG", "PD SAG"))
    return tmp / "two", {}


def _no_pixel_data(tmp):
    paths = write_dicom_series(*sagittal_standard((4, 16, 16)), tmp / "npd")
    ds = pydicom.dcmread(paths[2])
    del ds.PixelData
    ds.save_as(paths[2], enforce_file_format=True)
    return tmp / "npd", {}


def _no_pixel_spacing(tmp):
    write_dicom_series(*sagittal_standard((4, 16, 16)), tmp / "nps", extra_tags={"PixelSpacing": None})
    return tmp / "nps", {}


def _duplicate_position(tmp):
    paths = write_dicom_series(*sagittal_standard((4, 16, 16)), tmp / "dup")
    shutil.copy(paths[1], tmp / "dup" / "copy.dcm")
    return tmp / "dup", {}


def _skewed_positions(tmp):
    paths = write_dicom_series(*sagittal_standard((5, 16, 16)), tmp / "skew")
    ds = pydicom.dcmread(paths[2])
    ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), 5.0, 60.0]  # slid in-plane
    ds.save_as(paths[2], enforce_file_format=True)
    return tmp / "skew", {}


def _corrupt_nifti(tmp):
    (tmp / "bad.nii.gz").write_bytes(b"\x1f\x8b" + b"corrupt" * 40)
    return tmp / "bad.nii.gz", {}


def _truncated_nifti(tmp):
    write_image(*sagittal_standard((4, 16, 16)), tmp / "full.nii.gz")
    data = gzip.decompress((tmp / "full.nii.gz").read_bytes())
    (tmp / "trunc.nii.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
    return tmp / "trunc.nii.gz", {}


def _cut_gzip(tmp):
    write_image(*sagittal_standard((4, 16, 16)), tmp / "full.nii.gz")
    data = (tmp / "full.nii.gz").read_bytes()
    (tmp / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return tmp / "cut.nii.gz", {}


def _truncated_nrrd(tmp):
    write_image(*sagittal_standard((4, 16, 16)), tmp / "full.nrrd")
    data = (tmp / "full.nrrd").read_bytes()
    (tmp / "trunc.nrrd").write_bytes(data[:-300])
    return tmp / "trunc.nrrd", {}


def _nifti_4d(tmp):
    img = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 16, 16), np.float32))] * 3)
    sitk.WriteImage(img, str(tmp / "four.nii.gz"))
    return tmp / "four.nii.gz", {}


def _single_slice(tmp):
    vol, a = sagittal_standard((1, 16, 16))
    write_image(vol, a, tmp / "one.nii.gz")
    return tmp / "one.nii.gz", {}


def _single_dicom_slice(tmp):
    vol, a = sagittal_standard((1, 16, 16))
    write_dicom_series(vol, a, tmp / "one")
    return tmp / "one", {}


def _single_axial_slice(tmp):
    vol = asymmetric_volume((1, 16, 16))
    write_image(vol, affine("RAS", (0.8, 0.8, 4.0)), tmp / "axial.nii.gz")
    return tmp / "axial.nii.gz", {}


@pytest.mark.parametrize("make", [_single_slice, _single_dicom_slice], ids=["NIfTI", "DICOM"])
def test_a_single_sagittal_slice_is_read_with_a_warning(tmp_path, make):
    """A key image or a 2D study (issue: single sagittal slices are accepted): one canonical slice,
    the in-plane voxels unchanged, and a warning that travels with the scan into the results."""
    path, kwargs = make(tmp_path)
    scan = load_scan(path, **kwargs)
    assert scan.voxels.shape[2] == 1
    assert scan.metadata["acquisition"] == "single sagittal slice"
    assert any("single sagittal slice" in w for w in scan.metadata["warnings"])
    vol, _ = sagittal_standard((1, 16, 16))
    # canonical rows run S->I (input j), columns A->P (input i)
    np.testing.assert_allclose(scan.voxels[:, :, 0], vol[0], rtol=0, atol=0.51)  # DICOM stores integers


def _nan_voxels(tmp):
    vol, a = sagittal_standard((4, 16, 16))
    vol[2, 3, 4] = np.nan
    write_image(vol, a, tmp / "nan.nrrd")
    return tmp / "nan.nrrd", {}


def _axial_nifti(tmp):
    write_image(asymmetric_volume((6, 16, 16)), affine("RAS", (0.8, 0.8, 4.0)), tmp / "ax.nii.gz")
    return tmp / "ax.nii.gz", {}


def _coronal_nifti(tmp):
    write_image(asymmetric_volume((6, 16, 16)), affine("RSA", (0.8, 0.8, 4.0)), tmp / "cor.nii.gz")
    return tmp / "cor.nii.gz", {}


def _missing_path(tmp):
    return tmp / "does-not-exist", {}


def _unknown_extension(tmp):
    (tmp / "scan.png").write_bytes(b"\x89PNG....")
    return tmp / "scan.png", {}


def _unknown_series(tmp):
    write_dicom_series(*sagittal_standard((4, 16, 16)), tmp / "us")
    return tmp / "us", {"series_uid": "1.2.3"}


BAD_INPUTS = {
    "empty folder": (_empty, r"^folder .* is empty$"),
    "folder without DICOM": (_not_dicom, r"^no DICOM files in "),
    "folder of image files": (_image_files, r"^no DICOM files in .*case, but 2 image files \(image.nii.gz, "
                                            r"labels.nii.gz\): give one of them, or run them all with "
                                            r"spinenet cohort$"),
    "only axial series": (_only_axial, r"^no sagittal series in .*: only axial series found"),
    "only coronal series": (_only_coronal, r"^no sagittal series in .*: only coronal series found"),
    "two sagittal series, neither T2": (_two_sagittal, r"^2 sagittal series in .*choose one with --series"),
    "unknown series": (_unknown_series, r"^series 1\.2\.3 not found in "),
    "missing PixelData": (_no_pixel_data, r"^no PixelData \(7FE0,0010\) in .*IM0003\.dcm$"),
    "missing PixelSpacing": (_no_pixel_spacing, r"^PixelSpacing \(0028,0030\) missing .*--pixel-spacing"),
    "duplicate slice position": (_duplicate_position,
                                 r"^contradictory slice positions .* at the same position \(the same images"),
    "slice off the line": (_skewed_positions, r"^contradictory slice positions .*IM0003\.dcm is \S+ mm off the line"),
    "corrupt nii.gz": (_corrupt_nifti, r"^cannot read .*bad\.nii\.gz: "),
    "truncated nii.gz": (_truncated_nifti, r"^cannot read .*trunc\.nii\.gz: truncated NIfTI file"),
    "cut gzip stream": (_cut_gzip, r"^cannot read .*cut\.nii\.gz: corrupt or truncated file"),
    "truncated nrrd": (_truncated_nrrd, r"^cannot read .*trunc\.nrrd: "),
    "4D NIfTI": (_nifti_4d, r"^four\.nii\.gz is 4D"),
    "single axial slice": (_single_axial_slice, r"^axial acquisition: SpineNet needs sagittal slices"),
    "NaN voxels": (_nan_voxels, r"^nan\.nrrd has 1 NaN or infinite voxel"),
    "axial 2D NIfTI": (_axial_nifti, r"^axial acquisition: SpineNet needs sagittal slices "
                                     r"\(slice normal is closest to S-I\)$"),
    "coronal 2D NIfTI": (_coronal_nifti, r"^coronal acquisition: SpineNet needs sagittal slices "
                                         r"\(slice normal is closest to A-P\)$"),
    "missing path": (_missing_path, r"^no such file or folder: "),
    "unknown extension": (_unknown_extension, r"^unsupported input 'scan\.png'"),
}


@pytest.mark.parametrize("make, pattern", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_message(tmp_path, make, pattern):
    path, kwargs = make(tmp_path)
    with pytest.raises(InputError) as exc:
        load_scan(path, **kwargs)
    msg = assert_one_line(exc)
    assert re.search(pattern, msg), msg


@pytest.mark.parametrize("voxels, a, pattern", [
    (np.zeros((3, 4, 5, 2)), np.eye(4), r"^4D or multi-component"),
    (np.zeros((4, 5)), np.eye(4), r"^expected a 3D volume"),
    (np.full((3, 4, 5), np.inf), np.eye(4), r"NaN or infinite voxel"),
    (np.zeros((3, 4, 5)), np.diag([1.0, 1.0, 0.0, 1.0]), r"^degenerate IJK-to-RAS matrix"),
    (np.zeros((3, 4, 5)), np.ones((4, 4)), r"^the IJK-to-RAS matrix is not affine"),
    (np.zeros((3, 4, 5), complex), np.eye(4), r"voxel type complex"),
    (np.zeros((3, 4, 5)), np.eye(3), r"must be 4x4"),
], ids=["4D", "2D", "inf", "degenerate", "not affine", "complex", "3x3"])
def test_scan_from_array_validation(voxels, a, pattern):
    with pytest.raises(InputError) as exc:
        scan_from_array(voxels, a)
    assert re.search(pattern, assert_one_line(exc))


def test_signed_stored_values(tmp_path):
    vol, a = sagittal_standard((4, 16, 16))
    vol = np.round(vol) - 700.0                       # negative values: stored as int16
    paths = write_dicom_series(vol, a, tmp_path)
    assert int(pydicom.dcmread(paths[0]).PixelRepresentation) == 1
    np.testing.assert_array_equal(load_scan(tmp_path).voxels, vol.transpose(1, 2, 0)[:, :, ::-1])


def test_loaders_direct_entry_points(tmp_path):
    vol, a = sagittal_standard((4, 16, 16))
    write_dicom_series(vol, a, tmp_path / "d")
    write_image(vol, a, tmp_path / "v.mhd")
    s1 = load_dicom_series(tmp_path / "d")
    s2 = load_image_file(tmp_path / "v.mhd")
    np.testing.assert_allclose(s1.voxels, s2.voxels, atol=0.5 + 1e-4)
    assert s2.metadata["format"] == "MetaImage"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "v.mhd", "v.raw"]  # no temporary leftovers


# --------------------------------------------------------------------------------------------
# several contrasts in one series (Dixon, dual echo): stacks
# --------------------------------------------------------------------------------------------

def dixon_series(folder: Path, image_types=(("ORIGINAL", "PRIMARY", "W", "W", "DERIVED"),
                                            ("ORIGINAL", "PRIMARY", "F", "F", "DERIVED")), **tags) -> tuple[str, list]:
    """One series UID holding a volume per image type at the same positions (a Dixon acquisition as some
    scanners store it); the i-th volume is the standard one times i + 1."""
    vol, a = sagittal_standard((4, 20, 18))
    uid = pydicom.uid.generate_uid()
    for i, image_type in enumerate(image_types):
        extra = {"ImageType": list(image_type), **{k: v[i] for k, v in tags.items()}}
        write_dicom_series(vol * (i + 1), a, folder, series_uid=uid, file_prefix=f"C{i}_",
                           series_description="T2 TSE mDixon", extra_tags=extra)
    return uid, [vol * (i + 1) for i in range(len(image_types))]


def test_a_series_of_several_contrasts_is_read_as_stacks(tmp_path):
    """A Dixon series (water and fat at every position under one UID) is no longer refused for its duplicate
    positions: each contrast is a stack, listed like a series, chosen by its key, by its label, or by one of
    its files; each reads its own images."""
    uid, (water, fat) = dixon_series(tmp_path)
    with pytest.raises(InputError) as exc:
        load_scan(tmp_path)
    msg = assert_one_line(exc)
    assert f"2 sagittal series in {tmp_path}" in msg and f"{uid} [W] 'T2 TSE mDixon'" in msg and f"{uid} [F]" in msg
    as_stored = lambda vol: vol.transpose(1, 2, 0)[:, :, ::-1]  # noqa: E731
    scan = load_scan(tmp_path, series_uid=f"{uid} [F]")
    np.testing.assert_allclose(scan.voxels, as_stored(fat), atol=0.5 + 1e-3)
    assert scan.metadata["series_uid"] == f"{uid} [F]" and scan.metadata["n_slices"] == 4
    np.testing.assert_allclose(load_scan(tmp_path, series_uid="[w]").voxels, as_stored(water), atol=0.5 + 1e-3)
    np.testing.assert_allclose(load_scan(tmp_path / "C1_0002.dcm").voxels, as_stored(fat), atol=0.5 + 1e-3)
    with pytest.raises(InputError) as exc:       # the plain UID names both stacks
        load_scan(tmp_path, series_uid=uid)
    assert "names 2 series" in assert_one_line(exc) and "with a stack's label in brackets" in str(exc.value)


def test_stacks_are_told_apart_by_echo_and_identical_repeats_stay_refused(tmp_path):
    """A dual-echo series: its stacks are named by echo number and echo time. Two copies of the same images
    in one series: nothing tells them apart, so the duplicate positions are refused as before."""
    echoes = tmp_path / "echoes"
    same = (("ORIGINAL", "PRIMARY", "M"),) * 2
    uid, (first, second) = dixon_series(echoes, same, EchoNumbers=[1, 2], EchoTime=[20, 80])
    scan = load_scan(echoes, series_uid=f"{uid} [echo 2, TE 80]")
    np.testing.assert_allclose(scan.voxels, second.transpose(1, 2, 0)[:, :, ::-1], atol=0.5 + 1e-3)
    copies = tmp_path / "copies"
    dixon_series(copies, same)
    with pytest.raises(InputError, match="are at the same position"):
        load_scan(copies)


def test_stack_labels_name_only_what_differs():
    from SpineNetLib.inputs.stacks import split_into_stacks

    at = [(0.0, 0.0, float(z)) for z in range(3)]
    siemens = [("DIXON/WATER", "", ""), ("DIXON/FAT", "", ""), ("DIXON/IN_PHASE", "", "")]
    stacks = split_into_stacks(at * 3, [c for c in siemens for _ in at])
    assert stacks == {"WATER": [0, 1, 2], "FAT": [3, 4, 5], "IN_PHASE": [6, 7, 8]}
    assert split_into_stacks(at, [siemens[0]] * 3) is None                    # no position twice: one series
    assert split_into_stacks(at * 2, [siemens[0]] * 3 + [siemens[1]] * 2 + [siemens[0]]) is None   # mixed up


def test_the_contrast_of_a_frame_comes_from_its_functional_groups():
    """An enhanced multi-frame file states each frame's type and echo time in its functional groups, not in
    the file's ImageType and EchoTime: those are what tell its stacks apart."""
    from pydicom.dataset import Dataset

    from SpineNetLib.inputs.stacks import contrast_of

    def item(**values):
        ds = Dataset()
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return ds

    header = item(ImageType=["ORIGINAL", "PRIMARY", "MIXED"], EchoTime=99)
    frame = item(MRImageFrameTypeSequence=[item(FrameType=["ORIGINAL", "PRIMARY", "WATER", "NONE"])])
    shared = item(MREchoSequence=[item(EffectiveEchoTime=80.0)])
    assert contrast_of(header, [frame, shared]) == ("WATER/NONE", "", "80")
    assert contrast_of(header, [item(), None]) == ("MIXED", "", "")
    assert contrast_of(header) == ("MIXED", "", "99")
