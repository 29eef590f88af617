"""The Slicer module without the Slicer application: its .ui, its widget wiring, its logic, screenshots.

``SpineNet/SpineNet.py`` is imported with stand-ins for ``qt`` (real PySide6
widgets, offscreen), ``ctk`` and ``slicer`` (the real MRML of slicer-core,
a small ``slicer.util``, ScriptedLoadableModule base classes), see
slicer_standins.py.  The worker process is a recording double in most tests
and the real ``SpineNetLib.apps.worker`` subprocess (with the fake pipeline) in one.
"""

from __future__ import annotations

import json
import math
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
from SpineNetLib.outputs.files import write_results  # noqa: E402
from SpineNetLib.pipeline import RunResult  # noqa: E402
from SpineNetLib.slicer import mrml  # noqa: E402

from slicer_fake_pipeline import PIPELINE_SPEC as FAKE  # noqa: E402


@pytest.fixture(scope="module")
def phantom_case():
    scene, volume, vertebrae, discs = standins.demo_scene()
    return volume, vertebrae, discs


@pytest.fixture()
def panel(monkeypatch, phantom_case):
    """(module, widget, scene, volume, vertebrae document) with the panel set up on a fresh scene."""
    source, vertebrae, _ = phantom_case
    module, scene, volume = standins.module_on_new_scene(monkeypatch, *mrml.volume_arrays(source))
    parent = QtWidgets.QWidget()
    widget = module.SpineNetWidget(parent)
    widget.setup()
    yield module, widget, scene, volume, vertebrae
    parent.close()


def _select(widget, volume):
    widget.ui.inputSelector.refresh()
    widget.ui.inputSelector.setCurrentNode(volume)


def _write_result(folder, vertebrae, discs=None):
    write_results(folder, RunResult(vertebrae_document=vertebrae, discs_document=discs))
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
    """The README screenshots: the real panel after Detect & Grade with the bundled weights on the demo
    phantom; the slice view (real VTK offscreen rendering of the MRML nodes) where VTK can render offscreen."""
    from PySide6.QtGui import QImage

    slice_view = standins.offscreen_rendering_works()
    paths = standins.render_screenshots(tmp_path, slice_view=slice_view)
    names = ["slicer_panel.png", "slicer_results_table.png"]
    names += ["slicer_slice_view.png", "slicer_layout.png"] if slice_view else []
    assert [p.name for p in paths] == names
    for path in paths:
        assert path.stat().st_size < 300_000, f"{path.name} is too big for the README"
        image = QImage(str(path))
        assert not image.isNull() and image.width() > 300 and image.height() > 100
        pixels = {image.pixelColor(x, y).name() for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
        assert len(pixels) > 5, f"{path.name} looks blank"
    if slice_view:
        image = QImage(str(tmp_path / "slicer_slice_view.png"))
        colours = [image.pixelColor(x, y) for x in range(0, image.width(), 3) for y in range(30, image.height(), 3)]
        grey = sum(1 for c in colours if max(c.red(), c.green(), c.blue()) - min(c.red(), c.green(), c.blue()) < 8)
        tinted = sum(1 for c in colours if max(c.red(), c.green(), c.blue()) - min(c.red(), c.green(), c.blue()) > 60)
        # the scan in grey, and the segments, outlines and labels in their colours over it
        assert grey > 0.5 * len(colours) and tinted > 0.02 * len(colours), (grey, tinted, len(colours))


def test_docs_show_the_screenshots():
    """Every screenshot the script writes is in docs/images and shown in README.md or docs/SLICER.md; every
    image the two pages show exists."""
    repo = Path(standins.REPO)
    pages = {repo / "README.md": repo, repo / "docs" / "SLICER.md": repo / "docs"}
    shown = set()
    for page, base in pages.items():
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page.read_text(encoding="utf-8")):
            path = (base / link).resolve()
            assert path.is_file(), f"{page.name} shows a missing image {link}"
            shown.add(path.name)
    for name in ("slicer_layout.png", "slicer_slice_view.png", "slicer_panel.png", "slicer_results_table.png"):
        path = repo / "docs" / "images" / name
        assert path.is_file() and path.stat().st_size < 300_000, name
        assert name in shown, f"{name} is shown nowhere"


def test_slice_view_draws_the_nodes_where_they_are():
    """render_slice_view: Slicer's sagittal view (anterior left, superior up) of the middle slice, a segment drawn
    over the scan at its RAS place (ground-truth outlines of the small phantom, no networks)."""
    if not standins.offscreen_rendering_works():
        pytest.skip("VTK cannot render offscreen here")
    scene, volume, vertebrae, discs = standins.demo_scene()
    nodes = mrml.show_results(scene, volume, vertebrae, discs)
    segmentation = nodes.segmentation.GetSegmentation()
    display = nodes.segmentation.GetDisplayNode()
    display.SetOpacity2DFill(1.0)
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    size = 300

    def drawn(level):
        """Pixels (rows top-down, columns) where the view changes when only this segment is shown."""
        for segment_id in ids:
            display.SetSegmentVisibility(segment_id, False)
        hidden, _, _ = standins.render_slice_view(scene, volume, (size, size))
        display.SetSegmentVisibility(segmentation.GetSegmentIdBySegmentName(level), True)
        shown, offset, index = standins.render_slice_view(scene, volume, (size, size))
        assert shown.shape == (size, size, 3) and index == 5 and abs(offset) < 1e-6   # the middle of 9 slices
        return np.nonzero(np.abs(shown.astype(int) - hidden.astype(int)).sum(axis=2) > 30)

    # the view fits the volume (Slicer's reset field of view): centre and scale from its RAS bounds
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    mm_per_pixel = max(bounds[3] - bounds[2], bounds[5] - bounds[4]) / size
    centre_a, centre_s = (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2
    for level in ("L1", "L3", "L5"):
        rows, cols = drawn(level)
        assert len(rows) > 100, level
        a, s = next(v for v in vertebrae["vertebrae"] if v["level"] == level)["centroid_ras"][1:]
        # anterior (larger A) to the left, superior (larger S) up
        assert abs(cols.mean() - (size / 2 - (a - centre_a) / mm_per_pixel)) < 4, level
        assert abs(rows.mean() - (size / 2 - (s - centre_s) / mm_per_pixel)) < 4, level


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
    assert process.started and widget.logic.workerService.process is process and widget.logic.isRunning()
    assert process.program == module.SpineNetLogic.pythonExecutable()
    assert process.arguments == ["-m", "SpineNetLib.apps.worker", "--serve"]   # kept running between runs
    args = process.requests[-1]
    for flag, value in (("--weights", "bundled"), ("--device", "cpu")):
        assert args[args.index(flag) + 1] == value
    assert "--grading" in args and "--hotspot-head" not in args     # hotspots are opt-in
    assert "--precision" not in args and "--runtime" not in args    # float32 on torch unless chosen
    assert "--no-preview" in args                                   # nobody would see it in a temporary folder
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
    assert widget.logic.worker is None and not widget.logic.isRunning()
    assert widget.logic.lastRun.status == "cancelled"
    assert widget.ui.statusLabel.text() == "Cancelled."
    assert widget.ui.applyButton.isEnabled() and not widget.ui.cancelButton.isEnabled()
    assert not Path(npy).exists()                       # temporary input removed
    assert mrml.result_nodes(scene, volume) == []


def _filled_in_slice_views(scene, volume) -> dict[str, bool]:
    """Per vertebra level, whether its outline and its segment are filled in the slice views (one answer, asserted
    alike for both)."""
    curves = {node.GetAttribute("SpineNet.Level"): node.GetDisplayNode().GetFillVisibility()
              for node in mrml.result_nodes(scene, volume, "vertebra-outline")}
    (segmentation,) = mrml.result_nodes(scene, volume, "segmentation")
    display, segments = segmentation.GetDisplayNode(), segmentation.GetSegmentation()
    filled = {segments.GetNthSegment(n).GetName(): display.GetSegmentVisibility2DFill(segments.GetNthSegmentID(n))
              for n in range(segments.GetNumberOfSegments())}
    assert all(filled[level] == curve for level, curve in curves.items()), (curves, filled)
    return {level: bool(curve) for level, curve in curves.items()}


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
    soft["labelling"] = {**(soft.get("labelling") or {}), "confidence": 0.6, "needs_review": True,
                         "warnings": ["levels may be shifted by one (margin 1.0 nats): a reason"]}
    soft["vertebrae"][2]["outline_from"] = "weaker detection"   # L2's outline is rougher
    result = _write_result(tmp_path / "results", soft)
    process.feed("WARNING disc grading is not available in this version: vertebrae only\n")
    process.feed(f"PROGRESS 5 5 beam search\nRESULT {result}\n")
    process.finish(0)
    assert widget.logic.worker is None and widget.logic.lastRun.status == "done"
    assert widget.ui.statusLabel.text().startswith("7 vertebrae (T12..S1), 6 discs, 0 graded.")
    assert "Warning: disc grading is not available" in widget.ui.statusLabel.text()
    assert widget.ui.discTable.rowCount() == 6 and widget.ui.discTable.item(0, 0).text() == "T12-L1"
    assert widget.ui.discTable.horizontalHeaderItem(1).text() == "Centre R (mm)"
    assert widget.ui.vertebraTable.rowCount() == 7
    assert [c.currentText() for c in widget._levelCombos] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert widget.ui.exportCsvButton.isEnabled() and widget.ui.showHotspotsButton.isEnabled()
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsClosedCurveNode") == 7
    # which network drew each outline: in the table (a tooltip on the rougher one) and on the outline's node
    table = widget.ui.vertebraTable
    assert table.horizontalHeaderItem(3).text() == "Outline from"
    assert [table.item(r, 3).text() for r in range(7)] == ["detector"] * 2 + ["weaker detection"] + ["detector"] * 4
    assert "rougher" in table.item(2, 3).toolTip() and table.item(3, 3).toolTip() == ""
    outlines = {node.GetAttribute("SpineNet.Level"): node.GetAttribute("SpineNet.OutlineFrom")
                for node in mrml.result_nodes(scene, volume, "vertebra-outline")}
    assert outlines["L2"] == "weaker detection" and outlines["L3"] == "detector"
    # and in the slice views: the rough body's outline and segment are drawn unfilled, the others filled
    assert _filled_in_slice_views(scene, volume) == {"T12": True, "L1": True, "L2": False, "L3": True, "L4": True,
                                                     "L5": True, "S1": True}

    # the user picks the level the third body already has: the levels are confirmed, nothing moves
    assert widget.ui.labellingLabel.styleSheet() != ""                 # the soft labelling asks for a review
    widget._levelCombos[2].textActivated.emit("L2")
    assert [c.currentText() for c in widget._levelCombos] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert widget.ui.statusLabel.text() == "Vertebra 3 confirmed as L2: levels T12..S1 marked as checked by hand."
    assert widget.ui.labellingLabel.styleSheet() == "" and "by hand" in widget.ui.labellingLabel.text()

    # the user says the third body is L3: the others are re-solved around it
    widget._levelCombos[2].textActivated.emit("L3")
    assert [c.currentText() for c in widget._levelCombos] == ["L1", "L2", "L3", "L4", "L5", "S1", "S2"]
    assert widget.ui.statusLabel.text() == "Vertebra 3 set to L3; levels now L1..S2."
    assert scene.GetFirstNodeByName("T2 sagittal lumbar SpineNet T12") is None
    assert scene.GetFirstNodeByName("T2 sagittal lumbar SpineNet S2") is not None
    assert _filled_in_slice_views(scene, volume)["L3"] is False          # the rough body, renamed, stays unfilled
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsClosedCurveNode") == 7
    assert widget.ui.discTable.item(5, 0).text() == "S1-S2"


def test_levels_that_may_be_shifted_are_flagged_in_the_panel(panel, tmp_path):
    from SpineNetLib.label.confidence import labelling_confidence
    from SpineNetLib.outputs.vertebrae import labelling_confidence_dict

    module, widget, scene, volume, vertebrae = panel
    _select(widget, volume)
    assert widget.ui.labellingLabel.isHidden()                 # no results yet
    widget.ui.applyButton.click()
    process = standins.FakeProcess.instances[-1]
    # each body 0.52 on its level and 0.48 on the one above: all seven one level up is nearly as likely
    doc = json.loads(json.dumps(vertebrae))
    probs = np.zeros((len(doc["vertebrae"]), len(documents.LEVELS)))
    for row, v in zip(probs, doc["vertebrae"]):
        k = documents.LEVELS.index(v["level"])
        row[k], row[k + 1] = 0.52, 0.48
        v["level_probabilities"] = {documents.LEVELS[k]: 0.52, documents.LEVELS[k + 1]: 0.48}
    confidence = labelling_confidence(probs, [v["level"] for v in doc["vertebrae"]])
    assert confidence.confidence == pytest.approx(13 ** 7 / (13 ** 7 + 12 ** 7), abs=1e-12)   # 0.636
    doc["labelling"] = labelling_confidence_dict(confidence)
    doc["warnings"] = list(confidence.warnings)
    shifted = ("levels may be shifted by one (confidence 0.63): the next best labelling calls the lowest body L5 "
               "instead of S1 (T11..L5 instead of T12..S1)")
    assert confidence.warnings == [shifted]
    process.feed(f"WARNING {shifted}\nRESULT {_write_result(tmp_path / 'results', doc)}\n")
    process.finish(0)
    assert widget.logic.lastRun.status == "done"
    # said once, in the levels box below, not again in the status line
    assert widget.ui.statusLabel.text() == "7 vertebrae (T12..S1), 6 discs, 0 graded."
    label = widget.ui.labellingLabel
    assert not label.isHidden() and label.styleSheet() == module.LEVELS_REVIEW_STYLE
    # with where to see the alternative: the scene shows its levels in the bodies
    assert label.text() == "L" + shifted[1:] + ". " + module.NEXT_BEST_SHOWN
    assert widget.logic.labellingStatus(volume) == (label.text(), True)
    (alternative,) = mrml.result_nodes(scene, volume, "next-best-levels")
    assert alternative.GetNthControlPointLabel(0) == "or T11"

    # the user checks the levels and pins the lowest body to S1 again: the levels are the user's now
    widget._levelCombos[6].textActivated.emit("S1")
    assert [c.currentText() for c in widget._levelCombos] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert label.text() == "Levels confirmed by hand (the network's own labelling had confidence 0.63)."
    assert label.styleSheet() == "" and not label.isHidden()
    assert mrml.result_nodes(scene, volume, "next-best-levels") == []   # decided: no alternative any more
    stored = widget.logic.documents(volume)[0]
    assert stored["labelling"]["needs_review"] is False and stored["warnings"] == []

    # another volume without results: the line goes away
    other = mrml.add_volume(scene, *mrml.volume_arrays(volume), "another scan")
    _select(widget, other)
    assert label.isHidden() and label.text() == ""


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
    assert widget.logic.worker is None and widget.ui.applyButton.isEnabled() and not widget.ui.cancelButton.isEnabled()
    assert widget.ui.statusLabel.text().startswith("Could not start the SpineNet worker (")


def test_runs_share_one_worker_process_until_it_ends(panel, tmp_path, monkeypatch):
    """The worker process stays running between runs (only the first pays for torch's import); a
    cancelled run or a crash ends it, and the next run starts another; idle, its input is closed."""
    module, widget, scene, volume, vertebrae = panel
    _select(widget, volume)
    service = widget.logic.workerService
    # shown, the module starts the process before any run (when the packages are there)
    monkeypatch.setattr(widget.logic, "missingPackages", lambda: [])
    widget.enter()
    warm = standins.FakeProcess.instances[-1]
    assert warm.started and warm.requests == [] and service.isAlive()
    widget.ui.applyButton.click()
    assert standins.FakeProcess.instances[-1] is warm and len(warm.requests) == 1
    warm.feed("READY \nPROGRESS 1 2 detecting vertebrae\n")
    assert widget.ui.progressBar.value() == 1
    warm.feed(f"RESULT {_write_result(tmp_path / 'a', vertebrae)}\nEND 0\n")
    assert widget.logic.lastRun.status == "done" and not warm.killed and service.isAlive()
    assert widget.ui.statusLabel.text().startswith("7 vertebrae (T12..S1)")

    widget.ui.applyButton.click()                         # the same process, a second request
    assert standins.FakeProcess.instances[-1] is warm and len(warm.requests) == 2
    warm.feed("ERROR the scan is axial\nEND 2\n")
    assert widget.ui.statusLabel.text() == "Error: the scan is axial" and service.isAlive()

    widget.ui.applyButton.click()
    widget.ui.cancelButton.click()                        # Cancel kills it at once ...
    assert warm.killed and widget.logic.lastRun.status == "cancelled" and not service.isAlive()
    widget.ui.applyButton.click()                         # ... and the next run starts another
    second = standins.FakeProcess.instances[-1]
    assert second is not warm and second.workerArguments == second.requests[0]
    second.finish(1, stderr="Segmentation fault")         # a crash ends the run and the process
    assert widget.ui.statusLabel.text() == "The SpineNet worker stopped (exit code 1) without a result: Segmentation fault"
    assert not service.isAlive() and widget.ui.applyButton.isEnabled()

    # idle: its input is closed (it ends by itself), and no run is touched
    service.idleSeconds = 0
    widget.ui.applyButton.click()
    third = standins.FakeProcess.instances[-1]
    third.feed(f"RESULT {_write_result(tmp_path / 'b', vertebrae)}\nEND 0\n")
    assert widget.logic.lastRun.status == "done" and not third.inputClosed
    deadline = time.monotonic() + 10
    while not third.inputClosed and time.monotonic() < deadline:
        QtCore.QCoreApplication.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 20)
    assert third.inputClosed and not third.killed
    third.finish(0)
    assert not service.isAlive() and widget.logic.lastRun.status == "done"

    # the module closed: the process goes with it
    widget.enter()
    fourth = standins.FakeProcess.instances[-1]
    assert fourth is not third and service.isAlive()
    widget.cleanup()
    assert fourth.killed and not service.isAlive()


def test_a_worker_of_the_callers_own_is_not_warmed_up(monkeypatch):
    """Scripts and tests that inject their own worker start no process of the module's."""
    module, scene, volume = standins.module_on_new_scene(monkeypatch, np.zeros((3, 8, 8), np.int16), np.eye(4))
    monkeypatch.setattr(module.SpineNetLogic, "missingPackages", lambda self: [])
    assert module.SpineNetLogic(workerFactory=module.QProcessWorker).warmUpWorker() is False
    assert standins.FakeProcess.instances == []
    logic = module.SpineNetLogic()
    assert logic.warmUpWorker() is True and standins.FakeProcess.instances[-1].arguments[-1] == "--serve"
    logic.cleanup()
    monkeypatch.setattr(module.SpineNetLogic, "missingPackages", lambda self: ["torch>=2.1"])
    assert module.SpineNetLogic().warmUpWorker() is False     # nothing to run it with yet


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
    args = standins.FakeProcess.instances[-1].workerArguments
    assert args[args.index("--weights") + 1] == "/data/my weights" and "--no-grading" in args


def test_the_sequence_choice_reaches_the_worker_and_the_parameter_node(panel):
    """The grader reads T2-weighted scans only (SpineNetLib/discs/weighting.py): by default the run reads the
    weighting from the scan; a user whose T2 scan reads as T1 says T2 in the panel, as with --sequence."""
    module, widget, scene, volume, _ = panel
    combo = widget.ui.sequenceComboBox
    assert [combo.itemText(k) for k in range(combo.count())] == list(module.SEQUENCES)
    assert combo.currentText() == "from the scan" and widget.settings()["sequence"] is None
    _select(widget, volume)
    widget.ui.applyButton.click()
    assert "--sequence" not in standins.FakeProcess.instances[-1].workerArguments
    widget.ui.cancelButton.click()
    combo.setCurrentText("T2")
    assert widget._parameterNode.GetParameter("Sequence") == "T2"
    assert module.SpineNetLogic.runSettings(widget._parameterNode)["sequence"] == "T2"
    widget.ui.applyButton.click()
    args = standins.FakeProcess.instances[-1].workerArguments
    assert args[args.index("--sequence") + 1] == "T2"
    widget.ui.cancelButton.click()
    widget.ui.gradingCheckBox.setChecked(False)           # nothing to grade: nothing to choose
    assert not combo.isEnabled()


def test_hotspots_are_opt_in_and_a_chosen_head_reaches_the_worker(panel):
    module, widget, scene, volume, _ = panel
    combo = widget.ui.hotspotHeadComboBox
    assert [combo.itemText(k) for k in range(combo.count())] == ["none", "Herniation"]   # what the bundled grader trained
    assert combo.currentText() == "none" and widget.settings()["hotspot_head"] is None
    assert "<string>none</string>" in standins.UI_FILE.read_text(encoding="utf-8")    # the .ui's default too
    _select(widget, volume)
    widget.ui.applyButton.click()
    assert "--hotspot-head" not in standins.FakeProcess.instances[-1].workerArguments
    widget.ui.cancelButton.click()
    combo.setCurrentText("Herniation")
    assert widget.settings()["hotspot_head"] == "Herniation"
    widget.ui.applyButton.click()
    args = standins.FakeProcess.instances[-1].workerArguments
    assert args[args.index("--hotspot-head") + 1] == "Herniation"
    widget.ui.cancelButton.click()


def test_only_the_heads_the_chosen_grader_trained_are_offered_for_hotspots(panel, tmp_path):
    """A head the grader did not train gets no map (the run only warns), so the list offers the heads the
    chosen weights trained: Herniation with the bundled ones, all 11 with the official ones (whose
    checkpoints record none), none for a folder without a grader; a head no longer offered goes back to
    "none", in the parameter node too."""
    from SpineNetLib.weights.resolve import BUNDLED_DIR

    module, widget, scene, volume, _ = panel
    _select(widget, volume)
    combo = widget.ui.hotspotHeadComboBox

    def offered():
        return [combo.itemText(k) for k in range(combo.count())]

    widget.ui.weightsComboBox.setCurrentIndex(1)                         # official
    assert offered() == ["none", *documents.GRADE_HEADS]
    combo.setCurrentText("Pfirrmann")
    assert widget.logic.getParameterNode().GetParameter("HotspotHead") == "Pfirrmann"
    widget.ui.weightsComboBox.setCurrentIndex(0)                         # bundled
    assert offered() == ["none", "Herniation"] and combo.currentText() == "none"
    assert widget.logic.getParameterNode().GetParameter("HotspotHead") == "none"
    assert "(Herniation)" in combo.toolTip()
    combo.setCurrentText("Herniation")

    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("detector.pt", "appearance.pt", "context.pt"):
        (folder / name).write_bytes((BUNDLED_DIR / name).read_bytes())
    widget.ui.weightsComboBox.setCurrentIndex(2)
    widget.ui.weightsFolderLineEdit.setText(str(folder))                 # no grading.pt in it
    assert offered() == ["none"] and combo.currentText() == "none" and "no grader" in combo.toolTip()
    (folder / "grading.pt").write_bytes((BUNDLED_DIR / "grading.pt").read_bytes())
    widget.ui.weightsFolderLineEdit.setText(str(folder) + "/")
    assert offered() == ["none", "Herniation"]
    assert widget.settings()["hotspot_head"] is None

    # results that hold maps of other heads (made with other weights) can still show them
    results = tmp_path / "results"
    widget.logic.loadResults(volume, _write_result(results, panel[4]))
    (results / "hotspots").mkdir()
    (results / "hotspots" / "L4-L5_Pfirrmann.nii.gz").write_bytes(b"")
    widget.updateWidgets()
    assert offered() == ["none", "Pfirrmann", "Herniation"]


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


def test_load_results_shows_a_command_lines_results_for_review_and_correction(panel, tmp_path):
    """A folder that `spinenet run` or `spinenet cohort` wrote, loaded on its volume with the panel's
    button: the tables fill as after a run, a level can be corrected; another scan's results are refused
    with a status line and the panel shows nothing of them."""
    module, widget, scene, volume, vertebrae = panel
    recorder = module._standins.recorder
    _select(widget, volume)
    widget.updateWidgets()
    assert widget.ui.loadResultsButton.isEnabled() and not widget.ui.exportCsvButton.isEnabled()
    results = tmp_path / "results"
    _write_result(results, vertebrae)
    recorder.directory = str(results)
    widget.ui.loadResultsButton.click()
    levels = [v["level"] for v in vertebrae["vertebrae"]]
    assert widget.ui.vertebraTable.rowCount() == len(levels)
    assert [c.currentText() for c in widget._levelCombos] == levels
    assert widget.ui.statusLabel.text().startswith(f"{len(levels)} vertebrae ({levels[0]}..{levels[-1]})")
    assert widget.ui.statusLabel.text().endswith("Loaded from " + str(results))
    assert widget.ui.exportCsvButton.isEnabled() and widget.ui.saveResultsButton.isEnabled()
    assert widget.logic.correctLevel(volume, 0, "T11")[0] == "T11"

    other = dict(vertebrae, scan=dict(vertebrae["scan"], shape=[1, 2, 3]))
    elsewhere = tmp_path / "elsewhere"
    _write_result(elsewhere, other)
    recorder.directory = str(elsewhere)
    widget.ui.loadResultsButton.click()
    assert widget.ui.statusLabel.text().startswith("Loading the results failed: ")
    assert widget.logic.documents(volume)[0]["vertebrae"][0]["level"] == "T11"   # the shown results stay


def test_load_results_of_a_cohort_study_brings_its_scan_along(panel, tmp_path):
    """Load results... on a study folder of `spinenet cohort` whose scan is not the selected volume: the scan
    is read from where the cohort read it, added as a volume named after the study and selected, with the
    results on it; a folder of another run with no volume that fits is refused as before."""
    from SpineNetLib import pipeline
    from SpineNetLib.cohort.discover import discover_studies
    from SpineNetLib.cohort.record import record_study_inputs
    from SpineNetLib.synthetic.phantom import make_phantom

    from oracles import oracle_networks

    module, widget, scene, volume, vertebrae = panel
    recorder = module._standins.recorder
    _select(widget, volume)
    phantom = make_phantom(fov="lumbar", shape=(128, 128), pixel_spacing=(2.3, 2.3), n_slices=5, seed=3)
    phantom.write_nifti(tmp_path / "root" / "site" / "p3.nii.gz")
    (study,) = discover_studies(tmp_path / "root").studies
    scan = pipeline.read_input(study.path, pipeline.processing_profile(None))[0]
    result = pipeline.run(scan, oracle_networks(phantom), pipeline.RunOptions(grade=False))
    folder = tmp_path / "out" / "studies" / study.study_id
    write_results(folder, result, scan=scan)
    record_study_inputs(tmp_path / "out", [study])

    recorder.directory = str(folder)
    widget.ui.loadResultsButton.click()
    shown = widget._volume()
    assert shown is not volume and shown.GetName() == "site/p3.nii.gz"
    assert widget.ui.statusLabel.text().endswith("with its scan, read from where the cohort read it.")
    assert [c.currentText() for c in widget._levelCombos] == [v["level"] for v in result.vertebrae_document["vertebrae"]]
    assert widget.ui.saveResultsButton.isEnabled()

    recorder.directory = str(tmp_path / "another")          # a plain run's folder that fits no volume
    _write_result(tmp_path / "another", dict(vertebrae, scan=dict(vertebrae["scan"], shape=[1, 2, 3])))
    widget.ui.loadResultsButton.click()
    assert widget.ui.statusLabel.text().startswith("Loading the results failed: these results were made on another")
    with pytest.raises(module.SpineNetError, match="select the volume the results were made from first"):
        widget.logic.loadResultsOrStudy(None, str(tmp_path / "another"))     # no volume: only a cohort study
    shown, scanLoaded = widget.logic.loadResultsOrStudy(None, str(folder))
    assert scanLoaded and shown.GetName() == "site/p3.nii.gz"


def test_next_cohort_study_to_review_steps_through_the_flagged_studies(panel, tmp_path):
    """Next cohort study to review: after a cohort study's results, the cohort's other studies that ask for a
    review come one by one, the least sure first, each with its scan; the volume the panel loaded for the
    study before goes, but not while its corrections are unsaved; once all were shown, round again through
    those still asking; the panel says when none is left."""
    from SpineNetLib import pipeline
    from SpineNetLib.cohort.discover import discover_studies
    from SpineNetLib.cohort.record import record_study_inputs
    from SpineNetLib.cohort.tables import write_cohort_tables
    from SpineNetLib.synthetic.phantom import make_phantom

    from oracles import oracle_networks

    module, widget, scene, volume, vertebrae = panel
    recorder = module._standins.recorder
    _select(widget, volume)
    out = tmp_path / "out"
    for seed in (3, 4, 5):
        make_phantom(fov="lumbar", shape=(128, 128), pixel_spacing=(2.3, 2.3), n_slices=5, seed=seed).write_nifti(
            tmp_path / "root" / f"p{seed}.nii.gz")
    studies = discover_studies(tmp_path / "root").studies
    confidence = {"p3.nii.gz": 0.9, "p4.nii.gz": None, "p5.nii.gz": 0.6}     # p4 asks for no review
    for study in studies:
        phantom = make_phantom(fov="lumbar", shape=(128, 128), pixel_spacing=(2.3, 2.3), n_slices=5,
                               seed=int(study.relative[1]))
        scan = pipeline.read_input(study.path, pipeline.processing_profile(None))[0]
        result = pipeline.run(scan, oracle_networks(phantom), pipeline.RunOptions(grade=False))
        sure = confidence[study.relative]
        if sure is not None:
            result.vertebrae_document["labelling"].update(confidence=sure, margin_nats=math.log(sure / (1 - sure)),
                                                          needs_review=True,
                                                          warnings=["levels may be shifted by one (a reason)"])
        write_results(out / "studies" / study.study_id, result, scan=scan)
    record_study_inputs(out, studies)
    write_cohort_tables(out, out / "studies", studies, [])
    ids = {s.relative: s.study_id for s in studies}

    recorder.directory = str(out / "studies" / ids["p4.nii.gz"])
    widget.ui.loadResultsButton.click()
    first = widget._volume()
    assert first.GetName() == "p4.nii.gz" and widget.ui.nextStudyButton.isEnabled()
    widget.ui.nextStudyButton.click()                               # the least sure first: p5, then p3
    second = widget._volume()
    assert second.GetName() == "p5.nii.gz" and widget.ui.statusLabel.text().endswith("Loaded p5.nii.gz for review.")
    assert not scene.IsNodePresent(first) and mrml.result_nodes(scene, first) == []   # the panel's volume went
    widget.logic.correctLevel(second, 0, "T9")
    widget.ui.nextStudyButton.click()
    assert widget.ui.statusLabel.text() == ("Next study: this study's level corrections are not saved: Save results "
                                            "first")
    assert widget._volume() is second
    widget.ui.saveResultsButton.click()
    assert widget.ui.statusLabel.text().startswith("Wrote "), widget.ui.statusLabel.text()
    widget.ui.nextStudyButton.click()
    assert widget._volume().GetName() == "p3.nii.gz" and not scene.IsNodePresent(second), widget.ui.statusLabel.text()
    third = widget._volume()
    widget.ui.nextStudyButton.click()                               # p5 was corrected: it asks no more
    assert widget.ui.statusLabel.text() == "No other study of this cohort asks for a review."
    _select(widget, volume)                                         # p4 loaded again with its scan
    recorder.directory = str(out / "studies" / ids["p4.nii.gz"])
    widget.ui.loadResultsButton.click()
    assert widget._volume().GetName() == "p4.nii.gz"
    widget.ui.nextStudyButton.click()                               # round again: p3, shown before, still asks
    assert widget._volume().GetName() == "p3.nii.gz" and widget._volume() is not third
    widget.ui.nextStudyButton.click()
    assert widget.ui.statusLabel.text() == "No other study of this cohort asks for a review."
    # p4 asks for no review of its own, but another series of its exam names its vertebrae otherwise
    import csv

    with (out / "cohort_studies.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    for row in table:
        row["exam_disagreement"] = "the levels disagree with study x of the same exam" if row["input"] == "p4.nii.gz" \
            else row["exam_disagreement"]
    with (out / "cohort_studies.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    _select(widget, volume)
    recorder.directory = str(out / "studies" / ids["p4.nii.gz"])
    widget.ui.loadResultsButton.click()
    assert widget.ui.labellingLabel.text().endswith("The levels disagree with study x of the same exam.")
    assert widget.ui.labellingLabel.styleSheet() != ""                 # asks for a review
    from SpineNetLib.cohort.tables import studies_asking_for_review

    assert ids["p4.nii.gz"] in studies_asking_for_review(out)        # Next brings it among the others
    widget.ui.inputSelector.setCurrentNode(volume)                  # a volume of no cohort study
    widget.updateWidgets()
    assert not widget.ui.nextStudyButton.isEnabled()


def test_save_results_writes_a_loaded_folder_again_with_the_corrections(panel, tmp_path):
    """Load results... , a level corrected in the vertebra list, Save results: the folder's documents, CSV
    files and preview now carry the corrected levels, replaced together; a folder with DICOM results is
    refused and left as it was; a run of the panel (a temporary folder) has nothing to save into."""
    module, widget, scene, volume, vertebrae = panel
    recorder = module._standins.recorder
    _select(widget, volume)
    results = tmp_path / "results"
    scan = mrml.scan_from_volume_node(volume)
    write_results(results, RunResult(vertebrae_document=vertebrae), scan=scan)
    before = (results / "preview.png").read_bytes()
    recorder.directory = str(results)
    widget.ui.loadResultsButton.click()
    levels = [v["level"] for v in vertebrae["vertebrae"]]
    assert widget.logic.savableResultsFolder(volume) == str(results)
    widget.logic.correctLevel(volume, 0, "T11")
    widget.populateResults()
    widget.ui.saveResultsButton.click()
    assert widget.ui.statusLabel.text().startswith("Wrote vertebrae.json, vertebrae.csv, discs.csv, preview.png")
    saved = json.loads((results / "vertebrae.json").read_text())
    assert saved["corrections"] == [{"vertebra": 0, "level": "T11"}]
    assert [v["level"] for v in saved["vertebrae"]] == documents.corrected_levels(vertebrae, 0, "T11") != levels
    assert (results / "vertebrae.csv").read_text().splitlines()[1].startswith("T11,")
    assert (results / "preview.png").read_bytes() != before

    # DICOM results are made from the DICOM files: the panel does not write them, and changes nothing
    manifest = json.loads((results / "result.json").read_text())
    (results / "segmentation.dcm").write_bytes(b"a DICOM result of an earlier run")
    (results / "result.json").write_text(json.dumps(dict(manifest, dicom=["segmentation.dcm"])))
    kept = {p.name: p.read_bytes() for p in results.iterdir()}
    widget.ui.saveResultsButton.click()
    assert widget.ui.statusLabel.text().startswith("Saving failed: ") and "spinenet correct" in \
        widget.ui.statusLabel.text()
    assert {p.name: p.read_bytes() for p in results.iterdir()} == kept


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

    widget.ui.weightsComboBox.setCurrentIndex(1)          # the official weights: all 11 heads offered
    widget.ui.discTable.selectRow(4)
    widget.ui.showHotspotsButton.click()                   # head "none" (the default): nothing to show
    assert widget.ui.statusLabel.text().startswith("Choose a hotspot head: hotspot maps are computed only")
    assert mrml.result_nodes(scene, volume, "hotspot") == []
    widget.ui.hotspotHeadComboBox.setCurrentText("Pfirrmann")
    widget.ui.showHotspotsButton.click()
    assert widget.ui.statusLabel.text() == ("Hotspots are not available for L4-L5 (Pfirrmann): "
                                            "this run wrote no hotspot maps.")
    from slicer_fake_pipeline import _hotspot

    from SpineNetLib.outputs.files import write_hotspot_maps

    centre = {d["level"]: d["centre_ras"] for d in documents.disc_polygons(vertebrae)}["L4-L5"]
    scan = mrml.scan_from_volume_node(volume)
    write_hotspot_maps(results, [_hotspot(scan, centre, "hotspots/L4-L5_Pfirrmann.nii.gz")])
    widget.ui.showHotspotsButton.click()
    assert widget.ui.statusLabel.text() == "Showing the Pfirrmann hotspots of L4-L5."
    hotspots = mrml.result_nodes(scene, volume, "hotspot")
    assert [n.GetName() for n in hotspots] == ["T2 sagittal lumbar SpineNet hotspot L4-L5 Pfirrmann"]
    heat, heat_affine = mrml.volume_arrays(hotspots[0])
    assert heat.max() == pytest.approx(1.0, abs=0.2)
    np.testing.assert_allclose(heat_affine, mrml.ijk_to_ras(volume), atol=1e-4)
    assert recorder.calls[-1][0] == "layers" and recorder.calls[-1][1]["foreground"] is hotspots[0]
    widget.ui.showHotspotsButton.click()                   # again: replaced, not piled up
    assert len(mrml.result_nodes(scene, volume, "hotspot")) == 1
    widget.ui.hotspotHeadComboBox.setCurrentText("Narrowing")   # a head the run made no map for
    widget.ui.showHotspotsButton.click()
    assert widget.ui.statusLabel.text() == ("Hotspots are not available for L4-L5 (Narrowing): "
                                            "this run wrote hotspot maps only for Pfirrmann.")
    widget.ui.hotspotHeadComboBox.setCurrentText("Pfirrmann")

    # the grading stage's one-map-per-head files (hotspots_<Head>.nii.gz) are shown for any disc
    write_hotspot_maps(results, [_hotspot(scan, centre, "hotspots_Herniation.nii.gz")])
    widget.ui.hotspotHeadComboBox.setCurrentText("Herniation")
    widget.ui.discTable.selectRow(1)
    widget.ui.showHotspotsButton.click()
    assert widget.ui.statusLabel.text() == "Showing the Herniation hotspots of all discs."
    assert "T2 sagittal lumbar SpineNet hotspot all discs Herniation" in [
        n.GetName() for n in mrml.result_nodes(scene, volume, "hotspot")]


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
    settings = widget.logic.workerProcessSettings()      # a worker from before the installation ...
    widget.logic.workerService.warmUp(settings["program"], settings["serveArguments"], settings["environment"],
                                      settings["workingDirectory"])
    warm = standins.FakeProcess.instances[-1]
    widget.logic.installPackages(["torch>=2.1", "pydicom>=2.4"])
    assert calls == [("installTorch", False, ">=2.1")]      # the panel has asked once already
    assert module._standins.recorder.calls[-1] == ("pip_install", "pydicom>=2.4")
    assert warm.killed and not widget.logic.workerService.isAlive()   # ... goes: it holds the old modules
    assert widget.logic.requirements() == ["numpy>=1.24", "scipy>=1.10", "pydicom>=2.4", "SimpleITK>=2.3", "pillow>=10.1",
                                          "scikit-image>=0.22", "python-gdcm>=3.0.10", "torch>=2.1"]
    assert widget.logic.missingPackages() == []   # all importable here


def test_logic_runs_a_pipeline_in_process_and_the_self_test_passes(panel, tmp_path):
    module, widget, scene, volume, vertebrae = panel
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(vertebrae))
    seen = []
    nodes = widget.logic.runSynchronously(volume, pipeline=FAKE, options={"vertebrae": str(truth)},
                                          progress=lambda *a: seen.append(a))
    # through the worker's entry point: its "reading the scan" step, then the pipeline's
    assert seen == [(0, 1, "reading the scan"), (1, 3, "fake detection"), (2, 3, "fake detection"),
                    (3, 3, "fake detection")]
    assert len(nodes.curves) == 7 and widget.logic.summary(volume).startswith("7 vertebrae (T12..S1)")
    # the temporary folder is gone once the results are in the scene (no hotspot maps to keep)
    assert not Path(widget.logic.lastRun.folder).exists() and widget.logic.documents(volume)[2] is None

    test = module.SpineNetTest()
    test.runTest()                      # the module's own self-test, as Slicer runs it
    assert test.messages[-1] == "SpineNet self-test passed"


# --------------------------------------------------------------------------- the logic's run API

class _FakeWorker:
    """Made by the logic's worker factory; the test speaks for the worker (lines, end, cancel)."""

    instances: list = []

    def __init__(self, module, finishOnCancel=True):
        self.base = module.WorkerProcess()
        self.lineReceived, self.finished = self.base.lineReceived, self.base.finished
        self.run, self.running, self.cancelled, self.finishOnCancel = None, False, False, finishOnCancel
        _FakeWorker.instances.append(self)

    def start(self, run):
        self.run, self.running = run, True

    def cancel(self):
        self.cancelled = True
        if self.finishOnCancel:
            self.end(-9, "killed")

    def isRunning(self):
        return self.running

    def say(self, *lines):
        for line in lines:
            self.lineReceived.emit(line)

    def end(self, code=0, errorText=""):
        self.running = False
        self.finished.emit(code, errorText)


@pytest.fixture()
def logic_case(monkeypatch, phantom_case):
    """(module, logic with a fake worker factory, scene, volume, vertebrae document)."""
    source, vertebrae, _ = phantom_case
    scene = mrml.new_scene()
    voxels, affine = mrml.volume_arrays(source)
    module = standins.import_module(monkeypatch, scene)
    _FakeWorker.instances.clear()
    logic = module.SpineNetLogic(scene, workerFactory=lambda: _FakeWorker(module))
    volume = mrml.add_volume(scene, voxels, affine, "T2 sagittal lumbar")
    return module, logic, scene, volume, vertebrae


def test_logic_starts_a_run_without_blocking_and_reports(logic_case):
    from SpineNetLib.apps import worker

    module, logic, scene, volume, vertebrae = logic_case
    signals, callbacks = [], []
    logic.progressReported.connect(lambda *a: signals.append(("progress", a)))
    logic.warningReported.connect(lambda text: signals.append(("warning", text)))
    logic.runFinished.connect(lambda run: signals.append(("finished", run.status)))
    run = logic.startRun(volume, device="cpu", grading=False,
                         onProgress=lambda *a: callbacks.append(("progress", a)),
                         onWarning=lambda text: callbacks.append(("warning", text)),
                         onFinished=lambda run: callbacks.append(("finished", run.message)))
    fake = _FakeWorker.instances[-1]
    # started, not finished: the call returned at once
    assert fake.run is run and run.status == "running" and logic.isRunning() and logic.currentRun is run
    assert run.volumeID == volume.GetID() and not run.isFinished()
    assert run.arguments == ["-m", "SpineNetLib.apps.worker"] + run.workerArguments
    assert run.program == module.SpineNetLogic.pythonExecutable() and run.workingDirectory == module.LIBRARY_PARENT
    args = worker.build_parser().parse_args(run.workerArguments)
    assert (args.device, args.grading, args.weights) == ("cpu", False, "bundled")
    np.testing.assert_array_equal(np.load(args.input), mrml.volume_arrays(volume)[0])
    with pytest.raises(module.SpineNetError, match="already running"):
        logic.startRun(volume)

    fake.say("PROGRESS 1 4 detecting vertebrae", "a library talking", "WARNING this is only a test")
    assert signals == [("progress", (1, 4, "detecting vertebrae")), ("warning", "this is only a test")]
    assert callbacks == signals
    assert run.progress == (1, 4, "detecting vertebrae") and run.warnings == ["this is only a test"]
    result = _write_result(Path(run.output), vertebrae)
    fake.say(f"RESULT {result}")
    assert run.status == "running"                    # the result counts once the worker has ended
    fake.end(0)
    assert not logic.isRunning() and logic.worker is None and logic.lastRun is run
    assert run.status == "done" and run.isFinished() and run.exitCode == 0
    assert run.message == "7 vertebrae (T12..S1), 6 discs, 0 graded.\nWarning: this is only a test"
    assert signals[-1] == ("finished", "done") and callbacks[-1] == ("finished", run.message)
    assert len(run.nodes.curves) == 7 and len(mrml.result_nodes(scene, volume, "vertebra-outline")) == 7
    assert not Path(run.folder).exists()                # temporary: removed once the results are shown
    fake.say("PROGRESS 2 4 late")                     # a finished run ignores its old worker
    fake.end(1)
    assert len(signals) == 3 and run.status == "done"


def test_logic_cancel_error_and_failed_start(logic_case):
    module, logic, scene, volume, vertebrae = logic_case
    assert logic.cancelRun() is False                 # nothing to cancel
    finished = []
    logic.runFinished.connect(finished.append)

    run = logic.startRun(volume)
    _FakeWorker.instances[-1].say("PROGRESS 1 50 detecting vertebrae")
    assert logic.cancelRun() is True
    assert _FakeWorker.instances[-1].cancelled and run.cancelled
    assert (run.status, run.message) == ("cancelled", "Cancelled.") and finished == [run]
    assert not logic.isRunning() and mrml.result_nodes(scene, volume) == []
    assert not (Path(run.folder) / "input").exists()

    run = logic.startRun(volume)
    _FakeWorker.instances[-1].say("ERROR the scan is axial")
    _FakeWorker.instances[-1].end(2)
    assert (run.status, run.message, run.error) == ("failed", "Error: the scan is axial", "the scan is axial")

    run = logic.startRun(volume)
    _FakeWorker.instances[-1].end(1, "Traceback ...\nMemoryError: out of memory")
    assert run.message == "The SpineNet worker stopped (exit code 1) without a result: MemoryError: out of memory"
    assert run.errorText.startswith("Traceback")

    run = logic.startRun(volume)
    _FakeWorker.instances[-1].end(None)
    assert run.status == "failed" and run.message.startswith("Could not start the SpineNet worker (")
    assert [r.status for r in finished] == ["cancelled", "failed", "failed", "failed"]
    assert not logic.isRunning()

    # a worker that cannot even be started leaves the logic idle and the input removed
    class Broken(_FakeWorker):
        def start(self, run):
            raise RuntimeError("no process")

    with pytest.raises(RuntimeError, match="no process"):
        logic.startRun(volume, workerProcess=Broken(module))
    assert not logic.isRunning() and logic.worker is None


def test_logic_waits_for_a_run(logic_case):
    module, logic, scene, volume, vertebrae = logic_case
    run = logic.startRun(volume)
    fake = _FakeWorker.instances[-1]
    result = _write_result(Path(run.output), vertebrae)
    with pytest.raises(module.SpineNetError, match="did not finish within 0.05 s"):
        logic.waitForRun(run, timeout=0.05)
    QtCore.QTimer.singleShot(20, lambda: (fake.say(f"RESULT {result}"), fake.end(0)))
    assert logic.waitForRun(timeout=30) is run and run.status == "done"
    assert logic.waitForRun(run) is run                # already finished: returns at once


def test_in_process_worker_runs_the_worker_entry_point(logic_case, tmp_path):
    """startRun with an InProcessWorker: finished on return; errors and a cancel from a progress callback."""
    module, logic, scene, volume, vertebrae = logic_case
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(vertebrae))
    process = module.InProcessWorker()
    lines = []
    process.lineReceived.connect(lines.append)
    run = logic.startRun(volume, pipeline=FAKE, options={"vertebrae": truth, "hotspot": "L4-L5:Pfirrmann"},
                         workerProcess=process, workFolder=str(tmp_path / "run"))   # the caller's: kept
    assert run.status == "done" and not logic.isRunning() and not process.isRunning()
    assert lines[0] == "PROGRESS 0 1 reading the scan" and lines[-2] == "WARNING this is the fake pipeline"
    assert lines[-1] == f"RESULT {Path(run.output).resolve() / 'result.json'}"
    # the same files as the worker process writes
    assert sorted(p.name for p in Path(run.output).iterdir()) == ["discs.csv", "hotspots", "hotspots.png",
                                                                 "preview.png", "result.json", "vertebrae.csv",
                                                                 "vertebrae.json"]
    assert run.message.endswith("Warning: this is the fake pipeline") and len(run.nodes.curves) == 7

    # a problem with the input: one ERROR line, the error raised again by runSynchronously
    with pytest.raises(module.SpineNetError, match="^the scan is axial$"):
        logic.runSynchronously(volume, pipeline=FAKE, options={"vertebrae": truth, "fail": "the scan is axial"})
    assert (logic.lastRun.status, logic.lastRun.message) == ("failed", "Error: the scan is axial")
    assert logic.lastRun.exitCode == 2
    with pytest.raises(module.SpineNetError, match="cannot import pipeline module 'no_such_module_xyz'"):
        logic.runSynchronously(volume, pipeline="no_such_module_xyz:run")

    # Cancel from a progress callback stops the pipeline at its next report
    seen = []

    def progress(done, total, message):
        seen.append(done)
        if done == 2:
            logic.cancelRun()

    with pytest.raises(module.SpineNetError, match="Cancelled"):
        logic.runSynchronously(volume, pipeline=FAKE, options={"vertebrae": truth, "steps": 6}, progress=progress)
    assert seen == [0, 1, 2] and logic.lastRun.status == "cancelled"
    assert not Path(logic.lastRun.output, "result.json").exists() and not logic.isRunning()


def test_the_widget_only_delegates_to_the_logic(panel, monkeypatch):
    import inspect

    module, widget, scene, volume, _ = panel
    source = inspect.getsource(module.SpineNetWidget)
    for name in ("QProcess", "worker.", "parse_line", "prepareRun", "cleanupRun", "readAll", "read_result"):
        assert name not in source, f"the widget uses {name}: that belongs to the logic"
    # reading a results folder is the logic's too: the "Load results..." button only asks it to
    assert re.findall(r"[\w.]*loadResults(?:OrStudy)?\b", source) == ["self.logic.loadResultsOrStudy"]
    assert not hasattr(widget, "process") and not hasattr(widget, "_buffer")
    _select(widget, volume)
    calls = []
    monkeypatch.setattr(widget.logic, "startRun", lambda volumeNode, **settings: calls.append(("start", volumeNode, settings)))
    widget.ui.deviceComboBox.setCurrentIndex(2)          # cuda
    widget.ui.applyButton.click()
    assert calls == [("start", volume, widget.settings())]
    assert calls[0][2] == {"weights": "bundled", "device": "cuda", "grading": True, "hotspot_head": None,
                           "precision": "fp32", "runtime": "torch", "sequence": None, "compare_series": True,
                           "compare_with": None}
    assert widget.ui.statusLabel.text() == "Starting SpineNet on T2 sagittal lumbar ..."
    assert standins.FakeProcess.instances == []

    monkeypatch.setattr(widget.logic, "isRunning", lambda: True)
    monkeypatch.setattr(widget.logic, "cancelRun", lambda: calls.append(("cancel",)))
    widget.ui.applyButton.click()                         # running: Apply does nothing
    widget.onCancel()
    assert calls[1:] == [("cancel",)] and widget.ui.statusLabel.text() == "Cancelling ..."

    # the logic's signals drive the panel
    widget.logic.progressReported.emit(2, 5, "detecting vertebrae")
    assert (widget.ui.progressBar.maximum(), widget.ui.progressBar.value()) == (5, 2)
    assert widget.ui.statusLabel.text() == "Detecting vertebrae ..."
    widget.logic.warningReported.emit("grading unavailable")
    assert widget.ui.statusLabel.text() == "Warning: grading unavailable"
    monkeypatch.setattr(widget.logic, "isRunning", lambda: False)
    widget.logic.runFinished.emit(type("Run", (), {"status": "failed", "message": "Error: x", "volumeID": None})())
    assert widget.ui.statusLabel.text() == "Error: x" and widget.ui.applyButton.isEnabled()

    # closing the module cancels through the logic and stops listening to it
    monkeypatch.setattr(widget.logic, "cancelRun", lambda: calls.append(("cancel on close",)))
    widget.cleanup()
    assert calls[-1] == ("cancel on close",)
    widget.logic.progressReported.emit(4, 5, "after close")
    assert widget.ui.progressBar.value() == 2


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
    assert widget.logic.isRunning()
    deadline = time.monotonic() + 120
    while widget.logic.isRunning() and time.monotonic() < deadline:
        QtCore.QCoreApplication.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)
    assert not widget.logic.isRunning(), "the worker did not finish"
    assert widget.ui.statusLabel.text().startswith("7 vertebrae (T12..S1), 6 discs, 0 graded."), widget.ui.statusLabel.text()
    assert widget.ui.progressBar.value() == widget.ui.progressBar.maximum() == 4
    assert widget.ui.vertebraTable.rowCount() == 7
    curve = scene.GetFirstNodeByName("T2 sagittal lumbar SpineNet L2")
    np.testing.assert_allclose(curve.GetNthControlPointPositionVector(0),
                               documents.mid_polygon(vertebrae["vertebrae"][2])["corners_ras"][0], atol=1e-6)

    # the process stays running, and the next run is its second request
    service = widget.logic.workerService
    process = service.process
    assert service.isAlive() and process.processId() > 0
    widget.ui.applyButton.click()
    deadline = time.monotonic() + 120
    while widget.logic.isRunning() and time.monotonic() < deadline:
        QtCore.QCoreApplication.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)
    assert widget.logic.lastRun.status == "done", widget.ui.statusLabel.text()
    assert service.process is process and service.isAlive()
    # a run of the panel writes into a temporary folder: nothing to save back into
    assert widget.logic.savableResultsFolder(widget._volume()) is None and not widget.ui.saveResultsButton.isEnabled()

    # a worker that cannot start does not leave the panel waiting
    monkeypatch.setattr(widget.logic, "pythonExecutable", lambda: str(tmp_path / "no-such-python"))
    widget.ui.applyButton.click()
    deadline = time.monotonic() + 30
    while widget.logic.isRunning() and time.monotonic() < deadline:
        QtCore.QCoreApplication.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
    assert not widget.logic.isRunning()
    assert widget.ui.statusLabel.text().startswith("Could not start the SpineNet worker (")
    assert widget.ui.applyButton.isEnabled()
    # killed; Qt's waitForFinished is False for a process whose end the event loop above already handled
    assert process.state() == QtCore.QProcess.ProcessState.NotRunning or process.waitForFinished(10000)
    assert process.exitStatus() == QtCore.QProcess.ExitStatus.CrashExit
    widget.cleanup()
    parent.close()


def test_the_arithmetic_choice_reaches_the_worker(panel):
    """bfloat16 on OpenVINO in the panel runs the worker with --precision bf16 --runtime openvino."""
    module, widget, scene, volume, _ = panel
    _select(widget, volume)
    assert [widget.ui.arithmeticComboBox.itemText(n) for n in range(widget.ui.arithmeticComboBox.count())] == \
        ["float32", "bfloat16", "bfloat16 on OpenVINO"]
    assert widget.ui.arithmeticComboBox.currentText() == "float32"
    widget.ui.arithmeticComboBox.setCurrentText("bfloat16 on OpenVINO")
    widget.ui.applyButton.click()
    process = standins.FakeProcess.instances[-1]
    args = process.workerArguments
    assert args[args.index("--precision") + 1] == "bf16" and args[args.index("--runtime") + 1] == "openvino"
    widget.ui.cancelButton.click()
    assert process.killed and not widget.logic.isRunning()
