"""Which MR weighting a scan has, so that only T2-weighted scans are graded.

SpineNet's grading networks were trained on T2-weighted sagittal lumbar scans (official §6,
"The grading model was trained on T12/L1...L5/S1 T2 lumbar scans"), and so was the bundled grader
(clinical T2 slices, bundled MODEL_CARD.md).  On a T1-weighted scan they still give a grade for every
disc, with nothing to say that it means nothing: the bundled grader called 6 of the 8 discs of the
held-out T1 volume ``zukic_02_AKa3_T1`` herniated, with 66-89 % (2026-12-05).  So the discs of a scan
that is not T2-weighted are cut and measured but not graded, and the run says why
(``pipeline.grade_discs``).

Three sources, the first that answers wins:

1. **The user** (``spinenet run --sequence``, ``RunOptions.sequence``): for an image whose header does
   not say, or says wrongly.
2. **The DICOM header** (:func:`SpineNetLib.core.mr_weighting.weighting_from_header`, which the DICOM
   reader shares to find an exam's sagittal T2 series): echo, repetition and inversion times, the
   textbook spin-echo windows (T1: short TR and TE; proton density: long TR, short TE; T2: long TR and
   TE; short-tau inversion recovery: an inversion time under 300 ms).  Where the times do not settle
   it (gradient echo, a time missing), the series description's own words (``t1``, ``t2``, ``stir``,
   ``tirm``, ``pd``, ``flair``) when they name one weighting.
3. **The image** (:func:`weighting_from_image`), for NIfTI, NRRD or MHA files, which carry no such
   header: the cerebrospinal fluid just behind the vertebral bodies (L2-L5, below the cord, where
   there are three of them) is brighter than the bodies' marrow on T2-weighted (and on fat-suppressed
   fluid-sensitive) scans, darker on T1-weighted ones.
   The image can only tell "T1-weighted" from "fluid bright" this way; a fluid-bright scan is graded,
   as before, since T2 is by far the most common such sagittal series.

Pure functions over a header dictionary, a :class:`Scan` and its labelled vertebrae.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.mr_weighting import Weighting, weighting_from_header
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.discs.extraction import body_mid_polygon, pixel_scale
from SpineNetLib.discs.measurements import polygon_samples

#: What ``spinenet run --sequence`` accepts (the user names the weighting; "other": none of these).
USER_SEQUENCES = ("T2", "T1", "PD", "STIR", "FLAIR", "other")

#: Below this ratio of the fluid behind the bodies to their marrow (medians) the image reads as
#: T1-weighted (:func:`weighting_from_image`).  ``python benchmarks/sequence_check.py`` measures the
#: ratio on every real scan of ../shared/data (bundled MODEL_CARD.md, "Scans that are not T2").
T1_MAX_FLUID_TO_MARROW = 0.8
#: The strip behind each body's posterior wall that holds the thecal sac, in millimetres from the wall.
CANAL_FROM_MM = 3.0
CANAL_TO_MM = 9.0
#: At least this many bodies must be measured for the image to say anything.
MIN_BODIES = 3
#: The levels read first: below the conus medullaris, which ends at L1-L2 in most adults, the thecal sac
#: behind the bodies holds cerebrospinal fluid and nerve roots; higher up the cord fills much of it, and
#: the cord is far less bright than fluid on T2.  (Chosen after the first measurement, which used every
#: body above S1 and gave a T2 clinical slice 0.86: 0.95 with these levels; MODEL_CARD.md.)
BELOW_THE_CONUS = ("L2", "L3", "L4", "L5")


def not_graded_reason(weighting: Weighting) -> str:
    """Why a scan's discs were not graded (the grading status' reason; :func:`not_graded_warning` is the
    run's warning)."""
    return (f"the grader reads T2-weighted scans, and this one is {weighting.description()}; "
            "if it is T2-weighted, say so (--sequence T2; in Slicer, Sequence T2)")


def not_graded_warning(reason: str) -> str:
    """The run's warning for discs not graded for ``reason`` (:func:`not_graded_reason`, as the grading
    status records it)."""
    return f"discs not graded: {reason}"


def user_weighting(sequence: str) -> Weighting:
    """The weighting the user named (one of :data:`USER_SEQUENCES`, any case)."""
    names = {s.lower(): s for s in USER_SEQUENCES}
    key = str(sequence).strip().lower()
    if key not in names:
        raise InputError(f"unknown --sequence {sequence!r}: use one of {', '.join(USER_SEQUENCES)}")
    return Weighting(names[key], "user")


def user_sequence(sequence: str | None) -> str | None:
    """A ``--sequence`` as :data:`USER_SEQUENCES` spells it (``t2`` is ``T2``), checked before any work so
    that a typo fails at once (:class:`InputError`); None when not given."""
    return None if sequence is None else user_weighting(sequence).name


def _inside(polygon: np.ndarray, shrink: float) -> np.ndarray:
    """``polygon`` shrunk towards its centroid by ``shrink`` (0: a point, 1: itself)."""
    centre = polygon.mean(axis=0)
    return centre + (polygon - centre) * shrink


def fluid_to_marrow_ratios(scan: Scan, vertebrae: Sequence[Vertebra]) -> list[float]:
    """Per body (S1 and below left out), on its mid slice: the median intensity of the strip
    :data:`CANAL_FROM_MM`-:data:`CANAL_TO_MM` behind its posterior wall (the thecal sac), over the
    middle 60 % of the wall's height, divided by the median of its inner half (marrow)."""
    ratios = []
    height, width, _ = scan.voxels.shape
    scale = pixel_scale(scan)   # (col_mm, row_mm)
    for body in vertebrae:
        if body.level in ("S1", "S2"):
            continue
        polygon = body_mid_polygon(body)
        marrow = polygon_samples(scan, _inside(polygon, 0.5), body.mid_slice)
        # the posterior wall rt -> rb (corners 0 and 1); "behind" is its normal pointing away from the body
        top, bottom = polygon[0], polygon[1]
        wall_mm = (bottom - top) * scale
        normal_mm = np.array([-wall_mm[1], wall_mm[0]]) / max(float(np.hypot(*wall_mm)), 1e-6)
        if np.dot(normal_mm, (top - polygon[3]) * scale) < 0:   # towards the back, away from lt
            normal_mm = -normal_mm
        along = np.linspace(0.2, 0.8, 13)
        depth = np.arange(CANAL_FROM_MM, CANAL_TO_MM + 1e-6, min(*scale, 1.0))
        wall_points = top[None, :] + along[:, None] * (bottom - top)[None, :]
        offsets_px = depth[:, None] * (normal_mm / scale)[None, :]
        strip = (wall_points[:, None, :] + offsets_px[None, :, :]).reshape(-1, 2)
        cols, rows = np.rint(strip[:, 0]).astype(int), np.rint(strip[:, 1]).astype(int)
        keep = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
        if len(marrow) < 4 or keep.sum() < 4:
            continue
        marrow_level = float(np.median(marrow))
        if marrow_level <= 0:
            continue
        fluid = scan.voxels[rows[keep], cols[keep], body.mid_slice]
        ratios.append(float(np.median(fluid)) / marrow_level)
    return ratios


def fluid_to_marrow_ratio(scan: Scan, vertebrae: Sequence[Vertebra]) -> tuple[float | None, int]:
    """(the median of :func:`fluid_to_marrow_ratios` over the bodies named in :data:`BELOW_THE_CONUS`, or,
    with fewer than :data:`MIN_BODIES` of them measured, over every body above S1; the bodies it rests on).
    None with fewer than :data:`MIN_BODIES` bodies measured either way."""
    ratios = fluid_to_marrow_ratios(scan, [v for v in vertebrae if v.level in BELOW_THE_CONUS])
    if len(ratios) < MIN_BODIES:
        ratios = fluid_to_marrow_ratios(scan, vertebrae)
    return (float(np.median(ratios)) if len(ratios) >= MIN_BODIES else None), len(ratios)


def weighting_from_image(scan: Scan, vertebrae: Sequence[Vertebra]) -> Weighting:
    """"T1" when the fluid behind the bodies is darker than their marrow (:func:`fluid_to_marrow_ratio`
    below :data:`T1_MAX_FLUID_TO_MARROW`), "fluid bright" when not, and "unknown" with fewer than
    :data:`MIN_BODIES` bodies measured."""
    ratio, bodies = fluid_to_marrow_ratio(scan, vertebrae)
    if ratio is None:
        return Weighting("unknown", "none", f"{bodies} bodies measured")
    detail = f"the fluid behind the vertebral bodies is {ratio:.2f} times as bright as their marrow"
    return Weighting("T1" if ratio < T1_MAX_FLUID_TO_MARROW else "fluid bright", "image", detail)


def scan_weighting(scan: Scan, vertebrae: Sequence[Vertebra], sequence: str | None = None) -> Weighting:
    """The weighting of ``scan``: the user's ``sequence`` if given, else the DICOM header's, else the image's."""
    if sequence:
        return user_weighting(sequence)
    from_dicom = scan.metadata.get("format") == "DICOM" or scan.metadata.get("dicom_header")   # Slicer's database
    from_header = weighting_from_header(scan.metadata) if from_dicom else None
    return from_header if from_header is not None else weighting_from_image(scan, vertebrae)
