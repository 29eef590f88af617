"""The inference worker: runs the pipeline in its own process and reports on stdout, line by line.

Why a process: inference takes seconds to minutes; in Slicer it must not
block the GUI thread, and Cancel must stop it at once (the module kills the
process).  The module starts it with ``qt.QProcess`` as
``PythonSlicer -m SpineNetLib.apps.worker ...`` (``python -m`` elsewhere).

Input: either ``--input volume.npy --geometry volume.json`` (the volume
node's voxels ``[k, j, i]`` as Slicer's ``arrayFromVolume`` gives them, and
``{"ijk_to_ras": 4x4, "metadata": {...}}``), which reaches
:func:`SpineNetLib.inputs.canonical.scan_from_array` unchanged, or ``--input PATH``
with anything :func:`SpineNetLib.inputs.load.load_scan` reads (DICOM, NIfTI, NRRD).

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

Pipeline hook: ``--pipeline MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``)
replaces the default :func:`run_pipeline`; tests use it to run the whole
protocol without trained weights, and it lets an extension plug in another
model.  The function is called as ``function(scan, options, progress)`` where
``options`` holds ``weights``, ``device``, ``grading``, ``hotspot_head``,
``output`` (the results folder), ``trusted_sha256`` and every ``--option KEY=VALUE``, and
``progress(done, total, message)`` reports; it writes no files and returns a
:class:`SpineNetLib.pipeline.RunResult` (at least the vertebrae document;
the discs document, hotspot maps as :class:`SpineNetLib.discs.hotspots.HotspotMap`
and warnings when it has them), which the worker writes like any other run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SpineNetLib.core.errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, InputError, SpineNetError, one_line
from SpineNetLib.core.process import exit_process, run_as_process

MESSAGE_KINDS = ("PROGRESS", "WARNING", "RESULT", "ERROR")


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

def run_pipeline(scan, options: dict, progress):
    """The default pipeline: load the networks, then :func:`SpineNetLib.pipeline.run`.

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
    networks = pipeline.load_networks(options.get("weights") or "bundled", options.get("device") or "auto",
                                      trusted_sha256=set(options.get("trusted_sha256") or []) or None,
                                      with_grading=grading, precision=options.get("precision") or "fp32",
                                      runtime=options.get("runtime") or "torch")
    head = hotspot_head_option(options.get("hotspot_head"))
    run_options = pipeline.RunOptions(grade=grading, hotspot_heads=[head] if grading and head else [],
                                      earlier_timings_s={"load_networks": networks.load_seconds},
                                      profile=options.get("profile") or None)
    return pipeline.run(scan, networks, run_options, progress=progress)


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
                                     description="SpineNet worker: runs the pipeline, reports PROGRESS/WARNING/RESULT/ERROR lines on stdout.")
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
    parser.add_argument("--pipeline", help="MODULE:FUNCTION or FILE.py:FUNCTION replacing the default pipeline")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="extra option for the pipeline")
    parser.add_argument("--debug", action="store_true", help="raise internal errors with a traceback")
    return parser


def worker_arguments(input_path, output, *, geometry=None, weights: str = "bundled", device: str = "auto",
                     grading: bool = True, hotspot_head: str | None = None, pipeline: str | None = None,
                     options: dict | None = None, profile: str | None = None, preview: bool = True,
                     precision: str = "fp32", runtime: str = "torch") -> list[str]:
    """Arguments after ``-m SpineNetLib.apps.worker`` for these settings (what the Slicer module runs)."""
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
    if not preview:
        args.append("--no-preview")
    for key, value in (options or {}).items():
        args += ["--option", f"{key}={value}"]
    return args


def _options(args) -> dict:
    options = {"weights": args.weights, "device": args.device, "grading": args.grading,
               "hotspot_head": args.hotspot_head, "output": str(Path(args.output).resolve()),
               "trusted_sha256": list(args.trust_sha256), "profile": args.profile, "precision": args.precision,
               "runtime": args.runtime}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option must be KEY=VALUE, got {item!r}")
        options[key] = value
    return options


def run_request(args, protocol: LineProtocol) -> Path:
    """Read the scan, run the pipeline, write the files; returns the path of ``result.json``.

    The in-process entry point (the Slicer module's synchronous run, the
    batch script); :func:`main` wraps it for the worker process.
    """
    from SpineNetLib.outputs.files import write_results  # needs torch: imported here, as in run_pipeline
    from SpineNetLib.outputs.files import check_writable
    from SpineNetLib.outputs.preview import pillow_missing
    from SpineNetLib.pipeline import RunResult, processing_profile

    output = check_writable(args.output)
    options = _options(args)
    pipeline = load_pipeline(args.pipeline)
    profile = processing_profile(args.profile, args.weights)
    protocol.progress(0, 1, "reading the scan")
    scan = read_scan(args.input, args.geometry, resample_isotropic=profile.slab_average_thin_slices)
    result = pipeline(scan, options, protocol.progress)
    if not isinstance(result, RunResult):
        raise InputError(f"the pipeline {args.pipeline or 'run_pipeline'} returned a {type(result).__name__}, "
                         "not a SpineNetLib.pipeline.RunResult")
    for warning in result.warnings + ([pillow_missing()] if args.preview and pillow_missing() else []):
        protocol.send("WARNING", warning)
    written = write_results(output, result, scan=scan, preview=args.preview)
    return written[-1].resolve()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    protocol = LineProtocol(sys.stdout)
    # Only protocol lines on stdout: whatever the libraries print goes to stderr.
    sys.stdout = sys.stderr
    try:
        manifest = run_request(args, protocol)
    except SpineNetError as error:
        protocol.send("ERROR", str(error))
        return EXIT_USAGE
    except OSError as error:
        target = f" {error.filename}" if getattr(error, "filename", None) else ""
        protocol.send("ERROR", f"cannot access{target}: {error.strerror or error}")
        return EXIT_USAGE
    except Exception as error:  # a bug: one line, unless --debug
        if args.debug:
            raise
        protocol.send("ERROR", f"internal error: {type(error).__name__}: {error}")
        return EXIT_INTERNAL
    finally:
        sys.stdout = protocol.stream
    protocol.stream.write(f"RESULT {manifest}\n")  # the path as is, spaces included
    protocol.stream.flush()
    return EXIT_OK


if __name__ == "__main__":
    exit_process(run_as_process(main))   # a process of its own (core/process.py)
