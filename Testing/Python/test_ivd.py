"""Disc volumes for grading (SpineNetLib.discs.extraction): geometry, straightening, intensity, pairing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from SpineNetLib.discs.extraction import (
    COVERAGE,
    IVD_SHAPE,
    canonical_points,
    disc_pairs,
    extract_ivd_volumes,
    sample_to_ras,
)
from SpineNetLib.synthetic.phantom import TISSUE_TABLE, make_phantom
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan


def gt_vertebrae(phantom, drop=()) -> list[Vertebra]:
    return [Vertebra(slices=list(v.slices), polygons=[np.asarray(v.quads[s], float) for s in v.slices],
                     level=v.level)
            for v in phantom.vertebrae if not v.extra and v.level not in drop]


def clean_phantom(rotation_deg: float):
    # Anisotropic pixels, piecewise-constant tissues: geometry and intensities are exact.
    return make_phantom(fov="lumbar", shape=(300, 240), pixel_spacing=(1.0, 1.3), n_slices=9,
                        rotation_deg=rotation_deg, texture=0, noise=0, bias_field=0)


@pytest.fixture(scope="module")
def phantoms():
    out = {}
    for rotation in (0.0, 20.0):
        p = clean_phantom(rotation)
        out[rotation] = (p, extract_ivd_volumes(p.scan, gt_vertebrae(p)))
    return out


def volume_index_of(ivd, xy, canonical_slice) -> np.ndarray:
    """(slice, row, col) of canonical in-slice points, through the inverse of sample_to_canonical."""
    xy = np.asarray(xy, float).reshape(-1, 2)
    can = np.c_[xy[:, 1], xy[:, 0], np.full(len(xy), float(canonical_slice)), np.ones(len(xy))]
    return (can @ np.linalg.inv(ivd.sample_to_canonical).T)[:, :3]


def test_one_volume_per_disc_top_to_bottom_with_the_grading_shape(phantoms):
    phantom, ivds = phantoms[20.0]
    assert [d.level for d in ivds] == [d.name for d in phantom.discs]
    for k, d in enumerate(ivds):
        assert (d.upper_index, d.lower_index) == (k, k + 1)
        assert d.volume.shape == IVD_SHAPE == (9, 112, 224) and d.volume.dtype == np.float32
        assert 0.0 <= d.volume.min() and d.volume.max() <= 1.0
        assert d.mid_slice == phantom.disc(d.level).mid_slice
        assert d.sample_to_canonical.shape == (4, 4)


@pytest.mark.parametrize("rotation", [0.0, 20.0])
def test_disc_is_centred_and_its_upper_endplate_horizontal(phantoms, rotation):
    phantom, ivds = phantoms[rotation]
    for ivd in ivds:
        gt = phantom.disc(ivd.level)
        up, lo = phantom.vertebra(gt.upper), phantom.vertebra(gt.lower)
        s = ivd.mid_slice
        # Disc quad [upper.rb, lower.rt, lower.lt, upper.lb] in volume indices.
        quad = volume_index_of(ivd, [up.quads[s][1], lo.quads[s][0], lo.quads[s][3], up.quads[s][2]], s)
        assert np.allclose(quad[:, 0], 4.0)                       # the disc's own slice is the middle one
        assert abs(quad[0, 1] - quad[3, 1]) < 0.05                # upper endplate horizontal
        assert quad[3, 2] < quad[0, 2]                            # anterior on the left
        assert quad[0, 1] < quad[1, 1] and quad[3, 1] < quad[2, 1]  # head at the top: upper body above
        # The disc box is centred; its AP width is half the crop (2:1 crop of ~2x the disc width).
        assert abs(0.5 * (quad[:, 2].min() + quad[:, 2].max()) - 111.5) < 0.05
        assert abs(0.5 * (quad[:, 1].min() + quad[:, 1].max()) - 55.5) < 0.05
        assert abs(np.ptp(quad[:, 2]) - 224 / (2 * COVERAGE)) < 0.05


@pytest.mark.parametrize("rotation", [0.0, 20.0])
def test_image_content_is_straightened_and_the_nucleus_centred(phantoms, rotation):
    phantom, ivds = phantoms[rotation]
    ivd = next(d for d in ivds if d.level == "L4-L5")
    up, lo = phantom.vertebra("L4"), phantom.vertebra("L5")
    s = ivd.mid_slice
    quad = volume_index_of(ivd, [up.quads[s][1], lo.quads[s][0], lo.quads[s][3], up.quads[s][2]], s)
    plane = ivd.volume[4]
    # The dark cortex of the upper endplate lies on one row across the disc's central 60 %.
    c0, c1 = quad[3, 2], quad[0, 2]
    cols = np.arange(int(c0 + 0.2 * (c1 - c0)), int(c1 - 0.2 * (c1 - c0)))
    edge_row = quad[0, 1]
    rows = np.array([np.argmin(plane[int(edge_row) - 8:int(edge_row) + 8, c]) for c in cols]) + int(edge_row) - 8
    assert np.ptp(rows) <= 2 and abs(rows.mean() - edge_row) < 1.5
    # The bright nucleus is centred between the two endplates at the middle column.
    profile = plane[:, 100:124].mean(axis=1)
    bright = np.flatnonzero(profile > 0.4)
    lower_row_mid = np.interp(111.5, [quad[2, 2], quad[1, 2]], [quad[2, 1], quad[1, 1]])
    assert abs(0.5 * (bright.min() + bright.max()) - 0.5 * (edge_row + lower_row_mid)) < 2.0


def test_rotating_the_patient_does_not_change_the_volume(phantoms):
    a = {d.level: d.volume for d in phantoms[0.0][1]}
    b = {d.level: d.volume for d in phantoms[20.0][1]}
    for level in a:
        assert np.abs(a[level] - b[level]).mean() < 0.015, level


def test_adjacent_body_median_maps_to_a_quarter(phantoms):
    phantom, ivds = phantoms[20.0]
    marrow = TISSUE_TABLE["marrow"][0][1]  # T2 marrow intensity
    for ivd in ivds:
        if "S1" in ivd.level:  # S1 is drawn as flat sacral bone, not marrow
            continue
        assert ivd.reference_intensity == pytest.approx(marrow, rel=1e-6)
        body_rows = ivd.volume[4, 2:20, 90:134]  # upper body, above the disc
        assert np.median(body_rows) == pytest.approx(0.25, abs=1e-3)
    # Scaling the scan's intensities changes nothing (normalisation by the bodies' median).
    scaled = dataclasses.replace(phantom.scan, voxels=phantom.scan.voxels * 3.0)
    again = extract_ivd_volumes(scaled, gt_vertebrae(phantom))
    for x, y in zip(ivds, again):
        assert y.reference_intensity == pytest.approx(3 * x.reference_intensity)
        assert np.allclose(x.volume, y.volume, atol=1e-6)


def smooth_scan() -> Scan:
    """A smooth analytic image on anisotropic pixels (rows 0.8 mm, cols 1.1 mm, 6 slices)."""
    h, w, s = 160, 120, 6
    rr, cc, ss = np.meshgrid(np.arange(h), np.arange(w), np.arange(s), indexing="ij")
    voxels = analytic(rr, cc, ss).astype(np.float32)
    c2r = np.array([[0, 0, -3.0, 0], [0, -1.1, 0, 0], [-0.8, 0, 0, 0], [0, 0, 0, 1.0]])
    return Scan(voxels=voxels, spacing_mm=(0.8, 1.1, 3.0), canonical_to_ras=c2r, input_ijk_to_ras=c2r,
                input_shape_ijk=(s, w, h), canonical_to_input_ijk=np.eye(4), input_slice_axis=0)


def analytic(row, col, sl):
    return 1000.0 + 200.0 * np.sin(row / 23.0) * np.cos(col / 19.0) + 30.0 * sl


def rectangle(cx, cy, half_w, half_h, angle_deg):
    """rt, rb, lb, lt of a rotated rectangle (pixels), posterior = +x, inferior = +y."""
    a = np.radians(angle_deg)
    ex, ey = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    c = np.array([cx, cy])
    return np.array([c + half_w * ex - half_h * ey, c + half_w * ex + half_h * ey,
                     c - half_w * ex + half_h * ey, c - half_w * ex - half_h * ey])


def test_every_voxel_is_the_scan_sampled_where_sample_to_canonical_says():
    scan = smooth_scan()
    upper = Vertebra(slices=[0, 1, 2], polygons=[rectangle(60, 50, 16, 12, 12)] * 3, level="L3")
    lower = Vertebra(slices=[0, 1, 2], polygons=[rectangle(62, 85, 16, 12, 8)] * 3, level="L4")
    (ivd,) = extract_ivd_volumes(scan, [upper, lower])
    assert ivd.level == "L3-L4" and ivd.mid_slice == 1
    # Volume slices 0..2 lie before canonical slice 0 (zeros), 3..8 are canonical 0..5.
    assert np.array_equal(ivd.sample_to_canonical[2], [1.0, 0.0, 0.0, -3.0])
    assert not ivd.volume[:3].any() and ivd.volume[3:].any()
    s, r, c = np.meshgrid(np.arange(3, 9), np.arange(0, 112, 7), np.arange(0, 224, 9), indexing="ij")
    points = canonical_points(ivd, np.stack([s.ravel(), r.ravel(), c.ravel()], axis=1))
    inside = ((points[:, 0] > 2) & (points[:, 0] < 157) & (points[:, 1] > 2) & (points[:, 1] < 117))
    expected = analytic(points[:, 0], points[:, 1], points[:, 2]) / ivd.reference_intensity * 0.5 / 2.0
    got = ivd.volume[s.ravel(), r.ravel(), c.ravel()]
    assert inside.sum() > 1000
    assert np.abs(got[inside] - expected[inside]).max() < 2e-3
    # Slices run right -> left like the canonical scan: intensity grows by 30 per slice.
    assert np.all(np.diff(ivd.volume[3:, 56, 112]) > 0)
    # RAS mapping composes the canonical one.
    assert np.allclose(sample_to_ras(scan, ivd), scan.canonical_to_ras @ ivd.sample_to_canonical)


def test_pairs_skip_missing_levels_and_name_unlabelled_bodies():
    phantom = clean_phantom(0.0)
    without_l4 = gt_vertebrae(phantom, drop=("L4",))
    names = [name for _, _, name in disc_pairs(without_l4)]
    assert names == ["T12-L1", "L1-L2", "L2-L3", "L5-S1"]
    assert [d.level for d in extract_ivd_volumes(phantom.scan, without_l4)] == names
    unlabelled = gt_vertebrae(phantom)[:3]
    for v in unlabelled:
        v.level = None
    assert [d.level for d in extract_ivd_volumes(phantom.scan, unlabelled)] == ["V1-V2", "V2-V3"]
    assert extract_ivd_volumes(phantom.scan, unlabelled[:1]) == []
