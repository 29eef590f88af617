"""SpineNet: vertebra detection, level labelling and disc grading of sagittal spinal MRI in 3D Slicer.

The module is a thin layer over SpineNetLib, shaped like SlicerNNUNet:

* the **logic** (:class:`SpineNetLogic`, no GUI calls, so it runs headless)
  owns the worker behind a small interface, :class:`WorkerProcess` (by default
  one worker process kept running between runs, :class:`WorkerService`), shows the
  results as MRML nodes and keeps the module's parameter node; it lives in
  ``SpineNetModuleLib/logic.py``, the workers in ``SpineNetModuleLib/workers.py``
  (Slicer loads every ``.py`` file directly in the module folder as a module,
  so helpers go into a package); their public names are re-exported here.
* the **widget** only collects the options, wires the panel to the logic's
  methods and signals, keeps the panel and the parameter node in step
  (``updateGUIFromParameterNode`` / ``updateParameterNodeFromGUI``, with an
  observer on the node), and shows the results (disc table, vertebra list
  with level correction, CSV export, hotspots).

From a script (non-blocking; see docs/SLICER.md)::

    logic = SpineNetLogic()
    run = logic.startRun(volume, weights="bundled", onProgress=print, onFinished=lambda run: print(run.message))
    logic.cancelRun()            # if needed
    logic.waitForRun(run)        # or keep Slicer's event loop running

Qt properties are read through :func:`_get`, which works with PythonQt
(properties are attributes) and with PySide6 (getters are methods); setters
are always called as methods.  That keeps the widget testable outside Slicer.
"""

import functools
import logging
import os
import shutil
import sys
import tempfile

import ctk  # noqa: F401  (the .ui uses ctk widgets; importing registers them)
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

_MODULE_FOLDER = os.path.dirname(os.path.abspath(__file__))
if _MODULE_FOLDER not in sys.path:  # Slicer puts it there; a plain import from a file path does not
    sys.path.insert(0, _MODULE_FOLDER)
# Import the helper package afresh with this file: "Reload" in Slicer re-executes only this file,
# and must pick up edits to the helpers too (and the qt/slicer modules of this execution).
for _name in [name for name in sys.modules if name == "SpineNetModuleLib" or name.startswith("SpineNetModuleLib.")]:
    del sys.modules[_name]

from SpineNetModuleLib import LIBRARY_PARENT  # noqa: E402,F401  (puts SpineNetLib on sys.path)
from SpineNetModuleLib.logic import (  # noqa: E402,F401  (re-exported: SpineNet.SpineNetLogic, ...)
    ARITHMETICS,
    COMPARE_WITH_REFERENCE,
    DEVICES,
    IMPORT_NAMES,
    INPUT_REFERENCE,
    NO_HOTSPOTS,
    NEXT_BEST_SHOWN,
    PARAMETER_DEFAULTS,
    PARAMETER_NODE_TAG,
    RESULT_REFERENCES,
    SEQUENCE_FROM_SCAN,
    SEQUENCES,
    WEIGHT_SOURCES,
    WORKER_MODULE_ARGUMENTS,
    SpineNetLogic,
    arithmetic_settings,
    sequence_setting,
)
from SpineNetModuleLib.workers import (  # noqa: E402,F401
    InProcessWorker,
    LineSink,
    WORKER_IDLE_SECONDS,
    QProcessWorker,
    ServedWorker,
    Signal,
    SpineNetRun,
    WorkerProcess,
    WorkerService,
)
from SpineNetLib.outputs import documents  # noqa: E402
from SpineNetLib.core.errors import SpineNetError  # noqa: E402

#: The status line before a run, where the selected volume has nothing to note (``showInputNote``).
IDLE_PROMPT = "Select a sagittal volume and press Detect & Grade."
#: Style of the labelling line when the levels may be shifted (the worst error: make it stand out).
LEVELS_REVIEW_STYLE = ("QLabel { background-color: #fff3cd; color: #8a1c00; font-weight: bold; "
                       "border: 1px solid #e0a800; padding: 4px; }")


def _get(widget, name):
    """Value of a Qt property: an attribute under PythonQt, a getter method under PySide6
    (``name()``, or ``isName()`` for booleans such as ``checked``)."""
    value = getattr(widget, name) if hasattr(widget, name) else getattr(widget, "is" + name[:1].upper() + name[1:])
    return value() if callable(value) else value


def _selectText(combo, text):
    """Select the combo box item with this text (nothing changes when there is none)."""
    index = combo.findText(text)
    if index >= 0:
        combo.setCurrentIndex(index)


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


class SpineNetWidget(ScriptedLoadableModuleWidget, slicer.util.VTKObservationMixin):
    """The "Detect & Grade" panel: options in, logic calls out, logic signals back to the panel.

    The panel shows and edits the scene's parameter node (input volume,
    options, result references; see :meth:`SpineNetLogic.getParameterNode`):
    ``updateGUIFromParameterNode`` runs whenever the node changes (an
    observer), ``updateParameterNodeFromGUI`` whenever the user changes an
    input or an option.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        slicer.util.VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._populating = False
        self._shownResults = None
        self._levelCombos = []
        self._inputNote = ""

    # ----------------------------------------------------------------- set-up

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.inputSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.compareWithSelector.setMRMLScene(slicer.mrmlScene)
        self.logic = SpineNetLogic()
        self.logic.progressReported.connect(self.onRunProgress)
        self.logic.warningReported.connect(self.onRunWarning)
        self.logic.runFinished.connect(self.onRunFinished)

        self.ui.weightsComboBox.clear()
        for label in ("Bundled (this project)", "Official SpineNetV2 (download, non-commercial)", "Folder..."):
            self.ui.weightsComboBox.addItem(label)
        self.ui.deviceComboBox.clear()
        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device)
        self.ui.arithmeticComboBox.clear()
        for arithmetic in ARITHMETICS:
            self.ui.arithmeticComboBox.addItem(arithmetic)
        self.ui.sequenceComboBox.clear()
        for sequence in SEQUENCES:
            self.ui.sequenceComboBox.addItem(sequence)
        self._hotspotTip = _get(self.ui.hotspotHeadComboBox, "toolTip")
        self.offerHotspotHeads()
        self.ui.hotspotHeadComboBox.setCurrentIndex(0)
        self.ui.progressBar.setValue(0)
        self.ui.cancelButton.setEnabled(False)
        self.ui.discTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.vertebraTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)

        self.ui.applyButton.clicked.connect(self.onApply)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.exportCsvButton.clicked.connect(self.onExportCsv)
        self.ui.loadResultsButton.clicked.connect(self.onLoadResults)
        self.ui.saveResultsButton.clicked.connect(self.onSaveResults)
        self.ui.nextStudyButton.clicked.connect(self.onNextStudy)
        self.ui.showHotspotsButton.clicked.connect(self.onShowHotspots)
        self.ui.weightsBrowseButton.clicked.connect(self.onBrowseWeights)
        self.ui.weightsComboBox.currentTextChanged.connect(self.updateWidgets)
        self.ui.weightsFolderLineEdit.textChanged.connect(self.updateWidgets)   # the hotspot heads it offers
        self.ui.gradingCheckBox.toggled.connect(self.updateWidgets)
        self.ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)
        self.ui.gradingCheckBox.toggled.connect(lambda *args: self.showInputNote())
        self.ui.sequenceComboBox.currentIndexChanged.connect(lambda *args: self.showInputNote())
        # options -> parameter node
        self.ui.weightsComboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.weightsFolderLineEdit.textChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.arithmeticComboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.gradingCheckBox.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.sequenceComboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.hotspotHeadComboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.compareSeriesCheckBox.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.compareSeriesCheckBox.toggled.connect(self.updateWidgets)
        self.ui.compareWithSelector.currentNodeChanged.connect(self.updateParameterNodeFromGUI)
        # a closed scene takes its parameter node (and the results) with it
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.setStatus(IDLE_PROMPT)
        self.initializeParameterNode()
        self.onInputChanged()

    def cleanup(self):
        """Module closed or reloaded: stop a running worker, remove the temporary folders, stop observing
        the scene and the parameter node, stop listening to the logic.  Safe to call twice."""
        self.removeObservers()
        self._parameterNode = None
        if self.logic is None:
            return
        self.logic.cleanup()
        self.logic.progressReported.disconnect(self.onRunProgress)
        self.logic.warningReported.disconnect(self.onRunWarning)
        self.logic.runFinished.disconnect(self.onRunFinished)

    def enter(self):
        """The module is shown: follow the scene's parameter node again, and start the worker process
        (torch's import and the networks take seconds, which the first run then need not wait for)."""
        self.initializeParameterNode()
        self.logic.warmUpWorker()

    def exit(self):
        """Another module is shown: stop following the parameter node (the settings stay in it)."""
        if self._parameterNode is not None and self.hasObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller=None, event=None):
        self.logic.cancelRun()                  # its volume is going away: its results must not land elsewhere
        self.setParameterNode(None)
        self.logic.removeTemporaryFolders()     # the results that needed them are going away

    def onSceneEndClose(self, caller=None, event=None):
        if getattr(self.parent, "isEntered", True):
            self.initializeParameterNode()

    # ----------------------------------------------------------------- parameter node

    def initializeParameterNode(self):
        """Show the scene's parameter node (made with the defaults when the scene has none)."""
        node = self.logic.getParameterNode()
        if node.GetNodeReference(INPUT_REFERENCE) is None and self._volume() is not None:
            node.SetNodeReferenceID(INPUT_REFERENCE, self._volume().GetID())
        self.setParameterNode(node)

    def setParameterNode(self, parameterNode):
        """Observe ``parameterNode`` (None: none) instead of the previous one and show it."""
        if parameterNode is not None:
            self.logic.setDefaultParameters(parameterNode)
        if self._parameterNode is not None and self.hasObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        """Input volume and options from the parameter node; the results when its result references changed."""
        node = self._parameterNode
        if node is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            volume = node.GetNodeReference(INPUT_REFERENCE)
            if volume is not None and self._volume() is not volume:
                self.ui.inputSelector.setCurrentNode(volume)
            source = node.GetParameter("Weights")
            self.ui.weightsComboBox.setCurrentIndex(WEIGHT_SOURCES.index(source) if source in WEIGHT_SOURCES else 0)
            folder = node.GetParameter("WeightsFolder")
            if _get(self.ui.weightsFolderLineEdit, "text") != folder:
                self.ui.weightsFolderLineEdit.setText(folder)
            _selectText(self.ui.deviceComboBox, node.GetParameter("Device"))
            _selectText(self.ui.arithmeticComboBox, node.GetParameter("Arithmetic"))
            self.ui.gradingCheckBox.setChecked(node.GetParameter("Grading") != "false")
            _selectText(self.ui.sequenceComboBox, node.GetParameter("Sequence"))
            self.offerHotspotHeads()
            _selectText(self.ui.hotspotHeadComboBox, node.GetParameter("HotspotHead"))
            self.ui.compareSeriesCheckBox.setChecked(node.GetParameter("CompareSeries") != "false")
            self.ui.compareWithSelector.setCurrentNode(node.GetNodeReference(COMPARE_WITH_REFERENCE))
        finally:
            self._updatingGUIFromParameterNode = False
        self._populateIfChanged()
        self.updateWidgets()

    def updateParameterNodeFromGUI(self, *args):
        """Input volume and options into the parameter node (one Modified event), and the input's result references."""
        node = self._parameterNode
        if node is None or self._updatingGUIFromParameterNode:
            return
        wasModified = node.StartModify()
        try:
            volume = self._volume()
            node.SetNodeReferenceID(INPUT_REFERENCE, volume.GetID() if volume is not None else None)
            node.SetParameter("Weights", WEIGHT_SOURCES[max(0, _get(self.ui.weightsComboBox, "currentIndex"))])
            node.SetParameter("WeightsFolder", _get(self.ui.weightsFolderLineEdit, "text"))
            node.SetParameter("Device", _get(self.ui.deviceComboBox, "currentText") or "auto")
            node.SetParameter("Arithmetic", _get(self.ui.arithmeticComboBox, "currentText") or "float32")
            node.SetParameter("Grading", "true" if _get(self.ui.gradingCheckBox, "checked") else "false")
            node.SetParameter("Sequence", _get(self.ui.sequenceComboBox, "currentText") or SEQUENCE_FROM_SCAN)
            node.SetParameter("HotspotHead", _get(self.ui.hotspotHeadComboBox, "currentText") or NO_HOTSPOTS)
            node.SetParameter("CompareSeries", "true" if _get(self.ui.compareSeriesCheckBox, "checked") else "false")
            other = self.ui.compareWithSelector.currentNode()
            node.SetNodeReferenceID(COMPARE_WITH_REFERENCE, other.GetID() if other is not None else None)
            self.logic.updateResultReferences(node)
        finally:
            node.EndModify(wasModified)

    def _resultsKey(self):
        """What the result tables show: the input volume and its result documents (by the parameter node)."""
        volume, node = self._volume(), self._parameterNode
        documentIDs = () if node is None else tuple(
            node.GetNodeReferenceID(RESULT_REFERENCES[role]) for role in ("vertebrae-document", "discs-document"))
        return (volume.GetID() if volume is not None else None,) + documentIDs

    def _populateIfChanged(self):
        if self._resultsKey() != self._shownResults:
            self.populateResults()

    # ----------------------------------------------------------------- options

    def setStatus(self, message):
        self.ui.statusLabel.setText(message)
        logging.info("SpineNet: %s", message)

    def offerHotspotHeads(self):
        """List "none" and the heads whose hotspots can be shown: those the chosen weights' grader trained
        (Herniation only with the bundled weights), and those the input's results hold maps of. A chosen
        head that is no longer listed falls back to "none" (:meth:`updateWidgets` tells the parameter node)."""
        combo = self.ui.hotspotHeadComboBox
        heads = self.logic.hotspotHeads(self._weightsSpec(), self._volume())
        items = [NO_HOTSPOTS, *heads]   # "none" first: hotspots are opt-in
        if [combo.itemText(k) for k in range(combo.count())] == items:
            return
        chosen = _get(combo, "currentText")
        combo.blockSignals(True)
        try:
            combo.clear()
            for head in items:
                combo.addItem(head)
            combo.setCurrentIndex(items.index(chosen) if chosen in items else 0)
        finally:
            combo.blockSignals(False)
        tip = self._hotspotTip
        if len(heads) < len(documents.GRADE_HEADS):
            tip += (f" Listed: the heads the chosen weights' grader trained, and those with maps in the results "
                    f"({', '.join(heads)})." if heads else " These weights have no grader: no hotspot maps.")
        combo.setToolTip(tip)

    def updateWidgets(self, *args):
        self.offerHotspotHeads()
        node = self._parameterNode
        if node is not None and node.GetParameter("HotspotHead") != (_get(self.ui.hotspotHeadComboBox, "currentText")
                                                                     or NO_HOTSPOTS):
            self.updateParameterNodeFromGUI()   # a head these weights do not offer went back to "none"
        running = self.logic.isRunning()
        folder = WEIGHT_SOURCES[max(0, _get(self.ui.weightsComboBox, "currentIndex"))] == "folder"
        self.ui.weightsFolderLineEdit.setEnabled(folder)
        self.ui.weightsBrowseButton.setEnabled(folder)
        self.ui.hotspotHeadComboBox.setEnabled(bool(_get(self.ui.gradingCheckBox, "checked")))
        self.ui.sequenceComboBox.setEnabled(bool(_get(self.ui.gradingCheckBox, "checked")))
        self.ui.compareWithSelector.setEnabled(bool(_get(self.ui.compareSeriesCheckBox, "checked")))
        self.ui.applyButton.setEnabled(not running)
        self.ui.cancelButton.setEnabled(running)
        vertebraeDoc, _, folder = self.logic.documents(self._volume())   # (None, None, None) without a volume
        hasResults = vertebraeDoc is not None
        self.ui.exportCsvButton.setEnabled(hasResults and not running)
        self.ui.loadResultsButton.setEnabled(not running)   # a cohort study brings its own volume
        self.ui.saveResultsButton.setEnabled(hasResults and not running and self.logic.savableFolder(folder) is not None)
        self.ui.nextStudyButton.setEnabled(hasResults and not running
                                           and self.logic.cohortStudyLocation(folder) is not None)
        self.ui.showHotspotsButton.setEnabled(hasResults and not running)

    def _volume(self):
        return self.ui.inputSelector.currentNode()

    def _weightsSpec(self):
        """The chosen weights as ``--weights`` takes them: "bundled", "official" or a folder."""
        source = WEIGHT_SOURCES[max(0, _get(self.ui.weightsComboBox, "currentIndex"))]
        return _get(self.ui.weightsFolderLineEdit, "text").strip() if source == "folder" else source

    def settings(self):
        """The options chosen in the panel, as :meth:`SpineNetLogic.startRun` takes them."""
        weights = self._weightsSpec()
        head = _get(self.ui.hotspotHeadComboBox, "currentText")
        precision, runtime = arithmetic_settings(_get(self.ui.arithmeticComboBox, "currentText"))
        compare = bool(_get(self.ui.compareSeriesCheckBox, "checked"))
        return {"weights": weights, "device": _get(self.ui.deviceComboBox, "currentText") or "auto",
                "grading": bool(_get(self.ui.gradingCheckBox, "checked")),
                "hotspot_head": None if head in ("", NO_HOTSPOTS) else head,
                "precision": precision, "runtime": runtime,
                "sequence": sequence_setting(_get(self.ui.sequenceComboBox, "currentText")),
                "compare_series": compare,
                "compare_with": self.ui.compareWithSelector.currentNode() if compare else None}

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
            # one question for everything (the logic installs without asking again)
            if not slicer.util.confirmOkCancelDisplay(self.logic.installationPrompt(missing)):
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
            volume = run.volumeNode
            if self._volume() is not volume:
                self.ui.inputSelector.setCurrentNode(volume)
            self.populateResults()
        self.setStatus(run.message)
        self.updateWidgets()

    # ----------------------------------------------------------------- results

    def onInputChanged(self, *args):
        self.updateParameterNodeFromGUI()
        self._populateIfChanged()
        self.updateWidgets()
        self.showInputNote(chosenNow=True)

    def showInputNote(self, chosenNow=False):
        """Before a volume has results, what its DICOM header says of its grading (the logic's
        :meth:`inputNote`: a T1 volume's discs are measured, not graded; the scene's T2 volumes) in the
        status line, else the prompt. Shown when the volume is chosen, and when grading or Sequence
        change while the line holds the prompt or the note; never during a run, nor over a run's message."""
        if self.logic.isRunning():
            return
        if not chosenNow and _get(self.ui.statusLabel, "text") not in (IDLE_PROMPT, self._inputNote):
            return
        volume = self._volume()
        if volume is not None and self.logic.documents(volume)[0] is not None:
            return
        self._inputNote = self.logic.inputNote(volume, bool(_get(self.ui.gradingCheckBox, "checked")),
                                               sequence_setting(_get(self.ui.sequenceComboBox, "currentText")))
        self.setStatus(self._inputNote or IDLE_PROMPT)

    def populateResults(self):
        """Fill the disc table and the vertebra list from the results stored for the input volume."""
        volume = self._volume()
        self._shownResults = self._resultsKey()
        vertebraeDoc, discsDoc, _ = self.logic.documents(volume) if volume is not None else (None, None, None)
        self.showLabellingStatus(*self.logic.labellingStatus(volume))
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
            table.setColumnCount(4)
            table.setRowCount(len(vertebrae))
            table.setHorizontalHeaderLabels(["Level", "P(level)", "Slices", "Outline from"])
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
                outline = qt.QTableWidgetItem(v["outline_from"])
                if documents.rough_outline(v):
                    outline.setToolTip("A rougher outline, taken from a detection below the detector's threshold "
                                       "(drawn unfilled in the slice views): "
                                       "check it before using this vertebra's and its discs' measurements")
                table.setItem(r, 3, outline)
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
        before = [v.get("level") for v in (self.logic.documents(volume)[0] or {}).get("vertebrae", [])]
        try:
            levels = self.logic.correctLevel(volume, row, level)
        except SpineNetError as error:
            self.setStatus("Error: " + str(error))
            return
        self.populateResults()
        self.updateWidgets()
        named = [name or "?" for name in levels]
        if levels == before:   # the level it had: the reader confirms the levels as they are
            self.setStatus(f"Vertebra {row + 1} confirmed as {level}: levels {named[0]}..{named[-1]} marked as "
                           "checked by hand" + (" (Save results writes that into the folder)."
                                                if self.logic.savableResultsFolder(volume) else "."))
            return
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

    def onLoadResults(self):
        """Results written by ``spinenet run`` or ``spinenet cohort`` (a results folder) shown on the selected
        volume, as a run of the panel shows them: for review, level correction and export. A cohort study's
        results that do not fit the selected volume (or with none selected) come with their scan, loaded
        from where the cohort read it."""
        volume = self._volume()
        folder = qt.QFileDialog.getExistingDirectory(None, "SpineNet results folder (with result.json)", "")
        if not folder:
            return
        try:
            volume, scanLoaded = self.logic.loadResultsOrStudy(volume, folder)
        except (SpineNetError, OSError) as error:
            self.setStatus("Loading the results failed: " + " ".join(str(error).split()))
            return
        if scanLoaded:
            self.ui.inputSelector.setCurrentNode(volume)
        self.populateResults()
        self.setStatus(self.logic.summary(volume) + " Loaded from " + folder
                       + (" with its scan, read from where the cohort read it." if scanLoaded else ""))
        self.updateWidgets()

    def onNextStudy(self):
        """The next study of the shown study's cohort that asks for a review, loaded with its scan."""
        try:
            volume = self.logic.showNextStudyToReview(self._volume())
        except (SpineNetError, OSError) as error:
            self.setStatus("Next study: " + " ".join(str(error).split()))
            return
        if volume is None:
            self.setStatus("No other study of this cohort asks for a review.")
            return
        self.ui.inputSelector.setCurrentNode(volume)
        self.populateResults()
        self.setStatus(self.logic.summary(volume) + " Loaded " + volume.GetName() + " for review.")
        self.updateWidgets()

    def onSaveResults(self):
        volume = self._volume()
        if volume is None:
            self.setStatus("Select an input volume first.")
            return
        try:
            saved = self.logic.saveResults(volume)
        except (SpineNetError, OSError) as error:
            self.setStatus("Saving failed: " + " ".join(str(error).split()))
            return
        byFolder = {}
        for path in saved.paths:   # the results folder, then a cohort's tables
            byFolder.setdefault(os.path.dirname(path), []).append(os.path.basename(path))
        self.setStatus("Wrote " + "; ".join(f"{', '.join(names)} to {folder}" for folder, names in byFolder.items())
                       + (f". Warning: {saved.warning}" if saved.warning else ""))

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
        scan = scan_from_array(voxels, ijkToRas, {"path": "self-test boxes"})
        volume = mrml.add_volume(slicer.mrmlScene, voxels, ijkToRas, "self-test boxes")
        return volume, documents.vertebrae_document_from_truth(scan, truth)

    def test_Results(self):
        self.delayDisplay("Showing ground-truth outlines")
        volume, vertebraeDoc = self._boxes()
        logic = SpineNetLogic()
        parameterNode = logic.getParameterNode()
        self.assertEqual(logic.runSettings(parameterNode)["weights"], "bundled")
        parameterNode.SetNodeReferenceID(INPUT_REFERENCE, volume.GetID())
        nodes = logic.showResults(volume, vertebraeDoc)
        self.assertEqual(len(nodes.curves), len(self.LEVELS))
        self.assertEqual(parameterNode.GetNumberOfNodeReferences("ResultOutline"), len(self.LEVELS))
        self.assertIs(parameterNode.GetNodeReference("ResultSegmentation"), nodes.segmentation)
        self.assertEqual(nodes.table.GetNumberOfRows(), len(self.LEVELS) - 1)
        logic.showResults(volume, vertebraeDoc)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
        # naming the top body one level higher moves the whole chain up with it
        levels = logic.correctLevel(volume, 0, "T11")
        self.assertEqual(levels, ["T11", "T12", "L1", "L2", "L3", "L4", "L5"])
        self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByName("self-test boxes SpineNet T11"))

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
            # without a work folder: a temporary one, removed once the results are in the scene
            logic.runSynchronously(volume, pipeline=__name__ + ":selfTestPipeline", options={"vertebrae": truth})
            self.assertFalse(os.path.exists(logic.lastRun.folder))
            self.assertIsNone(logic.documents(volume)[2])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("SpineNet self-test passed")
