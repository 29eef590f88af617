"""A signal void on the spine's path (metal hardware) asks for a review of the levels; scans without one do not."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from SpineNetLib import pipeline
from SpineNetLib.core.levels import LEVELS
from SpineNetLib.core.results import Vertebra
from SpineNetLib.label.signal_void import levels_counted_across_a_void, void_warning
from SpineNetLib.label.void_path import VOID_MIN_MM, pairs_in_a_void, void_along_chain
from SpineNetLib.synthetic.phantom import make_phantom

from oracles import oracle_networks

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


def _truth(phantom) -> list[Vertebra]:
    return [Vertebra(slices=sorted(v.quads), polygons=[v.quads[s] for s in sorted(v.quads)], level=v.level)
            for v in phantom.vertebrae if not v.extra]


def _with_void(scan, upper: Vertebra, lower: Vertebra, half_depth_mm: float = 15.0):
    """``scan`` with no signal inside an ellipse centred between two bodies' centres, reaching each centre
    along the spine and ``half_depth_mm`` across it, on every slice: metal, as the benchmark row draws it."""
    row_mm, col_mm = scan.spacing_mm[0], scan.spacing_mm[1]
    a, b = upper.centroid_xy * [col_mm, row_mm], lower.centroid_xy * [col_mm, row_mm]
    along = (b - a) / np.hypot(*(b - a))
    rows, cols = np.mgrid[0:scan.voxels.shape[0], 0:scan.voxels.shape[1]]
    offset = np.stack([cols * col_mm, rows * row_mm], axis=-1) - (a + b) / 2
    u, w = offset @ along, offset @ np.array([-along[1], along[0]])
    inside = np.hypot(u / (np.hypot(*(b - a)) / 2), w / half_depth_mm) < 1
    voxels = scan.voxels.copy()
    voxels[inside] = 0.0
    return dataclasses.replace(scan, voxels=voxels)


@pytest.mark.parametrize("contrast", ["T2", "T1", "STIR"])
def test_a_spine_without_metal_has_no_void_on_its_path(contrast):
    phantom = make_phantom(fov="lumbar", contrast=contrast, shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9,
                           seed=3)
    found = void_along_chain(phantom.scan, _truth(phantom))
    assert found is not None and found.length_mm < VOID_MIN_MM


def test_a_void_over_two_bodies_is_found_between_the_bodies_around_it():
    phantom = make_phantom(fov="lumbar", contrast="T2", shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9,
                           seed=3)
    truth = _truth(phantom)
    names = [v.level for v in truth]
    l3, l4, l5 = (truth[names.index(level)] for level in ("L3", "L4", "L5"))
    scan = _with_void(phantom.scan, l4, l5)
    # the detector still sees L4 and L5 (their outer halves): the void lies between them
    found = void_along_chain(scan, truth)
    assert found.length_mm >= VOID_MIN_MM and (found.above, found.below) == ("L4", "L5")
    # it misses both: the void lies between L3 and S1, on the path from one to the other
    without = [v for v in truth if v.level not in ("L4", "L5")]
    found = void_along_chain(scan, without)
    assert found.length_mm >= VOID_MIN_MM and (found.above, found.below) == ("L3", "S1")
    # the chain ends above the void (L4 and everything below missed): found within one usual step below L3
    above = [v for v in truth if names.index(v.level) <= names.index("L3")]
    found = void_along_chain(_with_void(phantom.scan, l3, l4), above)
    assert found.length_mm >= VOID_MIN_MM and (found.above, found.below) == ("L3", "")
    assert "below L3" in void_warning(found)
    assert void_along_chain(scan, truth[:2]) is None        # too few bodies to follow a path


def test_the_labelling_counts_no_collapsed_body_in_the_space_of_a_void():
    """Metal cuts the outlines of the bodies beside it short, which opens the space between them to about a
    body, as a collapsed body the detector missed does (``gaps.COLLAPSED_BODY_SPACE_RATIO``); where a void lies
    in that space (``void_path.pairs_in_a_void``), the labelling counts no level there
    (``labelling.skips_across_gaps``; model card, "A collapsed vertebra")."""
    from SpineNetLib.label.gaps import SkipsAcrossGaps
    from SpineNetLib.label.labelling import skips_across_gaps

    phantom = make_phantom(fov="lumbar", contrast="T2", shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9,
                           seed=3)
    truth = _truth(phantom)
    names = [v.level for v in truth]
    l4, l5 = (truth[names.index(level)] for level in ("L4", "L5"))
    assert pairs_in_a_void(phantom.scan, truth) == frozenset()
    assert pairs_in_a_void(_with_void(phantom.scan, l4, l5), truth) == {names.index("L5")}
    without = [v for v in truth if v.level not in ("L4", "L5")]             # both missed: L3 to S1 in the void
    assert pairs_in_a_void(_with_void(phantom.scan, l4, l5), without) == {[v.level for v in without].index("S1")}
    # the bodies beside the void drawn half as high: their space stands out, and counts only without the void
    k = names.index("L5")
    cut = [*truth[:k - 1], _shortened(truth[k - 1], keep="top"), _shortened(truth[k], keep="bottom"), *truth[k + 1:]]
    assert k in skips_across_gaps(cut).wide_spaces and k in skips_across_gaps(cut).counted
    assert skips_across_gaps(cut, in_void=frozenset({k})) == SkipsAcrossGaps()


def _shortened(body: Vertebra, keep: str) -> Vertebra:
    """``body`` with its outline cut to the half on the side ``keep`` ("top": the upper half)."""
    polygons = []
    for polygon in body.polygons:
        p = np.asarray(polygon, np.float64).copy()                # corners rt, rb, lb, lt
        middle_r, middle_l = (p[0] + p[1]) / 2, (p[3] + p[2]) / 2
        if keep == "top":
            p[1], p[2] = middle_r, middle_l
        else:
            p[0], p[3] = middle_r, middle_l
        polygons.append(p)
    return dataclasses.replace(body, polygons=polygons)


def _named_without_gap(chain: list[Vertebra]) -> list[Vertebra]:
    """``chain`` (top to bottom, down to S1) named as a labelling that counts no body missed would name it."""
    names = LEVELS[:len(chain)][::-1]
    return [dataclasses.replace(v, level=name) for v, name in zip(chain, names)]


def test_the_bodies_a_void_hides_above_s1_are_counted_from_the_way_across_it():
    """The labelling names the bodies above a void as if none were hidden; counted from the step across the
    void, those above it move up by the bodies it hides (one, two, or one with a body found in the void),
    those below keep their levels; a chain already counted, one without S1 below the void, and one with no
    void change nothing."""
    phantom = make_phantom(fov="lumbar", contrast="T2", shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9,
                           seed=3)
    truth = _truth(phantom)
    bodies = {v.level: v for v in truth}
    for hidden, void_over in ((("L5",), ("L4", "S1")), (("L4", "L5"), ("L4", "L5")), (("L5",), ("L4", "L5"))):
        scan = _with_void(phantom.scan, *(bodies[level] for level in void_over))
        seen = [v for v in truth if v.level not in hidden]
        counted = levels_counted_across_a_void(scan, _named_without_gap(seen))
        assert counted == ([v.level for v in seen], len(hidden)), hidden
        assert levels_counted_across_a_void(scan, seen) is None                  # counted already
        assert levels_counted_across_a_void(scan, _named_without_gap(seen)[:-1]) is None   # no S1 below
        assert levels_counted_across_a_void(phantom.scan, _named_without_gap(seen)) is None   # no void
    assert "hides 2 vertebrae, counted in the levels above it" in void_warning(void_along_chain(scan, seen), 2)


def test_a_run_counts_the_body_metal_hides_above_s1_and_says_so():
    """The whole run, with networks that see L4 where L5 lies hidden under metal (the oracle's detector
    misses L5, its context network names each body above S1 a level too low): the bodies above the void are
    counted on from S1, the labelling block keeps the levels before, and the void's reason says so."""
    from types import SimpleNamespace

    phantom = make_phantom(fov="lumbar", contrast="T2", shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9,
                           seed=3)
    truth = {v.level: v for v in _truth(phantom)}
    scan = _with_void(phantom.scan, truth["L4"], truth["S1"])
    seen = [v for v in phantom.vertebrae if not v.extra and v.level != "L5"]
    misnamed = [dataclasses.replace(v, level=w.level)
                for v, w in zip(seen, _named_without_gap([truth[v.level] for v in seen]))]
    result = pipeline.run(scan, oracle_networks(SimpleNamespace(scan=scan, vertebrae=misnamed)),
                          pipeline.RunOptions(grade=False))
    labelling = result.vertebrae_document["labelling"]
    assert [v.level for v in result.detection.vertebrae] == [v.level for v in seen]
    assert labelling["levels_counted_across_void"] == {"bodies_hidden": 1, "levels_before": [v.level for v in misnamed]}
    assert labelling["needs_review"] and "hides 1 vertebra, counted in the levels above it" in labelling["warnings"][0]


def test_a_run_over_metal_asks_for_review_and_says_where(monkeypatch):
    phantom = make_phantom(fov="lumbar", contrast="T2", shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9,
                           seed=5)
    truth = _truth(phantom)
    names = [v.level for v in truth]
    networks = oracle_networks(phantom)
    clean = pipeline.run(phantom.scan, networks, pipeline.RunOptions(grade=False))
    assert "signal_void" not in clean.vertebrae_document["labelling"]
    assert not any("signal void" in w for w in clean.warnings)
    scan = _with_void(phantom.scan, truth[names.index("L4")], truth[names.index("L5")])
    result = pipeline.run(scan, networks, pipeline.RunOptions(grade=False))
    document = result.vertebrae_document
    assert document["labelling"]["signal_void"]["between"] == ["L4", "L5"]
    assert result.labelling_confidence.needs_review
    assert document["warnings"][0].startswith("a signal void") and "between L4 and L5" in document["warnings"][0]
    json.dumps(document)


@pytest.mark.skipif(not (DATA / "chu" / "chu_02").is_dir(), reason="needs ../shared/data (chu/chu_02)")
def test_a_real_scan_asks_only_once_metal_hides_l4_and_l5():
    from SpineNetLib.inputs.load import load_scan

    scan = load_scan(DATA / "chu" / "chu_02" / "image.nii.gz")
    networks = pipeline.load_networks("bundled", "cpu", threads=2)
    clean = pipeline.run(scan, networks, pipeline.RunOptions(grade=False))
    assert "signal_void" not in clean.vertebrae_document["labelling"]
    bodies = {v.level: v for v in clean.detection.vertebrae}
    metal = pipeline.run(_with_void(scan, bodies["L4"], bodies["L5"]), networks, pipeline.RunOptions(grade=False))
    assert metal.labelling_confidence.needs_review
    assert metal.vertebrae_document["labelling"]["signal_void"]["length_mm"] >= VOID_MIN_MM
