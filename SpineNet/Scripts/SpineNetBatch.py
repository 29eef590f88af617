"""SpineNet batch mode: one scan in, result files and a Slicer scene out.

Inside 3D Slicer (no window)::

    Slicer --no-splash --no-main-window --python-script SpineNet/Scripts/SpineNetBatch.py \
        --input DICOM_DIR_OR_FILE --output DIR

or with any Python that has SpineNetLib's requirements and ``slicer-core``::

    python SpineNet/Scripts/SpineNetBatch.py --input DICOM_DIR_OR_FILE --output DIR

Both read the scan with :func:`SpineNetLib.inputs.load.load_scan` (DICOM folder or
file, NIfTI, NRRD, MHA, or a ZIP archive of one of them: identical behaviour in and outside Slicer), and of a
DICOM exam the other sagittal series of the same frame of reference, whose levels the run compares with the
scan's as ``spinenet run`` does (:func:`SpineNetLib.inputs.load.series_to_compare`; ``--compare-with`` names
more, in any format; ``--no-compare-series`` skips them), and run it through the worker's entry point,
``SpineNetLib.apps.worker.run_request``, in this process, the same entry point as the Slicer module's worker,
so the same files are written into DIR: ``vertebrae.json``, ``vertebrae.csv``, ``discs.csv`` (and
``discs.json`` when the discs were measured or graded), the hotspot maps
(only with ``--hotspot-head``), ``preview.png`` (a picture of the result;
``hotspots.png`` with hotspot maps; ``--no-preview`` skips them) and
``result.json``.  Then the script adds ``scene.mrb`` (the scan with the
outlines, centroids, segmentation and grades table, for Slicer's File > Add
Data) and prints a summary and how sure the level labelling is (a line
starting "CHECK THE LEVELS:" when the levels may be shifted by one).  A
problem with the input, an option or the weights prints one line on stderr
and exits with status 2; an internal error exits with 1.

This file is installed under ``<module folder>/Scripts/`` (not next to
``SpineNet.py``): Slicer loads every ``.py`` file of a module folder as a module.
"""

import argparse
import json
import os
import sys
import tempfile
import time

EXIT_OK, EXIT_USAGE = 0, 2  # internal errors: exit 1, from the shared exit_status


def _libraryParent():
    """Folder holding SpineNetLib: two levels up once installed (<modules>/Scripts/ -> <modules>/),
    the repository root (SpineNet/Scripts/ -> SpineNet/ -> root) from source."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here)))
    for candidate in candidates:
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
    parser.add_argument("--input", required=True, help="DICOM folder or file, a NIfTI/NRRD/MHA image, or a ZIP archive of either")
    parser.add_argument("--output", required=True, help="folder for the result files and scene.mrb")
    parser.add_argument("--series", metavar="UID|NUMBER|TEXT",
                        help="the series when a DICOM folder holds several sagittal series (default: the only one "
                             "whose header says T2-weighted): its SeriesInstanceUID, its SeriesNumber or a part of "
                             "its SeriesDescription (e.g. T1)")
    parser.add_argument("--weights", default="bundled", help="bundled (default), official or a folder")
    parser.add_argument("--profile", choices=["default", "official"], default=None,
                        help="processing profile (default: official with --weights official, else default; "
                             "docs/PROFILES.md)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="network arithmetic: fp32 (default) or bf16 autocast (faster on CPUs with bfloat16)")
    parser.add_argument("--runtime", choices=["torch", "openvino"], default="torch",
                        help="where the detector runs: torch (default) or OpenVINO on the CPU (pip install openvino)")
    parser.add_argument("--grading", action=argparse.BooleanOptionalAction, default=True, help="grade the discs")
    parser.add_argument("--sequence", metavar="T2|T1|PD|STIR|FLAIR|other",
                        help="the scan's weighting where the header does not tell it or tells it wrongly "
                             "(only T2-weighted scans are graded; as spinenet run --sequence)")
    parser.add_argument("--hotspot-head", default=None,
                        help="grading head whose hotspot maps are written, e.g. Pfirrmann (default: none; "
                             "they take minutes on a CPU)")
    parser.add_argument("--no-compare-series", action="store_true",
                        help="do not label the other sagittal series of the exam in the DICOM folder (up to 3, same "
                             "frame of reference) to check the levels against theirs (as spinenet run)")
    parser.add_argument("--compare-with", action="append", default=[], metavar="PATH",
                        help="another sagittal series of the same exam to check the levels against, in any input "
                             "format, in the same patient coordinates (as spinenet run); repeat for more")
    parser.add_argument("--no-scene", action="store_true", help="write only the CSV/JSON files, no scene.mrb")
    parser.add_argument("--no-preview", action="store_true", help="do not draw preview.png (nor hotspots.png)")
    parser.add_argument("--pipeline", help="MODULE:FUNCTION or FILE.py:FUNCTION replacing the default pipeline "
                                           "(see SpineNetLib.apps.worker)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="extra option for the pipeline")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return parser


def _inSlicerApplication():
    slicer = sys.modules.get("slicer")
    return slicer is not None and getattr(slicer, "app", None) is not None and getattr(slicer, "mrmlScene", None) is not None


def input_arrays(scan):
    """``(voxels [k, j, i], IJK-to-RAS)`` to hand the worker for ``scan``: the same scan again.

    The canonical array is the input's own array permuted and flipped, so
    the input grid is restored and the worker's documents describe the input
    exactly as ``spinenet run`` does (its shape, IJK-to-RAS, slice numbers).
    When slices were averaged (a near-isotropic 3D scan) that cannot be undone:
    the canonical grid is handed over instead, as the scene shows it.
    """
    import numpy as np

    linear = np.asarray(scan.canonical_to_input_ijk, float)[:3, :3]
    perm = [int(np.argmax(np.abs(linear[:, c]))) for c in range(3)]  # input axis of each canonical axis
    signed_permutation = (sorted(perm) == [0, 1, 2] and np.array_equal(np.abs(linear), np.abs(np.round(linear)))
                          and np.count_nonzero(linear) == 3)
    if signed_permutation:
        voxels = scan.voxels
        for c in range(3):
            if linear[perm[c], c] < 0:
                voxels = np.flip(voxels, axis=c)
        canonical_of = {perm[c]: c for c in range(3)}
        voxels = np.transpose(voxels, (canonical_of[2], canonical_of[1], canonical_of[0]))
        if voxels.shape == tuple(reversed(scan.input_shape_ijk)):
            return np.ascontiguousarray(voxels), np.asarray(scan.input_ijk_to_ras, float)
    # The canonical array [row, col, slice] as [k, j, i] (as SpineNetLib.slicer.mrml.add_scan_volume shows it).
    to_ras = np.asarray(scan.canonical_to_ras, float)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = to_ras[:3, 2], to_ras[:3, 1], to_ras[:3, 0], to_ras[:3, 3]
    return scan.voxels, affine


class _Reporter:
    """A text stream for ``worker.LineProtocol``: progress on stderr, warnings as one line each."""

    def __init__(self, quiet):
        from SpineNetLib.core.progress import StderrProgress, no_progress

        self._progress = no_progress if quiet else StderrProgress()
        self._buffer = ""

    def write(self, text):
        from SpineNetLib.apps import worker

        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            message = worker.parse_line(line)
            if message.kind == "PROGRESS":
                self._progress(message.done, message.total, message.text)
            elif message.kind == "WARNING":
                print(f"SpineNetBatch: warning: {message.text}", file=sys.stderr)
            elif line.strip():
                print(line, file=sys.stderr)
        return len(text)

    def flush(self):
        pass


def run(args):
    """Everything but the error handling; returns the written paths."""
    from pathlib import Path

    from SpineNetLib.apps import worker
    from SpineNetLib.core.errors import InputError
    from SpineNetLib.inputs.archive import unpacked
    from SpineNetLib.inputs.load import load_scan, series_to_compare
    from SpineNetLib.outputs import documents
    from SpineNetLib.outputs.files import check_writable, earlier_manifest

    start = time.perf_counter()
    if not str(args.output).strip():
        raise InputError("--output needs a folder: an empty one would write into the current folder")
    output = check_writable(args.output)  # at once, not after the inference
    # an earlier run's scene in the folder is removed when this run writes none (the manifest, which
    # write_results keeps clean of an earlier run's files, does not list the scene)
    earlier_scene = output / "scene.mrb" if earlier_manifest(output) is not None else None
    for item in args.option:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option must be KEY=VALUE, got {item!r}")
    worker.load_pipeline(args.pipeline)  # a wrong --pipeline fails before the scan is read
    from SpineNetLib.discs.weighting import user_sequence

    user_sequence(args.sequence)   # and a wrong --sequence
    from SpineNetLib.pipeline import processing_profile

    profile = processing_profile(args.profile, args.weights)
    # The scan as the user has it (every native slice): the worker averages thin slices into slabs
    # itself when the profile says so, and its documents and the scene refer to this grid (issue 14).
    with unpacked(args.input) as source:   # a ZIP archive: its files are needed only while it is read
        scan = load_scan(source, series_uid=args.series, resample_isotropic=False)
        # the exam's other sagittal series, a second opinion on the levels (as spinenet run reads them)
        others = series_to_compare(args.compare_with, source, scan, args.input, compare=not args.no_compare_series,
                                   resample_isotropic=False)

    # The worker's entry point, in this process, on the scan just read (with its --series).
    with tempfile.TemporaryDirectory(prefix="SpineNetBatch-") as folder:
        def written(one, name):
            metadata = json.loads(json.dumps(one.metadata, default=str))  # plain JSON for the geometry file
            metadata.setdefault("path", str(args.input))
            return worker.write_volume(Path(folder) / "input", *input_arrays(one), metadata, name=name)

        npy, geometry = written(scan, "volume")
        other_series = [written(other, f"other_series_{n}") for n, other in enumerate(others)]
        arguments = worker.worker_arguments(npy, output, geometry=geometry, weights=args.weights, device=args.device,
                                            grading=args.grading, hotspot_head=args.hotspot_head,
                                            pipeline=args.pipeline, profile=profile.name,
                                            preview=not args.no_preview, precision=args.precision,
                                            runtime=args.runtime, sequence=args.sequence,
                                            other_series=other_series)
        for item in args.option:
            arguments += ["--option", item]
        manifest = worker.run_request(worker.build_parser().parse_args(arguments), worker.LineProtocol(_Reporter(args.quiet)))

    vertebrae, discs, folder = documents.read_result(manifest)
    listed = json.loads(Path(manifest).read_text(encoding="utf-8"))
    hotspots = listed.get("hotspots") or []
    names = ["vertebrae.json", "vertebrae.csv", "discs.json", "discs.csv", *hotspots, *(listed.get("images") or [])]
    written = [folder / name for name in names if (folder / name).is_file()] + [Path(manifest)]

    if not args.no_scene:
        from SpineNetLib.slicer import mrml

        import slicer

        scene = slicer.mrmlScene if _inSlicerApplication() else mrml.new_scene()
        name = scan.metadata.get("series_description") or Path(str(args.input).rstrip("/\\")).name or "scan"
        volume = mrml.add_scan_volume(scene, scan, name)
        hotspot_paths = {documents.hotspot_node_name(h): folder / h for h in hotspots}
        mrml.show_results(scene, volume, vertebrae, discs, folder=folder.resolve(), hotspot_paths=hotspot_paths)
        written.append(mrml.write_mrb(scene, output / "scene.mrb"))
    elif earlier_scene is not None:
        earlier_scene.unlink(missing_ok=True)

    found = [documents.vertebra_name(v, i) for i, v in enumerate(vertebrae["vertebrae"])]
    levels = f"{found[0]}..{found[-1]}" if found else "none"
    print(f"{len(found)} vertebrae ({levels}) in {time.perf_counter() - start:.1f} s; wrote "
          + ", ".join(str(p) for p in written))
    status, review = documents.labelling_status(vertebrae)
    if status:  # how sure the levels are; "CHECK THE LEVELS" when they may be shifted
        print(("CHECK THE LEVELS: " if review else "") + status)
    return written


def main(argv=None):
    args = build_parser().parse_args(argv)
    from SpineNetLib.core.errors import exit_status  # the spinenet command's one-line error handling

    def action():
        run(args)
        return EXIT_OK

    return exit_status("SpineNetBatch", action, debug=args.debug,
                       internal_hint="run with --debug for the traceback")


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if _inSlicerApplication():
        import slicer

        slicer.util.exit(code)
    else:
        sys.exit(code)
