"""SpineNet: vertebra detection, level labelling and disc grading of sagittal spinal MRI in 3D Slicer.

The module is a thin layer over SpineNetLib, shaped like SlicerNNUNet:

* the **logic** (:class:`SpineNetLogic`, no GUI calls, so it runs headless)
  owns the worker behind a small interface, :class:`WorkerProcess`.  It
  writes the input volume to a temporary ``.npy`` + JSON pair, starts the
  worker (``SpineNetLib.apps.worker``) on it, follows its
  ``PROGRESS``/``WARNING``/``RESULT``/``ERROR`` lines, reports them through
  its signals and the run's callbacks, and shows the results as MRML nodes
  (through ``SpineNetLib.slicer.mrml``).  Two workers come with it:
  :class:`QProcessWorker`, the default, runs ``PythonSlicer -m
  SpineNetLib.apps.worker`` as a separate process with ``qt.QProcess`` (the
  GUI stays responsive; Cancel kills the process), and
  :class:`InProcessWorker` calls the same entry point,
  ``SpineNetLib.apps.worker.run_request``, in this process (scripts, tests,
  :meth:`SpineNetLogic.runSynchronously`).  Every caller therefore writes the
  same result files.
* the **widget** only collects the options, wires the panel to the logic's
  methods and signals, and shows the results (disc table, vertebra list with
  level correction, CSV export, hotspots).

From a script (non-blocking; see docs/SLICER.md)::

    logic = SpineNetLogic()
    run = logic.startRun(volume, weights="bundled", onProgress=print, onFinished=lambda run: print(run.message))
    logic.cancelRun()            # if needed
    logic.waitForRun(run)        # or keep Slicer's event loop running

Qt properties are read through :func:`_get`, which works with PythonQt
(properties are attributes) and with PySide6 (getters are methods); setters
are always called as methods.  That keeps the widget testable outside Slicer.
"""

import contextlib
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
import time

import ctk  # noqa: F401  (the .ui uses ctk widgets; importing registers them)
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


def _libraryParent():
    """Folder holding SpineNetLib: next to this file once installed, the repository root from source."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "SpineNetLib", "__init__.py")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return candidate
    return here


LIBRARY_PARENT = _libraryParent()

from SpineNetLib.outputs import documents  # noqa: E402  (needs LIBRARY_PARENT on sys.path)
from SpineNetLib.apps import worker  # noqa: E402
from SpineNetLib.core.errors import SpineNetError  # noqa: E402

#: Import name of each requirement in Resources/requirements.txt.
IMPORT_NAMES = {"numpy": "numpy", "scipy": "scipy", "pydicom": "pydicom", "simpleitk": "SimpleITK", "torch": "torch"}
#: Weight sources offered in the panel, in combo-box order.
WEIGHT_SOURCES = ("bundled", "official", "folder")
#: The hotspot head choice that computes no hotspot maps (the default: a map takes minutes on a CPU).
NO_HOTSPOTS = "none"
#: What follows the Python program on the worker's command line.
WORKER_MODULE_ARGUMENTS = ["-m", "SpineNetLib.apps.worker"]
#: Style of the labelling line when the levels may be shifted (the worst error: make it stand out).
LEVELS_REVIEW_STYLE = ("QLabel { background-color: #fff3cd; color: #8a1c00; font-weight: bold; "
                       "border: 1px solid #e0a800; padding: 4px; }")


def _get(widget, name):
    """Value of a Qt property: an attribute under PythonQt, a getter method under PySide6
    (``name()``, or ``isName()`` for booleans such as ``checked``)."""
    value = getattr(widget, name) if hasattr(widget, name) else getattr(widget, "is" + name[:1].upper() + name[1:])
    return value() if callable(value) else value


def _text(data):
    """Text of the bytes a QProcess returns (QByteArray under PythonQt and PySide6)."""
    if hasattr(data, "data"):
        data = data.data()
    if isinstance(data, (bytes, bytearray)):
        return bytes(data).decode("utf-8", errors="replace")
    return str(data)


def _headerText(column):
    """Column title for the panel: "disc_height_anterior_mm" -> "Disc height\nanterior (mm)"."""
    name = column.name
    if column.unit and name.endswith("_" + column.unit):
        name = name[: -len(column.unit) - 1] + " (" + column.unit + ")"
    name = name.replace("_", " ")
    name = name[:1].upper() + name[1:]
    words = name.split(" ")
    if len(name) > 14 and len(words) > 1:
        # break at the space closest to the middle: narrower columns
        cut = min(range(1, len(words)), key=lambda n: abs(len(" ".join(words[:n])) - len(name) / 2))
        name = " ".join(words[:cut]) + "\n" + " ".join(words[cut:])
    return name


#
# Signals and workers (no widgets: the logic uses them headless)
#


class Signal:
    """A minimal signal that needs no QObject: ``connect(slot)``, ``disconnect(slot)``, ``emit(*args)``."""

    def __init__(self, *argumentNames):
        self.argumentNames = argumentNames
        self._slots = []

    def connect(self, slot):
        self._slots.append(slot)

    def disconnect(self, slot=None):
        """Disconnect one slot (every connection of it), or all slots when none is given."""
        self._slots = [] if slot is None else [s for s in self._slots if s != slot]

    def emit(self, *args):
        for slot in list(self._slots):
            slot(*args)


class LineSink:
    """A text stream for ``worker.LineProtocol`` that hands every complete line to ``onLine``."""

    def __init__(self, onLine):
        self._onLine = onLine
        self._buffer = ""

    def write(self, text):
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._onLine(line)
        return len(text)

    def flush(self):
        pass

    def close(self):
        """Hand over a last line that has no newline."""
        rest, self._buffer = self._buffer, ""
        if rest.strip():
            self._onLine(rest)


class WorkerProcess:
    """What :class:`SpineNetLogic` needs of a worker; one instance runs once.

    * ``start(run)`` starts the worker on a :class:`SpineNetRun` (its
      ``program``, ``arguments``, ``environment`` and ``workingDirectory`` for a
      process, its ``workerArguments`` for ``worker.run_request`` in this process);
    * ``cancel()`` stops it at once (``finished`` still follows);
    * ``isRunning()``;
    * signal ``lineReceived(line)``: one line the worker wrote on stdout;
    * signal ``finished(exitCode, errorText)``: the worker ended; ``exitCode`` is
      None when it could not be started, ``errorText`` is what it wrote on stderr.

    Tests inject their own (``SpineNetLogic(workerFactory=...)``).
    """

    def __init__(self):
        self.lineReceived = Signal("line")
        self.finished = Signal("exitCode", "errorText")

    def start(self, run):
        raise NotImplementedError

    def cancel(self):
        raise NotImplementedError

    def isRunning(self):
        raise NotImplementedError


class QProcessWorker(WorkerProcess):
    """The worker as a separate process (``qt.QProcess``): the default, keeps Slicer responsive."""

    def __init__(self):
        WorkerProcess.__init__(self)
        self.process = None
        self._running = False
        self._buffer = ""

    def start(self, run):
        process = qt.QProcess()
        process.setProgram(run.program)
        process.setArguments(run.arguments)
        process.setWorkingDirectory(run.workingDirectory)
        environment = qt.QProcessEnvironment.systemEnvironment()
        for key, value in run.environment.items():
            environment.insert(key, value)
        process.setProcessEnvironment(environment)
        process.readyReadStandardOutput.connect(self._onOutput)
        process.finished.connect(self._onFinished)
        process.errorOccurred.connect(self._onError)
        # The process stays referenced after it finished: releasing the last reference inside
        # its own signal would delete it while Qt is still emitting.
        self.process, self._running, self._buffer = process, True, ""
        process.start()

    def cancel(self):
        if self._running:
            self.process.kill()

    def isRunning(self):
        return self._running

    def _onOutput(self, *args):
        if not self._running:
            return
        self._buffer += _text(self.process.readAllStandardOutput())
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self.lineReceived.emit(line)

    def _onError(self, error=None):
        """Only a worker that could not start ends here (a crash or a kill also emits finished)."""
        if not self._running or error != qt.QProcess.FailedToStart:
            return
        self._running = False
        self.finished.emit(None, "")

    def _onFinished(self, *args):
        if not self._running:
            return
        self._onOutput()
        rest, self._buffer = self._buffer, ""
        if rest.strip():
            self.lineReceived.emit(rest)
        errors = _text(self.process.readAllStandardError()).strip()
        self._running = False
        self.finished.emit(self.process.exitCode(), errors)


class _Cancelled(BaseException):
    """Raised inside an in-process run to stop it (a BaseException: pipelines' ``except Exception`` let it pass)."""


class InProcessWorker(WorkerProcess):
    """The worker's entry point called in this process: ``worker.run_request(worker.build_parser().parse_args(...))``.

    ``start`` returns only when the run is over (``finished`` has been
    emitted).  ``cancel()`` from a progress callback stops the run at its next
    progress report.  The exception that ended a failed run is kept in
    ``exception`` (:meth:`SpineNetLogic.runSynchronously` raises it again).
    """

    def __init__(self):
        WorkerProcess.__init__(self)
        self.exception = None
        self._running = self._cancelled = self._ending = False

    def isRunning(self):
        return self._running

    def cancel(self):
        self._cancelled = self._running

    def _onLine(self, line):
        self.lineReceived.emit(line)
        if self._cancelled and not self._ending:
            raise _Cancelled()

    def start(self, run):
        sink = LineSink(self._onLine)
        protocol = worker.LineProtocol(sink)
        self._running, self._cancelled, self._ending, self.exception = True, False, False, None
        exitCode = worker.EXIT_OK
        try:
            with contextlib.redirect_stdout(sink):  # a usage error is reported as an ERROR line on stdout
                args = worker.build_parser().parse_args(list(run.workerArguments))
            manifest = worker.run_request(args, protocol)
        except _Cancelled:
            self._ending, exitCode = True, worker.EXIT_INTERNAL
        except SystemExit as error:  # a usage error (the parser has reported it)
            self._ending, self.exception = True, error
            exitCode = error.code if isinstance(error.code, int) else worker.EXIT_USAGE
        except SpineNetError as error:
            self._ending, self.exception, exitCode = True, error, worker.EXIT_USAGE
            protocol.send("ERROR", str(error))
        except OSError as error:
            self._ending, self.exception, exitCode = True, error, worker.EXIT_USAGE
            target = f" {error.filename}" if getattr(error, "filename", None) else ""
            protocol.send("ERROR", f"cannot access{target}: {error.strerror or error}")
        except Exception as error:  # a bug: one line here, the traceback in the log
            self._ending, self.exception, exitCode = True, error, worker.EXIT_INTERNAL
            logging.exception("SpineNet worker (in process)")
            protocol.send("ERROR", f"internal error: {type(error).__name__}: {error}")
        else:
            self._ending = True
            sink.write(f"RESULT {manifest}\n")  # the path as is, spaces included
        sink.close()
        self._running = False
        self.finished.emit(exitCode, "")


class SpineNetRun:
    """One run of the worker on a volume: how it was started, what it reported, how it ended.

    ``status`` is "running", then "done", "failed" or "cancelled"; ``message``
    is the one-line outcome the panel shows; ``nodes`` are the result nodes
    (:class:`SpineNetLib.slicer.mrml.ResultNodes`) of a run that is done.
    """

    def __init__(self, volumeNode, prepared, onProgress=None, onWarning=None, onFinished=None):
        self.volumeID = volumeNode.GetID()
        self.volumeName = volumeNode.GetName()
        self.program = prepared["program"]
        self.arguments = prepared["arguments"]
        self.environment = prepared["environment"]
        self.workingDirectory = prepared["workingDirectory"]
        self.workerArguments = prepared["workerArguments"]
        self.folder = prepared["folder"]
        self.output = prepared["output"]
        self.onProgress, self.onWarning, self.onFinished = onProgress, onWarning, onFinished
        self.status = "running"
        self.cancelled = False
        self.progress = (0, 1, "")
        self.warnings = []
        self.resultPath = None
        self.error = None
        self.exitCode = None
        self.errorText = ""
        self.message = ""
        self.nodes = None

    def get(self, key, default=None):
        """Dictionary-style access (``cleanupRun`` takes a :meth:`SpineNetLogic.prepareRun` dict too)."""
        return getattr(self, key, default)

    def isFinished(self):
        return self.status != "running"

    def __repr__(self):
        return f"<SpineNetRun {self.volumeName!r} {self.status}: {self.message or self.progress[2]}>"


#
# Module
#


class SpineNet(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SpineNet"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SpineNet for 3D Slicer contributors"]
        self.parent.helpText = (
            "Detects every vertebral body of a sagittal spinal MR scan, outlines it, labels its level "
            "(C2 to S1) and, where a grading network is available, grades each disc. Select a volume and "
            "press Detect &amp; Grade. When the levels may be shifted by one, a highlighted line above the "
            "results says so and why. A wrong level can be corrected in the vertebra list: the others "
            "are re-labelled consistently. See the project README for the outputs and their meaning.")
        self.parent.acknowledgementText = (
            "A re-implementation of SpineNetV2 (Windsor, Jamaludin, Kadir and Zisserman, 2022) and of "
            "SpineNet evidence hotspots (Jamaludin et al., Medical Image Analysis 2017). The optional "
            "official SpineNetV2 weights are licensed by VGG, University of Oxford, for non-commercial "
            "research only and are not distributed with this extension.")


#
# Widget
#


class SpineNetWidget(ScriptedLoadableModuleWidget):
    """The "Detect & Grade" panel: options in, logic calls out, logic signals back to the panel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.ui = None
        self._populating = False
        self._levelCombos = []

    # ----------------------------------------------------------------- set-up

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.inputSelector.setMRMLScene(slicer.mrmlScene)
        self.logic = SpineNetLogic()
        self.logic.progressReported.connect(self.onRunProgress)
        self.logic.warningReported.connect(self.onRunWarning)
        self.logic.runFinished.connect(self.onRunFinished)

        self.ui.weightsComboBox.clear()
        for label in ("Bundled (this project)", "Official SpineNetV2 (download, non-commercial)", "Folder..."):
            self.ui.weightsComboBox.addItem(label)
        self.ui.deviceComboBox.clear()
        for device in ("auto", "cpu", "cuda"):
            self.ui.deviceComboBox.addItem(device)
        self.ui.hotspotHeadComboBox.clear()
        for head in (NO_HOTSPOTS, *documents.GRADE_HEADS):   # "none" first: hotspots are opt-in
            self.ui.hotspotHeadComboBox.addItem(head)
        self.ui.hotspotHeadComboBox.setCurrentIndex(0)
        self.ui.progressBar.setValue(0)
        self.ui.cancelButton.setEnabled(False)
        self.ui.discTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.vertebraTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)

        self.ui.applyButton.clicked.connect(self.onApply)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.exportCsvButton.clicked.connect(self.onExportCsv)
        self.ui.showHotspotsButton.clicked.connect(self.onShowHotspots)
        self.ui.weightsBrowseButton.clicked.connect(self.onBrowseWeights)
        self.ui.weightsComboBox.currentTextChanged.connect(self.updateWidgets)
        self.ui.gradingCheckBox.toggled.connect(self.updateWidgets)
        self.ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)
        self.setStatus("Select a sagittal volume and press Detect & Grade.")
        self.onInputChanged()

    def cleanup(self):
        """Module closed: stop a running worker and stop listening to the logic."""
        if self.logic is None:
            return
        self.logic.cancelRun()
        self.logic.progressReported.disconnect(self.onRunProgress)
        self.logic.warningReported.disconnect(self.onRunWarning)
        self.logic.runFinished.disconnect(self.onRunFinished)

    def setStatus(self, message):
        self.ui.statusLabel.setText(message)
        logging.info("SpineNet: %s", message)

    def updateWidgets(self, *args):
        running = self.logic.isRunning()
        folder = WEIGHT_SOURCES[max(0, _get(self.ui.weightsComboBox, "currentIndex"))] == "folder"
        self.ui.weightsFolderLineEdit.setEnabled(folder)
        self.ui.weightsBrowseButton.setEnabled(folder)
        self.ui.hotspotHeadComboBox.setEnabled(bool(_get(self.ui.gradingCheckBox, "checked")))
        self.ui.applyButton.setEnabled(not running)
        self.ui.cancelButton.setEnabled(running)
        hasResults = self._volume() is not None and self.logic.documents(self._volume())[0] is not None
        self.ui.exportCsvButton.setEnabled(hasResults and not running)
        self.ui.showHotspotsButton.setEnabled(hasResults and not running)

    def _volume(self):
        return self.ui.inputSelector.currentNode()

    def settings(self):
        """The options chosen in the panel, as :meth:`SpineNetLogic.startRun` takes them."""
        source = WEIGHT_SOURCES[max(0, _get(self.ui.weightsComboBox, "currentIndex"))]
        weights = _get(self.ui.weightsFolderLineEdit, "text").strip() if source == "folder" else source
        head = _get(self.ui.hotspotHeadComboBox, "currentText")
        return {"weights": weights, "device": _get(self.ui.deviceComboBox, "currentText") or "auto",
                "grading": bool(_get(self.ui.gradingCheckBox, "checked")),
                "hotspot_head": None if head in ("", NO_HOTSPOTS) else head}

    def onBrowseWeights(self):
        folder = qt.QFileDialog.getExistingDirectory(None, "SpineNet weights folder",
                                                     _get(self.ui.weightsFolderLineEdit, "text"))
        if folder:
            self.ui.weightsFolderLineEdit.setText(folder)

    # ----------------------------------------------------------------- running (delegated to the logic)

    def onApply(self):
        if self.logic.isRunning():
            return
        volume = self._volume()
        if volume is None:
            self.setStatus("Select an input volume first.")
            return
        settings = self.settings()
        if not settings["weights"]:
            self.setStatus("Choose the folder that holds the weights, or another weight source.")
            return
        missing = self.logic.missingPackages()
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    "SpineNet needs these Python packages, which will be downloaded and installed now:\n"
                    + "\n".join(missing)):
                self.setStatus("Cancelled: the Python packages SpineNet needs are not installed.")
                return
            self.setStatus("Installing " + ", ".join(missing) + " ...")
            try:
                self.logic.installPackages(missing)
            except Exception as error:
                self.setStatus("Installing the Python packages failed: " + " ".join(str(error).split()))
                return
        self.ui.progressBar.setMaximum(100)
        self.ui.progressBar.setValue(0)
        self.setStatus("Starting SpineNet on " + volume.GetName() + " ...")
        try:
            self.logic.startRun(volume, **settings)
        except SpineNetError as error:
            self.setStatus("Error: " + str(error))
        self.updateWidgets()

    def onCancel(self):
        if not self.logic.isRunning():
            return
        self.setStatus("Cancelling ...")
        self.logic.cancelRun()

    def onRunProgress(self, done, total, message):
        self.ui.progressBar.setMaximum(max(1, total))
        self.ui.progressBar.setValue(min(done, max(1, total)))
        self.ui.statusLabel.setText(message.capitalize() + " ...")

    def onRunWarning(self, message):
        self.setStatus("Warning: " + message)

    def onRunFinished(self, run):
        if run.status == "cancelled":
            self.ui.progressBar.setValue(0)
        elif run.status == "done":
            self.ui.progressBar.setValue(_get(self.ui.progressBar, "maximum"))
            volume = self.logic.scene.GetNodeByID(run.volumeID)
            if self._volume() is not volume:
                self.ui.inputSelector.setCurrentNode(volume)
            self.populateResults()
        self.setStatus(run.message)
        self.updateWidgets()

    # ----------------------------------------------------------------- results

    def onInputChanged(self, *args):
        self.populateResults()
        self.updateWidgets()

    def populateResults(self):
        """Fill the disc table and the vertebra list from the results stored for the input volume."""
        volume = self._volume()
        vertebraeDoc, discsDoc, _ = self.logic.documents(volume) if volume is not None else (None, None, None)
        self.showLabellingStatus(*documents.labelling_status(vertebraeDoc))
        self._populating = True
        try:
            columns, rows = documents.disc_table(vertebraeDoc, discsDoc) if vertebraeDoc else ([], [])
            table = self.ui.discTable
            table.clear()
            table.setColumnCount(len(columns))
            table.setRowCount(len(rows))
            table.setHorizontalHeaderLabels([_headerText(c) for c in columns])
            for c, column in enumerate(columns):
                header = table.horizontalHeaderItem(c)
                if header is not None:
                    header.setToolTip(column.description + (" [" + column.unit + "]" if column.unit else ""))
                for r, row in enumerate(rows):
                    table.setItem(r, c, qt.QTableWidgetItem(documents.format_cell(row[c], column.kind)))
            table.resizeColumnsToContents()

            vertebrae = documents.vertebra_rows(vertebraeDoc) if vertebraeDoc else []
            table = self.ui.vertebraTable
            table.clear()
            table.setColumnCount(3)
            table.setRowCount(len(vertebrae))
            table.setHorizontalHeaderLabels(["Level", "P(level)", "Slices"])
            self._levelCombos = []
            for r, v in enumerate(vertebrae):
                combo = qt.QComboBox()
                for level in documents.LEVEL_CHOICES:
                    combo.addItem(level)
                if v["level"] in documents.LEVEL_CHOICES:
                    combo.setCurrentIndex(documents.LEVEL_CHOICES.index(v["level"]))
                else:
                    combo.addItem(v["name"])
                    combo.setCurrentIndex(_get(combo, "count") - 1)
                combo.setToolTip("Correct this level: the other vertebrae are re-labelled consistently")
                combo.textActivated.connect(functools.partial(self.onLevelCorrected, r))
                table.setCellWidget(r, 0, combo)
                probability = "" if v["probability"] is None else f"{v['probability']:.2f}"
                table.setItem(r, 1, qt.QTableWidgetItem(probability))
                slices = str(v["first_slice"]) if v["first_slice"] == v["last_slice"] else f"{v['first_slice']}-{v['last_slice']}"
                table.setItem(r, 2, qt.QTableWidgetItem(slices))
                self._levelCombos.append(combo)
            table.resizeColumnsToContents()
        finally:
            self._populating = False

    def showLabellingStatus(self, text, needsReview):
        """How sure the levels are, above the results; a warning style when they need review."""
        label = self.ui.labellingLabel
        label.setText(text)
        label.setStyleSheet(LEVELS_REVIEW_STYLE if needsReview else "")
        label.setVisible(bool(text))

    def onLevelCorrected(self, row, level=None):
        if self._populating:
            return
        volume = self._volume()
        if volume is None:
            return
        if level is None:
            level = _get(self._levelCombos[row], "currentText")
        try:
            levels = self.logic.correctLevel(volume, row, level)
        except SpineNetError as error:
            self.setStatus("Error: " + str(error))
            return
        self.populateResults()
        self.updateWidgets()
        named = [name or "?" for name in levels]
        self.setStatus(f"Vertebra {row + 1} set to {level}; levels now {named[0]}..{named[-1]}.")

    def selectedDisc(self):
        """Level of the disc selected in the table (the first one when none is selected)."""
        table = self.ui.discTable
        row = _get(table, "currentRow")
        if row < 0 and _get(table, "rowCount") > 0:
            row = 0
        item = table.item(row, 0) if row >= 0 else None
        return item.text() if item is not None else None

    def onShowHotspots(self):
        volume = self._volume()
        disc = self.selectedDisc()
        head = _get(self.ui.hotspotHeadComboBox, "currentText")
        if volume is None or disc is None:
            self.setStatus("Run SpineNet and select a disc in the table first.")
            return
        if head in ("", NO_HOTSPOTS):
            self.setStatus("Choose a hotspot head: hotspot maps are computed only for the head chosen "
                           "before Detect & Grade.")
            return
        node, message = self.logic.showHotspots(volume, disc, head)
        self.setStatus(message)
        if node is not None and hasattr(slicer.util, "setSliceViewerLayers"):
            slicer.util.setSliceViewerLayers(background=volume, foreground=node, foregroundOpacity=0.5)

    def onExportCsv(self):
        volume = self._volume()
        if volume is None:
            self.setStatus("Select an input volume first.")
            return
        folder = qt.QFileDialog.getExistingDirectory(None, "Export SpineNet CSV files to", "")
        if not folder:
            return
        try:
            paths = self.logic.exportCsv(volume, folder)
        except (SpineNetError, OSError) as error:
            self.setStatus("Export failed: " + " ".join(str(error).split()))
            return
        self.setStatus("Wrote " + ", ".join(os.path.basename(p) for p in paths) + " to " + folder)


#
# Logic
#


class SpineNetLogic(ScriptedLoadableModuleLogic):
    """MRML, files and the worker; no GUI calls: usable from the Python console and in batch scripts.

    Signals (connect a callable; see :class:`Signal`):

    * ``progressReported(done, total, message)``
    * ``warningReported(message)``
    * ``runFinished(run)``: a :class:`SpineNetRun` whose ``status`` is "done",
      "failed" or "cancelled" and whose ``message`` says how it ended.
    """

    def __init__(self, scene=None, workerFactory=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        #: Hook for extensions and tests: "MODULE:FUNCTION" or "FILE.py:FUNCTION" replacing the
        #: worker's default pipeline, and extra options for it (see SpineNetLib.apps.worker).
        self.pipeline = None
        self.pipelineOptions = {}
        #: Makes the :class:`WorkerProcess` of each run (default: a separate process).
        self.workerFactory = workerFactory or QProcessWorker
        self.worker = None
        self.currentRun = None
        self.lastRun = None
        self._lastWorker = None
        self.progressReported = Signal("done", "total", "message")
        self.warningReported = Signal("message")
        self.runFinished = Signal("run")

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    @staticmethod
    def _mrml():
        from SpineNetLib.slicer import mrml

        return mrml

    # ----------------------------------------------------------------- dependencies

    @staticmethod
    def requirementsPath():
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    def requirements(self):
        """Requirement lines of Resources/requirements.txt (torch is handled by the PyTorch extension)."""
        lines = []
        with open(self.requirementsPath(), encoding="utf-8") as handle:
            for line in handle:
                line = line.split("#", 1)[0].strip()
                if line:
                    lines.append(line)
        return lines

    def missingPackages(self):
        """Requirements whose package cannot be imported."""
        import importlib.util

        missing = []
        for requirement in self.requirements():
            name = re.split(r"[<>=!~\[; ]", requirement, 1)[0].lower()
            if importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is None:
                missing.append(requirement)
        return missing

    def installPackages(self, requirements):
        """Install requirements: torch through the PyTorch extension when present, the rest with pip."""
        others = []
        for requirement in requirements:
            if re.split(r"[<>=!~\[; ]", requirement, 1)[0].lower() == "torch":
                self._installTorch(requirement)
            else:
                others.append(requirement)
        if not others:
            return
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(others)
        else:
            slicer.util.pip_install(" ".join(others))

    @staticmethod
    def _installTorch(requirement):
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.pip_install(requirement)
            return
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            version = requirement[len("torch"):].strip() or None
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=version) is None:
                raise RuntimeError("PyTorch was not installed (installation declined or failed)")

    @staticmethod
    def pythonExecutable():
        """PythonSlicer inside Slicer (a Python with Slicer's packages), else this interpreter."""
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            candidate = os.path.join(os.path.dirname(sys.executable), name)
            if os.path.isfile(candidate):
                return candidate
        return shutil.which("PythonSlicer") or sys.executable

    # ----------------------------------------------------------------- running

    def prepareRun(self, volumeNode, weights="bundled", device="auto", grading=True, hotspot_head=None,
                   pipeline=None, options=None, workFolder=None):
        """Write the volume for the worker and return how to start it.

        Returns ``{"program", "arguments", "environment", "workingDirectory",
        "workerArguments", "folder", "output"}``: ``program`` + ``arguments`` run
        the worker as a process, ``workerArguments`` are what
        ``SpineNetLib.apps.worker.build_parser()`` parses; the voxels ([k, j, i])
        and IJK-to-RAS go to the worker unchanged.
        """
        mrml = self._mrml()
        voxels, ijkToRas = mrml.volume_arrays(volumeNode)
        folder = workFolder or tempfile.mkdtemp(prefix="SpineNet-")
        npy, geometry = worker.write_volume(os.path.join(folder, "input"), voxels, ijkToRas,
                                            {"path": volumeNode.GetName(), "format": "Slicer volume"})
        output = os.path.join(folder, "results")
        workerArguments = worker.worker_arguments(
            npy, output, geometry=geometry, weights=weights, device=device, grading=grading,
            hotspot_head=hotspot_head, pipeline=pipeline, options=options)
        pythonPath = os.pathsep.join(p for p in (LIBRARY_PARENT, os.environ.get("PYTHONPATH", "")) if p)
        return {"program": self.pythonExecutable(), "arguments": WORKER_MODULE_ARGUMENTS + workerArguments,
                "workerArguments": workerArguments, "workingDirectory": LIBRARY_PARENT,
                "folder": folder, "output": output,
                "environment": {"PYTHONPATH": pythonPath, "PYTHONUNBUFFERED": "1"}}

    @staticmethod
    def cleanupRun(run):
        """Delete the temporary input files of a run (the results folder stays for hotspots)."""
        if run and run.get("folder"):
            shutil.rmtree(os.path.join(run.get("folder"), "input"), ignore_errors=True)

    def isRunning(self):
        return self.currentRun is not None

    def startRun(self, volumeNode, weights="bundled", device="auto", grading=True, hotspot_head=None,
                 pipeline=None, options=None, onProgress=None, onWarning=None, onFinished=None,
                 workerProcess=None, workFolder=None):
        """Start SpineNet on a volume and return at once with the :class:`SpineNetRun`.

        ``onProgress(done, total, message)``, ``onWarning(message)`` and
        ``onFinished(run)`` are called for this run (after the logic's signals).
        ``pipeline``/``options`` default to :attr:`pipeline`/:attr:`pipelineOptions`;
        ``workerProcess`` replaces :attr:`workerFactory`'s worker for this run (an
        :class:`InProcessWorker` finishes before ``startRun`` returns).
        Raises :class:`SpineNetError` when a run is going on or the volume cannot be used.
        """
        if self.isRunning():
            raise SpineNetError("SpineNet is already running: wait for it or cancel it first")
        if volumeNode is None:
            raise SpineNetError("no input volume")
        prepared = self.prepareRun(volumeNode, weights=weights, device=device, grading=grading,
                                   hotspot_head=hotspot_head,
                                   pipeline=self.pipeline if pipeline is None else pipeline,
                                   options=self.pipelineOptions if options is None else options,
                                   workFolder=workFolder)
        run = SpineNetRun(volumeNode, prepared, onProgress=onProgress, onWarning=onWarning, onFinished=onFinished)
        process = workerProcess if workerProcess is not None else self.workerFactory()
        process.lineReceived.connect(functools.partial(self._onWorkerLine, run))
        process.finished.connect(functools.partial(self._onWorkerFinished, run))
        self.worker, self.currentRun = process, run
        try:
            process.start(run)
        except BaseException:
            if self.currentRun is run:
                self.worker = self.currentRun = None
                self.cleanupRun(run)
            raise
        return run

    def cancelRun(self):
        """Stop the current run (it finishes with status "cancelled"); False when nothing runs."""
        run, process = self.currentRun, self.worker
        if run is None:
            return False
        run.cancelled = True
        process.cancel()
        return True

    def waitForRun(self, run=None, timeout=None):
        """Process Qt events until ``run`` (default: the current run) has finished; returns it.

        For scripts that use the default process worker outside the event loop.
        Raises :class:`SpineNetError` after ``timeout`` seconds.
        """
        run = run or self.currentRun or self.lastRun
        deadline = None if timeout is None else time.monotonic() + timeout
        application = getattr(slicer, "app", None) or qt.QCoreApplication.instance()
        while run is not None and not run.isFinished():
            if deadline is not None and time.monotonic() > deadline:
                raise SpineNetError(f"SpineNet did not finish within {timeout} s")
            application.processEvents()
            time.sleep(0.01)
        return run

    def _onWorkerLine(self, run, line):
        if run is not self.currentRun:
            return
        message = worker.parse_line(line)
        if message.kind == "PROGRESS":
            run.progress = (message.done, message.total, message.text)
            self.progressReported.emit(message.done, message.total, message.text)
            if run.onProgress is not None:
                run.onProgress(message.done, message.total, message.text)
        elif message.kind == "WARNING":
            run.warnings.append(message.text)
            self.warningReported.emit(message.text)
            if run.onWarning is not None:
                run.onWarning(message.text)
        elif message.kind == "RESULT":
            run.resultPath = message.text
        elif message.kind == "ERROR":
            run.error = message.text
        elif line.strip():
            logging.info("SpineNet worker: %s", line)

    def _onWorkerFinished(self, run, exitCode, errorText):
        if run is not self.currentRun:
            return
        # Keep the finished worker referenced until the next run (see QProcessWorker.start).
        self._lastWorker, self.worker, self.currentRun, self.lastRun = self.worker, None, None, run
        run.exitCode, run.errorText = exitCode, errorText or ""
        if run.errorText:
            logging.info("SpineNet worker stderr:\n%s", run.errorText)
        self.cleanupRun(run)
        if run.cancelled:
            run.status, run.message = "cancelled", "Cancelled."
        elif exitCode is None:
            run.status = "failed"
            run.message = "Could not start the SpineNet worker (" + run.program + "); see the Python console log."
        elif run.error:
            run.status, run.message = "failed", "Error: " + run.error
        elif run.resultPath:
            self._showRunResults(run)
        else:
            lastLine = run.errorText.splitlines()[-1] if run.errorText else "no message"
            run.status = "failed"
            run.message = f"The SpineNet worker stopped (exit code {exitCode}) without a result: {lastLine}"
        self.runFinished.emit(run)
        if run.onFinished is not None:
            run.onFinished(run)

    def _showRunResults(self, run):
        volume = self.scene.GetNodeByID(run.volumeID)
        if volume is None:
            run.status, run.message = "failed", "Error: the input volume is no longer in the scene."
            return
        try:
            run.nodes = self.loadResults(volume, run.resultPath)
        except SpineNetError as error:
            run.status, run.message = "failed", "Error: " + str(error)
            return
        run.status = "done"
        run.message = self.summary(volume) + ("" if not run.warnings else " Warning: " + run.warnings[-1])

    def runSynchronously(self, volumeNode, pipeline=None, options=None, progress=None, **settings):
        """Run SpineNet in this process (blocks) and show the results; returns the result nodes.

        The same entry point (``SpineNetLib.apps.worker.run_request``) and the same files
        as the panel's worker process.  For scripts and tests; raises the error
        that stopped the run (:class:`SpineNetError` for a problem with the input,
        options or weights, or a cancelled run).
        """
        process = InProcessWorker()
        run = self.startRun(volumeNode, pipeline=pipeline, options=options, onProgress=progress,
                            workerProcess=process, **settings)
        if run.status != "done":
            if process.exception is not None and not isinstance(process.exception, SystemExit):
                raise process.exception
            raise SpineNetError(run.error or run.message)
        return run.nodes

    # ----------------------------------------------------------------- results

    def loadResults(self, volumeNode, resultPath):
        """Show the results of a ``result.json`` (or results folder) on ``volumeNode``."""
        vertebraeDoc, discsDoc, folder = documents.read_result(resultPath)
        return self.showResults(volumeNode, vertebraeDoc, discsDoc, folder)

    def showResults(self, volumeNode, vertebraeDoc, discsDoc=None, folder=None):
        """Replace the volume's SpineNet nodes by nodes built from the documents."""
        return self._mrml().show_results(self.scene, volumeNode, vertebraeDoc, discsDoc, folder=folder)

    def documents(self, volumeNode):
        """(vertebrae document, discs document, results folder) stored in the scene for the volume."""
        if volumeNode is None:
            return None, None, None
        return self._mrml().stored_documents(self.scene, volumeNode)

    def summary(self, volumeNode):
        vertebraeDoc, discsDoc, _ = self.documents(volumeNode)
        if vertebraeDoc is None:
            return "No SpineNet results for this volume."
        names = [documents.vertebra_name(v, i) for i, v in enumerate(vertebraeDoc["vertebrae"])]
        if not names:
            return "No vertebrae found."
        discs = len(discsDoc["discs"]) if discsDoc else len(documents.disc_polygons(vertebraeDoc))
        graded = sum(1 for d in (discsDoc or {}).get("discs", []) if d.get("grades"))
        return f"{len(names)} vertebrae ({names[0]}..{names[-1]}), {discs} discs, {graded} graded."

    def labellingStatus(self, volumeNode):
        """(one line about how sure the volume's levels are, whether they need review); ("", False) without one."""
        return documents.labelling_status(self.documents(volumeNode)[0])

    def correctLevel(self, volumeNode, index, level):
        """Pin vertebra ``index`` (top to bottom) to ``level``, re-solve the others, rebuild the nodes."""
        vertebraeDoc, discsDoc, folder = self.documents(volumeNode)
        if vertebraeDoc is None:
            raise SpineNetError("there are no SpineNet results for this volume to correct")
        vertebraeDoc, discsDoc = documents.apply_level_correction(vertebraeDoc, index, level, discsDoc)
        self.showResults(volumeNode, vertebraeDoc, discsDoc, folder)
        return [v.get("level") for v in vertebraeDoc["vertebrae"]]

    def exportCsv(self, volumeNode, folder):
        """Write ``<volume>_vertebrae.csv`` and ``<volume>_discs.csv`` (the run's CSV files); returns their paths."""
        from SpineNetLib.outputs.files import write_files_atomically
        from SpineNetLib.outputs.vertebrae import vertebrae_csv_text

        vertebraeDoc, discsDoc, _ = self.documents(volumeNode)
        if vertebraeDoc is None:
            raise SpineNetError("there are no SpineNet results for this volume to export")
        if discsDoc is None:  # no disc stage: level and centre of each disc (needs no torch)
            discsText = documents.table_csv_text(*documents.disc_table(vertebraeDoc))
        else:
            from SpineNetLib.outputs.discs import discs_csv_text

            discsText = discs_csv_text(discsDoc, vertebraeDoc)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", volumeNode.GetName()).strip("_") or "volume"
        files = {f"{stem}_vertebrae.csv": vertebrae_csv_text(vertebraeDoc), f"{stem}_discs.csv": discsText}
        return [str(p) for p in write_files_atomically(folder, files)]

    def showHotspots(self, volumeNode, disc, head):
        """Load the hotspot map of one disc and head from the results folder: (node or None, message)."""
        _, _, folder = self.documents(volumeNode)
        paths = documents.hotspot_files(folder, disc, head)
        if not paths:
            return None, f"Hotspots are not available for {disc} ({head}): this run wrote no hotspot maps."
        mrml = self._mrml()
        allDiscs = paths[0].name.startswith("hotspots_")
        name = f"SpineNet hotspot all discs {head}" if allDiscs else f"SpineNet hotspot {disc} {head}"
        for node in mrml.result_nodes(self.scene, volumeNode, "hotspot"):
            if node.GetName() == name:
                self.scene.RemoveNode(node)
        node = mrml.load_hotspot_file(self.scene, volumeNode, paths[0], name)
        return node, f"Showing the {head} hotspots of " + ("all discs." if allDiscs else f"{disc}.")


#
# Test
#


def selfTestPipeline(scan, options, progress):
    """A pipeline for the self-test (``--pipeline SpineNet:selfTestPipeline``): returns the
    vertebrae document in the file ``options["vertebrae"]`` instead of running networks."""
    import json

    from SpineNetLib.pipeline import RunResult

    progress(1, 1, "self-test outlines")
    with open(options["vertebrae"], encoding="utf-8") as handle:
        return RunResult(vertebrae_document=json.load(handle))


class SpineNetTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer, without weights: a small volume of boxes and their ground-truth outlines
    -> MRML nodes -> level correction, then the same outlines through the worker's entry point in process.

    It needs only what the extension installs for inference (no phantom from SpineNetLib.synthetic).
    """

    LEVELS = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_Results()
        self.setUp()
        self.test_RunThroughTheWorker()

    def _boxes(self):
        """(volume node, vertebrae document): seven bright boxes stacked head to foot on five sagittal slices.

        The array is in SpineNet's canonical layout ([row, col, slice] = S->I, A->P, R->L; 1 mm
        pixels, 4 mm slices), so the canonical outlines are the boxes' corners.
        """
        import types

        import numpy as np

        from SpineNetLib.inputs.canonical import scan_from_array
        from SpineNetLib.slicer import mrml

        rows, cols, slices = 256, 128, 5
        voxels = np.full((rows, cols, slices), 20, np.int16)
        truth = []
        for n, level in enumerate(self.LEVELS):
            top, bottom, front, back = 16 + 32 * n, 16 + 32 * n + 23, 40, 84
            voxels[top:bottom + 1, front:back + 1, :] = 200
            quad = np.array([[back, top], [back, bottom], [front, bottom], [front, top]], float)  # rt, rb, lb, lt
            truth.append(types.SimpleNamespace(level=level, slices=range(1, slices - 1),
                                               quads={s: quad for s in range(slices)}))
        ijkToRas = np.diag([-4.0, -1.0, -1.0, 1.0])  # i = slice (R->L), j = col (A->P), k = row (S->I)
        scan = scan_from_array(voxels, ijkToRas, {"path": "SpineNet self-test"})
        volume = mrml.add_volume(slicer.mrmlScene, voxels, ijkToRas, "SpineNet self-test")
        return volume, documents.vertebrae_document_from_truth(scan, truth)

    def test_Results(self):
        self.delayDisplay("Showing ground-truth outlines")
        volume, vertebraeDoc = self._boxes()
        logic = SpineNetLogic()
        nodes = logic.showResults(volume, vertebraeDoc)
        self.assertEqual(len(nodes.curves), len(self.LEVELS))
        self.assertEqual(nodes.table.GetNumberOfRows(), len(self.LEVELS) - 1)
        logic.showResults(volume, vertebraeDoc)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
        # ground truth is certain of every other level, so only the pinned one changes
        levels = logic.correctLevel(volume, 0, "T11")
        self.assertEqual(levels, ["T11"] + self.LEVELS[1:])
        self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByName("SpineNet T11"))

    def test_RunThroughTheWorker(self):
        import json

        import importlib.util

        if importlib.util.find_spec("torch") is None:  # the worker needs PyTorch, installed on first use
            self.delayDisplay("Skipped the run through the worker: PyTorch is not installed")
            self.delayDisplay("SpineNet self-test passed")
            return
        self.delayDisplay("Running the worker's entry point in process")
        volume, vertebraeDoc = self._boxes()
        folder = tempfile.mkdtemp(prefix="SpineNetTest-")
        try:
            truth = os.path.join(folder, "truth.json")
            with open(truth, "w", encoding="utf-8") as handle:
                json.dump(vertebraeDoc, handle)
            seen = []
            logic = SpineNetLogic()
            nodes = logic.runSynchronously(volume, pipeline=__name__ + ":selfTestPipeline",
                                           options={"vertebrae": truth}, workFolder=os.path.join(folder, "run"),
                                           progress=lambda *report: seen.append(report))
            self.assertEqual(len(nodes.curves), len(self.LEVELS))
            self.assertIn((1, 1, "self-test outlines"), seen)
            self.assertTrue(logic.summary(volume).startswith("7 vertebrae (T12..S1)"))
            results = logic.documents(volume)[2]
            self.assertTrue(os.path.isfile(os.path.join(results, "result.json")))
            self.assertTrue(os.path.isfile(os.path.join(results, "vertebrae.csv")))
            self.assertFalse(os.path.exists(os.path.join(folder, "run", "input")))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("SpineNet self-test passed")
