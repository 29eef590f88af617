"""Weaker detections taken as bodies (label/missed_bodies.py): S1 below a labelled L5, bodies in a gap."""

from __future__ import annotations

import numpy as np

from SpineNetLib.core.results import Vertebra
from SpineNetLib.label.missed_bodies import gap_fillers, sacrum_candidate


def _body(cx, cy, level=None, half=(12.0, 8.0)):
    hx, hy = half
    quad = np.array([[cx + hx, cy - hy], [cx + hx, cy + hy], [cx - hx, cy + hy], [cx - hx, cy - hy]])
    return Vertebra(slices=[3, 4], polygons=[quad, quad], level=level)


def _lumbar(step=30.0):
    return [_body(100, 50 + step * i, level) for i, level in enumerate(["L1", "L2", "L3", "L4", "L5"])]


def test_the_candidate_one_step_below_l5_is_taken():
    spine = _lumbar()                                        # L5 at y = 170, step 30
    s1, s2, aside = _body(104, 203), _body(108, 236), _body(60, 200)
    assert sacrum_candidate(spine, [s2, aside, s1]) is s1


def test_nothing_is_taken_unless_the_spine_ends_at_l5_and_the_candidate_fits():
    spine = _lumbar()
    assert sacrum_candidate(spine, []) is None
    assert sacrum_candidate(spine, [_body(100, 170 + 30 + 16)]) is None   # more than half a step off
    assert sacrum_candidate(spine, [_body(100, 140)]) is None             # above L5
    ends_at_s1 = spine[1:] + [_body(100, 200, "S1")]
    assert sacrum_candidate(ends_at_s1, [_body(100, 230)]) is None
    assert sacrum_candidate(spine[-1:], [_body(100, 200)]) is None        # no L4 to give the step


def test_distances_are_in_millimetres():
    # 0.5 mm rows, 1 mm columns: the L4-L5 step of 30 rows is 15 mm; a candidate 10 columns to the
    # side is 10 mm off (more than half the step) although only 10 pixels away.
    spine = _lumbar()
    assert sacrum_candidate(spine, [_body(110, 200)], spacing_rc=(0.5, 1.0)) is None
    assert sacrum_candidate(spine, [_body(110, 200)], spacing_rc=(1.0, 1.0)) is not None


def test_a_gap_is_filled_where_the_missing_bodies_would_lie():
    spine = _lumbar()
    one_missing = spine[:2] + spine[3:]                      # L3 (y = 110) missed
    l3, elsewhere = _body(103, 112), _body(100, 260)
    assert gap_fillers(one_missing, [elsewhere, l3]) == [l3]
    longer = [_body(100, -40), _body(100, -10), _body(100, 20)] + spine   # T10 .. L5
    two_missing = longer[:4] + longer[6:]                    # L2 and L3 missed
    l2 = _body(98, 79)
    assert gap_fillers(two_missing, [l3, l2]) == [l3, l2]
    assert gap_fillers(two_missing, [_body(100, 95)]) == []  # between the two expected places


def test_no_gap_no_filler():
    spine = _lumbar()
    assert gap_fillers(spine, [_body(100, 65)]) == []         # regular chain: nothing is missing
    assert gap_fillers(spine[:2], [_body(100, 65)]) == []     # too few bodies to know the step
