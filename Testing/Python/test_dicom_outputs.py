"""DICOM results (`spinenet run --dicom-out`): a Segmentation and a TID 1500 report, read back and
checked against the JSON documents, the source series' geometry and its identifiers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest

from SpineNetLib import pipeline
from SpineNetLib.apps import cli
from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.inputs.writers import write_enhanced_dicom
from SpineNetLib.discs.grading import GRADE_COLUMNS
from SpineNetLib.outputs.dicom_results import (GRADE_CODES, MEASUREMENT_CODES, PROBABILITY_SUFFIX,
                                               dicom_result_files)
from SpineNetLib.outputs.discs import DISC_MEASUREMENTS
from SpineNetLib.outputs.documents import GRADE_HEADS, disc_polygons, vertebrae_document_from_truth
from SpineNetLib.outputs.files import write_results
from SpineNetLib.outputs.segmentation import fill_polygons, filled_segments
from SpineNetLib.synthetic.phantom import make_phantom

from oracles import ground_truth_centroid_ras

IDENTIFIERS = {"PatientID": "SN-0042", "PatientName": "Doe^Jane", "PatientBirthDate": "19700101",
               "PatientSex": "F", "StudyID": "ST7", "AccessionNumber": "ACC123", "StudyDate": "20240102",
               "StudyTime": "101500", "ReferringPhysicianName": "Who^Doctor"}
#: Header content that must not travel into the results (with a private tag added per file).
SECRETS = {"InstitutionName": "Secret Hospital", "PatientComments": "secret comment",
           "StudyDescription": "secret study", "PatientAge": "054Y", "OperatorsName": "Secret^Operator"}
PRIVATE_VALUE = "private secret"
#: SNOMED CT codes of CID 7603 / 7604 (and the parents used where those have none), written out
#: here so that a wrong table in the code cannot agree with itself.
EXPECTED_CODES = {"T11": "12989004", "T12": "23215003", "L1": "66794005", "L2": "14293000", "L3": "36470004",
                  "L4": "11994002", "L5": "49668003", "S1": "54735007", "T11-T12": "1537001",
                  "T12-L1": "76206002", "L1-L2": "80064006", "L2-L3": "67459009", "L3-L4": "62551000",
                  "L4-L5": "84020006", "L5-S1": "715056000"}


def _write_source(phantom, folder: Path) -> list[Path]:
    """The phantom as DICOM with identifiers, secrets and a private tag (file names not in slice order)."""
    paths = phantom.write_dicom(folder, shuffle_files=True, extra_tags={**IDENTIFIERS, **SECRETS})
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.private_block(0x0011, "ACME SPINE", create=True).add_new(0x01, "LO", PRIVATE_VALUE)
        ds.save_as(path)
    return paths


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    """`spinenet run --dicom-out` with the bundled networks on a small lumbar DICOM phantom."""
    root = tmp_path_factory.mktemp("dicom_out")
    phantom = make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.0, 1.0), n_slices=5, seed=7)
    _write_source(phantom, root / "dicom")
    out = root / "out"
    assert cli.main(["run", str(root / "dicom"), "-o", str(out), "--quiet", "--no-preview", "--dicom-out",
                     "--device", "cpu"]) == 0
    return phantom, load_scan(root / "dicom"), out


def _sop_uids_in_slice_order(scan) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in scan.metadata["files_in_slice_order"]]


def test_segmentation_segments_codes_and_masks_match_vertebrae_json(bundled_run):
    phantom, scan, out = bundled_run
    assert json.loads((out / "result.json").read_text())["dicom"] == ["report.dcm", "segmentation.dcm"]
    vertebrae_doc = json.loads((out / "vertebrae.json").read_text())
    seg = hd.seg.segread(out / "segmentation.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"

    discs = disc_polygons(vertebrae_doc)
    names = [v["level"] for v in vertebrae_doc["vertebrae"]] + [d["level"] for d in discs]
    descriptions = [seg.get_segment_description(n) for n in seg.segment_numbers]
    assert [d.segment_label for d in descriptions] == names == list(EXPECTED_CODES)
    assert [d.tracking_id for d in descriptions] == names
    for d in descriptions:
        assert (d.segmented_property_type.scheme_designator, d.segmented_property_type.value) == \
               ("SCT", EXPECTED_CODES[d.segment_label])
        assert d.segmented_property_category.value == "91723000"     # anatomical structure

    # Every segment on every source image (referenced by SOP instance, in slice order) is the
    # filled JSON polygons of the input grid.
    uids = _sop_uids_in_slice_order(scan)
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=list(seg.segment_numbers))
    polygons = [v["polygons"] for v in vertebrae_doc["vertebrae"]] + [d["polygons"] for d in discs]
    for n, polys in enumerate(polygons):
        expected = fill_polygons([p["corners_ras"] for p in polys], scan.input_ijk_to_ras, scan.input_shape_ijk)
        assert expected.any()
        assert np.array_equal(pixels[..., n].astype(bool), expected), names[n]


def test_segmentation_lands_on_a_known_phantom_vertebra_in_patient_coordinates(bundled_run):
    """The true L3 centroid, put into each source image's pixels with its own LPS header geometry,
    lies inside the L3 segment on the image nearest to it, and outside L2 and L4."""
    phantom, scan, out = bundled_run
    seg = hd.seg.segread(out / "segmentation.dcm")
    number = {seg.get_segment_description(n).segment_label: n for n in seg.segment_numbers}
    truth = next(v for v in phantom.vertebrae if v.level == "L3")
    r, a, s = ground_truth_centroid_ras(phantom, truth)
    lps = np.array([-r, -a, s])
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in scan.metadata["files_in_slice_order"]]
    distances = []
    for ds in headers:
        row_dir, col_dir = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        distances.append(abs(float((lps - np.asarray(ds.ImagePositionPatient, float)) @ np.cross(row_dir, col_dir))))
    source = headers[int(np.argmin(distances))]
    assert min(distances) < 0.5 * float(source.SliceThickness)
    offset = lps - np.asarray(source.ImagePositionPatient, float)
    iop = np.asarray(source.ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(x) for x in source.PixelSpacing)
    row, col = int(round(offset @ iop[3:] / row_spacing)), int(round(offset @ iop[:3] / col_spacing))
    frame = seg.get_pixels_by_source_instance([str(source.SOPInstanceUID)],
                                              segment_numbers=[number["L2"], number["L3"], number["L4"]])[0]
    assert frame[row, col].tolist() == [0, 1, 0]


def test_report_groups_match_discs_json(bundled_run):
    _, _, out = bundled_run
    discs_doc = json.loads((out / "discs.json").read_text())
    sr = hd.sr.srread(out / "report.dcm")
    seg = hd.seg.segread(out / "segmentation.dcm")
    labels = {n: seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [d["level"] for d in discs_doc["discs"]]
    assert discs_doc["grading"]["status"] == "done"
    for group, disc in zip(groups, discs_doc["discs"]):
        sites = [(site.value.value, site.value.scheme_designator) for site in group.finding_sites]
        assert sites == [(EXPECTED_CODES[disc["level"]], "SCT")]
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        [number] = group.referenced_segment.referenced_segment_numbers
        assert labels[number] == disc["level"]
        assert group.tracking_uid == seg.get_segment_description(number).tracking_uid
        assert {m.name.scheme_designator for m in group.get_measurements()} == {"99SPINENET"}
        values = {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}
        expected = {MEASUREMENT_CODES[key]: v for key, v in disc["measurements"].items() if v is not None}
        for code, value in expected.items():
            assert values[code][0] == pytest.approx(value)
        assert values["HEIGHT-MEAN"][0] == pytest.approx(disc["measurements"]["disc_height_mean_mm"])
        assert values["HEIGHT-MEAN"][1] == "mm" and values["SEGMENTAL-ANGLE"][1] == "deg"
        assert values["SLIP-PERCENT"][1] == "%" and values["HEIGHT-INDEX"][1] == "1"
        herniation = disc["grades"]["Herniation"]
        assert values["HERNIATION"] == (herniation["value"], "{grade}")
        assert values["HERNIATION-P"][0] == pytest.approx(herniation["probabilities"][herniation["value"]], abs=1e-3)
        assert set(values) == set(expected) | {"HERNIATION", "HERNIATION-P"}
    ds = pydicom.dcmread(out / "report.dcm")
    evidence = {str(i.ReferencedSOPInstanceUID) for study in ds.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert evidence == {str(seg.SOPInstanceUID), *_sop_uids_in_slice_order(bundled_run[1])}


def test_only_patient_and_study_identifiers_are_copied(bundled_run):
    _, scan, out = bundled_run
    source = pydicom.dcmread(scan.metadata["files_in_slice_order"][0])
    for name in ("segmentation.dcm", "report.dcm"):
        raw = (out / name).read_bytes()
        ds = pydicom.dcmread(out / name)
        for keyword, value in IDENTIFIERS.items():
            assert str(ds.get(keyword)) == value, (name, keyword)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
        keywords = {element.keyword for element in ds.iterall()}
        assert not keywords & set(SECRETS), name
        assert not any(element.tag.is_private for element in ds.iterall()), name
        for secret in [*SECRETS.values(), PRIVATE_VALUE, "ACME SPINE"]:
            assert secret.encode() not in raw, (name, secret)


def test_every_grade_and_its_reported_probability_reach_the_report(bundled_run):
    """A 5-class grade (reported class not the most probable) and a missing measurement."""
    _, scan, out = bundled_run
    vertebrae_doc = json.loads((out / "vertebrae.json").read_text())
    discs_doc = copy.deepcopy(json.loads((out / "discs.json").read_text()))
    disc = discs_doc["discs"][2]
    disc["grades"]["Pfirrmann"] = {"value": 3, "probabilities": [0.05, 0.5, 0.3, 0.1, 0.05]}
    discs_doc["grade_columns"]["Pfirrmann"]["classes"] = ["1: a", "2: b", "3: c", "4: d", "5: e"]
    disc["measurements"]["slip_mm"] = None
    files = dicom_result_files(scan, vertebrae_doc, discs_doc)
    sr = hd.sr.srread(pydicom.filebase.DicomBytesIO(files["report.dcm"]))
    group = sr.content.get_volumetric_roi_measurement_groups()[2]
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values["PFIRRMANN"] == 3 and values["PFIRRMANN-P"] == pytest.approx(0.3)
    assert "SLIP-MM" not in values and "HEIGHT-MEAN" in values


def test_levels_that_need_review_are_said_in_the_series_descriptions_and_each_disc(bundled_run):
    """The bundled networks ask for a review of this phantom's levels (the demo's false alarm): a PACS's series
    list says so, and each disc of the report says so (SNOMED CT Yes), with its level in the next best labelling
    (the preview's "or ...") and whether its measurements need checking.  Once a reader corrected the levels,
    neither series says so and each disc says No, with no next best level."""
    from SpineNetLib.outputs.documents import apply_level_correction, next_best_reading
    from SpineNetLib.outputs.vertebrae import next_best_levels

    _, scan, out = bundled_run
    vertebrae_doc = json.loads((out / "vertebrae.json").read_text())
    discs_doc = json.loads((out / "discs.json").read_text())
    assert vertebrae_doc["labelling"]["needs_review"] is True and next_best_reading(vertebrae_doc)
    for name, description in (("segmentation.dcm", "SpineNet vertebrae and discs (LEVELS NEED REVIEW)"),
                              ("report.dcm", "SpineNet disc grades and measurements (LEVELS NEED REVIEW)")):
        assert pydicom.dcmread(out / name).SeriesDescription == description

    def evaluations(report_bytes):
        sr = hd.sr.srread(pydicom.filebase.DicomBytesIO(report_bytes))
        return [{e.name.value: (e.value.value, e.value.scheme_designator) for e in g.get_qualitative_evaluations()}
                for g in sr.content.get_volumetric_roi_measurement_groups()]

    alternative = next_best_levels(vertebrae_doc)
    for disc, found in zip(discs_doc["discs"], evaluations((out / "report.dcm").read_bytes())):
        assert found["LEVELS-REVIEW"] == ("373066001", "SCT")                         # Yes
        other = f"{alternative[disc['upper_vertebra']]}-{alternative[disc['lower_vertebra']]}"
        # a disc below S1 has no code of its own: "Spine" (module docstring of outputs/dicom_results.py)
        assert found["NEXT-BEST-LEVEL"] == ({"S1-S2": "421060004"}.get(other) or EXPECTED_CODES[other], "SCT")
        assert found["CHECK-MEASURES"] == ("373066001" if disc["measurement_warnings"] else "373067005", "SCT")
    # a disc whose measurements carry a warning says Yes
    warned = copy.deepcopy(discs_doc)
    warned["discs"][1]["measurement_warnings"] = ["T12-L1 anterior disc height -0.5 mm is negative: ..."]
    assert evaluations(dicom_result_files(scan, vertebrae_doc, warned)["report.dcm"])[1]["CHECK-MEASURES"][0] == \
        "373066001"
    # corrected (here: confirmed as they are) by a reader
    confirmed, confirmed_discs = apply_level_correction(vertebrae_doc, 2, vertebrae_doc["vertebrae"][2]["level"],
                                                        discs_doc)
    files = dicom_result_files(scan, confirmed, confirmed_discs)
    for name, description in (("segmentation.dcm", "SpineNet vertebrae and discs"),
                              ("report.dcm", "SpineNet disc grades and measurements")):
        assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(files[name])).SeriesDescription == description
    for found in evaluations(files["report.dcm"]):
        assert found["LEVELS-REVIEW"] == ("373067005", "SCT") and "NEXT-BEST-LEVEL" not in found


def test_a_vertebra_outlined_from_a_weaker_detection_says_so_in_its_segment(bundled_run):
    """The Segment Description of a vertebra whose outline a weaker detection drew says it is rough; the other
    segments have none."""
    _, scan, out = bundled_run
    vertebrae_doc = json.loads((out / "vertebrae.json").read_text())
    discs_doc = json.loads((out / "discs.json").read_text())
    assert {v["outline_from"] for v in vertebrae_doc["vertebrae"][:-1]} == {"detector"}
    rough = vertebrae_doc["vertebrae"][3]
    rough["outline_from"] = "weaker detection"
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicom_result_files(scan, vertebrae_doc, discs_doc)
                                                        ["segmentation.dcm"]))
    described = {item.SegmentLabel: item.get("SegmentDescription") for item in seg.SegmentSequence}
    assert described.pop(rough["level"]).startswith("outline from a weaker detection: rough")
    assert set(described.values()) == {None}


def test_every_grade_and_measurement_has_a_short_unique_code():
    """Plain DICOM code values (SH, at most 16 characters), one per discs.json grade and measurement."""
    for head in [*GRADE_COLUMNS, *(c.official_name for c in GRADE_COLUMNS.values()), *GRADE_HEADS]:
        assert len(GRADE_CODES[head] + PROBABILITY_SUFFIX) <= 16
    measurement_keys = [key for key, _, _ in DISC_MEASUREMENTS.values()]
    assert sorted(MEASUREMENT_CODES) == sorted(measurement_keys)
    assert all(len(code) <= 16 for code in MEASUREMENT_CODES.values())
    grade_codes = set(GRADE_CODES.values())
    assert len(grade_codes) == len(GRADE_COLUMNS)
    all_codes = [*grade_codes, *(c + PROBABILITY_SUFFIX for c in grade_codes), *MEASUREMENT_CODES.values()]
    assert len(set(all_codes)) == len(all_codes)


def test_enhanced_multiframe_source_with_shuffled_frames(tmp_path):
    """One Enhanced MR file: each segment frame references the source frame it lies on."""
    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=4, seed=5)
    write_enhanced_dicom(phantom.voxels_kji, phantom.ijk_to_ras, tmp_path / "mf" / "enhanced.dcm",
                         shuffle_frames=True, seed=2)
    scan = load_scan(tmp_path / "mf")
    frames = scan.metadata["frames_in_slice_order"]
    assert frames != sorted(frames)
    vertebrae_doc = vertebrae_document_from_truth(scan, [v for v in phantom.vertebrae if not v.extra])
    files = dicom_result_files(scan, vertebrae_doc, None)
    seg = hd.seg.segread(pydicom.filebase.DicomBytesIO(files["segmentation.dcm"]))
    source_uid = str(pydicom.dcmread(tmp_path / "mf" / "enhanced.dcm", stop_before_pixels=True).SOPInstanceUID)
    pixels = seg.get_pixels_by_source_frame(source_uid, [f + 1 for f in frames],
                                            segment_numbers=list(seg.segment_numbers))
    first = vertebrae_doc["vertebrae"][0]
    expected = fill_polygons([p["corners_ras"] for p in first["polygons"]], scan.input_ijk_to_ras,
                             scan.input_shape_ijk)
    assert expected.any() and np.array_equal(pixels[..., 0].astype(bool), expected)
    assert "report.dcm" not in files     # no discs document: nothing to report
    # Written as a set: an earlier run's report would not match this segmentation, so it goes.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.dcm").write_bytes(b"an earlier run's report")
    result = SimpleNamespace(vertebrae_document=vertebrae_doc, discs_document=None, hotspots=[])
    write_results(tmp_path / "out", result, scan=scan, preview=False, dicom=True)
    assert json.loads((tmp_path / "out" / "result.json").read_text())["dicom"] == ["segmentation.dcm"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.dcm")) == ["segmentation.dcm"]


@pytest.mark.parametrize("overlapping", [False, True])
def test_every_segment_lands_on_its_frames_whether_or_not_outlines_overlap(tmp_path, overlapping):
    """Segments that share no voxel go to highdicom as one array of segment numbers, segments of outlines that
    overlap as one plane each (a voxel cannot hold two numbers): either way every segment of the Segmentation
    is its filled polygons on the source frames it lies on, here a multi-frame file with shuffled frames."""
    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=4, seed=5)
    write_enhanced_dicom(phantom.voxels_kji, phantom.ijk_to_ras, tmp_path / "mf" / "enhanced.dcm",
                         shuffle_frames=True, seed=2)
    scan = load_scan(tmp_path / "mf")
    frames = scan.metadata["frames_in_slice_order"]
    vertebrae_doc = vertebrae_document_from_truth(scan, [v for v in phantom.vertebrae if not v.extra])
    if overlapping:   # the second body's outline drawn over the first's lower half
        first, second = vertebrae_doc["vertebrae"][:2]
        for upper, lower in zip(first["polygons"], second["polygons"]):
            corners = np.asarray(upper["corners_ras"], float)
            lower["corners_ras"] = (corners + 0.5 * (corners[[1, 1, 2, 2]] - corners[[0, 0, 3, 3]])).tolist()
    files = dicom_result_files(scan, vertebrae_doc, None)
    seg = hd.seg.segread(pydicom.filebase.DicomBytesIO(files["segmentation.dcm"]))
    source_uid = str(pydicom.dcmread(tmp_path / "mf" / "enhanced.dcm", stop_before_pixels=True).SOPInstanceUID)
    pixels = seg.get_pixels_by_source_frame(source_uid, [f + 1 for f in frames],
                                            segment_numbers=list(seg.segment_numbers))
    masks = [s.mask for s in filled_segments(vertebrae_doc, scan.input_ijk_to_ras, scan.input_shape_ijk)
             if s.mask.any()]                         # the vertebrae, then the discs
    assert (masks[0] & masks[1]).any() == overlapping
    assert pixels.shape[-1] == len(masks) == len(vertebrae_doc["vertebrae"]) * 2 - 1
    for n, mask in enumerate(masks):
        assert np.array_equal(pixels[..., n].astype(bool), mask), n


def test_dicom_out_on_a_nifti_is_refused_before_the_inference(tmp_path, monkeypatch, capsys):
    phantom = make_phantom(fov="lumbar", shape=(96, 96), pixel_spacing=(2.0, 2.0), n_slices=4)
    nifti = phantom.write_nifti(tmp_path / "scan.nii.gz")

    def no_networks(*args, **kwargs):
        raise AssertionError("the networks were loaded")

    monkeypatch.setattr(pipeline, "load_networks", no_networks)
    assert cli.main(["run", str(nifti), "-o", str(tmp_path / "out"), "--dicom-out", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spinenet: error: DICOM results need a DICOM input") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_dicom_out_refuses_spacing_overrides_and_a_missing_scan(tmp_path, capsys):
    phantom = make_phantom(fov="lumbar", shape=(96, 96), pixel_spacing=(2.0, 2.0), n_slices=4)
    phantom.write_dicom(tmp_path / "dicom")
    assert cli.main(["run", str(tmp_path / "dicom"), "-o", str(tmp_path / "out"), "--dicom-out",
                     "--pixel-spacing", "2", "2", "--quiet"]) == 2
    assert "--pixel-spacing" in capsys.readouterr().err
    result = SimpleNamespace(vertebrae_document={"schema": "spinenet.vertebrae/1", "vertebrae": []},
                             discs_document=None, hotspots=[])
    with pytest.raises(InputError, match="need the scan"):
        write_results(tmp_path / "w", result, dicom=True)
    assert not (tmp_path / "w").exists()


def test_the_segmentation_is_a_reference_spinenet_evaluate_reads(bundled_run, tmp_path):
    """The Segmentation a PACS receives, corrected there or not, is a reference for `spinenet evaluate`
    (README, "Measuring on your own scans"): against its own run every body is found and named as the
    run named it, each segment read back onto the scan's voxels in the right place."""
    import json
    import shutil

    from SpineNetLib.evaluation.evaluate import evaluate_directories

    phantom, scan, out = bundled_run
    case = tmp_path / "pacs" / "study_1"
    shutil.copytree(out.parent / "dicom", case / "image")
    shutil.copy(out / "segmentation.dcm", case / "labels.dcm")
    shutil.copytree(out, tmp_path / "pred" / "study_1")
    levels = [v["level"] for v in json.loads((out / "vertebrae.json").read_text())["vertebrae"]]
    scored = evaluate_directories(tmp_path / "pacs", tmp_path / "pred")["cases"]["study_1"]
    assert scored["n_gt"] >= len(levels) - 2 >= 4      # bodies cut by the image edge are not scored
    assert (scored["tp"], scored["fp"], scored["fn"], scored["identification_rate"]) == (scored["n_gt"], 0, 0, 1.0)
    assert scored["localisation_error_mm_mean"] < 1.0
