"""What keeps a scene right around a run: results land only on their own volume, under its transform,
replaced without leftovers; bad input, another scan's results and every warning are reported.

``SpineNet/SpineNet.py`` runs with the stand-ins of slicer_standins.py (PySide6 offscreen, the real
MRML of slicer-core); the worker is the recording QProcess double or the real worker entry point in
process with the fake pipeline (no networks).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
pytest.importorskip("PySide6")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer_standins as standins  # noqa: E402
from PySide6 import QtWidgets  # noqa: E402

from SpineNetLib.core.errors import InputError  # noqa: E402
from SpineNetLib.outputs.files import write_results  # noqa: E402
from SpineNetLib.pipeline import RunResult  # noqa: E402
from SpineNetLib.slicer import mrml  # noqa: E402

from slicer_fake_pipeline import PIPELINE_SPEC as FAKE  # noqa: E402

DATA = Path(os.environ.get("SPINENET_DATA", "/work/shared/data"))


@pytest.fixture(scope="module")
def phantom_case():
    scene, volume, vertebrae, discs = standins.demo_scene()
    voxels, affine = mrml.volume_arrays(volume)
    return voxels, affine, vertebrae


@pytest.fixture()
def panel(monkeypatch, phantom_case):
    """(module, widget, scene, volume, vertebrae document): the panel on a fresh scene, the volume selected."""
    voxels, affine, vertebrae = phantom_case
    module, scene, volume = standins.module_on_new_scene(monkeypatch, voxels, affine)
    parent = QtWidgets.QWidget()
    widget = module.SpineNetWidget(parent)
    widget.setup()
    widget.ui.inputSelector.refresh()
    widget.ui.inputSelector.setCurrentNode(volume)
    yield module, widget, scene, volume, vertebrae
    widget.cleanup()
    parent.close()


def _result(folder, vertebrae):
    write_results(folder, RunResult(vertebrae_document=vertebrae))
    return str(Path(folder) / "result.json")


def _spinenet_nodes(scene):
    return [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())
            if scene.GetNthNode(n).GetAttribute(mrml.ROLE_ATTRIBUTE) is not None]


def _node_ids(scene):
    return sorted(scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes()))


# --------------------------------------------------------------------------- closing the scene during a run

def test_results_of_a_run_never_land_on_a_volume_that_took_its_id(panel, tmp_path):
    """Patient A runs, the scene is closed, patient B is loaded and gets A's node ID: A's results must not
    appear on B, whether the panel cancels the run or a script's run reports its result anyway."""
    module, widget, scene, volume, vertebrae = panel
    voxels, affine = mrml.volume_arrays(volume)

    widget.ui.applyButton.click()                                  # the panel: closing the scene cancels
    process = standins.FakeProcess.instances[-1]
    scene.Clear(0)
    assert process.killed and widget.logic.lastRun.status == "cancelled" and not widget.logic.isRunning()

    logic = module.SpineNetLogic(scene)                            # a script's run, worker in its own process
    first = mrml.add_volume(scene, voxels, affine, "patient A")
    run = logic.startRun(first)
    process = standins.FakeProcess.instances[-1]
    scene.Clear(0)                                                 # no panel cancels this one
    second = mrml.add_volume(scene, voxels, affine, "patient B")
    assert second.GetID() == run.volumeID                          # MRML reuses the ID
    process.feed(f"RESULT {_result(tmp_path / 'results', vertebrae)}\n")
    process.finish(0)
    assert run.status == "failed" and run.message == "Error: the input volume is no longer in the scene."
    assert _spinenet_nodes(scene) == [] and logic.documents(second)[0] is None


# --------------------------------------------------------------------------- replaced results

def test_replaced_results_leave_no_display_or_storage_nodes(panel, tmp_path):
    """Two runs, a saved scene, a level correction and a replaced hotspot map: every display and storage
    node left in the scene still belongs to a node (none is saved with the scene showing nothing)."""
    module, widget, scene, volume, vertebrae = panel
    logic = widget.logic

    def orphans():
        owned = set()
        for n in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(n)
            if node.IsA("vtkMRMLDisplayableNode"):
                owned |= {node.GetNthDisplayNodeID(d) for d in range(node.GetNumberOfDisplayNodes())}
            if node.IsA("vtkMRMLStorableNode"):
                owned |= {node.GetNthStorageNodeID(s) for s in range(node.GetNumberOfStorageNodes())}
        helpers = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())
                   if scene.GetNthNode(n).IsA("vtkMRMLDisplayNode") or scene.GetNthNode(n).IsA("vtkMRMLStorageNode")]
        return sorted(node.GetClassName() for node in helpers if node.GetID() not in owned)

    document = tmp_path / "vertebrae.json"
    document.write_text(json.dumps(vertebrae), encoding="utf-8")
    for n in range(2):
        logic.runSynchronously(volume, pipeline=FAKE, options={"vertebrae": str(document), "hotspot": "L4-L5:Pfirrmann"},
                               workFolder=str(tmp_path / f"run{n}"))
        logic.showHotspots(volume, "L4-L5", "Pfirrmann")
        logic.showHotspots(volume, "L4-L5", "Pfirrmann")           # replaced
        mrml.write_mrb(scene, tmp_path / f"scene{n}.mrb")          # storage nodes for every result node
    logic.correctLevel(volume, 2, "L3")
    assert orphans() == []
    assert len(mrml.result_nodes(scene, volume)) == len(vertebrae["vertebrae"]) + 4


# --------------------------------------------------------------------------- every warning

def test_the_panel_shows_every_warning_of_a_run(panel, tmp_path):
    module, widget, scene, volume, vertebrae = panel
    widget.ui.applyButton.click()
    process = standins.FakeProcess.instances[-1]
    process.feed("WARNING the pixel spacing looks 1.4 times too large: check the header\n"
                 "WARNING Pfirrmann: the weights did not train this head, no hotspot map\n")
    process.feed(f"RESULT {_result(tmp_path / 'results', vertebrae)}\n")
    process.finish(0)
    assert widget.ui.statusLabel.text().splitlines() == [
        "7 vertebrae (T12..S1), 6 discs, 0 graded.",
        "Warning: the pixel spacing looks 1.4 times too large: check the header",
        "Warning: Pfirrmann: the weights did not train this head, no hotspot map"]
    assert widget.logic.lastRun.message == widget.ui.statusLabel.text()


# --------------------------------------------------------------------------- inputs `spinenet run` refuses

def test_a_label_map_or_an_empty_volume_is_refused_like_spinenet_run_refuses_the_file(panel):
    import SimpleITK as sitk

    from SpineNetLib.inputs.image import image_ijk_to_ras
    from SpineNetLib.inputs.load import load_scan

    module, widget, scene, volume, vertebrae = panel
    labels = DATA / "chu" / "chu_02" / "labels.nii.gz"
    if not labels.is_file():
        pytest.skip(f"{labels} is not here")
    with pytest.raises(InputError, match="looks like a label map, not an MR image"):
        load_scan(labels)                                          # what `spinenet run` says of the file
    image = sitk.ReadImage(str(labels))                            # as Slicer loads it
    voxels, affine = sitk.GetArrayFromImage(image), image_ijk_to_ras(image)
    as_scalar = mrml.add_volume(scene, voxels, affine, "labels")
    as_label_map = mrml.add_volume(scene, voxels, affine, "labels (label map)",
                                   node_class="vtkMRMLLabelMapVolumeNode")
    empty = mrml.add_volume(scene, np.zeros((20, 200, 200), np.int16), np.diag([-1.0, -1.0, 4.0, 1.0])[[2, 1, 0, 3]],
                            "all zero")
    expected = {as_scalar: 'the volume "labels" looks like a label map, not an MR image (',
                as_label_map: 'the volume "labels (label map)" is a label map (a segmentation), not an MR image',
                empty: 'every voxel of the volume "all zero" has the same value (0): there is no image to read'}
    before = _node_ids(scene)
    for node, message in expected.items():
        with pytest.raises(module.SpineNetError) as error:
            widget.logic.runSynchronously(node, pipeline=FAKE)
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
        if node is as_label_map:                                   # the panel offers no label maps (.ui)
            continue
        widget.ui.inputSelector.refresh()
        widget.ui.inputSelector.setCurrentNode(node)
        widget.ui.applyButton.click()                              # the panel: one line, no worker
        assert widget.ui.statusLabel.text() == "Error: " + str(error.value)
    assert standins.FakeProcess.instances == [] and _node_ids(scene) == before


class _DicomDatabase:
    """Slicer's DICOM database (ctkDICOMDatabase) as far as the Modality check uses it: slicer-core has none."""

    def __init__(self, modalities: dict[str, str], fails: bool = False):
        self.modalities, self.fails, self.asked = modalities, fails, []

    def instanceValue(self, uid, tag):
        self.asked.append((uid, tag))
        if self.fails:
            raise RuntimeError("no such database method in this version")
        return self.modalities.get(uid, "")


def test_a_ct_series_loaded_through_slicers_dicom_module_is_refused_like_spinenet_run_refuses_it(panel, monkeypatch):
    """`spinenet run` refuses a CT series (inputs/dicom.NOT_MR_MODALITIES); the same series loaded in Slicer
    carries its instance UIDs, whose Modality Slicer's DICOM database gives."""
    slicer = mrml.slicer   # the real module (the panel's stand-in reads its attributes from it)
    module, widget, scene, volume, vertebrae = panel
    voxels, affine = mrml.volume_arrays(volume)
    ct = mrml.add_volume(scene, voxels, affine, "3: SAG CT")
    ct.SetAttribute("DICOM.instanceUIDs", "1.2.3.1 1.2.3.2")
    mr = mrml.add_volume(scene, voxels, affine, "4: SAG T2")
    mr.SetAttribute("DICOM.instanceUIDs", "1.2.4.1 1.2.4.2")
    database = _DicomDatabase({"1.2.3.1": "CT", "1.2.4.1": "MR"})
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    before = _node_ids(scene)
    with pytest.raises(module.SpineNetError) as error:
        widget.logic.runSynchronously(ct, pipeline=FAKE)
    assert str(error.value) == ('the volume "3: SAG CT" is a CT series (DICOM Modality), not MR: SpineNet reads '
                                'sagittal MR scans')
    assert database.asked == [("1.2.3.1", "0008,0060")]
    widget.ui.inputSelector.refresh()
    widget.ui.inputSelector.setCurrentNode(ct)
    widget.ui.applyButton.click()                                  # the panel: one line, no worker
    assert widget.ui.statusLabel.text() == "Error: " + str(error.value)
    assert standins.FakeProcess.instances == [] and _node_ids(scene) == before
    # an MR series, a volume from a file (no UIDs) and a database that cannot answer are read
    assert mrml.input_volume_arrays(mr)[0].shape == voxels.shape
    assert mrml.input_volume_arrays(volume)[0].shape == voxels.shape
    monkeypatch.setattr(slicer, "dicomDatabase", _DicomDatabase({}, fails=True), raising=False)
    assert mrml.dicom_modality(ct) is None and mrml.input_volume_arrays(ct)[0].shape == voxels.shape


class _TagDatabase:
    """Slicer's DICOM database answering per tag, the same for every instance."""

    def __init__(self, values: dict[str, str]):
        self.values = values

    def instanceValue(self, uid, tag):
        return self.values.get(tag, "")


def test_a_series_from_slicers_dicom_module_takes_its_acquisition_times_to_the_run(panel, monkeypatch):
    """The grader reads T2 scans only (discs/weighting.py): a T1 series loaded through Slicer's DICOM module
    reaches the worker with the echo and repetition times its database holds, as `spinenet run` reads them."""
    from SpineNetLib.apps.worker import read_scan
    from SpineNetLib.discs.weighting import scan_weighting

    module, widget, scene, volume, vertebrae = panel
    voxels, affine = mrml.volume_arrays(volume)
    t1 = mrml.add_volume(scene, voxels, affine, "5: SAG T1")
    t1.SetAttribute("DICOM.instanceUIDs", "1.2.5.1 1.2.5.2")
    monkeypatch.setattr(mrml.slicer, "dicomDatabase", _TagDatabase(
        {"0008,0060": "MR", "0018,0081": "11", "0018,0080": "550", "0018,0020": "SE", "0008,103E": "sag t1"}),
        raising=False)
    run = widget.logic.prepareRun(t1, pipeline=FAKE)
    try:
        arguments = run["workerArguments"]
        npy, geometry = (arguments[arguments.index(flag) + 1] for flag in ("--input", "--geometry"))
        weighting = scan_weighting(read_scan(npy, geometry), [])
        assert (weighting.name, weighting.source, weighting.detail) == ("T1", "DICOM header", "TE 11 ms, TR 550 ms")
        # a volume from a file: nothing from a database, so the image will decide
        assert mrml.dicom_acquisition(volume) == {}
    finally:
        widget.logic.cleanupRun(run)


class _SeriesDatabase:
    """Slicer's DICOM database answering per series: a volume's first instance UID names its tags."""

    def __init__(self, values_by_instance: dict[str, dict[str, str]]):
        self.values_by_instance = values_by_instance

    def instanceValue(self, uid, tag):
        return self.values_by_instance.get(uid, {}).get(tag, "")


def test_a_t1_volume_is_said_to_be_measured_not_graded_before_the_run(panel, monkeypatch):
    """An exam loaded through Slicer's DICOM module: choosing its sagittal T1 says, before any run, that
    its discs will be measured, not graded, and which sagittal volume is the T2 (an axial T2 is not named);
    the note goes when Sequence is set to T2, or for the T2 volume, or a volume from a file."""
    module, widget, scene, volume, vertebrae = panel
    voxels, affine = mrml.volume_arrays(volume)
    assert mrml.sagittal_volumes(scene) and int(np.argmax(np.abs(affine[:3, 2]))) == 0
    named = {}
    for name, uid, matrix in (("5: SAG T1", "1.2.5.1", affine), ("6: SAG T2", "1.2.6.1", affine),
                              ("7: AX T2", "1.2.7.1", np.diag([0.8, 0.8, 4.0, 1.0]))):
        named[name] = mrml.add_volume(scene, voxels, matrix, name)
        named[name].SetAttribute("DICOM.instanceUIDs", uid)
    t1_tags = {"0008,0060": "MR", "0018,0081": "11", "0018,0080": "550", "0018,0020": "SE"}
    t2_tags = {"0008,0060": "MR", "0018,0081": "95", "0018,0080": "3500", "0018,0020": "SE"}
    monkeypatch.setattr(mrml.slicer, "dicomDatabase", _SeriesDatabase(
        {"1.2.5.1": t1_tags, "1.2.6.1": t2_tags, "1.2.7.1": t2_tags}), raising=False)
    widget.ui.inputSelector.refresh()
    status = widget.ui.statusLabel
    widget.ui.inputSelector.setCurrentNode(named["5: SAG T1"])
    note = ('"5: SAG T1" is T1-weighted (DICOM header: TE 11 ms, TR 550 ms): its discs will be measured, not '
            'graded (the grader reads T2-weighted scans; Sequence T2 grades them); the sagittal T2-weighted '
            'volume of the scene: "6: SAG T2".')
    assert status.text() == note
    widget.ui.sequenceComboBox.setCurrentText("T2")
    assert status.text() == module.IDLE_PROMPT
    widget.ui.sequenceComboBox.setCurrentText("from the scan")
    assert status.text() == note
    widget.ui.gradingCheckBox.setChecked(False)
    assert status.text() == module.IDLE_PROMPT
    widget.ui.gradingCheckBox.setChecked(True)
    widget.ui.inputSelector.setCurrentNode(named["6: SAG T2"])
    assert status.text() == module.IDLE_PROMPT
    widget.ui.inputSelector.setCurrentNode(named["5: SAG T1"])
    assert status.text() == note
    widget.ui.inputSelector.setCurrentNode(volume)   # from a file: nothing in the database
    assert status.text() == module.IDLE_PROMPT


# --------------------------------------------------------------------------- a transformed volume

def test_results_follow_the_volumes_parent_transform(panel, tmp_path):
    import vtk

    module, widget, scene, volume, vertebrae = panel
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved 50 mm right")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 50.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    nodes = widget.logic.loadResults(volume, _result(tmp_path / "results", vertebrae))
    for node in [*nodes.curves, nodes.centroids, nodes.segmentation]:
        assert node.GetTransformNodeID() == transform.GetID(), node.GetName()
    local, world = [0.0] * 3, [0.0] * 3
    nodes.centroids.GetNthControlPointPosition(0, local)
    nodes.centroids.GetNthControlPointPositionWorld(0, world)
    np.testing.assert_allclose(local, vertebrae["vertebrae"][0]["centroid_ras"], atol=1e-3)
    np.testing.assert_allclose(np.subtract(world, local), [50.0, 0.0, 0.0], atol=1e-6)   # where the volume is shown


# --------------------------------------------------------------------------- loading results

def test_load_results_refuses_another_scans_results_and_changes_nothing(panel, tmp_path):
    module, widget, scene, volume, vertebrae = panel
    voxels, affine = mrml.volume_arrays(volume)
    results = _result(tmp_path / "results", vertebrae)
    widget.logic.loadResults(volume, results)
    moved = affine.copy()
    moved[:3, 3] += [0.0, 30.0, 0.0]
    elsewhere = mrml.add_volume(scene, voxels, moved, "another scan")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    before = _node_ids(scene)
    with pytest.raises(module.SpineNetError, match=r'^these results were made on another scan \(\d+x\d+x\d+ voxels '
                                                   r'centred at RAS .*\), not on the volume "another scan"'):
        widget.logic.loadResults(elsewhere, results)
    with pytest.raises(module.SpineNetError, match='^the volume "no voxels" has no voxels'):
        widget.logic.loadResults(empty, results)
    assert _node_ids(scene) == before and len(mrml.result_nodes(scene, volume)) == len(vertebrae["vertebrae"]) + 4

    # the same grid with its slices stored in the other order (as another loader may): the results fit
    flipped = affine.copy()
    flipped[:3, 3] = affine[:3, :3] @ [voxels.shape[2] - 1, 0, 0] + affine[:3, 3]
    flipped[:3, 0] = -affine[:3, 0]
    reordered = mrml.add_volume(scene, voxels[:, :, ::-1], flipped, "same scan, slices reversed")
    nodes = widget.logic.loadResults(reordered, results)
    assert len(nodes.curves) == len(vertebrae["vertebrae"])


class _FilesDatabase:
    """Slicer's DICOM database as far as Save results uses it: the file of each instance (and no tags)."""

    def __init__(self, files: dict[str, str]):
        self.files = files

    def fileForInstance(self, uid):
        return self.files.get(uid, "")

    def instanceValue(self, uid, tag):
        return ""


def test_save_results_makes_the_dicom_results_again_from_a_series_loaded_through_the_dicom_module(
        monkeypatch, tmp_path):
    """A folder of `spinenet run --dicom-out`, loaded on the series Slicer's DICOM module loaded, corrected and
    saved: the segmentation and report are made again from the series' files in Slicer's database (read as
    the run read them), with the other files, together; a volume not loaded that way is refused unchanged."""
    import pydicom

    from SpineNetLib import pipeline
    from SpineNetLib.outputs.documents import read_result
    from SpineNetLib.synthetic.phantom import make_phantom

    from oracles import oracle_networks

    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=6)
    files = phantom.write_dicom(tmp_path / "dicom")
    scan = pipeline.read_input(tmp_path / "dicom", pipeline.processing_profile(None))[0]
    result = pipeline.run(scan, oracle_networks(phantom), pipeline.RunOptions(grade=False))
    results = tmp_path / "results"
    write_results(results, result, scan=scan, dicom=True)
    levels = [v["level"] for v in result.vertebrae_document["vertebrae"]]

    module, scene, plain = standins.module_on_new_scene(monkeypatch, *mrml.volume_arrays(
        mrml.add_scan_volume(mrml.new_scene(), scan, "x")))
    loaded = mrml.add_scan_volume(scene, scan, "MR T2 SAG")
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for f in files}
    loaded.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    monkeypatch.setattr(mrml.slicer, "dicomDatabase", _FilesDatabase(uids), raising=False)
    logic = module.SpineNetLogic(scene)

    # a volume not loaded through the DICOM module: refused, nothing changed
    logic.loadResults(plain, str(results / "result.json"))
    logic.correctLevel(plain, 0, "T9")
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    with pytest.raises(InputError, match="Slicer's DICOM module .* spinenet correct --input"):
        logic.saveResults(plain)
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before

    logic.loadResults(loaded, str(results / "result.json"))
    logic.correctLevel(loaded, 0, "T9")
    written = {Path(p).name for p in logic.saveResults(loaded).paths}
    assert {"vertebrae.json", "preview.png", "segmentation.dcm", "report.dcm", "result.json"} <= written
    corrected = [v["level"] for v in read_result(results)[0]["vertebrae"]]
    assert corrected[0] == "T9" and corrected != levels
    labels = [s.SegmentLabel for s in pydicom.dcmread(results / "segmentation.dcm").SegmentSequence]
    assert [label for label in labels if "-" not in label] == corrected


def test_save_results_of_a_cohort_study_reads_the_dicom_files_the_cohort_read_and_updates_its_tables(
        monkeypatch, tmp_path):
    """A study folder of `spinenet cohort --dicom-out`, loaded on a volume that did not come through Slicer's
    DICOM module, corrected and saved: the DICOM results are made again from the series the cohort read
    (``cohort_inputs.json``) and the study's rows in the cohort tables follow; with the series gone, it is
    refused and nothing changes."""
    import csv
    import shutil

    import pydicom

    from SpineNetLib import pipeline
    from SpineNetLib.cohort.discover import discover_studies
    from SpineNetLib.cohort.record import record_study_inputs
    from SpineNetLib.cohort.tables import write_cohort_tables
    from SpineNetLib.synthetic.phantom import make_phantom

    from oracles import oracle_networks

    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=6)
    phantom.write_dicom(tmp_path / "root" / "exam")
    (study,) = discover_studies(tmp_path / "root").studies
    scan = pipeline.read_input(study.path, pipeline.processing_profile(None), series_uid=study.series_uid)[0]
    result = pipeline.run(scan, oracle_networks(phantom), pipeline.RunOptions(grade=False))
    out = tmp_path / "out"
    folder = out / "studies" / study.study_id
    write_results(folder, result, scan=scan, dicom=True)
    record_study_inputs(out, [study])
    write_cohort_tables(out, out / "studies", [study], [])
    module, scene, plain = standins.module_on_new_scene(monkeypatch, *mrml.volume_arrays(
        mrml.add_scan_volume(mrml.new_scene(), scan, "x")))
    logic = module.SpineNetLogic(scene)
    other = mrml.add_volume(scene, np.zeros((4, 5, 6), np.float32), np.eye(4), "another scan")
    said = re.escape(f"; the cohort read these results' scan from {tmp_path / 'root' / 'exam'}, series {study.series_uid}")
    with pytest.raises(InputError, match=f"made on another scan .*{said}"):
        logic.loadResults(other, str(folder / "result.json"))      # says where to find the right scan
    logic.loadResults(plain, str(folder / "result.json"))
    logic.correctLevel(plain, 0, "T9")

    shutil.move(str(tmp_path / "root"), str(tmp_path / "moved"))
    kept = {p.name: p.read_bytes() for p in [*folder.iterdir(), *out.glob("*.csv")]}
    with pytest.raises(InputError, match="Slicer's DICOM module"):
        logic.saveResults(plain)
    assert {p.name: p.read_bytes() for p in [*folder.iterdir(), *out.glob("*.csv")]} == kept

    shutil.move(str(tmp_path / "moved"), str(tmp_path / "root"))
    saved = logic.saveResults(plain)
    assert saved.warning is None
    assert {"segmentation.dcm", "report.dcm", "cohort_studies.csv", "cohort_vertebrae.csv"} <= \
        {Path(p).name for p in saved.paths}
    with (out / "cohort_vertebrae.csv").open(newline="") as handle:
        levels = [row["level"] for row in csv.DictReader(handle)]
    labels = [s.SegmentLabel for s in pydicom.dcmread(folder / "segmentation.dcm").SegmentSequence]
    assert levels[0] == "T9" and [label for label in labels if "-" not in label] == levels

    # Load results of the study with no volume that fits: its scan comes with it, read where the cohort read it
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    shown, scanLoaded = logic.loadResultsOrStudy(other, str(folder))
    assert scanLoaded and shown.GetName() == study.relative == "exam"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes + 1
    assert [v["level"] for v in logic.documents(shown)[0]["vertebrae"]] == levels
    assert logic.loadResultsOrStudy(plain, str(folder)) == (plain, False)      # a volume that fits: as before
    shutil.move(str(tmp_path / "root"), str(tmp_path / "moved"))
    with pytest.raises(InputError, match="which is gone"):
        logic.loadResultsOrStudy(None, str(folder))
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes + 1
