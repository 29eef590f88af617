"""Load a sagittal MR series from a folder of DICOM files.

Differences from the official loader (official §4), on purpose:

* every file in the folder tree is tried, whatever its extension; files
  that are not DICOM, DICOMDIR and objects that are no MR/CT-like grey-scale
  image (a SOPClassUID outside :data:`IMAGE_SOP_CLASSES`: segmentations,
  structured reports, presentation states, ...) are skipped silently, unless
  nothing else is left;
* files are grouped by SeriesInstanceUID and only sagittal series (slice
  normal from ImageOrientationPatient closest to L-R) are candidates; of
  several sagittal series (an exam's T1, T2 and STIR), the one whose header
  says T2-weighted is read, with a warning, unless one is named;
* slices are ordered by their position along the slice normal
  (ImagePositionPatient . normal), **not** by InstanceNumber, which
  scanners and anonymisers do not always keep in spatial order;
* RescaleSlope/RescaleIntercept are applied, row and column PixelSpacing
  are kept apart (DICOM PixelSpacing = [row spacing, column spacing]), the
  slice spacing comes from the positions and must be consistent;
* PixelSpacing and the slice spacing can be overridden (the official
  tutorials needed that for data with missing or wrong tags, official §10).

The result is a voxel array ``[k, j, i]`` (k = slice in position order,
j = image row, i = image column) and its IJK-to-RAS matrix (DICOM patient
coordinates are LPS: x and y are negated), handed to
:func:`SpineNetLib.inputs.canonical.scan_from_array`.  Enhanced (multi-frame) MR
files are read when they carry the standard per-frame plane position and
orientation functional groups.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SpineNetLib.inputs.canonical import (MAX_SIDE_PX, plain_numbers, scan_from_array,
                                          spacing_override)
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.mr_weighting import weighting_from_header
from SpineNetLib.core.scan import Scan
from SpineNetLib.inputs.dicom_pixels import converted, error_text, float_or, series_pixels
from SpineNetLib.inputs.image import image_suffix
from SpineNetLib.inputs.stacks import contrast_of, group_value, split_into_stacks, stack_key

_FLIP_LPS = np.diag([-1.0, -1.0, 1.0])
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: The storage classes read as images: MR, CT and grey-scale secondary capture, single- and multi-frame.  A
#: file of any other standard SOPClassUID is skipped, such as this project's own segmentation.dcm and
#: report.dcm; a file without one, or of a private class, is read when it has an image size.
IMAGE_SOP_CLASSES = frozenset((
    "1.2.840.10008.5.1.4.1.1.4",      # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",    # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",    # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.2",      # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",    # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.2",    # Multi-frame Grayscale Byte Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.3",    # Multi-frame Grayscale Word Secondary Capture Image Storage
))
_PLANES = {0: "sagittal", 1: "coronal", 2: "axial"}
#: Modality values (DICOM PS3.3 C.7.3.1.1.1) of images that are no MR scan: CT, PET, nuclear medicine,
#: ultrasound, radiographs, ...  SpineNet's networks read MR only, so such a series is never read.  A
#: series without a Modality, or of "OT" (other; some secondary captures of an MR image), is read.
NOT_MR_MODALITIES = frozenset(("CT", "PT", "NM", "US", "XA", "RF", "CR", "DX", "MG", "IO", "PX", "RG", "ES",
                               "XC", "OP", "SM"))


def not_mr_modality(header) -> str | None:
    """The header's Modality when it names images that are no MR scan (:data:`NOT_MR_MODALITIES`), else None."""
    modality = str(header.get("Modality", "") or "").strip().upper()
    return modality if modality in NOT_MR_MODALITIES else None


@dataclass
class _Slice:
    """One 2D image (a single-frame file, or one frame of a multi-frame file)."""

    path: Path
    frame: int | None
    series_uid: str
    rows: int
    cols: int
    iop: np.ndarray | None
    ipp: np.ndarray | None
    pixel_spacing: np.ndarray | None
    slope: float
    intercept: float
    instance_number: int | None
    header: object
    #: What tells the image apart from others of its series at the same position (:mod:`SpineNetLib.inputs.stacks`).
    contrast: tuple = ("", "", "")
    #: The label of the stack of its series the image belongs to, or "" (:func:`_split_stacks`).
    stack: str = ""

    @property
    def name(self) -> str:
        return str(self.path) if self.frame is None else f"{self.path} (frame {self.frame + 1})"


def _floats(value, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _rescale(path: Path, value, keyword: str, default: float) -> float:
    """RescaleSlope or RescaleIntercept: ``default`` when absent or empty; a value that is no finite
    number refuses the file (every voxel depends on it)."""
    if value is None or str(value).strip() == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        out = float("nan")
    if not np.isfinite(out):
        raise InputError(f"DICOM file {path.name} has an unusable {keyword} ({str(value)[:40]!r}): "
                         "the pixel values cannot be scaled")
    return out


def _first_item(ds, keyword: str):
    seq = getattr(ds, keyword, None)
    return seq[0] if seq is not None and len(seq) else None


def _image_size(path: Path, ds) -> tuple[int, int]:
    """(Rows, Columns), checked: whole numbers within ``canonical.MAX_SIDE_PX``."""
    size = []
    for keyword in ("Rows", "Columns"):
        value = ds.get(keyword)
        try:
            n = int(value)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"DICOM file {path.name} has no usable {keyword} value ({value!r})") from None
        if not 1 <= n <= MAX_SIDE_PX:
            raise InputError(f"DICOM file {path.name} has {keyword} = {n}: SpineNet reads images of 1 to "
                             f"{MAX_SIDE_PX} pixels per side")
        size.append(n)
    return size[0], size[1]


def _instance_number(ds) -> int | None:
    """InstanceNumber, or None when absent or malformed (slices are ordered by position anyway)."""
    try:
        return int(ds.get("InstanceNumber"))
    except (TypeError, ValueError, OverflowError):  # OverflowError: "1e400" reads as infinity
        return None


def _slices_of(path: Path, ds) -> list[_Slice]:
    """Image records of one file (one per frame for enhanced multi-frame files)."""
    series_uid = str(ds.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)")
    rows, cols = _image_size(path, ds)
    inst = _instance_number(ds)
    n_frames = int(float_or(ds.get("NumberOfFrames", 1), 1))
    if n_frames <= 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        ps = ds.get("PixelSpacing")
        return [_Slice(path, None, series_uid, rows, cols,
                       _floats(ds.get("ImageOrientationPatient"), 6) if "ImageOrientationPatient" in ds else None,
                       _floats(ds.get("ImagePositionPatient"), 3) if "ImagePositionPatient" in ds else None,
                       _floats(ps, 2) if ps is not None else None,
                       _rescale(path, ds.get("RescaleSlope"), "RescaleSlope", 1.0),
                       _rescale(path, ds.get("RescaleIntercept"), "RescaleIntercept", 0.0),
                       inst, ds, contrast_of(ds))]
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is None or len(per_frame) != n_frames:
        raise InputError(f"multi-frame DICOM {path} has no per-frame geometry "
                         "(PerFrameFunctionalGroupsSequence): convert it to single-frame files or NIfTI")
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    out = []
    for f in range(n_frames):
        groups = [per_frame[f], shared]
        iop = group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        ipp = group_value(groups, "PlanePositionSequence", "ImagePositionPatient")
        ps = group_value(groups, "PixelMeasuresSequence", "PixelSpacing")
        slope = group_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
        icpt = group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        out.append(_Slice(path, f, series_uid, rows, cols,
                          _floats(iop, 6) if iop is not None else None,
                          _floats(ipp, 3) if ipp is not None else None,
                          _floats(ps, 2) if ps is not None else None,
                          _rescale(path, slope if slope is not None else ds.get("RescaleSlope"), "RescaleSlope", 1.0),
                          _rescale(path, icpt if icpt is not None else ds.get("RescaleIntercept"), "RescaleIntercept",
                                   0.0),
                          inst, ds, contrast_of(ds, groups)))
    return out


def _candidate_files(folder: Path, recursive: bool) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` in a fixed order (DICOMDIR excluded)."""
    files: list[Path] = []

    def unreadable(exc: OSError):  # a folder that cannot be listed may hold slices of the series
        raise InputError(f"cannot read the folder {exc.filename}: {exc.strerror or exc} (it may hold part of "
                         "the series)")

    if recursive:
        for root, dirs, names in os.walk(folder, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(Path(root) / n for n in sorted(names))
    else:
        try:
            files = sorted(p for p in folder.iterdir() if p.is_file())
        except OSError as exc:
            unreadable(exc)
    return [p for p in files if not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and p.is_file()]


def _not_an_image(ds) -> str | None:
    """The name of the object's storage class ("Segmentation", ...) when its SOPClassUID is a standard class
    outside :data:`IMAGE_SOP_CLASSES`, else None.  A missing or malformed one, and a private class (a
    vendor's, which pydicom does not name), are judged by the image size, as before the class was looked at."""
    import pydicom

    value = ds.get("SOPClassUID")
    if not isinstance(value, str) or not pydicom.uid.UID(value).is_valid or value in IMAGE_SOP_CLASSES:
        return None
    name = pydicom.uid.UID(value).name
    return name.removesuffix(" Storage") if name != value else None


def _read_headers(files: list[Path]) -> tuple[list, dict[str, str]]:
    """``([(path, header) of each image file], {series UID: storage class of the other objects skipped})``."""
    import pydicom
    out = []
    skipped: dict[str, str] = {}
    for p in files:
        try:
            with open(p, "rb") as fh:
                preamble = fh.read(132)
        except OSError as exc:  # a series with an unreadable file would load incomplete
            raise InputError(f"cannot open {p}: {exc.strerror or exc}") from None
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as exc:
            if preamble[128:132] == b"DICM":  # a DICOM file, truncated or corrupt: never dropped silently
                raise InputError(f"DICOM file {p} is truncated or corrupt: {error_text(exc)}") from None
            continue  # not DICOM: other files in the folder are skipped by design
        ds = converted(p, ds)
        if preamble[128:132] == b"DICM" and "SOPClassUID" not in ds and "Rows" not in ds:
            # pydicom reads a cut file leniently: what is left has no dataset to speak of
            raise InputError(f"DICOM file {p} is truncated or corrupt (no SOPClassUID, no image size)")
        if str(ds.get("SOPClassUID", "")) == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
            continue
        kind = _not_an_image(ds)
        if kind is not None:   # segmentations, structured reports, presentation states, ...
            skipped.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), kind)
            continue
        if "Rows" not in ds or "Columns" not in ds:  # no image to read
            continue
        out.append((p, ds))
    return out, skipped


def _plane_of(iop: np.ndarray | None) -> str:
    if iop is None:
        return "unknown"
    normal = np.cross(iop[:3], iop[3:])
    return _PLANES[int(np.argmax(np.abs(normal)))]


def _series_number(slices: list[_Slice]) -> str:
    return str(slices[0].header.get("SeriesNumber", "") or "").strip()


def _describe_series(uid: str, slices: list[_Slice]) -> str:
    desc = str(slices[0].header.get("SeriesDescription", "") or "")
    number = _series_number(slices)
    return f"{uid} '{desc}' ({f'series {number}, ' if number else ''}{len(slices)} slices)"


def _series_named(series: dict[str, list[_Slice]], selector: str, sagittal_mr: list[str]) -> list[str]:
    """The series a ``--series`` value that is no key of ``series`` names: the stacks of the series whose
    SeriesInstanceUID it is; else those whose SeriesNumber it is; else those whose SeriesDescription, with
    the stack's label, contains it (any case), the sagittal MR ones among them when there are any
    (``--series T2`` in an exam with a sagittal and an axial T2; ``--series water`` for a Dixon stack)."""
    wanted = selector.strip()
    by_uid = [key for key, s in series.items() if s[0].series_uid == wanted]
    if by_uid:
        return by_uid
    by_number = [uid for uid, s in series.items() if _series_number(s) and _series_number(s) == wanted]
    if by_number:
        return by_number
    text = wanted.lower()
    by_text = [uid for uid, s in series.items()
               if text and text in f"{s[0].header.get('SeriesDescription', '') or ''} [{s[0].stack}]".lower()]
    return [uid for uid in by_text if uid in sagittal_mr] or by_text


def _by_series_number(series: dict[str, list[_Slice]], keys: list[str]) -> list[str]:
    """``keys`` in the order of their SeriesNumber (those without one last), then of their keys."""
    def number(key: str) -> float:
        text = _series_number(series[key])
        return int(text) if text.isdigit() else float("inf")
    return sorted(keys, key=lambda key: (number(key), key))


def _other_sagittal_series(series: dict[str, list[_Slice]], uid: str) -> list[str]:
    """The other sagittal MR series (or stacks) of the exam and frame of reference of the series ``uid``, by
    series number: the series whose levels a run compares with its own (``label/other_series.py``); none
    where the read series lacks either UID."""
    def exam(key: str) -> tuple[str, str]:
        header = series[key][0].header
        return tuple(str(header.get(k, "") or "") for k in ("StudyInstanceUID", "FrameOfReferenceUID"))
    mine = exam(uid)
    if not all(mine):
        return []
    return _by_series_number(series, [key for key, slices in series.items() if key != uid and _is_sagittal_mr(slices)
                                      and exam(key) == mine and not is_localizer(slices[0].header)])


#: Words of a SeriesDescription that name a scout taken to plan the series, as scanners name them ("SAG LOC",
#: "3-Plane Loc", "localizer", "AAHead_Scout", "SmartSurvey", "TriPilot"): found in the description with
#: everything but letters and digits removed; "LOC" only as a word of its own.
SCOUT_WORDS = ("LOCALIZ", "LOCALIS", "SCOUT", "SURVEY", "PILOT", "3PLANE")


def is_localizer(header) -> bool:
    """Whether the image is a scout taken to plan the series (low-resolution images that a comparison of levels
    would only mislead): its ImageType (0008,0008) says LOCALIZER, as some scanners mark them, or its
    SeriesDescription names one (:data:`SCOUT_WORDS`), as the others do."""
    value = header.get("ImageType") or []
    values = value.split("\\") if isinstance(value, str) else list(value)
    if any(str(v).strip().upper() == "LOCALIZER" for v in values):
        return True
    description = str(header.get("SeriesDescription") or "").upper()
    compact = re.sub(r"[^A-Z0-9]", "", description)
    return "LOC" in re.split(r"[^A-Z0-9]+", description) or any(word in compact for word in SCOUT_WORDS)


def _series_plane(slices: list[_Slice]) -> str:
    planes = {_plane_of(s.iop) for s in slices}
    return planes.pop() if len(planes) == 1 else "mixed"


def _is_sagittal_mr(slices: list[_Slice]) -> bool:
    """Whether a series (or stack) is one SpineNet may read: sagittal, and no CT or other non-MR image."""
    return _series_plane(slices) == "sagittal" and not not_mr_modality(slices[0].header)


def header_weighting(header) -> str | None:
    """The weighting ("T2", "T1", "PD", "STIR", "FLAIR") that one DICOM header's times, or else its series
    description, tell (:mod:`SpineNetLib.core.mr_weighting`); None where they do not."""
    weighting = weighting_from_header({**_acquisition_times(header),
                                       "series_description": str(header.get("SeriesDescription", "") or "")})
    return None if weighting is None else weighting.name


def _select_series(series: dict[str, list[_Slice]], folder: Path, series_uid: str | None
                   ) -> tuple[str, str | None]:
    """(the series to read, a warning or None): ``series_uid``, or the folder's only sagittal MR series,
    or, of several, the only one whose header says T2-weighted, with a warning that names the others
    (an exam's usual sagittal T1, T2 and STIR: the grader reads T2 scans only); a sagittal scout
    (:func:`is_localizer`) only where there is no other. A CT or other non-MR
    series, :data:`NOT_MR_MODALITIES`, is never read: the networks were trained on MR."""
    modality = {uid: not_mr_modality(s[0].header) for uid, s in series.items()}
    planes = {uid: _series_plane(s) for uid, s in series.items()}
    sagittal = [uid for uid in series if planes[uid] == "sagittal" and not modality[uid]]   # _is_sagittal_mr
    # a sagittal scout (ImageType LOCALIZER) is read only where the folder holds no other sagittal series
    sagittal = [uid for uid in sagittal if not is_localizer(series[uid][0].header)] or sagittal
    if series_uid is not None:
        if series_uid not in series:
            named = _series_named(series, series_uid, sagittal)
            if len(named) > 1:
                listing = "; ".join(_describe_series(u, series[u]) for u in named)
                raise InputError(f"--series {series_uid!r} names {len(named)} series in {folder}: {listing}; "
                                 "give its SeriesInstanceUID (with a stack's label in brackets, as listed)")
            if not named:
                listing = "; ".join(_describe_series(u, s) for u, s in series.items())
                raise InputError(f"series {series_uid} not found in {folder}; available: {listing}")
            series_uid = named[0]
        if modality[series_uid]:
            raise InputError(f"series {_describe_series(series_uid, series[series_uid])} is {modality[series_uid]}, "
                             "not MR: SpineNet reads sagittal MR scans")
        return series_uid, None
    if len(sagittal) == 1:
        return sagittal[0], None
    weightings = {uid: header_weighting(series[uid][0].header) for uid in sagittal}   # a stack's own first image
    t2 = [uid for uid in sagittal if weightings[uid] == "T2"]
    if len(t2) == 1:   # of several sagittal series
        by_number = _by_series_number(series, [u for u in sagittal if u != t2[0]])
        others = "; ".join(f"{weightings[u] or 'weighting unknown'} {_describe_series(u, series[u])}"
                           for u in by_number)
        return t2[0], (f"{len(sagittal)} sagittal series in {folder}: read the T2-weighted one, "
                       f"{_describe_series(t2[0], series[t2[0]])}; not read: {others}; another with --series "
                       "(spinenet cohort runs every one)")
    if len(sagittal) > 1:
        listing = "; ".join(_describe_series(u, series[u]) for u in sagittal)
        raise InputError(f"{len(sagittal)} sagittal series in {folder}, choose one with --series (its UID, its "
                         f"series number or a part of its description): {listing}")
    not_mr = [uid for uid, p in planes.items() if p == "sagittal" and modality[uid]]
    if not_mr:
        kinds = " and ".join(sorted({modality[uid] for uid in not_mr}))
        raise InputError(f"no sagittal MR series in {folder}: its sagittal series {'is' if len(not_mr) == 1 else 'are'} "
                         f"{kinds} ({'; '.join(_describe_series(u, series[u]) for u in not_mr)}); SpineNet reads MR scans")
    if len(series) == 1 and planes[next(iter(series))] == "unknown":
        s = next(s for s in next(iter(series.values())) if s.iop is None)
        raise InputError(f"ImageOrientationPatient (0020,0037) missing or invalid in {s.name}: "
                         "cannot tell whether the series is sagittal")
    found = sorted(set(planes.values()))
    raise InputError(f"no sagittal series in {folder}: only {' and '.join(found)} series found "
                     f"({len(series)} series)")


def load_dicom_series(folder, series_uid: str | None = None, pixel_spacing=None, slice_spacing=None, *,
                      recursive: bool = True, resample_isotropic: bool = True, containing: Path | None = None
                      ) -> Scan:
    """Canonical :class:`Scan` of the sagittal DICOM series in ``folder`` (see module docstring).

    ``series_uid`` picks a series when the folder holds several sagittal ones: its SeriesInstanceUID, or
    its SeriesNumber or a part of its SeriesDescription (:func:`_series_named`); without it, the only
    sagittal T2-weighted series is read, and ``Scan.metadata["warnings"]`` says which series were not
    (:func:`_select_series`); ``Scan.metadata["other_sagittal_series"]`` lists the keys of the other
    sagittal series of its exam (:func:`_other_sagittal_series`); ``containing``, a file of
    the folder, picks the series or stack (:mod:`SpineNetLib.inputs.stacks`) that file belongs to.
    ``pixel_spacing=(row_mm, col_mm)`` (DICOM PixelSpacing order: row spacing
    = distance between image rows) and ``slice_spacing`` (mm) replace the
    values from the tags / positions.  Raises :class:`InputError` (one line).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    ps_override = spacing_override(pixel_spacing, 2, "pixel_spacing")
    ss_override = spacing_override(slice_spacing, 1, "slice_spacing")
    series, problems = _folder_series(folder, recursive, series_uid)
    uid, warning = _chosen_key(series, problems, folder, series_uid, containing)
    return _series_scan(folder, uid, series[uid], (ps_override, ss_override), warning,
                        _other_sagittal_series(series, uid), resample_isotropic)


def load_dicom_series_each(folder, keys: list[str], *, resample_isotropic: bool = True) -> list[Scan | InputError]:
    """What :func:`load_dicom_series` gives for each of ``keys`` (a series' UID, or a stack's key as
    ``Scan.metadata["other_sagittal_series"]`` lists them) in ``folder``, its files' headers read once (an
    exam's other series, read together); the :class:`InputError` in place of a series that cannot be read."""
    folder = Path(folder)
    series, problems = _folder_series(folder, True, None)
    out: list[Scan | InputError] = []
    for key in keys:
        try:
            uid, warning = _chosen_key(series, problems, folder, key, None)
            out.append(_series_scan(folder, uid, series[uid], (None, None), warning, [], resample_isotropic))
        except InputError as error:
            out.append(error)
    return out


def _series_scan(folder: Path, uid: str, slices: list[_Slice], overrides: tuple, warning: str | None,
                 others: list[str], resample_isotropic: bool) -> Scan:
    """The canonical scan of one series' image records (``overrides``: the pixel and slice spacings given
    instead of the tags', or None)."""
    ps_override, ss_override = overrides
    first = slices[0]
    row_dir, col_dir, normal = _orientation(slices, uid)
    ps = ps_override if ps_override is not None else _pixel_spacing(slices, uid)
    slices, origin, step, slice_order = _slice_geometry(slices, uid, normal, ss_override)
    voxels = series_pixels(slices)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]   # i: along the row direction, column spacing
    lps[:3, 1] = col_dir * ps[0]   # j: along the column direction, row spacing
    lps[:3, 2] = step
    lps[:3, 3] = origin
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3] = _FLIP_LPS @ lps[:3]
    metadata = _series_metadata(folder, uid, first.header, slices, ps, slice_order, ps_override, ss_override)
    if warning is not None:
        metadata["warnings"] = [warning]
    if others:
        metadata["other_sagittal_series"] = others
    return scan_from_array(voxels, ijk_to_ras, metadata, resample_isotropic=resample_isotropic)


def _folder_series(folder: Path, recursive: bool, series_uid: str | None
                   ) -> tuple[dict[str, list[_Slice]], dict[str, str]]:
    """({series or stack key: image records}, {series UID: why one of its files cannot be used}) of the DICOM
    files in ``folder``; refused where there is no image series at all, or ``series_uid``'s cannot be read."""
    candidates = _candidate_files(folder, recursive)
    headers, skipped = _read_headers(candidates)
    if series_uid is not None and series_uid in skipped and all(
            str(ds.get("SeriesInstanceUID", "")) != series_uid for _, ds in headers):
        raise InputError(f"series {series_uid} in {folder} is no image series (a {skipped[series_uid]} object)")
    if not headers and skipped:
        found = ", ".join(sorted(set(skipped.values())))
        raise InputError(f"no image series in {folder} (found only: {found})")
    if not headers:
        images = [p for p in candidates if image_suffix(p) is not None]
        if images:   # a folder of NIfTI, NRRD or MHA files: spinenet run reads one file, a cohort all of them
            named = ", ".join(p.relative_to(folder).as_posix() for p in images[:3])
            raise InputError(f"no DICOM files in {folder}, but {len(images)} image "
                             f"file{'s' if len(images) > 1 else ''} ({named}{', ...' if len(images) > 3 else ''}): "
                             "give one of them, or run them all with spinenet cohort")
        raise InputError(f"no DICOM files in {folder}")
    series: dict[str, list[_Slice]] = {}
    problems: dict[str, str] = {}  # series -> why one of its files cannot be used (raised only if it matters)
    for path, ds in headers:
        try:
            records = _slices_of(path, ds)
        except InputError as exc:
            problems.setdefault(str(ds.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)"), str(exc))
            continue
        for s in records:
            series.setdefault(s.series_uid, []).append(s)
    if series_uid is not None and series_uid in problems:
        raise InputError(problems[series_uid])
    if not series:
        raise InputError(next(iter(problems.values())))
    return _split_stacks(series), problems


def _chosen_key(series: dict[str, list[_Slice]], problems: dict[str, str], folder: Path, series_uid: str | None,
                containing: Path | None) -> tuple[str, str | None]:
    """(key, a warning or None) of the series to load among ``series`` (:func:`_folder_series`): that of the
    file ``containing``, ``series_uid`` or the one :func:`_select_series` takes."""
    if series_uid is not None and series_uid in problems:
        raise InputError(problems[series_uid])
    if containing is not None:   # the series, or the stack, of one file
        series_uid = next((key for key, slices in series.items() if any(s.path == containing for s in slices)),
                          series_uid)
    uid, warning = _select_series(series, folder, series_uid)
    if series[uid][0].series_uid in problems:
        raise InputError(problems[series[uid][0].series_uid])
    return uid, warning


def _split_stacks(series: dict[str, list[_Slice]]) -> dict[str, list[_Slice]]:
    """``series`` with every series that holds several contrasts at the same positions replaced by its
    stacks, each under its own key (:mod:`SpineNetLib.inputs.stacks`)."""
    out: dict[str, list[_Slice]] = {}
    for uid, slices in series.items():
        stacks = split_into_stacks([s.ipp for s in slices], [s.contrast for s in slices])
        if stacks is None:
            out[uid] = slices
            continue
        for label, members in stacks.items():
            for i in members:
                slices[i].stack = label
            out[stack_key(uid, label)] = [slices[i] for i in members]
    return out


def _orientation(slices: list[_Slice], uid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row and column directions and the slice normal (LPS); image size and orientation must agree."""
    first = slices[0]
    for s in slices:
        if (s.rows, s.cols) != (first.rows, first.cols):
            raise InputError(f"contradictory image sizes in series {uid}: {first.rows}x{first.cols} in {first.name} "
                             f"but {s.rows}x{s.cols} in {s.name}")
        if s.iop is None:
            raise InputError(f"ImageOrientationPatient (0020,0037) missing or invalid in {s.name}")
        if np.max(np.abs(s.iop - first.iop)) > 1e-3:
            raise InputError(f"contradictory ImageOrientationPatient in series {uid}: "
                             f"{s.name} differs from {first.name}")
    row_dir, col_dir = first.iop[:3], first.iop[3:]
    if min(np.linalg.norm(row_dir), np.linalg.norm(col_dir)) < 1e-3:
        raise InputError(f"ImageOrientationPatient (0020,0037) in {first.name} has a zero vector")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    if abs(row_dir @ col_dir) > 1e-3:
        raise InputError(f"ImageOrientationPatient (0020,0037) in {first.name} is not orthogonal")
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def _pixel_spacing(slices: list[_Slice], uid: str) -> np.ndarray:
    """In-plane spacing from the tags: [row spacing (along j), column spacing (along i)], the same on every slice."""
    first = slices[0]
    for s in slices:
        if s.pixel_spacing is None:
            raise InputError(f"PixelSpacing (0028,0030) missing or invalid in {s.name}; "
                             "give the pixel spacing (--pixel-spacing ROW COL, in mm) to override")
        if np.any(s.pixel_spacing <= 0):
            raise InputError(f"PixelSpacing (0028,0030) in {s.name} is not positive: "
                             f"{plain_numbers(s.pixel_spacing)} mm; give the pixel spacing (--pixel-spacing ROW COL, "
                             "in mm) to override")
        if np.max(np.abs(s.pixel_spacing - first.pixel_spacing)) > 1e-4 * max(1.0, first.pixel_spacing.max()):
            raise InputError(f"contradictory PixelSpacing (0028,0030) in series {uid}: "
                             f"{plain_numbers(first.pixel_spacing)} mm in {first.name} but "
                             f"{plain_numbers(s.pixel_spacing)} mm in {s.name}; "
                             "give the pixel spacing (--pixel-spacing ROW COL) to override")
    return first.pixel_spacing


def _slice_geometry(slices: list[_Slice], uid: str, normal: np.ndarray, ss_override):
    """(slices in spatial order, origin, step from slice to slice, how they were ordered).

    Slices are ordered by their position along the normal; without any
    ImagePositionPatient, by InstanceNumber when ``ss_override`` gives the spacing.
    """
    first = slices[0]
    has_ipp = [s.ipp is not None for s in slices]
    if all(has_ipp):
        depth = np.array([s.ipp @ normal for s in slices])
        order = np.argsort(depth, kind="stable")
        slices = [slices[i] for i in order]
        depth = depth[order]
        origin = slices[0].ipp
        if len(slices) >= 2:
            step = _step_from_positions(slices, depth, uid, normal, ss_override)
        else:
            spacing = ss_override[0] if ss_override is not None else float_or(
                first.header.get("SpacingBetweenSlices", first.header.get("SliceThickness", 1.0)), 1.0)
            step = normal * float(spacing)
        return slices, origin, step, "ImagePositionPatient"
    if any(has_ipp):
        s = slices[has_ipp.index(False)]
        raise InputError(f"ImagePositionPatient (0020,0032) missing or invalid in {s.name}")
    if ss_override is None:
        raise InputError(f"ImagePositionPatient (0020,0032) missing in {first.name}: cannot order the slices; "
                         "give the slice spacing (--slice-spacing MM) to order them by InstanceNumber instead")
    if any(s.instance_number is None for s in slices):
        s = next(s for s in slices if s.instance_number is None)
        raise InputError(f"ImagePositionPatient (0020,0032) and InstanceNumber (0020,0013) missing in {s.name}: "
                         "cannot order the slices")
    slices = sorted(slices, key=lambda s: (s.instance_number, 0 if s.frame is None else s.frame))
    return slices, np.zeros(3), normal * float(ss_override[0]), "InstanceNumber (no ImagePositionPatient)"


def _step_from_positions(slices: list[_Slice], depth: np.ndarray, uid: str, normal: np.ndarray,
                         ss_override) -> np.ndarray:
    """Step between consecutive slices (ordered, at ``depth`` along the normal), checked for even gaps on a line."""
    origin = slices[0].ipp
    n = len(slices)
    gaps = np.diff(depth)
    i_dup = int(np.argmin(gaps))
    if gaps[i_dup] < 1e-3:
        raise InputError(f"contradictory slice positions in series {uid}: {slices[i_dup].name} and "
                         f"{slices[i_dup + 1].name} are at the same position (the same images twice, or "
                         "contrasts that neither image type nor echo tells apart)")
    step = (slices[-1].ipp - origin) / (n - 1)
    ipps = np.array([s.ipp for s in slices])
    drift = np.linalg.norm(ipps - (origin + np.arange(n)[:, None] * step), axis=1)
    g = float(np.median(gaps))
    tol = max(0.01, 0.02 * g)
    even = np.max(np.abs(gaps - g)) <= tol
    straight = np.max(drift) <= tol
    consistent = even and straight
    if not even and ss_override is None:
        smallest = float(gaps.min())
        multiples = gaps / smallest
        whole = np.abs(multiples - np.round(multiples)) * smallest <= max(0.01, 0.02 * smallest)
        if whole.all() and multiples.max() >= 1.5:   # every gap a whole number of steps: images missing
            at = [i for i in range(len(gaps)) if round(multiples[i]) > 1]
            missing = int(sum(round(multiples[i]) - 1 for i in at))
            first = at[0]
            raise InputError(f"the series {uid} lacks {missing} image{'s' if missing > 1 else ''} (gap of "
                             f"{gaps[first]:.3g} mm, {round(multiples[first])} times the step of {smallest:.3g} "
                             f"mm, after {slices[first].name}): export it again with every image; --slice-spacing "
                             "MM reads it with the gap closed, every slice beyond it displaced across the body")
        raise InputError(f"inconsistent slice positions in series {uid}: gaps of {gaps.min():.3g} to "
                         f"{gaps.max():.3g} mm along the slice normal (missing or extra slices?); "
                         "give the slice spacing (--slice-spacing MM) to override")
    if not straight and ss_override is None:
        worst = int(np.argmax(drift))
        raise InputError(f"contradictory slice positions in series {uid}: {slices[worst].name} is "
                         f"{drift[worst]:.3g} mm off the line through the first and last slice; "
                         "give the slice spacing (--slice-spacing MM) to override")
    if ss_override is not None:
        # keep the measured slice direction when it is trustworthy, else step along the normal
        ss = float(ss_override[0])
        step = step * (ss / float(step @ normal)) if consistent else normal * ss
    return step


def _acquisition_times(h) -> dict:
    """Echo, repetition and inversion times (ms) and the kind of sequence (DICOM ScanningSequence words:
    SE, IR, GR, ...), from a classic header or an enhanced one's functional groups; what the grader's
    check of the weighting reads (``core/mr_weighting.py``).  Missing values are left out."""
    groups = [_first_item(h, "SharedFunctionalGroupsSequence"), _first_item(h, "PerFrameFunctionalGroupsSequence")]
    found = {
        "echo_time_ms": h.get("EchoTime", group_value(groups, "MREchoSequence", "EffectiveEchoTime")),
        "repetition_time_ms": h.get("RepetitionTime",
                                    group_value(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime")),
        "inversion_time_ms": h.get("InversionTime", group_value(groups, "MRModifierSequence", "InversionTimes")),
    }
    out = {}
    for key, value in found.items():
        if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
            value = next(iter(value), None)   # InversionTimes is multi-valued (pydicom's MultiValue)
        number = float_or(value, float("nan")) if value not in (None, "") else float("nan")
        if number > 0:
            out[key] = number
    kinds = h.get("ScanningSequence")
    if kinds is not None:
        words = [str(k) for k in kinds] if not isinstance(kinds, str) else kinds.split("\\")
    else:   # enhanced MR: EchoPulseSequence and InversionRecovery say it
        pulse = str(h.get("EchoPulseSequence", "") or "").upper()
        words = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(pulse, [])
        if str(h.get("InversionRecovery", "") or "").upper() == "YES":
            words.append("IR")
    if words:
        out["scanning_sequence"] = " ".join(w.strip().upper() for w in words if w.strip())
    return out


def _series_metadata(folder: Path, uid: str, h, slices: list[_Slice], ps, slice_order: str,
                     ps_override, ss_override) -> dict:
    """``Scan.metadata`` of a DICOM series (``h``: the header of its first file as found)."""
    ts = getattr(getattr(h, "file_meta", None), "TransferSyntaxUID", None)
    field = h.get("MagneticFieldStrength")
    return {
        "source": str(folder),
        "format": "DICOM",
        "series_uid": uid,
        # the exam and its coordinates: series of one exam in one frame of reference show a vertebra at
        # the same place (SpineNetLib/cohort/exams.py)
        "study_uid": str(h.get("StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": str(h.get("FrameOfReferenceUID", "") or ""),
        "series_description": str(h.get("SeriesDescription", "") or ""),
        "series_number": str(h.get("SeriesNumber", "") or "").strip(),
        **({"stack": slices[0].stack} if slices[0].stack else {}),   # one contrast of a series of several
        "sequence_name": str(h.get("SequenceName", "") or ""),
        "protocol_name": str(h.get("ProtocolName", "") or ""),
        "modality": str(h.get("Modality", "") or ""),
        "manufacturer": str(h.get("Manufacturer", "") or ""),
        "manufacturer_model": str(h.get("ManufacturerModelName", "") or ""),
        "magnetic_field_strength_T": float_or(field, float("nan")) if field not in (None, "") else None,
        **_acquisition_times(h),
        "transfer_syntax": str(ts.name) if ts is not None else None,
        "n_files": len({s.path for s in slices}),
        "n_slices": len(slices),
        "slice_order": slice_order,
        "files_in_slice_order": [str(s.path) for s in slices],
        # the frame (0-based) of each slice in its file, None for single-frame files (the DICOM outputs need it)
        "frames_in_slice_order": [s.frame for s in slices],
        "dicom_pixel_spacing_mm": [float(ps[0]), float(ps[1])],
        "overrides": {k: v for k, v in (("pixel_spacing", None if ps_override is None else ps_override.tolist()),
                                        ("slice_spacing", None if ss_override is None else float(ss_override[0])))
                      if v is not None},
    }
