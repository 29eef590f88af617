"""SpineNet batch mode: one scan in, result files and a Slicer scene out.

Inside 3D Slicer (no window)::

    Slicer --no-splash --no-main-window --python-script SpineNet/SpineNetBatch.py \
        --input DICOM_DIR_OR_FILE --output DIR

or with any Python that has SpineNetLib's requirements and ``slicer-core``::

    python SpineNet/SpineNetBatch.py --input DICOM_DIR_OR_FILE --output DIR

Both read the scan with :func:`SpineNetLib.inputs.load.load_scan` (DICOM folder or
file, NIfTI, NRRD, MHA: identical behaviour in and outside Slicer), run the
pipeline, and write into DIR: ``vertebrae.json``, ``vertebrae.csv``,
``discs.csv`` (and ``discs.json`` when graded), ``result.json`` and
``scene.mrb`` (the scan with the outlines, centroids, segmentation and grades
table, for Slicer's File > Add Data).  A problem with the input, an option or
the weights prints one line on stderr and exits with status 2; an internal
error exits with 1.
"""

import argparse
import os
import sys
import time

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


def _libraryParent():
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "SpineNetLib", "__init__.py")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return candidate
    return here


_libraryParent()


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (and exit status 2), like every other error."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"SpineNetBatch: error: {' '.join(message.split())} (see --help)\n")


def build_parser():
    parser = _OneLineParser(prog="SpineNetBatch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="DICOM folder or file, or a NIfTI/NRRD/MHA image")
    parser.add_argument("--output", required=True, help="folder for the result files and scene.mrb")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID when a DICOM folder holds several sagittal series")
    parser.add_argument("--weights", default="bundled", help="bundled (default), official or a folder")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--grading", action=argparse.BooleanOptionalAction, default=True, help="grade the discs")
    parser.add_argument("--hotspot-head", default="Pfirrmann", help="grading head whose hotspots are written")
    parser.add_argument("--no-scene", action="store_true", help="write only the CSV/JSON files, no scene.mrb")
    parser.add_argument("--pipeline", help="MODULE:FUNCTION or FILE.py:FUNCTION replacing the default pipeline "
                                           "(see SpineNetLib.apps.worker)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="extra option for the pipeline")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return parser


def _inSlicerApplication():
    slicer = sys.modules.get("slicer")
    return slicer is not None and getattr(slicer, "app", None) is not None and getattr(slicer, "mrmlScene", None) is not None


def run(args):
    """Everything but the error handling; returns the written paths."""
    from pathlib import Path

    from SpineNetLib.outputs import documents
    from SpineNetLib.apps import worker
    from SpineNetLib.core.errors import InputError
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.core.progress import StderrProgress, no_progress

    start = time.perf_counter()
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} exists and is not a folder")
    options = {"weights": args.weights, "device": args.device, "grading": args.grading,
               "hotspot_head": args.hotspot_head, "output": str(output.resolve())}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option must be KEY=VALUE, got {item!r}")
        options[key] = value
    pipeline = worker.load_pipeline(args.pipeline)
    scan = load_scan(args.input, series_uid=args.series)
    output.mkdir(parents=True, exist_ok=True)
    progress = no_progress if args.quiet else StderrProgress()
    result = pipeline(scan, options, progress)
    for warning in result.get("warnings") or []:
        print(f"SpineNetBatch: warning: {warning}", file=sys.stderr)
    vertebrae, discs = documents.check_vertebrae_document(result["vertebrae"]), result.get("discs")
    hotspots = result.get("hotspots") or []
    written = documents.write_result_files(output, vertebrae, discs, hotspots)

    if not args.no_scene:
        from SpineNetLib.slicer import mrml

        import slicer

        scene = slicer.mrmlScene if _inSlicerApplication() else mrml.new_scene()
        name = scan.metadata.get("series_description") or Path(str(args.input).rstrip("/\\")).name or "scan"
        volume = mrml.add_scan_volume(scene, scan, name)
        hotspot_paths = {documents.hotspot_node_name(h): output / h for h in hotspots}
        mrml.show_results(scene, volume, vertebrae, discs, folder=output.resolve(), hotspot_paths=hotspot_paths)
        written.append(mrml.write_mrb(scene, output / "scene.mrb"))

    names = [documents.vertebra_name(v, i) for i, v in enumerate(vertebrae["vertebrae"])]
    found = f"{names[0]}..{names[-1]}" if names else "none"
    print(f"{len(names)} vertebrae ({found}) in {time.perf_counter() - start:.1f} s; wrote "
          + ", ".join(str(p) for p in written))
    return written


def main(argv=None):
    args = build_parser().parse_args(argv)
    from SpineNetLib.core.errors import SpineNetError

    try:
        run(args)
    except SpineNetError as error:
        print("SpineNetBatch: error: " + " ".join(str(error).split()), file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        target = f" {error.filename}" if getattr(error, "filename", None) else ""
        print(f"SpineNetBatch: error: cannot access{target}: {' '.join(str(error.strerror or error).split())}",
              file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a bug: one line, unless --debug
        if args.debug:
            raise
        print(f"SpineNetBatch: internal error: {type(error).__name__}: {' '.join(str(error).split())} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if _inSlicerApplication():
        import slicer

        slicer.util.exit(code)
    else:
        sys.exit(code)
