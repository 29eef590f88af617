"""The ``official`` profile gives the official package's outputs (issue 11, item 4).

The expected outputs in ``data/official_conformance.json`` were computed by the official package
itself (spinenet 2.1.4, ``benchmarks/official/make_conformance.py``) on the seeded inputs of
``official_conformance.py``; neither the package nor the official weights are needed here.  Any
drift in our detection decoding, grouping, appearance crops, height map, beam search or disc
volumes fails one of these tests.  Limits: identical slice sets and corners within 0.5 px;
volumes within 1e-4 of their range (at 400 seeded voxels, and their sums); probabilities within
1e-4; identical labels and disc names.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from official_conformance import FIXTURE, conformance_cases, label_networks, sample_positions
from SpineNetLib import pipeline
from SpineNetLib.core.results import Vertebra
from SpineNetLib.detect import vfr
from SpineNetLib.discs.extraction import extract_ivd_volumes
from SpineNetLib.label import labelling
from SpineNetLib.weights.checkpoints import load_model
from SpineNetLib.weights.resolve import resolve_weights

PROFILE = pipeline.PROFILES["official"]
CASES = ("square_tilted", "anisotropic")


@pytest.fixture(scope="module")
def expected():
    return json.loads(FIXTURE.read_text())["cases"]


@pytest.fixture(scope="module")
def scans():
    return conformance_cases()


@pytest.fixture(scope="module")
def networks():
    return label_networks(with_grading=False)


def _official_vertebrae(case: dict) -> list[Vertebra]:
    return [Vertebra(list(v["slice_nos"]), [np.asarray(p, float) for p in v["polys"]]) for v in case["detected"]]


def _labelled(scan, case, networks):
    params = pipeline.profiled_labelling_params(networks["context"], None, PROFILE)
    return params, labelling.label_vertebrae(scan, _official_vertebrae(case), networks["appearance"],
                                             networks["context"], params)


def _assert_volumes_match(ours: np.ndarray, expected: list[dict]) -> None:
    assert len(ours) == len(expected)
    positions = sample_positions(ours.shape[1:])
    for volume, want in zip(ours, expected):
        tolerance = 1e-4 * max(want["range"], 1e-12)
        np.testing.assert_allclose(volume[positions], want["samples"], rtol=0, atol=tolerance)
        assert abs(float(volume.astype(np.float64).sum()) - want["sum"]) <= tolerance * volume.size


@pytest.mark.parametrize("name", CASES)
def test_detection_gives_the_official_vertebrae(name, scans, expected):
    scan = scans[name]
    predict = vfr.network_predictor(load_model("detector", resolve_weights("bundled").path("detector")))
    found = vfr.detect_vertebrae(scan, predict, pipeline.profiled_detection_params(None, PROFILE)).vertebrae
    want = expected[name]["detected"]
    assert len(found) == len(want) >= 5
    for ours, theirs in zip(found, want):
        assert ours.slices == theirs["slice_nos"]
        np.testing.assert_allclose(np.stack(ours.polygons), np.asarray(theirs["polys"]), rtol=0, atol=0.5)


@pytest.mark.parametrize("name", CASES)
def test_appearance_volumes_are_the_official_crops(name, scans, expected, networks):
    scan, case = scans[name], expected[name]
    params = pipeline.profiled_labelling_params(networks["context"], None, PROFILE)
    ordered = sorted(_official_vertebrae(case), key=lambda v: float(np.mean(v.average_polygon[:, 1])))
    volumes = np.stack([labelling.extract_vertebra_volume(scan, v, params) for v in ordered])
    _assert_volumes_match(volumes, case["appearance_volumes"])


@pytest.mark.parametrize("name", CASES)
def test_labelling_gives_the_official_probabilities_and_levels(name, scans, expected, networks):
    _, labelled = _labelled(scans[name], expected[name], networks)
    case = expected[name]
    assert [v.level for v in labelled] == case["labels"]
    np.testing.assert_allclose(np.stack([v.appearance_probabilities for v in labelled]),
                               case["appearance_probabilities"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.stack([v.level_probabilities for v in labelled]),
                               case["context_probabilities"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_disc_volumes_are_the_official_ones(name, scans, expected, networks):
    scan, case = scans[name], expected[name]
    _, labelled = _labelled(scan, case, networks)
    ivds = extract_ivd_volumes(scan, labelled, across_missed_levels=PROFILE.discs_across_missed_levels,
                               official_arithmetic=PROFILE.official_disc_volumes)
    assert [d.level for d in ivds] == case["ivd_names"]
    _assert_volumes_match(np.stack([d.volume for d in ivds]), case["ivd_volumes"])
