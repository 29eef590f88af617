"""Vertebral level names and their class indices.

The order is the one of the official SpineNetV2 appearance and context
networks (official §5.5): class 0 is S1, counting upwards to class 23 = C2.
There is no C1 class; "S2" only arises from the S2 relabelling rule of the
beam search.
"""

import math

import numpy as np

LEVELS: tuple[str, ...] = (
    "S1", "L5", "L4", "L3", "L2", "L1",
    "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3", "T2", "T1",
    "C7", "C6", "C5", "C4", "C3", "C2",
)
N_LEVELS = len(LEVELS)  # 24
LEVEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(LEVELS)}

#: Levels from top (C2) to bottom (S1), the order in which a spine is read.
LEVELS_TOP_DOWN: tuple[str, ...] = tuple(reversed(LEVELS))

#: The lumbar levels, top to bottom.
LUMBAR: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")


def is_level_name(name) -> bool:
    """Whether ``name`` names a level: one of :data:`LEVELS`, or "S2" (named by the S2 rule, counted as S1)."""
    return name in LEVEL_INDEX or name == "S2"


def level_index(name: str) -> int:
    """Class index of a level name ("S2" counts as S1, index 0)."""
    if name == "S2":
        return 0
    return LEVEL_INDEX[name]


def disc_name(upper: str, lower: str) -> str:
    """Name of the disc between two vertebrae, e.g. ("L4", "L5") -> "L4-L5"."""
    return f"{upper}-{lower}"


#: The names a user can give a vertebra, top to bottom: every level and "S2" below S1.
LEVEL_CHOICES: tuple[str, ...] = LEVELS_TOP_DOWN + ("S2",)


def shifted_to_correction(levels, index: int, level: str) -> list:
    """The levels of a chain (top to bottom) after a user names vertebra ``index`` ``level``: every named
    vertebra moves by the same number of levels, so the chain stays as it was, gaps included, only shifted
    (a spine named one level off is the mistake a correction mends: L5 named S1 makes every body above one
    level too low).  A name that would fall beyond C2 or below S2 becomes None.  When the corrected
    vertebra had no level, the others are named consecutively from it."""
    order = list(LEVEL_CHOICES)
    levels = list(levels)
    current = levels[index]
    if current not in order:
        start = order.index(level) - index
        return [order[start + i] if 0 <= start + i < len(order) else None for i in range(len(levels))]
    return shifted_by(levels, order.index(level) - order.index(current))


def shifted_by(levels, delta: int) -> list:
    """Each level moved ``delta`` levels down the spine (+1: L4 becomes L5, S1 becomes S2; -1: one up); a name
    that would fall beyond C2 or below S2, or that is no level, becomes None."""
    order = list(LEVEL_CHOICES)
    return [order[order.index(name) + delta] if name in order and 0 <= order.index(name) + delta < len(order)
            else None for name in levels]


def consistent_shift(shared: list[tuple[str, str]]) -> int | None:
    """How many levels further down the spine the other series names every one of the :func:`same_bodies`
    (their level's place minus mine, top to bottom; 0 where they name them all alike), where all differ by the
    same number; None where they differ by different numbers or a name is no level."""
    order = list(LEVEL_CHOICES)
    deltas = {order.index(theirs) - order.index(mine) if mine in order and theirs in order else None
              for mine, theirs in shared}
    return deltas.pop() if len(deltas) == 1 and None not in deltas else None


#: Centroids of two series of one exam closer than this (mm, in the sagittal plane: anterior-posterior and
#: superior-inferior) are of the same vertebra: well under half the ~30 mm from one lumbar level to the
#: next, well over the few millimetres a patient moves between the series of one session.
SAME_BODY_MM = 10.0
#: At most this many other sagittal series of an exam are labelled to check a run's levels against (each is
#: detected and labelled: 1-3 s on 2 CPU cores); ``spinenet run`` and the Slicer panel.
MAX_COMPARED_SERIES = 3


def same_bodies(mine, theirs) -> list[tuple[str, str]]:
    """(my level, their level) of each of ``mine`` whose nearest vertebra of ``theirs`` lies within
    :data:`SAME_BODY_MM`: the same vertebra seen by two series of an exam; each list holds (level, centroid:
    A and S in mm) of the vertebrae of one series, in one frame of reference (README, "A second opinion
    from the same exam")."""
    found = []
    for level, centroid in mine:
        distances = [float(np.linalg.norm(np.asarray(centroid, float) - np.asarray(other, float)))
                     for _, other in theirs]
        if distances and min(distances) <= SAME_BODY_MM:
            found.append((level, theirs[int(np.argmin(distances))][0]))
    return found


def level_differences(mine, theirs) -> list[tuple[str, str]]:
    """The :func:`same_bodies` that the two series name differently."""
    return [(level, other_level) for level, other_level in same_bodies(mine, theirs) if other_level != level]


#: Two series of an exam are said to name the vertebrae alike only where they show at least this many of the
#: same vertebrae (:func:`same_bodies`), all named alike: one body in common could be a coincidence.
MIN_SAME_BODIES_ALIKE = 2


def more_likely_wrong(mine_asks: bool, theirs_asks: bool, mine=(), theirs=()) -> str:
    """What follows "one of the two series is named wrongly" where two series of an exam disagree
    (:func:`level_differences`) and only one's own labelling asks for a review: that one is more likely
    the wrong one (measured: ``benchmarks/exam_comparison.py``, README "A second opinion from the same
    exam"); "" where both or neither ask, and where the one that asks shows a vertebra below the other's lowest
    (:func:`shows_more_below` of ``mine`` and ``theirs``, the level and in-plane centroid of each series'
    vertebrae): the other may then have counted from a body above S1."""
    if theirs_asks and not mine_asks and not shows_more_below(theirs, mine):
        return ", more likely that one: its own labelling asks for a review, this one's does not"
    if mine_asks and not theirs_asks and not shows_more_below(mine, theirs):
        return ", more likely this one: that series' own labelling does not ask for a review, this one's does"
    return ""


def series_to_take_levels_from(mine, levels, readings) -> tuple[str, int] | None:
    """(the name of the series whose levels a scan whose own labelling asks for a review takes, how many levels
    further down the spine that series names each vertebra), or None: where every series of the exam whose own
    labelling asks for no review and that shows at least :data:`MIN_SAME_BODIES_ALIKE` of the scan's vertebrae
    (``mine``: level and in-plane centroid of each) names all of them otherwise by one and the same number of
    levels, and at least one does. Not where one such series names them alike or by different numbers, nor where
    a vertebra of ``levels`` (the scan's, top to bottom) would then fall beyond C2 or below S2, nor where the scan
    shows a vertebra below the lowest one of such a series (:func:`shows_more_below`).
    ``readings``: (name, level and in-plane centroid of each vertebra, whether its own labelling asks) of each
    series. ``spinenet run`` and the Slicer panel take them (``label/other_series.py``), and ``spinenet cohort``
    once its studies have run (``cohort/exams.py``, ``cohort/exam_levels.py``). Measured on the stand-in exams of
    ``benchmarks/exam_comparison.py`` (README "A second opinion from the same exam")."""
    shifts: dict[int, str] = {}
    for name, theirs, asks in readings:
        shared = same_bodies(mine, theirs)
        if asks or len(shared) < MIN_SAME_BODIES_ALIKE:
            continue
        delta = consistent_shift(shared)
        if not delta:   # a sure series that names them alike, or by different numbers: nothing to take
            return None
        if shows_more_below(mine, theirs):   # it counted from a body above the bottom that the scan sees
            return None
        shifts.setdefault(delta, name)
    return _the_one_shift(shifts, levels)


def _the_one_shift(shifts: dict[int, str], levels) -> tuple[str, int] | None:
    """(series name, shift) where the series that lend levels (``shifts``: shift -> the first series with it) all
    name the vertebrae by one shift and no name of ``levels`` would then fall beyond C2 or below S2; else None."""
    if len(shifts) != 1:
        return None
    ((delta, name),) = shifts.items()
    return (name, delta) if None not in shifted_by([level for level in levels if level], delta) else None


def shows_more_below(mine, theirs) -> bool:
    """Whether a vertebra of ``mine`` lies below the lowest of ``theirs`` and farther than :data:`SAME_BODY_MM` from
    each of them (each list: level and in-plane centroid, A and S in mm, of one series' vertebrae): the other series
    does not see the bottom of the spine this one sees, so the S1 it counts its levels up from may be a body
    above this one's lowest (it missed S1, or its field of view ends above). A scan does not take the levels of
    such a series (:func:`series_to_take_levels_from`): on the training side's stand-in exams the 5 right runs
    that took levels and were made wrong were all such, and 1 of the 39 that took them rightly
    (``benchmarks/exam_comparison.py --split train``, README "A second opinion from the same exam")."""
    if not theirs:
        return False
    lowest = min(float(np.asarray(centroid, float)[1]) for _, centroid in theirs)
    return any(float(np.asarray(centroid, float)[1]) < lowest
               and min(float(np.linalg.norm(np.asarray(centroid, float) - np.asarray(other, float)))
                       for _, other in theirs) > SAME_BODY_MM
               for _, centroid in mine)


def series_down_to_s1(mine, levels, readings) -> tuple[str, int] | None:
    """Where no series of the exam that shows at least :data:`MIN_SAME_BODIES_ALIKE` of the scan's vertebrae is
    sure (each one's own labelling asks for a review, as the scan's does): (the name of the series whose levels the
    scan takes, how many levels further down the spine it names each vertebra), or None. Taken from a series that
    names a vertebra S1 and shows one below the scan's lowest (:func:`shows_more_below`) where the scan names none
    S1: it counts its levels from the bottom of the spine, which the scan does not see (a thoracolumbar series
    beside the lumbar one), and names every shared vertebra otherwise by one and the same number of levels; not
    where such a series names them alike or by different numbers, or where two name them by different numbers.
    Arguments as for :func:`series_to_take_levels_from`. On the stand-in exams where both runs ask and the one
    that sees lower names S1 and the other does not, the lower one was right in 22 of 23 pairs with one run
    right (``benchmarks/exam_comparison.py``, both splits; README "A second opinion from the same exam")."""
    if "S1" in levels:
        return None
    shifts: dict[int, str] = {}
    for name, theirs, asks in readings:
        shared = same_bodies(mine, theirs)
        if len(shared) < MIN_SAME_BODIES_ALIKE:
            continue
        if not asks:   # a sure series: series_to_take_levels_from decides
            return None
        if not any(level == "S1" for level, _ in theirs) or not shows_more_below(theirs, mine) \
                or shows_more_below(mine, theirs):
            continue
        delta = consistent_shift(shared)
        if not delta:
            return None
        shifts.setdefault(delta, name)
    return _the_one_shift(shifts, levels)


#: Why a scan took another series' levels (``levels_taken_from_series.rule`` of ``vertebrae.json``): that
#: series' own labelling does not ask for a review (:func:`series_to_take_levels_from`), or it sees the spine
#: down to S1 and the scan does not (:func:`series_down_to_s1`).
SURE_SERIES, SERIES_DOWN_TO_S1 = "sure_series", "series_down_to_s1"
_WHY_TAKEN = {SURE_SERIES: "its own labelling does not ask for a review, this one's does",
              SERIES_DOWN_TO_S1: "it shows the spine down to S1, below this series' lowest vertebra, and this series "
                                 "names none S1 (both series' own labellings ask for a review)"}


def levels_to_take_from(mine, levels, readings) -> tuple[str, int, str] | None:
    """(series name, shift, rule: :data:`SURE_SERIES` or :data:`SERIES_DOWN_TO_S1`) of the levels a scan whose own
    labelling asks for a review takes: those of a sure series (:func:`series_to_take_levels_from`), else, where
    no series is sure, of a series that sees the spine down to S1 (:func:`series_down_to_s1`); or None."""
    taken = series_to_take_levels_from(mine, levels, readings)
    if taken is not None:
        return (*taken, SURE_SERIES)
    counted = series_down_to_s1(mine, levels, readings)
    return None if counted is None else (*counted, SERIES_DOWN_TO_S1)


def taken_levels_reason(source: str, here: str, there: str, own_levels, rule: str = SURE_SERIES) -> str:
    """The first review reason of a scan that took the levels of ``source`` ("the series 'T1' (series 3)",
    "study t1_sag") by ``rule`` (:func:`levels_to_take_from`), which names ``there`` the vertebra the scan named
    ``here`` on its own (``own_levels``: the scan's own, top to bottom); ``spinenet run`` and the Slicer
    panel (``label/other_series.py``), ``spinenet cohort`` (``cohort/exams.py``)."""
    named = [level for level in own_levels if level]
    return (f"levels taken from {source} of the same exam, which names {there} the vertebra this series "
            f"named {here}: {_WHY_TAKEN[rule]}; on its own this series "
            f"named the vertebrae {named[0]}..{named[-1]} (the reasons after this one are about those levels)")


def margin_of_confidence(confidence: float) -> float:
    """ln(c / (1 - c)): the labelling margin (nats, against the best labelling shifted by one level) whose
    confidence is ``c`` (``label/confidence.py``); inf for c >= 1, -inf for c <= 0.  Here, below the layers
    that label and that read the cohort's tables, so that both use the one conversion."""
    c = float(confidence)
    return math.inf if c >= 1.0 else -math.inf if c <= 0.0 else math.log(c / (1.0 - c))
