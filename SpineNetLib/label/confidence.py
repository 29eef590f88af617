"""How sure the level labelling is: the chosen labelling against the best one shifted by one level.

A wrong level is the error that matters most to a reader of a spine scan
(wrong-level reporting), and the typical wrong labelling is the whole spine
shifted by one level.  :func:`labelling_confidence` therefore compares the
labelling that was chosen with the best labelling in which the levels are
shifted by one, both scored by the beam search's own cost
(:func:`SpineNetLib.label.labelling.sequence_cost`: 1 + sum of -ln p + the
ordering penalties of official §5.5, in nats):

* for each direction (one level caudal, one level cranial) and each vertebra
  ``k`` whose shifted class exists, the beam search is re-run with vertebra
  ``k`` pinned to its shifted class
  (:func:`~SpineNetLib.label.labelling.beam_search` with ``fixed``, as a user
  correction does); the cheapest of these labellings is the best shifted
  alternative.  Pinning one vertebra finds the whole chain shifted as well as
  a local change (one body renamed, a skip or a repeated S1), whichever the
  probabilities and penalties favour; shifts by two levels are not searched;
* ``margin_nats`` = cost(alternative) - cost(chosen), clipped at 0;
* ``confidence`` = 1 / (1 + exp(-margin)): with costs that are -ln of
  (penalised) probabilities, this is p(chosen) / (p(chosen) + p(alternative)),
  between 0.5 (a coin toss between the two) and 1.

A single vertebra is no chain, and the same definition then compares the
probability of its level with those of its two neighbouring levels.  With no
vertebra there is nothing to be sure of: confidence and margin are NaN,
nothing needs review and there are no warnings.

``needs_review`` is ``margin_nats < review margin`` (the same as ``confidence <
min_confidence`` when a confidence threshold is given; margins are compared
because calibrated thresholds lie where the confidence is 1.0 in floating
point), or a gap between two consecutive bodies of more than
:data:`REVIEW_GAP_RATIO` times their usual spacing or a space between them higher than
``gaps.MISSED_BODY_SPACE_RATIO`` times the bodies where the levels skip one there, or higher than
``gaps.COLLAPSED_BODY_SPACE_RATIO`` times them and standing out from the chain's other spaces (a vertebra,
perhaps collapsed, was probably missed there: the levels count one there where the chain reaches S1, or may
be off by one on one side of it); the threshold
:data:`DEFAULT_MIN_CONFIDENCE` is meant to be calibrated on annotated scans.
A missing S1 is reported as a note (the levels were counted without the
lumbosacral anchor) but does not by itself ask for a review.
:func:`ask_for_review_where_in_doubt` (:func:`SpineNetLib.pipeline.run` calls it) sets ``needs_review`` for
more reasons that the margin cannot show: a pixel spacing other than the header's found the
bodies; a full-strength body named S1 has a weaker detection below it where S1
would lie (:data:`S1_MAY_BE_L5`); two consecutive bodies whose evidence favours
the same lumbar level (:func:`same_level_twice`); an S1 at the image edge named
from the other vertebrae (``EDGE_BODY_RELABELLED``). ``pipeline.run`` adds a chain beyond a lumbar
field of view with weights made for lumbar scans (:func:`beyond_lumbar_field`), another series of the
exam that names a vertebra otherwise (``label/other_series.py``) and, once the discs are measured, a disc
space between two consecutively named bodies higher than any disc (:func:`missed_vertebra_reasons`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from SpineNetLib.core.levels import LEVELS, N_LEVELS, is_level_name, level_index, margin_of_confidence
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.label.appearance_slices import off_middle_note
from SpineNetLib.label.gaps import (COLLAPSED_BODY_SPACE_RATIO, MISSED_BODY_GAP_RATIO, MISSED_BODY_SPACE_RATIO,
                                    SkipsAcrossGaps, gap_ratios, level_skipped, space_ratios, spaces_standing_out)
from SpineNetLib.label.labelling import (LabellingParams, assign_level_names, beam_search, sequence_cost,
                                         skips_across_gaps)

#: The confidence below which the levels are flagged for review (``needs_review``) when the weights
#: carry no calibrated value.  A context checkpoint carries the value calibrated for it (entry
#: ``min_labelling_confidence``, read by ``labelling.params_for_context``; the bundled one's choice
#: is in ``SpineNetLib/weights/bundled/MODEL_CARD.md``); callers may pass their own
#: (``SpineNetLib.pipeline.RunOptions.min_labelling_confidence``).
DEFAULT_MIN_CONFIDENCE = 0.9
#: A gap wider than this many times the usual step asks for a review: a vertebra was probably missed
#: there (``gaps.MISSED_BODY_GAP_RATIO``, where the beam search may also skip a level).
REVIEW_GAP_RATIO = MISSED_BODY_GAP_RATIO


#: Directions searched, in this order (the first wins a tie): +1 = one level caudal, -1 = cranial.
SHIFTS = (+1, -1)


@dataclass
class LabellingConfidence:
    """How sure a labelling is against its best alternative shifted by one level (module docstring)."""

    #: p(chosen) / (p(chosen) + p(best shifted alternative)), in [0.5, 1]; NaN with no vertebra.
    confidence: float
    #: Cost of the best shifted alternative minus cost of the chosen labelling, >= 0, in nats
    #: (-ln p plus the beam search's penalties); NaN with no vertebra.
    margin_nats: float
    #: Level names (top to bottom, with the S2 rule) of the best shifted alternative; None without one.
    shifted_levels: list[str] | None
    #: Direction of that alternative: +1 = its levels lie one level lower (caudal: the body called
    #: L4 becomes L5), -1 = one level higher (cranial: L5 becomes L4); 0 without an alternative.
    shift: int
    #: Whether the chosen labelling names a vertebra S1.
    s1_found: bool
    #: One-line messages for the user, with the reason (empty when there is nothing to say).
    warnings: list[str] = field(default_factory=list)
    #: confidence < the threshold it was computed with: the levels should be checked by a person.
    needs_review: bool = False
    #: The threshold ``needs_review`` was decided with, as a confidence and as a margin.
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    review_margin_nats: float = math.log(9.0)


def ask_for_review(confidence: LabellingConfidence, reason: str) -> None:
    """Set ``needs_review`` for a reason the probabilities cannot show; the reason goes first."""
    confidence.warnings.insert(0, reason)
    confidence.needs_review = True


def _truncated(value: float) -> str:
    """Two decimals rounded down, so that 0.996 reads 0.99 and only certainty reads 1.00."""
    return f"{math.floor(value * 100.0) / 100.0:.2f}"


#: How the margin's review reason (:func:`shift_warning`) opens; the other reasons that name a shift go
#: on with a colon instead (``benchmarks/review_margins.py`` tells them apart by it).
SHIFT_WARNING_START = "levels may be shifted by one ("
#: How the note of :func:`s1_at_lower_edge` opens when the body named S1 ends above the edge (a note only).
S1_ENDS_ABOVE_EDGE_START = "the body named S1 ends "


def shift_warning(confidence: float, chosen: Sequence[str], alternative: Sequence[str],
                  margin_nats: float | None = None) -> str:
    """The one-line review message: how sure, and what the next best labelling calls which body.

    Names the lowest body whose level differs (usually the lowest body of
    all, where a reader counts from the sacrum) and, for more than one body,
    both level ranges.
    """
    differing = [k for k, (a, b) in enumerate(zip(chosen, alternative)) if a != b]
    k = differing[-1] if differing else len(chosen) - 1
    body = "the lowest body" if k == len(chosen) - 1 else f"body {k + 1} from the top"
    ranges = ""
    if len(chosen) > 1:
        ranges = f" ({alternative[0]}..{alternative[-1]} instead of {chosen[0]}..{chosen[-1]})"
    how_sure = f"confidence {_truncated(confidence)}" if confidence < 0.995 or margin_nats is None \
        else f"margin {margin_nats:.1f} nats, less than these weights need to be trusted"
    return (f"{SHIFT_WARNING_START}{how_sure}): the next best labelling "
            f"calls {body} {alternative[k]} instead of {chosen[k]}{ranges}")


#: The highest level a lumbar field of view reaches: on the 201 real lumbar scans of the bundled
#: weights' validation (held out and training side, annotated T10-S1), 12 chains reach T9 or T8, the
#: bodies above the lumbar ones, and none reaches higher (bundled MODEL_CARD.md, "Known limits").
LUMBAR_FIELD_TOP = "T8"


def beyond_lumbar_field(vertebrae: Sequence[Vertebra]) -> str | None:
    """The review reason when the labelled chain reaches above :data:`LUMBAR_FIELD_TOP` with the bundled
    networks, made for lumbar scans only (``WeightSet.lumbar_only``): a thoracic, whole-spine or cervical
    field of view, where they were not validated (None otherwise).

    The bundled detector misses bodies there that no review of the levels alone would reveal: on a
    cervical phantom it found C7-T3 of C2-T3, named right, with no review flag; on whole-spine phantoms
    it misses the cervical spine (MODEL_CARD.md)."""
    top = LEVELS.index(LUMBAR_FIELD_TOP)
    above = [v.level for v in vertebrae if v.level in LEVELS and LEVELS.index(v.level) > top]
    if not above:
        return None
    highest = max(above, key=LEVELS.index)
    return (f"the bundled weights were made for lumbar scans (validated on real scans of T10 to S1), and "
            f"this chain reaches {highest}: on a thoracic, whole-spine or cervical scan they were not validated "
            "and miss bodies (the cervical spine of whole-spine phantoms); use the official SpineNetV2 weights "
            "(--weights official) for such scans")


#: The note when no vertebra is called S1 (it does not by itself ask for a review).
S1_NOT_FOUND = "S1 not found: the levels were counted from the other vertebrae only"
#: The review reason of ``label.missed_bodies.weaker_body_below_s1`` (set by ``pipeline.run``).
S1_MAY_BE_L5 = ("levels may be shifted by one: the body named S1 may be L5 (a weaker detection lies below it "
                "where S1 would lie below an L5)")

#: The review reason when the lowest body, at the lower image edge, was named S1 by its own appearance
#: and the others name it otherwise (``pipeline._labelled_without_edge_appearance``).
EDGE_BODY_RELABELLED = ("levels were counted without the lowest body's appearance: it sits at the lower edge of "
                        "the image, where the appearance network called it S1 (an image edge right below a "
                        "body looks like S1 to it); the other vertebrae name it otherwise: check the levels")
#: The review reason of :func:`s1_cut_by_lower_edge` (set by ``pipeline.run``).
S1_CUT_BY_LOWER_EDGE = ("levels may be shifted by one: the body named S1 is cut by the lower edge of the image, so "
                        "neither its lower part nor the sacrum below it is seen: check that it is not L5 (an L5 "
                        "at the image edge can be taken for S1)")


def lowest_bodies_from_second_detector(levels: list[str]) -> str:
    """The review reason when the second detector supplied the bodies ``levels`` (down to S1) below a chain
    that ended at L1-L4 (``pipeline._s1_from_second_detector``): the main detector missed them all, even
    weakly, so the lowest levels rest on the smaller detector alone, and bodies that continue a shifted
    chain would hide its shift (MODEL_CARD.md, "L5 and S1 below an L1-L4 from the second detector")."""
    return (f"levels may be shifted: {', '.join(levels[:-1])} and {levels[-1]} were found only by the second "
            "detector (s1_outline.pt), below a chain that ended above them: check the lowest levels")


MOVED_UP_TO_WEAKER_S1 = ("levels were moved up by one: the body first named S1 was a full-strength detection "
                         "with a weaker one below it where S1 would lie, and two bodies above it were named "
                         "against their own evidence; the weaker detection is now S1: check the levels")

#: Two consecutive bodies whose evidence favours the same level of :data:`SAME_LEVEL_LEVELS`, each at
#: this probability or more, ask for a review (:func:`same_level_twice`).  Chosen on six runs of the
#: 133 training-side scans (as acquired, and five changes of ``benchmarks/acquisition_variants.py``;
#: bundled MODEL_CARD.md, "Review flags"), counting every review reason: with 0.95, 69 of the 78 runs
#: of a wrongly labelled scan were flagged, and 120 of the right ones; 0.99: 66 and 114; 0.9: 70 and
#: 127; 0.8: 72 and 149.
SAME_LEVEL_MIN_PROBABILITY = 0.95
#: The levels :func:`same_level_twice` looks at.  Thoracic ones are left out: the bodies at the top of
#: a lumbar image are cut by its edge and often favour the level of the body below them: with them,
#: 55 instead of 18 right training-side scans as acquired would be flagged (and one more wrong one).
SAME_LEVEL_LEVELS = ("L1", "L2", "L3", "L4", "L5", "S1")


@dataclass(frozen=True)
class SameLevelTwice:
    """Two consecutive bodies, named ``named``, whose evidence both favours ``level``."""

    named: tuple[str, str]
    level: str
    probabilities: tuple[float, float]

    def warning(self) -> str:
        """The review reason, for the warnings of ``vertebrae.json``, the CSV and the panel."""
        return (f"levels may be shifted by one: the evidence for two consecutive bodies, named {self.named[0]} "
                f"and {self.named[1]}, favours {self.level} for both ({_truncated(self.probabilities[0])} and "
                f"{_truncated(self.probabilities[1])}); one of them is named against it")


def same_level_twice(vertebrae: Sequence[Vertebra],
                     min_probability: float = SAME_LEVEL_MIN_PROBABILITY) -> SameLevelTwice | None:
    """The lowest two consecutive bodies whose evidence (``Vertebra.level_probabilities``: what the
    labelling weighed, context times appearance) favours the same level of :data:`SAME_LEVEL_LEVELS`,
    each at ``min_probability`` or more; None when there are none.

    The beam search gives consecutive bodies consecutive levels, so one of the two is named against
    its own evidence, however sure it is, and the chain is one level off on one side of it.  The
    margin does not show this: it weighs the whole chain shifted, and the two bodies pull against
    each other.  The one wrongly labelled held-out scan, tianchi_158, looks so: its L5, found below
    the chain, is named S1 with an L5 probability of 0.9999 under a body named L5 at 1.0, at a margin
    of 51 nats.  An S2 below S1 is no such pair: the labelling names a second S1 so on purpose
    (``labelling.assign_level_names``)."""
    named = [v for v in vertebrae if v.level is not None and v.level_probabilities is not None]
    for upper, lower in reversed(list(zip(named, named[1:]))):
        p_upper = np.asarray(upper.level_probabilities, float)
        p_lower = np.asarray(lower.level_probabilities, float)
        k = int(np.argmax(p_upper))
        if (int(np.argmax(p_lower)) == k and LEVELS[k] in SAME_LEVEL_LEVELS and lower.level != "S2"
                and min(p_upper[k], p_lower[k]) >= min_probability):
            return SameLevelTwice((upper.level, lower.level), LEVELS[k], (float(p_upper[k]), float(p_lower[k])))
    return None


#: Less image than this (in the body's own heights) below the body named S1 shows no sacrum under it
#: (the appearance crop reaches one body size below the body, official §5.4).
S1_EDGE_BODY_HEIGHTS = 0.5


def _image_below_s1(vertebrae: Sequence, n_rows: int) -> tuple[float, float] | None:
    """(rows of image below the body named S1, that body's height in rows) when the lowest body is
    named S1 (None otherwise); 0 or less below: the body reaches the last row, cut by the edge."""
    if not vertebrae or vertebrae[-1].level != "S1":
        return None
    rows = np.asarray(vertebrae[-1].average_polygon, float)[:, 1]   # rt, rb, lb, lt
    height = 0.5 * (rows[1] + rows[2]) - 0.5 * (rows[0] + rows[3])
    return (n_rows - 1) - max(rows[1], rows[2]), height


def s1_at_lower_edge(vertebrae: Sequence, n_rows: int, row_mm: float) -> str | None:
    """The note when the lowest body is named S1 and the image ends less than
    :data:`S1_EDGE_BODY_HEIGHTS` of its height below it (None otherwise).

    It does not ask for a review by itself (unless the body is cut by the edge,
    :func:`s1_cut_by_lower_edge`): research volumes often end right below S1 (6 of the 6
    held-out myosegmentum volumes, all named right), but an L5 at the lower edge of an image is
    named S1 by the appearance network, with no sign of doubt in the margin: held-out scans cut
    between L5 and S1 came out shifted in 18 of 68 (``benchmarks/acquisition_variants.py``,
    ``ends_at_l5``), 12 of them with this body named S1 and 5 of those not flagged; after
    ``pipeline._labelled_without_edge_appearance``, 11 shifted, 5 of them with this note."""
    found = _image_below_s1(vertebrae, n_rows)
    if found is None:
        return None
    below, height = found
    if not height > 0 or below >= S1_EDGE_BODY_HEIGHTS * height:
        return None
    where = ("the body named S1 is cut by the lower edge of the image" if below <= 0
             else f"{S1_ENDS_ABOVE_EDGE_START}{below * row_mm:.0f} mm above the lower edge of the image")
    return (f"{where}, so no sacrum is seen below it: check that it is not L5 "
            "(an L5 at the image edge can be taken for S1)")


def s1_cut_by_lower_edge(vertebrae: Sequence, n_rows: int) -> bool:
    """Whether the body named S1 reaches the last row of the image: cut by its lower edge, so neither its
    own lower part nor the sacrum below it is seen to confirm it.  This asks for a review
    (:data:`S1_CUT_BY_LOWER_EDGE`), the other cases of :func:`s1_at_lower_edge` only a note.  Over the
    12 held-out acquisition variants it flags 3 more of the 49 scans with a wrongly named body (L5 named
    S1 on scans cut between L5 and S1, at margins of 41-66 nats) and 14 more of the 767 others; held out
    as acquired 2 more right scans (volumes ending inside S1); on the training side, which it was not
    designed on, 3 more of 16 wrong scans cut between L5 and S1 and 3 more right ones as acquired
    (bundled MODEL_CARD.md, "Review flags")."""
    found = _image_below_s1(vertebrae, n_rows)
    return found is not None and found[1] > 0 and found[0] <= 0



def labelling_confidence(level_probabilities: np.ndarray, level_names: Sequence[str],
                         params: LabellingParams | None = None,
                         min_confidence: float | None = None,
                         skips: SkipsAcrossGaps = SkipsAcrossGaps()) -> LabellingConfidence:
    """Confidence of the labelling ``level_names`` given the probabilities the beam search used.

    ``level_probabilities`` is ``(N, 24)`` over ``levels.LEVELS`` (the
    context probabilities of :func:`~SpineNetLib.label.labelling.label_vertebrae`);
    ``level_names`` are the N chosen names, top to bottom ("S2" counts as
    class S1, as in :func:`~SpineNetLib.label.labelling.relabel_with_correction`).
    ``params`` must be the ones the labelling used (the penalties are part of
    the cost), and ``skips`` the positions where it could skip a level freely or had to
    (:func:`~SpineNetLib.label.labelling.skips_across_gaps`).  See the module docstring for the definitions.
    """
    params = params or LabellingParams()
    review_margin = params.review_margin_nats if min_confidence is None else margin_of_confidence(min_confidence)
    if min_confidence is None:
        min_confidence = round(1.0 / (1.0 + math.exp(-min(review_margin, 700.0))), 12)
    probs = np.asarray(level_probabilities, np.float64).reshape(-1, N_LEVELS)
    names = list(level_names)
    if len(names) != len(probs):
        raise ValueError(f"{len(names)} level names for {len(probs)} rows of probabilities")
    s1_found = "S1" in names
    if not names:
        return LabellingConfidence(math.nan, math.nan, None, 0, False, [], False, float(min_confidence),
                                   review_margin)
    chosen = [level_index(name) for name in names]
    chosen_cost = sequence_cost(chosen, probs, params, skips)
    best_cost, best, best_shift = math.inf, None, 0
    for shift in SHIFTS:
        for k, c in enumerate(chosen):
            target = c - shift  # class indices count upwards from S1 = 0: caudal is one class lower
            if not 0 <= target < N_LEVELS:
                continue
            alternative = beam_search(probs, params, fixed={k: target}, skips=skips)
            cost = sequence_cost(alternative, probs, params, skips)
            if cost < best_cost:
                best_cost, best, best_shift = cost, alternative, shift
    margin = max(0.0, best_cost - chosen_cost)
    confidence = 1.0 / (1.0 + math.exp(-margin))
    shifted = assign_level_names(best) if best is not None else None
    needs_review = margin < review_margin
    warnings = [shift_warning(confidence, names, shifted, margin)] if needs_review and shifted else []
    if not s1_found:
        warnings.append(S1_NOT_FOUND)
    return LabellingConfidence(confidence=confidence, margin_nats=margin, shifted_levels=shifted,
                               shift=best_shift if best is not None else 0, s1_found=s1_found,
                               warnings=warnings, needs_review=needs_review,
                               min_confidence=float(min_confidence), review_margin_nats=review_margin)


def _missed_between(upper: str | None, lower: str | None) -> str:
    """How the two review reasons for a missed vertebra open (:func:`gap_warnings`,
    :func:`missed_vertebra_reasons`): the second leaves out a pair the first names already."""
    return f"a vertebra may have been missed between {upper} and {lower}"


def gap_warnings(vertebrae: Sequence[Vertebra]) -> list[str]:
    """A message per gap between consecutive bodies (top to bottom) that holds a missed body: a step wider
    than :data:`REVIEW_GAP_RATIO` times the median step of the scan (three bodies at least;
    ``gaps.gap_ratios``), where the levels skip one across a space between the bodies higher than
    :data:`MISSED_BODY_SPACE_RATIO` times their mean height (``gaps.space_ratios``; where they do not,
    :func:`missed_vertebra_reasons` measures the disc), or, but for the lowest pair, where a space higher than
    :data:`COLLAPSED_BODY_SPACE_RATIO` times the bodies stands out from the chain's other spaces
    (``gaps.spaces_standing_out``): a body missed, perhaps collapsed, where a level is counted when the chain
    reaches S1 (``labelling.counted_across_wide_spaces``).  Where the levels skip one across it
    (``labelling.skips_across_gaps``), the message names the level counted there without an outline; elsewhere
    it says that the levels on one side may be off by one."""
    steps, spaces = gap_ratios(vertebrae), space_ratios(vertebrae)
    standing_out = spaces_standing_out(vertebrae, COLLAPSED_BODY_SPACE_RATIO)
    warnings = []
    for i in range(len(vertebrae) - 1):
        upper, lower = vertebrae[i].level, vertebrae[i + 1].level
        skipped = level_skipped(upper, lower)
        if i < len(steps) and steps[i] > REVIEW_GAP_RATIO:
            measured = f"their gap is {steps[i]:.1f} times the usual spacing"
        elif (skipped and spaces[i] > MISSED_BODY_SPACE_RATIO) or i + 1 in standing_out:
            measured = f"the space between them is {spaces[i]:.1f} times the bodies' height"
        else:
            continue
        consequence = (f"the levels count {skipped} there, which has no outline" if skipped
                       else "the levels on one side of it may be off by one")
        warnings.append(f"{_missed_between(upper, lower)} ({measured}): {consequence}")
    return warnings


def missed_vertebra_reasons(discs: Sequence[tuple[str | None, str | None, float]], limit_mm: float,
                            said: Sequence[str] = ()) -> list[str]:
    """A review reason per pair of consecutive bodies, ``(upper level, lower level, mean height of the disc
    between them in mm)`` top to bottom, that are named consecutive levels although the disc between them is
    higher than ``limit_mm`` (no disc is: ``discs.measurements.MAX_PLAUSIBLE_DISC_HEIGHT_MM``): a vertebra
    there was probably missed, and the levels on one side of it are then off by one. Found on clinical slices
    whose T11 or T12 the detector missed under a chain named right from S1 up to L1 or T12 (MODEL_CARD.md,
    "A vertebra missed above the lumbar spine"); :func:`gap_warnings` measures the step between the centres,
    which the smaller thoracic bodies above keep under its bar. A pair a reason in ``said`` names already
    ("a vertebra may have been missed between T12 and L1") is left out."""
    reasons = []
    for upper, lower, height in discs:
        start = _missed_between(upper, lower)
        if (upper not in LEVELS or lower not in LEVELS or level_index(upper) - level_index(lower) != 1
                or not height > limit_mm or any(w.startswith(start) for w in said)):
            continue
        reasons.append(f"{start} (the disc space between them is {height:.1f} mm high; no disc is over "
                       f"{limit_mm:g} mm): the levels on one side of it may be off by one")
    return reasons


def confidence_of_vertebrae(vertebrae: Sequence[Vertebra], params: LabellingParams | None = None,
                            min_confidence: float | None = None,
                            in_void: frozenset[int] = frozenset()) -> LabellingConfidence | None:
    """:func:`labelling_confidence` of labelled vertebrae (top to bottom), from their
    ``.level_probabilities`` and ``.level``; None when one of them is not labelled.  ``in_void``: the
    positions of the spaces a signal void lies in (``void_path.pairs_in_a_void``), where the labelling counts
    no level (``labelling.skips_across_gaps``).

    After :func:`~SpineNetLib.label.labelling.relabel_with_correction` this
    scores the corrected labelling the same way, as the network sees it.
    """
    if any(v.level is None or v.level_probabilities is None for v in vertebrae):
        return None
    if not all(is_level_name(v.level) for v in vertebrae):
        return None
    probs = np.stack([np.asarray(v.level_probabilities, np.float64) for v in vertebrae]) if vertebrae \
        else np.zeros((0, N_LEVELS))
    confidence = labelling_confidence(probs, [v.level for v in vertebrae], params, min_confidence,
                                      skips_across_gaps(vertebrae, params, in_void))
    gaps = gap_warnings(vertebrae)
    if gaps:
        confidence.warnings = gaps + confidence.warnings
        confidence.needs_review = True
    return confidence


def ask_for_review_where_in_doubt(scan: Scan, vertebrae: Sequence[Vertebra], labelling: dict,
                                  confidence: LabellingConfidence) -> None:
    """The review reasons the margin cannot show, for the labelled ``vertebrae`` of ``scan`` (``labelling``,
    the labelling block of the detection, says which held; each goes before those asked earlier, so the
    more specific ones, asked later, come first), the note on a spine off the middle of the slab, and the
    note on an S1 at the lower image edge (a review reason when the body is cut by the edge); ``labelling``
    records what was found."""
    spacing_factor = labelling.get("pixel_spacing_factor")
    if spacing_factor is not None:
        # the header's spacing found too few bodies: the levels and every size in mm are in doubt
        ask_for_review(confidence, f"few vertebrae were found at the header's pixel spacing "
                                   f"({scan.spacing_mm[0]:.3g} x {scan.spacing_mm[1]:.3g} mm); they were found "
                                   f"at {spacing_factor:g} times it: check the pixel spacing (sizes in mm "
                                   "use the header's)")
    twice = same_level_twice(vertebrae)
    if twice is not None:
        labelling["same_level_twice"] = {"named": list(twice.named), "level": twice.level,
                                         "probabilities": [round(p, 4) for p in twice.probabilities]}
        ask_for_review(confidence, twice.warning())
    if labelling.get("levels_from_second_detector"):
        ask_for_review(confidence, lowest_bodies_from_second_detector(labelling["levels_from_second_detector"]))
    if labelling.get("s1_may_be_l5"):   # the more specific reason first
        ask_for_review(confidence, S1_MAY_BE_L5)
    if labelling.get("moved_up_to_weaker_s1"):
        ask_for_review(confidence, MOVED_UP_TO_WEAKER_S1)
    if labelling.get("s1_at_image_edge_relabelled"):
        ask_for_review(confidence, EDGE_BODY_RELABELLED)
    centred_note = off_middle_note(vertebrae)
    if centred_note is not None:
        confidence.warnings.append(centred_note)
    if s1_cut_by_lower_edge(vertebrae, scan.voxels.shape[0]):
        # the note's strongest case (the body itself cut) asks for a review instead
        labelling.update(s1_at_image_edge=True, s1_cut_by_image_edge=True)
        ask_for_review(confidence, S1_CUT_BY_LOWER_EDGE)
        return
    edge_note = s1_at_lower_edge(vertebrae, scan.voxels.shape[0], scan.spacing_mm[0])
    if edge_note is not None:
        labelling["s1_at_image_edge"] = True
        confidence.warnings.append(edge_note)
