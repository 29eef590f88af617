"""DICOM results of a run on a DICOM series, for a PACS: a Segmentation and a measurement report.

:func:`dicom_result_files` makes two DICOM objects with highdicom, from the result documents and
the headers of the source series (read again without their pixel data):

* ``segmentation.dcm`` (:data:`SEGMENTATION_FILE`), a DICOM Segmentation (binary) on the source
  series' own frames: one segment per vertebra, top to bottom, then one per disc, filled from the
  ``vertebrae.json`` polygons exactly as the Slicer segmentation is
  (:func:`SpineNetLib.outputs.segmentation.filled_segments`).  Frame ``k`` of a segment lies pixel
  for pixel on the ``k``-th image of ``Scan.metadata["files_in_slice_order"]`` (``k`` is the input
  grid's slice index, rows and columns are the image's) and references it; the frame geometry is
  copied from the source images, so no LPS/RAS conversion happens here (the loader's IJK-to-RAS
  already turned the source's LPS into RAS, docs/CONVENTIONS.md).  Written when at least one
  vertebra is filled.  The masks are made one at a time and kept as their voxels' indices, then
  handed to highdicom as one array of segment numbers (one plane per segment where outlines
  overlap: :func:`_segment_pixels`).  A vertebra whose outline a weaker detection drew
  (``outline_from``) has the Segment Description :data:`ROUGHER_SEGMENT_DESCRIPTION`.
* ``report.dcm`` (:data:`REPORT_FILE`), a Comprehensive 3D SR holding a TID 1500 Imaging
  Measurement Report: one measurement group per disc of ``discs.json``, tracking identifier =
  the disc level (the same tracking UID as its segment), finding site = the disc's code, the
  segment it refers to, and as numeric measurements each grade (unit ``{grade}``), the
  probability of the reported class (unit ``1``) and the disc measurements (``mm``, ``deg``,
  ``%``, ``1``).  Missing values (``null`` in ``discs.json``) are left out.  Each group also has
  qualitative evaluations (:data:`LEVELS_REVIEW_CODE`, ...): whether the levels need review (SNOMED CT
  Yes / No), where they do the disc's level in the next best labelling (its disc code; the preview's
  "or L3-L4"), and whether its measurements need checking (``measurement_warnings``).  The report lists
  the source images and the segmentation as its evidence.  Written when ``discs.json`` has at
  least one disc (TID 1500 needs one measurement group).

Where the levels need review, both series' descriptions end in :data:`LEVELS_REVIEW_NOTE`, so that a
PACS's list of series says so before either is opened.

Codes (:func:`anatomy_code`).  Segments and finding sites use SNOMED CT codes of the DICOM
context groups CID 7603 "Vertebra" and CID 7604 "Intervertebral Disc", as pydicom names them
(``codes.SCT.L4Vertebra`` = 11994002, ``codes.SCT.L4L5Disc`` = 84020006, ...), which cover every
vertebra C2-L5 and every disc C2-C3 to L5-S1.  Where the groups have no code of their own the
closest parent is used and the level stays in the segment label and tracking identifier: S1 and
S2 (the first sacral segments) are "Sacrum" (54735007); an unlabelled vertebra ("V3") is
"Vertebra" (51282000); a disc below S1 or next to an unlabelled vertebra is "Spine" (421060004,
the vertebral column: SNOMED CT's generic intervertebral disc concept is not in DICOM's
dictionaries).  Grades and measurements have no standard codes: they use the private coding
scheme :data:`CODING_SCHEME` ("99" marks a private scheme; the report declares it), with the
code values of :data:`GRADE_CODES` (a grade; its reported class's probability adds "-P":
``HERNIATION``, ``HERNIATION-P``) and :data:`MEASUREMENT_CODES` (``HEIGHT-MEAN`` for
``disc_height_mean_mm``, ...), short enough for a plain DICOM code value (16 characters), and
code meanings that name the ``discs.json`` key.  A grade or measurement without a code here (a
plug-in pipeline's) is left out.

Privacy.  Only the patient and study identifiers of :data:`COPIED_IDENTIFIERS` are copied from
the source (and the character set); everything else is new (series and instance UIDs, series
numbers :data:`SEGMENTATION_SERIES_NUMBER`, :data:`REPORT_SERIES_NUMBER`).  highdicom copies
whole header modules (and the scanner's institution as contributing equipment) from the images
it is given, so it is given reduced copies of the source headers that hold only those
identifiers and the geometry and UIDs it needs.  Both objects are marked research content
(ContentQualification RESEARCH), the report unverified and preliminary.

highdicom is imported only when DICOM results are made, so the rest of SpineNetLib (and the
Slicer module) does not need it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVELS_TOP_DOWN, disc_name
from SpineNetLib.outputs.discs import DISC_MEASUREMENTS
from SpineNetLib.outputs.documents import measurement_unit, reported_probability, rough_outline, vertebra_name
from SpineNetLib.outputs.vertebrae import next_best_levels
from SpineNetLib.outputs.segmentation import filled_segments

if TYPE_CHECKING:  # annotations only
    from SpineNetLib.core.scan import Scan

SEGMENTATION_FILE = "segmentation.dcm"
REPORT_FILE = "report.dcm"
#: Every file :func:`dicom_result_files` may make.
DICOM_FILES = (SEGMENTATION_FILE, REPORT_FILE)
SEGMENTATION_SERIES_NUMBER = 9901
REPORT_SERIES_NUMBER = 9902
#: Private coding scheme of the grade and measurement names (:data:`GRADE_CODES`, :data:`MEASUREMENT_CODES`).
CODING_SCHEME = "99SPINENET"
MANUFACTURER = "SpineNet for 3D Slicer"

#: The only attributes copied from the source series: who the patient is and which study this is.
COPIED_IDENTIFIERS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                      "StudyID", "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName")
#: What highdicom needs of each source image to place and reference the frames; nothing identifying.
_IMAGE_ATTRIBUTES = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID",
                     "FrameOfReferenceUID", "Modality", "Rows", "Columns", "NumberOfFrames",
                     "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                     "SpacingBetweenSlices")
#: Of the functional groups of an enhanced (multi-frame) image, only the geometry is kept.
_GEOMETRY_GROUPS = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")

#: Code value of each grade, under its discs.json name and its official one (documents.GRADE_HEADS).
GRADE_CODES = {"Pfirrmann": "PFIRRMANN", "DiscNarrowing": "NARROWING", "Narrowing": "NARROWING",
               "CentralCanalStenosis": "CANALSTENOSIS", "Spondylolisthesis": "LISTHESIS",
               "UpperEndplateDefect": "UPPERENDPLATE", "LowerEndplateDefect": "LOWERENDPLATE",
               "UpperMarrowChange": "UPPERMARROW", "UpperMarrow": "UPPERMARROW",
               "LowerMarrowChange": "LOWERMARROW", "LowerMarrow": "LOWERMARROW",
               "ForaminalStenosisLeft": "FORAMINALLEFT", "ForaminalStenosisRight": "FORAMINALRIGHT",
               "Herniation": "HERNIATION"}
#: Code value of each disc measurement (discs.json key).
MEASUREMENT_CODES = {"disc_height_anterior_mm": "HEIGHT-ANT", "disc_height_middle_mm": "HEIGHT-MID",
                     "disc_height_posterior_mm": "HEIGHT-POST", "disc_height_mean_mm": "HEIGHT-MEAN",
                     "disc_height_index": "HEIGHT-INDEX", "farfan_index": "FARFAN-INDEX", "slip_mm": "SLIP-MM",
                     "slip_percent": "SLIP-PERCENT", "meyerding_grade": "MEYERDING",
                     "segmental_angle_deg": "SEGMENTAL-ANGLE", "disc_angle_deg": "DISC-ANGLE",
                     "disc_signal_ratio": "SIGNAL-RATIO"}
#: Suffix of the code value of a grade's reported-class probability.
PROBABILITY_SUFFIX = "-P"
#: Code values of each disc's qualitative evaluations (private scheme): whether the levels need review
#: (``vertebrae.json`` ``labelling.needs_review``; SNOMED CT Yes / No), where they do the disc's level in the
#: next best labelling (:func:`SpineNetLib.outputs.vertebrae.next_best_levels`; the disc's anatomy code), and
#: whether its measurements need checking (``discs.json`` ``measurement_warnings``; Yes where it has any).
LEVELS_REVIEW_CODE, NEXT_BEST_CODE, MEASUREMENTS_CHECK_CODE = "LEVELS-REVIEW", "NEXT-BEST-LEVEL", "CHECK-MEASURES"
#: Added to both series' descriptions where the levels need review, so that a PACS's series list shows it.
LEVELS_REVIEW_NOTE = " (LEVELS NEED REVIEW)"
#: The Segment Description of a vertebra whose outline a weaker detection drew (``outline_from``).
ROUGHER_SEGMENT_DESCRIPTION = "outline from a weaker detection: rough, check it before using its measurements"
#: Meaning of each disc measurement code: the discs.csv header without its unit, and the key.
_MEASUREMENT_MEANINGS = {key: f"{header.split(' (')[0]} ({key})" for key, header, _ in DISC_MEASUREMENTS.values()}
_UCUM_MEANINGS = {"mm": "millimeter", "deg": "degree", "%": "percent", "1": "no units", "{grade}": "grade"}


# --------------------------------------------------------------------------- checks and sources

def check_dicom_source(scan: Scan) -> None:
    """Raise :class:`InputError` (one line) unless DICOM results can be made for ``scan``.

    The scan must come from a DICOM series (``spinenet run`` checks this before the inference),
    read with its own geometry (no --pixel-spacing or --slice-spacing override: the Segmentation
    takes its geometry from the source's tags), from single-frame files or one multi-frame file.
    """
    meta = scan.metadata
    if meta.get("format") != "DICOM" or not meta.get("files_in_slice_order"):
        raise InputError(f"DICOM results need a DICOM input; {meta.get('path') or meta.get('source') or 'this input'}"
                         f" is {meta.get('format') or 'not DICOM'}")
    if meta.get("overrides"):
        raise InputError("DICOM results take their geometry from the series' own tags and cannot be combined "
                         "with --pixel-spacing or --slice-spacing")
    if meta.get("slice_order") != "ImagePositionPatient":
        raise InputError("DICOM results need ImagePositionPatient on every image of the series")
    files = meta["files_in_slice_order"]
    frames = meta.get("frames_in_slice_order") or [None] * len(files)
    if any(f is not None for f in frames) and len(set(files)) != 1:
        raise InputError("DICOM results are made for a series of single-frame images or one multi-frame "
                         "image, not for a series split over several multi-frame files")
    _source_headers(scan)  # their UIDs and numbers, now rather than after the inference


def _reduced_header(ds):
    """A copy of a source header with only the identifiers and what locates its frames."""
    import pydicom

    out = pydicom.Dataset()
    out.file_meta = pydicom.dataset.FileMetaDataset()
    out.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    for keyword in (*_IMAGE_ATTRIBUTES, *COPIED_IDENTIFIERS):
        if keyword in ds:
            out[keyword] = ds[keyword]
        elif keyword in COPIED_IDENTIFIERS:
            setattr(out, keyword, None)     # type 2 in the new objects: present, empty
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if keyword in ds:
            items = []
            for group in ds[keyword].value:
                item = pydicom.Dataset()
                for name in _GEOMETRY_GROUPS:
                    if name in group:
                        item[name] = group[name]
                items.append(item)
            setattr(out, keyword, items)
    return out


#: UIDs the DICOM results reference in every source image: each must be one valid UID.
_SOURCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")


def _usable_source(name: str, ds):
    """A reduced header fit for highdicom: every UID it references is one valid UID (else
    :class:`InputError` naming the file and tag); an optional number that is not one positive value
    (SliceThickness, SpacingBetweenSlices, NumberOfFrames, which the loader read as 1) is dropped."""
    from pydicom.multival import MultiValue
    from pydicom.uid import UID

    for keyword in _SOURCE_UIDS:
        value = ds.get(keyword)
        if value is None or isinstance(value, MultiValue) or not UID(str(value)).is_valid:
            text = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value or "(none)")
            raise InputError(f"DICOM results need valid UIDs in the source images: {name} has {keyword} "
                             f"{text[:64]!r}")
    for keyword in ("SliceThickness", "SpacingBetweenSlices", "NumberOfFrames"):
        value = ds.get(keyword)
        try:
            usable = not isinstance(value, MultiValue) and 0 < float(value) < float("inf")
        except (TypeError, ValueError):
            usable = False
        if keyword in ds and not usable:
            del ds[keyword]
    for keyword in COPIED_IDENTIFIERS:
        problem = _identifier_problem(keyword, ds.get(keyword))
        if problem:
            raise InputError(f"DICOM results copy {keyword} from the source images, and {name} has {problem}: "
                             "fix the series or run without --dicom-out")
    return ds


def _identifier_problem(keyword: str, value) -> str | None:
    """What highdicom would refuse in a copied identifier (several values, a malformed date or time, a
    sex other than M, F or O), or None."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DA, TM

    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        return "several values in it ('" + chr(92).join(map(str, value))[:40] + "')"
    try:
        if keyword in ("PatientBirthDate", "StudyDate"):
            DA(str(value))
        elif keyword == "StudyTime":
            TM(str(value))
    except ValueError:
        return f"a malformed one ({str(value)[:40]!r})"
    if keyword == "PatientSex" and str(value) not in ("M", "F", "O"):
        return f"a value that is not M, F or O ({str(value)[:40]!r})"
    return None


def _source_headers(scan: Scan) -> list:
    """Reduced headers of the source images, one per file in slice order (pixel data not read)."""
    import pydicom

    paths = list(dict.fromkeys(scan.metadata["files_in_slice_order"]))
    headers = []
    for path in paths:
        try:
            header = _reduced_header(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # unreadable, or a value pydicom cannot convert (e.g. a wrong length)
            raise InputError(f"cannot read the source image {Path(path).name} again for the DICOM results: "
                             f"{' '.join(str(exc).split())}") from None
        headers.append(_usable_source(Path(path).name, header))
    return headers


# --------------------------------------------------------------------------- codes

def anatomy_code(name: str, kind: str):
    """SNOMED CT code (a pydicom ``Code``) of a vertebra ("L4") or disc ("L4-L5") (module docstring)."""
    from pydicom.sr.codedict import codes

    if kind == "vertebra":
        if name in LEVELS_TOP_DOWN and name != "S1":
            return getattr(codes.SCT, f"{name}Vertebra")
        return codes.SCT.Sacrum if name in ("S1", "S2") else codes.SCT.Vertebra
    upper, _, lower = name.partition("-")
    keyword = f"{upper}{lower}Disc"
    if upper in LEVELS_TOP_DOWN and keyword in dir(codes.SCT):
        return getattr(codes.SCT, keyword)
    return codes.SCT.Spine


def _private_code(value: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value, CODING_SCHEME, meaning[:64])


def _ucum(unit: str):
    import highdicom as hd

    return hd.sr.CodedConcept(unit, "UCUM", _UCUM_MEANINGS.get(unit, unit))


def _software_version() -> str:
    try:
        return version("spinenet-slicer")
    except PackageNotFoundError:
        return "source tree"


# --------------------------------------------------------------------------- the segmentation

@dataclass(frozen=True)
class _SegmentVoxels:
    """A filled segment (``outputs/segmentation.FilledSegment``) kept as the flat indices of its voxels in the
    ``[k, j, i]`` input grid: a whole-grid mask per segment holds 41 MB each on a 761 x 761 x 71 series, the
    voxels of a body a few MB."""

    name: str
    kind: str
    indices: np.ndarray


def _segmentation(scan: Scan, sources: list, segments: list[_SegmentVoxels], tracking_uids: dict, note: str,
                  rougher: set[str]):
    """The highdicom Segmentation of the non-empty ``segments`` on the source frames (``note`` ends its
    series description; the segments named in ``rougher`` say :data:`ROUGHER_SEGMENT_DESCRIPTION`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="SpineNet", family=codes.DCM.ArtificialIntelligence,
                                                   version=_software_version())
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=s.name,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=anatomy_code(s.name, s.kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=tracking_uids[s.name], tracking_id=s.name)
        for number, s in enumerate(segments, start=1)]
    for description, s in zip(descriptions, segments):
        if s.kind == "vertebra" and s.name in rougher:
            description.SegmentDescription = ROUGHER_SEGMENT_DESCRIPTION   # (0062,0006), optional
    grid = tuple(int(n) for n in reversed(scan.input_shape_ijk))     # [k, j, i]
    frames = scan.metadata.get("frames_in_slice_order") or [None] * grid[0]
    # pixel[f] is frame f of the source: image f of the series, or frame f of the one multi-frame file
    order = np.arange(grid[0]) if frames[0] is None else np.asarray(frames, int)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=_segment_pixels(segments, grid, order),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=SEGMENTATION_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="SpineNet", software_versions=_software_version(),
        device_serial_number="none", content_label="SPINENET", series_description="SpineNet vertebrae and discs" + note,
        content_description="vertebrae and intervertebral discs found by SpineNet",
        content_qualification="RESEARCH")


def _segment_pixels(segments: list[_SegmentVoxels], grid: tuple[int, int, int], order: np.ndarray) -> np.ndarray:
    """The segments of the ``[k, j, i]`` input ``grid`` on the source frames (``order``: the frame of each slice)
    as highdicom takes them: one array of segment numbers (0 where none), or, where two segments share a voxel
    (outlines that overlap), one plane per segment. highdicom writes the same binary frames from either; the
    array of numbers is the size of one mask instead of one per segment (a 761 x 761 x 71 series with 15
    segments: 41 MB instead of 617 MB; benchmarks/bench_dicom_results.py)."""
    by_slice = np.zeros(grid, np.uint8 if len(segments) < 256 else np.uint16)
    flat = by_slice.reshape(-1)
    for number, s in enumerate(segments, start=1):
        if flat[s.indices].any():   # overlapping outlines: one plane per segment
            planes = np.zeros((*by_slice.shape, len(segments)), np.uint8)
            for n, each in enumerate(segments):
                mask = np.zeros(by_slice.shape, np.uint8)
                mask.reshape(-1)[each.indices] = 1
                planes[order, :, :, n] = mask
            return planes
        flat[s.indices] = number
    numbers = np.empty_like(by_slice)
    numbers[order] = by_slice
    return numbers


# --------------------------------------------------------------------------- the report

def _disc_measurements(disc: dict, discs_doc: dict) -> list:
    """highdicom Measurements of one ``discs.json`` disc: grades, reported probabilities, measurements."""
    import highdicom as hd

    out = []
    columns = discs_doc.get("grade_columns") or {}
    for head, entry in (disc.get("grades") or {}).items():
        if head not in GRADE_CODES or not isinstance(entry, dict) or entry.get("value") is None:
            continue
        out.append(hd.sr.Measurement(name=_private_code(GRADE_CODES[head], f"{head} grade"),
                                     value=float(entry["value"]), unit=_ucum("{grade}")))
        probability = reported_probability(entry, (columns.get(head) or {}).get("classes"))
        if probability is not None:
            name = _private_code(GRADE_CODES[head] + PROBABILITY_SUFFIX, f"{head} probability")
            out.append(hd.sr.Measurement(name=name, value=float(probability), unit=_ucum("1")))
    for key, value in (disc.get("measurements") or {}).items():
        if key not in MEASUREMENT_CODES or value is None or isinstance(value, bool):
            continue
        unit = "{grade}" if key == "meyerding_grade" else (measurement_unit(key) or "1")
        out.append(hd.sr.Measurement(name=_private_code(MEASUREMENT_CODES[key], _MEASUREMENT_MEANINGS.get(key, key)),
                                     value=float(value), unit=_ucum(unit)))
    return out


def levels_need_review(vertebrae_doc: dict) -> bool | None:
    """``vertebrae.json``'s ``labelling.needs_review`` (False once a reader corrected the levels); None where the
    document does not say (no labelling confidence was scored)."""
    review = (vertebrae_doc.get("labelling") or {}).get("needs_review")
    return review if isinstance(review, bool) else None


def _disc_evaluations(disc: dict, review: bool | None, next_best: list[str] | None) -> list:
    """The qualitative evaluations of one disc (:data:`LEVELS_REVIEW_CODE` and the others): ``review`` is the
    labelling's ``needs_review`` (None: the document does not say), ``next_best`` the next best labelling's
    level of each vertebra (:func:`~SpineNetLib.outputs.vertebrae.next_best_levels`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    yes_no = {True: codes.SCT.Yes, False: codes.SCT.No}
    out = []
    if review is not None:
        out.append(hd.sr.QualitativeEvaluation(_private_code(LEVELS_REVIEW_CODE, "Levels need review"),
                                               yes_no[review]))
    upper, lower = disc.get("upper_vertebra"), disc.get("lower_vertebra")
    if next_best and all(isinstance(k, int) and 0 <= k < len(next_best) for k in (upper, lower)) \
            and next_best[upper] and next_best[lower]:
        other = disc_name(next_best[upper], next_best[lower])
        if other != disc["level"]:
            out.append(hd.sr.QualitativeEvaluation(
                _private_code(NEXT_BEST_CODE, "Disc level in the next best labelling"), anatomy_code(other, "disc")))
    out.append(hd.sr.QualitativeEvaluation(_private_code(MEASUREMENTS_CHECK_CODE, "Measurements need checking"),
                                           yes_no[bool(disc.get("measurement_warnings"))]))
    return out


def _disc_group(disc: dict, discs_doc: dict, seg, segment_numbers: dict, tracking_uids: dict, evaluations: list):
    """The TID 1411 group of a disc with a segment (TID 1501 without one), with its qualitative ``evaluations``."""
    import highdicom as hd

    level = disc["level"]
    grading = discs_doc.get("grading") or {}
    algorithm = hd.sr.AlgorithmIdentification(
        name="SpineNet", version=_software_version(),
        parameters=[f"grading weights: {grading.get('weights') or 'none'}", f"grading: {grading.get('status')}"])
    common = dict(tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uids.get(level) or hd.UID(),
                                                               identifier=level),
                  finding_sites=[hd.sr.FindingSite(anatomy_code(level, "disc"))], algorithm_id=algorithm,
                  measurements=_disc_measurements(disc, discs_doc) or None, qualitative_evaluations=evaluations or None)
    if seg is not None and level in segment_numbers:
        segment = hd.sr.ReferencedSegment.from_segmentation(seg, segment_numbers[level])
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment, **common)
    return hd.sr.MeasurementsAndQualitativeEvaluations(**common)


def _report(sources: list, discs_doc: dict, seg, segment_numbers: dict, tracking_uids: dict, vertebrae_doc: dict,
            note: str):
    """The Comprehensive 3D SR with the TID 1500 measurement report of the discs (``note`` ends its series
    description)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=pydicom.uid.generate_uid(entropy_srcs=[MANUFACTURER]), name="SpineNet", manufacturer_name=MANUFACTURER,
        model_name="SpineNet")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    review, next_best = levels_need_review(vertebrae_doc), next_best_levels(vertebrae_doc)
    groups = [_disc_group(d, discs_doc, seg, segment_numbers, tracking_uids, _disc_evaluations(d, review, next_best))
              for d in discs_doc["discs"]]
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.ImagingProcedure,
                                     imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    scheme = hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=CODING_SCHEME, name="SpineNet result keys (discs.json)",
        responsible_organization=MANUFACTURER)
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, *([seg] if seg is not None else [])], content=report[0],
        series_instance_uid=hd.UID(), series_number=REPORT_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="SpineNet disc grades and measurements" + note, coding_schemes=[scheme],
        content_qualification="RESEARCH")


# --------------------------------------------------------------------------- files

def _dataset_bytes(ds) -> bytes:
    import pydicom

    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    except TypeError:  # pragma: no cover - pydicom 2.x (with an older highdicom)
        pydicom.dcmwrite(buffer, ds, write_like_original=False)
    return buffer.getvalue()


def dicom_result_files(scan: Scan, vertebrae_doc: dict, discs_doc: dict | None) -> dict[str, bytes]:
    """``{file name: bytes}`` of the DICOM results (module docstring) of a run on ``scan``.

    ``scan`` is the :class:`Scan` the run worked on (:func:`check_dicom_source` must accept it);
    the documents are the run's ``vertebrae.json`` and ``discs.json``.  ``segmentation.dcm`` is
    missing when no vertebra could be filled, ``report.dcm`` when there is no disc.
    """
    check_dicom_source(scan)
    try:
        import highdicom as hd
    except ImportError:
        raise InputError("DICOM results need the highdicom package: pip install highdicom") from None

    sources = _source_headers(scan)
    segments = [_SegmentVoxels(s.name, s.kind, np.flatnonzero(s.mask))
                for s in filled_segments(vertebrae_doc, scan.input_ijk_to_ras, scan.input_shape_ijk) if s.mask.any()]
    tracking_uids = {s.name: hd.UID() for s in segments}
    segment_numbers = {s.name: n for n, s in enumerate(segments, start=1) if s.kind == "disc"}
    with warnings.catch_warnings():
        # highdicom's advice on how the source spells the patient's name: not ours to act on
        warnings.filterwarnings("ignore", message=".*intended person name.*", category=UserWarning)
        note = LEVELS_REVIEW_NOTE if levels_need_review(vertebrae_doc) else ""
        rougher = {vertebra_name(v, k) for k, v in enumerate(vertebrae_doc["vertebrae"]) if rough_outline(v)}
        seg = _segmentation(scan, sources, segments, tracking_uids, note, rougher) if segments else None
        report = (_report(sources, discs_doc, seg, segment_numbers, tracking_uids, vertebrae_doc, note)
                  if discs_doc is not None and discs_doc["discs"] else None)
    made = {SEGMENTATION_FILE: seg, REPORT_FILE: report}
    return {name: _dataset_bytes(ds) for name, ds in made.items() if ds is not None}
