"""SpineNet: vertebra detection, level labelling and disc grading of sagittal spinal MRI in 3D Slicer.

The module is a thin layer over SpineNetLib:

* the **widget** collects the options, writes the input volume to a
  temporary ``.npy`` + JSON pair, runs ``SpineNetLib.apps.worker`` in a separate
  process with ``qt.QProcess`` (the GUI stays responsive; Cancel kills the
  process), follows its ``PROGRESS``/``WARNING``/``RESULT``/``ERROR`` lines,
  and shows the results (disc table, vertebra list with level correction,
  CSV export, hotspots);
* the **logic** only reads and writes MRML (through ``SpineNetLib.slicer.mrml``)
  and files, so it runs headless too.

Qt properties are read through :func:`_get`, which works with PythonQt
(properties are attributes) and with PySide6 (getters are methods); setters
are always called as methods.  That keeps the widget testable outside Slicer.
"""

import functools
import logging
import os
import re
import shutil
import sys
import tempfile

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

from SpineNetLib.outputs import documents
from SpineNetLib.apps import worker  # noqa: E402  (needs LIBRARY_PARENT on sys.path)
from SpineNetLib.core.errors import SpineNetError  # noqa: E402

#: Import name of each requirement in Resources/requirements.txt.
IMPORT_NAMES = {"numpy": "numpy", "scipy": "scipy", "pydicom": "pydicom", "simpleitk": "SimpleITK", "torch": "torch"}
#: Weight sources offered in the panel, in combo-box order.
WEIGHT_SOURCES = ("bundled", "official", "folder")


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
            "press Detect &amp; Grade. A wrong level can be corrected in the vertebra list: the others "
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
    """The "Detect & Grade" panel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.ui = None
        self.process = None
        self._lastProcess = None
        self._buffer = ""
        self._run = None
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

        self.ui.weightsComboBox.clear()
        for label in ("Bundled (this project)", "Official SpineNetV2 (download, non-commercial)", "Folder..."):
            self.ui.weightsComboBox.addItem(label)
        self.ui.deviceComboBox.clear()
        for device in ("auto", "cpu", "cuda"):
            self.ui.deviceComboBox.addItem(device)
        self.ui.hotspotHeadComboBox.clear()
        for head in documents.GRADE_HEADS:
            self.ui.hotspotHeadComboBox.addItem(head)
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
        """Module closed: stop a running worker."""
        if self.process is not None:
            self._run["cancelled"] = True
            self.process.kill()

    def setStatus(self, message):
        self.ui.statusLabel.setText(message)
        logging.info("SpineNet: %s", message)

    def updateWidgets(self, *args):
        running = self.process is not None
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
        """The options chosen in the panel, as the worker takes them."""
        source = WEIGHT_SOURCES[max(0, _get(self.ui.weightsComboBox, "currentIndex"))]
        weights = _get(self.ui.weightsFolderLineEdit, "text").strip() if source == "folder" else source
        return {"weights": weights, "device": _get(self.ui.deviceComboBox, "currentText") or "auto",
                "grading": bool(_get(self.ui.gradingCheckBox, "checked")),
                "hotspot_head": _get(self.ui.hotspotHeadComboBox, "currentText") or None}

    def onBrowseWeights(self):
        folder = qt.QFileDialog.getExistingDirectory(None, "SpineNet weights folder",
                                                     _get(self.ui.weightsFolderLineEdit, "text"))
        if folder:
            self.ui.weightsFolderLineEdit.setText(folder)

    # ----------------------------------------------------------------- running

    def onApply(self):
        if self.process is not None:
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
        try:
            run = self.logic.prepareRun(volume, pipeline=self.logic.pipeline, options=self.logic.pipelineOptions,
                                        **settings)
        except SpineNetError as error:
            self.setStatus("Error: " + str(error))
            return
        self._run = dict(run, volumeID=volume.GetID(), cancelled=False, result=None, error=None, warnings=[])
        self._buffer = ""
        process = qt.QProcess()
        process.setProgram(run["program"])
        process.setArguments(run["arguments"])
        process.setWorkingDirectory(LIBRARY_PARENT)
        environment = qt.QProcessEnvironment.systemEnvironment()
        for key, value in run["environment"].items():
            environment.insert(key, value)
        process.setProcessEnvironment(environment)
        process.readyReadStandardOutput.connect(self.onWorkerOutput)
        process.finished.connect(self.onWorkerFinished)
        process.errorOccurred.connect(self.onWorkerError)
        self.process = process
        self.ui.progressBar.setMaximum(100)
        self.ui.progressBar.setValue(0)
        self.setStatus("Starting SpineNet on " + volume.GetName() + " ...")
        self.updateWidgets()
        process.start()

    def onCancel(self):
        if self.process is None:
            return
        self._run["cancelled"] = True
        self.setStatus("Cancelling ...")
        self.process.kill()

    def onWorkerOutput(self, *args):
        if self.process is None:
            return
        self._buffer += _text(self.process.readAllStandardOutput())
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self.handleWorkerLine(line)

    def handleWorkerLine(self, line):
        message = worker.parse_line(line)
        if message.kind == "PROGRESS":
            self.ui.progressBar.setMaximum(max(1, message.total))
            self.ui.progressBar.setValue(min(message.done, max(1, message.total)))
            self.ui.statusLabel.setText(message.text.capitalize() + " ...")
        elif message.kind == "WARNING":
            self._run["warnings"].append(message.text)
            self.setStatus("Warning: " + message.text)
        elif message.kind == "RESULT":
            self._run["result"] = message.text
        elif message.kind == "ERROR":
            self._run["error"] = message.text
        elif line.strip():
            logging.info("SpineNet worker: %s", line)

    def onWorkerError(self, error=None):
        """Only a worker that could not start ends here (a crash or a kill also emits finished)."""
        if self.process is None or error != qt.QProcess.FailedToStart:
            return
        run, self._lastProcess, self.process = self._run, self.process, None
        self.logic.cleanupRun(run)
        self.setStatus("Could not start the SpineNet worker (" + run["program"] + "); see the Python console log.")
        self.updateWidgets()

    def onWorkerFinished(self, *args):
        process, run = self.process, self._run
        if process is None:
            return
        self.onWorkerOutput()
        if self._buffer.strip():
            self.handleWorkerLine(self._buffer)
        self._buffer = ""
        errors = _text(process.readAllStandardError()).strip()
        if errors:
            logging.info("SpineNet worker stderr:\n%s", errors)
        exitCode = process.exitCode()
        # Keep the finished process referenced until the next run: releasing the last reference
        # inside its own signal would delete it while Qt is still emitting.
        self._lastProcess, self.process = process, None
        self.logic.cleanupRun(run)
        if run["cancelled"]:
            self.ui.progressBar.setValue(0)
            self.setStatus("Cancelled.")
        elif run["error"]:
            self.setStatus("Error: " + run["error"])
        elif run["result"]:
            volume = self.logic.scene.GetNodeByID(run["volumeID"])
            try:
                self.logic.loadResults(volume, run["result"])
            except SpineNetError as error:
                self.setStatus("Error: " + str(error))
            else:
                self.ui.progressBar.setValue(_get(self.ui.progressBar, "maximum"))
                if self._volume() is not volume:
                    self.ui.inputSelector.setCurrentNode(volume)
                self.populateResults()
                summary = self.logic.summary(volume)
                self.setStatus(summary + ("" if not run["warnings"] else " Warning: " + run["warnings"][-1]))
        else:
            lastLine = errors.splitlines()[-1] if errors else "no message"
            self.setStatus(f"The SpineNet worker stopped (exit code {exitCode}) without a result: {lastLine}")
        self.updateWidgets()

    # ----------------------------------------------------------------- results

    def onInputChanged(self, *args):
        self.populateResults()
        self.updateWidgets()

    def populateResults(self):
        """Fill the disc table and the vertebra list from the results stored for the input volume."""
        volume = self._volume()
        vertebraeDoc, discsDoc, _ = self.logic.documents(volume) if volume is not None else (None, None, None)
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
    """MRML and files only (no GUI): usable from the Python console and in batch scripts."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        #: Hook for extensions and tests: "MODULE:FUNCTION" or "FILE.py:FUNCTION" replacing the
        #: worker's default pipeline, and extra options for it (see SpineNetLib.apps.worker).
        self.pipeline = None
        self.pipelineOptions = {}

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

        Returns ``{"program", "arguments", "environment", "folder", "output"}``;
        the voxels ([k, j, i]) and IJK-to-RAS go to the worker unchanged.
        """
        mrml = self._mrml()
        folder = workFolder or tempfile.mkdtemp(prefix="SpineNet-")
        voxels, ijkToRas = mrml.volume_arrays(volumeNode)
        npy, geometry = worker.write_volume(os.path.join(folder, "input"), voxels, ijkToRas,
                                            {"path": volumeNode.GetName(), "format": "Slicer volume"})
        output = os.path.join(folder, "results")
        arguments = ["-m", "SpineNetLib.apps.worker"] + worker.worker_arguments(
            npy, output, geometry=geometry, weights=weights, device=device, grading=grading,
            hotspot_head=hotspot_head, pipeline=pipeline, options=options)
        pythonPath = os.pathsep.join(p for p in (LIBRARY_PARENT, os.environ.get("PYTHONPATH", "")) if p)
        return {"program": self.pythonExecutable(), "arguments": arguments, "folder": folder, "output": output,
                "environment": {"PYTHONPATH": pythonPath, "PYTHONUNBUFFERED": "1"}}

    @staticmethod
    def cleanupRun(run):
        """Delete the temporary input files of a run (the results folder stays for hotspots)."""
        if run and run.get("folder"):
            shutil.rmtree(os.path.join(run["folder"], "input"), ignore_errors=True)

    def runSynchronously(self, volumeNode, pipeline=None, options=None, progress=None, **settings):
        """Run the pipeline in this process (blocks) and show the results; for scripts and tests."""
        mrml = self._mrml()
        run = self.prepareRun(volumeNode, pipeline=pipeline, options=options, **settings)
        try:
            function = worker.load_pipeline(pipeline)
            scan = mrml.scan_from_volume_node(volumeNode)
            allOptions = {"weights": settings.get("weights", "bundled"), "device": settings.get("device", "auto"),
                          "grading": settings.get("grading", True), "hotspot_head": settings.get("hotspot_head"),
                          "output": run["output"], **(options or {})}
            result = function(scan, allOptions, progress or (lambda done, total, message: None))
            documents.write_result_files(run["output"], result["vertebrae"], result.get("discs"), result.get("hotspots"))
        finally:
            self.cleanupRun(run)
        return self.loadResults(volumeNode, os.path.join(run["output"], "result.json"))

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

    def correctLevel(self, volumeNode, index, level):
        """Pin vertebra ``index`` (top to bottom) to ``level``, re-solve the others, rebuild the nodes."""
        vertebraeDoc, discsDoc, folder = self.documents(volumeNode)
        if vertebraeDoc is None:
            raise SpineNetError("there are no SpineNet results for this volume to correct")
        vertebraeDoc, discsDoc = documents.apply_level_correction(vertebraeDoc, index, level, discsDoc)
        self.showResults(volumeNode, vertebraeDoc, discsDoc, folder)
        return [v.get("level") for v in vertebraeDoc["vertebrae"]]

    def exportCsv(self, volumeNode, folder):
        """Write ``<volume>_vertebrae.csv`` and ``<volume>_discs.csv``; returns their paths."""
        from SpineNetLib.outputs.vertebrae import vertebrae_csv_text

        vertebraeDoc, discsDoc, _ = self.documents(volumeNode)
        if vertebraeDoc is None:
            raise SpineNetError("there are no SpineNet results for this volume to export")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", volumeNode.GetName()).strip("_") or "volume"
        files = {f"{stem}_vertebrae.csv": vertebrae_csv_text(vertebraeDoc),
                 f"{stem}_discs.csv": documents.discs_csv_text(vertebraeDoc, discsDoc)}
        from SpineNetLib.outputs.vertebrae import write_files_atomically

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


class SpineNetTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: phantom ground truth -> MRML nodes -> level correction (no weights needed)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_PhantomResults()

    def test_PhantomResults(self):
        from SpineNetLib.slicer import mrml
        from SpineNetLib.synthetic.phantom import make_phantom

        self.delayDisplay("Building a phantom")
        phantom = make_phantom(fov="lumbar", shape=(192, 192), pixel_spacing=(1.6, 1.6), n_slices=9)
        volume = mrml.add_volume(slicer.mrmlScene, phantom.voxels_kji, phantom.ijk_to_ras, "SpineNet phantom")
        vertebraeDoc = documents.vertebrae_document_from_truth(phantom.scan, phantom.vertebrae)
        logic = SpineNetLogic()
        nodes = logic.showResults(volume, vertebraeDoc)
        self.assertEqual(len(nodes.curves), len(phantom.vertebrae))
        self.assertEqual(nodes.table.GetNumberOfRows(), len(phantom.vertebrae) - 1)
        logic.showResults(volume, vertebraeDoc)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
        # ground truth is certain of every other level, so only the pinned one changes
        levels = logic.correctLevel(volume, 0, "T11")
        self.assertEqual(levels, ["T11"] + phantom.levels[1:])
        self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByName("SpineNet T11"))
        self.delayDisplay("SpineNet self-test passed")
