"""The Slicer module without the Slicer application: its .ui, its widget wiring, its logic, screenshots.

``SpineNet/SpineNet.py`` is imported with stand-ins for ``qt`` (real PySide6
widgets, offscreen), ``ctk`` and ``slicer`` (the real MRML of slicer-core,
a small ``slicer.util``, ScriptedLoadableModule base classes), see
slicer_standins.py.  The worker process is a recording double in most tests
and the real ``SpineNetLib.apps.worker`` subprocess (with the fake pipeline) in one.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
pytest.importorskip("PySide6")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer_standins as standins  # noqa: E402
from PySide6 import QtCore, QtWidgets  # noqa: E402

from SpineNetLib.outputs import documents
from SpineNetLib.slicer import mrml  # noqa: E402

FAKE = f"{Path(__file__).resolve().parent / 'slicer_fake_pipeline.py'}:run"


@pytest.fixture(scope="module")
def phantom_case():
    scene, volume, vertebrae, discs = standins.demo_scene()
    return volume, vertebrae, discs


@pytest.fixture()
def panel(monkeypatch, phantom_case):
    """(module, widget, scene, volume, vertebrae document) with the panel set up on a fresh scene."""
    source, vertebrae, _ = phantom_case
    scene = mrml.new_scene()
    voxels, affine = mrml.volume_arrays(source)
    module = standins.import_module(monkeypatch, scene)
    standins.FakeProcess.instances.clear()
    parent = QtWidgets.QWidget()
    widget = module.SpineNetWidget(parent)
    widget.setup()
    volume = mrml.add_volume(scene, voxels, affine, "T2 sagittal lumbar")
    yield module, widget, scene, volume, vertebrae
    parent.close()


def _select(widget, volume):
    widget.ui.inputSelector.refresh()
    widget.ui.inputSelector.setCurrentNode(volume)


def _write_result(folder, vertebrae, discs=None):
    documents.write_result_files(folder, vertebrae, discs)
    return str(Path(folder) / "result.json")


# --------------------------------------------------------------------------- the .ui file

def test_ui_holds_every_widget_name_the_module_uses():
    standins.application()
    source = standins.MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert {"inputSelector", "applyButton", "cancelButton", "progressBar", "statusLabel", "discTable",
            "vertebraTable", "exportCsvButton", "showHotspotsButton", "weightsComboBox", "deviceComboBox",
            "gradingCheckBox", "hotspotHeadComboBox"} <= used
    from PySide6.QtUiTools import QUiLoader

    widget = QUiLoader().load(str(standins.UI_FILE))  # plain loader: custom widgets fall back to QWidget
    assert widget is not None and widget.objectName() == "SpineNet"
    missing = sorted(name for name in used if widget.findChild(QtCore.QObject, name) is None)
    assert missing == []
    ui_text = standins.UI_FILE.read_text(encoding="utf-8")
    assert 'class="qMRMLNodeComboBox" name="inputSelector"' in ui_text
    assert "<string>vtkMRMLScalarVolumeNode</string>" in ui_text
    assert "Detect &amp;&amp; Grade" in ui_text
    assert widget.findChild(QtWidgets.QPushButton, "applyButton").text() == "Detect && Grade"


def test_screenshots_are_rendered(tmp_path):
    from PySide6.QtGui import QImage

    paths = standins.render_screenshots(tmp_path)
    assert [p.name for p in paths] == ["slicer_panel.png", "slicer_results_table.png"]
    for path in paths:
        image = QImage(str(path))
        assert not image.isNull() and image.width() > 300 and image.height() > 100
        pixels = {image.pixelColor(x, y).name() for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
        assert len(pixels) > 5, f"{path.name} looks blank"


# --------------------------------------------------------------------------- widget wiring

def test_apply_without_a_volume_only_says_so(panel):
    module, widget, scene, volume, _ = panel
    scene.RemoveNode(volume)
    widget.ui.inputSelector.refresh()
    widget.ui.applyButton.click()
    assert widget.ui.statusLabel.text() == "Select an input volume first."
    assert standins.FakeProcess.instances == []
    assert not widget.ui.cancelButton.isEnabled()


def test_apply_starts_the_worker_and_cancel_kills_it(panel):
    module, widget, scene, volume, _ = panel
    _select(widget, volume)
    widget.ui.deviceComboBox.setCurrentIndex(1)        # cpu
    widget.ui.applyButton.click()
    process = standins.FakeProcess.instances[-1]
    assert process.started and widget.process is process
    assert process.program == module.SpineNetLogic.pythonExecutable()
    args = process.arguments
    assert args[:2] == ["-m", "SpineNetLib.apps.worker"]
    for flag, value in (("--weights", "bundled"), ("--device", "cpu"), ("--hotspot-head", "Pfirrmann")):
        assert args[args.index(flag) + 1] == value
    assert "--grading" in args
    assert process.directory == module.LIBRARY_PARENT
    # the volume went to the worker unchanged
    npy, geometry = args[args.index("--input") + 1], args[args.index("--geometry") + 1]
    voxels, affine = mrml.volume_arrays(volume)
    np.testing.assert_array_equal(np.load(npy), voxels)
    np.testing.assert_allclose(json.loads(Path(geometry).read_text())["ijk_to_ras"], affine)
    assert not widget.ui.applyButton.isEnabled() and widget.ui.cancelButton.isEnabled()

    process.feed("PROGRESS 2 5 detecting vertebrae\nPROGRESS 3 5 detect")
    assert (widget.ui.progressBar.maximum(), widget.ui.progressBar.value()) == (5, 2)
    assert widget.ui.statusLabel.text() == "Detecting vertebrae ..."
    process.feed("ing vertebrae\n")
    assert widget.ui.progressBar.value() == 3

    widget.ui.cancelButton.click()
    assert process.killed
    assert widget.process is None
    assert widget.ui.statusLabel.text() == "Cancelled."
    assert widget.ui.applyButton.isEnabled() and not widget.ui.cancelButton.isEnabled()
    assert not Path(npy).exists()                       # temporary input removed
    assert mrml.result_nodes(scene, volume) == []


def test_worker_result_fills_the_panel_and_a_correction_re_solves(panel, tmp_path):
    module, widget, scene, volume, vertebrae = panel
    _select(widget, volume)
    widget.ui.applyButton.click()
    process = standins.FakeProcess.instances[-1]
    soft = json.loads(json.dumps(vertebrae))
    for v in soft["vertebrae"]:           # soft probabilities: 0.5 on the level, 0.25 on each neighbour
        k = documents.LEVELS.index(v["level"])
        v["level_probabilities"] = {documents.LEVELS[k]: 0.5, documents.LEVELS[k - 1]: 0.25, documents.LEVELS[k + 1]: 0.25} \
            if k > 0 else {"S1": 0.5, "L5": 0.25}
    result = _write_result(tmp_path / "results", soft)
    process.feed("WARNING disc grading is not available in this version: vertebrae only\n")
    process.feed(f"PROGRESS 5 5 beam search\nRESULT {result}\n")
    process.finish(0)
    assert widget.process is None
    assert widget.ui.statusLabel.text().startswith("7 vertebrae (T12..S1), 6 discs, 0 graded.")
    assert "Warning: disc grading is not available" in widget.ui.statusLabel.text()
    assert widget.ui.discTable.rowCount() == 6 and widget.ui.discTable.item(0, 0).text() == "T12-L1"
    assert widget.ui.discTable.horizontalHeaderItem(1).text() == "Centre R (mm)"
    assert widget.ui.vertebraTable.rowCount() == 7
    assert [c.currentText() for c in widget._levelCombos] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert widget.ui.exportCsvButton.isEnabled() and widget.ui.showHotspotsButton.isEnabled()
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsClosedCurveNode") == 7

    # the user says the third body is L3: the others are re-solved around it
    widget._levelCombos[2].textActivated.emit("L3")
    assert [c.currentText() for c in widget._levelCombos] == ["L1", "L2", "L3", "L4", "L5", "S1", "S2"]
    assert widget.ui.statusLabel.text() == "Vertebra 3 set to L3; levels now L1..S2."
    assert scene.GetFirstNodeByName("SpineNet T12") is None and scene.GetFirstNodeByName("SpineNet S2") is not None
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsClosedCurveNode") == 7
    assert widget.ui.discTable.item(5, 0).text() == "S1-S2"


def test_worker_error_and_crash_are_reported(panel):
    module, widget, scene, volume, _ = panel
    _select(widget, volume)
    widget.ui.applyButton.click()
    process = standins.FakeProcess.instances[-1]
    process.feed("ERROR no detector, appearance, context weights in /x (bundled): pass --weights DIR\n")
    process.finish(2)
    assert widget.ui.statusLabel.text() == "Error: no detector, appearance, context weights in /x (bundled): pass --weights DIR"
    widget.ui.applyButton.click()
    process = standins.FakeProcess.instances[-1]
    process.finish(1, stderr="Traceback ...\nMemoryError: out of memory")
    assert widget.ui.statusLabel.text() == ("The SpineNet worker stopped (exit code 1) without a result: "
                                            "MemoryError: out of memory")
    assert widget.ui.applyButton.isEnabled()
    widget.ui.applyButton.click()
    process = standins.FakeProcess.instances[-1]
    process.errorOccurred.emit(standins.FakeProcess.FailedToStart)
    assert widget.process is None and widget.ui.applyButton.isEnabled() and not widget.ui.cancelButton.isEnabled()
    assert widget.ui.statusLabel.text().startswith("Could not start the SpineNet worker (")


def test_options_reach_the_worker(panel):
    module, widget, scene, volume, _ = panel
    _select(widget, volume)
    widget.ui.weightsComboBox.setCurrentIndex(2)          # a folder, but none chosen
    assert widget.ui.weightsFolderLineEdit.isEnabled()
    widget.ui.applyButton.click()
    assert widget.ui.statusLabel.text().startswith("Choose the folder that holds the weights")
    assert standins.FakeProcess.instances == []
    widget.ui.weightsFolderLineEdit.setText("/data/my weights")
    widget.ui.gradingCheckBox.setChecked(False)
    assert not widget.ui.hotspotHeadComboBox.isEnabled()
    widget.ui.applyButton.click()
    args = standins.FakeProcess.instances[-1].arguments
    assert args[args.index("--weights") + 1] == "/data/my weights" and "--no-grading" in args


def test_missing_packages_are_offered_for_installation(panel, monkeypatch):
    module, widget, scene, volume, _ = panel
    _select(widget, volume)
    recorder = module._standins.recorder
    monkeypatch.setattr(widget.logic, "missingPackages", lambda: ["torch>=2.1"])
    installed = []
    monkeypatch.setattr(widget.logic, "installPackages", lambda packages: installed.extend(packages))
    recorder.confirm = False
    widget.ui.applyButton.click()
    assert recorder.calls[-1][0] == "confirm" and "torch>=2.1" in recorder.calls[-1][1]
    assert widget.ui.statusLabel.text() == "Cancelled: the Python packages SpineNet needs are not installed."
    assert standins.FakeProcess.instances == [] and installed == []
    recorder.confirm = True
    widget.ui.applyButton.click()
    assert installed == ["torch>=2.1"] and standins.FakeProcess.instances[-1].started


def test_export_csv_and_hotspots(panel, tmp_path):
    module, widget, scene, volume, vertebrae = panel
    _select(widget, volume)
    recorder = module._standins.recorder
    results = tmp_path / "results"
    widget.logic.loadResults(volume, _write_result(results, vertebrae))
    widget.populateResults()
    widget.updateWidgets()

    recorder.directory = str(tmp_path / "export")
    widget.ui.exportCsvButton.click()
    written = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert written == ["T2_sagittal_lumbar_discs.csv", "T2_sagittal_lumbar_vertebrae.csv"]
    discs_csv = (tmp_path / "export" / "T2_sagittal_lumbar_discs.csv").read_text()
    assert discs_csv == documents.table_csv_text(*documents.disc_table(vertebrae))   # not graded: level, centre
    assert discs_csv.splitlines()[0] == "level,centre_R_mm,centre_A_mm,centre_S_mm"
    assert widget.ui.statusLabel.text().startswith("Wrote T2_sagittal_lumbar_vertebrae.csv, T2_sagittal_lumbar_discs.csv")

    widget.ui.discTable.selectRow(4)
    widget.ui.showHotspotsButton.click()
    assert widget.ui.statusLabel.text() == ("Hotspots are not available for L4-L5 (Pfirrmann): "
                                            "this run wrote no hotspot maps.")
    from slicer_fake_pipeline import _hotspot

    centre = {d["level"]: d["centre_ras"] for d in documents.disc_polygons(vertebrae)}["L4-L5"]
    scan = mrml.scan_from_volume_node(volume)
    _hotspot(scan, centre, results / "hotspots" / "L4-L5_Pfirrmann.nii.gz")
    widget.ui.showHotspotsButton.click()
    assert widget.ui.statusLabel.text() == "Showing the Pfirrmann hotspots of L4-L5."
    hotspots = mrml.result_nodes(scene, volume, "hotspot")
    assert [n.GetName() for n in hotspots] == ["SpineNet hotspot L4-L5 Pfirrmann"]
    heat, heat_affine = mrml.volume_arrays(hotspots[0])
    assert heat.max() == pytest.approx(1.0, abs=0.2)
    np.testing.assert_allclose(heat_affine, mrml.ijk_to_ras(volume), atol=1e-4)
    assert recorder.calls[-1][0] == "layers" and recorder.calls[-1][1]["foreground"] is hotspots[0]
    widget.ui.showHotspotsButton.click()                   # again: replaced, not piled up
    assert len(mrml.result_nodes(scene, volume, "hotspot")) == 1

    # the grading stage's one-map-per-head files (hotspots_<Head>.nii.gz) are shown for any disc
    _hotspot(scan, centre, results / "hotspots_Herniation.nii.gz")
    widget.ui.hotspotHeadComboBox.setCurrentText("Herniation")
    widget.ui.discTable.selectRow(1)
    widget.ui.showHotspotsButton.click()
    assert widget.ui.statusLabel.text() == "Showing the Herniation hotspots of all discs."
    assert "SpineNet hotspot all discs Herniation" in [n.GetName() for n in mrml.result_nodes(scene, volume, "hotspot")]


def test_logic_installs_torch_through_the_pytorch_extension(panel, monkeypatch):
    module, widget, scene, volume, _ = panel
    calls = []

    class PyTorchUtilsLogic:
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
            calls.append(("installTorch", askConfirmation, torchVersionRequirement))
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", type(sys)("PyTorchUtils"))
    sys.modules["PyTorchUtils"].PyTorchUtilsLogic = PyTorchUtilsLogic
    widget.logic.installPackages(["torch>=2.1", "pydicom>=2.4"])
    assert calls == [("installTorch", True, ">=2.1")]
    assert module._standins.recorder.calls[-1] == ("pip_install", "pydicom>=2.4")
    assert widget.logic.requirements() == ["numpy>=1.24", "scipy>=1.10", "pydicom>=2.4", "SimpleITK>=2.3", "torch>=2.1"]
    assert widget.logic.missingPackages() == []   # all importable here


def test_logic_runs_a_pipeline_in_process_and_the_self_test_passes(panel, tmp_path):
    module, widget, scene, volume, vertebrae = panel
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(vertebrae))
    seen = []
    nodes = widget.logic.runSynchronously(volume, pipeline=FAKE, options={"vertebrae": str(truth)},
                                          progress=lambda *a: seen.append(a))
    assert seen == [(1, 3, "fake detection"), (2, 3, "fake detection"), (3, 3, "fake detection")]
    assert len(nodes.curves) == 7 and widget.logic.summary(volume).startswith("7 vertebrae (T12..S1)")
    results = Path(widget.logic.documents(volume)[2])
    assert (results / "vertebrae.csv").is_file() and not (results.parent / "input").exists()

    test = module.SpineNetTest()
    test.runTest()                      # the module's own self-test, as Slicer runs it
    assert test.messages[-1] == "SpineNet self-test passed"


def test_the_panel_runs_the_real_worker_process(monkeypatch, phantom_case, tmp_path):
    """qt.QProcess (PySide6) runs SpineNetLib.apps.worker with the fake pipeline; the panel shows the result."""
    source, vertebrae, _ = phantom_case
    scene = mrml.new_scene()
    voxels, affine = mrml.volume_arrays(source)
    module = standins.import_module(monkeypatch, scene, fake_process=False)
    parent = QtWidgets.QWidget()
    widget = module.SpineNetWidget(parent)
    widget.setup()
    volume = mrml.add_volume(scene, voxels, affine, "T2 sagittal lumbar")
    _select(widget, volume)
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(vertebrae))
    widget.logic.pipeline = FAKE
    widget.logic.pipelineOptions = {"vertebrae": truth, "steps": 4}
    widget.ui.applyButton.click()
    assert widget.process is not None
    deadline = time.monotonic() + 120
    while widget.process is not None and time.monotonic() < deadline:
        QtCore.QCoreApplication.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)
    assert widget.process is None, "the worker did not finish"
    assert widget.ui.statusLabel.text().startswith("7 vertebrae (T12..S1), 6 discs, 0 graded."), widget.ui.statusLabel.text()
    assert widget.ui.progressBar.value() == widget.ui.progressBar.maximum() == 4
    assert widget.ui.vertebraTable.rowCount() == 7
    curve = scene.GetFirstNodeByName("SpineNet L2")
    np.testing.assert_allclose(curve.GetNthControlPointPositionVector(0),
                               documents.mid_polygon(vertebrae["vertebrae"][2])["corners_ras"][0], atol=1e-6)

    # a worker that cannot start does not leave the panel waiting
    monkeypatch.setattr(widget.logic, "pythonExecutable", lambda: str(tmp_path / "no-such-python"))
    widget.ui.applyButton.click()
    deadline = time.monotonic() + 30
    while widget.process is not None and time.monotonic() < deadline:
        QtCore.QCoreApplication.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
    assert widget.process is None
    assert widget.ui.statusLabel.text().startswith("Could not start the SpineNet worker (")
    assert widget.ui.applyButton.isEnabled()
    parent.close()
