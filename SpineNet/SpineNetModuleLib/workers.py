"""Signals, the worker interface and its workers, and one run (no widgets: the logic uses them headless).

* :class:`ServedWorker`, the default, hands each run to one worker process
  that a :class:`WorkerService` keeps running between runs
  (``PythonSlicer -m SpineNetLib.apps.worker --serve`` with ``qt.QProcess``, started
  when the module is shown): the GUI stays responsive, and no run waits for Python
  to start, torch to be imported and the networks to be loaded (3-4 s of a bundled
  run on a 2-core AVX2 CPU); Cancel kills the process, and the next run starts another;
* :class:`QProcessWorker` runs ``PythonSlicer -m SpineNetLib.apps.worker`` as a
  process of its own for each run (``SpineNetLogic(workerFactory=QProcessWorker)``);
* :class:`InProcessWorker` calls the same entry point,
  ``SpineNetLib.apps.worker.run_request``, in this process (scripts, tests,
  ``SpineNetLogic.runSynchronously``).  Every caller therefore writes the
  same result files.
"""

import contextlib
import functools
import json
import logging

import qt

from SpineNetModuleLib import LIBRARY_PARENT  # noqa: F401  (puts SpineNetLib on sys.path)
from SpineNetLib.apps import worker
from SpineNetLib.core.errors import EXIT_INTERNAL, SpineNetError


def _text(data):
    """Text of the bytes a QProcess returns (QByteArray under PythonQt and PySide6)."""
    if hasattr(data, "data"):
        data = data.data()
    if isinstance(data, (bytes, bytearray)):
        return bytes(data).decode("utf-8", errors="replace")
    return str(data)



def _newProcess(program, arguments, environment, workingDirectory):
    """A ``qt.QProcess`` set up to run ``program`` with ``arguments`` in ``workingDirectory``, with
    ``environment`` on top of the system's (not started)."""
    process = qt.QProcess()
    process.setProgram(program)
    process.setArguments(list(arguments))
    process.setWorkingDirectory(workingDirectory)
    processEnvironment = qt.QProcessEnvironment.systemEnvironment()
    for name, value in environment.items():
        processEnvironment.insert(name, value)
    process.setProcessEnvironment(processEnvironment)
    return process


def _writeLine(process, text):
    """Write one line to a QProcess's input: Python bytes where the binding converts them (PySide6,
    PythonQt's QByteArray arguments), else a QByteArray made of them."""
    data = (text + "\n").encode("utf-8")
    try:
        process.write(data)
    except TypeError:
        process.write(qt.QByteArray(data))


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
    """The worker as a process of its own for one run (``qt.QProcess``; keeps Slicer responsive):
    ``SpineNetLogic(workerFactory=QProcessWorker)``, where :class:`ServedWorker` is the default."""

    def __init__(self):
        WorkerProcess.__init__(self)
        self.process = None
        self._running = False
        self._lines = LineSink(self.lineReceived.emit)

    def start(self, run):
        process = _newProcess(run.program, run.arguments, run.environment, run.workingDirectory)
        process.readyReadStandardOutput.connect(self._onOutput)
        process.finished.connect(self._onFinished)
        process.errorOccurred.connect(self._onError)
        # The process stays referenced after it finished: releasing the last reference inside
        # its own signal would delete it while Qt is still emitting.
        self.process, self._running, self._lines = process, True, LineSink(self.lineReceived.emit)
        process.start()

    def cancel(self):
        if self._running:
            self.process.kill()

    def isRunning(self):
        return self._running

    def _onOutput(self, *args):
        if self._running:
            self._lines.write(_text(self.process.readAllStandardOutput()))

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
        self._lines.close()
        errors = _text(self.process.readAllStandardError()).strip()
        self._running = False
        self.finished.emit(self.process.exitCode(), errors)


#: A worker kept running ends after this long without a run: it holds torch and the networks (about
#: 0.6-0.8 GB of memory), which a Slicer session that is done with SpineNet should get back.
WORKER_IDLE_SECONDS = 15 * 60


class WorkerService:
    """One worker process kept running between runs: ``program`` + ``serveArguments`` of a run
    (``SpineNetLib.apps.worker --serve``, whose requests and answers its docstring describes).

    :class:`ServedWorker` hands it one run at a time (:meth:`submit`).  The process is started again
    when a run asks for another program, environment or working directory, when it ended (a crash, a
    cancelled run, :attr:`idleSeconds` without a run, after which its input is closed and it ends by
    itself), or after :meth:`stop`.  :meth:`warmUp` starts it before the first run (the panel does when
    the module is shown), so that even that run finds torch imported and the default networks loaded.
    """

    def __init__(self, idleSeconds=WORKER_IDLE_SECONDS):
        self.idleSeconds = idleSeconds
        self.process = None
        self._startKey = None
        self._alive = False
        self._client = None
        self._lines = LineSink(self._onLine)
        self._idleTimer = None
        # processes stopped while their signals may still come: referenced until the next start
        self._stopped = []

    def isAlive(self):
        """True from the start of the process until it ended (or :meth:`stop`)."""
        return self._alive

    def warmUp(self, program, arguments, environment, workingDirectory):
        """Start the process with these settings unless it runs with them already."""
        key = (program, tuple(arguments), tuple(sorted(environment.items())), workingDirectory)
        if self._alive and key == self._startKey:
            return
        self.stop()
        process = _newProcess(program, arguments, environment, workingDirectory)
        process.readyReadStandardOutput.connect(functools.partial(self._onOutput, process))
        process.finished.connect(functools.partial(self._onFinished, process))
        process.errorOccurred.connect(functools.partial(self._onError, process))
        self.process, self._startKey, self._alive, self._lines = process, key, True, LineSink(self._onLine)
        self._stopped = self._stopped[-2:]
        process.start()
        self._restartIdleTimer()

    def submit(self, client, run):
        """Hand ``run`` (a :class:`SpineNetRun`) to the process; ``client`` (a :class:`ServedWorker`) gets
        its lines and its end (``_finish(exitCode, errorText)``)."""
        self.warmUp(run.program, run.serveArguments, run.environment, run.workingDirectory)
        self._stopIdleTimer()
        self._client = client
        if not self._alive:   # it could not start, and Qt said so at once
            self._endClient(None, "")
            return
        _writeLine(self.process, json.dumps(list(run.workerArguments)))

    def stop(self):
        """End the process at once (a run on it finishes, with the exit code of the kill)."""
        process, self.process = self.process, None
        self._stopIdleTimer()
        if process is not None:
            self._stopped.append(process)
            if self._alive:
                process.kill()
        self._alive = False
        self._endClient(None if process is None else process.exitCode(), "")

    def _restartIdleTimer(self):
        self._stopIdleTimer()
        if self.idleSeconds is None:
            return
        timer = qt.QTimer()
        timer.setSingleShot(True)
        timer.setInterval(int(self.idleSeconds * 1000))
        timer.timeout.connect(self._onIdle)
        timer.start()
        self._idleTimer = timer

    def _stopIdleTimer(self):
        if self._idleTimer is not None:
            self._idleTimer.stop()
            self._idleTimer = None

    def _onIdle(self):
        self._idleTimer = None
        if self._alive and self._client is None:
            self.process.closeWriteChannel()   # the worker ends at the end of its input

    def _onOutput(self, process, *args):
        if process is self.process:
            self._lines.write(_text(process.readAllStandardOutput()))

    def _onLine(self, line):
        """A line of the running process: a run's end, ``READY``, or a line of the run (its client's)."""
        if line.startswith("END"):
            status = line.partition(" ")[2].strip()
            errors = _text(self.process.readAllStandardError()).strip()
            self._endClient(int(status) if status.lstrip("-").isdigit() else EXIT_INTERNAL, errors)
            self._restartIdleTimer()
        elif not line.startswith("READY") and self._client is not None:
            self._client.lineReceived.emit(line)

    def _onError(self, process, error=None):
        """Only a process that could not start ends here (a crash or a kill also emits finished)."""
        if process is not self.process or error != qt.QProcess.FailedToStart:
            return
        self._alive = False
        self._endClient(None, "")

    def _onFinished(self, process, *args):
        if process is not self.process:
            return
        self._onOutput(process)
        self._lines.close()
        self._alive = False
        self._stopIdleTimer()
        self._endClient(process.exitCode(), _text(process.readAllStandardError()).strip())

    def _endClient(self, exitCode, errorText):
        """The run handed to the process has ended (``exitCode`` None: the process could not start)."""
        client, self._client = self._client, None
        if client is not None:
            client._finish(exitCode, errorText)


class ServedWorker(WorkerProcess):
    """One run on the process a :class:`WorkerService` keeps running (the logic's default worker)."""

    def __init__(self, service):
        WorkerProcess.__init__(self)
        self.service = service
        self._running = False

    def start(self, run):
        self._running = True
        self.service.submit(self, run)

    def cancel(self):
        if self._running:
            self.service.stop()

    def isRunning(self):
        return self._running

    def _finish(self, exitCode, errorText):
        if not self._running:
            return
        self._running = False
        self.finished.emit(exitCode, errorText)


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
    is the outcome the panel shows (one line; for a run that is done, the
    summary followed by one "Warning: ..." line per warning, but those of the labelling, which the panel's
    levels box shows); ``nodes`` are the result nodes
    (:class:`SpineNetLib.slicer.mrml.ResultNodes`) of a run that is done.
    ``volumeNode`` is the input volume node; the results go only onto that
    node, never onto another one that took its ID after the scene was closed.
    ``temporary`` is True when ``folder`` is a temporary folder the logic made
    (and removes once the results are in the scene), False for a caller's ``workFolder``.
    """

    def __init__(self, volumeNode, prepared, onProgress=None, onWarning=None, onFinished=None):
        # the node itself: a closed scene frees its IDs, and the next volume may get the same one
        self.volumeNode = volumeNode
        self.volumeID = volumeNode.GetID()
        self.volumeName = volumeNode.GetName()
        self.program = prepared["program"]
        self.arguments = prepared["arguments"]
        self.environment = prepared["environment"]
        self.workingDirectory = prepared["workingDirectory"]
        self.workerArguments = prepared["workerArguments"]
        self.serveArguments = prepared.get("serveArguments", [])
        self.folder = prepared["folder"]
        self.output = prepared["output"]
        self.temporary = bool(prepared.get("temporary", False))
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

