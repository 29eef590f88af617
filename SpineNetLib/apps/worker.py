"""The inference worker: runs the pipeline in its own process and reports on stdout, line by line.

Why a process: inference takes seconds to minutes; in Slicer it must not
block the GUI thread, and Cancel must stop it at once (the module kills the
process).  The module starts it with ``qt.QProcess`` as
``PythonSlicer -m SpineNetLib.apps.worker ...`` (``python -m`` elsewhere).

Input: either ``--input volume.npy --geometry volume.json`` (the volume
node's voxels ``[k, j, i]`` as Slicer's ``arrayFromVolume`` gives them, and
``{"ijk_to_ras": 4x4, "metadata": {...}}``), which reaches
:func:`SpineNetLib.inputs.canonical.scan_from_array` unchanged, or ``--input PATH``
with anything :func:`SpineNetLib.inputs.load.load_scan` reads (DICOM, NIfTI, NRRD). Each
``--other-series volume.npy --other-geometry volume.json`` pair, in the same form, is another sagittal
series of the scan's exam whose levels the run compares with its own (``label/other_series.py``;
``pipeline.RunOptions.other_series``): the Slicer panel passes the exam's other volumes of the scene.

Output: the result files in ``--output``, written by
:func:`SpineNetLib.outputs.files.write_results` (``vertebrae.json``,
``vertebrae.csv``, ``discs.json`` when there is a discs document,
``discs.csv``, the hotspot maps, ``preview.png`` and, with hotspot maps,
``hotspots.png`` unless ``--no-preview``, ``result.json`` last), and on stdout only
these lines:

* ``PROGRESS <done> <total> <message>``
* ``WARNING <message>``
* ``RESULT <path of result.json>``
* ``ERROR <message>`` (one line; then exit status 2 for a problem with the
  input, options or weights, 1 for an internal error, as the ``spinenet`` CLI).

Anything else a library prints goes to stderr.

Serving mode (``python -m SpineNetLib.apps.worker --serve``): one process for
many runs, which the Slicer module keeps running between them, so that no run
pays for starting Python, importing torch and loading the networks again (about
half of a bundled run's 5-8 s as a process of its own on a 2-core AVX2 host;
benchmarks/RESULTS.md, "The worker kept running").  It writes ``READY`` once torch is imported, then reads one request per
line on stdin, a JSON list of the arguments above (what :func:`worker_arguments`
returns), answers each with the lines above followed by ``END <exit status>``, and
ends at the end of its input.  The networks of a request stay loaded for the next
one that asks for the same files and settings (:class:`LoadedNetworks`).

Pipeline hook: ``--pipeline MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``)
replaces the default :func:`run_pipeline`; tests use it to run the whole
protocol without trained weights, and it lets an extension plug in another
model.  The function is called as ``function(scan, options, progress)`` where
``options`` holds ``weights``, ``device``, ``grading``, ``hotspot_head``,
``output`` (the results folder), ``trusted_sha256``, ``other_series`` (the other series' scans, read) and
every ``--option KEY=VALUE``, and
``progress(done, total, message)`` reports; it writes no files and returns a
:class:`SpineNetLib.pipeline.RunResult` (at least the vertebrae document;
the discs document, hotspot maps as :class:`SpineNetLib.discs.hotspots.HotspotMap`
and warnings when it has them), which the worker writes like any other run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SpineNetLib.core.errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, InputError, SpineNetError, one_line
from SpineNetLib.core.process import exit_process, return_freed_memory, run_as_process

MESSAGE_KINDS = ("PROGRESS", "WARNING", "RESULT", "ERROR", "READY", "END")
#: The argument that starts the serving mode (module docstring).
SERVE_ARGUMENT = "--serve"


# --------------------------------------------------------------------------- protocol

@dataclass(frozen=True)
class Message:
    """One parsed worker line; ``kind`` is one of :data:`MESSAGE_KINDS` or "TEXT" for anything else."""

    kind: str
    text: str = ""
    done: int = 0
    total: int = 0


def format_progress(done: int, total: int, message: str) -> str:
    return f"PROGRESS {int(done)} {int(total)} {one_line(message)}"


def parse_line(line: str) -> Message:
    """Parse a line of worker output (trailing newline allowed)."""
    line = line.rstrip("\r\n")
    kind, _, rest = line.partition(" ")
    if kind == "PROGRESS":
        parts = rest.split(" ", 2)
        try:
            done, total = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            return Message("TEXT", line)
        return Message("PROGRESS", parts[2] if len(parts) > 2 else "", done, total)
    if kind in MESSAGE_KINDS:
        return Message(kind, rest)
    return Message("TEXT", line)


class LineProtocol:
    """Writes protocol lines to one stream, flushed at once (the reader is another process)."""

    def __init__(self, stream):
        self.stream = stream

    def send(self, kind: str, text: str) -> None:
        self.stream.write(f"{kind} {one_line(text)}\n")
        self.stream.flush()

    def progress(self, done: int, total: int, message: str) -> None:
        self.stream.write(format_progress(done, total, message) + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------- input files

def write_volume(folder, voxels_kji, ijk_to_ras, metadata: dict | None = None, name: str = "volume") -> tuple[Path, Path]:
    """Save a ``[k, j, i]`` array as ``.npy`` and its IJK-to-RAS (and metadata) as ``.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    npy, geometry = folder / f"{name}.npy", folder / f"{name}.json"
    np.save(npy, np.ascontiguousarray(voxels_kji), allow_pickle=False)
    geometry.write_text(json.dumps({"ijk_to_ras": np.asarray(ijk_to_ras, float).tolist(),
                                    "metadata": metadata or {}}), encoding="utf-8")
    return npy, geometry


def read_scan(input_path, geometry_path=None, resample_isotropic: bool = True):
    """The canonical scan of a ``.npy`` + geometry JSON pair, or of any file :func:`io.load_scan` reads
    (thin slices slab-averaged unless ``resample_isotropic`` is False: the official profile)."""
    path = Path(input_path)
    if path.suffix.lower() == ".npy":
        if geometry_path is None:
            raise InputError(f"{path.name} needs --geometry with its IJK-to-RAS matrix")
        from SpineNetLib.inputs.canonical import scan_from_array
        from SpineNetLib.outputs.documents import read_json

        geometry = read_json(geometry_path, "geometry file")
        try:
            voxels = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read {path}: {one_line(error)}") from None
        metadata = dict(geometry.get("metadata") or {})
        metadata.setdefault("path", str(path))
        return scan_from_array(voxels, geometry.get("ijk_to_ras"), metadata, resample_isotropic=resample_isotropic)
    from SpineNetLib.inputs.load import load_scan

    return load_scan(path, resample_isotropic=resample_isotropic)


# --------------------------------------------------------------------------- pipelines

def run_pipeline(scan, options: dict, progress, loaded: "LoadedNetworks | None" = None):
    """The default pipeline: load the networks (or take them from ``loaded``, a serving worker's
    networks of an earlier request), then :func:`SpineNetLib.pipeline.run`.

    The discs are always measured and, with ``options["grading"]`` and a
    grading network in the weights, graded, with the evidence map of
    ``options["hotspot_head"]`` when one is named (none by default, or "none"); a
    WARNING says when grading was asked for but the weights have no grading network.  Returns a
    :class:`SpineNetLib.pipeline.RunResult`.
    """
    # Imported here, not at the top: the Slicer module imports this module for the protocol
    # helpers before torch (which the pipeline needs) may be installed.
    from SpineNetLib import pipeline

    grading = bool(options.get("grading"))
    progress(0, 1, "loading networks")
    settings = network_settings({**options, "grading": grading})
    if loaded is None:
        networks, reused = load_networks_of(settings), False
    else:
        networks, reused = loaded.get(networks_key(settings), lambda: load_networks_of(settings))
    head = hotspot_head_option(options.get("hotspot_head"))
    run_options = pipeline.RunOptions(grade=grading, hotspot_heads=[head] if grading and head else [],
                                      earlier_timings_s={"load_networks": 0.0 if reused else networks.load_seconds},
                                      profile=options.get("profile") or None, sequence=options.get("sequence") or None,
                                      other_series=list(options.get("other_series") or []))
    return pipeline.run(scan, networks, run_options, progress=progress)


def network_settings(options: dict) -> dict:
    """The arguments of :func:`SpineNetLib.pipeline.load_networks` for a request's ``options`` (defaults:
    the bundled networks in float32 on torch, with the grader)."""
    return dict(weights=options.get("weights") or "bundled", device=options.get("device") or "auto",
                trusted_sha256=set(options.get("trusted_sha256") or []) or None,
                with_grading=bool(options.get("grading", True)), precision=options.get("precision") or "fp32",
                runtime=options.get("runtime") or "torch")


def load_networks_of(settings: dict):
    """:func:`SpineNetLib.pipeline.load_networks` with :func:`network_settings`' arguments."""
    from SpineNetLib import pipeline

    rest = {name: value for name, value in settings.items() if name not in ("weights", "device")}
    return pipeline.load_networks(settings["weights"], settings["device"], **rest)


def networks_key(settings: dict) -> tuple:
    """What decides the networks :func:`SpineNetLib.pipeline.load_networks` gives for ``settings``: the
    settings, and the path, size and time of change of every checkpoint file of the weight set (a folder
    whose files were replaced loads them again)."""
    from SpineNetLib.weights.resolve import resolve_weights

    weight_set = resolve_weights(settings["weights"])
    files = []
    for kind in ("detector", "appearance", "context", "grading", "s1_outline"):
        path = weight_set.path(kind)
        for file in ([] if path is None else sorted(path.rglob("*")) if path.is_dir() else [path]):
            stat = file.stat()
            files.append((str(file.resolve()), stat.st_size, stat.st_mtime_ns))
    trusted = tuple(sorted(settings.get("trusted_sha256") or ()))
    return (tuple(files), str(settings["device"]), trusted,
            *(settings[name] for name in ("with_grading", "precision", "runtime")))


class LoadedNetworks:
    """The networks a serving worker loaded for its last request, kept for the next one that asks for
    the same (:func:`networks_key`); one set at a time, so memory stays that of one run."""

    def __init__(self):
        self._key, self._networks = None, None

    def get(self, key, load):
        """``(networks, reused)``: the kept networks when ``key`` is theirs, else ``load()``'s."""
        if key == self._key:
            return self._networks, True
        self._key = self._networks = None   # the old ones go before the new ones are loaded
        self._networks = load()
        self._key = key
        return self._networks, False


def hotspot_head_option(head) -> str | None:
    """The grading head of a hotspot-head setting, or None for no hotspot maps (empty or "none")."""
    text = str(head or "").strip()
    return None if text.lower() in ("", "none") else text


def load_pipeline(spec: str | None):
    """The pipeline function of ``MODULE:FUNCTION`` or ``path/file.py:FUNCTION`` (default: :func:`run_pipeline`)."""
    if not spec:
        return run_pipeline
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise InputError(f"--pipeline must be MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    try:
        if target.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if module_spec is None or not Path(target).is_file():
                raise InputError(f"pipeline file not found: {target}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as error:
        raise InputError(f"cannot import pipeline module {target!r}: {one_line(error)}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"pipeline module {target!r} has no function {name!r}")
    return function


# --------------------------------------------------------------------------- command line

class _ProtocolParser(argparse.ArgumentParser):
    """Usage errors as an ``ERROR`` line on stdout (exit status 2), so the caller sees them."""

    def error(self, message):
        sys.stdout.write(f"ERROR {one_line(message)}\n")
        sys.stdout.flush()
        self.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _ProtocolParser(prog="python -m SpineNetLib.apps.worker",
                                     description="SpineNet worker: runs the pipeline, reports PROGRESS/WARNING/RESULT/ERROR lines on stdout. "
                                                 f"`{SERVE_ARGUMENT}` alone instead: one JSON list of these arguments per "
                                                 "line on stdin, each answered as one run and `END <status>`.")
    parser.add_argument("--input", required=True, help="volume.npy (with --geometry) or a DICOM/NIfTI/NRRD path")
    parser.add_argument("--geometry", help="JSON with the IJK-to-RAS matrix of a .npy input")
    parser.add_argument("--output", required=True, help="folder for the result files")
    parser.add_argument("--weights", default="bundled", help="bundled, official or a folder")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--grading", action=argparse.BooleanOptionalAction, default=True, help="grade the discs")
    parser.add_argument("--hotspot-head", default=None,
                        help="grading head whose hotspots are written (default: none; they take minutes on a CPU)")
    parser.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True,
                        help="draw preview.png (and hotspots.png with hotspot maps)")
    parser.add_argument("--trust-sha256", action="append", default=[], metavar="HEX",
                        help="allow full unpickling of the checkpoint with this SHA-256 (as in the spinenet CLI)")
    parser.add_argument("--profile", choices=["default", "official"], default=None,
                        help="processing profile (default: official with --weights official, else default)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="network arithmetic: fp32 (default) or bf16 autocast (as in the spinenet CLI)")
    parser.add_argument("--runtime", choices=["torch", "openvino"], default="torch",
                        help="where the detector runs: torch (default) or OpenVINO (as in the spinenet CLI)")
    parser.add_argument("--sequence", metavar="T2|T1|PD|STIR|FLAIR|other",
                        help="the scan's weighting (as spinenet run --sequence): only T2-weighted scans are graded")
    parser.add_argument("--other-series", action="append", default=[], metavar="NPY",
                        help="another sagittal series of the exam (with its --other-geometry, in the same order) "
                             "whose levels are compared with the scan's")
    parser.add_argument("--other-geometry", action="append", default=[], metavar="JSON",
                        help="the geometry JSON of each --other-series")
    parser.add_argument("--pipeline", help="MODULE:FUNCTION or FILE.py:FUNCTION replacing the default pipeline")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="extra option for the pipeline")
    parser.add_argument("--debug", action="store_true", help="raise internal errors with a traceback")
    return parser


def worker_arguments(input_path, output, *, geometry=None, weights: str = "bundled", device: str = "auto",
                     grading: bool = True, hotspot_head: str | None = None, pipeline: str | None = None,
                     options: dict | None = None, profile: str | None = None, preview: bool = True,
                     precision: str = "fp32", runtime: str = "torch", sequence: str | None = None,
                     other_series=()) -> list[str]:
    """Arguments after ``-m SpineNetLib.apps.worker`` for these settings (what the Slicer module runs);
    ``other_series``: (npy, geometry) of each other series of the exam to compare the levels with."""
    args = ["--input", str(input_path)]
    if geometry is not None:
        args += ["--geometry", str(geometry)]
    args += ["--output", str(output), "--weights", str(weights or "bundled"), "--device", str(device or "auto"),
             "--grading" if grading else "--no-grading"]
    if hotspot_head_option(hotspot_head):
        args += ["--hotspot-head", str(hotspot_head)]
    if pipeline:
        args += ["--pipeline", str(pipeline)]
    if profile:
        args += ["--profile", str(profile)]
    if precision != "fp32":
        args += ["--precision", str(precision)]
    if runtime != "torch":
        args += ["--runtime", str(runtime)]
    if sequence:
        args += ["--sequence", str(sequence)]
    if not preview:
        args.append("--no-preview")
    for npy, geometry in other_series:
        args += ["--other-series", str(npy), "--other-geometry", str(geometry)]
    for key, value in (options or {}).items():
        args += ["--option", f"{key}={value}"]
    return args


def _options(args) -> dict:
    options = {"weights": args.weights, "device": args.device, "grading": args.grading,
               "hotspot_head": args.hotspot_head, "output": str(Path(args.output).resolve()),
               "trusted_sha256": list(args.trust_sha256), "profile": args.profile, "precision": args.precision,
               "runtime": args.runtime, "sequence": args.sequence}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option must be KEY=VALUE, got {item!r}")
        options[key] = value
    return options


def run_request(args, protocol: LineProtocol, loaded: LoadedNetworks | None = None) -> Path:
    """Read the scan, run the pipeline, write the files; returns the path of ``result.json``.

    The in-process entry point (the Slicer module's synchronous run, the
    batch script); :func:`main` and :func:`serve` wrap it for the worker process.
    ``loaded`` keeps the default pipeline's networks between requests (:func:`serve`).
    """
    from SpineNetLib.outputs.files import write_results  # needs torch: imported here, as in run_pipeline
    from SpineNetLib.outputs.files import check_writable
    from SpineNetLib.outputs.preview import pillow_missing
    from SpineNetLib.pipeline import RunResult, processing_profile

    output = check_writable(args.output)
    options = _options(args)
    pipeline = load_pipeline(args.pipeline)
    profile = processing_profile(args.profile, args.weights)
    if len(args.other_series) != len(args.other_geometry):
        raise InputError("each --other-series needs its --other-geometry")
    protocol.progress(0, 1, "reading the scan")
    scan = read_scan(args.input, args.geometry, resample_isotropic=profile.slab_average_thin_slices)
    options["other_series"] = [read_scan(npy, geometry, resample_isotropic=profile.slab_average_thin_slices)
                               for npy, geometry in zip(args.other_series, args.other_geometry)]
    if pipeline is run_pipeline:
        result = run_pipeline(scan, options, protocol.progress, loaded)
    else:
        result = pipeline(scan, options, protocol.progress)
    if not isinstance(result, RunResult):
        raise InputError(f"the pipeline {args.pipeline or 'run_pipeline'} returned a {type(result).__name__}, "
                         "not a SpineNetLib.pipeline.RunResult")
    for warning in result.warnings + ([pillow_missing()] if args.preview and pillow_missing() else []):
        protocol.send("WARNING", warning)
    written = write_results(output, result, scan=scan, preview=args.preview)
    return written[-1].resolve()


def answer_request(args, protocol: LineProtocol, loaded: LoadedNetworks | None = None,
                   debug: bool = False) -> int:
    """Run one request and report how it ended on ``protocol`` (``RESULT`` or one ``ERROR`` line); returns
    the exit status.  Only protocol lines reach ``protocol``: what the libraries print goes to stderr."""
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        manifest = run_request(args, protocol, loaded)
    except SpineNetError as error:
        protocol.send("ERROR", str(error))
        return EXIT_USAGE
    except OSError as error:
        target = f" {error.filename}" if getattr(error, "filename", None) else ""
        protocol.send("ERROR", f"cannot access{target}: {error.strerror or error}")
        return EXIT_USAGE
    except Exception as error:  # a bug: one line, unless --debug
        if debug:
            raise
        protocol.send("ERROR", f"internal error: {type(error).__name__}: {error}")
        return EXIT_INTERNAL
    finally:
        sys.stdout = stdout
    protocol.stream.write(f"RESULT {manifest}\n")  # the path as is, spaces included
    protocol.stream.flush()
    return EXIT_OK


def serve(requests, protocol: LineProtocol) -> int:
    """The serving mode (module docstring): answer each line of ``requests`` (a JSON list of worker
    arguments) as one run, then ``END <status>``; returns 0 at the end of the input.  A bad request is
    answered with an ``ERROR`` line and status 2, and the next one is read."""
    # Before the first request, not in it: torch and the modules a run imports on first use, and the
    # networks the Slicer panel asks for by default.
    import PIL.Image  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import torch

    from SpineNetLib import pipeline  # noqa: F401
    from SpineNetLib.outputs import files, preview  # noqa: F401

    loaded = LoadedNetworks()
    defaults = network_settings({})
    try:
        loaded.get(networks_key(defaults), lambda: load_networks_of(defaults))
    except (SpineNetError, OSError):   # e.g. no bundled weights in this installation: the requests will say so
        pass
    gc.freeze()   # what the imports made is never garbage: the collections after each run skip it
    protocol.send("READY", "")
    for line in requests:
        if not line.strip():
            continue
        try:
            arguments = json.loads(line)
            if not (isinstance(arguments, list) and all(isinstance(a, str) for a in arguments)):
                raise ValueError("not a list of strings")
        except ValueError as error:
            protocol.send("ERROR", f"a request must be a JSON list of worker arguments ({one_line(error)})")
            protocol.send("END", str(EXIT_USAGE))
            continue
        try:
            with contextlib.redirect_stdout(protocol.stream):   # a usage error is an ERROR line
                args = build_parser().parse_args(arguments)
        except SystemExit as stop:
            protocol.send("END", str(stop.code if isinstance(stop.code, int) else EXIT_USAGE))
            continue
        protocol.send("END", str(answer_request(args, protocol, loaded)))
        # After END, while the caller shows the results: the run's garbage, the memory malloc kept for
        # reuse and torch's cached GPU blocks go, so that a waiting worker holds little.
        gc.collect()
        return_freed_memory()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == [SERVE_ARGUMENT]:
        protocol = LineProtocol(sys.stdout)
        sys.stdout = sys.stderr
        try:
            return serve(sys.stdin, protocol)
        finally:
            sys.stdout = protocol.stream
    args = build_parser().parse_args(argv)
    return answer_request(args, LineProtocol(sys.stdout), debug=args.debug)


if __name__ == "__main__":
    exit_process(run_as_process(main))   # a process of its own (core/process.py)
