"""Running a cohort on Dask distributed: a local cluster, or the workers of an existing scheduler.

:func:`run_cohort` finds the studies under a root (:mod:`SpineNetLib.cohort.discover`), skips
those an earlier run finished, runs the others as one Dask task each (:func:`process_study`),
has a study whose own labelling asks for a review take the levels of a sure study of its exam
(:mod:`SpineNetLib.cohort.exam_levels`) and, at the end (also when interrupted), writes the cohort
tables (:mod:`SpineNetLib.cohort.tables`).

Each study goes through :func:`SpineNetLib.pipeline.read_input`, :func:`SpineNetLib.pipeline.run`
and :func:`SpineNetLib.outputs.files.write_results`, as in ``spinenet run``, into
``OUTDIR/studies/<study id>/``.

Networks once per worker: the :class:`NetworksPlugin` worker plugin keeps the networks a worker
loaded, keyed by what they were loaded with (weights, device, trusted checkpoints, grading), so
every study after the first on a worker reuses them, and two cohorts with other weights on one
shared scheduler do not mix them up.  The cache lives on the worker (``worker.plugins``), not in
a module global.

Threads: a local cluster's workers run one study at a time (one Dask thread each), and each
sets ``torch.set_num_threads(threads)``; Dask's nanny starts workers with ``OMP_NUM_THREADS=1``,
so without that call torch would use one thread whatever the machine.  Workers of an existing
scheduler run as many studies at once as they have Dask threads (``dask worker --nthreads``; 1
is best for this work), each with ``threads`` torch threads.

Results once, whatever happens to the workers:

* a study is finished when ``studies/<study id>/result.json`` exists; ``write_results`` writes
  that manifest last, and the whole folder is first written under a hidden name
  (``.<study id>.partial-<random>``) and renamed into place in one step, so a folder named after
  a study is always complete, and an interrupted run or a killed worker leaves at most a hidden
  partial folder, removed by the next run;
* when a worker dies, Dask gives its tasks to other workers (up to its
  ``distributed.scheduler.allowed-failures``, then the task fails with ``KilledWorker``, which is
  recorded as the study's failure).  A task that runs twice finds the finished folder, or loses
  the rename to the first copy and throws its own away: a study is never written twice;
* a study that fails (bad input, a bug) is recorded with its one-line reason and does not stop
  the others; the next run tries it again.

One run per output folder at a time: a run starts by removing the partial folders it finds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Iterator, Sequence, TextIO

import dask
import torch
from distributed import Client, KilledWorker, LocalCluster, WorkerPlugin, as_completed, get_worker

from SpineNetLib import pipeline
from SpineNetLib.cohort.discover import (Discovery, Study, StudyFailure, candidate_inputs, studies_from_candidates,
                                         study_input)
from SpineNetLib.cohort.exam_levels import TakenLevels, take_exam_levels
from SpineNetLib.cohort.record import STUDIES_FOLDER, record_study_inputs
from SpineNetLib.cohort.tables import write_cohort_tables
from SpineNetLib.core.errors import InputError, error_line, one_line
from SpineNetLib.core.process import (deferred_interrupts, environment_keeping_freed_memory,
                                      environment_spinning_briefly, ignore_interrupts,
                                      too_many_threads)
from SpineNetLib.core.profiles import processing_profile
from SpineNetLib.outputs.files import RESULT_FILE, check_writable, write_files_atomically, write_results
from SpineNetLib.weights.resolve import resolve_weights

#: A study's folder is written as ``.<study id><PARTIAL_MARK><random>`` and renamed when complete.
PARTIAL_MARK = ".partial-"
#: Seconds to wait for a scheduler to answer, and for its first worker.
SCHEDULER_TIMEOUT_S = 10
WORKER_WAIT_S = 120
#: Outcomes of a study's task.
DONE, ALREADY_DONE, FAILED = "done", "already done", "failed"


@dataclass(frozen=True)
class CohortSettings:
    """How every study of a cohort is run (the options of ``spinenet run`` that apply to a cohort)."""

    weights: str = "bundled"
    device: str = "auto"
    #: SHA-256 of checkpoints allowed full unpickling (as ``spinenet run --trust-sha256``).
    trusted_sha256: tuple[str, ...] = ()
    grade: bool = True
    preview: bool = True
    #: DICOM results (``write_results(dicom=True)``) for the DICOM studies; image files get none.
    dicom: bool = False
    #: Processing profile name, or None for the weights' default.
    profile: str | None = None
    #: torch threads per study.
    threads: int = 1
    #: Network arithmetic, "fp32" or "bf16" (``pipeline.load_networks``).
    precision: str = "fp32"
    #: Where the networks run, "torch", "openvino" (the detector) or "onnx" (``pipeline.load_networks``).
    runtime: str = "torch"
    #: The weighting of every study (``spinenet run --sequence``: T2, T1, PD, STIR, FLAIR or other), or None:
    #: each study's own DICOM header or image tells it (``discs/weighting.py``).
    sequence: str | None = None

    def network_key(self) -> tuple:
        """What the loaded networks depend on: the key of a worker's network cache."""
        return (self.weights, self.device, tuple(sorted(self.trusted_sha256)), self.grade, self.precision,
                self.runtime)

    def token(self) -> str:
        """A short hash of the settings, part of the Dask task keys."""
        return hashlib.sha1(repr(sorted(asdict(self).items())).encode()).hexdigest()[:8]

    def result_settings(self) -> dict:
        """The settings a study's results depend on (not where or how fast it ran, nor which pictures
        and DICOM objects were written): what :func:`check_same_result_settings` keeps the same across
        the runs into one output folder."""
        weights = (self.weights if self.weights in ("bundled", "official")
                   else str(Path(self.weights).expanduser().resolve()))   # a folder, however it was written
        return {"weights": weights, "trusted_sha256": sorted(self.trusted_sha256), "grade": self.grade,
                "profile": processing_profile(self.profile, self.weights).name,   # None: the weights' own
                "precision": self.precision, "runtime": self.runtime, "sequence": self.sequence}


#: The file in a cohort's output folder that records :meth:`CohortSettings.result_settings`.
SETTINGS_FILE = "cohort_settings.json"
#: The option of ``spinenet cohort`` that sets each of :meth:`CohortSettings.result_settings`.
_OPTION_OF_SETTING = {"weights": "--weights", "trusted_sha256": "--trust-sha256", "grade": "--no-grade",
                      "profile": "--profile", "precision": "--precision", "runtime": "--runtime",
                      "sequence": "--sequence"}


def _said(key: str, value) -> str:
    """A recorded setting as the user gave it: ``--no-grade`` given or not, the others' values."""
    if key == "grade":
        return "not given" if value else "given"
    return "not given" if value is None else json.dumps(value)


def check_same_result_settings(outdir: Path, settings: CohortSettings) -> None:
    """Refuse (:class:`InputError`) to resume into ``outdir`` with settings that change the results
    (:meth:`CohortSettings.result_settings`) from those an earlier run recorded there
    (:func:`record_result_settings`, before its first study): its tables would mix studies run two ways,
    for example graded and ungraded ones.  A folder with no finished study takes any settings; one with
    finished studies and no record (an early version of ``spinenet cohort``, or the file removed) is
    refused, since its settings cannot be compared.  A setting the record lacks (an option added since)
    is the default it was run with."""
    wanted = settings.result_settings()
    recorded_file = outdir / SETTINGS_FILE
    studies_dir = outdir / STUDIES_FOLDER
    finished_any = studies_dir.is_dir() and any(is_finished(studies_dir, d.name) for d in studies_dir.iterdir())
    if not finished_any:
        return
    if not recorded_file.is_file():
        raise InputError(f"{outdir} holds finished studies but no {SETTINGS_FILE}, so the settings they were run "
                         "with cannot be compared with this run's: write into another folder")
    try:
        recorded = json.loads(recorded_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {recorded_file}: {one_line(str(exc))}") from None
    if not isinstance(recorded, dict):
        raise InputError(f"cannot read {recorded_file}: not a JSON object of settings")
    defaults = CohortSettings(weights=str(recorded.get("weights", "bundled"))).result_settings()
    recorded = {key: recorded.get(key, defaults[key]) for key in wanted}
    changed = [key for key in wanted if recorded[key] != wanted[key]]
    if changed:
        said = "; ".join(f"{_OPTION_OF_SETTING[k]}: {_said(k, recorded[k])} before, {_said(k, wanted[k])} now"
                         for k in changed)
        raise InputError(f"{outdir} holds studies run with other settings ({said}); resume with the same "
                         "options, or write into another folder")


def record_result_settings(outdir: Path, settings: CohortSettings) -> None:
    """Write :meth:`CohortSettings.result_settings` into ``outdir/cohort_settings.json``."""
    write_files_atomically(outdir, {SETTINGS_FILE: json.dumps(settings.result_settings(), indent=1) + "\n"})


class NetworksPlugin(WorkerPlugin):
    """Keeps each worker's loaded networks, so a worker loads them once (module docstring).

    A worker started by a nanny (every worker of a local cluster) also ignores Ctrl-C from then on; its
    nanny stops it.  A terminal's Ctrl-C reaches every process of the group, and each local worker
    printed its own traceback while ``spinenet cohort``, which the interrupt is meant for, closed the
    cluster and wrote the tables."""

    name = "spinenet-networks"

    def setup(self, worker) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[tuple, pipeline.Networks] = {}
        if getattr(worker, "nanny", None) is not None:   # started by a nanny (local or `dask worker`)
            ignore_interrupts()

    def networks(self, settings: CohortSettings) -> tuple[pipeline.Networks, float]:
        """The networks for ``settings`` and the seconds spent loading them now (0.0: loaded before)."""
        with self._lock:  # a worker with several threads loads them once too
            key = settings.network_key()
            if key in self._loaded:
                return self._loaded[key], 0.0
            networks = _load_networks(settings)
            self._loaded[key] = networks
            return networks, networks.load_seconds


def _load_networks(settings: CohortSettings) -> pipeline.Networks:
    return pipeline.load_networks(settings.weights, settings.device,
                                  trusted_sha256=set(settings.trusted_sha256) or None, with_grading=settings.grade,
                                  precision=settings.precision, runtime=settings.runtime, threads=settings.threads)


def _worker_networks(settings: CohortSettings) -> tuple[pipeline.Networks, float]:
    """From the worker's :class:`NetworksPlugin`; outside a Dask worker (or without the plugin), loaded now."""
    try:
        plugin = get_worker().plugins.get(NetworksPlugin.name)
    except ValueError:  # not in a worker
        plugin = None
    if plugin is None:
        networks = _load_networks(settings)
        return networks, networks.load_seconds
    return plugin.networks(settings)


@dataclass(frozen=True)
class StudyOutcome:
    """What became of one study's task: ``done``, ``already done`` (by an earlier or a twin task) or ``failed``."""

    study_id: str
    status: str
    reason: str = ""
    seconds: float = 0.0


def is_finished(studies_dir: str | os.PathLike, study_id: str) -> bool:
    """A study is finished when its folder has the manifest, which ``write_results`` writes last."""
    return (Path(studies_dir) / study_id / RESULT_FILE).is_file()


def _publish(partial: Path, final: Path) -> bool:
    """Rename the complete ``partial`` folder to ``final``; False (and ``partial`` removed) when a twin
    task was first.  Renaming a folder onto an existing, non-empty one fails, so only one wins."""
    try:
        os.rename(partial, final)
        return True
    except OSError:
        if not (final / RESULT_FILE).is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
        return False


def process_study(study: Study, studies_dir: str, settings: CohortSettings) -> StudyOutcome:
    """Run one study, as ``spinenet run`` does, into ``studies_dir/<study id>``; never raises for a
    problem of the study itself: the outcome says it (one line, as ``spinenet`` prints errors)."""
    start = time.perf_counter()
    final = Path(studies_dir) / study.study_id
    if (final / RESULT_FILE).is_file():
        return StudyOutcome(study.study_id, ALREADY_DONE)
    partial = final.with_name(f".{study.study_id}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}")
    try:
        networks, load_seconds = _worker_networks(settings)
        torch.set_num_threads(settings.threads)  # in the thread that runs the study
        profile = pipeline.processing_profile(settings.profile, networks.weights.source)
        with study_input(study) as source:   # a study in a ZIP archive: unpacked until its results are written
            scan, read_seconds = pipeline.read_input(source, profile, series_uid=study.series_uid)
            earlier = {"load_scan": read_seconds, **({"load_networks": load_seconds} if load_seconds else {})}
            options = pipeline.RunOptions(grade=settings.grade, sequence=settings.sequence, profile=profile.name,
                                          earlier_timings_s=earlier)
            result = pipeline.run(scan, networks, options)
            dicom = {"dicom": True} if settings.dicom and study.kind == "dicom" else {}
            write_results(partial, result, scan=scan, preview=settings.preview, **dicom)
        published = _publish(partial, final)
    except Exception as error:
        shutil.rmtree(partial, ignore_errors=True)
        return StudyOutcome(study.study_id, FAILED, error_line(error), time.perf_counter() - start)
    return StudyOutcome(study.study_id, DONE if published else ALREADY_DONE, "", time.perf_counter() - start)


def remove_partial_folders(studies_dir: str | os.PathLike) -> int:
    """Remove the hidden partial study folders an interrupted run or a killed worker left; how many."""
    removed = 0
    for path in Path(studies_dir).glob(f".*{PARTIAL_MARK}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


class CohortProgress:
    """``studies: done/total, failed F, ETA mm:ss`` on one line, redrawn on a terminal; elsewhere
    (a log file) a line at most every ``min_interval_s`` and at the end."""

    def __init__(self, total: int, finished_before: int, stream: TextIO | None = None, min_interval_s: float = 10.0,
                 failed_before: int = 0):
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.done, self.failed = total, finished_before, failed_before
        self.min_interval_s = min_interval_s
        self._processed = 0
        self._start = time.monotonic()
        self._last = 0.0

    def line(self) -> str:
        remaining = self.total - self.done - self.failed
        if remaining <= 0:
            eta = "00:00"
        elif self._processed == 0:
            eta = "--:--"
        else:
            seconds = int(round((time.monotonic() - self._start) / self._processed * remaining))
            eta = f"{seconds // 60:02d}:{seconds % 60:02d}"
        return f"studies: {self.done}/{self.total}, failed {self.failed}, ETA {eta}"

    def update(self, outcome: StudyOutcome | None = None) -> None:
        if outcome is not None:
            self._processed += 1
            if outcome.status == FAILED:
                self.failed += 1
            else:
                self.done += 1
        now = time.monotonic()
        last = self.done + self.failed >= self.total
        if self.is_tty:
            self.stream.write(f"\r{self.line()}" + ("\n" if last else ""))
        elif outcome is None or last or now - self._last >= self.min_interval_s:
            self.stream.write(self.line() + "\n")
            self._last = now
        self.stream.flush()

    def close(self) -> None:
        """End a redrawn line that an interruption left open."""
        if self.is_tty and self.done + self.failed < self.total:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class CohortResult:
    """What a cohort run did."""

    #: Every study found, in table order.
    studies: list[Study]
    #: Studies an earlier run had finished (skipped).
    finished_before: int
    #: Outcomes of this run's tasks.
    outcomes: list[StudyOutcome] = field(default_factory=list)
    #: Studies (and DICOM exams) without a result, as in ``cohort_failures.csv``.
    failures: list[StudyFailure] = field(default_factory=list)
    #: Those of ``failures`` found before any study ran: DICOM exams that give no study (no sagittal
    #: series, unreadable headers), so they are not among ``studies``.
    failed_at_discovery: int = 0
    #: The cohort tables written.
    tables: list[Path] = field(default_factory=list)
    #: The studies that took the levels of a sure study of their exam after the studies ran
    #: (:mod:`SpineNetLib.cohort.exam_levels`), and those that could not be written again with them.
    levels_taken: list[TakenLevels] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def done(self) -> int:
        """Studies finished in this run."""
        return sum(o.status == DONE for o in self.outcomes)

    @property
    def total(self) -> int:
        """Studies and failed DICOM exams: each one done now, done before or failed."""
        return len(self.studies) + self.failed_at_discovery


def local_cluster(workers: int) -> LocalCluster:
    """A local Dask cluster of ``workers`` processes with one Dask thread each (one study at a time)."""
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand memory back
    # to the system at every large free: the networks and arrays of a study then run about 1.6 times
    # slower (measured on the phantoms of Testing/Python/test_cohort.py).  The workers' malloc keeps
    # freed memory for reuse instead, as the spinenet command's does (core/process.py); the other
    # variables stay.
    # Their idle OpenMP threads sleep soon, as the command's do (core/process.py): a study's threads
    # spinning idle would take the cores from the other workers.
    environ = environment_spinning_briefly(environment_keeping_freed_memory(
        {name: value for name, value in dask.config.get("distributed.nanny.pre-spawn-environ").items()
         if name != "MALLOC_TRIM_THRESHOLD_"}))
    # Dask's scheduler and workers serve HTTP pages even with the dashboard off: the workers, their
    # logs and the tasks of the run (named after the studies) for anyone on this machine,
    # and the scheduler on port 8787, the one the user's own Dask dashboard would take.  With
    # no routes they serve nothing, and the scheduler listens on a free port of 127.0.0.1.
    no_pages = {"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, **no_pages}):
        # CRITICAL: a worker's own log lines (e.g. about the scheduler closing first) would break
        # the progress line; what goes wrong with a study is in its outcome.
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, silence_logs=logging.CRITICAL)


@contextmanager
def dask_client(workers: int, scheduler: str | None = None) -> Iterator[Client]:
    """A client of the scheduler at ``scheduler``, or of a new :func:`local_cluster` of ``workers``
    processes; closed, with the cluster, after use."""
    if scheduler:
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, ValueError, TimeoutError) as error:
            raise InputError(f"cannot connect to the Dask scheduler at {scheduler}: {one_line(error)}") from None
        try:
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except TimeoutError:
                raise InputError(f"the Dask scheduler at {scheduler} has no worker (waited {WORKER_WAIT_S} s): "
                                 "start some with `dask worker ADDRESS`") from None
            yield client
        finally:
            client.close()
        return
    # Ctrl-C while the workers start would leave them half started, and Dask's exit callback would then
    # fail on them with a traceback: the interrupt waits until the cluster is up, which is then closed.
    # (A Ctrl-C held back is noted as the block ends: a failed start is looked at after it.)  The workers
    # inherit the block of Ctrl-C (core/process.deferred_interrupts) only if multiprocessing's resource
    # tracker is running before it: starting it unblocks SIGINT in the thread that starts it.
    # The cluster is closed wherever an interrupt lands once it is up: one that another thread of this
    # process received during the start can reach Python only after the block, at any point below.
    resource_tracker.ensure_running()
    failure, cluster = None, None
    try:
        with deferred_interrupts() as starting:
            try:
                cluster = local_cluster(workers)
            except Exception as error:
                failure = error
        if starting.interrupted:   # also when the start failed: a Ctrl-C that reached a worker as it started
            raise KeyboardInterrupt
        if failure is not None:
            raise failure
        with Client(cluster) as client:
            yield client
    finally:
        if cluster is not None:
            cluster.close()


def _map_on(client: Client):
    """A ``map_folders`` for discovery that reads the folders' DICOM headers on the workers."""
    def map_folders(function, items: list) -> list:
        return client.gather(client.map(function, items, pure=False)) if items else []
    return map_folders


def _outcome(future, study: Study) -> StudyOutcome:
    """The outcome of a finished task; a task that Dask itself gave up on is the study's failure."""
    try:
        return future.result()
    except KilledWorker as error:
        return StudyOutcome(study.study_id, FAILED, f"the Dask worker running this study died, every time it was "
                                                    f"tried ({one_line(error)})")
    except Exception as error:
        return StudyOutcome(study.study_id, FAILED, f"the Dask task failed: {error_line(error)}")


def _run_pending(client: Client, pending: Sequence[Study], studies_dir: Path, settings: CohortSettings,
                 progress: CohortProgress | None, outcomes: list[StudyOutcome]) -> None:
    """Submit one task per study and collect the outcomes into ``outcomes`` as they come."""
    if not pending:
        return
    token = settings.token()
    keys = [f"spinenet-study-{s.study_id}-{token}" for s in pending]
    futures = client.map(process_study, pending, studies_dir=str(studies_dir), settings=settings, key=keys,
                         pure=False)
    by_key = {key: study for key, study in zip(keys, pending)}
    for future in as_completed(futures):
        outcome = _outcome(future, by_key[future.key])
        outcomes.append(outcome)
        future.release()
        if progress is not None:
            progress.update(outcome)


def _discover(client: Client, root: Path, candidates, only_t2: bool) -> Discovery:
    discovery = studies_from_candidates(root, candidates, _map_on(client), only_t2=only_t2)
    if not discovery.studies:
        which = "sagittal T2-weighted (--t2-only)" if only_t2 else "sagittal"
        exams = f"; {len(discovery.failures)} DICOM exam(s) have no {which} series" if discovery.failures else ""
        raise InputError(f"no study found under {root} (DICOM series, .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd files)"
                         f"{exams}")
    return discovery


def run_cohort(root: str | os.PathLike, outdir: str | os.PathLike, settings: CohortSettings | None = None, *,
               workers: int | None = None, scheduler: str | None = None,
               progress: TextIO | None = None, only_t2: bool = False) -> CohortResult:
    """Run every study under ``root`` that ``outdir`` has no result of yet (module docstring).

    ``only_t2``: of each DICOM exam, only the sagittal series whose header says T2-weighted
    (:mod:`SpineNetLib.cohort.discover`; ``spinenet cohort --t2-only``).

    ``workers``: processes of the local cluster (default: the CPU count divided by
    ``settings.threads``); ``scheduler``: the address of an existing Dask scheduler instead.
    ``progress``: a stream for the progress line (None: silent).  Problems with the root, the
    output folder, the weights or the scheduler raise :class:`InputError` before any study runs;
    a study's own problem is one of the result's ``failures``.
    """
    started = time.perf_counter()
    settings = settings or CohortSettings()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"no such folder: {root}" if not root.exists() else f"not a folder: {root}")
    root = root.resolve()
    outdir = check_writable(Path(outdir).expanduser()).absolute()
    if settings.threads < 1 or (workers is not None and workers < 1):
        raise InputError("--workers and --threads-per-worker must be at least 1")
    asked = f"--threads-per-worker {settings.threads}" if workers is None else \
        f"--workers {workers} x --threads-per-worker {settings.threads}"
    workers = workers or max(1, (os.cpu_count() or 1) // settings.threads)
    too_many = too_many_threads(workers * settings.threads, asked)
    if too_many and scheduler is None:   # a local cluster: every worker runs its study on this machine
        raise InputError(too_many)
    candidates = candidate_inputs(root, exclude=[outdir])
    if not candidates.images and not candidates.folders and not candidates.archives:
        raise InputError(f"no study found under {root}: no image file, no ZIP archive and no folder with other files")
    resolve_weights(settings.weights)  # a missing weights folder is one error now, not one per study
    check_same_result_settings(outdir, settings)
    with dask_client(workers, scheduler) as client:
        client.register_plugin(NetworksPlugin())
        discovery = _discover(client, root, candidates, only_t2)
        studies_dir = outdir / STUDIES_FOLDER
        studies_dir.mkdir(parents=True, exist_ok=True)
        record_result_settings(outdir, settings)
        record_study_inputs(outdir, discovery.studies)
        remove_partial_folders(studies_dir)
        pending = [s for s in discovery.studies if not is_finished(studies_dir, s.study_id)]
        result = CohortResult(discovery.studies, len(discovery.studies) - len(pending),
                              failed_at_discovery=len(discovery.failures))
        meter = (CohortProgress(result.total, result.finished_before, progress,
                                failed_before=result.failed_at_discovery) if progress else None)
        if meter is not None:
            meter.update()
        try:
            _run_pending(client, pending, studies_dir, settings, meter, result.outcomes)
            result.levels_taken = take_exam_levels(studies_dir, discovery.studies)   # not when interrupted
        finally:  # also when interrupted: the tables hold every study finished so far
            if meter is not None:
                meter.close()
            inputs = {s.study_id: s.relative for s in discovery.studies}
            failed = [StudyFailure(o.study_id, inputs[o.study_id], o.reason) for o in result.outcomes
                      if o.status == FAILED]
            result.failures = discovery.failures + failed
            result.tables = write_cohort_tables(outdir, studies_dir, discovery.studies, result.failures)
    result.seconds = time.perf_counter() - started
    return result
