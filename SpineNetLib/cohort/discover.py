"""The studies of a cohort: every scan under one folder that ``spinenet run`` would read.

A study is one scan:

* an image file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``), wherever it lies
  under the root;
* a sagittal DICOM series.  DICOM files are grouped by SeriesInstanceUID wherever they lie (a
  series split over sub-folders stays one study); a series is read from the deepest folder that
  holds all its files.  Every sagittal series is a study of its own: a lumbar exam usually holds
  a T1 and a T2 sagittal series, of which ``spinenet run`` reads the T2 unless told otherwise; a
  cohort runs both, and compares their levels (:mod:`SpineNetLib.cohort.exams`).  With ``only_t2``
  (``spinenet cohort --t2-only``) only the sagittal series whose header says T2-weighted
  (:func:`SpineNetLib.inputs.dicom.header_weighting`) are studies, and an exam without one is a
  failure that names the sagittal series it has; image files, which carry no such header, are
  studies either way.  Axial, coronal and localiser series
  (planes mixed within the series, or ImageType LOCALIZER) are no study and are left out without a word:
  most exams hold some.  A series whose plane its headers do not tell is a study; the loader then reads it or
  says why it cannot.

A ZIP archive (``.zip``) is unpacked into a temporary folder and looked through as a folder of its own:
every image file and sagittal series in it is a study, read from the archive when it runs
(:func:`study_input`); its relative path is the archive's followed by the path inside it
(``exams/p7.zip/T2_SAG``). An archive that cannot be unpacked is a failure.

A DICOM exam (StudyInstanceUID) with images but not one sagittal MR series (a CT or other non-MR
series is never read: ``inputs.dicom.NOT_MR_MODALITIES``) is not run: it is
reported as a failure (:class:`StudyFailure`), since a user who put it under the root probably
expected a result from it.

Study ids name the per-study result folders and the rows of the cohort tables.  They are
derived from the path relative to the root, so they stay the same from one run to the next
(that is how a run finds the studies an earlier run finished) and when the root is moved:
``<readable part>-<8 hex digits>``.  The readable part is the relative path with ``__`` between
folders, the image suffix dropped, and, for a DICOM series, ``s<SeriesNumber>_<SeriesDescription>``
appended; characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``.  The hex
digits are a hash of the exact relative path (and, for DICOM, the SeriesInstanceUID), so two
studies never share an id, not even on a file system that ignores case.

Reading the headers of every DICOM file is the slow part of discovery, so it is done folder by
folder (and archive by archive) through a ``map_folders`` function: ``spinenet cohort`` passes one that spreads the
folders over the Dask workers (:mod:`SpineNetLib.cohort.run`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.archive import is_zip_archive, unpacked_folder
from SpineNetLib.inputs.dicom import header_weighting, is_localizer, not_mr_modality
from SpineNetLib.inputs.stacks import contrast_of, group_value, split_into_stacks, stack_key, stack_label_of
from SpineNetLib.inputs.image import image_suffix

#: Files that never make a folder worth reading DICOM headers in (data files of .mhd/.nhdr
#: headers, notes, pictures, tables).
NOT_DICOM_SUFFIXES = (".raw", ".zraw", ".txt", ".md", ".json", ".csv", ".tsv", ".xml", ".html", ".pdf",
                      ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".zip", ".py")
#: The most characters of an id's readable part.
MAX_READABLE = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PLANES = ("sagittal", "coronal", "axial")


@dataclass(frozen=True)
class Study:
    """One scan of the cohort."""

    study_id: str
    #: Absolute path that :func:`SpineNetLib.inputs.load.load_scan` reads: the image file, or the
    #: folder that holds the DICOM series.
    path: str
    #: The path relative to the cohort's root (POSIX separators; "." for the root itself).
    relative: str
    #: "image" or "dicom".
    kind: str
    #: The DICOM series to read (None: an image file, or a series without a SeriesInstanceUID).
    series_uid: str | None = None
    #: Where the study lies inside the ZIP archive ``path`` (POSIX, "." for its top folder), read through
    #: :func:`study_input`; None for a study that is no archive's.
    inner: str | None = None


@dataclass(frozen=True)
class StudyFailure:
    """A study (or a DICOM exam) without a result, and why, in one line."""

    study_id: str
    #: The path relative to the cohort's root.
    input: str
    reason: str


@dataclass(frozen=True)
class SeriesHeader:
    """What the headers of one folder's DICOM files say about one series (:func:`dicom_series_in_folder`)."""

    folder: str
    #: The SeriesInstanceUID, or for one stack of a series of several contrasts its key
    #: (:func:`SpineNetLib.inputs.stacks.stack_key`), which the loader takes as the series to read.
    series_uid: str
    study_uid: str
    #: "sagittal", "coronal", "axial", "mixed" (several planes: a localiser), "localizer" (ImageType says so)
    #: or "unknown".
    plane: str
    number: str
    description: str
    files: int
    #: The Modality of images that are no MR scan ("CT", ...; ``inputs.dicom.NOT_MR_MODALITIES``), else "".
    not_mr: str = ""
    #: The weighting its first image's header tells (:func:`SpineNetLib.inputs.dicom.header_weighting`),
    #: "" where it does not.
    weighting: str = ""


@dataclass
class Candidates:
    """What a walk through the root found: image files, and folders that may hold DICOM files."""

    images: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    archives: list[Path] = field(default_factory=list)


@dataclass
class Discovery:
    """The studies under a root, in a fixed order, and the DICOM exams that gave none."""

    studies: list[Study]
    failures: list[StudyFailure]


def _readable(parts: Iterable[str]) -> str:
    cleaned = [_UNSAFE.sub("_", p).strip("._") for p in parts]
    return "__".join(p for p in cleaned if p)[:MAX_READABLE] or "study"


def make_study_id(readable_parts: Sequence[str], key: str) -> str:
    """``<readable>-<hash of key>`` (module docstring); the same parts and key give the same id."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
    return f"{_readable(readable_parts)}-{digest}"


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."


def _parts(relative: str, root: Path) -> list[str]:
    return [root.name] if relative == "." else relative.split("/")


def candidate_inputs(root: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> Candidates:
    """Image files, folders with possible DICOM files and ZIP archives under ``root``, in sorted order.

    Hidden files and folders (a leading ".") are skipped, and so is every folder in ``exclude``
    (the cohort's own output folder when it lies under the root: its hotspot maps are images).
    """
    root = Path(root)
    skip = {Path(p).resolve() for p in exclude}
    found = Candidates()
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skip)
        maybe_dicom = False
        for name in sorted(names):
            path = here / name
            if name.startswith(".") or not path.is_file():
                continue
            if image_suffix(path) is not None:
                found.images.append(path)
            elif name.lower().endswith(".zip") and is_zip_archive(path):
                found.archives.append(path)
            elif name.upper() != "DICOMDIR" and not name.lower().endswith(NOT_DICOM_SUFFIXES):
                maybe_dicom = True
        if maybe_dicom:
            found.folders.append(here)
    return found


def _plane(ds) -> str:
    """The plane of one DICOM image from ImageOrientationPatient (top level or the shared functional groups)."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        try:
            iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError, KeyError):
            return "unknown"
    try:
        values = np.asarray([float(v) for v in iop], float)
    except (TypeError, ValueError):
        return "unknown"
    if values.shape != (6,) or not np.isfinite(values).all():
        return "unknown"
    normal = np.cross(values[:3], values[3:])
    return _PLANES[int(np.argmax(np.abs(normal)))] if np.linalg.norm(normal) > 0.5 else "unknown"


def dicom_series_in_folder(folder: str | os.PathLike) -> list[SeriesHeader]:
    """The DICOM image series among the files directly in ``folder`` (headers only; not recursive).

    Files that are not DICOM, cannot be read, or hold no image (structured reports, DICOMDIR)
    are passed over: the loader reports a broken file of a study when it reads that study.
    """
    import pydicom

    folder = Path(folder)
    series: dict[str, dict] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or image_suffix(path) is not None \
                or path.name.lower().endswith(NOT_DICOM_SUFFIXES):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "Rows" not in ds or "DirectoryRecordSequence" in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        entry = series.setdefault(uid, {"study_uid": str(ds.get("StudyInstanceUID", "") or ""), "planes": set(),
                                        "number": str(ds.get("SeriesNumber", "") or ""),
                                        "description": str(ds.get("SeriesDescription", "") or ""), "images": [],
                                        "not_mr": not_mr_modality(ds) or ""})
        entry["planes"].add("localizer" if is_localizer(ds) else _plane(ds))   # a scout: no study
        weighting = header_weighting(ds) or ""
        entry["images"] += [(path, *image, weighting) for image in _positions_and_contrasts(ds)]
    return [SeriesHeader(str(folder), key, e["study_uid"], _series_plane(e["planes"]), e["number"],
                         e["description"], files, e["not_mr"], weighting)
            for uid, e in series.items() for key, (files, weighting) in _files_of_stacks(uid, e["images"]).items()]


def _positions_and_contrasts(ds) -> list[tuple]:
    """(ImagePositionPatient, :func:`SpineNetLib.inputs.stacks.contrast_of`) of each image of a file: one,
    or one per frame of an enhanced multi-frame file."""
    frames = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if frames is None:
        return [(ds.get("ImagePositionPatient"), contrast_of(ds))]
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    groups = [[frame, shared[0] if shared is not None and len(shared) else None] for frame in frames]
    return [(group_value(g, "PlanePositionSequence", "ImagePositionPatient"), contrast_of(ds, g)) for g in groups]


def _files_of_stacks(uid: str, images: list[tuple]) -> dict[str, tuple[int, str]]:
    """{series UID, or the key of each of its stacks (:mod:`SpineNetLib.inputs.stacks`): (its number of
    files, the weighting of its first image)} of one series' ``images`` (path, position, contrast,
    weighting), as the loader will see them (a dual echo's stacks differ in weighting)."""
    stacks = split_into_stacks([image[1] for image in images], [image[2] for image in images])
    if stacks is None or not uid:
        return {uid: (len({image[0] for image in images}), images[0][3])}
    return {stack_key(uid, label): (len({images[i][0] for i in members}), images[members[0]][3])
            for label, members in stacks.items()}


def _series_plane(planes: set[str]) -> str:
    return next(iter(planes)) if len(planes) == 1 else "mixed"


def _common_folder(folders: Iterable[str]) -> Path:
    return Path(os.path.commonpath(sorted(set(folders))))


def _merge_series(headers: Iterable[SeriesHeader]) -> list[SeriesHeader]:
    """One entry per series for the whole root: a series whose files lie in several folders is read
    from their deepest common folder.  Series without a SeriesInstanceUID stay one per folder."""
    merged: dict[tuple[str, str], list[SeriesHeader]] = {}
    for h in headers:
        merged.setdefault((h.series_uid, "" if h.series_uid else h.folder), []).append(h)
    out = []
    for (uid, _), parts in merged.items():
        planes = {p.plane for p in parts}
        first = parts[0]
        out.append(SeriesHeader(str(_common_folder(p.folder for p in parts)), uid, first.study_uid,
                                _series_plane(planes), first.number, first.description,
                                sum(p.files for p in parts), first.not_mr, first.weighting))
    return out


def _dicom_studies(root: Path, series: list[SeriesHeader], only_t2: bool = False
                   ) -> tuple[list[Study], list[StudyFailure]]:
    studies, failures = [], []
    exams: dict[str, list[SeriesHeader]] = {}
    for s in series:
        exams.setdefault(s.study_uid or f"folder:{s.folder}", []).append(s)
    for exam_key, members in exams.items():
        sagittal = [s for s in members if s.plane in ("sagittal", "unknown")]
        readable = [s for s in sagittal if not s.not_mr]
        if only_t2 and readable and not any(s.weighting == "T2" for s in readable):
            relative = _relative(_common_folder(s.folder for s in members), root)
            listing = "; ".join(f"{s.weighting or 'weighting unknown'} "
                                f"{f'series {s.number} ' if s.number else ''}{s.description!r}" for s in readable)
            failures.append(StudyFailure(
                make_study_id([*_parts(relative, root), "exam"], f"{relative}#{exam_key}"), relative,
                f"no sagittal series of this DICOM exam says T2-weighted in its header (--t2-only): {listing}"))
            continue
        for s in readable:
            if only_t2 and s.weighting != "T2":
                continue
            relative = _relative(Path(s.folder), root)
            label = "_".join(x for x in (f"s{s.number}" if s.number else "", s.description,
                                         stack_label_of(s.series_uid)) if x)
            studies.append(Study(make_study_id([*_parts(relative, root), label], f"{relative}#{s.series_uid}"),
                                 s.folder, relative, "dicom", s.series_uid or None))
        if not readable:
            relative = _relative(_common_folder(s.folder for s in members), root)
            planes = sorted({s.plane for s in members})
            not_mr = sorted({s.not_mr for s in sagittal})   # none readable: every sagittal series is non-MR
            reason = (f"no sagittal MR series in this DICOM exam: its sagittal series are {' and '.join(not_mr)} "
                      "(SpineNet reads MR scans)" if not_mr else
                      f"no sagittal series in this DICOM exam: {len(members)} series, "
                      f"{' and '.join(planes)} (localisers are 'mixed')")
            failures.append(StudyFailure(
                make_study_id([*_parts(relative, root), "exam"], f"{relative}#{exam_key}"), relative, reason))
    return studies, failures


def _image_study(root: Path, path: Path) -> Study:
    relative = _relative(path, root)
    parts = _parts(relative, root)
    parts[-1] = parts[-1][: -len(image_suffix(path))]
    return Study(make_study_id(parts, relative), str(path), relative, "image")


def _local_map(function: Callable, items: list) -> list:
    return [function(item) for item in items]


def studies_from_candidates(root: str | os.PathLike, candidates: Candidates,
                            map_folders: Callable[[Callable, list], list] | None = None, *,
                            only_t2: bool = False) -> Discovery:
    """The studies of what :func:`candidate_inputs` found; ``map_folders(function, folders)`` returns
    ``[function(folder) for folder in folders]``, in any way (by default here, one after the other);
    ``only_t2``: of the DICOM series, only the sagittal T2-weighted ones (module docstring)."""
    root = Path(root)
    mapped = map_folders or _local_map
    per_folder = mapped(dicom_series_in_folder, [str(f) for f in candidates.folders])
    dicom, failures = _dicom_studies(root, _merge_series(h for headers in per_folder for h in headers), only_t2)
    studies = [_image_study(root, p) for p in candidates.images] + dicom
    for inside in mapped(functools.partial(archive_discovery, str(root), only_t2=only_t2),
                         [str(a) for a in candidates.archives]):
        studies += inside.studies
        failures += inside.failures
    studies.sort(key=lambda s: (s.relative, s.study_id))
    failures.sort(key=lambda f: (f.input, f.study_id))
    return Discovery(studies, failures)


def archive_discovery(root: str | os.PathLike, archive: str | os.PathLike, *, only_t2: bool = False) -> Discovery:
    """The studies and failures inside one ZIP archive under ``root``, as studies of the cohort (module
    docstring); mapped like the folders' headers, so ``spinenet cohort`` unpacks them on its workers.

    Their ids read like those of the same files unpacked in place (``<folders>__<archive name>__...``) and
    hash the archive's relative path with the path inside it, so they stay the same from run to run."""
    root, archive = Path(root), Path(archive)
    relative = _relative(archive, root)
    folders = _parts(relative, root)[:-1]
    try:
        with unpacked_folder(archive) as folder:
            inside = discover_studies(folder, only_t2=only_t2)
            top = _readable([folder.name])
    except InputError as error:
        return Discovery([], [StudyFailure(make_study_id([*folders, archive.name], relative), relative, str(error))])

    def placed(inner: str) -> str:
        return relative if inner == "." else f"{relative}/{inner}"

    def readable(inner_id: str, inner: str) -> list[str]:
        """The readable part of an id made inside the archive's folder, after the archive's name."""
        part = inner_id.rsplit("-", 1)[0]
        if inner == "." and (part == top or part.startswith(top + "__")):   # the folder's own name comes first
            part = part[len(top):].lstrip("_")
        return [*folders, top, part]

    studies = [Study(make_study_id(readable(s.study_id, s.relative), f"{relative}!{s.relative}#{s.series_uid or ''}"),
                     str(archive), placed(s.relative), s.kind, s.series_uid, s.relative) for s in inside.studies]
    failures = [StudyFailure(make_study_id(readable(f.study_id, f.input), f"{relative}!{f.input}#{f.reason}"),
                             placed(f.input), f.reason) for f in inside.failures]
    return Discovery(studies, failures)


@contextlib.contextmanager
def study_input(study: Study) -> Iterator[Path]:
    """The path to read the study from (:func:`SpineNetLib.pipeline.read_input`): its own, or inside its
    ZIP archive, unpacked until the ``with`` block ends (its DICOM results are made from the files). Of an
    archive only the study's folder is unpacked: a DICOM series' own folder, an image file's folder (a
    ``.mhd`` or ``.nhdr`` header's data file lies beside it)."""
    if study.inner is None:
        yield Path(study.path)
        return
    folder_inside = study.inner if study.kind == "dicom" else PurePosixPath(study.inner).parent.as_posix()
    with unpacked_folder(Path(study.path), only=folder_inside) as folder:
        yield folder / study.inner


def discover_studies(root: str | os.PathLike, exclude: Sequence[str | os.PathLike] = (),
                     map_folders: Callable[[Callable, list], list] | None = None, *,
                     only_t2: bool = False) -> Discovery:
    """Every study under ``root`` (module docstring), sorted by relative path; ``exclude``: folders to skip;
    ``only_t2``: of the DICOM series, only the sagittal T2-weighted ones."""
    return studies_from_candidates(root, candidate_inputs(root, exclude), map_folders, only_t2=only_t2)
