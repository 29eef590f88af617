"""Synthetic spine phantom (SpineNetLib.synthetic.phantom): exact ground truth, layouts, pathologies, contrasts, I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from SpineNetLib.synthetic import phantom as P
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.core.polygons import point_in_polygon

_CACHE: dict[str, P.Phantom] = {}


def ph(**kw) -> P.Phantom:
    """Phantoms are deterministic: build each parameter set once per test session."""
    key = repr(sorted(kw.items()))
    if key not in _CACHE:
        _CACHE[key] = P.make_phantom(**kw)
    return _CACHE[key]


CLEAN = dict(noise=0.0, bias_field=0.0, texture=0.0)
#: Only vertebral-body tissues light up: the rendered body is a uniform 1000 region.
BODY_ONLY = {t: 0.0 for t in P.TISSUE_TABLE}
BODY_ONLY.update(cortex=1000.0, marrow=1000.0, marrow_c=1000.0, vein=1000.0)


def mm(ph_: P.Phantom, xy) -> np.ndarray:
    """Canonical pixel (x, y) -> millimetres (x * col_mm, y * row_mm)."""
    rmm, cmm = ph_.scan.spacing_mm[:2]
    return np.asarray(xy, float) * [cmm, rmm]


def edge_mid(q, i):
    return 0.5 * (q[i] + q[(i + 1) % 4])


# ----------------------------------------------------------------------------- levels and order


@pytest.mark.parametrize("fov, must, first, last", [
    ("lumbar", ["T12", "L1", "L2", "L3", "L4", "L5", "S1"], None, "S1"),
    ("cervical", ["C2", "C3", "C4", "C5", "C6", "C7", "T1"], "C2", None),
    ("thoracic", [f"T{k}" for k in range(1, 13)], None, None),
    ("whole", list(LEVELS_TOP_DOWN), "C2", "S1"),
])
def test_levels_per_fov(fov, must, first, last):
    p = ph(fov=fov)
    levels = p.levels
    assert set(must) <= set(levels)
    if first:
        assert levels[0] == first
    if last:
        assert levels[-1] == last
    if fov == "whole":
        assert levels == list(LEVELS_TOP_DOWN) and len(p.discs) == 23
    # contiguous, top to bottom, discs between consecutive levels
    idx = [LEVELS_TOP_DOWN.index(v) for v in levels]
    assert idx == list(range(idx[0], idx[0] + len(idx)))
    ys = [v.centroid_xy[1] for v in p.vertebrae]
    assert np.all(np.diff(ys) > 0)
    assert [d.name for d in p.discs] == [f"{a}-{b}" for a, b in zip(levels[:-1], levels[1:])]
    assert p.vertebra(levels[0]).level == levels[0]
    with pytest.raises(KeyError):
        p.vertebra("S2")


def test_default_grids_and_slices():
    p = ph()
    assert p.scan.shape == (512, 512, 15)
    assert p.scan.spacing_mm == pytest.approx((0.6, 0.6, 4.0))
    assert ph(fov="whole").scan.shape == (1024, 512, 15)
    for v in p.vertebrae:
        assert v.slices == sorted(v.quads) and len(v.slices) >= 2
        assert v.mid_slice == 7                         # midline on the centre slice
        assert v.slices == list(range(min(v.slices), max(v.slices) + 1))
        # visibility rule: |x| / half_width < VISIBLE_FRACTION
        hw = P.BODY_TABLE[v.level][3]
        expect = [s for s in range(15) if abs((s - 7) * 4.0) / hw < P.VISIBLE_FRACTION]
        assert v.slices == expect
    # L4 (half-width 23 mm) is visible on 11 slices (+-20 mm), C4 (9 mm) on 5 (+-8 mm)
    assert len(p.vertebra("L4").slices) == 11
    assert len(ph(fov="cervical").vertebra("C4").slices) == 5


def test_partial_fov_levels():
    p = ph(top_level="T12", bottom_level="S1", n_slices=5)
    assert p.levels == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    p = ph(fov="whole", top_level="T4", bottom_level="T9", n_slices=5)
    assert p.levels == ["T4", "T5", "T6", "T7", "T8", "T9"]


# ----------------------------------------------------------------------------- exactness of the GT quads


@pytest.mark.parametrize("kw", [
    dict(),
    dict(pixel_spacing=(0.5, 0.8), rotation_deg=15.0, n_slices=9),
    dict(fov="cervical", contrast="T1", rotation_deg=-12.0, n_slices=7),
])
def test_gt_edges_are_the_rendered_body_edges(kw):
    """With only bone lit (uniform 1000), the 50 % contour crosses every GT edge midpoint on the GT line."""
    p = ph(**CLEAN, intensity_overrides=BODY_ONLY, **kw)
    rmm, cmm = p.scan.spacing_mm[:2]
    worst = 0.0
    for v in p.vertebrae:
        for s, q in v.quads.items():
            img = p.scan.voxels[..., s]
            for i in range(4):
                a, b = q[i], q[(i + 1) % 4]
                d = mm(p, b - a)
                d /= np.linalg.norm(d)
                nrm = np.array([d[1], -d[0]])
                if nrm @ mm(p, edge_mid(q, i) - v.centroid_xy) < 0:
                    nrm = -nrm                          # outward, in mm
                t = np.arange(-1.5, 1.5, 0.005)        # mm along the outward normal
                pts = edge_mid(q, i)[None] + t[:, None] * (nrm / [cmm, rmm])[None]
                prof = ndimage.map_coordinates(img, [pts[:, 1], pts[:, 0]], order=1)
                assert prof[0] > 900 and prof[-1] < 100, (v.level, s, i)
                cross = np.flatnonzero((prof[:-1] - 500) * (prof[1:] - 500) <= 0)
                worst = max(worst, float(np.min(np.abs(t[cross]))))
    assert worst < 0.1 * min(rmm, cmm) + 0.03       # GT edge = rendered edge to ~0.1 pixel


def test_body_differs_from_disc_across_edges_and_centroids_inside():
    for contrast in ("T2", "T1"):
        p = ph(contrast=contrast, **CLEAN)
        for v in p.vertebrae:
            for s, q in v.quads.items():
                assert point_in_polygon(v.centroid_xy, q)
                np.testing.assert_allclose(q.mean(axis=0), v.centroid_xy, atol=1e-9)
                img = p.scan.voxels[..., s]
                # top and bottom edges (endplates): cortex/marrow inside, disc outside
                for i, j in ((3, 1), (1, 3)):
                    m = edge_mid(q, i)
                    inward = edge_mid(q, j) - m
                    inward = inward / np.linalg.norm(inward)
                    def at(d):
                        return ndimage.map_coordinates(img, [[m[1] + d * inward[1]], [m[0] + d * inward[0]]],
                                                       order=1)[0]
                    outside = at(-1.5)                  # disc, 1.5 px outside the GT edge
                    inside = max(at(0.8), at(3.0), key=lambda val: abs(val - outside))   # cortex or marrow
                    assert abs(inside - outside) > 80, (contrast, v.level, s, i, inside, outside)


# ----------------------------------------------------------------------------- geometry


def test_rotation_rotates_gt_about_the_image_centre():
    a = ph(n_slices=5)
    b = ph(n_slices=5, rotation_deg=20.0)
    h, w = a.scan.shape[:2]
    c = mm(a, [(w - 1) / 2.0, (h - 1) / 2.0])
    th = math.radians(20.0)
    rot = np.array([[math.cos(th), math.sin(th)], [-math.sin(th), math.cos(th)]])  # CCW as displayed (y down)
    common = [lv for lv in a.levels if lv in b.levels]
    assert len(common) >= 6
    for lv in common:
        va, vb = a.vertebra(lv), b.vertebra(lv)
        assert va.slices == vb.slices
        for s in va.slices:
            expect = (mm(a, va.quads[s]) - c) @ rot.T + c
            np.testing.assert_allclose(mm(b, vb.quads[s]), expect, atol=1e-6)
        qa, qb = va.quads[va.mid_slice], vb.quads[vb.mid_slice]
        ang = [math.atan2(q[0, 1] - q[3, 1], q[0, 0] - q[3, 0]) for q in (qa, qb)]
        assert math.degrees(ang[1] - ang[0]) == pytest.approx(-20.0, abs=1e-6)


def test_anisotropic_pixels_keep_physical_sizes():
    iso = ph(n_slices=5)
    ani = ph(n_slices=5, pixel_spacing=(0.5, 0.8))
    assert ani.scan.spacing_mm[:2] == pytest.approx((0.5, 0.8))
    assert ani.scan.shape[:2] == (614, 384)             # same physical field of view
    for p in (iso, ani):
        c = mm(p, p.vertebra("L3").centroid_xy)
        for v in p.vertebrae:
            q = mm(p, v.quads[v.mid_slice])
            height = np.linalg.norm(0.5 * (q[1] + q[2]) - 0.5 * (q[0] + q[3]))
            assert height == pytest.approx(P.BODY_TABLE[v.level][0], abs=0.5)
            assert height == pytest.approx(v.height_mm, abs=1e-6)
            depth_top = np.linalg.norm(q[0] - q[3])
            assert depth_top == pytest.approx(P.BODY_TABLE[v.level][1], abs=1e-6)
            v.rel = q - c                               # physical, relative to L3
    for lv in iso.levels:
        np.testing.assert_allclose(iso.vertebra(lv).rel, ani.vertebra(lv).rel, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(reverse_slices=True), dict(orientation="ras"),
                                dict(orientation="ras", reverse_slices=True)])
def test_input_layouts_give_the_same_canonical_scan(kw):
    base = ph(n_slices=6)
    other = ph(n_slices=6, **kw)
    assert np.array_equal(base.scan.voxels, other.scan.voxels)
    np.testing.assert_allclose(base.scan.canonical_to_ras, other.scan.canonical_to_ras, atol=1e-9)
    assert base.levels == other.levels
    for a, b in zip(base.vertebrae, other.vertebrae):
        assert a.slices == b.slices
        for s in a.slices:
            np.testing.assert_array_equal(a.quads[s], b.quads[s])
    # the input array really is laid out as documented
    for p in (base, other):
        sc = p.scan
        rng = np.random.default_rng(0)
        for _ in range(20):
            r, c, s = (int(rng.integers(n)) for n in sc.shape)
            i, j, k, _ = np.rint(sc.canonical_to_input_ijk @ [r, c, s, 1]).astype(int)
            assert p.voxels_kji[k, j, i] == sc.voxels[r, c, s]
        np.testing.assert_allclose(p.ijk_to_ras, sc.input_ijk_to_ras)
    a = base.ijk_to_ras
    assert base.voxels_kji.shape == (6, 512, 512)        # dicom: [k=slice, j=row, i=col]
    assert a[1, 0] < 0 and a[2, 1] < 0 and a[0, 2] < 0   # i -> P, j -> I, k -> L (R->L)
    if kw == dict(reverse_slices=True):
        assert other.ijk_to_ras[0, 2] > 0                 # k runs L->R
    if kw.get("orientation") == "ras":
        b = other.ijk_to_ras
        assert other.voxels_kji.shape == (512, 512, 6)    # [k=I->S, j=P->A, i=slices]
        assert b[2, 2] > 0 and b[1, 1] > 0 and (b[0, 0] > 0) != bool(kw.get("reverse_slices"))


def test_deterministic_and_seeded():
    a = P.make_phantom(n_slices=3, seed=5)
    b = P.make_phantom(n_slices=3, seed=5)
    c = P.make_phantom(n_slices=3, seed=6)
    assert np.array_equal(a.voxels_kji, b.voxels_kji)
    assert not np.array_equal(a.voxels_kji, c.voxels_kji)
    for va, vc in zip(a.vertebrae, c.vertebrae):          # textbook geometry does not depend on the seed
        np.testing.assert_array_equal(va.quads[1], vc.quads[1])
    d = P.make_phantom(n_slices=3, seed=6, variability=1.0)
    assert not np.allclose(d.vertebra("L3").quads[1], c.vertebra("L3").quads[1])
    v = a.scan.voxels
    assert v.dtype == np.float32 and np.array_equal(v, np.rint(v)) and 0 <= v.min() and v.max() <= 4095


# ----------------------------------------------------------------------------- pathology


def _disc_heights_mm(p, upper, lower):
    u, lo = p.vertebra(upper), p.vertebra(lower)
    s = u.mid_slice
    qu, ql = mm(p, u.quads[s]), mm(p, lo.quads[s])
    return np.linalg.norm(ql[3] - qu[2]), np.linalg.norm(ql[0] - qu[1])


def test_narrow_disc_halves_its_height():
    base = ph(n_slices=3)
    path = ph(n_slices=3, pathology={"L4-L5": ["narrow_disc"]})
    d0, d1 = base.disc("L4-L5"), path.disc("L4-L5")
    assert d1.pathology == ["narrow_disc"]
    assert d1.anterior_height_mm == pytest.approx(0.5 * d0.anterior_height_mm)
    assert d1.posterior_height_mm == pytest.approx(0.5 * d0.posterior_height_mm)
    ha0, hp0 = _disc_heights_mm(base, "L4", "L5")
    ha1, hp1 = _disc_heights_mm(path, "L4", "L5")
    assert ha1 == pytest.approx(0.5 * ha0, abs=0.05) and hp1 == pytest.approx(0.5 * hp0, abs=0.05)
    assert ha0 == pytest.approx(P.DISC_TABLE["L4-L5"][0], abs=0.05)
    # the other discs are untouched
    assert _disc_heights_mm(path, "L3", "L4") == pytest.approx(_disc_heights_mm(base, "L3", "L4"), abs=1e-6)


def test_slip_moves_the_upper_body_forward():
    def offset(p):
        u, lo = p.vertebra("L4"), p.vertebra("L5")
        qu, ql = mm(p, u.quads[u.mid_slice]), mm(p, lo.quads[lo.mid_slice])
        e = (qu[1] - qu[2]) / np.linalg.norm(qu[1] - qu[2]) + (ql[0] - ql[3]) / np.linalg.norm(ql[0] - ql[3])
        e /= np.linalg.norm(e)                               # posterior along the disc
        return float((ql[0] - qu[1]) @ e)                    # lower.rt relative to upper.rb
    base = ph(n_slices=3)
    for key in ("L4", "L4-L5"):
        p = ph(n_slices=3, pathology={key: ["slip"]})
        assert offset(p) - offset(base) == pytest.approx(P.SLIP_MM, abs=0.02)
        assert "slip" in p.vertebra("L4").pathology and "slip" in p.disc("L4-L5").pathology


def test_wedge_fracture_reduces_anterior_height():
    base = ph(n_slices=3)
    p = ph(n_slices=3, pathology={"L1": ["wedge_fracture"]})
    q0 = mm(base, base.vertebra("L1").quads[1])
    q1 = mm(p, p.vertebra("L1").quads[1])
    ant0, ant1 = np.linalg.norm(q0[3] - q0[2]), np.linalg.norm(q1[3] - q1[2])
    post0, post1 = np.linalg.norm(q0[0] - q0[1]), np.linalg.norm(q1[0] - q1[1])
    assert ant1 == pytest.approx(P.WEDGE_FRACTURE_FACTOR * ant0, abs=0.1)
    assert post1 == pytest.approx(post0, abs=0.1)
    v = p.vertebra("L1")
    assert v.pathology == ["wedge_fracture"]
    assert v.anterior_height_mm == pytest.approx(P.WEDGE_FRACTURE_FACTOR * base.vertebra("L1").anterior_height_mm)


def test_endplate_notch_and_dark_disc():
    kw = dict(n_slices=5, **CLEAN)
    base = ph(**kw)
    p = ph(pathology={"L3": ["endplate_notch"], "L4-L5": ["dark_disc", "endplate_notch"]}, **kw)
    assert [(les["level"], les["endplate"]) for les in p.lesions] == [("L3", "superior"), ("L4", "inferior")]
    for les in p.lesions:
        v = p.vertebra(les["level"])
        assert les["type"] == "endplate_notch"
        assert les["slices"] == [1, 2, 3] and set(les["boxes"]) == {1, 2, 3}   # |x| < 5 mm
        x0, y0, x1, y1 = les["box_xy"]
        s = v.mid_slice
        q = v.quads[s]
        # the box straddles the endplate, lies within the body's AP extent and is darker than the marrow
        edge_y = edge_mid(q, 3)[1] if les["endplate"] == "superior" else edge_mid(q, 1)[1]
        assert y0 - 1 < edge_y < y1 + 1
        assert q[:, 0].min() < x0 < x1 < q[:, 0].max()
        bx0, by0, bx1, by1 = les["boxes"][s]
        cx, cy = int(round(0.5 * (bx0 + bx1))), int(round(0.5 * (by0 + by1)))
        assert p.scan.voxels[cy, cx, s] < 0.5 * base.scan.voxels[cy, cx, s]
    # dark (desiccated) disc: the nucleus loses its T2 signal
    c = np.rint(p.disc("L4-L5").centre_xy).astype(int)
    s = p.disc("L4-L5").mid_slice
    assert p.scan.voxels[c[1], c[0], s] < 0.5 * base.scan.voxels[c[1], c[0], s]
    assert "dark_disc" in p.disc("L4-L5").pathology


def test_transitional_anatomy():
    lum = ph(n_slices=3, transitional="lumbarised_S1", include_s2=True)
    assert lum.levels[-2:] == ["S1", "S2"] and lum.vertebra("S2").extra
    assert not lum.vertebra("S1").extra
    d = lum.disc("S1-S2")
    assert d.anterior_height_mm > 8                          # a real disc below a lumbar-like S1
    sac = ph(n_slices=3, transitional="sacralised_L5")
    d = sac.disc("L5-S1")
    assert "transitional" in d.pathology and d.anterior_height_mm < 5
    normal = ph(n_slices=3, include_s2=True)
    assert normal.levels[-1] == "S2" and normal.disc("S1-S2").anterior_height_mm < 3


# ----------------------------------------------------------------------------- contrast


def _sample(p, xy, s, r=1):
    x, y = int(round(xy[0])), int(round(xy[1]))
    return float(p.scan.voxels[y - r:y + r + 1, x - r:x + r + 1, s].mean())


def test_contrasts_differ_as_documented():
    out = {}
    for c in P.CONTRASTS:
        p = ph(contrast=c, n_slices=3, **CLEAN)
        v = p.vertebra("L3")
        q = v.quads[1]
        marrow = _sample(p, v.centroid_xy + [-4, 0], 1)
        post = edge_mid(q, 0)
        e = (q[0] - q[3]) / np.linalg.norm(q[0] - q[3])
        csf = _sample(p, post + e * (7.0 / p.scan.spacing_mm[1]), 1)   # 7 mm behind the body: dural sac
        nucleus = _sample(p, p.disc("L3-L4").centre_xy, 1)
        out[c] = (marrow, csf, nucleus)
    (m1, c1, n1), (m2, c2, n2), (ms, cs, ns) = out["T1"], out["T2"], out["STIR"]
    assert c2 > 2 * m2 and c1 < 0.5 * m1            # CSF bright on T2, dark on T1
    assert n2 > 1.5 * m2 and n1 < m1                # nucleus bright on T2, darker than marrow on T1
    assert ms < 0.5 * m2 and cs > 5 * ms            # STIR: fatty marrow suppressed, fluid bright
    assert m1 > m2                                   # marrow brighter on T1 than on T2


def test_noise_and_bias_are_applied():
    clean = ph(n_slices=3, **CLEAN)
    noisy = ph(n_slices=3)
    air = clean.scan.voxels[:20, -20:, 1]
    assert air.max() == 0
    noisy_air = noisy.scan.voxels[:20, -20:, 1]
    assert 10 < noisy_air.mean() < 60                # Rayleigh background, sigma 25
    assert 100 < np.percentile(noisy.scan.voxels, 99) < 2000


# ----------------------------------------------------------------------------- rasteriser


def test_polygon_coverage_area_and_orientation():
    poly = np.array([[10.3, 5.2], [40.7, 12.9], [33.1, 41.4], [8.9, 30.05], [20.0, 20.0]])
    r0, c0, cov = P.polygon_coverage(poly, (64, 64), ss=8)
    x, y = poly[:, 0], poly[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert cov.sum() == pytest.approx(area, rel=2e-3)
    r0b, c0b, covb = P.polygon_coverage(poly[::-1], (64, 64), ss=8)
    assert (r0, c0) == (r0b, c0b) and np.allclose(cov, covb)
    assert P.polygon_coverage(poly + 200, (64, 64)) is None
    # a pixel-aligned square is covered exactly
    r0, c0, cov = P.polygon_coverage(np.array([[1.5, 1.5], [4.5, 1.5], [4.5, 3.5], [1.5, 3.5]]), (8, 8))
    full = np.zeros((8, 8))
    full[r0:r0 + cov.shape[0], c0:c0 + cov.shape[1]] = cov
    expect = np.zeros((8, 8))
    expect[2:4, 2:5] = 1.0
    np.testing.assert_allclose(full, expect, atol=1e-6)


# ----------------------------------------------------------------------------- I/O and validation


def test_write_dicom_and_nifti_round_trip(tmp_path):
    from SpineNetLib.inputs.load import load_scan

    p = ph(n_slices=4, shape=(160, 128), fov="lumbar", pixel_spacing=(1.9, 2.4))
    files = p.write_dicom(tmp_path / "dcm")
    assert len(files) == 4 and all(f.suffix == ".dcm" for f in files)
    back = load_scan(tmp_path / "dcm")
    assert np.array_equal(back.voxels, p.scan.voxels)
    np.testing.assert_allclose(back.canonical_to_ras, p.scan.canonical_to_ras, atol=1e-4)
    for kw in (dict(orientation="ras"), dict(reverse_slices=True)):
        q = ph(n_slices=4, shape=(160, 128), pixel_spacing=(1.9, 2.4), **kw)
        path = q.write_nifti(tmp_path / f"ph_{len(kw)}_{q.params.orientation}.nii.gz")
        back = load_scan(path)
        assert np.array_equal(back.voxels, q.scan.voxels)
        np.testing.assert_allclose(back.canonical_to_ras, q.scan.canonical_to_ras, atol=1e-4)


@pytest.mark.parametrize("kw, msg", [
    (dict(fov="knee"), "unknown fov"),
    (dict(contrast="PD"), "unknown contrast"),
    (dict(orientation="lps"), "unknown orientation"),
    (dict(pathology={"L9": ["slip"]}), "unknown level"),
    (dict(pathology={"L4-L6": ["narrow_disc"]}), "unknown disc"),
    (dict(pathology={"L4": ["narrow_disc"]}), "applies to a disc"),
    (dict(pathology={"L4": ["melted"]}), "unknown pathology"),
    (dict(n_slices=1), "n_slices"),
    (dict(top_level="L5", bottom_level="L1"), "lies below"),
    (dict(transitional="L6"), "transitional"),
    (dict(colour="red"), "unknown phantom parameter"),
    (dict(intensity_overrides={"bone": 3}), "unknown tissue"),
])
def test_bad_parameters_raise_one_line_input_error(kw, msg):
    with pytest.raises(InputError, match=msg) as exc:
        P.make_phantom(**kw)
    assert "\n" not in str(exc.value)
