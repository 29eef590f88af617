"""Load NIfTI, NRRD and MetaImage volumes with SimpleITK.

SimpleITK gives the array as numpy ``[k, j, i]`` and the geometry in LPS
(origin, spacing, direction); x and y are negated to get the IJK-to-RAS
matrix, then :func:`SpineNetLib.inputs.canonical.scan_from_array` does the rest.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from SpineNetLib.inputs.canonical import MAX_VOXELS, sagittal_axis, scan_from_array, spacing_override
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.scan import Scan

#: File name endings this loader accepts (lower case).
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_FLIP_LPS = np.diag([-1.0, -1.0, 1.0])


def image_suffix(path) -> str | None:
    """The supported image ending of ``path`` (e.g. ".nii.gz"), or None."""
    name = Path(path).name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _one_line(exc: Exception) -> str:
    """The informative part of an ITK / Python error message, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Exception thrown in SimpleITK"):
        lines = lines[1:]  # "Exception thrown in SimpleITK ...: /source/file.cxx:123:"
    cleaned = []
    for ln in lines:
        ln = re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-fA-F]+\):|sitk::ERROR:|\[\w+\] \w+:)\s*", "", ln)
        if ln and not ln.startswith("Reason: No such file") and not ln.endswith("trouble") \
                and not ln.startswith("trouble"):
            cleaned.append(ln)
    text = cleaned[-1] if cleaned else type(exc).__name__
    return (text[:200] + "...") if len(text) > 200 else text


def _check_nifti_complete(path: Path) -> None:
    """Refuse truncated NIfTI files: ITK reads them without complaint, filling the gap with garbage."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            hdr = fh.read(540)
            if len(hdr) < 348:
                raise InputError(f"cannot read {path}: file too short for a NIfTI header")
            for endian in "<>":
                sizeof_hdr = struct.unpack(endian + "i", hdr[:4])[0]
                if sizeof_hdr in (348, 540):
                    break
            else:
                raise InputError(f"cannot read {path}: not a NIfTI file (bad header size)")
            if sizeof_hdr == 348:
                dims = struct.unpack(endian + "8h", hdr[40:56])
                bitpix = struct.unpack(endian + "h", hdr[72:74])[0]
                vox_offset = struct.unpack(endian + "f", hdr[108:112])[0]
            else:
                bitpix = struct.unpack(endian + "h", hdr[14:16])[0]
                dims = struct.unpack(endian + "8q", hdr[16:80])
                vox_offset = struct.unpack(endian + "q", hdr[168:176])[0]
            ndim = dims[0]
            if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]) or bitpix <= 0:
                raise InputError(f"cannot read {path}: invalid NIfTI dimensions {dims[:ndim + 1]}")
            n_voxels = int(np.prod(dims[1:ndim + 1], dtype=np.float64))
            if n_voxels > MAX_VOXELS:  # before decompressing anything: a small .nii.gz may claim gigabytes
                raise InputError(f"{path.name} claims {n_voxels} voxels (dimensions {tuple(dims[1:ndim + 1])}): "
                                 f"more than the {MAX_VOXELS} SpineNet reads")
            expected = int(vox_offset) + int(np.prod(dims[1:ndim + 1], dtype=np.int64)) * bitpix // 8
            got = len(hdr)
            while got < expected:
                chunk = fh.read(min(1 << 22, expected - got))
                if not chunk:
                    break
                got += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read {path}: corrupt or truncated file ({_one_line(exc)})") from None
    if got < expected:
        raise InputError(f"cannot read {path}: truncated NIfTI file ({got} of {expected} bytes)")
    datatype = struct.unpack(endian + "h", hdr[70:72] if sizeof_hdr == 348 else hdr[12:14])[0]
    if datatype in _NIFTI_FLOAT_TYPES:
        _check_nifti_finite(path, opener, int(vox_offset), expected, np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype]))


#: NIfTI datatype codes of floating-point voxels -> numpy type letters.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _check_nifti_finite(path: Path, opener, start: int, end: int, dtype: np.dtype) -> None:
    """Refuse NaN or infinite voxels: ITK's NIfTI reader turns NaN into 0 without a word."""
    bad = 0
    with opener(path, "rb") as fh:
        fh.read(start)
        left = end - start
        step = (1 << 22) // dtype.itemsize * dtype.itemsize
        while left > 0:
            chunk = fh.read(min(step, left))
            if not chunk:
                break
            left -= len(chunk)
            values = np.frombuffer(chunk[:len(chunk) // dtype.itemsize * dtype.itemsize], dtype=dtype)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputError(f"{path.name} has {bad} NaN or infinite voxel(s)")


#: Bytes per voxel of the MetaImage element types.
_MET_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
              "MET_ULONG": 8, "MET_LONG": 8, "MET_ULONG_LONG": 8, "MET_LONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _check_metaimage_data_file(path: Path) -> None:
    """A detached MetaImage header (``.mhd``) must name a regular data file holding all its voxels.

    ITK would otherwise read from whatever the header names, e.g. a device such as /dev/zero.
    """
    try:
        text = path.read_bytes()[:65536].decode("latin-1")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {_one_line(exc)}") from None
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    name = fields.get("ElementDataFile", "")
    if not name or name.upper() in ("LOCAL", "LIST") or "%" in name:
        return  # voxels in the header file itself, or a file list (each read by ITK with its own checks)
    data = (path.parent / name).resolve()
    if not data.is_file():
        raise InputError(f"{path.name} names the data file {name!r}, which is not a regular file")
    if fields.get("CompressedData", "False").lower() != "true":
        try:
            dims = [int(v) for v in fields.get("DimSize", "").split()]
            channels = int(fields.get("ElementNumberOfChannels", "1"))
        except ValueError:
            return  # ITK reports the malformed header itself
        needed = int(np.prod(dims, dtype=np.float64)) * channels * _MET_BYTES.get(fields.get("ElementType", ""), 1)
        if data.stat().st_size < needed:
            raise InputError(f"the data file {name!r} of {path.name} holds {data.stat().st_size} bytes, "
                             f"fewer than the {needed} its header describes: the file is truncated")


#: An image whose voxels take at most this many distinct integer values, most of them 0, is a label
#: map (a segmentation), not an MR image: even 8-bit MR slices take a hundred values or more.
MAX_LABEL_MAP_VALUES = 64


def label_map_values(voxels: np.ndarray) -> int | None:
    """The number of distinct values when ``voxels`` look like a label map (see
    :data:`MAX_LABEL_MAP_VALUES`), else None."""
    flat = np.asarray(voxels).ravel()
    if flat.size == 0 or not (np.issubdtype(flat.dtype, np.integer) or np.all(np.mod(flat[:100000], 1) == 0)):
        return None
    values = np.unique(flat)
    if len(values) > MAX_LABEL_MAP_VALUES or not np.all(np.mod(values, 1) == 0):
        return None
    return len(values) if np.count_nonzero(flat == 0) > flat.size // 2 else None


def image_ijk_to_ras(img) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a SimpleITK image or ImageFileReader (their geometry is LPS: x and y negated)."""
    ijk_to_ras = np.eye(4)
    direction = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_ras[:3, :3] = _FLIP_LPS @ direction @ np.diag(np.array(img.GetSpacing(), dtype=float))
    ijk_to_ras[:3, 3] = _FLIP_LPS @ np.array(img.GetOrigin(), dtype=float)
    return ijk_to_ras


def load_image_file(path, pixel_spacing=None, slice_spacing=None, *, resample_isotropic: bool = True) -> Scan:
    """Canonical :class:`Scan` of a NIfTI / NRRD / MetaImage file.

    ``pixel_spacing=(row_mm, col_mm)`` and ``slice_spacing`` (mm) replace the
    file's spacings.  The slice axis is the input axis closest to L-R; of the
    two other axes, "column" is the one with the lower index (i for a volume
    sliced along k) and "row" the other, as for DICOM images.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    suffix = image_suffix(path)
    if suffix is None:
        raise InputError(f"unsupported file type {path.name!r}: expected one of {', '.join(IMAGE_SUFFIXES)} "
                         "or a DICOM folder")
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    if suffix == ".mhd":
        _check_metaimage_data_file(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # the header only: refuse absurd sizes before reading voxels
        size = tuple(int(n) for n in reader.GetSize())
        if int(np.prod(size, dtype=np.float64)) * max(1, reader.GetNumberOfComponents()) > MAX_VOXELS:
            raise InputError(f"{path.name} claims {size} voxels: more than the {MAX_VOXELS} SpineNet reads")
        img = reader.Execute()
    except InputError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK message
        raise InputError(f"cannot read {path}: {_one_line(exc)}") from None
    dim = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name} has {img.GetNumberOfComponentsPerPixel()} components per voxel: "
                         "give a single 3D scalar volume")
    if dim == 4:
        size = img.GetSize()
        if size[3] != 1:
            raise InputError(f"{path.name} is 4D (size {size}): give a single 3D volume")
        img = img[:, :, :, 0]
        dim = 3
    if dim == 2:
        img = sitk.JoinSeries(img)
        dim = 3
    if dim != 3:
        raise InputError(f"{path.name} has {dim} dimensions: give a single 3D volume")

    try:
        voxels = sitk.GetArrayFromImage(img)  # [k, j, i]
    except Exception as exc:
        raise InputError(f"cannot read the voxels of {path}: {_one_line(exc)}") from None
    labels = label_map_values(voxels)
    if labels is not None:
        raise InputError(f"{path.name} looks like a label map, not an MR image ({labels} distinct integer values, "
                         "most voxels 0): give the scan itself")
    spacing = np.array(img.GetSpacing(), dtype=float)
    direction = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_ras = image_ijk_to_ras(img)
    if not np.all(np.isfinite(ijk_to_ras)) or abs(np.linalg.det(direction)) < 1e-3 or np.any(spacing <= 0):
        raise InputError(f"{path.name} has an invalid geometry (spacing {' x '.join(f'{v:g}' for v in spacing)} mm, "
                         f"direction {' '.join(f'{v:g}' for v in direction.ravel())})")

    overrides = {}
    ps = spacing_override(pixel_spacing, 2, "pixel_spacing")
    ss = spacing_override(slice_spacing, 1, "slice_spacing")
    if ps is not None or ss is not None:
        s_ax = sagittal_axis(ijk_to_ras)
        col_ax, row_ax = [ax for ax in range(3) if ax != s_ax]
        new = spacing.copy()
        if ps is not None:
            new[row_ax], new[col_ax] = ps
            overrides["pixel_spacing"] = ps.tolist()
        if ss is not None:
            new[s_ax] = ss[0]
            overrides["slice_spacing"] = float(ss[0])
        ijk_to_ras[:3, :3] = ijk_to_ras[:3, :3] / spacing * new
    metadata = {
        "source": str(path),
        "format": {".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD",
                   ".mha": "MetaImage", ".mhd": "MetaImage"}[suffix],
        "file_spacing_mm": spacing.tolist(),
        "voxel_type": str(voxels.dtype),
        "overrides": overrides,
    }
    return scan_from_array(voxels, ijk_to_ras, metadata, resample_isotropic=resample_isotropic)

