"""The ``spinenet`` command.

``spinenet run INPUT -o OUTDIR`` detects and labels every vertebra of a
sagittal scan (a DICOM folder or file, NIfTI, NRRD, MHA/MHD), measures and
(with grading weights, unless ``--no-grade``) grades the discs, all through
:func:`SpineNetLib.pipeline.run`, and writes ``vertebrae.json``, ``vertebrae.csv``,
``discs.json``, ``discs.csv``, the hotspot maps asked for, ``preview.png`` (a
picture of the result; ``hotspots.png`` with hotspot maps; ``--no-preview``
skips them), with ``--dicom-out`` (DICOM input) ``segmentation.dcm`` and
``report.dcm`` (:mod:`SpineNetLib.outputs.dicom_results`), and the
``result.json`` manifest with :func:`SpineNetLib.outputs.files.write_results`.

``spinenet cohort INPUT_ROOT -o OUTDIR`` does the same for every study under
a folder, on Dask distributed (:mod:`SpineNetLib.cohort`), resumably, and
writes cohort tables; it exits with 4 when some studies failed.

Exit status: 0 success; 2 a problem with the input, an option or the
weights, reported as one line on stderr (never a traceback); 1 an internal
error (a bug: ``--debug`` shows the traceback); 130 interrupted; 141 the reader of the
standard output went away (``| head``), quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from SpineNetLib.core.errors import EXIT_OK, EXIT_USAGE, InputError, SpineNetError, exit_status, one_line
from SpineNetLib.core.process import exit_process, run_as_process, too_many_threads
from SpineNetLib.models.runtime_choice import AUTO, automatic_runtime

#: ``spinenet demo`` ran, but its result differs from the phantom's ground truth.
EXIT_DEMO_WRONG = 3

# The commands import what they need inside their functions, so that `spinenet --help` and
# errors in the arguments answer at once, without loading torch.


class _OneLineErrors(argparse.ArgumentParser):
    """A bad option is reported like every other problem: one stderr line, exit 2 (issue 12).

    The sub-command parsers are of this class too (``add_subparsers`` makes them of the parent's class).
    """

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``, shared by the commands that run the networks (:func:`_use_threads`)."""
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for the networks (default: PyTorch's choice, about the number of "
                             "cores); idle threads sleep soon instead of spinning (GOMP_SPINCOUNT=3000 unless you set "
                             "it or OMP_WAIT_POLICY), so runs side by side or beside other programs share the cores")


def _use_threads(args) -> None:
    """Apply ``--threads`` before any network runs: torch's intra- and inter-op pools, and (through the
    environment) the OpenMP/BLAS pools of libraries loaded later, which read their size once, at load.
    With ``--runtime onnx`` numpy's BLAS gets one thread: it then computes only the small products of the
    resampling (``core/resample.py``), and its idle threads spinning beside ONNX Runtime's made the
    bundled detector 1.7 times slower (chu_02: 1.01 s against 0.59 s; benchmarks/RESULTS.md)."""
    threads = getattr(args, "threads", None)
    onnx = _resolved_runtime(args) == "onnx"
    if onnx and "numpy" not in sys.modules:
        for variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = "1"
    if threads is None:
        return
    if threads < 1:
        raise SpineNetError(f"--threads must be at least 1, got {threads}")
    too_many = too_many_threads(threads, f"--threads {threads}")
    if too_many:
        raise SpineNetError(too_many)
    for variable in ("OMP_NUM_THREADS",) if onnx else ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if onnx and sys.modules.get("torch") is None:
        return   # ONNX Runtime takes them from load_networks; importing torch here is what it avoids
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only possible before the first parallel work of this process (e.g. a second run)
        pass


def _add_scan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="DICOM folder or file, a NIfTI/NRRD/MHA/MHD image, or a ZIP archive of either")
    parser.add_argument("--series", metavar="UID|NUMBER|TEXT",
                        help="the series to read when a DICOM folder holds several sagittal series (default: "
                             "the only one whose header says T2-weighted, with a warning): its "
                             "SeriesInstanceUID, its SeriesNumber, or a part of its SeriesDescription (any case) "
                             "that names one sagittal series, e.g. --series T1; a series of several contrasts "
                             "(Dixon water and fat, echoes) is read as stacks, each chosen as listed, "
                             "e.g. --series '1.2.3 [W]', or by its label, --series '[W]'")
    parser.add_argument("--pixel-spacing", nargs=2, type=float, metavar=("ROW", "COL"),
                        help="override the in-plane pixel spacing in mm (row spacing, column spacing)")
    parser.add_argument("--slice-spacing", type=float, metavar="MM", help="override the spacing between sagittal slices in mm")


def _runtime_for(args) -> str:
    """``--runtime`` as ``pipeline.load_networks`` takes it: "auto" becomes "torch" where the run makes
    hotspot maps (torch's gradients) or runs the official profile (its exact arithmetic)."""
    runtime = getattr(args, "runtime", "torch")
    if runtime == AUTO and (getattr(args, "hotspots", None) or getattr(args, "profile", None) == "official"):
        return "torch"
    return runtime


def _resolved_runtime(args) -> str:
    """Where the networks will run, as far as can be told without importing numpy or torch: "auto"
    resolved (``models/runtime_choice.py``; its rare fall-back to torch aside)."""
    runtime = _runtime_for(args)
    if runtime != AUTO:
        return runtime
    return automatic_runtime(getattr(args, "weights", None), getattr(args, "device", "auto"),
                             getattr(args, "precision", "fp32"))


def _add_network_options(parser: argparse.ArgumentParser, runtime_default: str = AUTO) -> None:
    parser.add_argument("--weights", default="bundled", metavar="bundled|official|DIR",
                        help="network weights: the bundled models (default), the official download, or a folder")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--trust-sha256", action="append", default=[], metavar="HEX",
                        help="allow full unpickling of the checkpoint with this SHA-256 (only for files you trust)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="network arithmetic: fp32 (default) or bf16 autocast (faster on CPUs with bfloat16 "
                             "support, about 8 times slower on CPUs without AVX-512; outputs within about "
                             "1 %% of their range, see benchmarks/RESULTS.md)")
    auto = runtime_default == AUTO
    parser.add_argument("--runtime", choices=["torch", "openvino", "onnx"] + ([AUTO] if auto else []),
                        default=runtime_default,
                        help=("where the networks run: " + (
                            "auto (default), ONNX Runtime for the bundled weights on the CPU in float32 without "
                            "hotspot maps or the official profile, torch otherwise; torch; " if auto else "torch (default); ")
                            + "openvino, the detector on OpenVINO (pip install openvino; faster for the "
                            "official-size detector, above all with --precision bf16); onnx, every network on ONNX "
                            "Runtime, never importing torch, which saves about a second of each run's start (no "
                            "hotspot maps). The first use of either per weights file converts the networks and keeps "
                            "them in the cache; see benchmarks/RESULTS.md"))


def _version() -> str:
    """The installed package's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spinenet-slicer")
    except PackageNotFoundError:
        from SpineNetLib import __version__

        return __version__


def _add_sequence_option(parser: argparse.ArgumentParser, whose: str = "the scan's") -> None:
    parser.add_argument("--sequence", metavar="T2|T1|PD|STIR|FLAIR|other",
                        help=f"{whose} weighting, where a header does not tell it (NIfTI, NRRD, MHA) or tells "
                             "it wrongly. Only T2-weighted scans are graded; without this option the weighting is "
                             "read from the DICOM header, else from the image (fluid darker than the vertebral "
                             "marrow: T1-weighted, not graded)")


def _check_sequence(args) -> str | None:
    """``--sequence`` checked before any scan is read (``discs.weighting.user_sequence``)."""
    from SpineNetLib.discs.weighting import user_sequence

    return user_sequence(getattr(args, "sequence", None))


def _add_run_command(sub) -> None:
    from SpineNetLib.core.levels import MAX_COMPARED_SERIES

    run = sub.add_parser("run", help="detect and label the vertebrae, measure and grade the discs, write JSON/CSV")
    _add_scan_options(run)
    run.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the result files")
    _add_network_options(run)
    run.add_argument("--no-grade", action="store_true",
                     help="do not grade the discs (disc measurements are still written)")
    _add_sequence_option(run)
    run.add_argument("--hotspots", metavar="HEAD[,HEAD]",
                     help="write evidence hotspot maps (NIfTI, input space) for these grading heads, "
                          "e.g. Herniation (needs grading weights; only heads the weights trained get a map)")
    run.add_argument("--hotspot-method", default="contrastive_excitation",
                     choices=["contrastive_excitation", "excitation", "guided", "gradient"],
                     help="how the hotspot maps are computed (default contrastive_excitation; see README, Evidence hotspots)")
    run.add_argument("--hotspot-augmentations", type=int, default=16, metavar="N",
                     help="test-time augmentations averaged per map (default 16; fewer is faster on a CPU)")
    run.add_argument("--hotspot-precision", choices=["auto", "fp32", "bf16"], default="auto",
                     help="arithmetic of the hotspot maps (default auto: bfloat16 where the CPU computes it "
                          "natively, about 2.2x faster, smoothed maps correlating 0.999 or more with float32 ones; grades "
                          "keep --precision)")
    run.add_argument("--profile", choices=["default", "official"], default=None,
                     help="how the stages around the networks work: this project's (default) or the official "
                          "code's (official; the default with --weights official); see docs/PROFILES.md")
    run.add_argument("--no-preview", action="store_true",
                     help="do not draw preview.png (the mid-sagittal slice with outlines, levels, grades and "
                          "warnings) nor hotspots.png")
    run.add_argument("--dicom-out", action="store_true",
                     help="also write segmentation.dcm (DICOM Segmentation of the vertebrae and discs) and "
                          "report.dcm (DICOM SR measurement report of the discs) for a PACS; DICOM input only")
    run.add_argument("--no-compare-series", action="store_true",
                     help=f"do not label the other sagittal series of the exam (up to {MAX_COMPARED_SERIES}, same "
                          "frame of reference, in the input folder) to check the levels against theirs; a series "
                          "that names a vertebra otherwise asks for a review (README, A second opinion from the "
                          "same exam)")
    run.add_argument("--compare-with", action="append", default=[], metavar="PATH",
                     help="another sagittal series of the same exam to check the levels against, in any input "
                          "format (a NIfTI study's T1 beside its T2), in the same patient coordinates as the "
                          f"input; repeat for more (up to {MAX_COMPARED_SERIES} series in all, these first)")
    _add_threads_option(run)
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    run.set_defaults(func=command_run)


def build_parser(with_training: bool = True) -> argparse.ArgumentParser:
    """The ``spinenet`` parser; ``with_training`` False leaves out ``spinenet train``, whose options
    import torch (:func:`main` does when the arguments do not ask for training or for help)."""
    parser = _OneLineErrors(prog="spinenet", description="SpineNetV2 vertebra detection, labelling and disc grading on sagittal spinal MRI.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("--version", action="version", version=f"spinenet {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run_command(sub)
    _add_cohort_command(sub)
    _add_correct_command(sub)

    demo = sub.add_parser("demo", help="write a synthetic spine as DICOM and run the bundled models on it")
    demo.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the phantom and the results")
    _add_network_options(demo)
    demo.add_argument("--fov", default="lumbar", choices=["lumbar", "cervical", "thoracic", "whole"],
                      help="field of view of the phantom (default lumbar)")
    demo.add_argument("--contrast", default="T2", choices=["T1", "T2", "STIR"],
                      help="MR contrast the phantom imitates (default T2)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the phantom's anatomy and noise (default 7)")
    _add_threads_option(demo)
    demo.add_argument("--quiet", action="store_true", help="no progress on stderr")
    demo.set_defaults(func=command_demo)

    evaluate = sub.add_parser("evaluate", help="detection/identification metrics of predictions against annotated cases")
    evaluate.add_argument("--data", required=True, metavar="DIR", help="annotated cases: a data root (DIR/<source>/<case>/ with image.nii.gz, labels.nii.gz, "
                               "case.json), one source folder (e.g. DIR/tianchi), a folder of one's own cases "
                               "(DIR/<case>/ with image/ or image.nii.gz and labels.seg.nrrd, labels.dcm, labels.mrk.json "
                               "or labels.nii.gz; README) or one case folder")
    evaluate.add_argument("--pred", required=True, metavar="DIR", help="predictions: PRED/<case_id>/vertebrae.json as written by `spinenet run`")
    evaluate.add_argument("--run", action="store_true",
                          help="first run `spinenet run` (no grading, no preview) on every case without a prediction "
                               "in --pred, writing it there")
    evaluate.add_argument("--weights", metavar="bundled|official|DIR", default=None,
                          help="with --run: the network weights (default bundled)")
    _add_threads_option(evaluate)
    evaluate.add_argument("--cases", nargs="*", metavar="CASE", help="only these case ids")
    evaluate.add_argument("-o", "--output", metavar="FILE", help="also write the metrics as JSON")
    evaluate.set_defaults(func=command_evaluate)

    weights = sub.add_parser("weights", help="manage network weights (the official download, offline installs)")
    wsub = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    download = wsub.add_parser("download", help="download the official SpineNetV2 weights (non-commercial licence)")
    download.add_argument("--official", action="store_true", required=True, help="the official VGG checkpoints")
    download.add_argument("--accept-license", action="store_true", help="accept the official non-commercial licence")
    download.add_argument("--base-url", help="download from this URL instead of the official server (a mirror)")
    download.add_argument("--force", action="store_true", help="download again even if files exist")
    download.set_defaults(func=command_weights_download)
    install = wsub.add_parser("install", help="install official checkpoints from a folder (offline copy)")
    install.add_argument("folder", help="folder with detect-vfr/, appearance/, context/, grading/")
    install.add_argument("--accept-license", action="store_true", help="accept the official non-commercial licence")
    install.set_defaults(func=command_weights_install)
    info = wsub.add_parser("info", help="show where weights are looked for and what is installed; with WEIGHTS, "
                                         "what each network file of that set records")
    info.add_argument("weights", nargs="?", metavar="WEIGHTS",
                      help="bundled, official or a folder: list its network files with their size, SHA-256 and "
                           "what their training recorded (steps, seed, calibrated numbers, the code that trained them)")
    info.set_defaults(func=command_weights_info)
    # The Slicer extension installs the inference packages only (SpineNet/CMakeLists.txt): there
    # `python -m SpineNetLib` still works, without the `spinenet train` command.
    import importlib.util

    if with_training and importlib.util.find_spec("SpineNetLib.training") is not None:
        from SpineNetLib.training.cli import register
        register(sub)
    return parser


def _validate_overrides(args) -> None:
    """``--pixel-spacing`` and ``--slice-spacing``, before the scan is read: positive, and within the range
    of spinal MRI (:func:`SpineNetLib.inputs.canonical.spacing_override`, which the readers apply too)."""
    from SpineNetLib.inputs.canonical import spacing_override

    spacing_override(args.pixel_spacing, 2, "pixel_spacing", label="--pixel-spacing")
    spacing_override(args.slice_spacing, 1, "slice_spacing", label="--slice-spacing")


def _output_folder(value: str, option: str = "-o/--output") -> str:
    """A command's output path, refused when empty (it would write into the current folder)."""
    if not value:
        raise SpineNetError(f"{option} needs a path: an empty one would write into the current folder")
    return value


def command_run(args) -> int:
    _output_folder(args.output)  # an empty path: at once
    _use_threads(args)  # before numpy and torch are loaded, when they are not yet
    from SpineNetLib import pipeline
    from SpineNetLib.core.progress import StderrProgress, no_progress
    from SpineNetLib.inputs.archive import unpacked
    from SpineNetLib.inputs.load import series_to_compare
    from SpineNetLib.outputs.documents import series_alike
    from SpineNetLib.outputs.files import check_writable, write_results
    from SpineNetLib.outputs.preview import pillow_missing

    start = time.perf_counter()
    _validate_overrides(args)
    hotspot_heads = _hotspot_heads(args)
    _check_sequence(args)
    output = check_writable(args.output)  # at once, not after the whole inference
    profile = pipeline.processing_profile(getattr(args, "profile", None), args.weights)
    # a ZIP archive stays unpacked until the results are written: DICOM results are made from its files
    with unpacked(args.input) as source:
        scan, _ = pipeline.read_input(source, profile, series_uid=args.series, pixel_spacing=args.pixel_spacing,
                                      slice_spacing=args.slice_spacing)
        # spinenet demo's own arguments lack both options
        other_series = series_to_compare(getattr(args, "compare_with", None), source, scan, args.input,
                                         compare=not getattr(args, "no_compare_series", False),
                                         resample_isotropic=profile.slab_average_thin_slices)
        dicom_out = getattr(args, "dicom_out", False)
        if dicom_out:
            from SpineNetLib.outputs.dicom_results import check_dicom_source

            check_dicom_source(scan)  # a NIfTI input is refused now, not after the inference
        load_seconds = time.perf_counter() - start
        networks = _networks_for(args)
        if hotspot_heads and networks.grading is None:
            raise SpineNetError("--hotspots needs grading weights, and this weight set has none "
                                "(use --weights official or a folder with grading.pt)")
        hotspots = {"hotspot_heads": hotspot_heads, "hotspot_method": args.hotspot_method,
                    "hotspot_augmentations": args.hotspot_augmentations,
                    "hotspot_precision": args.hotspot_precision} if hotspot_heads else {}
        options = pipeline.RunOptions(grade=not getattr(args, "no_grade", False),
                                      sequence=getattr(args, "sequence", None), **hotspots, profile=profile.name,
                                      other_series=other_series,
                                      earlier_timings_s={"load_scan": load_seconds,
                                                         "load_networks": networks.load_seconds})
        result = pipeline.run(scan, networks, options, progress=no_progress if args.quiet else StderrProgress())
        preview = not getattr(args, "no_preview", False)
        written = write_results(output, result, scan=scan, preview=preview, dicom=dicom_out)
    # after the files are written: a run that fails to write them ends in its one error line only
    for warning in result.warnings + ([pillow_missing()] if preview and pillow_missing() else []):
        print(f"spinenet: warning: {one_line(warning)}", file=sys.stderr)
    levels = [v["level"] or "?" for v in result.vertebrae_document["vertebrae"]]
    summary = f"{levels[0]}..{levels[-1]}" if levels else "none"
    grading = result.discs_document["grading"]
    graded = "graded" if grading["status"] == "done" else "not graded: " + grading["reason"]
    alike = series_alike(result.vertebrae_document.get("labelling") or {})   # those that disagree: warned above
    print(f"{len(levels)} vertebrae ({summary}), {len(result.discs_document['discs'])} discs ({graded}); "
          + (f"{alike}; " if alike else "") + f"wrote {', '.join(str(p) for p in written)}")
    return EXIT_OK


def _hotspot_heads(args) -> list[str]:
    """Check --hotspots before any heavy work, so a typo fails at once; the head names as given."""
    if not getattr(args, "hotspots", None):
        return []
    from SpineNetLib.discs.hotspots import parse_heads

    if getattr(args, "no_grade", False):
        raise SpineNetError("--hotspots needs the grading network; drop --no-grade")
    if args.hotspot_augmentations < 1:
        raise SpineNetError("--hotspot-augmentations must be at least 1")
    try:
        parse_heads(args.hotspots)
    except (KeyError, ValueError) as error:
        raise SpineNetError(f"--hotspots: {error}") from None
    return [head.strip() for head in args.hotspots.split(",") if head.strip()]


def _trusted_sha256(args) -> set[str] | None:
    """Checkpoints allowed full unpickling: --trust-sha256, plus the official download's own files."""
    from SpineNetLib.weights.official import trusted_hashes

    trusted = set(args.trust_sha256)
    if args.weights == "official":
        trusted |= trusted_hashes()
    return trusted or None


def _networks_for(args):
    from SpineNetLib import pipeline
    from SpineNetLib.core.progress import StderrProgress, no_progress

    return pipeline.load_networks(args.weights, args.device, trusted_sha256=_trusted_sha256(args),
                                  with_grading=not getattr(args, "no_grade", False),
                                  precision=getattr(args, "precision", "fp32"), runtime=_runtime_for(args),
                                  threads=getattr(args, "threads", None),
                                  progress=no_progress if getattr(args, "quiet", False) else StderrProgress())


def command_demo(args) -> int:
    _use_threads(args)
    from SpineNetLib.synthetic.phantom import make_phantom

    output = Path(_output_folder(args.output))
    if output.exists() and not output.is_dir():
        raise SpineNetError(f"output {output} exists and is not a folder")
    import json

    from SpineNetLib.evaluation.demo_check import check_against_phantom

    # include_s2: the first sacral segment is listed too (not required; official §5.5 names it S2)
    phantom = make_phantom(fov=args.fov, contrast=args.contrast, seed=args.seed, variability=1.0, include_s2=True)
    dicom = output / "phantom_dicom"
    phantom.write_dicom(dicom, series_description=f"SpineNet demo phantom {args.fov} {args.contrast}")
    phantom.write_nifti(output / "phantom.nii.gz")
    truth = ", ".join(v.level for v in phantom.vertebrae if not v.extra)
    print(f"wrote a synthetic {args.fov} {args.contrast} spine to {dicom} (ground truth: {truth})")
    run_args = argparse.Namespace(**{**vars(args), "input": str(dicom), "output": str(output / "results"),
                                     "series": None, "pixel_spacing": None, "slice_spacing": None})
    status = command_run(run_args)
    document = json.loads((output / "results" / "vertebrae.json").read_text(encoding="utf-8"))
    check = check_against_phantom(document, phantom)
    print("\nresult against the phantom's ground truth:\n" + check.table())
    print(check.verdict())
    note = check.review_note(document)
    if note:
        print(note)
    return status if check.all_right else EXIT_DEMO_WRONG


def _run_missing_predictions(todo: list, args) -> None:
    """``spinenet evaluate --run``: ``spinenet run`` (no grading, no preview) on every scored case without a
    prediction (``todo``: its id, scan and series, ``evaluate.scans_without_prediction``), in this process, before
    the scoring.  The first run that fails stops it with that run's error and the case's name (the
    predictions made so far stay: the next ``--run`` goes on from there)."""
    import contextlib
    import io

    options = ["--quiet", "--no-grade", "--no-preview", "--weights", args.weights or "bundled"]
    options += ["--threads", str(args.threads)] if args.threads is not None else []
    for n, (case_id, scan, series) in enumerate(todo, start=1):
        print(f"spinenet evaluate: spinenet run on {case_id} ({n} of {len(todo)})", file=sys.stderr, flush=True)
        errors = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            status = main(["run", str(scan), "-o", str(Path(args.pred) / case_id)] + options
                          + (["--series", series] if series is not None else []))
        lines = errors.getvalue().splitlines()
        if status != EXIT_OK:
            reason = next((line.split("error: ", 1)[1] for line in reversed(lines) if "error: " in line),
                          f"exit status {status}")
            raise SpineNetError(f"spinenet run failed on {case_id}: {reason}")
        for line in lines:   # the run's warnings (levels that may be shifted, S1 not found), as spinenet run gives them
            print(line, file=sys.stderr)


def command_evaluate(args) -> int:
    import json

    from SpineNetLib.evaluation.evaluate import evaluate_directories, scans_without_prediction
    from SpineNetLib.evaluation.tables import level_lines, review_lines, share_lines

    if args.output is not None and not args.output.strip():
        raise SpineNetError("-o/--output needs a file name (an empty one would write no metrics)")
    if args.run:
        _run_missing_predictions(scans_without_prediction(args.data, args.pred, args.cases or None), args)
    elif args.weights is not None or args.threads is not None:
        raise SpineNetError("--weights and --threads apply with --run only")
    summary = evaluate_directories(args.data, args.pred, case_ids=args.cases or None)
    def pct(x):
        return "   n/a" if x is None else f"{100 * x:6.1f}"
    print(f"{'case':<22} {'TP':>4} {'FP':>4} {'FN':>4} {'prec%':>6} {'rec%':>6} {'IDR%':>6} {'IDR±1%':>6} {'loc mm':>6} "
          "review")
    rows = list(summary["cases"].items())
    for name, m in rows + [("overall", summary["overall"])]:
        loc = m.get("localisation_error_mm_mean")
        review = {True: "flagged", False: "-"}.get(m.get("needs_review"), "")   # the run's own needs_review
        print(f"{name:<22} {m['tp']:>4} {m['fp']:>4} {m['fn']:>4} {pct(m['precision'])} {pct(m['recall'])} "
              f"{pct(m['identification_rate'])} {pct(m['identification_rate_within_1'])} "
              f"{'   n/a' if loc is None else f'{loc:6.2f}'} {review}".rstrip())
    print("\n" + "\n".join(share_lines(summary)))
    print("\n" + "\n".join(level_lines(summary)))
    print("\n" + "\n".join(review_lines(summary)))
    for warning in summary.get("warnings") or []:
        print(f"spinenet evaluate: warning: {warning}", file=sys.stderr)
    missing = summary.get("missing_predictions") or []
    if missing:   # a run that failed must not pass unseen: the figures above leave these cases out
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        print(f"spinenet evaluate: warning: {len(missing)} annotated case{'s have' if len(missing) > 1 else ' has'} "
              f"no prediction in {args.pred} and {'were' if len(missing) > 1 else 'was'} not scored: {shown}",
              file=sys.stderr)
    if args.output:
        from SpineNetLib.outputs.files import write_files_atomically

        target = Path(args.output)
        write_files_atomically(target.parent if str(target.parent) else Path("."),
                               {target.name: json.dumps(summary, indent=1) + "\n"})
    return EXIT_OK


def _require_licence(args) -> None:
    from SpineNetLib.weights.official import LICENCE_NOTICE

    print(LICENCE_NOTICE)
    if not args.accept_license:
        raise SpineNetError("the official weights need the licence accepted: run again with --accept-license")


def command_weights_download(args) -> int:
    from SpineNetLib.weights.official import download_official
    from SpineNetLib.core.progress import StderrProgress
    from SpineNetLib.weights.resolve import official_weights_dir

    _require_licence(args)
    manifest = download_official(base_url=args.base_url, force=args.force, progress=StderrProgress())
    for rel, entry in sorted(manifest.get("files", {}).items()):
        print(f"{rel}: {entry['size']} bytes, sha256 {entry['sha256']}")
    print(f"official weights in {official_weights_dir()}; use them with --weights official")
    return EXIT_OK


def command_weights_install(args) -> int:
    from SpineNetLib.weights.official import install_official
    from SpineNetLib.weights.resolve import official_weights_dir

    _require_licence(args)
    manifest = install_official(Path(args.folder))
    for rel, entry in sorted(manifest.get("files", {}).items()):
        print(f"{rel}: {entry['size']} bytes, sha256 {entry['sha256']}")
    print(f"official weights in {official_weights_dir()}; use them with --weights official")
    return EXIT_OK


def command_weights_info(args) -> int:
    from SpineNetLib.weights.official import read_manifest
    from SpineNetLib.weights.resolve import BUNDLED_DIR, official_weights_dir

    if args.weights is not None:
        return _weight_set_files(args.weights)
    bundled = sorted(p.name for p in BUNDLED_DIR.glob("*.pt")) if BUNDLED_DIR.is_dir() else []
    print(f"bundled: {BUNDLED_DIR} ({', '.join(bundled) or 'none'})")
    files = read_manifest().get("files", {})
    print(f"official: {official_weights_dir()} ({', '.join(sorted(files)) or 'not downloaded'})")
    return EXIT_OK


def _weight_set_files(spec: str) -> int:
    """``spinenet weights info WEIGHTS``: a line per network file of the weight set, with what it records."""
    from SpineNetLib.core.files import sha256_file
    from SpineNetLib.weights.resolve import LAYOUT, recorded_entries, resolve_weights, resolve_weights_file

    weight_set = resolve_weights(spec)
    print(f"{weight_set.source} weights{' (made for lumbar scans)' if weight_set.lumbar_only else ''}:")
    for kind in LAYOUT:
        if weight_set.path(kind) is None:
            continue
        path = resolve_weights_file(weight_set.path(kind))
        entries = recorded_entries(path) or {}
        recorded = ", ".join(f"{key} {_short(value)}" for key, value in sorted(entries.items())
                             if value == value)   # not the NaN "loss" the official layout keeps a place for
        print(f"  {kind}: {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {sha256_file(path)[:16]}): "
              f"{recorded or 'records nothing besides its weights'}")
    return EXIT_OK


def _short(value) -> str:
    """A recorded entry as ``weights info`` prints it: hashes and commits shortened to 12 characters."""
    text = str(value)
    return text[:12] if len(text) >= 40 and all(c in "0123456789abcdef" for c in text) else text


COHORT_DESCRIPTION = """\
Run every study under INPUT_ROOT, each once, on Dask distributed (a local cluster, or the workers
of --scheduler), with the networks loaded once per worker. A study is an image file
(.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) or a sagittal DICOM series (every sagittal series of an
exam is a study of its own, or with --t2-only its T2-weighted ones; axial, coronal and localiser
series are left out), also inside a ZIP
archive under INPUT_ROOT. Each study's
results go to OUTDIR/studies/<study id>/ (the files of `spinenet run`); OUTDIR gets
cohort_vertebrae.csv, cohort_discs.csv, cohort_failures.csv (study, input, reason) and
cohort_studies.csv (a row per finished study: its levels, whether they need review and why,
grading and sequence, other warnings, its preview), which `spinenet correct` corrections reach
on the next run.

Run it again to resume: finished studies are skipped, and studies that failed before are tried
again. A failed study never stops the others. Exit status: 0 every study finished; 4 some
studies failed (see cohort_failures.csv); 2 a problem with the root, an option, the weights or
the scheduler (one line on stderr); 130 interrupted (the studies finished so far are kept).
"""


def _add_correct_command(sub) -> None:
    correct = sub.add_parser(
        "correct", help="correct a vertebra's level in a results folder after review; the chain moves with it",
        description="Name the vertebra VERTEBRA of the results folder RESULTS (written by spinenet run, spinenet "
                    "cohort or the batch script) LEVEL, and move every other level with it, as the Slicer panel "
                    "corrects a level: e.g. `spinenet correct out L4 L5` when the run named every level one too "
                    "high. The JSON and CSV files are written again, and the pictures and DICOM results when the "
                    "folder has them (these need the scan: --input; for a study of spinenet cohort, the scan the "
                    "cohort read, and its rows in the cohort tables follow). Grades stay with their discs; the "
                    "labelling block records the correction and needs no review any more. Exit status 2 with one "
                    "line on stderr when nothing was changed.")
    correct.add_argument("results", metavar="RESULTS", help="the results folder (or its result.json)")
    correct.add_argument("vertebra", metavar="VERTEBRA",
                         help="the vertebra to correct: its level as the results name it (e.g. L4) or #N, the N-th "
                              "vertebra from the top")
    correct.add_argument("level", metavar="LEVEL", help="its level (C2..C7, T1..T12, L1..L5, S1 or S2)")
    correct.add_argument("--input", metavar="SCAN",
                         help="the scan the run read (DICOM folder or file, NIfTI, NRRD, MHA, a ZIP archive): needed when the "
                              "folder holds preview.png, hotspots.png or DICOM results, which are drawn again (a study "
                              "of spinenet cohort, OUTDIR/studies/<id>: by default the scan the cohort read)")
    correct.add_argument("--series", metavar="UID|NUMBER|TEXT",
                         help="the series the run read, when --input is a DICOM folder of several series "
                              "(default: the series vertebrae.json records, the one the run read)")
    correct.set_defaults(func=command_correct)


def command_correct(args) -> int:
    from SpineNetLib.cohort.discover import study_input
    from SpineNetLib.cohort.record import cohort_study_of, recorded_study, update_cohort_tables
    from SpineNetLib.inputs.archive import unpacked
    from SpineNetLib.outputs.correction import (corrected_documents, files_needing_the_scan, read_manifest_lists,
                                                read_scan_as_run, rewrite_results)
    from SpineNetLib.outputs.documents import read_result

    if args.series is not None and args.input is None:
        raise SpineNetError("--series names the series of --input; give --input too")
    vertebrae_doc, discs_doc, folder = read_result(args.results)
    corrected, corrected_discs = corrected_documents(vertebrae_doc, discs_doc, args.vertebra, args.level)
    cohort = cohort_study_of(folder)
    if args.input is not None:   # a ZIP archive stays unpacked until the DICOM results are made again
        source, series = unpacked(args.input), args.series
    elif cohort is not None and files_needing_the_scan(read_manifest_lists(folder)):
        try:   # the scan the cohort read the study from
            study = recorded_study(cohort)
        except InputError as error:
            raise InputError(f"{error}: give the scan the run read with --input") from None
        source, series = study_input(study), study.series_uid
    else:
        source, series = contextlib.nullcontext(), None
    with source as scan_path:
        scan = read_scan_as_run(vertebrae_doc, scan_path, series) if scan_path is not None else None
        written = rewrite_results(folder, corrected, corrected_discs, scan=scan)
    before = [v.get("level") for v in vertebrae_doc["vertebrae"]]
    after = [v.get("level") for v in corrected["vertebrae"]]
    unnamed = sum(1 for old, new in zip(before, after) if old and not new)
    if unnamed:
        print(f"spinenet: warning: the correction moved {unnamed} vertebra{'e' if unnamed > 1 else ''} beyond "
              f"{'S2' if after[-1] is None else 'C2'}: {'they have' if unnamed > 1 else 'it has'} no level now",
              file=sys.stderr)
    if cohort is not None:
        try:
            written += update_cohort_tables(cohort)
        except InputError as error:
            print(f"spinenet: warning: the cohort tables were not updated ({error}); the next run of the same "
                  "spinenet cohort command writes them again from the study folders", file=sys.stderr)
    span = lambda levels: f"{levels[0] or '?'}..{levels[-1] or '?'}" if levels else "none"  # noqa: E731
    print(f"corrected: {len(after)} vertebrae, {span(before)} -> {span(after)}; wrote "
          f"{', '.join(str(p) for p in written)}")
    return EXIT_OK


def _add_cohort_command(sub) -> None:
    cohort = sub.add_parser("cohort", help="run every study under a folder on a Dask cluster, resumably, "
                                           "with cohort CSV tables",
                            description=COHORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    cohort.add_argument("input_root", metavar="INPUT_ROOT",
                        help="folder searched for studies (DICOM folders, NIfTI/NRRD/MHA files, ZIP archives of "
                             "them), at any depth")
    cohort.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                        help="folder for the per-study result folders (OUTDIR/studies/) and the cohort tables; "
                             "with --scheduler, a path every worker can write to")
    cohort.add_argument("--workers", type=int, metavar="N",
                        help="worker processes of the local cluster, each holding its own copy of the networks "
                             "(default: CPU count / --threads-per-worker); not with --scheduler")
    cohort.add_argument("--threads-per-worker", type=int, default=1, metavar="T",
                        help="torch threads each worker uses for its study (default 1); a local worker runs "
                             "one study at a time")
    cohort.add_argument("--scheduler", metavar="ADDRESS",
                        help="use the workers of this running Dask scheduler (e.g. tcp://10.0.0.5:8786) "
                             "instead of a local cluster; see README, Cohorts")
    _add_network_options(cohort, runtime_default="torch")   # long-lived workers: torch's import is paid once
    cohort.add_argument("--profile", choices=["default", "official"], default=None,
                        help="processing profile, as for `spinenet run` (default: official with --weights "
                             "official, else default)")
    cohort.add_argument("--no-grade", action="store_true",
                        help="do not grade the discs (disc measurements are still written)")
    _add_sequence_option(cohort, whose="every study's")
    cohort.add_argument("--t2-only", action="store_true",
                        help="of each DICOM exam, run only the sagittal series whose header says T2-weighted (echo "
                             "and repetition times, else the description), the one the grader reads; an exam "
                             "without one is listed in cohort_failures.csv with the series it has; image files "
                             "run either way")
    cohort.add_argument("--no-preview", action="store_true", help="do not draw each study's preview.png")
    cohort.add_argument("--dicom-out", action="store_true",
                        help="also write each DICOM study's DICOM results, as `spinenet run --dicom-out` "
                             "(image-file studies get none)")
    cohort.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    cohort.set_defaults(func=command_cohort)


#: ``spinenet cohort`` ran, but some studies failed (they are listed in cohort_failures.csv).
EXIT_SOME_STUDIES_FAILED = 4


def command_cohort(args) -> int:
    from SpineNetLib.cohort.run import CohortSettings, run_cohort

    _output_folder(args.output)
    if args.scheduler and args.workers is not None:
        raise SpineNetError("--workers sets the size of a local cluster; with --scheduler the workers are the "
                            "scheduler's (start them with `dask worker ADDRESS --nworkers N`)")
    sequence = _check_sequence(args)
    settings = CohortSettings(weights=args.weights, device=args.device,
                              trusted_sha256=tuple(sorted(_trusted_sha256(args) or ())), grade=not args.no_grade,
                              preview=not args.no_preview, dicom=args.dicom_out, profile=args.profile,
                              threads=args.threads_per_worker, precision=args.precision, runtime=args.runtime,
                              sequence=sequence)
    result = run_cohort(args.input_root, args.output, settings, workers=args.workers, scheduler=args.scheduler,
                        progress=None if args.quiet else sys.stderr, only_t2=args.t2_only)
    failed = len(result.failures)
    exams = (f" and {result.failed_at_discovery} DICOM exam{'s' if result.failed_at_discovery > 1 else ''} "
             "without one" if result.failed_at_discovery else "")
    studies = f"{len(result.studies)} stud{'y' if len(result.studies) == 1 else 'ies'}"
    print(f"{studies}{exams}: {result.done} done now, {result.finished_before} done before, "
          f"{failed} failed; wrote {', '.join(str(p) for p in result.tables)}")
    _say_levels_taken(result.levels_taken)
    review = _studies_asking_for_review(result.tables)
    if review:
        print(f"{review} of the finished studies ask for a review of their levels "
              "(levels_need_review or exam_disagreement in cohort_studies.csv; cohort_review.html lists them "
              "first; spinenet correct mends a study's folder)")
    return EXIT_SOME_STUDIES_FAILED if failed else EXIT_OK


def _say_levels_taken(outcomes) -> None:
    """The studies that took the levels of a sure study of their exam (one line), and a warning for each that
    could not be written again with them."""
    taken = [o for o in outcomes if not o.failure]
    if taken:
        listed = ", ".join(f"{o.taking.study_id}: {o.levels}" for o in taken[:5])
        more = f" and {len(taken) - 5} more" if len(taken) > 5 else ""
        print(f"{len(taken)} stud{'y' if len(taken) == 1 else 'ies'} took the levels of a sure study of the same exam, "
              f"as spinenet run takes a sure series' ({listed}{more}); they still ask for a review, which says whose "
              "levels they are")
    for o in outcomes:
        if o.failure:
            print(f"spinenet: warning: study {o.taking.study_id} was not written again with the levels of study "
                  f"{o.taking.source} ({o.failure}); its exam_disagreement gives the spinenet correct that does",
                  file=sys.stderr)


def _studies_asking_for_review(tables) -> int:
    """How many rows of the written cohort_studies.csv ask for a review of their levels."""
    from SpineNetLib.cohort.review_page import asks_for_review
    from SpineNetLib.cohort.tables import COHORT_STUDIES_FILE, studies_table_rows

    path = next((Path(p) for p in tables if Path(p).name == COHORT_STUDIES_FILE), None)
    return sum(asks_for_review(row) for row in studies_table_rows(path.parent)) if path is not None else 0


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    # the training options import torch: only when asked for, so that --version, the help of the other
    # commands and errors in their arguments answer at once
    asks_for_training = any(w in ("train", "-h", "--help") for w in words) or not words
    args = build_parser(with_training=asks_for_training).parse_args(argv)
    return exit_status("spinenet", lambda: args.func(args), debug=args.debug)


def program() -> int:
    """The ``spinenet`` command as a process of its own (the console script, ``python -m SpineNetLib``):
    :func:`main` with the process settings of :func:`SpineNetLib.core.process.run_as_process` (the
    garbage collector, glibc's malloc), which :func:`main` alone, as Slicer or a notebook calls it in a
    long-lived process of its own, leaves as they are.
    """
    return run_as_process(main)


def command_line() -> NoReturn:
    """The console script ``spinenet`` and ``python -m SpineNetLib``: :func:`program`, then the process
    ends with its status without the interpreter's teardown (:func:`SpineNetLib.core.process.exit_process`)."""
    exit_process(program())


if __name__ == "__main__":
    command_line()
