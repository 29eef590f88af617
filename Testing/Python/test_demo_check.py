"""The demo's self-check against the phantom's exact ground truth (SpineNetLib.evaluation.demo_check)."""

from __future__ import annotations

import numpy as np
import pytest

from SpineNetLib.evaluation.demo_check import check_against_phantom
from SpineNetLib.synthetic.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    # the demo's phantom: a lumbar T2 spine whose top body (T11) is cut by the image edge
    return make_phantom(fov="lumbar", contrast="T2", seed=7, variability=1.0, include_s2=True)


def _document(phantom, bodies, levels):
    """A vertebrae.json-like document whose outlines are the bodies' exact ground-truth quads."""
    to_ras = phantom.scan.canonical_to_ras
    out = []
    for body, level in zip(bodies, levels):
        polygons = []
        for s, quad in body.quads.items():
            quad = np.asarray(quad, float)
            canonical = np.c_[quad[:, 1], quad[:, 0], np.full(4, float(s)), np.ones(4)]  # [row, col, slice, 1]
            polygons.append({"slice": int(s), "corners_ras": (canonical @ to_ras.T)[:, :3].tolist()})
        out.append({"level": level, "polygons": polygons})
    return {"schema": "spinenet.vertebrae/1", "vertebrae": out}


def test_the_phantom_lists_what_is_visible(phantom):
    assert [v.level for v in phantom.vertebrae if not v.extra] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert [v.level for v in phantom.vertebrae if v.extra] == ["S2"]
    assert [v.level for v in phantom.cut_vertebrae] == ["T11"]


def test_a_perfect_result_is_all_right(phantom):
    bodies = phantom.cut_vertebrae + phantom.vertebrae
    check = check_against_phantom(_document(phantom, bodies, [b.level for b in bodies]), phantom)
    assert check.all_right, check.table()
    assert check.verdict().startswith("all levels right: 7 of 7 bodies T12..S1")
    assert max(r.error_mm for r in check.rows) < 0.01


def test_bodies_that_are_not_required_may_be_missed(phantom):
    required = [v for v in phantom.vertebrae if not v.extra]
    check = check_against_phantom(_document(phantom, required, [b.level for b in required]), phantom)
    assert check.all_right
    assert [r.found_level for r in check.rows if not r.required] == [None, None]


def test_a_shifted_spine_is_wrong(phantom):
    bodies = phantom.cut_vertebrae + phantom.vertebrae
    shifted = ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    check = check_against_phantom(_document(phantom, bodies, shifted), phantom)
    assert not check.all_right
    assert "T12 named T11" in check.verdict() and check.verdict().startswith("WRONG")


def test_missed_and_extra_bodies_are_wrong(phantom):
    required = [v for v in phantom.vertebrae if not v.extra]
    without_l3 = [b for b in required if b.level != "L3"]
    assert "L3 missed" in check_against_phantom(
        _document(phantom, without_l3, [b.level for b in without_l3]), phantom).verdict()
    doubled = required + [required[2]]
    check = check_against_phantom(_document(phantom, doubled, [b.level for b in doubled]), phantom)
    assert check.false_positives == ["L2"] and not check.all_right
    assert "false positive" in check.table()


def test_the_check_says_what_the_review_flag_was_worth(phantom):
    """The demo printed "LEVELS NEED REVIEW" warnings and then "all levels right" without a word on how
    the two go together: the check now says whether the flag was a false alarm, right, or missing."""
    bodies = phantom.cut_vertebrae + phantom.vertebrae
    right = _document(phantom, bodies, [b.level for b in bodies])
    shifted = _document(phantom, bodies, ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"])
    right_check, shifted_check = check_against_phantom(right, phantom), check_against_phantom(shifted, phantom)

    def flagged(document, needs_review):
        return {**document, "labelling": {"needs_review": needs_review}}

    assert "a false alarm" in right_check.review_note(flagged(right, True))
    assert right_check.review_note(flagged(right, False)) is None
    assert right_check.review_note(right) is None   # a document without labelling: not flagged
    assert shifted_check.review_note(flagged(shifted, True)).endswith("rightly")
    assert "did not see" in shifted_check.review_note(flagged(shifted, False))
