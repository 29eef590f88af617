"""A results folder's levels corrected after review (``spinenet correct``; README, "How sure the levels are").

A run that asks for a review of its levels ("levels may be shifted by one ...") leaves the decision to
the reader. In Slicer the vertebra list corrects a level and the whole chain moves with it; this is the
same correction (:func:`SpineNetLib.outputs.documents.apply_level_correction`) for a folder that
``spinenet run``, ``spinenet cohort`` or the batch script wrote.

Every file of the folder that names a level is made again from the corrected documents, and the set
is replaced as a whole (:func:`SpineNetLib.outputs.files.write_files_atomically`), so the folder never
mixes corrected and uncorrected files:

* ``vertebrae.json``, ``vertebrae.csv``, ``discs.json``, ``discs.csv``: from the documents alone;
* ``preview.png``, ``hotspots.png`` and the DICOM results (``segmentation.dcm``, ``report.dcm``), when
  the folder's ``result.json`` lists them: these draw on the scan, so the scan the run read must be
  given again (the command reads it as the run did: the same series, spacing overrides and profile),
  and it must be that scan (:func:`check_same_scan`). Without it the correction is refused.

The hotspot maps of one head (``hotspots_<head>.nii.gz``) hold no level and stay as they are; a map of
one disc (``hotspots/<disc>_<head>.*``, which plug-in pipelines write) moves to its disc's new name in
the same step. Grades stay with their discs: only the names change.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.outputs.dicom_results import DICOM_FILES, dicom_result_files
from SpineNetLib.outputs.documents import apply_level_correction, disc_names_in_folder, read_result, vertebra_name
from SpineNetLib.outputs.files import (RESULT_FILE, document_texts, earlier_result_files, manifest_text,
                                       write_files_atomically)
from SpineNetLib.outputs.preview import HOTSPOTS_FILE, PREVIEW_FILE, pillow_missing, result_images

#: The files of a results folder that :func:`correct_results` can only make again with the scan.
FILES_THAT_NEED_THE_SCAN = (PREVIEW_FILE, HOTSPOTS_FILE, *DICOM_FILES)


def vertebra_index(vertebrae_doc: dict, which: str) -> int:
    """The index (top to bottom, from 0) of the vertebra ``which`` names: its level as the results show
    it (``L4``; ``V3`` for an unlabelled third vertebra), or ``#N``, the N-th from the top."""
    vertebrae = vertebrae_doc["vertebrae"]
    names = [vertebra_name(v, i) for i, v in enumerate(vertebrae)]
    text = str(which).strip()
    numbered = re.fullmatch(r"#(\d+)", text)
    if numbered:
        n = int(numbered.group(1))
        if not 1 <= n <= len(vertebrae):
            raise InputError(f"there is no vertebra {text}: the results hold {len(vertebrae)} (#1 is the top one)")
        return n - 1
    found = [i for i, name in enumerate(names) if name.upper() == text.upper()]
    if len(found) == 1:
        return found[0]
    listing = ", ".join(f"#{i + 1} {name}" for i, name in enumerate(names)) or "none"
    if found:
        raise InputError(f"{len(found)} vertebrae are named {text}: say which one by its number ({listing})")
    raise InputError(f"no vertebra is named {text} in these results ({listing})")


def read_scan_as_run(vertebrae_doc: dict, path, series: str | None = None, *, as_stored: bool = False):
    """The scan at ``path`` read as the run that wrote ``vertebrae_doc`` read it: with its spacing
    overrides and its profile's slabs (``series``: the DICOM series, as ``--series`` takes it; None: of a
    folder, the series the run read, so that an exam folder is not read at its default series when the
    run was told another; where the folder cannot be read at that series, as the folder reads by
    itself, which :func:`check_same_scan` then refuses as another scan). ``as_stored``: on its stored
    voxel grid, without the profile's slabs (a volume to show the results on, as the batch script loads
    it)."""
    from SpineNetLib.core.profiles import processing_profile
    from SpineNetLib.inputs.load import load_scan

    recorded = vertebrae_doc.get("input") or {}
    overrides = recorded.get("overrides") or {}
    profile = processing_profile(vertebrae_doc.get("profile"), vertebrae_doc.get("weights"))
    pixel_spacing = overrides.get("pixel_spacing")

    def read(series_uid: str | None):
        return load_scan(path, series_uid=series_uid, pixel_spacing=tuple(pixel_spacing) if pixel_spacing else None,
                         slice_spacing=overrides.get("slice_spacing"),
                         resample_isotropic=profile.slab_average_thin_slices and not as_stored)

    if series is None and recorded.get("series_uid") and Path(path).expanduser().is_dir():
        try:
            return read(str(recorded["series_uid"]))
        except InputError:
            pass
    return read(series)


def check_same_scan(vertebrae_doc: dict, scan) -> None:
    """Refuse (:class:`InputError`) a scan other than the one the results were made from: its voxel grid
    (the input's shape and IJK-to-RAS, as ``vertebrae.json`` records them) and its DICOM series."""
    recorded = vertebrae_doc.get("scan") or {}
    shape = [int(n) for n in scan.input_shape_ijk]
    ijk_to_ras = np.asarray(scan.input_ijk_to_ras, float)
    same_grid = (recorded.get("shape") == shape and recorded.get("ijk_to_ras") is not None
                 and np.allclose(np.asarray(recorded["ijk_to_ras"], float), ijk_to_ras, atol=1e-3))
    series = (vertebrae_doc.get("input") or {}).get("series_uid")
    if not same_grid or (series and scan.metadata.get("series_uid") not in (None, series)):
        raise InputError("the scan given is not the one these results were made from (its voxel grid or series "
                         "differs): give the scan the run read, with the same --series")


def _hotspot_maps(folder: Path, names: list[str], renamed: dict[str, str]) -> list:
    """The folder's hotspot maps, read back as :class:`HotspotMap` under their new names (for
    ``hotspots.png``)."""
    from SpineNetLib.discs.hotspot_options import HotspotMap
    from SpineNetLib.inputs.image import read_image_arrays

    maps = []
    for name in names:
        voxels, ijk_to_ras = read_image_arrays(folder / name)
        maps.append(HotspotMap(renamed.get(name, name), voxels.astype(np.float32), ijk_to_ras))
    return maps


def renamed_disc_maps(folder: Path, hotspot_names: list[str], vertebrae_doc: dict) -> dict[str, str]:
    """``{old name: new name}`` of the folder's maps of one disc (``hotspots/<disc>_<head>.*``) whose disc
    ``vertebrae_doc`` names otherwise than the folder's ``vertebrae.json``."""
    per_disc = [name for name in hotspot_names if len(Path(name).parts) == 2]
    if not per_disc:
        return {}
    rename = {then: now for now, then in disc_names_in_folder(folder, vertebrae_doc).items()}
    out = {}
    for name in per_disc:
        disc, underscore, head_and_suffix = Path(name).name.partition("_")
        if underscore and disc in rename:
            out[name] = (Path(name).parent / f"{rename[disc]}_{head_and_suffix}").as_posix()
    return out


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None


def correct_results(results, which: str, level: str, *, scan=None) -> list[Path]:
    """Correct the vertebra ``which`` (:func:`vertebra_index`) of the results folder ``results`` to
    ``level``, the whole chain with it, and write every file that names a level again (module
    docstring); returns the paths written. ``scan``: the scan the run read, needed when the folder has
    pictures or DICOM results (:data:`FILES_THAT_NEED_THE_SCAN`)."""
    vertebrae_doc, discs_doc, folder = read_result(results)
    return rewrite_results(folder, *corrected_documents(vertebrae_doc, discs_doc, which, level), scan=scan)


def corrected_documents(vertebrae_doc: dict, discs_doc: dict | None, which: str, level: str
                        ) -> tuple[dict, dict | None]:
    """The (vertebrae, discs) documents with the vertebra ``which`` (:func:`vertebra_index`) named ``level``
    (any case), the whole chain with it (:func:`SpineNetLib.outputs.documents.apply_level_correction`)."""
    return apply_level_correction(vertebrae_doc, vertebra_index(vertebrae_doc, which), str(level).strip().upper(),
                                  discs_doc)


def rewrite_results(folder, vertebrae_doc: dict, discs_doc: dict | None, *, scan=None,
                    how_to_give_the_scan: str = "--input, and --series for a DICOM folder of several series",
                    how_to_give_the_dicom: str = "correct it with spinenet correct --input DICOM_FOLDER"
                    ) -> list[Path]:
    """Write the (corrected) documents into the results folder ``folder`` that holds an earlier version of
    them, with every file that names a level made again, all replaced together (module docstring);
    returns the paths written. ``scan``: the scan the results were made from, needed for the pictures
    and the DICOM results the folder has; ``how_to_give_the_scan`` and ``how_to_give_the_dicom`` end the
    errors that ask for it, and for the DICOM files themselves."""
    folder = Path(folder)
    if not (folder / RESULT_FILE).is_file():
        raise InputError(f"{folder} has no {RESULT_FILE}: correct a folder that spinenet run, spinenet cohort "
                         "or the batch script wrote")
    manifest = read_manifest_lists(folder)
    needing_scan = files_needing_the_scan(manifest)
    if needing_scan and scan is None:
        raise InputError(f"{folder} holds {', '.join(needing_scan)}, which "
                         f"{'show' if len(needing_scan) > 1 else 'shows'} the levels: give the scan the "
                         f"run read ({how_to_give_the_scan}) to make them again")
    dicom = [name for name in needing_scan if name in DICOM_FILES]
    if dicom and scan is not None and (scan.metadata.get("format") != "DICOM"
                                       or not scan.metadata.get("files_in_slice_order")):
        raise InputError(f"{folder} holds {', '.join(dicom)}, which are made from the DICOM files the run read: "
                         f"{how_to_give_the_dicom}")
    files = document_texts(vertebrae_doc, discs_doc)
    renamed = renamed_disc_maps(folder, manifest["hotspots"], vertebrae_doc)
    if scan is not None and needing_scan:
        check_same_scan(vertebrae_doc, scan)   # the documents keep the scan block of the run that made them
        maps = _hotspot_maps(folder, manifest["hotspots"], renamed) if HOTSPOTS_FILE in needing_scan else []
        files.update(_pictures_and_dicom(needing_scan, scan, vertebrae_doc, discs_doc, maps))
    files.update({new: _read_bytes(folder / old) for old, new in renamed.items()})
    hotspots = sorted(renamed.get(name, name) for name in manifest["hotspots"])
    files[RESULT_FILE] = manifest_text(discs_doc, hotspots, manifest["images"], manifest["dicom"])
    return write_files_atomically(folder, files, remove=list(renamed))


def read_manifest_lists(folder: Path) -> dict[str, list[str]]:
    """The hotspot maps, pictures and DICOM results that the folder's ``result.json`` lists and this
    writer makes (:func:`SpineNetLib.outputs.files.earlier_result_files`)."""
    listed = earlier_result_files(folder)
    images = [n for n in (PREVIEW_FILE, HOTSPOTS_FILE) if n in listed]
    dicom = [n for n in DICOM_FILES if n in listed]
    return {"hotspots": sorted(listed - {"discs.json", *images, *dicom}), "images": images, "dicom": dicom}


def files_needing_the_scan(manifest: dict[str, list[str]]) -> list[str]:
    """The files of a folder's manifest (:func:`read_manifest_lists`) that a correction makes again from the
    scan (:data:`FILES_THAT_NEED_THE_SCAN`)."""
    return [name for name in FILES_THAT_NEED_THE_SCAN if name in manifest["images"] + manifest["dicom"]]


def _pictures_and_dicom(names: list[str], scan, vertebrae_doc: dict, discs_doc: dict | None, maps: list) -> dict:
    """The pictures and DICOM results among ``names``, made again from the corrected documents (``maps``:
    the folder's hotspot maps, for ``hotspots.png``)."""
    made: dict = {}
    if {PREVIEW_FILE, HOTSPOTS_FILE} & set(names):
        missing = pillow_missing()
        if missing:
            raise InputError(missing)
        made.update(result_images(scan, vertebrae_doc, discs_doc, maps))
    if set(DICOM_FILES) & set(names):
        made.update(dicom_result_files(scan, vertebrae_doc, discs_doc))
    return {name: data for name, data in made.items() if name in names}
