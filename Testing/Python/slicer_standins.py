"""Stand-ins for Slicer's ``qt``, ``ctk`` and ``slicer`` modules, so ``SpineNet/SpineNet.py`` runs in CI.

* ``qt``: the real Qt widgets of PySide6 (offscreen), flattened into one
  namespace as PythonQt does; ``QProcess`` and ``QFileDialog`` can be
  replaced by test doubles.
* ``ctk``: ``ctkCollapsibleButton`` as a titled ``QGroupBox``.
* ``slicer``: the real MRML classes of the PyPI ``slicer-core`` package,
  a real headless scene as ``slicer.mrmlScene``, a small ``slicer.util``
  (``loadUI`` through ``QUiLoader`` with the custom widgets registered,
  ``childWidgetVariables``, dialogs that record what they were asked, the
  real ``VTKObservationMixin`` of slicer-core's ``slicer.util``) and
  ``slicer.ScriptedLoadableModule`` base classes.

:func:`render_screenshots` uses the same stand-ins to draw the panel and the
results table to PNG files for the README (``benchmarks/render_slicer_screenshots.py``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtCore import Property, Signal  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "SpineNet" / "SpineNet.py"
UI_FILE = REPO / "SpineNet" / "Resources" / "UI" / "SpineNet.ui"


def application():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication(["spinenet-tests"])


# --------------------------------------------------------------------------- custom widgets

class ctkCollapsibleButton(QtWidgets.QGroupBox):
    """Stand-in: a group box whose title is the ``text`` property."""

    def _text(self):
        return self.title()

    def _setText(self, text):
        self.setTitle(text)

    text = Property(str, _text, _setText)


class qMRMLWidget(QtWidgets.QWidget):
    mrmlSceneChanged = Signal(object)

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Stand-in: lists the scene's nodes of ``nodeTypes`` by name; emits ``currentNodeChanged(node)``."""

    currentNodeChanged = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._types = ["vtkMRMLScalarVolumeNode"]
        self._nodes = []
        self.currentIndexChanged.connect(self._emitNode)

    def _getNodeTypes(self):
        return list(self._types)

    def _setNodeTypes(self, types_):
        self._types = list(types_)

    nodeTypes = Property(list, _getNodeTypes, _setNodeTypes)

    def setMRMLScene(self, scene):
        self._scene = scene
        self.refresh()

    def refresh(self):
        current = self.currentNode()
        self.blockSignals(True)
        self.clear()
        self._nodes = []
        if self._scene is not None:
            for cls in self._types:
                for n in range(self._scene.GetNumberOfNodesByClass(cls)):
                    node = self._scene.GetNthNodeByClass(n, cls)
                    if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute("SpineNet.Result"):
                        continue
                    self._nodes.append(node)
                    self.addItem(node.GetName())
        self.blockSignals(False)
        if current is not None and current in self._nodes:
            self.setCurrentIndex(self._nodes.index(current))
        elif self._nodes:
            self.setCurrentIndex(0)
            self._emitNode(0)

    def currentNode(self):
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def setCurrentNode(self, node):
        if node not in self._nodes:
            self.refresh()
        if node in self._nodes:
            self.setCurrentIndex(self._nodes.index(node))

    def _emitNode(self, index):
        self.currentNodeChanged.emit(self.currentNode())


CUSTOM_WIDGETS = (ctkCollapsibleButton, qMRMLWidget, qMRMLNodeComboBox)


def load_ui(path):
    application()
    loader = QUiLoader()
    for cls in CUSTOM_WIDGETS:
        loader.registerCustomWidget(cls)
    widget = loader.load(str(path))
    if widget is None:
        raise RuntimeError(f"cannot load {path}: {loader.errorString()}")
    return widget


def child_widget_variables(widget):
    names = types.SimpleNamespace()
    for child in widget.findChildren(QtCore.QObject):
        if child.objectName():
            setattr(names, child.objectName(), child)
    return names


# --------------------------------------------------------------------------- test doubles

class FakeSignal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def emit(self, *args):
        for slot in list(self.slots):
            slot(*args)


class FakeProcess:
    """A QProcess double: records how it was started; the test feeds its output and ends it."""

    instances: list = []
    FailedToStart = QtCore.QProcess.ProcessError.FailedToStart
    Crashed = QtCore.QProcess.ProcessError.Crashed

    def __init__(self):
        self.readyReadStandardOutput = FakeSignal()
        self.finished = FakeSignal()
        self.errorOccurred = FakeSignal()
        self.program, self.arguments, self.directory, self.environment = None, [], None, None
        self.started = self.killed = False
        self._stdout, self._stderr, self._code = b"", b"", 0
        FakeProcess.instances.append(self)

    def setProgram(self, program):
        self.program = program

    def setArguments(self, arguments):
        self.arguments = list(arguments)

    def setWorkingDirectory(self, directory):
        self.directory = directory

    def setProcessEnvironment(self, environment):
        self.environment = environment

    def start(self):
        self.started = True

    def kill(self):
        self.killed = True
        self._code = 9
        self.errorOccurred.emit(FakeProcess.Crashed)
        self.finished.emit(9, 1)

    def exitCode(self):
        return self._code

    def readAllStandardOutput(self):
        data, self._stdout = self._stdout, b""
        return QtCore.QByteArray(data)

    def readAllStandardError(self):
        data, self._stderr = self._stderr, b""
        return QtCore.QByteArray(data)

    def feed(self, text: str):
        self._stdout += text.encode()
        self.readyReadStandardOutput.emit()

    def finish(self, code: int = 0, stderr: str = ""):
        self._code, self._stderr = code, stderr.encode()
        self.finished.emit(code, 0)


class Recorder:
    """Stand-ins for slicer.util dialogs and helpers: records calls, answers as told."""

    def __init__(self):
        self.calls = []
        self.confirm = True
        self.directory = ""

    def confirmOkCancelDisplay(self, text, *args, **kwargs):
        self.calls.append(("confirm", text))
        return self.confirm

    def pip_install(self, requirements):
        self.calls.append(("pip_install", requirements))

    def setSliceViewerLayers(self, **kwargs):
        self.calls.append(("layers", kwargs))

    def getExistingDirectory(self, *args):
        self.calls.append(("directory", args))
        return self.directory


# --------------------------------------------------------------------------- the modules

def make_modules(scene, *, fake_process: bool = True):
    """(qt, ctk, slicer, recorder) stand-in modules for SpineNet.py, on ``scene``."""
    import slicer as real_slicer
    import slicer.util  # noqa: F401  (real_slicer.util: Slicer's own util module, part of slicer-core)

    application()
    recorder = Recorder()

    qt = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            if name.startswith("Q"):
                setattr(qt, name, getattr(source, name))
    qt.Qt = QtCore.Qt
    if fake_process:
        qt.QProcess = FakeProcess

    class QFileDialog:
        getExistingDirectory = staticmethod(recorder.getExistingDirectory)

    qt.QFileDialog = QFileDialog

    ctk = types.ModuleType("ctk")
    ctk.ctkCollapsibleButton = ctkCollapsibleButton

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent if parent is not None else QtWidgets.QWidget()
            self.layout = None

        def setup(self):
            self.layout = QtWidgets.QVBoxLayout(self.parent)

        def resourcePath(self, filename):
            module_file = sys.modules[type(self).__module__].__file__
            return os.path.join(os.path.dirname(module_file), "Resources", filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, methodName="runTest"):
            super().__init__(methodName)
            self.messages = []

        def delayDisplay(self, message, msec=None):
            self.messages.append(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)

    slicer = types.ModuleType("slicer")
    slicer.__getattr__ = lambda name: getattr(real_slicer, name)
    slicer.mrmlScene = scene
    slicer.ScriptedLoadableModule = slm
    slicer.util = types.SimpleNamespace(
        loadUI=load_ui, childWidgetVariables=child_widget_variables,
        confirmOkCancelDisplay=recorder.confirmOkCancelDisplay, pip_install=recorder.pip_install,
        setSliceViewerLayers=recorder.setSliceViewerLayers,
        VTKObservationMixin=real_slicer.util.VTKObservationMixin)   # Slicer's own, from slicer-core
    slicer.app = QtWidgets.QApplication.instance()
    return qt, ctk, slicer, slm, recorder


def import_module(monkeypatch, scene, *, fake_process: bool = True):
    """Install the stand-ins into ``sys.modules`` (undone by ``monkeypatch``) and import SpineNet.py."""
    qt, ctk, slicer, slm, recorder = make_modules(scene, fake_process=fake_process)
    for name, module in (("qt", qt), ("ctk", ctk), ("slicer", slicer), ("slicer.ScriptedLoadableModule", slm)):
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("SpineNet", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "SpineNet", module)
    spec.loader.exec_module(module)
    module._standins = types.SimpleNamespace(qt=qt, ctk=ctk, slicer=slicer, recorder=recorder)
    return module


# --------------------------------------------------------------------------- screenshots

class _Patch:
    """A minimal monkeypatch for scripts (setitem on dicts, undone by undo())."""

    def __init__(self):
        self._undo = []

    def setitem(self, mapping, key, value):
        self._undo.append((mapping, key, mapping.get(key, _Patch), ))
        mapping[key] = value

    def undo(self):
        for mapping, key, old in reversed(self._undo):
            if old is _Patch:
                mapping.pop(key, None)
            else:
                mapping[key] = old
        self._undo = []


def demo_scene():
    """A phantom volume and its ground-truth documents (no networks involved)."""
    from SpineNetLib.outputs import documents
    from SpineNetLib.slicer import mrml
    from SpineNetLib.synthetic.phantom import make_phantom

    phantom = make_phantom(fov="lumbar", shape=(192, 192), pixel_spacing=(1.6, 1.6), n_slices=9,
                           pathology={"L4-L5": ["narrow_disc"]})
    scene = mrml.new_scene()
    volume = mrml.add_volume(scene, phantom.voxels_kji, phantom.ijk_to_ras, "T2 sagittal lumbar")
    vertebrae = documents.vertebrae_document_from_truth(phantom.scan, phantom.vertebrae)
    discs = documents.discs_document_from_truth(phantom.scan, phantom.discs)
    return scene, volume, vertebrae, discs


def _fit_table(table):
    """Size a table widget to show every row and column without scroll bars."""
    table.resizeColumnsToContents()
    table.resizeRowsToContents()
    table.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    table.setVerticalScrollBarPolicy(QtCore.Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    frame = 2 * table.frameWidth()
    height = table.horizontalHeader().height() + table.verticalHeader().length() + frame
    width = table.verticalHeader().width() + table.horizontalHeader().length() + frame
    table.setMinimumHeight(height)
    table.setMaximumHeight(height)
    return width, height


def render_screenshots(outdir) -> list[Path]:
    """Render the panel with results, and the results table, to PNG files in ``outdir``."""
    from SpineNetLib.slicer import mrml

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    scene, volume, vertebrae, discs = demo_scene()
    patch = _Patch()
    try:
        qt, ctk, slicer, slm, _ = make_modules(scene)
        for name, module in (("qt", qt), ("ctk", ctk), ("slicer", slicer), ("slicer.ScriptedLoadableModule", slm)):
            patch.setitem(sys.modules, name, module)
        spec = importlib.util.spec_from_file_location("SpineNet", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, "SpineNet", module)
        spec.loader.exec_module(module)

        panel = QtWidgets.QWidget()
        widget = module.SpineNetWidget(panel)
        widget.setup()
        widget.logic.showResults(volume, vertebrae, discs)
        widget.ui.inputSelector.refresh()
        widget.ui.inputSelector.setCurrentNode(volume)
        widget.populateResults()
        widget.ui.progressBar.setMaximum(10)
        widget.ui.progressBar.setValue(10)
        widget.setStatus(widget.logic.summary(volume))
        widget.updateWidgets()
        widget.ui.discTable.selectRow(4)
        panel.resize(460, 400)
        panel.show()
        application().processEvents()
        _fit_table(widget.ui.discTable)
        _fit_table(widget.ui.vertebraTable)
        panel.resize(460, panel.sizeHint().height())
        application().processEvents()
        panel_png = outdir / "slicer_panel.png"
        panel.grab().save(str(panel_png))

        table_node = mrml.result_nodes(scene, volume, "grades")[0]
        names, rows = mrml.table_rows(table_node)
        view = QtWidgets.QTableWidget(len(rows), len(names))
        headers = []
        for name in names:
            unit = table_node.GetColumnUnitLabel(name)
            headers.append(f"{name}\n[{unit}]" if unit else name)
        view.setHorizontalHeaderLabels(headers)
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                try:
                    text = f"{float(text):.1f}" if c else text
                except ValueError:
                    pass
                item = QtWidgets.QTableWidgetItem(text)
                item.setTextAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
                view.setItem(r, c, item)
        view.setAlternatingRowColors(True)
        view.verticalHeader().setVisible(False)
        view.show()
        application().processEvents()
        width, height = _fit_table(view)
        view.resize(width, height)
        application().processEvents()
        table_png = outdir / "slicer_results_table.png"
        view.grab().save(str(table_png))
        panel.close()
        view.close()
        return [panel_png, table_png]
    finally:
        patch.undo()
