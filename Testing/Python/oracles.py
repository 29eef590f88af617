"""Stand-in networks rendered from phantom ground truth, for tests of everything around them.

``oracle_networks(phantom)`` returns a :class:`SpineNetLib.pipeline.Networks`
whose detector output is the exact VFR maps of the phantom's vertebrae
(``targets.oracle_predictor``), whose appearance net is uninformative and whose
context net puts the ground-truth level on the rows of each body.  The real
post-processing, labelling search and output code then run unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from SpineNetLib.core.levels import LEVELS
from SpineNetLib.pipeline import Networks
from SpineNetLib.training.targets import oracle_predictor
from SpineNetLib.weights.resolve import WeightSet


class UniformAppearance(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], len(LEVELS))


class GroundTruthContext(torch.nn.Module):
    """Logit 100 for the ground-truth level on the height-map rows each body spans."""

    def __init__(self, row_bands: list[tuple[int, int, int]]):
        super().__init__()
        self.row_bands = row_bands

    def forward(self, x):
        out = torch.zeros_like(x)
        for top, bottom, level in self.row_bands:
            out[..., max(top, 0):max(bottom, 0), level] = 100.0
        return out


def oracle_networks(phantom) -> Networks:
    quads_by_slice: dict[int, list] = {}
    bands = []
    row_mm = phantom.scan.spacing_mm[0]
    for v in phantom.vertebrae:
        if v.extra:
            continue
        for s, q in v.quads.items():
            quads_by_slice.setdefault(s, []).append(q)
        ys = np.concatenate([q[:, 1] for q in v.quads.values()])
        bands.append((int(ys.min() * row_mm), int(np.ceil(ys.max() * row_mm)), LEVELS.index(v.level)))
    quads = {s: np.stack(q) for s, q in quads_by_slice.items()}
    dummy = WeightSet(source="oracle", detector=None, appearance=None, context=None)
    return Networks(detector=None, appearance=UniformAppearance(), context=GroundTruthContext(bands),
                    device=torch.device("cpu"), weights=dummy, predictor=oracle_predictor(quads))


def ground_truth_centroid_ras(phantom, vertebra) -> np.ndarray:
    points = [phantom.scan.xy_to_ras(q.mean(axis=0), s)[0] for s, q in vertebra.quads.items()]
    return np.mean(points, axis=0)


def name_series_a_level_lower(monkeypatch, series_description: str, *, unsure: tuple[str, ...] = ()) -> None:
    """Make ``pipeline.detect_and_label`` name each vertebra of the series with this SeriesDescription (an
    image file: this file name) one level lower (L1 named L2, ...; the body at S1 left out), with the level
    probabilities moved along, so that the labelling is as sure of it as of the truth; the other series as
    before: an exam whose two series disagree. The labelling of each series described in ``unsure`` asks for
    a review of its own (its body named S1 may be L5)."""
    import dataclasses

    from SpineNetLib import pipeline
    from SpineNetLib.core.levels import LEVELS_TOP_DOWN

    label = pipeline.detect_and_label
    lower = {level: LEVELS_TOP_DOWN[n + 1] for n, level in enumerate(LEVELS_TOP_DOWN[:-1])}

    def labelled(scan, networks, **kwargs):
        result = label(scan, networks, **kwargs)
        described = scan.metadata.get("series_description") or Path(str(scan.metadata.get("source", ""))).name
        if described == series_description:   # LEVELS runs from S1 up: one level lower is one index down
            result.vertebrae = [dataclasses.replace(v, level=lower[v.level],
                                                    level_probabilities=np.roll(v.level_probabilities, -1))
                                for v in result.vertebrae if v.level in lower]
        if described in unsure:
            result.labelling["s1_may_be_l5"] = True
        return result

    monkeypatch.setattr(pipeline, "detect_and_label", labelled)
