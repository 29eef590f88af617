"""The pixels of a DICOM series, and the header values its loader relies on (:mod:`SpineNetLib.inputs.dicom`).

Every file is read whole only here, after the series was chosen from the headers alone; the values are
rescaled (RescaleSlope/RescaleIntercept) to float32 and MONOCHROME1 images inverted to MONOCHROME2
brightness, as the networks expect. Every problem is a one-line :class:`InputError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.canonical import MAX_VOXELS


def float_or(value, default: float) -> float:
    """A header value as a finite float, else ``default``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


#: Header elements the loader reads: a value of one of them that pydicom cannot convert (e.g. a
#: 1-byte Rows) refuses the file; any other malformed element is dropped, as it is not used.
_USED_KEYWORDS = frozenset((
    "SOPClassUID", "SeriesInstanceUID", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames",
    "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices",
    "RescaleSlope", "RescaleIntercept", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "RedPaletteColorLookupTableData"))


def converted(path: Path, ds):
    """``ds`` with every top-level value converted now, so that no later read of a value fails.

    pydicom converts a value when it is first read; a malformed one (a wrong length for its VR)
    raises then.  Raises :class:`InputError` naming the file and the element for an element the
    loader uses, drops any other.
    """
    import pydicom

    for tag in list(ds.keys()):
        try:
            ds[tag]
        except Exception as exc:
            keyword = pydicom.datadict.keyword_for_tag(tag) or ""
            if keyword in _USED_KEYWORDS:
                raise InputError(f"DICOM file {path} has a malformed {keyword} {tag}: {error_text(exc)}") from None
            del ds[tag]
    return ds


def series_pixels(slices: list) -> np.ndarray:
    """Rescaled float32 pixels ``[k, j, i]`` of the (ordered) image records of one series (``inputs.dicom``'s
    ``_Slice``: file, frame, size, rescale slope and intercept)."""
    import pydicom
    cache: dict[Path, np.ndarray] = {}
    photometrics: set[str] = set()
    n_voxels = len(slices) * slices[0].rows * slices[0].cols
    if n_voxels > MAX_VOXELS:
        raise InputError(f"the series has {len(slices)} images of {slices[0].rows} x {slices[0].cols} pixels "
                         f"({n_voxels} voxels): more than the {MAX_VOXELS} SpineNet reads")
    out = np.empty((len(slices), slices[0].rows, slices[0].cols), dtype=np.float32)
    for k, s in enumerate(slices):
        if s.path not in cache:
            try:
                ds = pydicom.dcmread(s.path)
            except Exception as exc:
                raise InputError(f"cannot read {s.path}: {error_text(exc)}") from None
            ds = converted(s.path, ds)
            if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                raise InputError(f"no PixelData (7FE0,0010) in {s.path}")
            if float_or(ds.get("SamplesPerPixel", 1), 1) != 1:
                raise InputError(f"colour (multi-sample) DICOM images are not supported: {s.path}")
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip()
            if photometric not in ("MONOCHROME1", "MONOCHROME2"):
                # PALETTE COLOR stores indices into a colour table, not grey values
                raise InputError(f"{s.path} has PhotometricInterpretation {photometric}: SpineNet reads grey-scale "
                                 "(MONOCHROME1/2) MR images only")
            photometrics.add(photometric)
            try:
                arr = np.asarray(ds.pixel_array)
            except Exception as exc:
                ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
                ts_text = f"{ts.name} ({ts})" if ts is not None else "unknown"
                raise InputError(
                    f"cannot decode the pixel data of {s.path} (transfer syntax {ts_text}): {error_text(exc)}; "
                    "the decoders of compressed DICOM come with python-gdcm (a dependency of spinenet; for "
                    "High-Throughput JPEG 2000: pip install pylibjpeg pylibjpeg-openjpeg)") from None
            cache = {s.path: arr}  # keep only the current file (multi-frame files hold all frames)
        arr = cache[s.path]
        frame = arr if s.frame is None else arr[s.frame]
        if frame.shape != (s.rows, s.cols):
            raise InputError(f"pixel data of {s.name} has shape {frame.shape}, expected {(s.rows, s.cols)}")
        scaled = frame.astype(np.float64) * s.slope + s.intercept
        if np.abs(scaled).max(initial=0.0) >= np.finfo(np.float32).max:   # a finite slope can still overflow
            raise InputError(f"RescaleSlope {s.slope:g} and RescaleIntercept {s.intercept:g} of {s.name} scale its "
                             "pixels beyond the range SpineNet reads")
        out[k] = scaled
    if "MONOCHROME1" in photometrics:
        if len(photometrics) > 1:
            raise InputError("the series mixes MONOCHROME1 and MONOCHROME2 images")
        # MONOCHROME1: the lowest value is displayed white; the networks expect MONOCHROME2 brightness
        out = (float(out.max()) + float(out.min()) - out).astype(np.float32)
    return out


def error_text(exc: Exception) -> str:
    """A library's exception as one line of at most 200 characters, for an error naming a file."""
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)
