"""A level corrected after review (outputs/documents.apply_level_correction): the documents become what a
run naming those levels writes."""

from __future__ import annotations

import dataclasses

import pytest

from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.core.results import Vertebra
from SpineNetLib.discs.extraction import extract_ivd_volumes
from SpineNetLib.discs.measurements import disc_height_warnings, measure_spine
from SpineNetLib.outputs import documents
from SpineNetLib.outputs.discs import discs_document
from SpineNetLib.synthetic.phantom import make_phantom


def _one_lower(level: str) -> str:
    order = [*LEVELS_TOP_DOWN, "S2"]   # S2: a corrected name, not a level the networks give
    return order[order.index(level) + 1]


def _discs_doc(scan, vertebrae) -> dict:
    ivds = extract_ivd_volumes(scan, vertebrae)
    return discs_document(scan, vertebrae, ivds, None, measure_spine(scan, vertebrae), {"status": "not run"})


def test_a_corrected_discs_document_is_what_a_run_naming_those_levels_writes():
    """The network named every body one level too low (T12 as L1, ..., S1 as S2); the reader corrects the
    top one. Every level-bound part of discs.json then equals the document of the same bodies named
    right: disc names, the vertebrae's measurements, and the lordosis between the real L1 and S1 (which
    the wrong names put on other bodies)."""
    phantom = make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.2, 1.2), n_slices=7, seed=1)
    right = [Vertebra(slices=list(v.slices), polygons=[v.quads[s] for s in v.slices], level=v.level)
             for v in phantom.vertebrae if not v.extra]
    wrong = [dataclasses.replace(v, level=_one_lower(v.level)) for v in right]
    scan = phantom.scan
    truth = _discs_doc(scan, right)
    named_wrong = _discs_doc(scan, wrong)
    vertebrae_doc = documents.vertebrae_document_from_truth(scan, [dataclasses.replace(t, level=_one_lower(t.level))
                                                                  for t in phantom.vertebrae if not t.extra])
    assert named_wrong["spine_measurements"]["lumbar_lordosis_deg"] != pytest.approx(
        truth["spine_measurements"]["lumbar_lordosis_deg"], abs=1.0)

    corrected_vertebrae, corrected = documents.apply_level_correction(vertebrae_doc, 0, right[0].level, named_wrong)
    assert [v["level"] for v in corrected_vertebrae["vertebrae"]] == [v.level for v in right]
    assert [d["level"] for d in corrected["discs"]] == [d["level"] for d in truth["discs"]]
    assert [d["measurements"] for d in corrected["discs"]] == [d["measurements"] for d in truth["discs"]]
    assert corrected["vertebrae_measurements"] == truth["vertebrae_measurements"]
    # the lordosis of the corrected document comes from the angles as written (3 decimals)
    assert corrected["spine_measurements"]["lumbar_lordosis_deg"] == pytest.approx(
        truth["spine_measurements"]["lumbar_lordosis_deg"], abs=0.011)
    assert corrected["spine_measurements"]["pixel_spacing_mm"] == [1.2, 1.2]
    # and correcting it back gives the document as it was, to the byte
    _, back = documents.apply_level_correction(corrected_vertebrae, 0, _one_lower(right[0].level), corrected)
    assert back == named_wrong


def test_the_thin_disc_line_follows_the_disc_above_s1_and_the_warnings_are_renamed():
    """The line "check S1's upper endplate" belongs to the disc above S1: when the levels move, it moves,
    in the disc's measurement_warnings and in the document's warnings; a missing disc's line is renamed."""
    levels = ["L2", "L3", "L5", "S1", "S2"]   # L4 missed: no disc between L3 and L5
    vertebrae_doc = {"schema": "spinenet.vertebrae/1", "vertebrae": [{"level": name, "polygons": []} for name in levels],
                     "labelling": {"confidence": 0.9, "needs_review": True, "warnings": ["levels may be shifted"]}}
    heights = {"L2-L3": (9.0, 9.0, 7.0), "L5-S1": (8.0, 7.0, 6.0), "S1-S2": (2.0, 4.0, 5.0)}
    discs = []
    for name, (a, m, p) in heights.items():
        upper = levels.index(name.split("-")[0])
        discs.append({"level": name, "upper_vertebra": upper, "lower_vertebra": upper + 1, "grades": {},
                      "measurements": {"disc_height_anterior_mm": a, "disc_height_middle_mm": m,
                                       "disc_height_posterior_mm": p, "disc_height_mean_mm": (a + m + p) / 3},
                      "measurement_warnings": disc_height_warnings(name, a, m, p, (a + m + p) / 3)})
    skipped = ("no disc between L3 and L5: the vertebra between them was not found, and a volume across a whole "
               "vertebra would not be a disc")
    discs_doc = {"schema": "spinenet.discs/1", "discs": discs, "grading": {"status": "not run"},
                 "vertebrae_measurements": [{"level": name, "index": k, "middle_height_mm": 25.0}
                                            for k, name in enumerate(levels)],
                 "spine_measurements": {"lumbar_lordosis_deg": None, "pixel_spacing_mm": [1.0, 1.0]},
                 "warnings": [skipped, "the grader reads T2-weighted scans"]}
    assert discs_doc["discs"][2]["measurement_warnings"] == []   # S1-S2: not the disc above S1
    _, corrected = documents.apply_level_correction(vertebrae_doc, 4, "S1", discs_doc)
    assert [d["level"] for d in corrected["discs"]] == ["L1-L2", "L4-L5", "L5-S1"]
    thin = corrected["discs"][2]["measurement_warnings"]
    assert len(thin) == 1 and thin[0].startswith("L5-S1 anterior disc height 2.0 mm is under 3 mm")
    assert corrected["warnings"] == [skipped.replace("L3 and L5", "L2 and L4"), "the grader reads T2-weighted scans",
                                     thin[0]]
    assert [r["level"] for r in corrected["vertebrae_measurements"]] == ["L1", "L2", "L4", "L5", "S1"]
    # back again: the line leaves with S1, and the document is the one it was
    _, back = documents.apply_level_correction(vertebrae_doc | {"vertebrae": [{"level": n} for n in
                                                                               ["L1", "L2", "L4", "L5", "S1"]]},
                                               4, "S2", corrected)
    assert back == discs_doc
