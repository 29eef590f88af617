"""What a NIfTI header says, read as it says it (inputs/image.py): a 2D sagittal slice, a negative voxel size,
and ITK's complaints kept informative on one line."""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

from SpineNetLib.apps import cli
from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.inputs.writers import write_image

#: One sagittal slice: columns run posterior, rows inferior (1.4 mm), the slice axis left to right (4 mm).
SAGITTAL = np.array([[0.0, 0.0, 4.0, 10.0], [-1.4, 0.0, 0.0, 20.0], [0.0, -1.4, 0.0, 30.0], [0, 0, 0, 1]])


def _slice_file(path: Path, n_slices: int = 1) -> Path:
    voxels = np.random.default_rng(0).uniform(0, 1000, (n_slices, 96, 80)).astype(np.float32)
    return write_image(voxels, SAGITTAL, path)


def _patched(source: Path, target: Path, fmt: str, offset: int, change) -> Path:
    """``target``: ``source`` (an uncompressed NIfTI-1) with the header field ``fmt`` at ``offset`` changed."""
    data = bytearray(source.read_bytes())
    values = change(list(struct.unpack_from("<" + fmt, data, offset)))
    struct.pack_into("<" + fmt, data, offset, *values)
    if target.name.endswith(".gz"):
        target.write_bytes(gzip.compress(bytes(data)))
    else:
        target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("name", ["slice2d.nii", "slice2d.nii.gz"])
def test_a_2d_nifti_of_a_sagittal_slice_is_read_as_that_slice(tmp_path, monkeypatch, name):
    volume = _slice_file(tmp_path / "slice3d.nii")
    two_d = _patched(volume, tmp_path / name, "8h", 40, lambda dims: [2, *dims[1:3], 1, 1, 1, 1, 1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))
    (tmp_path / "temporary").mkdir()
    scan, expected = load_scan(two_d), load_scan(volume)
    assert scan.metadata["acquisition"] == "single sagittal slice"
    assert np.array_equal(scan.voxels, expected.voxels)
    assert np.allclose(scan.input_ijk_to_ras, SAGITTAL, atol=1e-5)
    assert np.allclose(scan.canonical_to_ras, expected.canonical_to_ras, atol=1e-5)
    assert not list((tmp_path / "temporary").iterdir()), "the 3D copy of the header is removed"


def test_itk_errors_keep_their_reason_on_one_line(tmp_path):
    """A 2D MetaImage whose direction has determinant 0: ITK's message spans lines, the reason comes first."""
    header = ("ObjectType = Image\nNDims = 2\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              "TransformMatrix = 0 1 0 0\nOffset = 0 0\nElementSpacing = 1 1\nDimSize = 4 4\n"
              "ElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
    (tmp_path / "flat.mha").write_bytes(header.encode() + bytes(range(16)))
    with pytest.raises(InputError) as info:
        load_scan(tmp_path / "flat.mha")
    assert str(info.value).startswith(f"cannot read {tmp_path / 'flat.mha'}: Bad direction, determinant is 0")
    assert "\n" not in str(info.value)


def test_a_negative_voxel_size_in_a_nifti_header_is_refused(tmp_path, capsys):
    volume = _slice_file(tmp_path / "scan.nii", n_slices=5)
    flipped = _patched(volume, tmp_path / "negative.nii", "8f", 76, lambda pixdim: [pixdim[0], -pixdim[1], *pixdim[2:]])
    with pytest.raises(InputError, match=r"^negative\.nii has an invalid voxel size \(pixdim -1\.4 x 1\.4 x 4\)"):
        load_scan(flipped)
    assert cli.main(["run", str(flipped), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid voxel size (pixdim -1.4 x 1.4 x 4)" in err[0], err
    assert not (tmp_path / "out").exists()
