"""The SpineNet module's logic: MRML, files, the worker, the parameter node; no GUI calls.

:class:`SpineNetLogic` writes the input volume to a temporary ``.npy`` +
JSON pair, starts the worker (``SpineNetLib.apps.worker``) on it, follows its
``PROGRESS``/``WARNING``/``RESULT``/``ERROR`` lines, reports them through its
signals and the run's callbacks, and shows the results as MRML nodes (through
``SpineNetLib.slicer.mrml``).

**Parameter node.**  The scene holds one ``vtkMRMLScriptedModuleNode`` for
the module (singleton tag and ``ModuleName`` attribute "SpineNet", as
``ScriptedLoadableModuleLogic.getParameterNode`` makes it): the input volume
(reference ``InputVolume``), the options (parameters ``Weights``,
``WeightsFolder``, ``Device``, ``Grading``, ``Sequence``, ``HotspotHead``, ``CompareSeries``) and references
to the input volume's result nodes (``ResultOutline``, ``ResultHotspot`` and
``ResultOtherSeriesLevels``, several each, ``ResultCentroids``, ``ResultSegmentation``, ``ResultTable``,
``ResultVertebraeDocument``, ``ResultDiscsDocument``, and ``ResultNextBestLevels`` where the levels need
review).  It is saved with the scene, so a reloaded scene (or a re-created panel) shows the same settings
and results.

**Temporary folders.**  A run without a ``workFolder`` works in a folder of
its own under the system's temporary folder.  Once the results are in the
scene, the folder is removed, except the hotspot maps of a run that wrote
some (*Show hotspots* reads them while the run's results are shown).  Those
are removed when the volume's results are replaced by another run's, when
the scene is closed (the panel calls :meth:`SpineNetLogic.removeTemporaryFolders`),
by :meth:`SpineNetLogic.cleanup` (the panel's cleanup) and at the latest
when Python exits.  A caller's ``workFolder`` is never removed.
"""

import atexit
import contextlib
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from SpineNetModuleLib import LIBRARY_PARENT
from SpineNetModuleLib.workers import InProcessWorker, ServedWorker, Signal, SpineNetRun, WorkerService
from SpineNetLib.apps import worker
from SpineNetLib.core.errors import SpineNetError
from SpineNetLib.core.levels import MAX_COMPARED_SERIES
from SpineNetLib.outputs import documents

#: Import name of each requirement in Resources/requirements.txt.
IMPORT_NAMES = {"numpy": "numpy", "scipy": "scipy", "pydicom": "pydicom", "simpleitk": "SimpleITK", "pillow": "PIL",
                "scikit-image": "skimage", "python-gdcm": "gdcm", "torch": "torch"}
#: Weight sources offered in the panel, in combo-box order.
WEIGHT_SOURCES = ("bundled", "official", "folder")
#: Devices offered in the panel, in combo-box order.
DEVICES = ("auto", "cpu", "cuda")
#: The panel's arithmetic choices -> (precision, runtime) of the worker (``SpineNetLib/models/precision.py``,
#: ``SpineNetLib/models/runtimes.py``).  float32 is the default: the same result on every CPU.
ARITHMETICS = {"float32": ("fp32", "torch"), "bfloat16": ("bf16", "torch"),
               "bfloat16 on OpenVINO": ("bf16", "openvino")}
#: The panel's sequence choices (the scan's weighting, ``SpineNetLib/discs/weighting.py``): the first lets the
#: DICOM header or the image tell it; the grader reads T2-weighted scans only.
SEQUENCE_FROM_SCAN = "from the scan"
SEQUENCES = (SEQUENCE_FROM_SCAN, "T2", "T1", "PD", "STIR", "FLAIR", "other")
#: The hotspot head choice that computes no hotspot maps (the default: a map takes about half a minute per disc).
NO_HOTSPOTS = "none"
#: What follows the Python program on the worker's command line.
WORKER_MODULE_ARGUMENTS = ["-m", "SpineNetLib.apps.worker"]

#: Singleton tag and ``ModuleName`` attribute of the module's parameter node.
PARAMETER_NODE_TAG = "SpineNet"
#: Reference role of the input volume in the parameter node.
INPUT_REFERENCE = "InputVolume"
#: Reference role of the volume the panel's "Also compare with" names (a volume loaded from a file).
COMPARE_WITH_REFERENCE = "CompareWithVolume"
#: The options in the parameter node and their defaults (text, as MRML stores them).
PARAMETER_DEFAULTS = {"Weights": "bundled", "WeightsFolder": "", "Device": "auto", "Arithmetic": "float32",
                      "Grading": "true", "Sequence": SEQUENCE_FROM_SCAN, "HotspotHead": NO_HOTSPOTS,
                      "CompareSeries": "true"}
#: Role of a result node (``SpineNet.Result`` attribute) -> its reference role in the parameter node.
RESULT_REFERENCES = {"vertebra-outline": "ResultOutline", "centroids": "ResultCentroids",
                     "segmentation": "ResultSegmentation", "grades": "ResultTable",
                     "vertebrae-document": "ResultVertebraeDocument", "discs-document": "ResultDiscsDocument",
                     "hotspot": "ResultHotspot", "other-series-levels": "ResultOtherSeriesLevels",
                     "next-best-levels": "ResultNextBestLevels"}

#: What the levels line adds where the scene shows the next best labelling (``mrml.add_next_best_levels``).
NEXT_BEST_SHOWN = 'The next best labelling\'s levels are shown on the volume in light red ("or S2").'

#: Temporary run folders of every logic of this Python session, removed at exit at the latest.
_TEMPORARY_RUN_FOLDERS = set()


@atexit.register
def _removeLeftoverFolders():
    for folder in list(_TEMPORARY_RUN_FOLDERS):
        shutil.rmtree(folder, ignore_errors=True)
    _TEMPORARY_RUN_FOLDERS.clear()


def _requirementName(requirement):
    return re.split(r"[<>=!~\[; ]", requirement, 1)[0].lower()


def _samePath(a, b):
    return bool(a) and bool(b) and os.path.realpath(str(a)) == os.path.realpath(str(b))


def _keepOnlyHotspots(resultsFolder):
    """Delete every file of a results folder except its hotspot maps and ``vertebrae.json`` (whose levels
    name the discs its maps of one disc are filed under, for Show hotspots after a level correction), and
    the folders left empty."""
    keep = {os.path.realpath(os.path.join(resultsFolder, p))
            for p in documents.list_hotspot_files(resultsFolder) + ["vertebrae.json"]}
    for root, folders, files in os.walk(resultsFolder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.realpath(path) not in keep:
                os.remove(path)
        for name in folders:
            path = os.path.join(root, name)
            if not os.listdir(path):
                os.rmdir(path)


def _mappedHeads(resultsFolder):
    """The grading heads that a results folder holds hotspot maps of, in :data:`documents.GRADE_HEADS` order."""
    files = [os.path.basename(p).split(".")[0]
             for p in (documents.list_hotspot_files(resultsFolder) if resultsFolder else [])]
    return [h for h in documents.GRADE_HEADS if any(name.endswith("_" + h) for name in files)]


def sequence_setting(name):
    """The worker's ``--sequence`` of a :data:`SEQUENCES` name: None for :data:`SEQUENCE_FROM_SCAN` (or empty)."""
    return None if name in ("", None, SEQUENCE_FROM_SCAN) else name


def arithmetic_settings(name):
    """``(precision, runtime)`` of an :data:`ARITHMETICS` name; float32 on torch for an unknown or empty one."""
    return ARITHMETICS.get(name or "", ARITHMETICS["float32"])


@dataclass
class SavedResults:
    """What :meth:`SpineNetLogic.saveResults` wrote."""

    #: The files written: the results folder's, then a cohort's tables.
    paths: list
    #: Why a cohort's tables were not updated with the folder, or None.
    warning: str | None = None


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
        #: The worker process kept running between runs (:class:`WorkerService`): the default workers run on it.
        self.workerService = WorkerService()
        #: Makes the :class:`WorkerProcess` of each run (default: a :class:`ServedWorker` on
        #: :attr:`workerService`; ``QProcessWorker`` starts a process for each run).
        self.workerFactory = workerFactory or self._servedWorker
        self.worker = None
        self.currentRun = None
        self.lastRun = None
        self._lastWorker = None
        #: Results folder kept for hotspots -> the run's temporary folder holding it.
        self.temporaryFolders = {}
        #: Cohort output folder -> ids of its studies shown by :meth:`showNextStudyToReview` (or loaded).
        self.studiesShown = {}
        #: IDs of the volume nodes :meth:`loadCohortStudy` added (the next study's replaces them).
        self.cohortVolumeIds = set()
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

    def cleanup(self):
        """The module is closed or reloaded: stop a run and the worker process, remove every temporary folder."""
        self.cancelRun()
        self.workerService.stop()
        self.removeTemporaryFolders()

    def _servedWorker(self):
        return ServedWorker(self.workerService)

    def warmUpWorker(self):
        """Start the worker process that the next runs use, if the default workers run them and the
        Python packages SpineNet needs are installed; True when it runs.  The panel calls this when the
        module is shown, so that the first run finds torch imported and the default networks loaded."""
        if self.workerFactory != self._servedWorker or self.missingPackages():
            return False
        settings = self.workerProcessSettings()
        self.workerService.warmUp(settings["program"], settings["serveArguments"], settings["environment"],
                                  settings["workingDirectory"])
        return self.workerService.isAlive()

    # ----------------------------------------------------------------- parameter node

    def getParameterNode(self):
        """The scene's SpineNet parameter node, made (with the defaults) when there is none.

        The same node as Slicer's ``ScriptedLoadableModuleLogic.getParameterNode``
        gives, but in :attr:`scene` (which need not be ``slicer.mrmlScene``).
        """
        node = self.scene.GetSingletonNode(PARAMETER_NODE_TAG, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(PARAMETER_NODE_TAG)
            node.SetName(PARAMETER_NODE_TAG)
            node.SetAttribute("ModuleName", PARAMETER_NODE_TAG)
            self.setDefaultParameters(node)
            node = self.scene.AddNode(node)
        elif node.GetAttribute("ModuleName") != PARAMETER_NODE_TAG:  # a closed scene drops the attribute
            node.SetAttribute("ModuleName", PARAMETER_NODE_TAG)
        self.setDefaultParameters(node)
        return node

    @staticmethod
    def setDefaultParameters(parameterNode):
        """Give every option the parameter node lacks its default."""
        for name, value in PARAMETER_DEFAULTS.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    def _existingParameterNode(self):
        return self.scene.GetSingletonNode(PARAMETER_NODE_TAG, "vtkMRMLScriptedModuleNode")

    @staticmethod
    def runSettings(parameterNode):
        """The options of a parameter node as :meth:`startRun` takes them."""
        source = parameterNode.GetParameter("Weights") or PARAMETER_DEFAULTS["Weights"]
        head = parameterNode.GetParameter("HotspotHead")
        precision, runtime = arithmetic_settings(parameterNode.GetParameter("Arithmetic"))
        compare = parameterNode.GetParameter("CompareSeries") != "false"   # the volume chosen then counts too
        return {"weights": parameterNode.GetParameter("WeightsFolder").strip() if source == "folder" else source,
                "device": parameterNode.GetParameter("Device") or "auto",
                "grading": parameterNode.GetParameter("Grading") != "false",
                "hotspot_head": None if head in ("", NO_HOTSPOTS) else head,
                "precision": precision, "runtime": runtime,
                "sequence": sequence_setting(parameterNode.GetParameter("Sequence")),
                "compare_series": compare,
                "compare_with": parameterNode.GetNodeReference(COMPARE_WITH_REFERENCE) if compare else None}

    def updateResultReferences(self, parameterNode=None):
        """Point the parameter node's result references at the result nodes of its input volume."""
        node = parameterNode if parameterNode is not None else self._existingParameterNode()
        if node is None:
            return
        volume = node.GetNodeReference(INPUT_REFERENCE)
        wanted = {role: [] for role in RESULT_REFERENCES.values()}
        if volume is not None:
            for result in self._mrml().result_nodes(self.scene, volume):
                role = RESULT_REFERENCES.get(result.GetAttribute(self._mrml().ROLE_ATTRIBUTE))
                if role is not None:
                    wanted[role].append(result.GetID())
        current = {role: [node.GetNthNodeReferenceID(role, n) for n in range(node.GetNumberOfNodeReferences(role))]
                   for role in wanted}
        if current == wanted:
            return
        wasModified = node.StartModify()
        for role, ids in wanted.items():
            node.RemoveNodeReferenceIDs(role)
            for nodeID in ids:
                node.AddNodeReferenceID(role, nodeID)
        node.EndModify(wasModified)

    # ----------------------------------------------------------------- dependencies

    @staticmethod
    def requirementsPath():
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "requirements.txt")

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
            name = _requirementName(requirement)
            if importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is None:
                missing.append(requirement)
        return missing

    @staticmethod
    def installationPrompt(requirements):
        """The one question asked before :meth:`installPackages` installs ``requirements``."""
        lines = []
        for requirement in requirements:
            if _requirementName(requirement) == "torch":
                lines.append(f"- {requirement}: PyTorch, through the PyTorch extension, which picks a CPU or "
                             "CUDA build for this computer (a large download)")
            else:
                lines.append(f"- {requirement} (pip)")
        return ("SpineNet needs these Python packages, which will be downloaded and installed now:\n"
                + "\n".join(lines) + "\n\nYou are asked only once for all of them; installing can take minutes.")

    def installPackages(self, requirements):
        """Install requirements without asking again (ask once, with :meth:`installationPrompt`, before):
        torch through the PyTorch extension when present, the rest with ``slicer.util.pip_install``."""
        others = []
        for requirement in requirements:
            if _requirementName(requirement) == "torch":
                self._installTorch(requirement)
            else:
                others.append(requirement)
        if others:
            slicer.util.pip_install(" ".join(others))
        # a worker process started before holds the modules of before: the next run starts a new one
        self.workerService.stop()

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
            # askConfirmation=False: the user has already agreed to the whole list, once
            if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=version) is None:
                raise RuntimeError("PyTorch was not installed (installation failed)")

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
                   pipeline=None, options=None, workFolder=None, precision="fp32", runtime="torch", sequence=None,
                   compare_series=True, compare_with=None):
        """Write the volume for the worker and return how to start it.

        The worker draws ``preview.png`` only in a ``workFolder``.  With ``compare_series``, the volume node
        ``compare_with`` (the panel's "Also compare with"; None: none) and the scene's other sagittal volumes
        of the volume's exam (:meth:`_writeOtherSeries`) go to the worker too, to compare their levels with
        the volume's.
        Returns ``{"program", "arguments", "serveArguments", "environment", "workingDirectory",
        "workerArguments", "folder", "output", "temporary"}``: ``program`` +
        ``arguments`` run the worker as a process for this run, ``program`` + ``serveArguments`` the
        process kept running, ``workerArguments`` are what
        ``SpineNetLib.apps.worker.build_parser()`` parses (one request to that process); the voxels ([k, j, i])
        and IJK-to-RAS go to the worker unchanged.  Without ``workFolder`` the
        files go to a new temporary folder (``temporary`` True).
        """
        mrml = self._mrml()
        voxels, ijkToRas = mrml.input_volume_arrays(volumeNode)   # refused as `spinenet run` refuses a file
        self._checkCompareWith(volumeNode, compare_with, compare_series)
        folder = workFolder or tempfile.mkdtemp(prefix="SpineNet-")
        if not workFolder:
            _TEMPORARY_RUN_FOLDERS.add(folder)
        # the DICOM series' acquisition times, where Slicer's database has them: the grader reads T2 only
        metadata = {"path": volumeNode.GetName(), "format": "Slicer volume", **mrml.dicom_acquisition(volumeNode)}
        try:
            otherSeries = self._writeOtherSeries(volumeNode, folder, metadata, compare_with) if compare_series else []
        except SpineNetError:
            if not workFolder:   # nothing of this run stays behind
                _TEMPORARY_RUN_FOLDERS.discard(folder)
                shutil.rmtree(folder, ignore_errors=True)
            raise
        npy, geometry = worker.write_volume(os.path.join(folder, "input"), voxels, ijkToRas, metadata)
        output = os.path.join(folder, "results")
        # preview.png and hotspots.png only where the files stay: a temporary folder is removed once its
        # results are nodes in the scene, and drawing them took 0.16-0.3 s of a run (chu_02, 2 cores)
        workerArguments = worker.worker_arguments(
            npy, output, geometry=geometry, weights=weights, device=device, grading=grading,
            hotspot_head=hotspot_head, pipeline=pipeline, options=options, precision=precision, runtime=runtime,
            preview=bool(workFolder), sequence=sequence, other_series=otherSeries)
        return {**self.workerProcessSettings(), "arguments": WORKER_MODULE_ARGUMENTS + workerArguments,
                "workerArguments": workerArguments, "folder": folder, "output": output, "temporary": not workFolder}

    def _checkCompareWith(self, volumeNode, compareWith, compareSeries):
        """Refuse a volume chosen to compare with that cannot be compared: the input itself, one of another DICOM
        frame of reference than the input's, or any where comparing is switched off (as ``spinenet run
        --compare-with`` refuses them)."""
        if compareWith is None:
            return
        if not compareSeries:
            raise SpineNetError("a volume to compare with was chosen, but comparing the series is switched off")
        if compareWith is volumeNode:
            raise SpineNetError(f'"{volumeNode.GetName()}" is the input volume itself: choose another volume '
                                "to compare with")
        frames = {self._mrml().dicom_series(node).get("frame_of_reference_uid") for node in (volumeNode, compareWith)}
        if len(frames - {None, ""}) == 2:
            raise SpineNetError(f'the volume "{compareWith.GetName()}" lies in another DICOM frame of reference than '
                                "the input (another session or patient position): its vertebrae do not lie where "
                                "the input's do")

    def _writeOtherSeries(self, volumeNode, folder, metadata, compareWith=None):
        """Write ``compareWith`` (a volume node the user chose, or None) and the other sagittal volumes of the
        volume's exam in the scene (``mrml.exam_volumes``: the same study and frame of reference in Slicer's
        DICOM database), at most ``MAX_COMPARED_SERIES`` and each once, for the worker, which labels them and
        asks for a review where one names a vertebra otherwise (``SpineNetLib/label/other_series.py``, as
        ``spinenet run`` on an exam folder, and ``--compare-with``). Returns their (npy, geometry) paths; an
        exam volume that cannot be used is named in ``metadata["warnings"]``, the chosen one is refused."""
        mrml = self._mrml()
        chosen = [compareWith] if compareWith is not None else []
        found = [node for node in mrml.exam_volumes(volumeNode, MAX_COMPARED_SERIES) if node is not compareWith]
        written = []
        for number, node in enumerate((chosen + found)[:MAX_COMPARED_SERIES]):
            try:
                voxels, ijkToRas = mrml.input_volume_arrays(node)
            except SpineNetError as error:
                if node is compareWith:   # the user chose it: refused, as the input volume would be
                    raise SpineNetError(f"the volume to compare with cannot be used: {error}") from None
                metadata.setdefault("warnings", []).append(
                    f'the volume "{node.GetName()}" of the exam was not compared with the one read: {error}')
                continue
            series = {"path": node.GetName(), "format": "Slicer volume", "series_description": node.GetName(),
                      **mrml.dicom_series(node)}
            written.append(worker.write_volume(os.path.join(folder, "input"), voxels, ijkToRas, series,
                                               name=f"other_series_{number}"))
        return written

    def workerProcessSettings(self):
        """``{"program", "serveArguments", "environment", "workingDirectory"}`` of the worker process
        (``serveArguments``: those of the process kept running, :class:`WorkerService`)."""
        pythonPath = os.pathsep.join(p for p in (LIBRARY_PARENT, os.environ.get("PYTHONPATH", "")) if p)
        return {"program": self.pythonExecutable(), "serveArguments": WORKER_MODULE_ARGUMENTS + [worker.SERVE_ARGUMENT],
                "workingDirectory": LIBRARY_PARENT, "environment": {"PYTHONPATH": pythonPath, "PYTHONUNBUFFERED": "1"}}

    @staticmethod
    def cleanupRun(run):
        """Delete the temporary input files of a run (what happens to its results: see :meth:`_settleRunFolder`)."""
        if run and run.get("folder"):
            shutil.rmtree(os.path.join(run.get("folder"), "input"), ignore_errors=True)

    def isRunning(self):
        return self.currentRun is not None

    def startRun(self, volumeNode, weights="bundled", device="auto", grading=True, hotspot_head=None,
                 pipeline=None, options=None, onProgress=None, onWarning=None, onFinished=None,
                 workerProcess=None, workFolder=None, precision="fp32", runtime="torch", sequence=None,
                 compare_series=True, compare_with=None):
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
                                   workFolder=workFolder, precision=precision, runtime=runtime, sequence=sequence,
                                   compare_series=compare_series, compare_with=compare_with)
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
                self._settleRunFolder(run, keep=False)
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
        if run.status != "done":
            self._settleRunFolder(run, keep=False)
        self.runFinished.emit(run)
        if run.onFinished is not None:
            run.onFinished(run)

    def _showRunResults(self, run):
        volume = run.volumeNode
        if not self.scene.IsNodePresent(volume):   # removed, or its scene closed (an ID may have been reused)
            run.status, run.message = "failed", "Error: the input volume is no longer in the scene."
            return
        try:
            vertebraeDoc, discsDoc, folder = documents.read_result(run.resultPath)
            # a temporary folder stays only for its hotspot maps (Show hotspots reads them)
            keep = not run.temporary or bool(documents.list_hotspot_files(folder))
            run.nodes = self.showResults(volume, vertebraeDoc, discsDoc, folder if keep else None)
        except SpineNetError as error:
            run.status, run.message = "failed", "Error: " + str(error)
            return
        self._settleRunFolder(run, keep=keep, resultsFolder=folder)
        run.status = "done"
        # every warning on a line of its own (a run can warn of several things: pixel spacing, untrained heads,
        # ...), but those of the labelling block, which the panel's levels box shows already
        shown = set(((vertebraeDoc or {}).get("labelling") or {}).get("warnings") or [])
        run.message = "\n".join([self.summary(volume)] + ["Warning: " + text for text in run.warnings
                                                           if text not in shown])

    def _settleRunFolder(self, run, keep, resultsFolder=None):
        """A finished run's temporary folder: removed, or (``keep``) trimmed to its hotspot maps and
        remembered until the results are replaced, the scene closes or :meth:`cleanup`."""
        if not run.temporary:
            return
        if not keep:
            shutil.rmtree(run.folder, ignore_errors=True)
            _TEMPORARY_RUN_FOLDERS.discard(run.folder)
            return
        try:
            _keepOnlyHotspots(resultsFolder)
        except OSError as error:
            logging.warning("SpineNet: cannot tidy %s: %s", resultsFolder, error)
        self.temporaryFolders[os.path.realpath(str(resultsFolder))] = run.folder

    def removeTemporaryFolders(self):
        """Remove every temporary folder kept for hotspots (results in the scene then have none)."""
        for resultsFolder in list(self.temporaryFolders):
            self._removeTemporaryFolder(resultsFolder)

    def _removeTemporaryFolder(self, resultsFolder):
        """Remove a results folder if it is one of this logic's temporary folders, and forget it in the scene."""
        folder = self.temporaryFolders.pop(os.path.realpath(str(resultsFolder)), None)
        if folder is None:
            return
        shutil.rmtree(folder, ignore_errors=True)
        _TEMPORARY_RUN_FOLDERS.discard(folder)
        mrml = self._mrml()
        scene = self.scene
        for n in range(scene.GetNumberOfNodesByClass("vtkMRMLTextNode") if scene is not None else 0):
            node = scene.GetNthNodeByClass(n, "vtkMRMLTextNode")
            if _samePath(node.GetAttribute(mrml.FOLDER_ATTRIBUTE), resultsFolder):
                node.RemoveAttribute(mrml.FOLDER_ATTRIBUTE)

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
        """Show the results of a ``result.json`` (or results folder) on ``volumeNode``.

        Raises :class:`SpineNetError`, and changes nothing in the scene, when the results were made on
        another scan than the volume's (their ``vertebrae.json`` records its grid; for a cohort study the
        error says where the cohort read its scan) or the volume has no voxels.
        """
        if volumeNode is None:
            raise SpineNetError("no volume to show the results on")
        from SpineNetLib.cohort.record import cohort_study_of
        from SpineNetLib.core.errors import InputError

        vertebraeDoc, discsDoc, folder = documents.read_result(resultPath)
        try:
            self._mrml().check_results_fit_volume(volumeNode, vertebraeDoc)
        except InputError as error:   # a cohort study: say where its scan is
            cohort = cohort_study_of(folder)
            study = cohort.study if cohort is not None else None
            if study is None:
                raise
            where = study.path if study.inner is None else f"{study.inner} in {study.path}"
            series = f", series {study.series_uid}" if study.series_uid else ""
            raise InputError(f"{error}; the cohort read these results' scan from {where}{series}") from None
        return self.showResults(volumeNode, vertebraeDoc, discsDoc, folder)

    def loadResultsOrStudy(self, volumeNode, resultPath):
        """:meth:`loadResults` on ``volumeNode``; for a cohort study whose results do not fit it (or with no
        volume given) whose scan the cohort recorded, :meth:`loadCohortStudy` instead. Returns (the volume
        the results are shown on, whether its scan was loaded for them)."""
        from SpineNetLib.cohort.record import cohort_study_of

        try:
            if volumeNode is None:
                raise SpineNetError("select the volume the results were made from first")
            self.loadResults(volumeNode, resultPath)
            return volumeNode, False
        except SpineNetError:
            folder = resultPath if os.path.isdir(resultPath) else os.path.dirname(resultPath)
            cohort = cohort_study_of(folder)
            if cohort is None or cohort.study is None:
                raise
        return self.loadCohortStudy(resultPath), True

    def loadCohortStudy(self, resultPath):
        """The scan of a ``spinenet cohort`` study (its folder ``OUTDIR/studies/<id>``) added to the scene as a new
        volume, read from where the cohort read it (:mod:`SpineNetLib.cohort.record`) as the run read it, with
        the study's results shown on it (:meth:`loadResults`); returns the volume node. Raises
        :class:`SpineNetError`, with nothing added, when the folder is no cohort study or its scan cannot be
        read."""
        from SpineNetLib.cohort.discover import study_input
        from SpineNetLib.cohort.record import cohort_study_of, recorded_study
        from SpineNetLib.outputs.correction import read_scan_as_run

        vertebraeDoc, _, folder = documents.read_result(resultPath)
        cohort = cohort_study_of(folder)
        if cohort is None:
            raise SpineNetError(f"{folder} is no study of a spinenet cohort run: select the volume its results "
                                "were made from first")
        study = recorded_study(cohort)
        with study_input(study) as path:
            scan = read_scan_as_run(vertebraeDoc, path, study.series_uid, as_stored=True)
        volumeNode = self._mrml().add_scan_volume(self.scene, scan, study.relative)
        try:
            self.loadResults(volumeNode, folder)
        except Exception:
            self._mrml().remove_node(self.scene, volumeNode)
            raise
        self.cohortVolumeIds.add(volumeNode.GetID())
        self.studiesShown.setdefault(str(cohort.outdir), set()).add(cohort.study_id)
        return volumeNode

    def cohortStudyLocation(self, folder):
        """(the cohort's output folder, the study id) when ``folder``, the results folder stored with a
        volume's results, is a cohort study's that :meth:`saveResults` can write into, else None
        (:func:`SpineNetLib.cohort.record.cohort_location`: file checks only, for every panel update)."""
        from SpineNetLib.cohort.record import cohort_location

        folder = self.savableFolder(folder)
        return cohort_location(folder) if folder else None

    def showNextStudyToReview(self, volumeNode):
        """The next study of the cohort whose study the volume shows (its results loaded from
        ``OUTDIR/studies/<id>``) that asks for a review of its levels and that this logic has not shown yet, in
        the order of ``cohort_review.html`` (the least sure first): its scan and results loaded
        (:meth:`loadCohortStudy`). Once every such study has been shown, round again through those still
        asking but the one shown now (a reader may skip a study to come back to it). The volume, when
        :meth:`loadCohortStudy` added it, goes with its results, unless it holds corrections not saved yet
        (refused: Save results first). Returns the new volume node, or None when no such study is left."""
        from SpineNetLib.cohort.record import STUDIES_FOLDER
        from SpineNetLib.cohort.tables import studies_asking_for_review

        vertebraeDoc, _, folder = self.documents(volumeNode)
        location = self.cohortStudyLocation(folder)
        if location is None:
            raise SpineNetError("load the results of a study of a spinenet cohort run first (Load results...: "
                                "OUTDIR/studies/<study id>)")
        outdir, studyId = location
        shown = self.studiesShown.setdefault(str(outdir), set())
        shown.add(studyId)
        asking = studies_asking_for_review(outdir)
        following = [i for i in asking if i not in shown]
        if not following:   # every one shown: round again
            following = [i for i in asking if i != studyId]
            if not following:
                return None
            shown.clear()
            shown.add(studyId)
        saved = documents.read_result(folder)[0]
        if (vertebraeDoc.get("corrections") or []) != (saved.get("corrections") or []):
            raise SpineNetError("this study's level corrections are not saved: Save results first")
        nextVolume = self.loadCohortStudy(os.path.join(str(outdir), STUDIES_FOLDER, following[0]))
        if volumeNode.GetID() in self.cohortVolumeIds:
            self.cohortVolumeIds.discard(volumeNode.GetID())
            self._mrml().remove_results(self.scene, volumeNode)
            self._mrml().remove_node(self.scene, volumeNode)
        return nextVolume

    def showResults(self, volumeNode, vertebraeDoc, discsDoc=None, folder=None):
        """Replace the volume's SpineNet nodes by nodes built from the documents.

        Nodes of other volumes are left alone; a temporary folder the replaced
        results kept for hotspots is removed; the parameter node's result
        references follow.
        """
        previous = self.documents(volumeNode)[2]
        parameterNode = self._existingParameterNode()
        wasModified = parameterNode.StartModify() if parameterNode is not None else None
        try:
            nodes = self._mrml().show_results(self.scene, volumeNode, vertebraeDoc, discsDoc, folder=folder)
            self.updateResultReferences(parameterNode)
        finally:
            if parameterNode is not None:
                parameterNode.EndModify(wasModified)
        if previous and not _samePath(previous, folder):
            self._removeTemporaryFolder(previous)
        return nodes

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

    def inputNote(self, volumeNode, grading=True, sequence=None):
        """Before a run, one line on a volume whose DICOM header (Slicer's database) says it is not
        T2-weighted while the weighting is left to the scan (``sequence`` None): its discs will be measured,
        not graded; with the sagittal volumes of the scene whose header says T2-weighted. "" otherwise (no
        grading, a weighting chosen, no database, a volume from a file, a T2-weighted one)."""
        if volumeNode is None or not grading or sequence is not None:
            return ""
        mrml = self._mrml()
        weighting = mrml.dicom_weighting(volumeNode)
        if weighting is None or weighting.graded:
            return ""
        t2 = [node.GetName() for node in mrml.sagittal_volumes(volumeNode.GetScene())
              if node.GetID() != volumeNode.GetID() and getattr(mrml.dicom_weighting(node), "name", None) == "T2"]
        note = (f'"{volumeNode.GetName()}" is {weighting.description()}: its discs will be measured, not graded '
                "(the grader reads T2-weighted scans; Sequence T2 grades them)")
        if t2:
            names = ", ".join(f'"{name}"' for name in t2)
            note += f"; the sagittal T2-weighted volume{'s' if len(t2) > 1 else ''} of the scene: {names}"
        return note + "."

    def labellingStatus(self, volumeNode):
        """(one line about how sure the volume's levels are, whether they need review); ("", False) without one.
        For a cohort study whose levels a reader has not corrected or confirmed, what the other series of its exam
        say of them (``exam_disagreement`` of ``cohort_studies.csv``, :mod:`SpineNetLib.cohort.exams`) joins it."""
        vertebraeDoc, _, folder = self.documents(volumeNode)
        text, needsReview = documents.labelling_status(vertebraeDoc)
        if vertebraeDoc is not None and documents.next_best_reading(vertebraeDoc) is not None:
            text += f' {NEXT_BEST_SHOWN}'
        corrected = ((vertebraeDoc or {}).get("labelling") or {}).get("corrected_by_user") is True
        location = self.cohortStudyLocation(folder) if vertebraeDoc is not None and not corrected else None
        if location is None:
            return text, needsReview
        from SpineNetLib.cohort.tables import exam_disagreement_of

        disagreement = exam_disagreement_of(*location)
        if not disagreement:
            return text, needsReview
        said = disagreement[:1].upper() + disagreement[1:] + "."
        return (f"{text} {said}" if text else said), True

    def correctLevel(self, volumeNode, index, level):
        """Pin vertebra ``index`` (top to bottom) to ``level``, re-solve the others, rebuild the nodes."""
        vertebraeDoc, discsDoc, folder = self.documents(volumeNode)
        if vertebraeDoc is None:
            raise SpineNetError("there are no SpineNet results for this volume to correct")
        vertebraeDoc, discsDoc = documents.apply_level_correction(vertebraeDoc, index, level, discsDoc)
        self.showResults(volumeNode, vertebraeDoc, discsDoc, folder)
        return [v.get("level") for v in vertebraeDoc["vertebrae"]]

    def savableResultsFolder(self, volumeNode):
        """The results folder the volume's results came from when it outlives the session (one loaded with
        :meth:`loadResults`, or a run's own output folder), else None (a run's temporary folder)."""
        return self.savableFolder(self.documents(volumeNode)[2] if volumeNode is not None else None)

    def savableFolder(self, folder):
        """``folder`` (the results folder stored with a volume's results) when :meth:`saveResults` can write
        into it, else None."""
        if not folder or os.path.realpath(str(folder)) in self.temporaryFolders:
            return None
        return str(folder) if os.path.isfile(os.path.join(str(folder), "result.json")) else None

    def saveResults(self, volumeNode):
        """Write the volume's results, level corrections included, back into the results folder they came
        from (:meth:`savableResultsFolder`): every file that names a level, the pictures drawn again on the
        volume, replaced together (:func:`SpineNetLib.outputs.correction.rewrite_results`); for a study of a
        ``spinenet cohort`` run its rows in the cohort tables follow (:mod:`SpineNetLib.cohort.record`).
        Returns :class:`SavedResults`. A folder with DICOM results needs the DICOM files themselves: those
        of a volume loaded through Slicer's DICOM module are read from its database (copied into a
        temporary folder, read as the run read them), those of a cohort study from where the cohort read
        them; otherwise such a folder is refused (``spinenet correct --input``)."""
        from SpineNetLib.cohort.record import cohort_study_of, update_cohort_tables
        from SpineNetLib.core.errors import InputError
        from SpineNetLib.outputs.correction import read_manifest_lists, rewrite_results

        vertebraeDoc, discsDoc, stored = self.documents(volumeNode)
        if vertebraeDoc is None:
            raise SpineNetError("there are no SpineNet results for this volume to save")
        folder = self.savableFolder(stored)
        if folder is None:
            raise SpineNetError("these results were not loaded from a results folder: export them with Export CSV")
        cohort = cohort_study_of(folder)
        with self._scanForSaving(volumeNode, vertebraeDoc, read_manifest_lists(folder)["dicom"], cohort) as scan:
            paths = [str(p) for p in rewrite_results(
                folder, vertebraeDoc, discsDoc, scan=scan, how_to_give_the_scan="the volume they were made from",
                how_to_give_the_dicom="load the series through Slicer's DICOM module to save them here, or "
                                      "correct it with spinenet correct --input DICOM_FOLDER")]
        warning = None
        if cohort is not None:
            try:
                paths += [str(p) for p in update_cohort_tables(cohort)]
            except InputError as error:
                warning = (f"the cohort tables were not updated ({error}); the next run of the same spinenet "
                           "cohort command writes them again")
        return SavedResults(paths, warning)

    @contextlib.contextmanager
    def _scanForSaving(self, volumeNode, vertebraeDoc, dicomResults, cohort):
        """The scan :meth:`saveResults` draws the pictures and, where the folder has them (``dicomResults``),
        the DICOM results from: the DICOM files of a series loaded through Slicer's DICOM module, else, for a
        cohort study, the files the cohort read it from (its volume may lie on another voxel grid: one
        :meth:`loadCohortStudy` added holds the canonical array), read as the run read them; else the volume
        itself."""
        from SpineNetLib.cohort.discover import study_input
        from SpineNetLib.cohort.record import recorded_study
        from SpineNetLib.core.errors import InputError
        from SpineNetLib.outputs.correction import read_scan_as_run

        mrml = self._mrml()
        dicomFiles = mrml.dicom_instance_files(volumeNode) if dicomResults else None
        if dicomFiles:
            with tempfile.TemporaryDirectory(prefix="SpineNet-dicom-") as copies:
                for number, path in enumerate(dicomFiles):
                    shutil.copyfile(path, os.path.join(copies, f"{number:05d}.dcm"))
                yield read_scan_as_run(vertebraeDoc, copies, (vertebraeDoc.get("input") or {}).get("series_uid"))
            return
        study = None
        if cohort is not None:
            try:
                study = recorded_study(cohort)
            except InputError:   # no record, or its input gone: the volume itself, as for any other
                study = None
        if study is not None:
            with study_input(study) as path:
                yield read_scan_as_run(vertebraeDoc, path, study.series_uid)
            return
        yield mrml.scan_from_volume_node(volumeNode)

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

    def hotspotHeads(self, weights="bundled", volumeNode=None):
        """The grading heads whose hotspot maps can be shown: those the grader of ``weights`` trained
        (:func:`SpineNetLib.outputs.documents.hotspot_heads`, which needs no torch), and those that
        ``volumeNode``'s results hold maps of (from other weights, say)."""
        folder = self.documents(volumeNode)[2] if volumeNode is not None else None
        shown = set(documents.hotspot_heads(weights)) | set(_mappedHeads(folder))
        return tuple(h for h in documents.GRADE_HEADS if h in shown)

    def showHotspots(self, volumeNode, disc, head):
        """Load the hotspot map of one disc and head from the results folder: (node or None, message)."""
        vertebraeDoc, _, folder = self.documents(volumeNode)
        try:   # a map of one disc is filed under the name the disc had when the folder was written
            filedAs = documents.disc_names_in_folder(folder, vertebraeDoc).get(disc, disc)
        except SpineNetError as error:
            return None, f"Hotspots are not available for {disc}: {error}"
        paths = documents.hotspot_files(folder, filedAs, head)
        if not paths:
            heads = _mappedHeads(folder)
            if not heads:
                return None, f"Hotspots are not available for {disc} ({head}): this run wrote no hotspot maps."
            return None, (f"Hotspots are not available for {disc} ({head}): this run wrote hotspot maps only for "
                          + ", ".join(heads) + ".")
        mrml = self._mrml()
        allDiscs = paths[0].name.startswith("hotspots_")
        name = f"SpineNet hotspot all discs {head}" if allDiscs else f"SpineNet hotspot {disc} {head}"
        for node in mrml.result_nodes(self.scene, volumeNode, "hotspot"):
            if node.GetName() == mrml.result_node_name(volumeNode, name):
                mrml.remove_node(self.scene, node)
        node = mrml.load_hotspot_file(self.scene, volumeNode, paths[0], name)
        self.updateResultReferences()
        return node, f"Showing the {head} hotspots of " + ("all discs." if allDiscs else f"{disc}.")
