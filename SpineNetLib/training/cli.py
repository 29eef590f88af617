"""``spinenet train detector|appearance|context|grader``: train the small bundled networks (issues #3, #4).

Every run writes a resumable run folder (:mod:`SpineNetLib.training.common`); the final model
is ``RUNDIR/<kind>.pt`` (fp16, ``checkpoints.save_checkpoint``), ready to be
copied to ``SpineNetLib/weights/``.
"""

from __future__ import annotations

import argparse

from pathlib import Path

from SpineNetLib.core.errors import InputError
from SpineNetLib.detect.plans import DetectionParams
from SpineNetLib.training import augment
from SpineNetLib.training.common import (
    add_ema_argument, add_real_data_arguments, add_run_arguments, check_fraction, check_held_to_init,
    check_non_negative, check_run_arguments, output_file,
)
from SpineNetLib.training.datasets import default_data_root
from SpineNetLib.training.grader import add_grader_parser
from SpineNetLib.training.grader_threshold import add_grader_threshold_parser
from SpineNetLib.training.tianchi import S1_CONSTRUCTIONS


def _checked(args) -> None:
    """Refuse bad options of ``train detector|appearance|context`` before any work (one-line InputError)."""
    check_run_arguments(args)
    for option in ("phantom_fraction", "frame_share", "tianchi_fraction", "focus_share"):
        check_fraction("--" + option.replace("_", "-"), getattr(args, option, None))
    held = {"--distil": float(getattr(args, "distil", 0.0) or 0.0),
            "--robust-distil": float(getattr(args, "robust_distil", 0.0) or 0.0)}
    for name, weight in held.items():
        check_non_negative(name, weight)
    check_held_to_init(getattr(args, "init", None), held, bool(getattr(args, "frozen_batchnorm", False)))
    if min(held.values()) > 0:
        raise InputError("give --distil or --robust-distil, not both")
    if getattr(args, "leave_out_source", None) and getattr(args, "body_pool", None):
        raise InputError("--leave-out-source does not apply to a --body-pool: its bodies were chosen when it was "
                         "written")
    annotation_weight = float(getattr(args, "annotation_weight", 1.0))
    check_non_negative("--annotation-weight", annotation_weight)
    if getattr(args, "augment", None) is not None:
        check_non_negative("--augment", float(args.augment))
    if annotation_weight == 0.0 and max(held.values()) == 0.0:
        raise InputError("--annotation-weight 0 needs --distil or --robust-distil: else nothing is learnt")
    if getattr(args, "val_every", 0) < 0:
        raise InputError("--val-every must not be negative")
    if getattr(args, "ema", None) is not None:
        check_fraction("--ema", args.ema, below_one=True)
    edge_gap = getattr(args, "edge_gap", None)
    if edge_gap is not None and not 0.0 <= edge_gap <= 1.5:
        raise InputError(f"--edge-gap must be 0 to 1.5 body heights, got {edge_gap:g}")
    rotation = getattr(args, "max_rotation", None)
    if rotation is not None and not 0.0 <= rotation <= 90.0:
        raise InputError(f"--max-rotation must be 0 to 90 degrees, got {rotation:g}")
    penalty = getattr(args, "repeat_s1_penalty", None)
    if penalty is not None and not penalty >= 0.0:
        raise InputError(f"--repeat-s1-penalty must not be negative, got {penalty}")
    if getattr(args, "val_batches", 1) < 1:
        raise InputError("--val-batches must be at least 1")
    _refuse_missing_files(args)
    if getattr(args, "workers", 0) < 0:
        raise InputError("--workers must not be negative")
    if getattr(args, "workers", 0) > 0:
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            raise InputError("--workers needs processes started by fork (Linux); use --workers 0 here")
    if getattr(args, "body_pool", None):
        from SpineNetLib.training.labelling import check_body_pool

        check_body_pool(args.body_pool)
        clashing = [name for name in ("data", "tianchi_targets", "volume_s1_targets") if getattr(args, name, None)]
        if clashing:
            raise InputError(f"--body-pool holds the training bodies already: leave out "
                             f"--{clashing[0].replace('_', '-')}")
        return
    _data_root(args)


def _refuse_missing_files(args) -> None:
    """The file options a command has, named at once when missing, not after loading the data."""
    for option in ("tianchi_targets", "volume_s1_targets", "init"):
        path = getattr(args, option, None)   # --init may be a file or an official-layout folder
        if path and not (Path(path).expanduser().exists() if option == "init" else Path(path).expanduser().is_file()):
            raise InputError(f"--{option.replace('_', '-')}: no such file {path}")


def _data_root(args) -> None:
    """``--data`` left out: the default data root, refused when missing unless phantoms alone are asked for."""
    if hasattr(args, "data") and args.data is None:
        root = default_data_root()
        if root.is_dir():
            args.data = str(root)
        elif args.phantom_fraction < 1.0:
            raise InputError(f"no data folder at {root} (the default: $SPINENET_DATA or ../shared/data): "
                             "give --data DIR, or --phantom-fraction 1 to train on phantoms only")


def command_train_detector(args) -> int:
    from SpineNetLib.training.detector import train

    _checked(args)
    train(args)
    return 0


def command_train_appearance(args) -> int:
    from SpineNetLib.training.labelling import train_appearance

    _checked(args)
    train_appearance(args)
    return 0


def command_appearance_pool(args) -> int:
    from SpineNetLib.training.labelling import write_appearance_pool

    _refuse_missing_files(args)
    _data_root(args)
    output_file(args.out)
    write_appearance_pool(args)
    return 0


def command_train_context(args) -> int:
    from SpineNetLib.training.labelling import train_context

    _checked(args)
    train_context(args)
    return 0


def command_tianchi_targets(args) -> int:
    from SpineNetLib.training import datasets, tianchi

    try:   # DetectionParams checks the bound; the error names the option, before the output folder is made
        params = DetectionParams(stride_fraction=args.stride_fraction)
    except InputError:
        raise InputError(f"--stride-fraction must be in (0, 1], got {args.stride_fraction:g}") from None
    output_file(args.out)
    root = args.data or default_data_root()
    tianchi.make_pseudo_labels(datasets.list_cases(root, sources=datasets.POINT_SOURCES), args.detector, args.out,
                               s1_construction=args.s1_construction, params=params)
    return 0


def command_volume_s1_targets(args) -> int:
    from SpineNetLib.pipeline import load_networks
    from SpineNetLib.training import datasets
    from SpineNetLib.training.common import set_threads
    from SpineNetLib.training.volume_s1 import make_volume_s1_targets

    set_threads(args.threads)
    output_file(args.out)
    root = args.data or default_data_root()
    train, _ = datasets.default_split(datasets.list_cases(root, sources=datasets.DETECTION_SOURCES))
    make_volume_s1_targets(train, load_networks(args.weights, device="cpu"), args.out)
    return 0


def command_drop_last_block(args) -> int:
    from SpineNetLib.training.detector import shrink_detector

    print(f"wrote {shrink_detector(Path(args.detector), output_file(args.out))}")
    return 0


def command_calibrate_labelling(args) -> int:
    from SpineNetLib.training.calibrate_labelling import command

    return command(args)


def _add_appearance_pool_parser(sub) -> None:
    """``train appearance-pool``: an appearance run's real and clinical bodies in one file."""
    pool = sub.add_parser("appearance-pool", help="write the bodies an appearance run reads into one file "
                                                  "(`train appearance --body-pool`)")
    pool.add_argument("--data", default=None, metavar="DIR", help="data root (default: $SPINENET_DATA or ../shared/data)")
    pool.add_argument("--out", required=True, metavar="FILE", help=".npz file to write")
    pool.add_argument("--max-cases", type=int, default=0, help="use only the first N training cases (tests)")
    pool.add_argument("--volume-s1-targets", default=None, metavar="FILE",
                      help="checked S1 outlines of the training volumes (as `train appearance`)")
    pool.add_argument("--tianchi-targets", default=None, metavar="FILE",
                      help="pseudo-labelled tianchi/ outlines (as `train appearance`)")
    # no --phantom-fraction: the pool holds real bodies only (phantoms are made by the run from its seed),
    # and 0 tells the data-folder check and the data reading so
    pool.set_defaults(func=command_appearance_pool, phantom_fraction=0.0)


def _add_tianchi_targets_parser(sub) -> None:
    """``spinenet train tianchi-targets``."""
    tq = sub.add_parser("tianchi-targets", help="pseudo-label the tianchi/ slices with a detector (outlines for training)")
    tq.add_argument("--data", default=None, metavar="DIR", help="data root (default: $SPINENET_DATA or ../shared/data)")
    tq.add_argument("--detector", required=True, metavar="CHECKPOINT", help="detector checkpoint that makes the outlines")
    tq.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    tq.add_argument("--s1-construction", choices=S1_CONSTRUCTIONS, default="wedge",
                    help="S1 where no detector gave it: 'wedge' (default) or 'even', as the bundled detector "
                         "and grader were trained (training/tianchi.py, S1_CONSTRUCTIONS)")
    tq.add_argument("--stride-fraction", type=float, default=DetectionParams.stride_fraction, metavar="F",
                    help="the detection's patch stride as a fraction of the patch edge (default "
                         f"{DetectionParams.stride_fraction:g}, as spinenet run detects); the targets of the bundled "
                         "detector and appearance network were made at 0.6, the default before 2026-12-01 "
                         "(MODEL_CARD.md, \"Training\")")
    tq.set_defaults(func=command_tianchi_targets)


def _add_degradation_argument(parser: argparse.ArgumentParser) -> None:
    """``--degradation``: what ``--robust-distil`` changes in the student's inputs (``augment.DEGRADATIONS``)."""
    parser.add_argument("--degradation", choices=tuple(augment.DEGRADATIONS),
                        default=augment.DEFAULT_DEGRADATION,
                        help="what --robust-distil changes in the student's inputs: another centre's poorer "
                             "acquisition (default) or a random T1-like contrast made from the T2 one")


def _add_fine_tuning_arguments(det: argparse.ArgumentParser) -> None:
    """The detector's options for a fine-tune that holds it to its ``--init`` weights (``training/detector.py``)."""
    det.add_argument("--distil", type=float, default=0.0, metavar="W",
                     help="hold the detector's outputs to those of its --init weights with weight W, except "
                          "around a clinical slice's S1 and L5-S1 disc (default 0: not held)")
    det.add_argument("--robust-distil", type=float, default=0.0, metavar="W",
                     help="show the detector its patches degraded as another centre's poorer scan (coarser pixels, "
                          "gamma, falloff, noise) and hold its outputs, with weight W, to those of its --init "
                          "weights on the clean patches (default 0: not held)")
    _add_degradation_argument(det)
    det.add_argument("--annotation-weight", type=float, default=1.0, metavar="A",
                     help="weight of the loss against the annotated outlines (default 1; 0 with --robust-distil: "
                          "the detector learns only to see degraded patches as its --init weights see clean ones)")
    det.add_argument("--frozen-batchnorm", action="store_true",
                     help="keep the --init detector's BatchNorm statistics: normalise with them and do not update "
                          "them (fine-tuning only; default: they follow the training batches)")


def register(subparsers) -> None:
    """Add ``train`` with sub-commands ``detector``, ``appearance`` and ``context``."""
    train = subparsers.add_parser("train", help="train the small bundled networks (CPU or CUDA)")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="NETWORK")

    det = sub.add_parser("detector", help="train the VFR vertebra detector")
    add_run_arguments(det, steps=3000, batch=8, lr=2e-3)
    det.add_argument("--phantom-fraction", type=float, default=0.3, help="share of phantom patches (default 0.3)")
    det.add_argument("--n-phantoms", type=int, default=40, help="phantoms in the seeded pool (default 40)")
    det.add_argument("--config-blocks", type=int, nargs=4, default=[2, 2, 2, 2], metavar="N",
                     help="bottleneck blocks per ResNet stage (default 2 2 2 2)")
    det.add_argument("--base-width", type=int, default=8, help="detector base width (default 8)")
    det.add_argument("--val-every", type=int, default=0, help="validate on 3 cases every K steps (0: only at the end)")
    det.add_argument("--no-val", action="store_true", help="skip the final validation")
    det.add_argument("--calibrate-cases", type=int, default=6,
                     help="training cases for the heat-map gain calibration after training (0: none; default 6)")
    det.add_argument("--max-cases", type=int, default=0, help="use only the first N training cases (tests)")
    det.add_argument("--augment", type=float, default=1.0, help="augmentation strength, 0 = none (default 1)")
    add_real_data_arguments(det)
    det.add_argument("--focus-share", type=float, default=0.3,
                     help="share of a clinical slice's patches centred on its S1 (default 0.3)")
    det.add_argument("--frame-share", type=float, default=0.0,
                     help="share of batches of whole slices framed as the whole-slice detection plan frames "
                          "them (default 0: patches only)")
    det.add_argument("--max-rotation", type=float, default=20.0, metavar="DEG",
                     help="turn each training patch (and whole-slice frame) by up to DEG degrees either way "
                          "(default 20)")
    _add_fine_tuning_arguments(det)
    det.set_defaults(func=command_train_detector)

    app = sub.add_parser("appearance", help="train the appearance (level classification) network")
    add_run_arguments(app, steps=500, batch=8, lr=1e-3)
    app.add_argument("--phantom-fraction", type=float, default=0.5, help="share of phantom bodies (default 0.5)")
    app.add_argument("--n-phantoms", type=int, default=30, help="phantoms in the seeded pool (default 30)")
    app.add_argument("--max-cases", type=int, default=0, help="use only the first N training cases (tests)")
    app.add_argument("--augment", type=float, default=1.0, help="augmentation strength, 0 = none (default 1)")
    app.add_argument("--edge-gap", type=float, default=0.3, metavar="H",
                     help="a random cut of the field of view lies at least H body heights above or below the "
                          "body (default 0.3; 0: the image may end right at the body)")
    app.add_argument("--volume-s1-targets", default=None, metavar="FILE",
                     help="checked S1 outlines of the training volumes (`spinenet train volume-s1-targets`): "
                          "S1 samples from real volumes, which have no S1 outlined")
    add_real_data_arguments(app)
    app.add_argument("--body-pool", default=None, metavar="FILE",
                     help="read the training bodies from FILE (`spinenet train appearance-pool`) instead of "
                          "--data: for a machine without the data folder")
    app.add_argument("--workers", type=int, default=0, metavar="N",
                     help="make the batches in N worker processes, each step's batch seeded by (seed, step) "
                          "(default 0: one process, one random stream, as the bundled network was trained)")
    add_ema_argument(app)
    app.add_argument("--robust-distil", type=float, default=0.0, metavar="W",
                     help="show the network each body's volume degraded as another centre's poorer scan (coarser "
                          "pixels, gamma, falloff, noise) and hold its level probabilities, with weight W, to those "
                          "of its --init weights on the clean volume (needs --init; default 0: not held)")
    _add_degradation_argument(app)
    app.set_defaults(func=command_train_appearance)

    _add_appearance_pool_parser(sub)

    ctx = sub.add_parser("context", help="train the context network on synthetic label images")
    add_run_arguments(ctx, steps=1000, batch=16, lr=2e-3, data=False)
    ctx.add_argument("--val-batches", type=int, default=4,
                     help="batches of 8 synthetic label images for the final check (default 4)")
    ctx.add_argument("--repeat-s1-penalty", type=float, default=None, metavar="P",
                     help="beam-search penalty for a second S1 to store with the weights "
                          "(default: none stored, the official 100 applies)")
    ctx.set_defaults(func=command_train_context)
    add_grader_parser(sub)
    add_grader_threshold_parser(sub)

    _add_tianchi_targets_parser(sub)

    vs1 = sub.add_parser("volume-s1-targets", help="checked S1 outlines of the training volumes, from a weight "
                                                   "set's own detection and labelling (appearance training)")
    vs1.add_argument("--data", default=None, metavar="DIR", help="data root (default: $SPINENET_DATA or ../shared/data)")
    vs1.add_argument("--weights", default="bundled", metavar="DIR", help="weight set that finds and names S1 "
                                                                       "(default: bundled)")
    vs1.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    vs1.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    vs1.set_defaults(func=command_volume_s1_targets)

    drop = sub.add_parser("drop-last-block", help="a detector checkpoint without the last block of its deepest "
                                                  "stage (how the bundled S1-outline detector fits the 15 MB)")
    drop.add_argument("--detector", required=True, metavar="CHECKPOINT", help="detector checkpoint to shrink")
    drop.add_argument("--out", required=True, metavar="FILE", help="checkpoint to write (fp16)")
    drop.set_defaults(func=command_drop_last_block)

    cal = sub.add_parser("calibrate-labelling",
                         help="choose appearance weight, repeat-S1 penalty and review threshold of a weight set "
                              "on the calibration studies; writes a context checkpoint carrying them")
    cal.add_argument("--data", default=None, metavar="DIR", help="data root (default: $SPINENET_DATA or ../shared/data)")
    cal.add_argument("--weights", required=True, metavar="DIR", help="weights folder (detector, appearance, context)")
    cal.add_argument("--out", required=True, metavar="FILE", help="context checkpoint to write (FILE.json: the choice)")
    cal.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    cal.set_defaults(func=command_calibrate_labelling)
