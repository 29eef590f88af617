"""One entry point for every input: a DICOM folder, one DICOM file, or an image file.

* a folder -> the sagittal DICOM series in it (:func:`io_dicom.load_dicom_series`);
* a single DICOM file (any extension) -> its whole series, read from the
  file's folder;
* ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` ->
  :func:`io_image.load_image_file`;
* a ZIP archive is refused here with a pointer to :func:`SpineNetLib.inputs.archive.unpacked`, which
  keeps it unpacked for as long as a caller needs its files;
* :func:`load_other_series`: the other sagittal series of a DICOM scan's exam, the second opinion on
  its levels (``label/other_series.py``); :func:`load_named_series`: those a user names, any format
  (``spinenet run --compare-with``: a NIfTI study's T1 beside its T2).

Every problem is an :class:`InputError` with a one-line message.
"""

from __future__ import annotations

import os
from pathlib import Path

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import MAX_COMPARED_SERIES
from SpineNetLib.inputs.archive import is_zip_archive
from SpineNetLib.inputs.dicom import DICOMDIR_SOP_CLASS, load_dicom_series, load_dicom_series_each
from SpineNetLib.inputs.stacks import series_uid_of
from SpineNetLib.inputs.image import (IMAGE_SUFFIXES, check_image_voxels, image_suffix, load_image_file,
                                      other_sagittal_images_of_session)
from SpineNetLib.core.scan import Scan


def _is_dicom_file(path: Path) -> str | None:
    """SeriesInstanceUID ("" if absent) when ``path`` is a readable DICOM file, else None."""
    import pydicom
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None
    return str(ds.get("SeriesInstanceUID", "") or "")


def _is_dicomdir(path: Path) -> bool:
    """Whether ``path`` is a DICOMDIR, the index of a DICOM medium (a CD or a PACS export): the images
    lie in the folders below it."""
    import pydicom
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["MediaStorageSOPClassUID",
                                                                           "SOPClassUID"])
    except Exception:
        return False
    meta = getattr(ds, "file_meta", None)
    return DICOMDIR_SOP_CLASS in (str(getattr(meta, "MediaStorageSOPClassUID", "") or ""),
                                  str(ds.get("SOPClassUID", "") or ""))


def load_scan(path, series_uid: str | None = None, pixel_spacing=None, slice_spacing=None, *,
              resample_isotropic: bool = True) -> Scan:
    """See :func:`_load`; a scan whose voxels hold no image (NaN, one value everywhere) is refused."""
    scan = _load(path, series_uid, pixel_spacing, slice_spacing, resample_isotropic=resample_isotropic)
    if image_suffix(Path(path)) is None:   # DICOM: an image file's voxels were checked as it was read
        check_image_voxels(scan.voxels, Path(path).name, label_map=False)   # (load_image_file, label map too)
    return scan


def _load(path, series_uid: str | None = None, pixel_spacing=None, slice_spacing=None, *,
          resample_isotropic: bool = True) -> Scan:
    """Canonical :class:`Scan` of a DICOM folder, a DICOM file or an image file.

    ``pixel_spacing=(row_mm, col_mm)`` and ``slice_spacing`` override the
    spacings read from the input; ``series_uid`` picks a DICOM series.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"no such file or folder: {p}")
    if p.is_dir():
        try:
            with os.scandir(p) as entries:
                next(entries, None)
        except OSError as exc:  # not "empty": the folder cannot be read
            raise InputError(f"cannot read the folder {p}: {exc.strerror or exc}") from None
        if not any(q.is_file() for q in p.rglob("*")):
            raise InputError(f"folder {p} is empty")
        return load_dicom_series(p, series_uid, pixel_spacing, slice_spacing, resample_isotropic=resample_isotropic)
    if not p.is_file():
        raise InputError(f"not a regular file or folder: {p}")
    if image_suffix(p) is not None:
        if series_uid is not None:
            raise InputError(f"--series applies to DICOM input only, not to {p.name}")
        return load_image_file(p, pixel_spacing, slice_spacing, resample_isotropic=resample_isotropic)
    if _is_dicomdir(p):   # the medium's folder, read as a folder is (its sagittal series, --series)
        return load_dicom_series(p.parent, series_uid, pixel_spacing, slice_spacing,
                                 resample_isotropic=resample_isotropic)
    file_series = _is_dicom_file(p)
    if file_series is None and is_zip_archive(p):
        raise InputError(f"{p.name} is a ZIP archive: spinenet run reads it as it is; in Python read the path "
                         "that SpineNetLib.inputs.archive.unpacked gives for it")
    if file_series is None:
        raise InputError(f"unsupported input {p.name!r}: not DICOM and not one of {', '.join(IMAGE_SUFFIXES)}")
    if series_uid is not None and file_series and series_uid_of(series_uid) != file_series:
        raise InputError(f"{p.name} belongs to series {file_series}, not to the requested series {series_uid}")
    return load_dicom_series(p.parent, file_series or None, pixel_spacing, slice_spacing,
                             recursive=False, resample_isotropic=resample_isotropic, containing=p)


def load_other_series(path, scan: Scan, *, resample_isotropic: bool = True,
                      limit: int = MAX_COMPARED_SERIES) -> list[Scan]:
    """The other sagittal series of ``scan``'s exam and frame of reference in the DICOM input ``path`` it
    was read from (``Scan.metadata["other_sagittal_series"]``, by series number, at most ``limit``), or, for an
    image in a BIDS session, the session's other sagittal images (:func:`_other_images_of_session`), read as
    ``scan`` was; [] for any other image file or a series alone. One that cannot be read is left out, and
    ``scan.metadata["warnings"]`` says so."""
    if scan.metadata.get("bids_session"):
        return _other_images_of_session(path, scan, resample_isotropic, limit)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent   # a file: the series of its folder
    keys = (scan.metadata.get("other_sagittal_series") or [])[:limit]
    if not keys:
        return []
    try:
        reads = load_dicom_series_each(folder, keys, resample_isotropic=resample_isotropic)
    except InputError as error:   # the folder itself (a file given: the folder around it, sub-folders too)
        scan.metadata.setdefault("warnings", []).append(
            f"the exam's other series were not compared with the one read: {error}")
        return []
    others = []
    for key, read in zip(keys, reads):
        try:
            if isinstance(read, InputError):
                raise read
            check_image_voxels(read.voxels, folder.name, label_map=False)   # as load_scan checks a series
            others.append(read)
        except InputError as error:
            scan.metadata.setdefault("warnings", []).append(
                f"the series {key} of the exam was not compared with the one read: {error}")
    return others


def _other_images_of_session(path, scan: Scan, resample_isotropic: bool, limit: int) -> list[Scan]:
    """The other sagittal images of a BIDS session (``inputs/image.other_sagittal_images_of_session``, by name,
    at most ``limit``), read as ``scan`` was; one that cannot be read is left out, and the warnings say so."""
    others = []
    for other in other_sagittal_images_of_session(path)[:limit]:
        try:
            others.append(load_scan(other, resample_isotropic=resample_isotropic))
        except InputError as error:
            scan.metadata.setdefault("warnings", []).append(
                f"the image {other.name} of the session was not compared with the one read: {error}")
    return others


def load_named_series(paths, scan: Scan, input_path, *, resample_isotropic: bool = True) -> list[Scan]:
    """The series the user names as other sagittal series of ``scan``'s exam (``spinenet run --compare-with``),
    read as ``scan`` was from ``input_path``. Unlike the series found beside a DICOM scan, a named one that
    cannot be read is refused: the user asked for it. Refused too: more than ``MAX_COMPARED_SERIES``, the
    scan itself, and a DICOM series in another frame of reference than a DICOM scan's (its vertebrae would
    not lie where the scan's do). Image files carry no frame of reference: they must be in the patient
    coordinates the scan's file uses (as a converter writes every series of one session), which the
    comparison's note says when too few vertebrae lie at the same places."""
    paths = [Path(p) for p in paths]
    if len(paths) > MAX_COMPARED_SERIES:
        raise InputError(f"--compare-with names {len(paths)} series; at most {MAX_COMPARED_SERIES} are compared")
    read = []
    for path in paths:
        if path.exists() and Path(input_path).exists() and path.resolve() == Path(input_path).resolve():
            raise InputError(f"--compare-with {path}: that is the scan read itself")
        try:
            other = load_scan(path, resample_isotropic=resample_isotropic)
        except InputError as error:
            raise InputError(f"--compare-with {path}: {error}") from None
        if _series_key(other) == _series_key(scan):
            raise InputError(f"--compare-with {path}: that is the series read itself")
        mine, theirs = (str(x.metadata.get("frame_of_reference_uid") or "") for x in (scan, other))
        if mine and theirs and mine != theirs:
            raise InputError(f"--compare-with {path}: its frame of reference is not the scan's (another session "
                             "or patient position), so its vertebrae do not lie where the scan's do")
        read.append(other)
    return read


def series_to_compare(named, source, scan: Scan, input_path, *, compare: bool = True,
                      resample_isotropic: bool = True) -> list[Scan]:
    """The other sagittal series to check ``scan``'s levels against, as every caller reads them (``spinenet
    run``, ``SpineNetBatch.py``): those ``named`` by the user (:func:`load_named_series`, read now, so that a
    bad one fails before the inference), then those found beside a DICOM ``source``
    (:func:`load_other_series`; one named as well is compared once), at most ``MAX_COMPARED_SERIES`` in all;
    none where ``compare`` is false (``--no-compare-series``), which naming series contradicts."""
    named = list(named or [])
    if not compare:
        if named:
            raise InputError("--compare-with and --no-compare-series contradict each other: drop one")
        return []
    given = load_named_series(named, scan, input_path, resample_isotropic=resample_isotropic)
    found = load_other_series(source, scan, resample_isotropic=resample_isotropic)
    named_twice = {_series_key(other) for other in given}
    found = [other for other in found if _series_key(other) not in named_twice]
    return (given + found)[:MAX_COMPARED_SERIES]


def _series_key(scan: Scan) -> str:
    """What makes a series one: its DICOM series UID, else the absolute path of its image file."""
    source = str(scan.metadata.get("source") or "")
    return str(scan.metadata.get("series_uid") or (os.path.abspath(source) if source else f"scan {id(scan)}"))
