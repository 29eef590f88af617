"""The ``spinenet`` command.

``spinenet run INPUT -o OUTDIR`` detects and labels every vertebra of a
sagittal scan (a DICOM folder or file, NIfTI, NRRD, MHA/MHD) and writes
``vertebrae.json`` and ``vertebrae.csv``.

Exit status: 0 success; 2 a problem with the input, an option or the
weights, reported as one line on stderr (never a traceback); 1 an internal
error (a bug: ``--debug`` shows the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import SpineNetError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _add_scan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="DICOM folder or file, or a NIfTI/NRRD/MHA/MHD image")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID to use when a DICOM folder holds several sagittal series")
    parser.add_argument("--pixel-spacing", nargs=2, type=float, metavar=("ROW", "COL"),
                        help="override the in-plane pixel spacing in mm (row spacing, column spacing)")
    parser.add_argument("--slice-spacing", type=float, metavar="MM", help="override the spacing between sagittal slices in mm")


def _add_network_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default="bundled", metavar="bundled|official|DIR",
                        help="network weights: the bundled models (default), the official download, or a folder")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--trust-sha256", action="append", default=[], metavar="HEX",
                        help="allow full unpickling of the checkpoint with this SHA-256 (only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinenet", description="SpineNetV2 vertebra detection, labelling and disc grading on sagittal spinal MRI.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="detect and label the vertebrae of a scan, write JSON/CSV")
    _add_scan_options(run)
    run.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the result files")
    _add_network_options(run)
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    run.set_defaults(func=command_run)
    return parser


def _validate_overrides(args) -> None:
    if args.pixel_spacing is not None and min(args.pixel_spacing) <= 0:
        raise SpineNetError("--pixel-spacing values must be positive millimetres")
    if args.slice_spacing is not None and args.slice_spacing <= 0:
        raise SpineNetError("--slice-spacing must be positive millimetres")


def command_run(args) -> int:
    from .io import load_scan
    from .outputs import write_vertebra_outputs
    from .pipeline import detect_and_label, load_networks
    from .progress import StderrProgress, no_progress

    start = time.perf_counter()
    _validate_overrides(args)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise SpineNetError(f"output {output} exists and is not a folder")
    scan = load_scan(args.input, series_uid=args.series,
                     pixel_spacing=tuple(args.pixel_spacing) if args.pixel_spacing else None,
                     slice_spacing=args.slice_spacing)
    load_seconds = time.perf_counter() - start
    networks = load_networks(args.weights, args.device, trusted_sha256=set(args.trust_sha256) or None)
    progress = no_progress if args.quiet else StderrProgress()
    result = detect_and_label(scan, networks, progress=progress)
    result.timings_s = {"load_scan": load_seconds, "load_networks": networks.load_seconds,
                        **result.timings_s, "total": time.perf_counter() - start}
    written = write_vertebra_outputs(output, scan, result)
    levels = [v.level or "?" for v in result.vertebrae]
    summary = f"{levels[0]}..{levels[-1]}" if levels else "none"
    print(f"{len(levels)} vertebrae ({summary}); wrote {', '.join(str(p) for p in written)}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpineNetError as error:
        print(f"spinenet: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        target = f" {error.filename}" if getattr(error, "filename", None) else ""
        print(f"spinenet: error: cannot access{target}: {_one_line(error.strerror or error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("spinenet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug: one line, unless --debug
        if args.debug:
            raise
        print(f"spinenet: internal error: {type(error).__name__}: {_one_line(error)} "
              "(run with --debug for the traceback and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
