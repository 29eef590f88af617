"""A signal void on the spine's path, where the levels cannot be counted (issue 10).

Metal in the spine (pedicle screws, an interbody cage, a disc prosthesis) leaves a region with no signal
that can hide a whole body or two.  The chain the detector finds then ends at the void or runs across it
with bodies missing, and the bodies are named as if none were missing: with a void drawn over the L4-L5
disc and half of each body (``benchmarks/acquisition_variants.py``, row ``metal_l4_l5``), 27 of the 68
held-out scans came out with wrongly named bodies, 6 of them not flagged (MODEL_CARD.md, "Metal in the
spine").  No real scan here holds metal, so that row stands in for one.

``void_path.void_along_chain`` follows the path through the centres of the chain's bodies (each on its own mid
slice), on to ``void_path.BEYOND_ENDS_STEPS`` usual steps beyond the first and last bodies, and finds its longest
stretch whose local median is darker than ``void_path.VOID_SHARE_OF_MARROW`` of the marrow (the median of the
local medians at the bodies' centres).  A stretch of ``void_path.VOID_MIN_MM`` or more is a void that no disc,
endplate or collapsed body makes on the 201 real scans here, and the review rule asks about it
(:func:`ask_for_review_over_a_void`).  Where the void lies right above the body named S1, the bodies it hides
are counted from the way across it and the levels above it moved up (:func:`levels_counted_across_a_void`;
under the row, 50 of the 68 held-out scans then keep every level right, 41 before).  Where the labelling
counts a level across a space that stands out (``labelling.skips_across_gaps``), it leaves out a void's spaces
(``void_path.pairs_in_a_void``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from SpineNetLib.core.levels import LEVELS, is_level_name, level_index
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.label.confidence import LabellingConfidence, ask_for_review
from SpineNetLib.label.gaps import gap_ratios
from SpineNetLib.label.void_path import VOID_MIN_MM, VoidRun, void_along_chain


def levels_counted_across_a_void(scan: Scan, vertebrae: Sequence[Vertebra]) -> tuple[list[str], int] | None:
    """The chain's levels with the bodies a void hides counted, and how many it hides; None where that changes
    nothing.

    Where a void of :data:`VOID_MIN_MM` or more lies on a labelled chain (top to bottom) right above the body
    named S1, the way from the body above the void to S1 over the chain's usual step (``gaps.gap_ratios``),
    rounded, is the number of steps between them, and ``hidden`` bodies fewer than that were found there
    (those whose centres lie in the void count).  S1 and any body below it keep their levels; those above
    are moved up until as many levels lie between as steps.  Only up: where the labelling already left out
    as many levels or more, nothing changes.  Rounding, not the bar of a gap without a void
    (``gaps.MISSED_BODY_GAP_RATIO``, 0.65 of a step beyond the steps found): on the training side's row,
    three wrongly named runs with such a void went 0.55-0.62 of a step beyond, and the runs named right
    either less than 0.5 or more than 0.65 (model card, "Metal in the spine").

    Only right above S1, which anchors the count: where the body below the void is another, the void cuts it,
    and its outline, drawn over the part outside the void, puts its centre further from the void than the
    body's, so the step across the void reads a body too long (4 of the 7 runs it moved on the training side's
    ``metal_l4_l5`` row without this bar were named right before and wrong after, each with an L5 cut below
    the void; model card, "Metal in the spine").

    Why (issue 10): the labelling cannot see bodies under metal, and the beam search, which may skip a level
    across a gap but is not made to, named the bodies above such a void as if none were hidden (on the
    training side's ``metal_l4_l5`` row, 13 of the 40 runs with wrongly named bodies missed L5, or L4 and L5,
    above a body named S1; benchmarks/RESULTS.md, "What goes wrong under the void").  No scan of the 201 has
    a void as acquired, so this changes none of them."""
    void = void_along_chain(scan, vertebrae)
    if void is None or void.length_mm < VOID_MIN_MM or not 0 <= void.upper_index < void.lower_index < len(vertebrae):
        return None
    upper, lower = void.upper_index, void.lower_index
    names = [v.level for v in vertebrae]
    if names[lower] != "S1" or not all(is_level_name(name) for name in names):
        return None
    steps = int(np.floor(float(np.sum(gap_ratios(vertebrae)[upper:lower])) + 0.5))   # rounded, halves up
    hidden = steps - (lower - upper)
    indices = [level_index(name) for name in names]       # S1 = 0 upwards; S2 counts as S1
    move = steps - (indices[upper] - indices[lower])
    if hidden < 1 or move <= 0 or indices[0] + move >= len(LEVELS):
        return None
    return [LEVELS[i + move] for i in indices[:lower]] + names[lower:], hidden


def void_warning(void: VoidRun, hidden: int | None = None) -> str:
    """The review reason of a void: how long, where on the chain, and the bodies counted under it."""
    where = (f"between {void.above} and {void.below}" if void.above and void.below
             else f"below {void.above}" if void.above else f"above {void.below}" if void.below else "on the chain")
    if hidden:
        return (f"a signal void {void.length_mm:.0f} mm long lies on the spine {where} (metal, or an artefact): "
                f"from the way across it, it hides {hidden} vertebra{'e' if hidden > 1 else ''}, counted "
                "in the levels above it; check the count")
    return (f"a signal void {void.length_mm:.0f} mm long lies on the spine {where} (metal, or an artefact): "
            "vertebrae under it may be missed and the levels counted wrongly")


def ask_for_review_over_a_void(scan: Scan, vertebrae: Sequence[Vertebra], labelling: dict,
                               confidence: LabellingConfidence) -> None:
    """Ask for a review where :func:`void_along_chain` finds a void of :data:`VOID_MIN_MM` or more, its reason
    first; ``labelling`` (the labelling block) records it as ``signal_void``."""
    void = void_along_chain(scan, vertebrae)
    if void is None or void.length_mm < VOID_MIN_MM:
        return
    labelling["signal_void"] = {"length_mm": round(void.length_mm, 1), "between": [void.above, void.below]}
    hidden = labelling.get("levels_counted_across_void", {}).get("bodies_hidden")
    ask_for_review(confidence, void_warning(void, hidden))
