"""Annotated scans of one's own for ``spinenet evaluate`` (README, "Measuring on your own scans").

Issue 10's goal is measured on scans from other centres, and those come as a hospital has them: the
scan as a DICOM series or an image file, the reference outlines drawn in 3D Slicer (a ``.seg.nrrd``)
or stored as a DICOM Segmentation, points placed in Slicer, or a label map.  A case is a folder holding

* the scan: ``image/`` (a DICOM series) or ``image.nii.gz`` / ``.nii`` / ``.nrrd`` / ``.nhdr`` /
  ``.mha`` / ``.mhd``, read exactly as ``spinenet run`` reads it (:func:`~SpineNetLib.inputs.load.load_scan`,
  native slices);
* the reference, one of :data:`LABEL_FILES`: a Slicer segmentation (``labels.seg.nrrd``) or a DICOM
  Segmentation (``labels.dcm``), whose segment names say the levels ("L4", "vertebrae_L4", "L4-L5",
  "L4/5"; :func:`level_of_name`), Slicer point markups (``labels.mrk.json``: a point in each body, and
  in the discs if wished, labelled the same way; scored as centre points), or a label map whose values
  ``case.json``'s ``labels`` table names;
* optionally ``case.json``: ``sequence``, ``"annotation": "points"`` for centre points instead of
  outlines, ``labels`` for a label map, ``series`` where ``image/`` holds several sagittal series (what
  ``spinenet run --series`` takes: the SeriesInstanceUID, the SeriesNumber or a part of the
  description; without it, the one whose header says T2-weighted, as ``spinenet run`` reads), and
  ``patient`` where several cases are scans of one patient (otherwise a DICOM scan's PatientID says it;
  each other case is its own patient).  Scans of one patient are wrong together, so the intervals then
  take the patient as their unit (:mod:`SpineNetLib.evaluation.intervals`).

The reference may lie on another grid than the scan (Slicer crops a segmentation to its extent, a SEG
holds only the annotated frames): it is brought onto the scan's voxels by nearest neighbour; where two
segments overlap (Slicer then saves several label layers) the later one keeps the voxel.  Every
level is then given the code of ``../shared/data`` (bodies C1..S1 = 1..26, discs 100 + the body above),
so the scoring of :mod:`SpineNetLib.evaluation.evaluate` is the one of the project's own data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from SpineNetLib.core.errors import InputError, one_line
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.inputs.canonical import scan_from_array
from SpineNetLib.inputs.image import image_ijk_to_ras
from SpineNetLib.training.datasets import VERTEBRA_CODES, CaseData, CaseGeometry, RealCase

#: The scan of a case: a DICOM folder, else the first of these files.
IMAGE_FILES: tuple[str, ...] = ("image.nii.gz", "image.nii", "image.nrrd", "image.nhdr", "image.mha", "image.mhd")
IMAGE_FOLDER = "image"
#: The reference of a case: the first of these files.
LABEL_FILES: tuple[str, ...] = ("labels.seg.nrrd", "labels.dcm", "labels.mrk.json", "labels.nii.gz", "labels.nii",
                                "labels.nrrd", "labels.nhdr", "labels.mha", "labels.mhd")
#: References that name their levels themselves (no ``labels`` table in ``case.json``).
NAMED_REFERENCES: tuple[str, ...] = ("labels.seg.nrrd", "labels.dcm", "labels.mrk.json")
#: Points of a markups file are drawn as disks of this radius on their nearest slice, as
#: ``../shared/data/tianchi`` draws its radiologists' points (data README: 3 mm disks).
POINT_RADIUS_MM = 3.0

_CODE_OF_BODY = {name: code for code, name in VERTEBRA_CODES.items()}
_LEVEL = r"(C[1-7]|T1[0-2]|T[1-9]|L[1-5]|S1)"
#: "L4-L5", "L4/L5", "L4-5", "L5-S1", "L4 - L5" (the lower level may leave out its letter).
_DISC = re.compile(rf"(?<![A-Z0-9]){_LEVEL}\s*[-/]\s*([CTLS]?\d{{1,2}})(?![0-9])", re.IGNORECASE)
_BODY = re.compile(rf"(?<![A-Z0-9]){_LEVEL}(?![0-9])", re.IGNORECASE)


def level_of_name(name: str) -> str | None:
    """The body ("L4") or disc ("L4-L5") a label or segment name gives, None when it names none.

    Accepts the names of ``../shared/data`` and of this project's Slicer segmentations ("L4", "L4-L5"),
    TotalSegmentator's ("vertebrae_L4"), and the common "L4/5".  A disc whose two levels are not
    neighbours ("L3-L5") is an error, not a guess.
    """
    text = str(name).strip()
    disc = _DISC.search(text)
    if disc:
        upper = disc.group(1).upper()
        lower = disc.group(2).upper()
        if lower[0].isdigit():
            lower = upper[0] + lower
        order = LEVELS_TOP_DOWN + ("S2",)
        if upper not in order or lower not in order or order.index(lower) != order.index(upper) + 1:
            raise InputError(f"the name {text!r} names no disc: {upper} and {lower} are not neighbours")
        return f"{upper}-{lower}"
    body = _BODY.search(text)
    return body.group(1).upper() if body else None


def code_of_level(level: str) -> int:
    """``../shared/data``'s label code of a body or disc name (README: L1 = 20, L4-L5 = 123)."""
    upper = level.split("-")[0]
    return _CODE_OF_BODY[upper] + (100 if "-" in level else 0)


def _reference_name(folder: Path) -> str | None:
    """The first of :data:`LABEL_FILES` in ``folder``, None when it holds none."""
    return next((name for name in LABEL_FILES if (folder / name).is_file()), None)


def is_own_case(folder: Path) -> bool:
    """Whether ``folder`` holds a case of one's own: a ``case.json`` or a reference file."""
    return (folder / "case.json").is_file() or _reference_name(folder) is not None


def _case_json(path: Path) -> dict:
    file = path / "case.json"
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {file}: {exc}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{file} is not a JSON object")
    return meta


def own_case(path: Path) -> RealCase:
    """A case of one's own (module docstring).  Its source is its parent folder's name; its patient the
    ``patient`` of its ``case.json``, else the PatientID of its DICOM scan, else the case itself (both
    within the source: ``"mycentre/P017"``)."""
    path = Path(path)
    meta = _case_json(path)
    reference = label_file(path)
    if reference.name not in NAMED_REFERENCES and not isinstance(meta.get("labels"), dict):
        raise InputError(f"{path / 'case.json'} has no 'labels' table (label value -> name, e.g. \"24\": \"L5\"), "
                         f"which {reference.name} needs (a .seg.nrrd, a DICOM SEG or a .mrk.json names its levels)")
    patient = _name_or_number(meta, "patient", path, "a name or number")
    patient = patient if patient is not None else _dicom_patient_id(path)
    case_series(path)   # a bad 'series' is said before any work
    return RealCase(case_id=path.name, source=path.parent.name,
                    patient_id=f"{path.parent.name}/{patient if patient else path.name}",
                    sequence=str(meta.get("sequence", "")), path=path)


def _dicom_patient_id(path: Path) -> str | None:
    """The PatientID of the first DICOM file of a case's ``image/`` folder (None: no DICOM scan, or an
    empty PatientID).  Anonymising tools may give every scan the same PatientID; the tables then say
    "scans of 1 patient", and ``case.json``'s ``patient`` overrides it."""
    folder = path / IMAGE_FOLDER
    if not folder.is_dir():
        return None
    import pydicom

    for file in sorted(f for f in folder.rglob("*") if f.is_file()):
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["PatientID", "SOPClassUID"])
        except Exception:  # pydicom raises many kinds for a file that is no DICOM; the loader says what is wrong
            continue
        if "SOPClassUID" not in header and "PatientID" not in header:
            continue
        patient = str(header.get("PatientID", "") or "").strip()
        return patient or None
    return None


#: One's own cases sharing one DICOM PatientID draw a warning from this many on (:func:`shared_patient_warnings`).
SHARED_PATIENT_ID_CASES = 3


def shared_patient_warnings(cases) -> list[str]:
    """A line for each DICOM PatientID that :data:`SHARED_PATIENT_ID_CASES` or more of one's own cases
    (:func:`own_case`) share while their ``case.json`` names no ``patient``.

    Such cases count as one patient in the 95 % intervals.  That is right for several series of one
    spine, and wrong where an anonymising tool gave every scan the same PatientID (the intervals then
    come out far too wide), which nothing in the files tells apart: the user is asked to say so.
    """
    shared: dict[str, list] = {}
    for case in cases:
        if case.patient_id == f"{case.source}/{case.case_id}" or _case_json(case.path).get("patient") is not None:
            continue    # a patient of its own, or named by the user
        shared.setdefault(case.patient_id, []).append(case)
    lines = []
    for patient, group in sorted(shared.items()):
        if len(group) < SHARED_PATIENT_ID_CASES:
            continue
        names = ", ".join(c.case_id for c in group[:5]) + (f" and {len(group) - 5} more" if len(group) > 5 else "")
        patient_id = patient.split("/", 1)[1]
        lines.append(f"{len(group)} cases of {group[0].source} ({names}) share the DICOM PatientID {patient_id!r} "
                     "and count as one patient in the 95 % intervals; if an anonymising tool gave them that ID, "
                     "name each case's patient in its case.json (\"patient\")")
    return lines


def marked_by_points(path: Path) -> bool:
    """Whether a case folder's reference marks centre points, not outlines: a markups file, or
    ``case.json`` saying ``"annotation": "points ..."`` (bodies drawn as small disks, as
    ``../shared/data/tianchi`` draws them)."""
    return _reference_name(path) == "labels.mrk.json" or \
        str(_case_json(path).get("annotation", "")).strip().lower().startswith("points")


def case_series(path: Path) -> str | None:
    """The series of the case's ``image/`` folder to read (``case.json``'s ``series``, as ``spinenet run
    --series`` takes it), or None: the folder's only sagittal series."""
    return _name_or_number(_case_json(path), "series", path,
                           "a SeriesInstanceUID, a series number or a part of a series description")


def _name_or_number(meta: dict, key: str, path: Path, what: str) -> str | None:
    """``case.json``'s ``key`` as text, or None when it is not given; :class:`InputError` naming ``what`` it
    must be when it is neither a non-empty text nor a number."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise InputError(f"{path / 'case.json'}: '{key}' must be {what}, got {value!r}")
    return str(value).strip()


def image_path(path: Path) -> Path:
    """The scan of a case folder: ``image/`` (DICOM) or the first of :data:`IMAGE_FILES`."""
    if (path / IMAGE_FOLDER).is_dir():
        return path / IMAGE_FOLDER
    for name in IMAGE_FILES:
        if (path / name).is_file():
            return path / name
    raise InputError(f"{path} holds no scan: put it in {IMAGE_FOLDER}/ (DICOM) or one of {', '.join(IMAGE_FILES)}")


def label_file(path: Path) -> Path:
    """The reference of a case folder: the first of :data:`LABEL_FILES`."""
    name = _reference_name(path)
    if name is not None:
        return path / name
    raise InputError(f"{path} holds no reference: put it in one of {', '.join(LABEL_FILES)}")


# --------------------------------------------------------------------------- reading the reference


def _read_itk(path: Path):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from None


def _slicer_segments(path: Path):
    """Layers and ``(layer, label value, name)`` of the segments of a Slicer ``.seg.nrrd``.

    Slicer writes one 3D layer where no segments overlap (each with its ``SegmentN_LabelValue``) and a
    4D file of several layers where they do (``SegmentN_Layer``; files of Slicer before 4.11: one layer
    per segment, value 1).
    """
    import SimpleITK as sitk

    image = _read_itk(path)
    n_layers = image.GetNumberOfComponentsPerPixel()
    layers = [image] if n_layers == 1 else [sitk.VectorIndexSelectionCast(image, n) for n in range(n_layers)]
    keys = set(image.GetMetaDataKeys())
    segments = []
    index = 0
    while f"Segment{index}_Name" in keys:
        def meta(field: str, default: str) -> str:
            key = f"Segment{index}_{field}"
            return image.GetMetaData(key) if key in keys else default
        try:
            layer = int(meta("Layer", str(index if n_layers > 1 else 0)))
            value = int(meta("LabelValue", "1"))
        except ValueError:
            raise InputError(f"{path}: segment {index} has an unreadable layer or label value") from None
        if not 0 <= layer < n_layers:
            raise InputError(f"{path}: segment {index} lies in layer {layer}, the file has {n_layers}")
        segments.append((layer, value, meta("Name", "")))
        index += 1
    if not segments:
        raise InputError(f"{path} names no segments (no Segment0_Name in its header): not a Slicer segmentation")
    return layers, segments


def _dicom_segments(path: Path):
    """The one layer (values = segment numbers) and ``(0, number, label)`` of a DICOM Segmentation."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # highdicom and pydicom raise many kinds for a file that is no SEG
        raise InputError(f"cannot read {path} as a DICOM Segmentation: {one_line(str(exc))}") from None
    try:
        volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    except Exception as exc:
        raise InputError(f"{path}: its frames make no regular volume ({one_line(str(exc))})") from None
    segments = [(0, int(d.SegmentNumber), str(d.SegmentLabel)) for d in seg.SegmentSequence]
    return [volume.to_simpleitk()], segments


def _label_map(path: Path, table: dict):
    """The one layer of a label map and ``(0, value, name)`` from ``case.json``'s ``labels`` table."""
    try:
        segments = [(0, int(value), str(name)) for value, name in table.items()]
    except (TypeError, ValueError):
        raise InputError(f"{path.parent / 'case.json'}: its 'labels' table must map label values to names") from None
    image = _read_itk(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} is not a 3D label map")
    return [image], segments


def _markup_points(path: Path) -> list[tuple[str, np.ndarray]]:
    """``(label, RAS mm)`` of every control point of a Slicer markups file (``.mrk.json``; positions in its
    ``coordinateSystem``, LPS as Slicer writes them, or RAS)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        points = []
        for markup in doc["markups"]:
            flip = np.array([-1.0, -1.0, 1.0]) if markup.get("coordinateSystem", "LPS") == "LPS" else np.ones(3)
            for point in markup.get("controlPoints") or []:
                position = np.asarray(point["position"], float).reshape(3) * flip
                points.append((str(point.get("label", "")), position))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read {path} as Slicer markups: {one_line(str(exc))}") from None
    return points


def _points_as_disks(points, path: Path, ijk_to_ras: np.ndarray, shape_ijk, slice_axis: int) -> np.ndarray:
    """``[k, j, i]`` values: point ``n`` of ``points`` (1-based; :func:`_markup_points` of ``path``) as a
    disk of :data:`POINT_RADIUS_MM` on the scan's slice nearest to it."""
    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    values = np.zeros(tuple(int(n) for n in shape_ijk)[::-1], np.uint16)
    plane = [axis for axis in range(3) if axis != slice_axis]
    for n, (label, ras) in enumerate(points, start=1):
        ijk = (ras_to_ijk @ np.append(ras, 1.0))[:3]
        if not all(-0.5 <= ijk[a] <= shape_ijk[a] - 0.5 for a in range(3)):
            raise InputError(f"{path}: the point {label!r} lies outside the scan")
        centre = ijk.copy()
        centre[slice_axis] = np.clip(np.rint(ijk[slice_axis]), 0, shape_ijk[slice_axis] - 1)
        steps = [POINT_RADIUS_MM / np.linalg.norm(ijk_to_ras[:3, a]) for a in range(3)]
        ranges = [np.arange(max(0, int(np.floor(centre[a] - steps[a]))),
                            min(shape_ijk[a], int(np.ceil(centre[a] + steps[a])) + 1))
                  if a in plane else np.array([int(centre[a])]) for a in range(3)]
        grid = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3).astype(float)
        offsets_mm = (grid - centre) @ np.asarray(ijk_to_ras, float)[:3, :3].T
        inside = grid[np.linalg.norm(offsets_mm, axis=1) <= POINT_RADIUS_MM].astype(int)
        values[inside[:, 2], inside[:, 1], inside[:, 0]] = n
    return values


def _on_grid(layer, ijk_to_ras: np.ndarray, shape_ijk) -> np.ndarray:
    """``[k, j, i]`` values of ``layer`` on the scan's voxels (nearest neighbour; as stored when the
    grids agree; an array is on them already)."""
    import SimpleITK as sitk

    if isinstance(layer, np.ndarray):
        return layer
    if tuple(layer.GetSize()) == tuple(int(n) for n in shape_ijk) and np.allclose(
            image_ijk_to_ras(layer), ijk_to_ras, atol=1e-3):
        return sitk.GetArrayFromImage(layer)
    lps = np.diag([-1.0, -1.0, 1.0])
    axes = lps @ np.asarray(ijk_to_ras, float)[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    reference = sitk.Image([int(n) for n in shape_ijk], sitk.sitkUInt8)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin([float(x) for x in lps @ np.asarray(ijk_to_ras, float)[:3, 3]])
    reference.SetDirection([float(x) for x in (axes / spacing).ravel()])
    return sitk.GetArrayFromImage(sitk.Resample(layer, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def reference_codes(path: Path, meta: dict, ijk_to_ras: np.ndarray, shape_ijk, slice_axis: int = 2
                    ) -> tuple[np.ndarray, dict[int, str]]:
    """``([k, j, i] uint8 codes on the scan's voxels, code -> level)`` of a case's reference file
    (``slice_axis``: the scan's input axis of its sagittal slices, where markup points are drawn)."""
    if path.name.endswith(".mrk.json"):
        points = _markup_points(path)
        layers = [_points_as_disks(points, path, ijk_to_ras, shape_ijk, slice_axis)]
        segments = [(0, n, label) for n, (label, _) in enumerate(points, start=1)]
    elif path.name.endswith(".seg.nrrd"):
        layers, segments = _slicer_segments(path)
    elif path.suffix == ".dcm":
        layers, segments = _dicom_segments(path)
    else:
        layers, segments = _label_map(path, meta.get("labels") or {})
    levels = {}
    for layer, value, name in segments:
        level = level_of_name(name)
        if level is None:
            continue   # a segment of something else (the canal, the sacrum as a whole): not scored
        if level in levels.values():
            raise InputError(f"{path}: two segments or points name {level}")
        levels[(layer, value)] = level
    if not levels:
        raise InputError(f"{path}: no segment or label names a vertebra or disc (names such as L4, L4-L5)")
    on_grid = [_on_grid(layer, ijk_to_ras, shape_ijk) for layer in layers]
    if len(layers) == 1:   # a label map's values must all be named (a typo in case.json would drop a body)
        unnamed = sorted(set(np.unique(on_grid[0]).tolist()) - {value for _, value, _ in segments} - {0})
        if unnamed:
            raise InputError(f"{path}: label values {unnamed} are not named")
    codes = np.zeros(on_grid[0].shape, np.uint8)
    for (layer, value), level in levels.items():
        codes[on_grid[layer] == value] = code_of_level(level)
    if not codes.any():
        raise InputError(f"{path}: none of its vertebrae or discs lies on the scan's voxels "
                         "(is it the reference of another scan?)")
    return codes, {code_of_level(level): level for level in levels.values()}


def load_own_case(case: RealCase) -> tuple[CaseData, CaseGeometry]:
    """The scan and reference of a case of one's own in the canonical frame, and its geometry."""
    from SpineNetLib.inputs.load import load_scan

    scan = load_scan(image_path(case.path), series_uid=case_series(case.path), resample_isotropic=False)
    ijk_to_ras = np.asarray(scan.input_ijk_to_ras, float)
    codes_kji, names = reference_codes(label_file(case.path), _case_json(case.path), ijk_to_ras, scan.input_shape_ijk,
                                       scan.input_slice_axis)
    labels = scan_from_array(codes_kji, ijk_to_ras, resample_isotropic=False).voxels
    data = CaseData(voxels=scan.voxels, labels=np.rint(labels).astype(np.uint8), spacing_mm=tuple(scan.spacing_mm),
                    level_names=names)
    geometry = CaseGeometry(case_id=case.case_id, shape=scan.shape, spacing_mm=tuple(scan.spacing_mm),
                            canonical_to_ras=scan.canonical_to_ras, input_ijk_to_ras=ijk_to_ras,
                            input_shape_ijk=tuple(scan.input_shape_ijk),
                            canonical_to_input_ijk=scan.canonical_to_input_ijk)
    return data, geometry
