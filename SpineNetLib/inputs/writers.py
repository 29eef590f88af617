"""Write volumes as DICOM series or image files (synthetic phantoms, tests, exports).

Input arrays follow the project convention: numpy ``[k, j, i]`` plus a 4x4
IJK-to-RAS matrix (docs/CONVENTIONS.md).  DICOM and ITK use LPS patient
coordinates, so x and y are negated on the way out.

Files appear atomically enough for tests: everything is written into a
hidden temporary folder next to the destination and then renamed into
place (data files before headers), so a reader never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: RAS <-> LPS: negate x and y.
_FLIP_LPS = np.diag([-1.0, -1.0, 1.0])
#: Transfer syntaxes :func:`write_dicom_series` can write.
TRANSFER_SYNTAXES = ("explicit_little", "implicit_little", "rle_lossless", "jpeg_lossless")
_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
_TMP_PREFIX = ".spinenet-tmp-"


def _pydicom_major() -> int:
    import pydicom
    return int(pydicom.__version__.split(".")[0])


def _ds(x: float) -> str:
    """A float as a DICOM DS string (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds
    return format_number_as_ds(float(x))


def _geometry(ijk_to_ras: np.ndarray):
    """IOP, spacing and per-slice IPP (LPS) from an IJK-to-RAS matrix."""
    a = np.asarray(ijk_to_ras, dtype=float)
    if a.shape != (4, 4) or not np.allclose(a[3], [0, 0, 0, 1]):
        raise ValueError("ijk_to_ras must be a 4x4 affine matrix")
    cols = _FLIP_LPS @ a[:3, :3]
    origin = _FLIP_LPS @ a[:3, 3]
    sp_i, sp_j = np.linalg.norm(cols[:, 0]), np.linalg.norm(cols[:, 1])
    row_dir, col_dir = cols[:, 0] / sp_i, cols[:, 1] / sp_j
    if abs(float(row_dir @ col_dir)) > 1e-6:
        raise ValueError("DICOM needs orthogonal i and j axes; this IJK-to-RAS shears them")
    normal = np.cross(row_dir, col_dir)
    return row_dir, col_dir, normal, sp_i, sp_j, cols[:, 2], origin


def _encode_jpeg_lossless_sv1(img: np.ndarray) -> bytes:
    """Encode a uint16 image as a JPEG Lossless, first-order prediction (process 14, SV1) stream.

    ITU-T T.81 annex H: predictor 1 (left neighbour; first row predicted from
    the left, first column from above, the first pixel from 2**15), one
    Huffman table in which all 17 difference categories have 5-bit codes.
    Written here because pydicom has no JPEG encoder; used to test decoding.
    """
    x = np.asarray(img)
    if x.dtype != np.uint16 or x.ndim != 2:
        raise ValueError("JPEG lossless encoding needs a 2D uint16 image")
    rows, cols = x.shape
    x = x.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << 15
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    d = (x - pred).ravel() % 65536
    d = np.where(d > 32768, d - 65536, d)
    ssss = np.searchsorted(1 << np.arange(16), np.abs(d), side="right")
    n_extra = np.where(ssss == 16, 0, ssss)
    extra = np.where(d >= 0, d, d + (1 << n_extra) - 1) & ((1 << n_extra) - 1)
    field = (ssss << n_extra) | extra          # 5-bit code of category ssss, then the extra bits
    flen = 5 + n_extra
    idx = np.repeat(np.arange(d.size), flen)
    starts = np.cumsum(flen) - flen
    pos = np.arange(int(flen.sum())) - starts[idx]
    bits = (field[idx] >> (flen[idx] - 1 - pos)) & 1
    bits = np.concatenate([bits, np.ones((-bits.size) % 8, dtype=bits.dtype)])  # pad with 1-bits
    data = np.packbits(bits.astype(np.uint8)).tobytes().replace(b"\xff", b"\xff\x00")

    def seg(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof3 = bytes([16]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    bits_per_length = [0] * 16
    bits_per_length[4] = 17                    # 17 codes of length 5
    dht = bytes([0x00]) + bytes(bits_per_length) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])        # Ns=1, Cs=1, Td=0, Ss=predictor 1, Se=0, Ah/Al=0
    return b"\xff\xd8" + seg(0xC3, sof3) + seg(0xC4, dht) + seg(0xDA, sos) + data + b"\xff\xd9"


def _save_dataset(ds, path: Path, transfer_syntax_uid: str) -> None:
    from pydicom import uid
    if _pydicom_major() >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian = True
        ds.is_implicit_VR = transfer_syntax_uid == uid.ImplicitVRLittleEndian
        ds.save_as(path, write_like_original=False)


def write_dicom_series(voxels_kji, ijk_to_ras, folder, *, series_uid=None, rescale_slope=1.0,
                       rescale_intercept=0.0, shuffle_files=False, shuffle_instance_numbers=False, seed=0,
                       series_description="", patient_id="PHANTOM", file_prefix="IM",
                       extra_tags: dict | None = None, transfer_syntax: str = "explicit_little") -> list[Path]:
    """Write one MR DICOM file per slice ``k`` of ``voxels_kji``; returns the paths in slice order.

    Stored values are ``round((v - intercept) / slope)`` as uint16 (int16 if
    negative).  ``shuffle_files`` permutes which file name holds which slice,
    ``shuffle_instance_numbers`` permutes InstanceNumber (both seeded), so
    readers must order slices by position.  ``extra_tags`` sets DICOM
    keywords on every file after the defaults; a value of None deletes the
    tag.  ``transfer_syntax`` is one of :data:`TRANSFER_SYNTAXES`.
    UIDs are derived from the data and ``seed``, so output is reproducible.
    """
    from pydicom import uid

    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {TRANSFER_SYNTAXES}, not {transfer_syntax!r}")
    stored, pixel_repr = _stored_values(voxels_kji, rescale_slope, rescale_intercept, transfer_syntax)
    nk = stored.shape[0]
    geometry = _geometry(ijk_to_ras)

    h = hashlib.sha256()
    h.update(stored.tobytes())
    h.update(np.asarray(ijk_to_ras, dtype=float).tobytes())
    h.update(f"{seed}|{series_description}|{patient_id}|{file_prefix}|{transfer_syntax}".encode())
    key = h.hexdigest()

    def make_uid(tag: str) -> str:
        return uid.generate_uid(entropy_srcs=[key, tag])

    series_uid = series_uid or make_uid("series")
    study_uid, frame_uid = make_uid("study"), make_uid("frame")
    rng = np.random.default_rng(seed)
    file_order = rng.permutation(nk) if shuffle_files else np.arange(nk)
    instance_numbers = rng.permutation(nk) + 1 if shuffle_instance_numbers else np.arange(nk) + 1
    ts_uid = {"explicit_little": uid.ExplicitVRLittleEndian, "implicit_little": uid.ImplicitVRLittleEndian,
              "rle_lossless": uid.RLELossless, "jpeg_lossless": uid.JPEGLosslessSV1}[transfer_syntax]
    spec = _SeriesSpec(study_uid, series_uid, frame_uid, patient_id, series_description, geometry,
                       pixel_repr, rescale_slope, rescale_intercept, ts_uid, extra_tags or {})

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(nk)))
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=folder))
    paths: list[Path] = []
    try:
        written = []
        for k in range(nk):
            ds = _mr_slice_dataset(spec, k, np.ascontiguousarray(stored[k]), int(instance_numbers[k]),
                                   make_uid(f"sop{k}"))
            name = f"{file_prefix}{int(file_order[k]) + 1:0{width}d}.dcm"
            _save_dataset(ds, tmp / name, ts_uid)
            written.append(name)
        for name in written:
            os.replace(tmp / name, folder / name)
            paths.append(folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _stored_values(voxels_kji, rescale_slope, rescale_intercept, transfer_syntax: str) -> tuple[np.ndarray, int]:
    """(stored 16-bit values ``[k, j, i]``, PixelRepresentation): uint16 (0) when they fit, else int16 (1)."""
    vol = np.asarray(voxels_kji, dtype=float)
    if vol.ndim != 3:
        raise ValueError(f"voxels_kji must be 3D, got shape {vol.shape}")
    if rescale_slope == 0:
        raise ValueError("rescale_slope must not be 0")
    stored = np.rint((vol - rescale_intercept) / rescale_slope)
    if stored.min() >= 0 and stored.max() <= 65535:
        dtype, pixel_repr = np.uint16, 0
    elif stored.min() >= -32768 and stored.max() <= 32767:
        dtype, pixel_repr = np.int16, 1
    else:
        raise ValueError("values do not fit 16 bits with this rescale slope/intercept")
    if transfer_syntax == "jpeg_lossless" and pixel_repr:
        raise ValueError("jpeg_lossless writing supports unsigned values only: raise rescale_intercept")
    return stored.astype(dtype), pixel_repr


@dataclass(frozen=True)
class _SeriesSpec:
    """What every file of a :func:`write_dicom_series` series shares."""

    study_uid: str
    series_uid: str
    frame_uid: str
    patient_id: str
    series_description: str
    geometry: tuple            # _geometry(ijk_to_ras)
    pixel_repr: int
    rescale_slope: float
    rescale_intercept: float
    ts_uid: str
    extra_tags: dict


def _mr_slice_dataset(spec: _SeriesSpec, k: int, frame: np.ndarray, instance_number: int, sop_uid: str):
    """The MR Image Storage dataset (file meta included) of slice ``k`` holding ``frame``."""
    import pydicom
    from pydicom import uid
    from pydicom.dataset import FileMetaDataset

    row_dir, col_dir, normal, sp_i, sp_j, step_k, origin = spec.geometry
    thickness = abs(float(step_k @ normal))
    ts_uid = spec.ts_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian if ts_uid == uid.RLELossless else ts_uid
    meta.ImplementationClassUID = uid.PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = _MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.frame_uid
    ds.Modality = "MR"
    ds.Manufacturer = "SpineNetLib"
    ds.PatientID = spec.patient_id
    ds.PatientName = spec.patient_id
    ds.SeriesDescription = spec.series_description
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ipp = origin + k * step_k
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([row_dir, col_dir])]
    ds.PixelSpacing = [_ds(sp_j), _ds(sp_i)]   # [row spacing (along j), column spacing (along i)]
    ds.SliceThickness = _ds(thickness)
    ds.SpacingBetweenSlices = _ds(thickness)
    ds.SliceLocation = _ds(float(ipp @ normal))
    ds.Rows, ds.Columns = int(frame.shape[0]), int(frame.shape[1])
    _set_pixels(ds, spec, frame)
    return ds


def _set_pixels(ds, spec: _SeriesSpec, frame: np.ndarray) -> None:
    """Pixel module and data of one slice, then the caller's ``extra_tags``, then RLE compression if asked."""
    from pydicom import uid
    from pydicom.encaps import encapsulate

    ts_uid = spec.ts_uid
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = spec.pixel_repr
    ds.RescaleSlope = _ds(spec.rescale_slope)
    ds.RescaleIntercept = _ds(spec.rescale_intercept)
    if ts_uid == uid.JPEGLosslessSV1:
        ds.PixelData = encapsulate([_encode_jpeg_lossless_sv1(frame)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = frame.tobytes()
        ds["PixelData"].VR = "OW"
    for keyword, value in spec.extra_tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if ts_uid == uid.RLELossless:
        try:
            ds.compress(uid.RLELossless, frame, generate_instance_uid=False)
        except TypeError:  # pragma: no cover - pydicom 2.x has no generate_instance_uid
            ds.compress(uid.RLELossless, frame)


def write_enhanced_dicom(voxels_kji, ijk_to_ras, path, *, rescale_slope=1.0, rescale_intercept=0.0,
                         shuffle_frames=False, seed=0, series_description="", patient_id="PHANTOM") -> Path:
    """Write the volume as one Enhanced MR Image (multi-frame) file, one frame per slice ``k``.

    Geometry goes into the functional groups the loader reads: shared
    PixelMeasures / PlaneOrientation / PixelValueTransformation and per-frame
    PlanePosition.  ``shuffle_frames`` stores the frames in a seeded random order.
    """
    import pydicom
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    vol = np.asarray(voxels_kji, dtype=float)
    if vol.ndim != 3:
        raise ValueError(f"voxels_kji must be 3D, got shape {vol.shape}")
    stored = np.rint((vol - rescale_intercept) / rescale_slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("values do not fit uint16 with this rescale slope/intercept")
    stored = stored.astype(np.uint16)
    nk, nj, ni = stored.shape
    row_dir, col_dir, normal, sp_i, sp_j, step_k, origin = _geometry(ijk_to_ras)
    thickness = abs(float(step_k @ normal))
    order = np.random.default_rng(seed).permutation(nk) if shuffle_frames else np.arange(nk)
    key = hashlib.sha256(stored.tobytes() + np.asarray(ijk_to_ras, float).tobytes()
                         + f"{seed}|{series_description}|{patient_id}".encode()).hexdigest()
    sop_uid = uid.generate_uid(entropy_srcs=[key, "sop"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _ENHANCED_MR_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = uid.PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = _ENHANCED_MR_STORAGE, sop_uid
    ds.StudyInstanceUID = uid.generate_uid(entropy_srcs=[key, "study"])
    ds.SeriesInstanceUID = uid.generate_uid(entropy_srcs=[key, "series"])
    ds.FrameOfReferenceUID = uid.generate_uid(entropy_srcs=[key, "frame"])
    ds.Modality, ds.Manufacturer = "MR", "SpineNetLib"
    ds.PatientID = ds.PatientName = patient_id
    ds.SeriesDescription = series_description
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.NumberOfFrames = int(nk)
    ds.Rows, ds.Columns = int(nj), int(ni)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    measures, orientation, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = [_ds(sp_j), _ds(sp_i)]
    measures.SliceThickness = _ds(thickness)
    measures.SpacingBetweenSlices = _ds(thickness)
    orientation.ImageOrientationPatient = [_ds(v) for v in np.concatenate([row_dir, col_dir])]
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = \
        _ds(rescale_slope), _ds(rescale_intercept), "US"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        position, content, group = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [_ds(v) for v in origin + k * step_k]
        content.InStackPositionNumber = int(k) + 1
        group.PlanePositionSequence = [position]
        group.FrameContentSequence = [content]
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
    ds["PixelData"].VR = "OW"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=path.parent))
    try:
        _save_dataset(ds, tmp / path.name, uid.ExplicitVRLittleEndian)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ijk_to_ras_to_sitk(ijk_to_ras) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in SimpleITK's LPS terms for an IJK-to-RAS matrix."""
    a = np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    direction = _FLIP_LPS @ (a[:3, :3] / spacing)
    origin = _FLIP_LPS @ a[:3, 3]
    return tuple(map(float, spacing)), tuple(map(float, origin)), tuple(map(float, direction.ravel()))


def write_image(voxels_kji, ijk_to_ras, path) -> Path:
    """Write a ``[k, j, i]`` volume with its IJK-to-RAS as any file SimpleITK writes (.nii.gz, .nrrd, .mha, ...).

    The voxel type is kept (float64 is stored as float32).  Detached-header
    formats (.mhd, .nhdr) write their data file first and the header last.
    """
    import SimpleITK as sitk

    vol = np.asarray(voxels_kji)
    if vol.ndim != 3:
        raise ValueError(f"voxels_kji must be 3D, got shape {vol.shape}")
    if vol.dtype == np.float64:
        vol = vol.astype(np.float32)
    if vol.dtype == bool:
        vol = vol.astype(np.uint8)
    spacing, origin, direction = ijk_to_ras_to_sitk(ijk_to_ras)
    d = np.asarray(direction).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
        raise ValueError("image files need orthogonal voxel axes; this IJK-to-RAS shears them")
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=path.parent))
    try:
        sitk.WriteImage(img, str(tmp / path.name))
        produced = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # header last
        for p in produced:
            os.replace(p, path.parent / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
