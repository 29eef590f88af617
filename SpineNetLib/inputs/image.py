"""Load NIfTI, NRRD and MetaImage volumes with SimpleITK.

SimpleITK gives the array as numpy ``[k, j, i]`` and the geometry in LPS
(origin, spacing, direction); x and y are negated to get the IJK-to-RAS
matrix, then :func:`SpineNetLib.inputs.canonical.scan_from_array` does the rest.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np

from SpineNetLib.inputs.canonical import (MAX_SIDE_PX, MAX_VOXELS, classify_acquisition, plain_numbers,
                                          sagittal_axis, scan_from_array, spacing_override)
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
    cleaned, start = [], None
    for line in lines:
        ln = re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-fA-F]+\):|sitk::ERROR:|\[\w+\] \w+:)\s*", "", line)
        if ln and not ln.startswith("Reason: No such file") and not ln.endswith("trouble") \
                and not ln.startswith("trouble"):
            if ln != line:
                start = len(cleaned)  # the last error's first line: its message may go on over more lines
            cleaned.append(ln)
    if start is not None:
        text = " ".join(cleaned[start:])  # e.g. "Bad direction, determinant is 0 ..." and its matrices
    else:
        text = cleaned[-1] if cleaned else type(exc).__name__
    return (text[:200] + "...") if len(text) > 200 else text


#: NIfTI-1 (header of 348 bytes) and NIfTI-2 (540): where ``dim`` and ``pixdim`` lie in the header and
#: their struct types (8 values each).
_NIFTI_DIM_PIXDIM = {348: (40, "h", 76, "f"), 540: (16, "q", 104, "d")}


def _nifti_layout(hdr: bytes) -> tuple[str, int] | None:
    """(byte order, header size) of a NIfTI-1 or NIfTI-2 header, from its first field; None for neither."""
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", hdr[:4])[0]
        if sizeof_hdr in _NIFTI_DIM_PIXDIM:
            return endian, sizeof_hdr
    return None


def _check_nifti_complete(path: Path) -> None:
    """Refuse truncated NIfTI files: ITK reads them without complaint, filling the gap with garbage."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            hdr = fh.read(540)
            if len(hdr) < 348:
                raise InputError(f"cannot read {path}: file too short for a NIfTI header")
            layout = _nifti_layout(hdr)
            if layout is None:
                raise InputError(f"cannot read {path}: not a NIfTI file (bad header size)")
            endian, sizeof_hdr = layout
            dim_at, dim_type, pix_at, pix_type = _NIFTI_DIM_PIXDIM[sizeof_hdr]
            dims = struct.unpack_from(f"{endian}8{dim_type}", hdr, dim_at)
            if sizeof_hdr == 348:
                bitpix = struct.unpack(endian + "h", hdr[72:74])[0]
                vox_offset = struct.unpack(endian + "f", hdr[108:112])[0]
            else:
                bitpix = struct.unpack(endian + "h", hdr[14:16])[0]
                vox_offset = struct.unpack(endian + "q", hdr[168:176])[0]
            ndim = dims[0]
            if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]) or bitpix <= 0:
                raise InputError(f"cannot read {path}: invalid NIfTI dimensions {dims[:ndim + 1]}")
            _check_nifti_spacing(path, struct.unpack_from(f"{endian}8{pix_type}", hdr, pix_at), ndim)
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
        if isinstance(exc, OSError) and exc.errno is not None:  # e.g. permission denied: not the file's fault
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        raise InputError(f"cannot read {path}: corrupt or truncated file ({_one_line(exc)})") from None
    if got < expected:
        raise InputError(f"cannot read {path}: truncated NIfTI file ({got} of {expected} bytes)")
    datatype = struct.unpack(endian + "h", hdr[70:72] if sizeof_hdr == 348 else hdr[12:14])[0]
    if datatype in _NIFTI_FLOAT_TYPES:
        _check_nifti_finite(path, opener, int(vox_offset), expected, np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype]))


def _check_nifti_spacing(path: Path, pixdim: tuple, ndim: int) -> None:
    """Refuse a zero, negative, NaN or infinite voxel size: ITK reads zero or NaN as 1 mm without a word,
    and a negative one turns an axis of the image round."""
    spacing = pixdim[1:min(ndim, 3) + 1]
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise InputError(f"{path.name} has an invalid voxel size (pixdim {plain_numbers(spacing)}): "
                         "check the file's header")


def _nifti_2d_as_3d(path: Path) -> Path | None:
    """A temporary ``.nii`` copy of a 2D NIfTI (dim[0] = 2) whose header says 3D with one slice; None for
    any other file.  The caller removes the copy.

    ITK reads a 2D NIfTI with the 2D corner of its orientation only: a sagittal slice, whose rows and
    columns run along S-I and A-P, then gets a direction of determinant 0 and cannot be read.  Read as 3D,
    the header's whole orientation (sform or qform) applies, as for a volume of one slice; a missing
    third voxel size (pixdim[3]) is taken as 1 mm.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        header = bytearray(fh.read(540))
        endian, sizeof_hdr = _nifti_layout(header) or ("<", 348)   # checked before (_check_nifti_complete)
        dim_at, dim_type, pix_at, pix_type = _NIFTI_DIM_PIXDIM[sizeof_hdr]
        dims = list(struct.unpack_from(f"{endian}8{dim_type}", header, dim_at))
        if dims[0] != 2:
            return None
        pixdim = list(struct.unpack_from(f"{endian}8{pix_type}", header, pix_at))
        dims[0], dims[3] = 3, 1
        if not (np.isfinite(pixdim[3]) and pixdim[3] > 0):
            pixdim[3] = 1.0
        struct.pack_into(f"{endian}8{dim_type}", header, dim_at, *dims)
        struct.pack_into(f"{endian}8{pix_type}", header, pix_at, *pixdim)
        fd, name = tempfile.mkstemp(prefix=".spinenet-2d-", suffix=".nii")
        try:
            with os.fdopen(fd, "wb") as copy:
                copy.write(header)
                shutil.copyfileobj(fh, copy, 1 << 22)
        except BaseException:
            os.unlink(name)
            raise
    return Path(name)


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


def _data_file_names(spec: str, following: list[str]) -> list[str]:
    """The data files a header names (MetaImage ``ElementDataFile``, NRRD ``data file``): one name, a
    ``LIST`` (the lines after it) or a printf pattern ``FORMAT MIN MAX [STEP]``; none for ``LOCAL``."""
    words = spec.split()
    if not words or words[0].upper() == "LOCAL":
        return []
    if words[0].upper() == "LIST":
        return [line.strip() for line in following if line.strip()]
    if "%" in words[0] and len(words) >= 3:
        try:
            first, last, step = int(words[1]), int(words[2]), int(words[3]) if len(words) > 3 else 1
            if step == 0 or abs(last - first) // abs(step) > MAX_SIDE_PX:
                raise ValueError(spec)
            return [words[0] % i for i in range(first, last + (1 if step > 0 else -1), step)]
        except (TypeError, ValueError):
            return [words[0]]
    return [spec.strip()]


def _checked_data_files(path: Path, spec: str, following: list[str]) -> list[Path]:
    """The regular files ``spec`` names (:func:`_data_file_names`), relative to the header's folder.

    ITK would otherwise read from whatever the header names: a device such as /dev/zero, or a
    named pipe that never ends.
    """
    files = []
    for name in _data_file_names(spec, following):
        data = (path.parent / name).resolve()
        if not data.is_file():
            raise InputError(f"{path.name} names the data file {name!r}, which is not a regular file")
        files.append(data)
    return files


def _header_text(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(65536).decode("latin-1")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _check_nrrd_data_files(path: Path) -> None:
    """The data files a NRRD header (``.nhdr``, or a ``.nrrd`` with a ``data file`` field) names are regular files."""
    lines = _header_text(path).split("\n\n", 1)[0].splitlines()
    for i, line in enumerate(lines):
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("data file", "datafile"):
            _checked_data_files(path, value.lstrip("=").strip(), lines[i + 1:])


def _check_metaimage_data_file(path: Path) -> None:
    """A MetaImage header must name regular data files (:func:`_checked_data_files`); a single one must
    hold all the voxels its header describes."""
    lines = _header_text(path).splitlines()
    fields = {}
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    spec = fields.get("ElementDataFile", "")
    files = _checked_data_files(path, spec, lines[i + 1:] if lines else [])
    if len(files) != 1 or spec.split()[0].upper() == "LIST" or fields.get("CompressedData", "False").lower() == "true":
        return
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return  # ITK reports the malformed header itself
    needed = int(np.prod(dims, dtype=np.float64)) * channels * _MET_BYTES.get(fields.get("ElementType", ""), 1)
    size = files[0].stat().st_size
    if size < needed:
        raise InputError(f"the data file {spec!r} of {path.name} holds {size} bytes, "
                         f"fewer than the {needed} its header describes: the file is truncated")


#: An image whose voxels take at most this many distinct integer values, most of them 0, is a label
#: map (a segmentation), not an MR image: even 8-bit MR slices take a hundred values or more.
MAX_LABEL_MAP_VALUES = 64


def label_map_values(voxels: np.ndarray) -> int | None:
    """The number of distinct values when ``voxels`` look like a label map (see
    :data:`MAX_LABEL_MAP_VALUES`), else None.

    A sample of a million voxels settles it for nearly every scan, without a copy of the volume; a
    constant image is no label map (the loader refuses it as empty).
    """
    flat = np.asarray(voxels).reshape(-1)
    if flat.size == 0:
        return None
    sample = np.unique(flat[::max(1, flat.size // 1_000_000)])
    if len(sample) < 2 or len(sample) > MAX_LABEL_MAP_VALUES or not np.all(np.mod(sample, 1) == 0):
        return None
    if flat.size - np.count_nonzero(flat) <= flat.size // 2:   # not mostly 0
        return None
    values = np.unique(flat)
    if len(values) > MAX_LABEL_MAP_VALUES or not np.all(np.mod(values, 1) == 0):
        return None
    return len(values)


def check_image_voxels(voxels: np.ndarray, name: str, *, label_map: bool = True) -> None:
    """Refuse voxels that hold no MR image to read, with a one-line :class:`InputError` naming ``name``:
    NaN or infinite values, one value everywhere, or (``label_map``) a label map (:func:`label_map_values`).

    The one content check of every input: image files (:func:`load_image_file`), every scan
    :func:`SpineNetLib.inputs.load.load_scan` reads (DICOM too, without the label map test) and a volume
    taken from a 3D Slicer scene (``SpineNetLib.slicer.mrml.input_volume_arrays``).
    """
    voxels = np.asarray(voxels)
    if voxels.dtype.kind == "f" and not np.all(np.isfinite(voxels)):
        raise InputError(f"{name} has {int(voxels.size - np.count_nonzero(np.isfinite(voxels)))} NaN or "
                         "infinite voxel(s)")
    if voxels.size:
        low, high = float(voxels.min()), float(voxels.max())
        if low == high:
            raise InputError(f"every voxel of {name} has the same value ({low:g}): there is no image "
                             "to read (check RescaleSlope and the file)")
    labels = label_map_values(voxels) if label_map else None
    if labels is not None:
        raise InputError(f"{name} looks like a label map, not an MR image ({labels} distinct integer values, "
                         "most voxels 0): give the scan itself")


def image_ijk_to_ras(img) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a SimpleITK image or ImageFileReader (their geometry is LPS: x and y negated)."""
    ijk_to_ras = np.eye(4)
    direction = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_ras[:3, :3] = _FLIP_LPS @ direction @ np.diag(np.array(img.GetSpacing(), dtype=float))
    ijk_to_ras[:3, 3] = _FLIP_LPS @ np.array(img.GetOrigin(), dtype=float)
    return ijk_to_ras


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _captured_stderr():
    """Collect what is printed straight to the process's stderr (file descriptor 2) in the block.

    ITK's MetaImage and NRRD readers print their complaints there, past Python and past ITK's own
    warning switch; a file they refuse must still end in one line.  Yields a list that holds the
    text once the block is done.
    """
    printed: list[str] = []
    with _STDERR_LOCK:  # one redirection at a time: threads reading files at once must not swap them
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no stderr to redirect (e.g. a GUI process): nothing to collect
            yield printed
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield printed
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                printed.append(sink.read(65536).decode("utf-8", "replace"))


def _itk_reason(exc: Exception, printed: list[str]) -> str:
    """Why ITK could not read a file: its exception, or the reader's own words when the exception
    only says "cannot be read"."""
    reason = _one_line(exc)
    lines = list(dict.fromkeys(ln.strip() for text in printed for ln in text.splitlines() if ln.strip()))
    if lines and ("cannot be read" in reason or "Could not" in reason):
        said = "; ".join(lines)
        reason = said if len(said) <= 200 else said[:200] + "..."
    if "Refusing to change spacing" in reason:   # ITK's words for a zero or NaN voxel size
        reason = f"invalid voxel size in the header ({reason})"
    return reason


def _read_volume(path: Path, readable: Path | None = None):
    """``(SimpleITK image, voxel type)`` of one 3D scalar volume in ``path`` (read from ``readable``, a
    copy of it, when given).

    The size in the header is checked before any voxel is read; 64-bit voxels are narrowed to
    float32 (what the scan keeps anyway) so that at most one wide copy exists.  A 4D file with one
    volume and a 2D image are accepted as 3D.
    """
    import SimpleITK as sitk

    with _captured_stderr() as printed:
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(readable or path))
            reader.ReadImageInformation()  # the header only: refuse absurd sizes before reading voxels
            size = tuple(int(n) for n in reader.GetSize())
            too_big = int(np.prod(size, dtype=np.float64)) * max(1, reader.GetNumberOfComponents()) > MAX_VOXELS
            img = None if too_big else reader.Execute()
            failure = None
        except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK message
            failure = exc
    if failure is not None:
        raise InputError(f"cannot read {path}: {_itk_reason(failure, printed)}") from None
    if img is None:
        raise InputError(f"{path.name} claims {size} voxels: more than the {MAX_VOXELS} SpineNet reads")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name} has {img.GetNumberOfComponentsPerPixel()} components per voxel: "
                         "give a single 3D scalar volume")
    if img.GetDimension() == 4:
        if img.GetSize()[3] != 1:
            raise InputError(f"{path.name} is 4D (size {img.GetSize()}): give a single 3D volume")
        img = img[:, :, :, 0]
    if img.GetDimension() == 2:
        img = sitk.JoinSeries(img)
    if img.GetDimension() != 3:
        raise InputError(f"{path.name} has {img.GetDimension()} dimensions: give a single 3D volume")
    voxel_type = str(sitk.GetArrayViewFromImage(img).dtype)
    if np.dtype(voxel_type).itemsize > 4:
        img = sitk.Cast(img, sitk.sitkFloat32)
    return img, voxel_type


def read_image_arrays(path) -> tuple[np.ndarray, np.ndarray]:
    """``([k, j, i] voxels, 4x4 IJK-to-RAS)`` of a NIfTI, NRRD or MetaImage file as it is stored: no
    canonical orientation, no check of what the voxels hold. For a result's own maps read back (the
    hotspot maps: ``outputs/correction.py``, the Slicer module); :class:`InputError` (one line) when the
    file cannot be read as one 3D scalar volume."""
    import SimpleITK as sitk

    img, _ = _read_volume(Path(path))
    return sitk.GetArrayFromImage(img), image_ijk_to_ras(img)


#: A BIDS file name: ``sub-<label>``, then ``_ses-<label>`` where the dataset has sessions, then its other entities.
_BIDS_NAME = re.compile(r"^sub-([A-Za-z0-9]+)(?:_ses-([A-Za-z0-9]+))?_")


def bids_session(path) -> str | None:
    """The session folder (absolute) of an image in a BIDS dataset's ``anat`` folder,
    ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_<...>``, whose folders and name agree; None for any
    other path.  A converter writes every series of one session in the scanner's patient coordinates, so
    ``spinenet run`` compares an image's levels with those of the session's other sagittal images
    (:func:`other_sagittal_images_of_session`), and ``spinenet cohort`` the images of a session as the series
    of one DICOM exam (``cohort/exams.exam_of``)."""
    path = Path(os.path.abspath(path))
    found = _BIDS_NAME.match(path.name)
    if found is None or path.parent.name != "anat":
        return None
    subject, session = found.groups()
    folder = path.parent.parent
    if session is not None:
        if folder.name != f"ses-{session}" or folder.parent.name != f"sub-{subject}":
            return None
    elif folder.name != f"sub-{subject}":
        return None
    return str(folder)


def other_sagittal_images_of_session(path) -> list[Path]:
    """The other images of ``path``'s BIDS session (:func:`bids_session`: the same ``anat`` folder, the same
    subject and session), by name, but those whose header says they are 2D stacks of axial or coronal slices,
    which are not read as a sagittal scan; [] for a path outside a BIDS session.  An image whose header
    cannot be read is kept: reading it says why (``inputs/load.load_other_series``)."""
    import SimpleITK as sitk

    path = Path(os.path.abspath(path))
    session = bids_session(path)
    if session is None:
        return []
    prefix = _BIDS_NAME.match(path.name).group(0)
    found = []
    for other in sorted(path.parent.iterdir()):
        if other == path or not other.name.startswith(prefix) or image_suffix(other) is None \
                or bids_session(other) != session:
            continue
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(other))
            reader.ReadImageInformation()
            if reader.GetDimension() == 3:
                directions = np.asarray(reader.GetDirection(), float).reshape(3, 3)
                kind, _, normal = classify_acquisition(reader.GetSpacing(), directions)
                if kind == "2D" and normal != 0:   # axial or coronal slices
                    continue
        except RuntimeError:
            pass
        found.append(other)
    return found


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
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    readable = None
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
        readable = _nifti_2d_as_3d(path)
    if suffix in (".mha", ".mhd"):
        _check_metaimage_data_file(path)
    if suffix in (".nrrd", ".nhdr"):
        _check_nrrd_data_files(path)
    try:
        img, voxel_type = _read_volume(path, readable)
    finally:
        if readable is not None:
            readable.unlink(missing_ok=True)
    spacing = np.array(img.GetSpacing(), dtype=float)
    direction = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_ras = image_ijk_to_ras(img)
    try:
        voxels = sitk.GetArrayFromImage(img)  # [k, j, i]
    except Exception as exc:
        raise InputError(f"cannot read the voxels of {path}: {_one_line(exc)}") from None
    del img  # one copy of the voxels at a time
    check_image_voxels(voxels, path.name)   # named here, with the file
    if not np.all(np.isfinite(ijk_to_ras)) or abs(np.linalg.det(direction)) < 1e-3 or np.any(spacing <= 0):
        raise InputError(f"{path.name} has an invalid geometry (spacing {plain_numbers(spacing)} mm, "
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
        "voxel_type": voxel_type,
        "overrides": overrides,
    }
    session = bids_session(path)
    if session is not None:
        metadata["bids_session"] = session
    return scan_from_array(voxels, ijk_to_ras, metadata, resample_isotropic=resample_isotropic)

