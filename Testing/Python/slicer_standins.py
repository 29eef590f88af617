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

:func:`render_screenshots` uses the same stand-ins to run the real module (bundled
networks) on the ``spinenet demo`` phantom and draw the panel and the results table
to PNG files for the README, and :func:`render_slice_view` draws the scene's nodes as
Slicer's sagittal slice view does, with slicer-core's slice logic and Slicer's
displayable managers in an offscreen VTK window (``benchmarks/render_slicer_screenshots.py``).
"""

from __future__ import annotations

import json
import functools
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
    """Stand-in: lists the scene's nodes of ``nodeTypes`` by name, after a "None" item with ``noneEnabled`` (which
    is then chosen until a node is); emits ``currentNodeChanged(node)``."""

    currentNodeChanged = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._types = ["vtkMRMLScalarVolumeNode"]
        self._nodes = []
        self._none = False
        self.currentIndexChanged.connect(self._emitNode)

    def _getNodeTypes(self):
        return list(self._types)

    def _setNodeTypes(self, types_):
        self._types = list(types_)

    nodeTypes = Property(list, _getNodeTypes, _setNodeTypes)

    def _getNoneEnabled(self):
        return self._none

    def _setNoneEnabled(self, enabled):
        self._none = bool(enabled)
        self.refresh()

    noneEnabled = Property(bool, _getNoneEnabled, _setNoneEnabled)

    def setMRMLScene(self, scene):
        self._scene = scene
        self.refresh()

    def refresh(self):
        current = self.currentNode()
        self.blockSignals(True)
        self.clear()
        self._nodes = [None] if self._none else []
        if self._none:
            self.addItem("None")
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
        elif self._none:
            self.setCurrentIndex(0)
            if current is not None:   # its node left the scene
                self._emitNode(0)
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
        self.started = self.killed = self.inputClosed = False
        self.requests = []
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

    def write(self, data):
        """A request to a served worker (one JSON list of worker arguments per line)."""
        text = bytes(data.data() if hasattr(data, "data") else data).decode("utf-8")
        self.requests += [json.loads(line) for line in text.splitlines() if line.strip()]
        return len(text)

    def closeWriteChannel(self):
        self.inputClosed = True

    @property
    def workerArguments(self):
        """The worker arguments of the last run: its request to a served worker, else the command line's."""
        if self.requests:
            return self.requests[-1]
        return self.arguments[self.arguments.index("SpineNetLib.apps.worker") + 1:]

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


def module_on_new_scene(monkeypatch, voxels, affine, names=("T2 sagittal lumbar",)):
    """(module, scene, *volumes): the SpineNet module imported on a fresh scene that holds one volume per
    name (these voxels and IJK-to-RAS), with no fake worker process left from an earlier test."""
    from SpineNetLib.slicer import mrml

    scene = mrml.new_scene()
    module = import_module(monkeypatch, scene)
    FakeProcess.instances.clear()
    return (module, scene, *(mrml.add_volume(scene, voxels, affine, name) for name in names))


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
    header = table.horizontalHeader()
    height = max(header.height(), header.sizeHint().height()) + table.verticalHeader().length() + frame
    rows = table.verticalHeader()
    width = (0 if rows.isHidden() else rows.width()) + header.length() + frame
    table.setMinimumHeight(height)
    table.setMaximumHeight(height)
    return width, height


#: The phantom ``spinenet demo`` writes (its default arguments: lumbar, T2, seed 7), as keyword
#: arguments of :func:`SpineNetLib.synthetic.phantom.make_phantom` (see ``command_demo`` in apps/cli.py).
DEMO_PHANTOM = {"fov": "lumbar", "contrast": "T2", "seed": 7, "variability": 1.0, "include_s2": True}
#: The volume's name: Slicer names a volume loaded from ``phantom.nii.gz`` "phantom".
DEMO_VOLUME_NAME = "phantom"
#: Displayable managers of the slice view, as Slicer's slice views have them for these nodes.
#: (Slicer's others are left out: nothing of theirs is shown by default, and the orientation
#: marker and ruler managers crash without a Qt view around them.)
SLICE_VIEW_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager")
#: Size of the rendered slice view (pixels); in the screenshots its height follows the panel's.
SLICE_VIEW_SIZE = (600, 600)
SLICE_VIEW_WIDTH = SLICE_VIEW_SIZE[0]
#: Height of the bar above the slice view in the screenshots (pixels).
VIEW_BAR_HEIGHT = 22


def prepare_for_views(scene) -> None:
    """Give a ``mrml.new_scene`` scene what the Slicer application adds before anything is shown (once):
    the default colour tables (a volume's display node refers to "Grey") and the interaction node."""
    from SpineNetLib.slicer import mrml

    app = scene._spinenet_keep_alive[0]
    if app.GetModuleLogic("Colors") is None:
        colors = mrml.slicer_class("vtkMRMLColorLogic")()   # Slicer's default colour tables (no colour files)
        colors.SetMRMLApplicationLogic(app)
        colors.SetMRMLScene(scene)
        app.SetModuleLogic("Colors", colors)
        scene._spinenet_keep_alive.append(colors)
    if scene.GetFirstNodeByClass("vtkMRMLInteractionNode") is None:
        interaction = mrml.slicer_class("vtkMRMLInteractionNode")()
        interaction.SetSingletonTag("Singleton")
        scene.AddNode(interaction)


def screenshot_scene():
    """(scene, volume): a headless scene as Slicer starts one, holding the ``spinenet demo`` phantom.

    ``mrml.new_scene`` plus :func:`prepare_for_views`, so the volume is shown in
    grey with automatic window/level, as a volume loaded in Slicer is.
    """
    from SpineNetLib.slicer import mrml
    from SpineNetLib.synthetic.phantom import make_phantom

    scene = mrml.new_scene()
    prepare_for_views(scene)
    phantom = make_phantom(**DEMO_PHANTOM)
    volume = mrml.add_volume(scene, phantom.voxels_kji, phantom.ijk_to_ras, DEMO_VOLUME_NAME)
    return scene, volume


def _offscreen_environment() -> dict:
    """The environment for VTK offscreen rendering: EGL (Mesa's software renderer works) without an X display."""
    env = dict(os.environ)
    if not env.get("DISPLAY"):
        env.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    return env


_PROBE = """
import vtk
window = vtk.vtkRenderWindow()
window.SetOffScreenRendering(1)
window.SetSize(8, 8)
renderer = vtk.vtkRenderer()
renderer.SetBackground(1.0, 0.5, 0.0)
window.AddRenderer(renderer)
window.Render()
grab = vtk.vtkWindowToImageFilter()
grab.SetInput(window)
grab.Update()
print("PIXEL", grab.GetOutput().GetScalarComponentAsDouble(4, 4, 0, 0))
"""


@functools.lru_cache(maxsize=None)
def offscreen_rendering_works(timeout: float = 60) -> bool:
    """Whether VTK renders offscreen here (tried once, in a child process: a missing OpenGL can crash it)."""
    import subprocess

    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=_offscreen_environment(), capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "PIXEL 255.0" in proc.stdout


def render_slice_view(scene, volume, size=SLICE_VIEW_SIZE, *, zoom_to_spine: bool = False):
    """The volume's middle sagittal slice with the scene's nodes, as Slicer's sagittal (Yellow) view draws it.

    Real Slicer rendering, without Slicer's Qt: slicer-core's ``vtkMRMLSliceLogic``
    reslices and blends the layers (the volume with its display node's grey
    colours and window/level), and Slicer's own displayable managers
    (:data:`SLICE_VIEW_MANAGERS`) draw the segmentation's fill and outlines
    and the markups (curves with their names, points with their labels) into
    an offscreen VTK render window.  Slicer's sagittal orientation shows
    anterior on the left and superior up.  The view first fits the whole
    volume (Slicer's "reset field of view"); ``zoom_to_spine`` then zooms so
    the volume's height fills the view, centred on the vertebrae's centroids.
    The slice and composite nodes the view made are removed again.  Returns
    ``(rgb array [row, col, 3] uint8, slice offset in mm, 1-based slice
    number)``.  Call only when :func:`offscreen_rendering_works`.
    """
    from SpineNetLib.slicer import mrml
    from vtk.util import numpy_support

    os.environ.update({k: v for k, v in _offscreen_environment().items() if k == "VTK_DEFAULT_OPENGL_WINDOW"})
    import vtk

    width, height = size
    prepare_for_views(scene)
    app = scene._spinenet_keep_alive[0]
    vtk.vtkMapper.SetResolveCoincidentTopologyToPolygonOffset()  # as the Slicer application sets it
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.0, 0.0, 0.0)
    window.AddRenderer(renderer)
    interactor = vtk.vtkGenericRenderWindowInteractor()   # the markups widgets expect one (never started)
    interactor.SetRenderWindow(window)

    logic = mrml.slicer_class("vtkMRMLSliceLogic")()
    logic.SetMRMLApplicationLogic(app)
    logic.SetMRMLScene(scene)
    if app.GetSliceLogics() is None:
        app.SetSliceLogics(vtk.vtkCollection())
    app.GetSliceLogics().AddItem(logic)
    slice_node = logic.AddSliceNode("Yellow")
    if not slice_node.HasSliceOrientationPreset("Sagittal"):
        slice_node.AddDefaultSliceOrientationPresets(slice_node)
    slice_node.SetOrientation("Sagittal")
    slice_node.SetDimensions(width, height, 1)
    logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
    logic.FitSliceToBackground(width, height)
    if zoom_to_spine:
        # as a user zooms in a tall view: the volume's full height fills the view, centred on the vertebrae
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        fov_s = bounds[5] - bounds[4]
        slice_node.SetFieldOfView(fov_s * width / height, fov_s, slice_node.GetFieldOfView()[2])
        centroids = mrml.result_nodes(scene, volume, "centroids")
        points = [centroids[0].GetNthControlPointPosition(n) for n in range(centroids[0].GetNumberOfControlPoints())] \
            if centroids else []
        anterior = sum(p[1] for p in points) / len(points) if points else (bounds[2] + bounds[3]) / 2
        slice_node.JumpSliceByCentering(logic.GetSliceOffset(), anterior, (bounds[4] + bounds[5]) / 2)
    logic.SnapSliceOffsetToIJK()

    # the slice image, as qMRMLSliceView shows it: a 2D image actor behind everything else
    mapper = vtk.vtkImageMapper()
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    mapper.SetInputConnection(logic.GetImageDataConnection())
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    actor.GetProperty().SetDisplayLocationToBackground()
    renderer.AddViewProp(actor)

    group = mrml.slicer_class("vtkMRMLDisplayableManagerGroup")()
    group.SetRenderer(renderer)
    for name in SLICE_VIEW_MANAGERS:
        manager = mrml.slicer_class(name)()
        manager.SetMRMLApplicationLogic(app)
        group.AddDisplayableManager(manager)
    group.SetMRMLDisplayableNode(slice_node)
    window.Render()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3].copy()
    offset = logic.GetSliceOffset()
    index = logic.GetSliceIndexFromOffset(offset, volume)   # 1-based, as Slicer shows it
    # leave the scene as it was: the view's slice and composite nodes go with it
    group.SetMRMLDisplayableNode(None)
    app.GetSliceLogics().RemoveItem(logic)
    composite = logic.GetSliceCompositeNode()
    logic.SetMRMLScene(None)
    for node in (slice_node, composite):
        if node is not None and node.GetScene() is scene:
            scene.RemoveNode(node)
    window.Finalize()
    return pixels, offset, index


def _qimage(pixels):
    """A QImage (own copy) of an RGB uint8 array [row, col, 3]."""
    import numpy as np

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w, _ = pixels.shape
    return QtGui.QImage(pixels.data, w, h, 3 * w, QtGui.QImage.Format.Format_RGB888).copy()


def _save_small_png(image: "QtGui.QImage", path: Path, colours: int = 256) -> Path:
    """Save a QImage as a palette PNG (octree colours, no dithering): screenshots stay small."""
    import io

    from PIL import Image

    buffer = QtCore.QBuffer()
    buffer.open(QtCore.QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    picture = Image.open(io.BytesIO(bytes(buffer.data()))).convert("RGB")
    picture.quantize(colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def _view_with_bar(pixels, text: str) -> QtWidgets.QWidget:
    """The rendered slice view under a bar in the colour of Slicer's Yellow (sagittal) view, saying what it shows."""
    box = QtWidgets.QWidget()
    layout = QtWidgets.QVBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.setSpacing(0)
    bar = QtWidgets.QLabel(text)
    bar.setStyleSheet("QLabel { background-color: #ede28a; color: #000000; padding: 0px 6px; }")
    bar.setFixedHeight(VIEW_BAR_HEIGHT)
    view = QtWidgets.QLabel()
    view.setPixmap(QtGui.QPixmap.fromImage(_qimage(pixels)))
    layout.addWidget(bar)
    layout.addWidget(view)
    return box


#: Columns per block of the results table screenshot (the level column starts every block).
TABLE_BLOCK_COLUMNS = 10


def _header_text(name: str, unit: str) -> str:
    """A column name broken after the underscore nearest its middle (the name stays exact), then its unit."""
    cuts = [i + 1 for i, ch in enumerate(name) if ch == "_"]
    if len(name) > 12 and cuts:
        cut = min(cuts, key=lambda i: abs(i - len(name) / 2))
        name = name[:cut] + "\n" + name[cut:]
    return f"{name}\n[{unit}]" if unit else name


def _table_node_view(table_node, block_columns: int = TABLE_BLOCK_COLUMNS) -> QtWidgets.QWidget:
    """The table node's cells as table widgets, the columns in blocks stacked top to bottom.

    Cells as the node's ``GetCellText`` gives them (as Slicer's table view
    shows them), an empty cell for a missing value.  Every block starts with
    the first column (the disc's level).
    """
    table = table_node.GetTable()
    n_columns, n_rows = table.GetNumberOfColumns(), table_node.GetNumberOfRows()

    def cell(r, c):
        text = table_node.GetCellText(r, c)
        return "" if text.lower() == "nan" else text

    box = QtWidgets.QWidget()
    layout = QtWidgets.QVBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.setSpacing(6)
    others = list(range(1, n_columns))
    widths = []
    for start in range(0, len(others), block_columns):
        columns = [0] + others[start:start + block_columns]
        view = QtWidgets.QTableWidget(n_rows, len(columns))
        view.setHorizontalHeaderLabels([_header_text(table.GetColumnName(c), table_node.GetColumnUnitLabel(
            table.GetColumnName(c))) for c in columns])
        for r in range(n_rows):
            for k, c in enumerate(columns):
                item = QtWidgets.QTableWidgetItem(cell(r, c))
                item.setTextAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
                view.setItem(r, k, item)
        view.setAlternatingRowColors(True)
        view.verticalHeader().setVisible(False)
        view.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        view.setCurrentCell(-1, -1)
        layout.addWidget(view, 0, QtCore.Qt.AlignmentFlag.AlignLeft)
        width, height = _fit_table(view)
        view.setFixedSize(width, height)
        widths.append(width)
    box.resize(max(widths), layout.sizeHint().height())
    return box


def render_screenshots(outdir, *, slice_view: bool | None = None) -> list[Path]:
    """Run the real module on the ``spinenet demo`` phantom and draw what the user sees, to PNG files in ``outdir``.

    The real ``SpineNet/SpineNet.py`` panel (PySide6 stand-ins for Slicer's Qt)
    on a slicer-core scene holding the phantom: *Detect & Grade* is clicked
    with the panel's defaults (bundled weights, grading on, no hotspots); the
    run goes through the module's logic and the worker's entry point in this
    process (``InProcessWorker``: the same entry point and files as the
    worker process), so the networks are the bundled ones and the tables,
    status line and scene nodes are their real result.  Writes
    ``slicer_panel.png`` and ``slicer_results_table.png`` (the grades table
    node), and with ``slice_view`` (default: when :func:`offscreen_rendering_works`)
    ``slicer_slice_view.png`` (:func:`render_slice_view` on the same scene) and
    ``slicer_layout.png`` (panel and slice view side by side).
    """
    import numpy as np

    from SpineNetLib.slicer import mrml

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if slice_view is None:
        slice_view = offscreen_rendering_works()
    scene, volume = screenshot_scene()
    patch = _Patch()
    try:
        qt, ctk, slicer, slm, recorder = make_modules(scene)
        for name, module in (("qt", qt), ("ctk", ctk), ("slicer", slicer), ("slicer.ScriptedLoadableModule", slm)):
            patch.setitem(sys.modules, name, module)
        spec = importlib.util.spec_from_file_location("SpineNet", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, "SpineNet", module)
        spec.loader.exec_module(module)

        panel = QtWidgets.QWidget()
        widget = module.SpineNetWidget(panel)
        widget.setup()
        widget.logic.workerFactory = module.InProcessWorker   # the worker's entry point, in this process
        widget.ui.inputSelector.refresh()
        widget.ui.inputSelector.setCurrentNode(volume)
        widget.ui.applyButton.click()
        run = widget.logic.lastRun
        if run is None or run.status != "done":
            said = run.message if run else widget.ui.statusLabel.text()
            raise RuntimeError("Detect & Grade did not finish: " + said)
        if recorder.calls:
            raise RuntimeError(f"the panel asked for something while running: {recorder.calls}")
        discs = [widget.ui.discTable.item(r, 0).text() for r in range(widget.ui.discTable.rowCount())]
        if "L4-L5" in discs:
            widget.ui.discTable.selectRow(discs.index("L4-L5"))
        panel.resize(470, 400)
        panel.show()
        application().processEvents()
        _fit_table(widget.ui.discTable)
        _fit_table(widget.ui.vertebraTable)
        panel.resize(470, panel.sizeHint().height())
        application().processEvents()
        panel_image = panel.grab().toImage()
        panel_png = _save_small_png(panel_image, outdir / "slicer_panel.png")

        table_node = mrml.result_nodes(scene, volume, "grades")[0]
        view = _table_node_view(table_node)
        view.show()
        application().processEvents()
        table_png = _save_small_png(view.grab().toImage(), outdir / "slicer_results_table.png")
        paths = [panel_png, table_png]

        if slice_view:
            size = (SLICE_VIEW_WIDTH, panel_image.height() - VIEW_BAR_HEIGHT)
            pixels, offset, index = render_slice_view(scene, volume, size, zoom_to_spine=True)
            # the number of sagittal slices: the volume's extent along its IJK axis closest to R
            axis = int(np.argmax(np.abs(mrml.ijk_to_ras(volume)[0, :3])))
            slices = mrml.volume_dimensions(volume)[axis]
            caption = (f"Sagittal slice view: {volume.GetName()}, slice {index} of {slices} "
                       f"(R {offset:+.1f} mm)")
            box = _view_with_bar(pixels, caption)
            box.show()
            application().processEvents()
            paths.append(_save_small_png(box.grab().toImage(), outdir / "slicer_slice_view.png"))
            layout = QtWidgets.QWidget()
            row = QtWidgets.QHBoxLayout(layout)
            row.setContentsMargins(0, 0, 0, 0)
            row.setSpacing(4)
            left = QtWidgets.QLabel()
            left.setPixmap(QtGui.QPixmap.fromImage(panel_image))
            left.setAlignment(QtCore.Qt.AlignmentFlag.AlignTop)
            row.addWidget(left, 0, QtCore.Qt.AlignmentFlag.AlignTop)
            row.addWidget(_view_with_bar(pixels, caption), 0, QtCore.Qt.AlignmentFlag.AlignTop)
            layout.setStyleSheet("background-color: #3c3c3c;")
            layout.show()
            application().processEvents()
            paths.append(_save_small_png(layout.grab().toImage(), outdir / "slicer_layout.png"))
            box.close()
            layout.close()
        panel.close()
        view.close()
        widget.cleanup()
        return paths
    finally:
        patch.undo()
