"""Is the image upside down, or mirrored front to back?  The same bodies read on the image set right.

A header that gets an in-plane direction wrong (a hand-made NIfTI, a converter that lost the
orientation, a key image with none) hands the networks a spine with the head at the bottom, or with
the anterior side on the right.  The detector still finds most bodies (it trained with mirrored
patches), but the appearance and context networks never saw a spine that way: the labelling is
unsure (the review flag is set by its margin) and its warning speaks of a shift by one, which is not
the problem.  :func:`surer_reoriented` reads the same bodies on the image turned head up, then on the
image mirrored back; when one of those readings is as sure as the review threshold asks and the given
one is not, the scan asks for review with :func:`orientation_warning`, which says what to check.  The
levels stay those read as given: the reading set right rests on what the detector found on the wrong
image (another set of bodies on most scans, often without S1), so it is a sign, not an answer.
An image turned by 180 degrees (both wrong) is not looked for.  Bundled MODEL_CARD.md, "Review
flags", has the figures on the held-out and training-side scans given each way.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, NamedTuple, Sequence

import numpy as np

from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan


class OrientationError(NamedTuple):
    """One way a header can get an in-plane direction wrong, and what undoes it."""

    #: What the image seems, in the warning and ``vertebrae.json`` ("upside down", ...).
    seems: str
    #: What a reader sees, in the warning.
    looks: str
    #: How the reading sets the image right, in the warning.
    undone: str
    #: The header direction to check.
    direction: str
    #: Reverse the rows (head-foot) and / or the columns (front-back) to undo it.
    flip_rows: bool
    flip_cols: bool
    #: Corner order (rt, rb, lb, lt) after the flip: the corners keep their names.
    corners: tuple[int, int, int, int]


ORIENTATION_ERRORS = (
    OrientationError("upside down", "head at the bottom", "turned head up", "head-foot", True, False, (1, 0, 3, 2)),
    OrientationError("mirrored front to back", "anterior on the right", "mirrored back", "anterior-posterior",
                     False, True, (3, 2, 1, 0)),
)


def reoriented(scan: Scan, vertebrae: Sequence[Vertebra], error: OrientationError) -> tuple[Scan, list[Vertebra]]:
    """The scan with ``error`` undone (the voxels only: the labelling reads pixels and their spacing)
    and unlabelled copies of ``vertebrae`` in its pixels, corners in the usual order."""
    last_row, last_col = scan.voxels.shape[0] - 1, scan.voxels.shape[1] - 1
    voxels = scan.voxels[::-1] if error.flip_rows else scan.voxels
    voxels = voxels[:, ::-1] if error.flip_cols else voxels
    bodies = []
    for v in vertebrae:
        polygons = []
        for p in v.polygons:
            q = np.array(p, float)[list(error.corners)]
            if error.flip_rows:
                q[:, 1] = last_row - q[:, 1]
            if error.flip_cols:
                q[:, 0] = last_col - q[:, 0]
            polygons.append(q)
        bodies.append(Vertebra(slices=list(v.slices), polygons=polygons))
    return replace(scan, voxels=np.ascontiguousarray(voxels)), bodies


def surer_reoriented(scan: Scan, vertebrae: Sequence[Vertebra],
                     label: Callable[[Scan, list[Vertebra]], list[Vertebra]],
                     margin_of: Callable[[list[Vertebra]], float | None],
                     review_margin_nats: float) -> tuple[OrientationError, float] | None:
    """The first of :data:`ORIENTATION_ERRORS` whose undoing labels the bodies with a margin (nats) of
    ``review_margin_nats`` or more, with that margin; None when neither does.  ``label`` labels bodies
    on a scan as the pipeline does; ``margin_of`` scores labelled bodies as the review flag does."""
    if not vertebrae:
        return None
    for error in ORIENTATION_ERRORS:
        margin = margin_of(label(*reoriented(scan, vertebrae, error)))
        if margin is not None and math.isfinite(margin) and margin >= review_margin_nats:
            return error, margin
    return None


def orientation_warning(error: OrientationError, margin_as_given: float, margin_reoriented: float) -> str:
    """The review reason when the image reads surer with ``error`` undone."""
    return (f"the image may be {error.seems} ({error.looks}): {error.undone}, the same bodies are labelled "
            f"with a margin of {margin_reoriented:.1f} nats, as given only {margin_as_given:.1f}; check the "
            f"{error.direction} direction in the image header and run again (these levels are read as the "
            "image is given)")
