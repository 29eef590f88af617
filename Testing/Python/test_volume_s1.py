"""S1 pseudo-labels of the training volumes (``training/volume_s1.py``): taken only when every check holds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from SpineNetLib.core.results import Vertebra
from SpineNetLib.training.datasets import default_data_root
from SpineNetLib.training.volume_s1 import checked_s1, read_volume_s1_targets

LEVELS = ("L3", "L4", "L5", "S1")
DATA = default_data_root()


def _body(level: str, centre_y: float, height: float = 20.0) -> Vertebra:
    x0, y0 = 100.0, centre_y - height / 2
    quad = np.array([[x0 + 30, y0], [x0 + 30, y0 + height], [x0, y0 + height], [x0, y0]])
    return Vertebra(slices=[3, 4], polygons=[quad, quad + 0.5], level=level)


def _chain(levels=LEVELS, step=30.0, first=100.0):
    return [_body(level, first + k * step) for k, level in enumerate(levels)]


def _annotated(chain, levels=("L3", "L4", "L5")):
    return {v.level: v.centroid_xy + np.array([1.0, -1.0]) for v in chain if v.level in levels}


def test_a_chain_named_right_gives_its_s1_outline():
    chain = _chain()
    s1 = checked_s1(chain, _annotated(chain), (400, 300), (1.0, 1.0))
    assert s1 is not None
    np.testing.assert_allclose(s1, chain[-1].average_polygon)


def test_a_chain_shifted_by_one_level_gives_nothing():
    chain = _chain()
    shifted = [Vertebra(v.slices, v.polygons, level=name) for v, name in zip(chain, ("L4", "L5", "S1", "S2"))]
    assert checked_s1(shifted, _annotated(chain), (400, 300), (1.0, 1.0)) is None


def test_an_annotated_body_far_from_every_labelled_one_gives_nothing():
    chain = _chain()
    annotated = _annotated(chain)
    annotated["L3"] = annotated["L3"] + np.array([0.0, 12.0])   # 12 mm from the labelled L3's centre at 1 mm pixels
    assert checked_s1(chain, annotated, (400, 300), (1.0, 1.0)) is None
    # the same offset is 6 mm at 0.5 mm pixels: matched
    assert checked_s1(chain, annotated, (400, 300), (0.5, 0.5)) is not None


def test_no_s1_or_an_s1_not_right_below_l5_gives_nothing():
    chain = _chain()
    assert checked_s1(chain[:-1], _annotated(chain), (400, 300), (1.0, 1.0)) is None
    gap = chain[:2] + [_body("S1", 190.0)]   # S1 right below L4, no L5 between
    assert checked_s1(gap, {"L3": chain[0].centroid_xy, "L4": chain[1].centroid_xy}, (400, 300), (1.0, 1.0)) is None


def test_an_s1_at_the_lower_image_edge_is_left_out():
    chain = _chain()   # S1 spans rows 180-200, height 20 (its second slice 0.5 lower)
    assert checked_s1(chain, _annotated(chain), (211, 300), (1.0, 1.0)) is not None    # 10.75 rows below it
    assert checked_s1(chain, _annotated(chain), (209, 300), (1.0, 1.0)) is None        # 8.75 rows: under half its height


def test_the_targets_file_reads_back_and_a_bad_one_is_a_one_line_error(tmp_path):
    from SpineNetLib.core.errors import InputError

    path = tmp_path / "s1.json"
    quad = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]
    path.write_text(json.dumps({"chu_04": {"S1": quad}}))
    read = read_volume_s1_targets(path)   # the flat file of before 2026-12-05
    np.testing.assert_array_equal(read["chu_04"]["S1"], np.array(quad))
    path.write_text(json.dumps({"made_by": {"code_sha256": "0" * 64}, "cases": {"chu_04": {"S1": quad}}}))
    np.testing.assert_array_equal(read_volume_s1_targets(path)["chu_04"]["S1"], np.array(quad))
    path.write_text("{not json")
    with pytest.raises(InputError, match="cannot read volume S1 targets"):
        read_volume_s1_targets(path)


@pytest.mark.skipif(not (DATA / "chu" / "chu_04").is_dir(), reason="../shared/data (real MRI) is not present")
def test_pseudo_labelled_s1_joins_the_real_bodies_of_its_case():
    """The appearance trainer's real bodies gain the checked S1 of a volume, in that volume's scan."""
    from SpineNetLib.core.levels import level_index
    from SpineNetLib.training import datasets
    from SpineNetLib.training.labelling import real_bodies

    case = next(c for c in datasets.list_cases(DATA, sources=("chu",)) if c.case_id == "chu_04")
    quad = np.array([[230.0, 300.0], [240.0, 330.0], [200.0, 340.0], [190.0, 310.0]])
    scans: list = []
    plain = real_bodies([case], scans)
    scans_with: list = []
    with_s1 = real_bodies([case], scans_with, pseudo_labelled={"chu_04": {"S1": quad}, "chu_99": {"S1": quad}})
    assert len(with_s1) == len(plain) + 1
    added = with_s1[-1]
    assert added.level == level_index("S1") and added.scan_index == 0
    np.testing.assert_array_equal(added.polygon, quad)
    # an annotated level is never replaced by a pseudo-label
    again = real_bodies([case], [], pseudo_labelled={"chu_04": {"L5": quad}})
    assert len(again) == len(plain)


@pytest.mark.skipif(not (DATA / "chu" / "chu_04").is_dir(), reason="../shared/data (real MRI) is not present")
def test_a_training_volume_named_right_by_the_bundled_networks_gives_its_s1(tmp_path):
    """chu_04 (training side): T11-L5 outlined, S1 visible below L5 with the sacrum in view."""
    from SpineNetLib.pipeline import load_networks
    from SpineNetLib.training import datasets
    from SpineNetLib.training.volume_s1 import make_volume_s1_targets

    case = next(c for c in datasets.list_cases(DATA, sources=("chu",)) if c.case_id == "chu_04")
    lines: list[str] = []
    targets = make_volume_s1_targets([case], load_networks("bundled", device="cpu"), tmp_path / "s1.json",
                                     log=lines.append)
    assert list(targets) == ["chu_04"] and lines[0].startswith("chu_04: S1 taken")
    s1 = read_volume_s1_targets(tmp_path / "s1.json")["chu_04"]["S1"]
    made_by = json.loads((tmp_path / "s1.json").read_text())["made_by"]   # the code that made the file
    assert len(made_by["code_sha256"]) == 64
    _, thick, data = datasets.case_scans(case)
    rows, cols, _ = np.nonzero(data.labels == 24)   # L5
    assert s1[:, 1].mean() > rows.mean()            # below L5
    assert abs(s1[:, 0].mean() - cols.mean()) < 40  # in the spine's column
