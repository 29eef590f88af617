"""SpineNetLib.slicer.mrml and SpineNetLib.outputs.documents on phantom ground truth, under slicer-core (no Slicer app, no weights).

The results documents are built from the phantom's exact quads
(documents.vertebrae_document_from_truth), so everything downstream of the
networks is checked: node classes, names and counts, markup positions,
segment voxels (against an independent half-plane fill), the grades table,
replacing earlier results, .mrb round trips and level corrections.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
from vtk.util import numpy_support  # noqa: E402

from SpineNetLib.outputs import documents
from SpineNetLib.slicer import mrml  # noqa: E402
from SpineNetLib.core.errors import InputError  # noqa: E402
from SpineNetLib.core.levels import LEVELS  # noqa: E402
from SpineNetLib.discs.hotspots import HotspotMap  # noqa: E402
from SpineNetLib.outputs.files import write_results  # noqa: E402
from SpineNetLib.outputs import segmentation  # noqa: E402
from SpineNetLib.pipeline import RunResult  # noqa: E402
from SpineNetLib.synthetic.phantom import make_phantom  # noqa: E402

from batch_script import batch_script  # noqa: E402

LEVELS_PHANTOM = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]


@pytest.fixture(scope="module", params=["dicom", "ras"])
def case(request):
    """A tilted lumbar phantom in two input layouts (slices along k; along i and reversed)."""
    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.9, 1.9), n_slices=7,
                           rotation_deg=8.0, orientation=request.param,
                           reverse_slices=request.param == "ras", texture=0.0, noise=0.0)
    doc = documents.vertebrae_document_from_truth(phantom.scan, phantom.vertebrae)
    return phantom, doc


def _scene_with_volume(phantom, name="phantom"):
    scene = mrml.new_scene()
    volume = mrml.add_volume(scene, phantom.voxels_kji, phantom.ijk_to_ras, name)
    return scene, volume


def _points(node):
    out = []
    for n in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(n, p)
        out.append(p)
    return np.array(out)


def _independent_mask(polygons_ras, ijk_to_ras, dims_ijk, slice_axis):
    """[k, j, i] mask: voxel centres inside or on every convex quad (half-plane tests)."""
    ni, nj, nk = dims_ijk
    mask = np.zeros((nk, nj, ni), bool)
    inverse = np.linalg.inv(ijk_to_ras)
    a_axis, b_axis = [ax for ax in range(3) if ax != slice_axis]
    dims = (ni, nj, nk)
    grid_a, grid_b = np.meshgrid(np.arange(dims[a_axis]), np.arange(dims[b_axis]), indexing="ij")
    for corners in polygons_ras:
        ijk = (np.c_[np.asarray(corners), np.ones(4)] @ inverse.T)[:, :3]
        index = int(round(float(ijk[:, slice_axis].mean())))
        quad = ijk[:, [a_axis, b_axis]]
        area2 = sum(quad[n, 0] * quad[(n + 1) % 4, 1] - quad[(n + 1) % 4, 0] * quad[n, 1] for n in range(4))
        sign = 1.0 if area2 > 0 else -1.0
        inside = np.ones(grid_a.shape, bool)
        for n in range(4):
            (a0, b0), (a1, b1) = quad[n], quad[(n + 1) % 4]
            edge = np.hypot(a1 - a0, b1 - b0)
            cross = ((a1 - a0) * (grid_b - b0) - (b1 - b0) * (grid_a - a0)) * sign / edge
            inside &= cross >= -1e-6
        full = [slice(None)] * 3
        full[slice_axis] = index
        view = mask.transpose(2, 1, 0)
        view[tuple(full)] |= inside
    return mask


def _segment_mask(segmentation_node, segment_id, dims_ijk):
    image = mrml.slicer_class("vtkOrientedImageData")()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    ni, nj, nk = dims_ijk
    out = np.zeros((nk, nj, ni), bool)
    extent = image.GetExtent()
    if extent[1] < extent[0]:
        return out
    dims = image.GetDimensions()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    i0, _, j0, _, k0, _ = extent
    out[k0:k0 + dims[2], j0:j0 + dims[1], i0:i0 + dims[0]] = values > 0
    return out


def _segment_ids(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return {segmentation.GetNthSegment(n).GetName(): segmentation.GetNthSegmentID(n)
            for n in range(segmentation.GetNumberOfSegments())}


def _counts(scene):
    classes = ("vtkMRMLScalarVolumeNode", "vtkMRMLMarkupsClosedCurveNode", "vtkMRMLMarkupsFiducialNode",
               "vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLTextNode")
    return {c: scene.GetNumberOfNodesByClass(c) for c in classes}


def graded_discs(vertebrae_doc):
    """A discs document as the grading stage will write it (values made up for the test)."""
    discs = []
    for n, d in enumerate(documents.disc_polygons(vertebrae_doc)):
        discs.append({"level": d["level"], "centre_ras": d["centre_ras"],
                      "grades": {"Pfirrmann": {"value": 2 + n % 3, "probabilities": [0.1, 0.6, 0.2, 0.05, 0.05]},
                                 "Herniation": {"value": n % 2, "probabilities": [0.7, 0.3]}},
                      "measurements": {"disc_height_mean_mm": 8.0 + n, "wedge_angle_deg": 3.5}})
    return {"schema": documents.DISCS_SCHEMA, "discs": discs}


# --------------------------------------------------------------------------- volume in, scan out

def test_volume_reaches_spinenetlib_unchanged(case):
    phantom, _ = case
    scene, volume = _scene_with_volume(phantom)
    voxels, affine = mrml.volume_arrays(volume)
    assert voxels.shape == phantom.voxels_kji.shape
    np.testing.assert_array_equal(voxels, phantom.voxels_kji)
    np.testing.assert_allclose(affine, phantom.ijk_to_ras, atol=1e-9)
    scan = mrml.scan_from_volume_node(volume)
    np.testing.assert_array_equal(scan.voxels, phantom.scan.voxels)
    np.testing.assert_allclose(scan.canonical_to_ras, phantom.scan.canonical_to_ras, atol=1e-9)


# --------------------------------------------------------------------------- nodes

def test_nodes_classes_names_and_positions(case):
    phantom, doc = case
    scene, volume = _scene_with_volume(phantom)
    nodes = mrml.show_results(scene, volume, doc)
    assert [v["level"] for v in doc["vertebrae"]] == LEVELS_PHANTOM
    counts = _counts(scene)
    assert counts["vtkMRMLMarkupsClosedCurveNode"] == 7
    assert counts["vtkMRMLMarkupsFiducialNode"] == 1
    assert counts["vtkMRMLSegmentationNode"] == 1
    assert counts["vtkMRMLTableNode"] == 1
    assert counts["vtkMRMLTextNode"] == 1          # the vertebrae document, no discs document
    # named after the volume ("phantom"): results of several volumes stay apart by name
    assert [c.GetName() for c in nodes.curves] == [f"phantom SpineNet {level}" for level in LEVELS_PHANTOM]
    assert nodes.segmentation.GetName() == "phantom SpineNet segmentation"
    assert nodes.documents[0].GetName() == "phantom SpineNet vertebrae.json"

    for curve, truth in zip(nodes.curves, phantom.vertebrae):
        assert curve.IsA("vtkMRMLMarkupsClosedCurveNode")
        assert curve.GetCurveType() == 0  # linear: a polygon
        # the mid-slice polygon: slices 0..6 are all visible, the median is canonical slice 3
        mid = int(np.median(truth.slices))
        expected = phantom.scan.xy_to_ras(truth.quads[mid], mid)
        np.testing.assert_allclose(_points(curve), expected, atol=2e-3)
        assert curve.GetAttribute(mrml.SOURCE_ATTRIBUTE) == volume.GetID()
        assert curve.GetNodeReferenceID(mrml.SOURCE_REFERENCE) == volume.GetID()
        # the level is shown once, at the centroid; no long node name beside every outline
        assert not curve.GetDisplayNode().GetPropertiesLabelVisibility()

    fiducials = nodes.centroids
    assert fiducials.GetName() == "phantom SpineNet centroids"
    assert [fiducials.GetNthControlPointLabel(n) for n in range(fiducials.GetNumberOfControlPoints())] == LEVELS_PHANTOM
    expected = [np.mean([phantom.scan.xy_to_ras(t.quads[s], s).mean(axis=0) for s in t.slices], axis=0)
                for t in phantom.vertebrae]
    np.testing.assert_allclose(_points(fiducials), expected, atol=2e-3)
    np.testing.assert_allclose(_points(fiducials), [v["centroid_ras"] for v in doc["vertebrae"]], atol=1e-9)


def test_segments_are_the_filled_polygons(case):
    phantom, doc = case
    scene, volume = _scene_with_volume(phantom)
    nodes = mrml.show_results(scene, volume, doc)
    dims = mrml.volume_dimensions(volume)
    slice_axis = phantom.scan.input_slice_axis
    ids = _segment_ids(nodes.segmentation)
    discs = documents.disc_polygons(doc)
    assert list(ids) == LEVELS_PHANTOM + [d["level"] for d in discs]
    assert [d["level"] for d in discs] == ["T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    for name, polygons in [(v["level"], v["polygons"]) for v in doc["vertebrae"]] + \
                          [(d["level"], d["polygons"]) for d in discs]:
        expected = _independent_mask([p["corners_ras"] for p in polygons], phantom.ijk_to_ras, dims, slice_axis)
        got = _segment_mask(nodes.segmentation, ids[name], dims)
        assert got.sum() == expected.sum() > 50, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
        # every slice where the body was found is filled, and no other
        filled = sorted(set(np.nonzero(got.transpose(2, 1, 0))[slice_axis].tolist()))
        assert filled == sorted(p["slice"] for p in polygons), name


def test_disc_quad_is_between_the_bodies(case):
    _, doc = case
    d = documents.disc_polygons(doc)[3]  # L3-L4
    upper, lower = doc["vertebrae"][3], doc["vertebrae"][4]
    quad = np.array(d["polygons"][0]["corners_ras"])
    u = np.array(upper["polygons"][0]["corners_ras"])
    lo = np.array(lower["polygons"][0]["corners_ras"])
    np.testing.assert_allclose(quad, [u[1], lo[0], lo[3], u[2]])  # upper rb, lower rt, lower lt, upper lb
    assert d["level"] == "L3-L4" and d["upper"] == 3 and d["lower"] == 4


def test_polygon_mask_edges_count_as_inside():
    square = np.array([[1.0, 1.0], [3.0, 1.0], [3.0, 3.0], [1.0, 3.0]])
    mask, a0, b0 = segmentation.polygon_mask(square, (10, 10))
    assert (a0, b0) == (1, 1) and mask.shape == (3, 3) and mask.all()   # 3 x 3 centres, edges included
    mask, _, _ = segmentation.polygon_mask(square + 0.5, (10, 10))
    assert mask.sum() == 4
    mask, _, _ = segmentation.polygon_mask(square - 5, (10, 10))
    assert mask.size == 0


# --------------------------------------------------------------------------- table

def test_table_without_grades_is_level_and_centre(case):
    phantom, doc = case
    scene, volume = _scene_with_volume(phantom)
    nodes = mrml.show_results(scene, volume, doc)
    names, rows = mrml.table_rows(nodes.table)
    assert nodes.table.GetName() == "phantom SpineNet grades"
    assert names == ["level", "centre_R_mm", "centre_A_mm", "centre_S_mm"]
    assert [r[0] for r in rows] == ["T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    assert nodes.table.GetColumnUnitLabel("centre_S_mm") == "mm"
    centres = np.array([[float(x) for x in r[1:]] for r in rows])
    np.testing.assert_allclose(centres, [d["centre_ras"] for d in documents.disc_polygons(doc)], atol=1e-6)


def test_table_with_grades_and_measurements(case):
    phantom, doc = case
    discs = graded_discs(doc)
    scene, volume = _scene_with_volume(phantom)
    nodes = mrml.show_results(scene, volume, doc, discs)
    names, rows = mrml.table_rows(nodes.table)
    assert names == ["level", "Pfirrmann", "Pfirrmann_probability", "Herniation", "Herniation_probability",
                     "disc_height_mean_mm", "wedge_angle_deg", "centre_R_mm", "centre_A_mm", "centre_S_mm"]
    table = nodes.table.GetTable()
    assert table.GetColumnByName("Pfirrmann").GetClassName() == "vtkIntArray"
    assert table.GetColumnByName("Pfirrmann_probability").GetClassName() == "vtkDoubleArray"
    assert "probability of the reported Pfirrmann" in nodes.table.GetColumnDescription("Pfirrmann_probability")
    assert table.GetColumnByName("disc_height_mean_mm").GetClassName() == "vtkDoubleArray"
    assert nodes.table.GetColumnUnitLabel("disc_height_mean_mm") == "mm"
    assert nodes.table.GetColumnUnitLabel("wedge_angle_deg") == "deg"
    assert "Pfirrmann" in nodes.table.GetColumnDescription("Pfirrmann")
    assert [r[0] for r in rows] == [d["level"] for d in discs["discs"]]
    assert [int(r[1]) for r in rows] == [2, 3, 4, 2, 3, 4]
    # without the classes of discs.json's "grade_columns" the reported class is the most probable one
    assert [float(r[2]) for r in rows] == [0.6] * 6
    assert [int(r[3]) for r in rows] == [0, 1, 0, 1, 0, 1]
    assert [float(r[4]) for r in rows] == [0.7] * 6
    assert [float(r[5]) for r in rows] == [8.0, 9.0, 10.0, 11.0, 12.0, 13.0]
    assert _counts(scene)["vtkMRMLTextNode"] == 2
    csv_text = documents.table_csv_text(*documents.disc_table(doc, discs))
    assert csv_text.splitlines()[0] == ",".join(names)
    assert csv_text.splitlines()[1].startswith("T12-L1,2,0.60,0,0.70,8.00,3.50,")
    # with them, the probability of the reported value's class (Pfirrmann 2 is the first class)
    discs["grade_columns"] = {"Pfirrmann": {"classes": ["1: a", "2: b", "3: c", "4: d", "5: e"]},
                              "Herniation": {"classes": ["0: absent", "1: present"]}}
    columns, table_rows = documents.disc_table(doc, discs)
    assert [(r[1], r[2], r[3], r[4]) for r in table_rows[:3]] == [(2, 0.6, 0, 0.7), (3, 0.2, 1, 0.3), (4, 0.05, 0, 0.7)]
    assert documents.reported_probability({"value": 3}) is None and documents.reported_probability(None) is None


# --------------------------------------------------------------------------- replacing, saving

def test_running_again_replaces_only_this_volumes_results(case):
    phantom, doc = case
    scene, volume = _scene_with_volume(phantom)
    other = mrml.add_volume(scene, phantom.voxels_kji, phantom.ijk_to_ras, "other")
    mrml.show_results(scene, other, doc)
    mrml.show_results(scene, volume, doc)
    before = _counts(scene)
    mrml.show_results(scene, volume, doc, graded_discs(doc))
    after = _counts(scene)
    assert after["vtkMRMLMarkupsClosedCurveNode"] == before["vtkMRMLMarkupsClosedCurveNode"] == 14
    assert after["vtkMRMLSegmentationNode"] == 2 and after["vtkMRMLTableNode"] == 2
    assert after["vtkMRMLTextNode"] == before["vtkMRMLTextNode"] + 1  # the discs document
    assert len(mrml.result_nodes(scene, other)) == 11   # 7 curves, centroids, segmentation, table, document
    assert {n.GetName().split(" SpineNet ")[0] for n in mrml.result_nodes(scene, other)} == {"other"}
    assert {n.GetName().split(" SpineNet ")[0] for n in mrml.result_nodes(scene, volume)} == {"phantom"}
    assert mrml.remove_results(scene, volume) == 12
    assert _counts(scene)["vtkMRMLMarkupsClosedCurveNode"] == 7


def test_mrb_round_trip(case, tmp_path):
    phantom, doc = case
    discs = graded_discs(doc)
    scene, volume = _scene_with_volume(phantom)
    nodes = mrml.show_results(scene, volume, doc, discs, folder=tmp_path)
    dims = mrml.volume_dimensions(volume)
    ids = _segment_ids(nodes.segmentation)
    counts = {name: int(_segment_mask(nodes.segmentation, sid, dims).sum()) for name, sid in ids.items()}
    path = mrml.write_mrb(scene, tmp_path / "scene.mrb")
    assert path.stat().st_size > 1000

    loaded = mrml.load_mrb(path)
    assert _counts(loaded) == _counts(scene)
    volume2 = loaded.GetFirstNodeByName("phantom")
    # the NRRD reader may flip an axis (and its IJK-to-RAS column): compare in physical space
    scan2 = mrml.scan_from_volume_node(volume2)
    np.testing.assert_array_equal(scan2.voxels, phantom.scan.voxels)
    np.testing.assert_allclose(scan2.canonical_to_ras, phantom.scan.canonical_to_ras, atol=1e-6)
    assert len(mrml.result_nodes(loaded, volume2)) == len(mrml.result_nodes(scene, volume))
    curve = loaded.GetFirstNodeByName("phantom SpineNet L4")
    np.testing.assert_allclose(_points(curve), _points(nodes.curves[4]), atol=1e-6)
    segmentation = mrml.result_nodes(loaded, volume2, "segmentation")[0]
    assert {name: int(_segment_mask(segmentation, sid, dims).sum())
            for name, sid in _segment_ids(segmentation).items()} == counts
    names, rows = mrml.table_rows(mrml.result_nodes(loaded, volume2, "grades")[0])
    assert names == mrml.table_rows(nodes.table)[0] and len(rows) == 6
    vertebrae2, discs2, folder2 = mrml.stored_documents(loaded, volume2)
    assert vertebrae2 == json.loads(json.dumps(doc)) and discs2 == discs and folder2 == str(tmp_path)


def test_hotspot_volume_has_the_heat_colours(case, tmp_path):
    phantom, doc = case
    scene, volume = _scene_with_volume(phantom)
    heat = np.zeros(phantom.voxels_kji.shape, np.float32)
    heat[1:4, 1:5, 1:6] = 0.8
    node = mrml.add_hotspot_volume(scene, volume, heat, phantom.ijk_to_ras, "SpineNet hotspot L4-L5 Pfirrmann")
    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == scene.GetFirstNodeByName(mrml.HOTSPOT_COLOR_NAME).GetID()
    assert display.GetWindow() == pytest.approx(0.8, abs=1e-6)
    assert node.GetAttribute(mrml.ROLE_ATTRIBUTE) == "hotspot"
    assert node.GetName() == "phantom SpineNet hotspot L4-L5 Pfirrmann"
    # a results run removes stale hotspots of this volume
    mrml.show_results(scene, volume, doc)
    assert mrml.result_nodes(scene, volume, "hotspot") == []


# --------------------------------------------------------------------------- corrections and documents

def _soft_probabilities(doc):
    """Each vertebra: 0.5 on its true level, 0.25 on each neighbouring level."""
    soft = json.loads(json.dumps(doc))
    for v in soft["vertebrae"]:
        k = LEVELS.index(v["level"])
        probs = {LEVELS[k]: 0.5}
        for j in (k - 1, k + 1):
            if 0 <= j < len(LEVELS):
                probs[LEVELS[j]] = 0.25
        v["level_probabilities"] = probs
    return soft


def test_correction_re_solves_the_other_levels(case):
    _, doc = case
    soft = _soft_probabilities(doc)
    discs = graded_discs(doc)
    corrected, corrected_discs = documents.apply_level_correction(soft, 2, "L3", discs)
    # the whole chain shifts with the corrected body: every other body by one level too
    assert [v["level"] for v in corrected["vertebrae"]] == ["L1", "L2", "L3", "L4", "L5", "S1", "S2"]
    assert corrected["corrections"] == [{"vertebra": 2, "level": "L3"}]
    assert [v["level_probability"] for v in corrected["vertebrae"]][:3] == [0.25, 0.25, 0.25]
    assert [d["level"] for d in corrected_discs["discs"]] == ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1", "S1-S2"]
    assert corrected_discs["discs"][0]["grades"] == discs["discs"][0]["grades"]  # same disc, new name
    assert [v["level"] for v in soft["vertebrae"]] == LEVELS_PHANTOM  # inputs untouched

    # however sure the networks were (one-hot probabilities), never two bodies alike: the re-run beam
    # search named this chain T12 L1 L3 L3 L4 L5 S1 (an ascending penalty cost less than moving 4 bodies)
    hard, _ = documents.apply_level_correction(doc, 2, "L3")
    assert [v["level"] for v in hard["vertebrae"]] == ["L1", "L2", "L3", "L4", "L5", "S1", "S2"]
    # the commonest mistake, L5 named S1: correcting the lowest body moves every body above it up by one
    up, _ = documents.apply_level_correction(doc, 6, "L5")
    assert [v["level"] for v in up["vertebrae"]] == ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    # a gap in the chain (a body the detector missed) is kept, only shifted
    gap = json.loads(json.dumps(doc))
    gap["vertebrae"][2]["level"] = None
    shifted, _ = documents.apply_level_correction(gap, 0, "L1")
    assert [v["level"] for v in shifted["vertebrae"]] == ["L1", "L2", None, "L4", "L5", "S1", "S2"]
    # without a level on the corrected body: consecutive renaming from it
    renamed, _ = documents.apply_level_correction(gap, 2, "L3")
    assert [v["level"] for v in renamed["vertebrae"]] == ["L1", "L2", "L3", "L4", "L5", "S1", "S2"]

    with pytest.raises(InputError, match="unknown level"):
        documents.apply_level_correction(doc, 0, "L9")
    with pytest.raises(InputError, match="out of range"):
        documents.apply_level_correction(doc, 7, "L1")


def test_corrected_documents_rebuild_the_nodes(case):
    phantom, doc = case
    scene, volume = _scene_with_volume(phantom)
    soft = _soft_probabilities(doc)
    mrml.show_results(scene, volume, soft)
    corrected, _ = documents.apply_level_correction(soft, 2, "L3")
    nodes = mrml.show_results(scene, volume, corrected)
    assert [c.GetName() for c in nodes.curves] == ["phantom SpineNet " + x for x in ("L1", "L2", "L3", "L4", "L5", "S1", "S2")]
    assert scene.GetFirstNodeByName("phantom SpineNet T12") is None
    assert mrml.stored_documents(scene, volume)[0]["corrections"] == [{"vertebra": 2, "level": "L3"}]


def test_levels_that_need_review_show_the_next_best_labelling_until_a_reader_corrects_them(case):
    """A labelling that asks for a review: one light red point per vertebra that its best shifted alternative
    names otherwise, at the vertebra's centre, labelled "or T11"; gone once a level is corrected by hand,
    and never drawn for levels that need no review."""
    phantom, doc = case
    scene, volume = _scene_with_volume(phantom)
    unsure = json.loads(json.dumps(doc))
    alternative = ["T11", "T12", "L1", "L2", "L3", "L4", "S1"]      # the lowest body stays S1: not drawn
    unsure["labelling"] = {"confidence": 1.0, "margin_nats": 20.0, "needs_review": True, "warnings": [],
                           "shifted_alternative": alternative}
    nodes = mrml.show_results(scene, volume, unsure)
    shown = nodes.next_best
    assert shown.GetName() == "phantom SpineNet levels of the next best labelling"
    assert mrml.result_nodes(scene, volume, "next-best-levels") == [shown]
    labels = [shown.GetNthControlPointLabel(n) for n in range(shown.GetNumberOfControlPoints())]
    assert labels == [f"or {level}" for level in alternative[:-1]]
    # inside each body, 40 % of the way from its centre down to the middle of its lower edge: clear of the level
    for point, vertebra in zip(_points(shown), doc["vertebrae"][:-1]):
        corners = np.asarray(documents.mid_polygon(vertebra)["corners_ras"])
        lower_edge = (corners[1] + corners[2]) / 2
        expected = np.add(vertebra["centroid_ras"], 0.4 * (lower_edge - vertebra["centroid_ras"]))
        np.testing.assert_allclose(point, expected, atol=1e-6)
        assert np.linalg.norm(point - vertebra["centroid_ras"]) > 3.0
    assert shown.GetDisplayNode().GetSelectedColor() == pytest.approx([c / 255 for c in documents.NEXT_BEST_COLOUR])
    corrected, _ = documents.apply_level_correction(unsure, 0, "T12")
    assert mrml.show_results(scene, volume, corrected).next_best is None
    assert mrml.result_nodes(scene, volume, "next-best-levels") == []
    sure = json.loads(json.dumps(unsure))
    sure["labelling"]["needs_review"] = False
    assert mrml.show_results(scene, volume, sure).next_best is None


def test_documents_are_checked():
    with pytest.raises(InputError, match="not a SpineNet vertebrae document"):
        documents.check_vertebrae_document({"schema": "other"})
    with pytest.raises(InputError, match="4-corner"):
        documents.check_vertebrae_document({"schema": documents.VERTEBRAE_SCHEMA,
                                            "vertebrae": [{"polygons": [{"slice": 0, "corners_ras": [[0, 0, 0]]}]}]})
    with pytest.raises(InputError, match="discs document"):
        documents.check_discs_document({"schema": documents.DISCS_SCHEMA, "discs": [{}]})


def test_result_files_round_trip(case, tmp_path):
    _, doc = case
    discs = graded_discs(doc)
    hotspot = HotspotMap("hotspots/L4-L5_Pfirrmann.nii.gz", np.zeros((2, 3, 4), np.float32), np.eye(4))
    written = write_results(tmp_path, RunResult(vertebrae_document=doc, discs_document=discs, hotspots=[hotspot]))
    assert sorted(p.name for p in written) == ["L4-L5_Pfirrmann.nii.gz", "discs.csv", "discs.json", "result.json",
                                               "vertebrae.csv", "vertebrae.json"]
    vertebrae2, discs2, folder = documents.read_result(tmp_path / "result.json")
    assert vertebrae2 == json.loads(json.dumps(doc)) and discs2 == discs and folder == tmp_path
    assert json.loads((tmp_path / "result.json").read_text())["hotspots"] == ["hotspots/L4-L5_Pfirrmann.nii.gz"]
    assert documents.read_result(tmp_path)[0] == vertebrae2
    assert (tmp_path / "discs.csv").read_text().startswith("Level,")   # the grading stage's layout
    with pytest.raises(InputError, match="not found"):
        documents.read_result(tmp_path / "missing.json")


def test_no_vertebrae_gives_empty_results():
    doc = {"schema": documents.VERTEBRAE_SCHEMA, "vertebrae": [], "timings_s": {}}
    scene = mrml.new_scene()
    volume = mrml.add_volume(scene, np.zeros((3, 4, 5), np.int16), np.eye(4), "empty")
    nodes = mrml.show_results(scene, volume, doc)
    assert nodes.curves == [] and nodes.centroids.GetNumberOfControlPoints() == 0
    assert nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 0
    assert mrml.table_rows(nodes.table) == (["level", "centre_R_mm", "centre_A_mm", "centre_S_mm"], [])


def test_hotspot_file_names(tmp_path):
    (tmp_path / "hotspots").mkdir()
    for name in ("hotspots/L4-L5_Pfirrmann.nii.gz", "hotspots_Pfirrmann.nii.gz", "hotspots_Herniation.nrrd",
                 "hotspots/notes.txt", "vertebrae.json"):
        (tmp_path / name).write_bytes(b"x")
    assert documents.hotspot_files(tmp_path, "L4-L5", "Pfirrmann") == [
        tmp_path / "hotspots" / "L4-L5_Pfirrmann.nii.gz", tmp_path / "hotspots_Pfirrmann.nii.gz"]
    assert documents.hotspot_files(tmp_path, "L3-L4", "Herniation") == [tmp_path / "hotspots_Herniation.nrrd"]
    assert documents.hotspot_files(tmp_path, "L3-L4", "Narrowing") == []
    assert documents.hotspot_files(None, "L3-L4", "Narrowing") == []
    assert documents.list_hotspot_files(tmp_path) == ["hotspots/L4-L5_Pfirrmann.nii.gz", "hotspots_Herniation.nrrd",
                                                      "hotspots_Pfirrmann.nii.gz"]
    assert documents.hotspot_node_name("hotspots/L4-L5_Pfirrmann.nii.gz") == "SpineNet hotspot L4-L5 Pfirrmann"
    assert documents.hotspot_node_name("hotspots_Herniation.nrrd") == "SpineNet hotspot all discs Herniation"


def test_grade_heads_are_the_networks_heads():
    from SpineNetLib.models.grading import HEADS

    assert documents.GRADE_HEADS == tuple(h.column for h in HEADS)
    assert documents.GRADE_HEAD_LAYERS == {h.column: h.name for h in HEADS}
    assert set(documents.GRADE_HEADS) <= set(documents.GRADE_DESCRIPTIONS)


def test_integer_measurements_stay_integers():
    doc = {"schema": documents.DISCS_SCHEMA, "discs": [
        {"level": "L4-L5", "grades": {"DiscNarrowing": {"value": 2}, "Pfirrmann": {"value": 3}},
         "measurements": {"meyerding_grade": 1, "slip_percent": 4.5, "signal_ratio": None}}]}
    columns, rows = documents.disc_table(None, doc)
    assert [(c.name, c.kind, c.unit) for c in columns[:6]] == [
        ("level", "str", ""), ("Pfirrmann", "int", ""), ("DiscNarrowing", "int", ""), ("meyerding_grade", "int", ""),
        ("slip_percent", "float", "%"), ("signal_ratio", "float", "")]
    assert rows == [["L4-L5", 3, 2, 1, 4.5, None, None, None, None]]
    assert documents.table_csv_text(columns, rows).splitlines()[1] == "L4-L5,3,2,1,4.50,,,,"


def test_batch_hands_the_worker_the_scan_on_its_input_grid(case):
    """The batch script reads the scan once and gives the worker arrays from which it reads the same scan."""
    from SpineNetLib.inputs.canonical import scan_from_array

    phantom, _ = case
    scan = scan_from_array(phantom.voxels_kji, phantom.ijk_to_ras, {"path": "phantom"})
    voxels, affine = batch_script().input_arrays(scan)
    np.testing.assert_array_equal(voxels, phantom.voxels_kji.astype(np.float32))
    np.testing.assert_array_equal(affine, phantom.ijk_to_ras)
    again = scan_from_array(voxels, affine, scan.metadata)
    np.testing.assert_array_equal(again.voxels, scan.voxels)
    for name in ("canonical_to_ras", "input_ijk_to_ras", "canonical_to_input_ijk"):
        np.testing.assert_array_equal(getattr(again, name), getattr(scan, name))
    assert (again.input_shape_ijk, again.input_slice_axis) == (scan.input_shape_ijk, scan.input_slice_axis)


def test_batch_hands_over_the_canonical_grid_of_a_resampled_scan():
    """Averaged thin slices cannot be undone: the worker gets the canonical grid, and reads the same scan."""
    from SpineNetLib.inputs.canonical import scan_from_array

    rng = np.random.default_rng(0)
    voxels = rng.uniform(0, 100, (40, 48, 36)).astype(np.float32)     # [k, j, i], 1 mm isotropic
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    scan = scan_from_array(voxels, affine)
    assert "resampled" in scan.metadata
    handed, handed_affine = batch_script().input_arrays(scan)
    again = scan_from_array(handed, handed_affine, scan.metadata)
    assert "resampled" in again.metadata and again.shape == scan.shape
    np.testing.assert_array_equal(again.voxels, scan.voxels)
    np.testing.assert_allclose(again.canonical_to_ras, scan.canonical_to_ras, atol=1e-12)


def test_a_headless_scene_leaves_no_folder_behind():
    """Every batch run and test makes a scene; each used to leave an empty spinenet-mrml-* folder in /tmp
    (the scene and its logics hold each other, so the folder goes when Python exits)."""
    import subprocess
    import sys

    code = ("from SpineNetLib.slicer import mrml; s = mrml.new_scene(); "
            "print(s.GetCacheManager().GetRemoteCacheDirectory())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    cache = Path(done.stdout.strip().splitlines()[-1])
    assert cache.name.startswith("spinenet-mrml-") and not cache.exists()
