"""The one writer of a run's result files, whoever ran it (``spinenet run``, the worker, a script).

:func:`write_results` writes, into one folder:

* ``vertebrae.json`` and ``vertebrae.csv`` (:mod:`SpineNetLib.outputs.vertebrae`);
* ``discs.json`` (when the run has a discs document) and ``discs.csv``
  (:mod:`SpineNetLib.outputs.discs`);
* the hotspot maps of the run (``hotspots_<head>.nii.gz``, or whatever
  relative names a plug-in pipeline gave them);
* ``preview.png``, a picture of the result, and ``hotspots.png`` when there are
  hotspot maps (:mod:`SpineNetLib.outputs.preview`), when given the scan and
  unless ``preview=False`` (``spinenet run --no-preview``);
* with ``dicom=True`` (``spinenet run --dicom-out``; DICOM input only),
  ``segmentation.dcm`` and ``report.dcm``, a DICOM Segmentation and a TID 1500
  measurement report for a PACS (:mod:`SpineNetLib.outputs.dicom_results`);
* ``result.json``, the manifest the Slicer module reads
  (:func:`SpineNetLib.outputs.documents.read_result`): the documents', the
  hotspot maps', the pictures' and the DICOM results' file names.

Every file appears only complete: the JSON/CSV files, the pictures and the
DICOM results (all made in memory first) are written to hidden temporary files and renamed together;
hotspot maps are written into a hidden staging folder first and published
after the JSON/CSV files; the manifest comes last, so whatever it lists is
already there.  An error midway leaves no partial file behind (files of an
earlier run in the folder stay as they were until replaced).

A folder that holds an earlier run's results keeps none of its files that this
run does not write (its pictures, hotspot maps, DICOM results or ``discs.json``):
once the new files are in place, and before the new manifest, the files that the
earlier ``result.json`` lists and this run did not write are removed
(:func:`earlier_result_files`).  Nothing else is ever removed: not a file the
manifest does not list, nor one outside the folder, nor one of a name this
writer never makes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.files import default_file_mode
from SpineNetLib.inputs.image import image_suffix
from SpineNetLib.inputs.writers import write_image
from SpineNetLib.outputs.dicom_results import DICOM_FILES, dicom_result_files
from SpineNetLib.outputs.discs import discs_csv_text
from SpineNetLib.outputs.documents import RESULT_SCHEMA, check_discs_document, check_vertebrae_document
from SpineNetLib.outputs.preview import HOTSPOTS_FILE, PREVIEW_FILE, pillow_missing, result_images
from SpineNetLib.outputs.vertebrae import vertebrae_csv_text

if TYPE_CHECKING:  # annotations only: the writer reads these objects' fields, it needs no pipeline code
    from SpineNetLib.core.scan import Scan
    from SpineNetLib.discs.hotspots import HotspotMap
    from SpineNetLib.pipeline import RunResult

RESULT_FILE = "result.json"


def write_files_atomically(outdir: str | os.PathLike, files: dict[str, str | bytes],
                           remove: Sequence[str] = ()) -> list[Path]:
    """Write ``{name: text or bytes}`` into ``outdir`` so that the set is replaced as a whole.

    Text is written as UTF-8, line endings unchanged; bytes as they are.  A name may lie in a
    sub-folder (``hotspots/L4-L5_Pfirrmann.nii.gz``), made when missing.  ``remove``: files of the
    earlier set that the new one no longer has (a map renamed); they go with the same step, and a
    sub-folder they leave empty goes too.

    Everything is first written to hidden temporary files in the same folder
    (each one listed for clean-up before its first byte, so a full disk leaves
    no ``.part`` file behind); only when all of them succeeded are they renamed
    into place.  Files of an earlier run are moved aside first and put back if
    a rename fails, so the folder never mixes new and old files of one set.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    temporary: list[tuple[Path, Path]] = []
    made_folders: list[Path] = []
    try:
        for name, text in files.items():
            final = outdir / name
            if not final.parent.is_dir():
                final.parent.mkdir(parents=True)
                made_folders.append(final.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
            temporary.append((Path(tmp), final))
            os.fchmod(fd, default_file_mode())
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(text.encode("utf-8") if isinstance(text, str) else bytes(text))
            except OSError as exc:  # e.g. a full disk: name the file the user knows, not the temporary
                raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from None
        _replace_together(temporary, [outdir / name for name in remove if name not in files])
    except BaseException:
        for tmp, _ in temporary:
            tmp.unlink(missing_ok=True)
        for folder in reversed(made_folders):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    for name in remove:
        folder = (outdir / name).parent
        if name not in files and folder != outdir and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return [final for _, final in temporary]


def _replace_together(pairs: list[tuple[Path, Path]], removed: Sequence[Path] = ()) -> None:
    """Rename each temporary onto its final name and take the ``removed`` files away; on any failure
    restore the earlier files."""
    moved_aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path in removed:
            if path.is_file() or path.is_symlink():
                old = path.with_name(f".{path.name}.removed.old")
                os.replace(path, old)
                moved_aside.append((old, path))
        for tmp, final in pairs:
            if final.exists():
                old = final.with_name(f".{final.name}.{tmp.name}.old")
                os.replace(final, old)
                moved_aside.append((old, final))
            os.replace(tmp, final)
            placed.append(final)
    except BaseException:
        for final in placed:
            final.unlink(missing_ok=True)
        for old, final in moved_aside:
            os.replace(old, final)
        raise
    for old, _ in moved_aside:
        old.unlink(missing_ok=True)


def check_writable(outdir: str | os.PathLike) -> Path:
    """Make sure result files can be written into ``outdir``, before any long work; creates nothing.

    An existing folder gets a probe file (created and removed at once); for a
    folder still to be made, its nearest existing parent must be a writable
    folder.  Raises :class:`InputError` (one line) otherwise, so an unwritable
    output is reported at once instead of after the whole inference.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"output {outdir} exists and is not a folder")
    try:
        if outdir.is_dir():
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=outdir)
            os.close(fd)
            os.unlink(probe)
            return outdir
    except OSError as exc:
        raise InputError(f"cannot write to the output folder {outdir}: {exc.strerror or exc}") from None
    parent = outdir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create the output folder {outdir}: {parent} is not a writable folder")
    return outdir


def document_texts(vertebrae_doc: dict, discs_doc: dict | None) -> dict[str, str]:
    """``{file name: text}`` of the JSON and CSV files: discs.json only with a discs document."""
    files = {"vertebrae.json": json.dumps(vertebrae_doc, indent=1) + "\n",
             "vertebrae.csv": vertebrae_csv_text(vertebrae_doc)}
    if discs_doc is not None:
        files["discs.json"] = json.dumps(discs_doc, indent=1) + "\n"
    files["discs.csv"] = discs_csv_text(discs_doc, vertebrae_doc)
    return files


def manifest_text(discs_doc: dict | None, hotspot_names: Sequence[str], image_names: Sequence[str] = (),
                  dicom_names: Sequence[str] = ()) -> str:
    """The ``result.json`` manifest (schema ``spinenet.result/1``); ``images``: the pictures written,
    ``dicom``: the DICOM results written (empty without ``--dicom-out``)."""
    manifest = {"schema": RESULT_SCHEMA, "vertebrae": "vertebrae.json",
                "discs": "discs.json" if discs_doc is not None else None,
                "hotspots": sorted(hotspot_names), "images": sorted(image_names), "dicom": sorted(dicom_names)}
    return json.dumps(manifest, indent=1) + "\n"


def _relative_name(name: str) -> Path:
    """A hotspot file name as a path inside the results folder (no absolute path, no "..")."""
    path = Path(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"a hotspot map needs a file name inside the results folder, got {name!r}")
    return path


def write_hotspot_maps(outdir: str | os.PathLike, maps: Sequence[HotspotMap]) -> list[Path]:
    """Write each map as ``outdir/<map.name>`` (any format :func:`write_image` writes); returns the paths."""
    outdir = Path(outdir)
    return [write_image(m.voxels_kji, m.ijk_to_ras, outdir / _relative_name(m.name)) for m in maps]


def _inside(outdir: Path, name: object) -> bool:
    """``name`` is a relative file name whose file lies inside ``outdir`` (no absolute path, no "..", no link
    out of the folder on the way)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    try:
        return (outdir / name).parent.resolve().is_relative_to(outdir.resolve())
    except (OSError, RuntimeError):   # a loop of links
        return False


def earlier_manifest(outdir: str | os.PathLike) -> dict | None:
    """The ``result.json`` manifest an earlier run of this writer left in ``outdir``; None when there is
    none, or it cannot be read, or it is no manifest of this writer."""
    try:
        manifest = json.loads((Path(outdir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("schema") == RESULT_SCHEMA else None


def earlier_result_files(outdir: str | os.PathLike) -> set[str]:
    """The files an earlier run wrote into ``outdir``, as its ``result.json`` lists them (relative names):
    ``discs.json``, the pictures, the DICOM results and the hotspot maps (image files).  Empty when there
    is no readable manifest of this writer (:func:`earlier_manifest`); a listed name this writer never
    makes, or outside the folder, is left out, so that no other file is ever taken for a result."""
    outdir = Path(outdir)
    manifest = earlier_manifest(outdir)
    if manifest is None:
        return set()

    def listed(key: str) -> list:
        value = manifest.get(key)
        return value if isinstance(value, list) else []

    names = {"discs.json"} if manifest.get("discs") == "discs.json" else set()
    names |= {n for n in listed("images") if n in (PREVIEW_FILE, HOTSPOTS_FILE)}
    names |= {n for n in listed("dicom") if n in DICOM_FILES}
    names |= {n for n in listed("hotspots") if _hotspot_map_name(n)}
    return {n for n in names if _inside(outdir, n)}


def _hotspot_map_name(name: object) -> bool:
    """A name a hotspot map of this project gets: ``hotspots_<head>.<image suffix>`` (``discs/hotspots.py``)
    or a map of one disc, ``hotspots/<disc>_<head>.<image suffix>`` (``outputs/documents.hotspot_files``)."""
    if not isinstance(name, str) or image_suffix(name) is None:
        return False
    parts = Path(name).parts
    return (len(parts) == 1 and parts[0].startswith("hotspots_")) or (len(parts) == 2 and parts[0] == "hotspots")


def _remove_files(outdir: Path, names: set[str]) -> None:
    """Remove these files of ``outdir``, and a sub-folder of it (``hotspots/``) they leave empty."""
    for name in sorted(names):
        path = outdir / name
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
            if path.parent != outdir and not any(path.parent.iterdir()):
                path.parent.rmdir()


def _publish(staging: Path, outdir: Path, names: Sequence[str]) -> list[Path]:
    published = []
    for name in names:
        target = outdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)
        published.append(target)
    return published


def write_results(outdir: str | os.PathLike, result: RunResult, *, scan: Scan | None = None,
                  preview: bool = True, dicom: bool = False) -> list[Path]:
    """Write the result files of ``result`` into ``outdir`` (module docstring); returns their paths.

    ``result`` is a :class:`SpineNetLib.pipeline.RunResult`; its documents
    are checked first (:class:`InputError` for anything that is not a
    ``spinenet.vertebrae/1`` or ``spinenet.discs/1`` document).  With
    ``scan`` (the :class:`Scan` the run worked on) and ``preview``, the
    pictures are drawn too (none when Pillow is missing: callers say so,
    :func:`SpineNetLib.outputs.preview.pillow_missing`).  With ``dicom``, the
    DICOM results are made too: that needs ``scan`` read from a DICOM series
    (:class:`InputError` otherwise, before anything is written); a DICOM
    result of an earlier run that this run does not make (no segment, no
    disc) is removed.  So is every file an earlier run's ``result.json``
    in ``outdir`` lists and this run does not write (:func:`earlier_result_files`).
    The last path is the ``result.json`` manifest.
    """
    vertebrae_doc = check_vertebrae_document(result.vertebrae_document)
    discs_doc = result.discs_document
    if discs_doc is not None:
        check_discs_document(discs_doc)
    names = [_relative_name(m.name).as_posix() for m in result.hotspots]
    if dicom and scan is None:
        raise InputError("DICOM results need the scan the run worked on (write_results(..., scan=scan))")
    dicom_files = dicom_result_files(scan, vertebrae_doc, discs_doc) if dicom else {}
    images = (result_images(scan, vertebrae_doc, discs_doc, result.hotspots)
              if preview and scan is not None and pillow_missing() is None else {})
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hotspots.", dir=outdir)) if names else None
    try:
        if staging is not None:
            write_hotspot_maps(staging, result.hotspots)
        written = write_files_atomically(outdir, {**document_texts(vertebrae_doc, discs_doc), **images,
                                                  **dicom_files})
        for name in DICOM_FILES if dicom else ():
            if name not in dicom_files:
                (outdir / name).unlink(missing_ok=True)   # an earlier run's: it would not match this one
        if staging is not None:
            written += _publish(staging, outdir, names)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    # the earlier run's files this run did not replace: after the new files, before the new manifest
    # (an interruption in between leaves the earlier manifest, and a new run removes them then)
    _remove_files(outdir, earlier_result_files(outdir) - {p.relative_to(outdir).as_posix() for p in written})
    manifest = manifest_text(discs_doc, names, list(images), list(dicom_files))
    return written + write_files_atomically(outdir, {RESULT_FILE: manifest})
