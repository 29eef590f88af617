"""The slices the appearance network sees of each body: centred on a spine that runs off the middle of the
slab (label/appearance_slices.py), so that a lateral curve or a slab placed to one side of the spine shows
the network what a centred scan shows it."""

from __future__ import annotations

import numpy as np
import torch

from SpineNetLib.core.levels import N_LEVELS
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.label.appearance_slices import OFF_CENTRE_MM, appearance_slice_runs, spine_centres
from SpineNetLib.label.labelling import LabellingParams, label_vertebrae


def body(first: int, last: int, top: float = 0.0) -> Vertebra:
    quad = np.array([[80.0, top + 29], [80.0, top + 29], [40.0, top + 29], [40.0, top]])
    return Vertebra(slices=list(range(first, last + 1)), polygons=[quad] * (last - first + 1))


def test_a_spine_in_the_middle_of_the_slab_is_seen_on_every_slice():
    chain = [body(2, 14), body(1, 15), body(3, 13), body(0, 16)]     # 17 slices of 4 mm, middle 8
    assert appearance_slice_runs(chain, 17, 4.0) == [None] * 4
    # up to OFF_CENTRE_MM (two 4 mm slices) off the middle: still every slice
    assert appearance_slice_runs([body(4, 16)] * 3, 17, 4.0) == [None] * 3
    assert appearance_slice_runs([body(5, 16)] * 3, 17, 4.0) != [None] * 3


def test_a_spine_off_the_middle_is_seen_on_the_slices_centred_on_it():
    # 17 slices of 4 mm; every body's run has its middle at slice 11, 12 mm from the middle (slice 8):
    # each is seen on the 11 slices 6..16, as many on each side of slice 11 as the scan has on the nearer side
    assert appearance_slice_runs([body(6, 16)] * 5, 17, 4.0) == [(6, 16)] * 5
    assert appearance_slice_runs([body(0, 10)] * 5, 17, 4.0) == [(0, 10)] * 5
    # a middle between two slices gives an even run, symmetric about it
    assert appearance_slice_runs([body(7, 16)] * 5, 17, 4.0) == [(7, 16)] * 5
    # the distance is in millimetres: the same offset of 3 slices of 2 mm is 6 mm, within OFF_CENTRE_MM
    assert 3 * 2.0 <= OFF_CENTRE_MM < 3 * 4.0
    assert appearance_slice_runs([body(6, 16)] * 5, 17, 2.0) == [None] * 5


def test_one_body_found_to_one_side_does_not_move_its_slices():
    """S1 is often found on a few slices to one side only: the spine's place is the running median
    over two bodies on each side, so its slices stay those of the bodies above it."""
    chain = [body(2, 14), body(2, 14), body(3, 13), body(2, 14), body(11, 16)]
    np.testing.assert_array_equal(spine_centres(chain), [8, 8, 8, 8, 8])
    assert appearance_slice_runs(chain, 17, 4.0) == [None] * 5


def test_a_curved_spine_is_followed_body_by_body():
    # a lateral curve: the middles of the bodies' runs go 8, 9, 11, 12, 12, 11, 9 (slices of 4 mm; the slab's
    # middle is slice 8); the spine's place, their running median over five: 9, 10, 11, 11, 11, 11.5, 11
    chain = [body(2, 14), body(3, 15), body(6, 16), body(8, 16), body(8, 16), body(6, 16), body(3, 15)]
    np.testing.assert_array_equal(spine_centres(chain), [9, 10, 11, 11, 11, 11.5, 11])
    assert appearance_slice_runs(chain, 17, 4.0) == [None, None, (6, 16), (6, 16), (6, 16), (7, 16), (6, 16)]


def test_one_or_two_slices_are_always_seen_whole():
    assert appearance_slice_runs([body(0, 0)] * 3, 1, 4.0) == [None] * 3
    assert appearance_slice_runs([body(1, 1)] * 3, 2, 4.0) == [None] * 3


class Recorder(torch.nn.Module):
    """Stand-in appearance net: keeps every volume it is shown and calls each body by its row."""

    def __init__(self):
        super().__init__()
        self.volumes: list[np.ndarray] = []

    def forward(self, x):
        self.volumes.extend(v[0].numpy().copy() for v in x)
        logits = torch.zeros((len(x), N_LEVELS))
        logits[torch.arange(len(x)), torch.arange(len(x)) + 14] = 60.0       # L1, L2, ... in call order
        return logits


class Context(torch.nn.Module):
    """Stand-in context net: echoes the height map, scaled."""

    def forward(self, x):
        return 50.0 * x


def scan_of(voxels: np.ndarray) -> Scan:
    """A scan of these voxels, slices 4 mm apart."""
    return Scan(voxels=voxels, spacing_mm=(1.0, 1.0, 4.0), canonical_to_ras=np.eye(4), input_ijk_to_ras=np.eye(4),
                input_shape_ijk=voxels.shape[::-1], canonical_to_input_ijk=np.eye(4), input_slice_axis=0)


def test_a_slab_wider_on_one_side_shows_the_network_what_the_centred_scan_shows():
    """The same spine in a slab that holds 10 more slices on one side (the spine 20 mm off its middle):
    with the slices centred, the appearance network sees exactly the volumes of the centred scan, and the
    levels are the same; without (the official way) it sees other volumes."""
    rng = np.random.default_rng(0)
    centred = rng.uniform(10, 20, (260, 120, 9)).astype(np.float32)
    chain = []
    for k in range(6):
        top = 20 + 40 * k
        centred[top:top + 30, 40:80, 1:8] += 100.0 + 10 * np.arange(7)     # not the same on every slice
        quad = np.array([[80.0, top], [80.0, top + 29], [40.0, top + 29], [40.0, top]])
        chain.append(Vertebra(slices=list(range(1, 8)), polygons=[quad] * 7))
    wider = np.concatenate([centred, rng.uniform(10, 20, (260, 120, 10)).astype(np.float32)], axis=2)

    context = Context()
    seen_centred, seen_wider, seen_official = Recorder(), Recorder(), Recorder()
    a = label_vertebrae(scan_of(centred), chain, seen_centred, context)
    b = label_vertebrae(scan_of(wider), chain, seen_wider, context)
    label_vertebrae(scan_of(wider), chain, seen_official, context, LabellingParams(centre_appearance_slices=False))
    assert [v.appearance_slices for v in a] == [None] * 6
    assert [v.appearance_slices for v in b] == [(0, 8)] * 6
    assert [v.level for v in a] == [v.level for v in b]
    for x, y, z in zip(seen_centred.volumes, seen_wider.volumes, seen_official.volumes):
        np.testing.assert_array_equal(x, y)
        assert not np.allclose(x, z)


def test_labelling_again_runs_the_network_again_on_a_body_whose_slices_moved():
    """Bodies added below move where the spine lies at the bodies next to them: a body labelled before is run
    again where it is now seen on other slices, so labelling again gives what a full labelling gives."""
    voxels = np.random.default_rng(1).uniform(10, 200, (260, 120, 17)).astype(np.float32)
    scan = scan_of(voxels)
    upper = [body(6, 16, top=20), body(6, 16, top=60)]                      # middles 11: off the middle (8)
    lower = [body(2, 14, top=100), body(2, 14, top=140), body(2, 14, top=180)]   # middles 8

    first = label_vertebrae(scan, upper, Recorder(), Context())
    assert [v.appearance_slices for v in first] == [(6, 16), (6, 16)]
    again_net = Recorder()
    again = label_vertebrae(scan, upper + lower, again_net, Context(), labelled_before=first)
    # the second body's spine is now the median of 11, 11, 8, 8: 9.5, within 8 mm of the middle
    assert [v.appearance_slices for v in again] == [(6, 16), None, None, None, None]
    assert len(again_net.volumes) == 4                                      # the second body and the three new
    full_net = Recorder()
    label_vertebrae(scan, upper + lower, full_net, Context())
    np.testing.assert_array_equal(again_net.volumes[0], full_net.volumes[1])


def test_vertebrae_json_names_the_input_slices_the_network_saw():
    """``vertebrae.json`` records, per vertebra, the user's own slices the appearance network saw where they
    were centred on the spine (null where it saw every slice), counted as the polygons' ``slice`` is: on a
    1 mm volume averaged into 4 mm slabs, every thin slice of the slabs seen."""
    from SpineNetLib.core.results import DetectionResult
    from SpineNetLib.inputs.canonical import scan_from_array
    from SpineNetLib.outputs.vertebrae import vertebrae_document

    thin = scan_from_array(np.zeros((260, 120, 68), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    assert thin.voxels.shape[2] == 17 and thin.metadata["resampled"]["slices_per_slab"] == 4
    chain = [body(6, 16, top=20), body(2, 14, top=60)]
    chain[0].appearance_slices = (6, 16)
    document = vertebrae_document(thin, DetectionResult(vertebrae=chain))
    first, second = document["vertebrae"]
    assert second["appearance_slices"] is None
    slabs = sorted({p["slice"] for p in first["polygons"]})      # the body was found on slabs 6..16: all seen
    assert first["appearance_slices"] == [slabs[0], slabs[-1]] and slabs[-1] - slabs[0] + 1 == 11 * 4
    chain[0].appearance_slices = (6, 8)
    # canonical slices run right to left, the input's i axis left to right: slab t holds input slices
    # 64 - 4t .. 67 - 4t, so slabs 6..8 hold 32..43
    assert vertebrae_document(thin, DetectionResult(vertebrae=chain))["vertebrae"][0]["appearance_slices"] == [32, 43]


def test_the_warnings_name_the_vertebrae_seen_on_centred_slices_without_asking_for_a_review():
    """Whoever reads only the warnings learns where the slab lies unevenly about the spine; the note is no
    review reason of its own, and a spine seen whole on every slice gets none."""
    from SpineNetLib.core.levels import level_index
    from SpineNetLib.label.appearance_slices import off_middle_note
    from SpineNetLib.label.confidence import ask_for_review_where_in_doubt, confidence_of_vertebrae

    names = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    chain = []
    for k, name in enumerate(names):
        vertebra = body(2, 14, top=20 + 40 * k)
        vertebra.level = name
        vertebra.level_probabilities = np.full(N_LEVELS, 0.001)
        vertebra.level_probabilities[level_index(name)] = 1.0
        chain.append(vertebra)
    scan = scan_of(np.zeros((400, 120, 17), np.float32))
    quiet = confidence_of_vertebrae(chain)
    ask_for_review_where_in_doubt(scan, chain, {}, quiet)
    assert off_middle_note(chain) is None and not any("off the middle" in w for w in quiet.warnings)

    for name in ("L2", "L3", "S1"):
        chain[names.index(name)].appearance_slices = (6, 16)
    note = off_middle_note(chain)
    assert "off the middle of the slab at L2-L3, S1 " in note
    confidence = confidence_of_vertebrae(chain)
    assert not confidence.needs_review
    ask_for_review_where_in_doubt(scan, chain, {}, confidence)
    assert note in confidence.warnings and not confidence.needs_review
