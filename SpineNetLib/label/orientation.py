"""Is the image upside down?  The same bodies read with the image turned head up.

A scan whose header gets the head-foot direction wrong (a hand-made NIfTI, a converter that lost the
orientation, a key image with none) reaches the networks with the head at the bottom.  The detector
still finds most bodies, but the appearance and context networks never saw a spine that way: the
labelling is unsure (the review flag is set by its margin) and its warning speaks of a shift by one,
which is not the problem.  :func:`surer_turned_head_up` reads the same bodies on the image turned
head up; when that reading is as sure as the review threshold asks and the given one is not, the
scan asks for review with :func:`upside_down_warning`, which says what to check.  The levels stay
those read as given: the reading turned head up rests on what the detector found upside down (it
misses S1 there on most scans), so it is a sign, not an answer.  Bundled MODEL_CARD.md, "Review
flags", has the figures on the held-out and training-side scans turned head down.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan

#: Corner order of a polygon (rt, rb, lb, lt) after the rows are reversed: top and bottom swap.
_CORNERS_AFTER_ROW_FLIP = (1, 0, 3, 2)


def turned_head_up(scan: Scan, vertebrae: Sequence[Vertebra]) -> tuple[Scan, list[Vertebra]]:
    """The scan with its rows reversed (the voxels only: the labelling reads pixels and their spacing)
    and unlabelled copies of ``vertebrae`` in those rows, corners in the usual order."""
    last_row = scan.voxels.shape[0] - 1
    flipped = replace(scan, voxels=np.ascontiguousarray(scan.voxels[::-1]))
    bodies = []
    for v in vertebrae:
        polygons = [np.array([[p[i][0], last_row - p[i][1]] for i in _CORNERS_AFTER_ROW_FLIP], float)
                    for p in v.polygons]
        bodies.append(Vertebra(slices=list(v.slices), polygons=polygons))
    return flipped, bodies


def surer_turned_head_up(scan: Scan, vertebrae: Sequence[Vertebra],
                         label: Callable[[Scan, list[Vertebra]], list[Vertebra]],
                         margin_of: Callable[[list[Vertebra]], float | None],
                         review_margin_nats: float) -> float | None:
    """The labelling margin (nats) of the bodies read on the image turned head up, when it reaches
    ``review_margin_nats`` (else None).  ``label`` labels bodies on a scan as the pipeline does;
    ``margin_of`` scores labelled bodies as the review flag does."""
    if not vertebrae:
        return None
    margin = margin_of(label(*turned_head_up(scan, vertebrae)))
    return margin if margin is not None and margin >= review_margin_nats else None


def upside_down_warning(margin_as_given: float, margin_turned: float) -> str:
    """The review reason when the image reads surer turned head up."""
    return (f"the image may be upside down (head at the bottom): turned head up, the same bodies are labelled "
            f"with a margin of {margin_turned:.1f} nats, as given only {margin_as_given:.1f}; check the "
            "head-foot orientation in the image header and run again (these levels are read as the image is given)")
