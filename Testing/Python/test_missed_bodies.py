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


# ----------------------------------------------------------------------------- a header's wrong pixel spacing


def test_a_pixel_spacing_twice_too_large_is_found_and_flagged():
    """The detector sees bodies only at their real size; the header claims pixels twice their size."""
    import dataclasses

    from oracles import oracle_networks
    from SpineNetLib import pipeline
    from SpineNetLib.synthetic.phantom import make_phantom

    phantom = make_phantom(fov="lumbar", pixel_spacing=(0.7, 0.7), shape=(448, 400), n_slices=5, seed=11)
    networks = oracle_networks(phantom)
    oracle, true_patch_px = networks.predictor, 260.0 / 0.7

    def sees_real_sizes_only(patches, boxes):
        out = oracle(patches, boxes)
        out[[abs(b.height_px - true_patch_px) > 0.1 * true_patch_px for b in boxes]] = 0.0
        return out

    networks.predictor = sees_real_sizes_only
    truth = sorted(v.level for v in phantom.vertebrae if not v.extra)
    right = pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False))
    assert sorted(v.level for v in right.detection.vertebrae) == truth
    assert "pixel_spacing_factor" not in right.detection.labelling
    wrong_header = dataclasses.replace(phantom.scan, spacing_mm=(1.4, 1.4, phantom.scan.spacing_mm[2]))
    found = pipeline.run(wrong_header, networks, pipeline.RunOptions(grade=False))
    assert sorted(v.level for v in found.detection.vertebrae) == truth
    assert found.detection.labelling["pixel_spacing_factor"] == 0.5
    block = found.vertebrae_document["labelling"]
    assert block["needs_review"] is True and "check the pixel spacing" in block["warnings"][0]
    assert any("check the pixel spacing" in w for w in found.warnings)
    # The official profile reproduces the official code, which trusts the header.
    official = pipeline.run(wrong_header, networks, pipeline.RunOptions(grade=False, profile="official"))
    assert official.detection.vertebrae == [] and "pixel_spacing_factor" not in official.detection.labelling
