"""Slicer conventions of the module: parameter node, node names, one install question, temporary files, reload.

Like test_slicer_ui.py, ``SpineNet/SpineNet.py`` runs with the stand-ins of
slicer_standins.py (PySide6 offscreen for the panel, the real MRML of
slicer-core for the scene, the parameter node and the saved ``.mrb``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer")
pytest.importorskip("PySide6")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer_standins as standins  # noqa: E402
from PySide6 import QtWidgets  # noqa: E402

from SpineNetLib.outputs.files import write_results  # noqa: E402
from SpineNetLib.pipeline import RunResult  # noqa: E402
from SpineNetLib.slicer import mrml  # noqa: E402

from slicer_fake_pipeline import PIPELINE_SPEC as FAKE  # noqa: E402


@pytest.fixture(scope="module")
def phantom_case():
    scene, volume, vertebrae, discs = standins.demo_scene()
    voxels, affine = mrml.volume_arrays(volume)
    return voxels, affine, vertebrae


def _widget(module):
    parent = QtWidgets.QWidget()
    widget = module.SpineNetWidget(parent)
    widget.setup()
    widget._testParent = parent          # keep the Qt parent alive as long as the widget
    return widget


@pytest.fixture()
def two_volumes(monkeypatch, phantom_case):
    """(module, scene, first volume, second volume, vertebrae document) on a fresh scene, no panel yet."""
    voxels, affine, vertebrae = phantom_case
    module, scene, first, second = standins.module_on_new_scene(
        monkeypatch, voxels, affine, names=("T2 sagittal lumbar", "T1 sagittal lumbar"))
    return module, scene, first, second, vertebrae


def _select(widget, volume):
    widget.ui.inputSelector.refresh()
    widget.ui.inputSelector.setCurrentNode(volume)


def _finish_run(process_index, vertebrae, output):
    """Let the recording QProcess of a panel run report a result written into ``output``."""
    write_results(output, RunResult(vertebrae_document=vertebrae))
    process = standins.FakeProcess.instances[process_index]
    process.feed(f"RESULT {Path(output) / 'result.json'}\n")
    process.finish(0)


# --------------------------------------------------------------------------- parameter node

def test_the_parameter_node_holds_inputs_options_and_results_through_a_saved_scene(two_volumes, monkeypatch,
                                                                                   tmp_path):
    module, scene, first, second, vertebrae = two_volumes
    widget = _widget(module)
    node = widget.logic.getParameterNode()
    assert node is widget._parameterNode and node.GetSingletonTag() == "SpineNet"
    assert node.GetAttribute("ModuleName") == "SpineNet"
    assert {name: node.GetParameter(name) for name in module.PARAMETER_DEFAULTS} == module.PARAMETER_DEFAULTS

    # the panel writes what the user chooses into the parameter node
    _select(widget, second)
    widget.ui.weightsComboBox.setCurrentIndex(2)
    widget.ui.weightsFolderLineEdit.setText("/data/my weights")
    widget.ui.deviceComboBox.setCurrentIndex(1)
    widget.ui.arithmeticComboBox.setCurrentText("bfloat16")
    widget.ui.hotspotHeadComboBox.setCurrentText("Pfirrmann")
    widget.ui.sequenceComboBox.setCurrentText("T2")
    widget.ui.compareWithSelector.refresh()
    assert widget.ui.compareWithSelector.currentNode() is None      # none until the user chooses one
    widget.ui.compareWithSelector.setCurrentNode(first)
    assert node.GetNodeReference("CompareWithVolume") is first
    assert widget.settings()["compare_with"] is first
    assert module.SpineNetLogic.runSettings(node)["compare_with"] is first
    widget.ui.compareSeriesCheckBox.setChecked(False)   # no comparison: the volume chosen is kept, but not used
    assert not widget.ui.compareWithSelector.isEnabled() and node.GetNodeReference("CompareWithVolume") is first
    assert node.GetNodeReference("InputVolume") is second
    assert [node.GetParameter(n) for n in ("Weights", "WeightsFolder", "Device", "Arithmetic", "Grading",
                                           "Sequence", "HotspotHead", "CompareSeries")] == \
        ["folder", "/data/my weights", "cpu", "bfloat16", "true", "T2", "Pfirrmann", "false"]
    assert module.SpineNetLogic.runSettings(node) == widget.settings() == {
        "weights": "/data/my weights", "device": "cpu", "grading": True, "hotspot_head": "Pfirrmann",
        "precision": "bf16", "runtime": "torch", "sequence": "T2", "compare_series": False, "compare_with": None}

    # results of the input volume are referenced from the parameter node
    write_results(tmp_path / "results", RunResult(vertebrae_document=vertebrae))
    nodes = widget.logic.loadResults(second, str(tmp_path / "results" / "result.json"))
    assert [node.GetNthNodeReference("ResultOutline", n) for n in range(7)] == nodes.curves
    assert node.GetNodeReference("ResultSegmentation") is nodes.segmentation
    assert node.GetNodeReference("ResultTable") is nodes.table
    assert node.GetNodeReference("ResultCentroids") is nodes.centroids
    assert node.GetNodeReference("ResultVertebraeDocument") is nodes.documents[0]
    assert widget.ui.vertebraTable.rowCount() == 7

    # the parameter node drives the panel: a script (or a loaded scene) changes it, the panel follows
    node.SetParameter("Grading", "false")
    assert not widget.ui.gradingCheckBox.isChecked() and not widget.ui.hotspotHeadComboBox.isEnabled()
    node.SetParameter("Device", "cuda")
    assert widget.ui.deviceComboBox.currentText() == "cuda"
    node.SetParameter("Arithmetic", "bfloat16 on OpenVINO")
    assert widget.ui.arithmeticComboBox.currentText() == "bfloat16 on OpenVINO"
    node.SetParameter("CompareSeries", "true")
    assert widget.ui.compareSeriesCheckBox.isChecked()
    widget.cleanup()

    # saved and loaded again: the same settings, input and results in a new panel
    bundle = mrml.write_mrb(scene, tmp_path / "scene.mrb")
    loaded = mrml.load_mrb(bundle)
    module = standins.import_module(monkeypatch, loaded)
    restored = _widget(module)
    volume = restored._volume()
    assert volume is not None and volume.GetName() == "T1 sagittal lumbar"
    assert restored._parameterNode.GetNodeReference("InputVolume") is volume
    assert restored.settings() == {"weights": "/data/my weights", "device": "cuda", "grading": False,
                                   "hotspot_head": "Pfirrmann", "precision": "bf16", "runtime": "openvino",
                                   "sequence": "T2", "compare_series": True,
                                   "compare_with": restored._parameterNode.GetNodeReference("CompareWithVolume")}
    assert restored.settings()["compare_with"].GetName() == first.GetName()
    assert restored.ui.weightsFolderLineEdit.isEnabled() and not restored.ui.gradingCheckBox.isChecked()
    assert restored.ui.vertebraTable.rowCount() == 7 and restored.ui.discTable.rowCount() == 6
    assert restored._parameterNode.GetNumberOfNodeReferences("ResultOutline") == 7
    assert restored._parameterNode.GetNodeReference("ResultSegmentation").GetName() == \
        "T1 sagittal lumbar SpineNet segmentation"
    assert restored.ui.exportCsvButton.isEnabled()
    restored.cleanup()


def test_a_closed_scene_gives_a_fresh_parameter_node(two_volumes):
    module, scene, first, second, vertebrae = two_volumes
    widget = _widget(module)
    widget.ui.deviceComboBox.setCurrentIndex(2)
    assert widget._parameterNode.GetParameter("Device") == "cuda"
    scene.Clear(0)                                   # File > Close Scene
    node = widget._parameterNode
    assert node is not None and node is widget.logic.getParameterNode()
    assert node.GetParameter("Device") == "auto" and node.GetAttribute("ModuleName") == "SpineNet"
    assert widget.ui.deviceComboBox.currentText() == "auto"
    widget.cleanup()


# --------------------------------------------------------------------------- names, several volumes

def test_names_carry_the_volume_and_two_volumes_keep_their_own_results(two_volumes, tmp_path):
    module, scene, first, second, vertebrae = two_volumes
    widget = _widget(module)
    _select(widget, first)
    widget.ui.applyButton.click()
    _finish_run(-1, vertebrae, tmp_path / "first")
    firstNodes = {n.GetID(): n.GetName() for n in mrml.result_nodes(scene, first)}
    assert len(firstNodes) == 11
    assert scene.GetFirstNodeByName("T2 sagittal lumbar SpineNet L4") is not None
    assert "T2 sagittal lumbar SpineNet segmentation" in firstNodes.values()

    _select(widget, second)
    assert widget.ui.vertebraTable.rowCount() == 0   # the second volume has no results yet
    widget.ui.applyButton.click()
    _finish_run(-1, vertebrae, tmp_path / "second")
    # the first volume's nodes are untouched (same nodes, same names), the second has its own
    assert {n.GetID(): n.GetName() for n in mrml.result_nodes(scene, first)} == firstNodes
    secondNodes = mrml.result_nodes(scene, second)
    assert len(secondNodes) == 11 and not {n.GetID() for n in secondNodes} & set(firstNodes)
    assert all(n.GetName().startswith("T1 sagittal lumbar SpineNet ") for n in secondNodes)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    # the parameter node references the results of the selected volume
    node = widget._parameterNode
    assert node.GetNodeReference("ResultSegmentation").GetName() == "T1 sagittal lumbar SpineNet segmentation"
    _select(widget, first)
    assert node.GetNodeReference("ResultSegmentation").GetName() == "T2 sagittal lumbar SpineNet segmentation"
    assert widget.ui.vertebraTable.rowCount() == 7
    # a correction on the first volume leaves the second alone
    widget._levelCombos[0].textActivated.emit("T11")
    assert scene.GetFirstNodeByName("T2 sagittal lumbar SpineNet T11") is not None
    assert scene.GetFirstNodeByName("T1 sagittal lumbar SpineNet T11") is None
    assert [n.GetID() for n in mrml.result_nodes(scene, second)] == [n.GetID() for n in secondNodes]
    widget.cleanup()


# --------------------------------------------------------------------------- one question before installing

def test_one_confirmation_covers_every_package_to_install(two_volumes, monkeypatch):
    module, scene, first, second, vertebrae = two_volumes
    widget = _widget(module)
    _select(widget, first)
    recorder = module._standins.recorder
    torch_calls = []

    class PyTorchUtilsLogic:
        """The PyTorch extension: asks the user itself when askConfirmation is True."""

        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
            if askConfirmation and not recorder.confirmOkCancelDisplay("Install PyTorch?"):
                return None
            torch_calls.append(torchVersionRequirement)
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", type(sys)("PyTorchUtils"))
    sys.modules["PyTorchUtils"].PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setattr(widget.logic, "missingPackages", lambda: ["pydicom>=2.4", "torch>=2.1"])
    widget.ui.applyButton.click()
    prompts = [text for kind, text in recorder.calls if kind == "confirm"]
    assert len(prompts) == 1                                   # asked once, for everything
    assert "pydicom>=2.4" in prompts[0] and "torch>=2.1" in prompts[0] and "PyTorch extension" in prompts[0]
    assert torch_calls == [">=2.1"] and ("pip_install", "pydicom>=2.4") in recorder.calls
    assert standins.FakeProcess.instances[-1].started         # then the run starts
    widget.ui.cancelButton.click()
    widget.cleanup()


# --------------------------------------------------------------------------- temporary files

def test_the_temporary_folder_goes_once_the_results_are_in_the_scene(two_volumes, tmp_path):
    module, scene, first, second, vertebrae = two_volumes
    logic = module.SpineNetLogic(scene)
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(vertebrae))

    # no hotspot maps: nothing is kept
    logic.runSynchronously(first, pipeline=FAKE, options={"vertebrae": truth})
    plain = logic.lastRun
    assert plain.temporary and not Path(plain.folder).exists()
    assert logic.documents(first)[2] is None and logic.temporaryFolders == {}

    # hotspot maps: only they stay, while these results are shown, for Show hotspots
    logic.runSynchronously(first, pipeline=FAKE, options={"vertebrae": truth, "hotspot": "L4-L5:Pfirrmann"})
    kept = logic.lastRun
    files = sorted(p.relative_to(kept.folder).as_posix() for p in Path(kept.folder).rglob("*") if p.is_file())
    assert files == ["results/hotspots/L4-L5_Pfirrmann.nii.gz", "results/vertebrae.json"]
    node, message = logic.showHotspots(first, "L4-L5", "Pfirrmann")
    assert node is not None and message == "Showing the Pfirrmann hotspots of L4-L5."
    assert node.GetName() == "T2 sagittal lumbar SpineNet hotspot L4-L5 Pfirrmann"
    levels = [v["level"] for v in vertebrae["vertebrae"]]
    below = levels.index("L4")
    logic.correctLevel(first, below, "L3")              # the same results, corrected: still kept
    assert Path(kept.folder).exists()
    # the disc once named L4-L5 is L3-L4 now: its map is found under its new name, and no other disc's
    node, message = logic.showHotspots(first, "L3-L4", "Pfirrmann")
    assert node is not None and message == "Showing the Pfirrmann hotspots of L3-L4."
    assert node.GetName() == "T2 sagittal lumbar SpineNet hotspot L3-L4 Pfirrmann"
    assert logic.showHotspots(first, "L4-L5", "Pfirrmann")[0] is None

    # replaced by the next run's results: removed
    logic.runSynchronously(first, pipeline=FAKE, options={"vertebrae": truth, "hotspot": "L4-L5:Pfirrmann"})
    assert not Path(kept.folder).exists() and Path(logic.lastRun.folder).exists()

    # a failed run keeps nothing; the caller's own work folder is never removed
    with pytest.raises(module.SpineNetError):
        logic.runSynchronously(second, pipeline=FAKE, options={"vertebrae": truth, "fail": "the scan is axial"})
    assert not Path(logic.lastRun.folder).exists()
    logic.runSynchronously(second, pipeline=FAKE, options={"vertebrae": truth}, workFolder=str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "results" / "result.json").is_file()

    # cleanup (module closed or reloaded) removes what was kept, and the scene forgets the folder
    last = logic.lastRun if logic.lastRun.temporary else kept
    logic.cleanup()
    assert logic.temporaryFolders == {} and logic.documents(first)[2] is None
    assert not any(Path(folder).exists() for folder in (plain.folder, kept.folder, last.folder))
    assert logic.showHotspots(first, "L4-L5", "Pfirrmann")[0] is None
    assert (tmp_path / "mine" / "results" / "result.json").is_file()


def test_the_panel_removes_its_folders_on_cleanup_and_scene_close(two_volumes, tmp_path):
    module, scene, first, second, vertebrae = two_volumes
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(vertebrae))
    widget = _widget(module)
    widget.logic.runSynchronously(first, pipeline=FAKE, options={"vertebrae": truth, "hotspot": "L4-L5:Pfirrmann"})
    folder = Path(widget.logic.lastRun.folder)
    assert folder.exists() and widget._volume() is first
    node, _ = widget.logic.showHotspots(first, "L4-L5", "Pfirrmann")
    assert widget._parameterNode.GetNodeReference("ResultHotspot") is node
    scene.Clear(0)                                    # the results go, and with them their folder
    assert not folder.exists() and widget.logic.temporaryFolders == {}

    volume = mrml.add_volume(scene, *mrml.volume_arrays(second), "after closing")
    widget.logic.runSynchronously(volume, pipeline=FAKE, options={"vertebrae": truth, "hotspot": "L4-L5:Pfirrmann"})
    folder = Path(widget.logic.lastRun.folder)
    assert folder.exists()
    widget.cleanup()                                  # module closed (or reloaded): removed at the latest now
    assert not folder.exists()


# --------------------------------------------------------------------------- reload

def test_the_widget_can_be_set_up_twice_and_cleanup_lets_go(two_volumes, monkeypatch, tmp_path):
    module, scene, first, second, vertebrae = two_volumes
    old = _widget(module)
    _select(old, second)
    old.ui.deviceComboBox.setCurrentIndex(1)
    node = old._parameterNode
    assert len(old.Observations) == 3                 # scene close (start, end) and the parameter node
    old.cleanup()
    assert old.Observations == [] and old._parameterNode is None
    old.cleanup()                                     # twice is harmless (Slicer may call it on exit too)

    # Reload: the module file runs again (with its helper package afresh) and sets up a new panel
    reloaded = standins.import_module(monkeypatch, scene)
    assert reloaded.SpineNetLogic is not module.SpineNetLogic
    assert sys.modules["SpineNetModuleLib.logic"].SpineNetLogic is reloaded.SpineNetLogic
    new = _widget(reloaded)
    assert new._parameterNode is node and new._volume() is second
    assert new.ui.deviceComboBox.currentText() == "cpu"
    node.SetParameter("Device", "cuda")               # only the new panel follows the node
    assert new.ui.deviceComboBox.currentText() == "cuda" and old.ui.deviceComboBox.currentText() == "cpu"
    old.logic.progressReported.emit(1, 2, "the old logic")
    assert old.ui.progressBar.value() == 0
    new.ui.applyButton.click()
    _finish_run(-1, vertebrae, tmp_path / "results")
    assert new.ui.vertebraTable.rowCount() == 7 and old.ui.vertebraTable.rowCount() == 0
    # and a third time, while results are shown
    new.cleanup()
    third = _widget(reloaded)
    assert third._volume() is second and third.ui.vertebraTable.rowCount() == 7
    third.cleanup()
