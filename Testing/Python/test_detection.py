"""Detection stage: polygon geometry, VFR targets, patching and post-processing.

The post-processing is driven by an "oracle" predictor that renders the
ground-truth maps of each patch (SpineNetLib.training.targets.oracle_predictor), so
everything except the network itself is tested end to end: patch planning,
extraction, decoding of corners/centroids, quad assembly, the missing-corner
rule, grouping across slices and sorting.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from SpineNetLib.detect import vfr as D
from SpineNetLib.core import polygons as P
from SpineNetLib.training import targets as T
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan

# ----------------------------------------------------------------------------- helpers


def _scan(voxels: np.ndarray, spacing_rc=(1.0, 1.0), slice_mm=4.0) -> Scan:
    geom = np.diag([spacing_rc[0], spacing_rc[1], slice_mm, 1.0])
    h, w, s = voxels.shape
    return Scan(voxels=voxels.astype(np.float32), spacing_mm=(spacing_rc[0], spacing_rc[1], slice_mm),
                canonical_to_ras=geom, input_ijk_to_ras=geom, input_shape_ijk=(h, w, s),
                canonical_to_input_ijk=np.eye(4), input_slice_axis=2)


def _synthetic_spine(shape=(512, 512), spacing=(0.6, 0.6), n_slices=7, rotation_deg=0.0,
                     center_x_px=None, body_mm=(40.0, 25.0), disc_mm=8.0, top_mm=20.0,
                     seed=0, parallelogram=False):
    """Hand-made ground truth: a column of slightly irregular quads, rotated about the image centre.

    Returns (scan, quads_by_slice {s: (N,4,2)}, truth [(slices, {s: quad})]).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    sr, sc = spacing
    cx_mm = (w / 2 if center_x_px is None else center_x_px) * sc
    centre = np.array([w * sc / 2, h * sr / 2])
    a = np.radians(rotation_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    quads: dict[int, list] = {s: [] for s in range(n_slices)}
    truth = []
    y = top_mm
    while y + body_mm[1] < h * sr - 10:
        bw = body_mm[0] + rng.uniform(-3, 3)
        bh = body_mm[1] + rng.uniform(-2, 2)
        base = np.array([[bw / 2, -bh / 2], [bw / 2, bh / 2], [-bw / 2, bh / 2], [-bw / 2, -bh / 2]])
        if parallelogram:
            base[:, 0] += 0.15 * base[:, 1]
        base = base + [cx_mm, y + bh / 2]
        base = (base - centre) @ rot.T + centre
        y += bh + disc_mm
        px = base / np.array([sc, sr])
        if px.min() < 3 or px[:, 0].max() > w - 4 or px[:, 1].max() > h - 4:
            continue  # keep bodies wholly inside the image
        first = int(rng.integers(0, 2))
        last = int(rng.integers(n_slices - 2, n_slices))
        per = {}
        for s in range(first, last + 1):
            jitter = 0.0 if parallelogram else rng.normal(0, 0.4, (4, 2))
            q = (base + jitter) / np.array([sc, sr])  # mm -> pixels [x, y]
            quads[s].append(q)
            per[s] = q
        truth.append((list(range(first, last + 1)), per))
    vox = rng.normal(300, 30, (h, w, n_slices))
    return (_scan(vox, spacing), {s: np.array(v).reshape(-1, 4, 2) for s, v in quads.items()}, truth)


def _match(result_vertebrae, truth):
    """Pair each ground-truth vertebra with the detection nearest to its centroid (one-to-one)."""
    assert len(result_vertebrae) == len(truth)
    pairs, used = [], set()
    for slices, per in truth:
        c = np.mean([q.mean(axis=0) for q in per.values()], axis=0)
        j = int(np.argmin([np.linalg.norm(v.centroid_xy - c) for v in result_vertebrae]))
        assert j not in used
        used.add(j)
        pairs.append((result_vertebrae[j], slices, per))
    return pairs


def _assert_recovered(result, truth, tol_px):
    for v, slices, per in _match(result.vertebrae, truth):
        assert v.slices == slices
        for s in slices:
            err = np.abs(v.polygon_on(s) - per[s]).max()
            assert err < tol_px, (s, err)
    ys = [v.centroid_xy[1] for v in result.vertebrae]
    assert ys == sorted(ys)


def _crosses_seam(truth, boxes) -> bool:
    edges_x = {b.x0 for b in boxes if b.x0 > 0} | {b.x1 - 1 for b in boxes}
    edges_y = {b.y0 for b in boxes if b.y0 > 0} | {b.y1 - 1 for b in boxes}
    for _, per in truth:
        for q in per.values():
            lo, hi = q.min(axis=0), q.max(axis=0)
            if any(lo[0] < e < hi[0] for e in edges_x) or any(lo[1] < e < hi[1] for e in edges_y):
                return True
    return False


# ----------------------------------------------------------------------------- polygons

UNIT = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], float)          # rt, rb, lb, lt (image coords)
L_SHAPE = np.array([[0, 0], [2, 0], [2, 1], [1, 1], [1, 2], [0, 2]], float)
DART = np.array([[0, 0], [4, 2], [0, 4], [1, 2]], float)          # concave quad, reflex at (1, 2)


def test_areas_and_orientation():
    assert P.signed_area(UNIT) == pytest.approx(1.0)            # official order is positive
    assert P.signed_area(UNIT[::-1]) == pytest.approx(-1.0)
    assert P.area(L_SHAPE) == pytest.approx(3.0)
    assert P.area(DART) == pytest.approx(6.0)                   # 8 (big triangle) - 2 (notch)


def test_neighbouring_vertices_are_np_rolls_exact_values():
    """The shoelace sum on the next vertices gives np.roll's bit-exact area (the decoding's thresholds
    compare areas, so a faster shift must not move a single one)."""
    rng = np.random.default_rng(2)
    for n in (3, 4, 6, 11):
        poly = rng.random((n, 2)) * 400
        np.testing.assert_array_equal(P._following(poly), np.roll(poly, -1, axis=0))
        np.testing.assert_array_equal(P._preceding(poly), np.roll(poly, 1, axis=0))
        np.testing.assert_array_equal(P._following(poly[:, 1]), np.roll(poly[:, 1], -1))
        x, y = poly[:, 0], poly[:, 1]
        assert P.signed_area(poly) == 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def test_validity():
    assert P.is_valid_polygon(UNIT) and P.is_valid_polygon(DART) and P.is_valid_polygon(L_SHAPE)
    assert not P.is_valid_polygon(np.array([[0, 0], [1, 1], [1, 0], [0, 1]], float))  # bow tie
    assert not P.is_valid_polygon(np.array([[0, 0], [1, 0], [2, 0], [3, 0]], float))  # zero area
    assert not P.is_valid_polygon(np.array([[0, 0], [1, 0], [1, 0], [0, 1]], float))  # repeated vertex
    assert not P.is_valid_polygon(np.array([[0, 0], [2, 0], [1, 0], [1, 1]], float))  # folds back
    assert not P.is_valid_polygon(np.array([[0, 0], [np.nan, 0], [1, 1], [0, 1]], float))
    assert P.is_convex(UNIT) and not P.is_convex(DART) and not P.is_convex(L_SHAPE)


def test_point_in_polygon():
    inside = P.points_in_polygon([[0.5, 0.5], [2, 2], [1.5, 0.5], [1.5, 1.5], [0.5, 1.5]], L_SHAPE)
    assert inside.tolist() == [True, False, True, False, True]
    assert P.point_in_polygon([1.5, 2], DART) and P.point_in_polygon([3.9, 2], DART)
    assert not P.point_in_polygon([0.5, 2], DART) and not P.point_in_polygon([0.9, 2.0], DART)  # notch


def test_intersection_and_iou_hand_values():
    shifted = UNIT + [0.5, 0.0]
    assert P.intersection_area(UNIT, shifted) == pytest.approx(0.5)
    assert P.iou(UNIT, shifted) == pytest.approx(1 / 3)
    # Square [-1,1]^2 against the diamond |x|+|y| <= 1.5: 4 - 4 * 0.125 = 3.5; IoU 3.5 / 5.
    square = np.array([[1, -1], [1, 1], [-1, 1], [-1, -1]], float)
    diamond = np.array([[1.5, 0], [0, 1.5], [-1.5, 0], [0, -1.5]], float)
    assert P.intersection_area(square, diamond) == pytest.approx(3.5)
    assert P.iou(square, diamond) == pytest.approx(0.7)
    # Two concave L shapes (triangulation path): 0.75 + 0.25 + 0.25.
    assert P.intersection_area(L_SHAPE, L_SHAPE + 0.5) == pytest.approx(1.25)
    assert P.intersection_area(L_SHAPE[::-1], L_SHAPE + 0.5) == pytest.approx(1.25)
    assert P.iou(L_SHAPE, L_SHAPE + 0.5) == pytest.approx(1.25 / 4.75)
    # Concave subject clipped by a convex one: the dart's notch is excluded.
    box = np.array([[2, 0], [2, 4], [0, 4], [0, 0]], float)
    # dart ∩ {x <= 2}: triangle (0,0),(2,1),(2,3),(0,4) minus notch triangle (0,0),(1,2),(0,4) = 6 - 2
    assert P.intersection_area(DART, box) == pytest.approx(4.0)
    assert P.intersection_area(box, DART) == pytest.approx(4.0)
    assert P.iou(UNIT, UNIT + 5) == 0.0
    assert P.iou(DART, DART) == pytest.approx(1.0)
    # the regions made once for many comparisons (grouping across slices) give iou's very value,
    # also for a quad that crosses itself (measured by its convex hull)
    bow_tie = np.array([[0, 0], [2, 2], [2, 0], [0, 2]], float)
    for a, b in ((UNIT, shifted), (square, diamond), (L_SHAPE, L_SHAPE + 0.5), (DART, box), (bow_tie, UNIT),
                 (UNIT, UNIT + 5)):
        assert P.iou_of_regions(P.region(a), P.region(b)) == P.iou(a, b)
    assert P.iou(bow_tie, UNIT) == pytest.approx(0.25)


def test_intersection_of_two_concave_quads_matches_rasterisation():
    a = DART * 10
    b = np.array([[40, 10], [0, 20], [40, 30], [30, 20]], float)  # mirrored dart, reflex at (30, 20)
    g = np.mgrid[0:40:0.05, 0:40:0.05].reshape(2, -1).T[:, ::-1] + 0.025
    raster = np.count_nonzero(P.points_in_polygon(g, a) & P.points_in_polygon(g, b)) * 0.05 ** 2
    assert P.intersection_area(a, b) == pytest.approx(raster, rel=5e-3)


def test_internal_angles():
    assert np.allclose(P.internal_angles(UNIT), 90)
    trap = np.array([[3, 0], [4, 1], [0, 1], [1, 0]], float)  # isosceles trapezoid
    assert np.allclose(P.internal_angles(trap), [135, 45, 45, 135])
    assert np.allclose(P.internal_angles(trap[::-1]), [135, 45, 45, 135])
    ang = P.internal_angles(DART)
    assert ang.sum() == pytest.approx(360)
    assert ang[3] > 180 and ang[1] == pytest.approx(2 * np.degrees(np.arctan(0.5)))


# ----------------------------------------------------------------------------- targets


def _components(channel, thr=0.6):
    return ndimage.label(channel > thr)


def test_render_vfr_maps_peaks_components_and_vectors():
    # A lumbar-like column and a cervical-like one with thin discs, in one frame.
    lumbar = [np.array([[x + 34, y], [x + 34, y + 22], [x, y + 22], [x, y]], float)
              for x, y in [(20.3, 10.6), (21.1, 40.2), (22.7, 70.5)]]
    cerv = [np.array([[x + 12, y], [x + 12, y + 10], [x, y + 10], [x, y]], float)
            for x, y in [(120.4, 30.2), (120.9, 43.7), (121.5, 57.1), (122.2, 70.6)]]
    quads = np.array(lumbar + cerv)
    maps = T.render_vfr_maps(quads, (128, 160))
    assert maps.shape == (13, 128, 160) and maps.dtype == np.float32
    centroids = quads.mean(axis=1)
    for ch in range(5):
        pts = quads[:, ch] if ch < 4 else centroids
        lab, n = _components(maps[ch])
        assert n == len(quads), ch
        near = np.rint(pts).astype(int)
        ids = lab[near[:, 1], near[:, 0]]
        assert sorted(ids.tolist()) == list(range(1, n + 1))  # one component per point, containing it
        assert maps[ch].max() <= 1.0
    for k in range(4):
        near = np.rint(quads[:, k]).astype(int)
        dx = maps[5 + k][near[:, 1], near[:, 0]]
        dy = maps[9 + k][near[:, 1], near[:, 0]]
        assert np.allclose(dx, centroids[:, 0] - quads[:, k, 0], atol=1e-4)
        assert np.allclose(dy, centroids[:, 1] - quads[:, k, 1], atol=1e-4)
    # Exact integer corner: peak exactly 1; a larger body gives a wider blob.
    m = T.render_vfr_maps(np.array([[[30, 10], [30, 30], [10, 30], [10, 10]]], float), (40, 40))
    assert m[0, 10, 30] == pytest.approx(1.0)
    big = T.render_vfr_maps(np.array([[[60, 10], [60, 50], [10, 50], [10, 10]]], float), (70, 70))
    assert np.count_nonzero(big[0] > 0.6) > np.count_nonzero(m[0] > 0.6)
    # The vector field is confined to a neighbourhood of the corner (radius 0.25 * sqrt(area) = 5).
    assert np.count_nonzero(m[5]) == np.count_nonzero(m[9]) > 0
    yy, xx = np.nonzero(m[5])
    assert np.hypot(xx - 30, yy - 10).max() <= 5.0


def test_render_vfr_maps_options():
    q = np.array([[[30, 10], [30, 30], [10, 30], [10, 10]]], float)
    c = np.array([[25.0, 15.0]])
    m = T.render_vfr_maps(q, (40, 40), centroids=c)
    assert m[4, 15, 25] == pytest.approx(1.0)
    assert m[5, 10, 30] == pytest.approx(-5.0) and m[9, 10, 30] == pytest.approx(5.0)
    m2 = T.render_vfr_maps(q, (40, 40), corner_present=[[True, False, True, True]])
    assert m2[1].max() == 0 and m2[6].max() == 0 and m2[10].max() == 0 and m2[0].max() == 1
    assert not T.render_vfr_maps(np.zeros((0, 4, 2)), (8, 8)).any()


# ----------------------------------------------------------------------------- patches


def _assert_cover(boxes, h, w, spacing):
    cover = np.zeros((h, w), int)
    for b in boxes:
        assert 0 <= b.y0 and b.y1 <= h and 0 <= b.x0 and b.x1 <= w
        cover[b.y0:b.y1, b.x0:b.x1] += 1
    assert cover.min() >= 1
    assert len({(b.y0, b.x0, b.height_px, b.width_px) for b in boxes}) == len(boxes)
    assert max(b.y1 for b in boxes) == h and max(b.x1 for b in boxes) == w
    sizes = {(b.height_px, b.width_px) for b in boxes}
    assert len(sizes) == 1
    bh, bw = sizes.pop()
    return bh * spacing[0], bw * spacing[1]


@pytest.mark.parametrize("spacing, stride, size_px, starts", [
    ((0.6, 0.6), 0.8, 433, [0, 79]),
    ((1.2, 1.2), 0.8, 216, [0, 172, 296]),          # the default stride: int(0.8 x 216) = 172
    ((1.2, 1.2), 0.6, 216, [0, 129, 258, 296]),     # the official one: int(0.6 x 216) = 129
])
def test_plan_patches_square_pixels(spacing, stride, size_px, starts):
    boxes = D.plan_patches((512, 512), spacing, D.DetectionParams(stride_fraction=stride), slice_index=3)
    assert all(b.slice_index == 3 for b in boxes)
    assert sorted({b.y0 for b in boxes}) == starts and sorted({b.x0 for b in boxes}) == starts
    assert len(boxes) == len(starts) ** 2
    assert {b.height_px for b in boxes} == {size_px} == {b.width_px for b in boxes}
    mm_h, mm_w = _assert_cover(boxes, 512, 512, spacing)
    assert 260 - spacing[0] < mm_h <= 260 and 260 - spacing[1] < mm_w <= 260
    # Official order: across outer, down inner.
    assert [(b.x0, b.y0) for b in boxes] == [(x, y) for x in starts for y in starts]


def test_plan_patches_anisotropic_and_small_images():
    boxes = D.plan_patches((800, 500), (0.4, 0.7), D.DetectionParams())
    mm_h, mm_w = _assert_cover(boxes, 800, 500, (0.4, 0.7))
    assert boxes[0].height_px == 650 and boxes[0].width_px == 371
    assert abs(mm_h - 260) < 0.7 and abs(mm_w - 260) < 0.7
    # 0.5 x 0.8 mm, 512 x 512: the image is 256 mm tall, so patches are 256 mm squares.
    boxes = D.plan_patches((512, 512), (0.5, 0.8), D.DetectionParams())
    mm_h, mm_w = _assert_cover(boxes, 512, 512, (0.5, 0.8))
    assert (boxes[0].height_px, boxes[0].width_px) == (512, 320) and mm_h == mm_w == 256
    # The whole 512 x 512 0.5 mm image fits in one 256 mm patch.
    assert D.plan_patches((512, 512), (0.5, 0.5)) == [D.PatchBox(0, 0, 0, 512, 512)]
    with pytest.raises(InputError):
        D.plan_patches((512, 512), (0.0, 0.5))
    with pytest.raises(InputError):
        D.plan_patches((0, 512), (0.5, 0.5))


def test_extract_patches_normalisation():
    rng = np.random.default_rng(1)
    img = rng.gamma(2.0, 100.0, (300, 300)).astype(np.float32)
    box = D.PatchBox(0, 10, 20, 224, 224)            # native size: no resize
    p = D.extract_patches(img, [box])[0]
    crop = img[10:234, 20:244].astype(np.float64)
    lo, hi = np.percentile(crop, [0.5, 99.5])
    assert np.allclose(p, (crop - crop.min()) / (hi - lo + 1e-9), atol=1e-5)
    # Resized patches are clipped to the crop's range, so their minimum maps to 0.
    boxes = D.plan_patches((300, 300), (1.2, 1.2))
    out = D.extract_patches(img, boxes)
    assert out.shape == (len(boxes), 224, 224) and out.dtype == np.float32
    assert np.allclose(out.reshape(len(boxes), -1).min(axis=1), 0)
    # Constant patch: the P99.5 == P0.5 fallback gives zeros, not NaN.
    flat = D.extract_patches(np.full((300, 300), 7.0, np.float32), boxes)
    assert np.all(flat == 0)
    # Bicubic resize reproduces a linear ramp away from the borders.
    ramp = np.tile(np.arange(448, dtype=np.float32), (448, 1))
    r = D.extract_patches(ramp, [D.PatchBox(0, 0, 0, 448, 448)])[0]
    diffs = np.diff(r[100, 20:200])
    assert np.allclose(diffs, diffs.mean(), rtol=1e-3)


def test_network_predictor_runs_a_module():
    import torch

    model = torch.nn.Conv2d(1, 13, 3, padding=1)
    predict = D.network_predictor(model)
    out = predict(np.zeros((2, 224, 224), np.float32), [])
    assert out.shape == (2, 13, 224, 224) and out.dtype == np.float32
    assert not model.training


# ----------------------------------------------------------------------------- oracle end to end


def test_oracle_recovers_every_vertebra_across_patch_seams():
    scan, qbs, truth = _synthetic_spine(spacing=(0.6, 0.6), center_x_px=433, seed=2)
    boxes = D.plan_patches(scan.shape[:2], scan.spacing_mm[:2])
    assert len(boxes) == 4 and _crosses_seam(truth, boxes)
    calls = []
    progress = []

    def predict(patches, bxs):
        calls.append(len(bxs))
        return T.oracle_predictor(qbs)(patches, bxs)

    res = D.detect_vertebrae(scan, predict, D.DetectionParams(batch_size=5, plan="patches"),
                             progress=lambda d, t, m: progress.append((d, t)))
    assert len(truth) >= 8
    _assert_recovered(res, truth, tol_px=0.05)
    n = 4 * scan.n_slices
    assert calls == [5] * (n // 5) + ([n % 5] if n % 5 else [])   # batches span slices
    assert progress[0] == (0, n) and progress[-1] == (n, n)
    assert set(res.timings_s) >= {"detection", "detection_network", "detection_postprocessing"}
    # a slice split over two network calls (batches of 5, 4 patches a slice) decodes exactly as one
    # whose patches come in one call (batches of 4 and of 8)
    # and so do outputs laid out channels-last (as the detector writes them) or read-only
    oracle = T.oracle_predictor(qbs)

    def channels_last(patches, bxs):
        return np.ascontiguousarray(oracle(patches, bxs).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    def read_only(patches, bxs):
        out = np.ascontiguousarray(oracle(patches, bxs))
        out.setflags(write=False)
        return out

    for batch_size, predictor in ((4, oracle), (8, oracle), (5, channels_last), (5, read_only)):
        other = D.detect_vertebrae(scan, predictor, D.DetectionParams(batch_size=batch_size, plan="patches"))
        assert [v.slices for v in other.vertebrae] == [v.slices for v in res.vertebrae]
        assert all(np.array_equal(p, q) for v, w in zip(other.vertebrae, res.vertebrae)
                   for p, q in zip(v.polygons, w.polygons))


def test_oracle_left_seam_and_official_integer_maxima():
    scan, qbs, truth = _synthetic_spine(spacing=(0.6, 0.6), center_x_px=79, seed=3)
    assert _crosses_seam(truth, D.plan_patches(scan.shape[:2], scan.spacing_mm[:2]))
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs), D.DetectionParams(plan="patches"))
    _assert_recovered(res, truth, tol_px=0.05)
    # Official behaviour (maxima at integer patch pixels) is within half a patch pixel per axis.
    official = D.DetectionParams(subpixel=False, drop_edge_corners=False, plan="patches")
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs), official)
    _assert_recovered(res, truth, tol_px=0.5 * 433 / 224 + 1e-6)


def test_oracle_rotated_spine():
    scan, qbs, truth = _synthetic_spine(spacing=(0.6, 0.6), rotation_deg=25, seed=4)
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs))
    _assert_recovered(res, truth, tol_px=0.05)


@pytest.mark.parametrize("plan", D.PLANS)
def test_oracle_anisotropic_pixels(plan):
    scan, qbs, truth = _synthetic_spine(shape=(512, 400), spacing=(0.5, 0.8), rotation_deg=-12,
                                        seed=5)
    boxes = D.plan_patches(scan.shape[:2], scan.spacing_mm[:2])
    assert boxes[0].height_px != boxes[0].width_px
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs), D.DetectionParams(plan=plan))
    _assert_recovered(res, truth, tol_px=0.05)


def test_oracle_reversed_slice_order():
    scan, qbs, truth = _synthetic_spine(spacing=(0.6, 0.6), rotation_deg=8, n_slices=6, seed=6)
    last = scan.n_slices - 1
    rev_scan = _scan(scan.voxels[:, :, ::-1].copy(), scan.spacing_mm[:2])
    rev_qbs = {last - s: q for s, q in qbs.items()}
    rev_truth = [(sorted(last - s for s in sl), {last - s: q for s, q in per.items()})
                 for sl, per in truth]
    res = D.detect_vertebrae(rev_scan, T.oracle_predictor(rev_qbs))
    _assert_recovered(res, rev_truth, tol_px=0.05)


def test_oracle_coarse_whole_spine():
    # 1.2 mm, small bodies (cervical-like) close together: 16 patches per slice.
    scan, qbs, truth = _synthetic_spine(spacing=(1.2, 1.2), n_slices=4, body_mm=(18.0, 13.0),
                                        disc_mm=4.0, rotation_deg=6, seed=7)
    assert len(truth) >= 30
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs))
    _assert_recovered(res, truth, tol_px=0.05)


def test_missing_corner_is_rebuilt_and_two_missing_rejected():
    scan, qbs, truth = _synthetic_spine(spacing=(0.6, 0.6), n_slices=5, seed=8)
    on2 = [i for i, (_, per) in enumerate(truth) if 2 in per]   # row order of qbs[2]
    one, two = on2[3], on2[5]
    present = {s: np.ones((len(q), 4), bool) for s, q in qbs.items()}
    present[2][3, 0] = False               # vertebra `one`: rt missing on slice 2
    present[2][5, [1, 2]] = False          # vertebra `two`: rb and lb missing on slice 2
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs, corner_present_by_slice=present))
    for i, (v, slices, per) in enumerate(_match(res.vertebrae, truth)):
        if i == one:
            q = per[2]
            rebuilt = v.polygon_on(2)
            centroid = q.mean(axis=0)
            assert np.abs(rebuilt[0] - q[0]).max() > 0.1                       # truly rebuilt
            assert np.allclose(rebuilt[0], 2 * centroid - q[2], atol=0.05)     # lb reflected
            assert np.allclose(rebuilt[1:], q[1:], atol=0.05)
        elif i == two:
            assert v.polygon_on(2) is None and v.slices == [s for s in slices if s != 2]
        else:
            assert v.slices == slices
            assert all(np.abs(v.polygon_on(s) - per[s]).max() < 0.05 for s in slices)


def test_missing_corner_rebuilt_exactly_on_parallelograms():
    scan, qbs, truth = _synthetic_spine(spacing=(0.6, 0.6), n_slices=4, seed=9,
                                        parallelogram=True, rotation_deg=10)
    present = {s: np.ones((len(q), 4), bool) for s, q in qbs.items()}
    for s in present:
        present[s][s % 2::2, (s + 1) % 4] = False  # one corner type, every other vertebra
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs, corner_present_by_slice=present))
    # The reflected corner of a parallelogram is the true one: everything is recovered.
    _assert_recovered(res, truth, tol_px=0.05)
    # A corner type absent from a whole slice gives no quads on that slice (official).
    present = {s: np.ones((len(q), 4), bool) for s, q in qbs.items()}
    present[1][:, 3] = False
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs, corner_present_by_slice=present))
    expected = [[s for s in sl if s != 1] for sl, _ in truth]
    assert [v.slices for v in res.vertebrae] == [e for e in expected if len(e) >= 2]


def test_single_slice_detections_removed():
    scan, qbs, truth = _synthetic_spine(spacing=(0.6, 0.6), n_slices=5, seed=10)
    lonely = np.array([[[450, 100], [450, 130], [400, 130], [400, 100]]], float)
    qbs = dict(qbs)
    qbs[2] = np.concatenate([qbs[2], lonely])
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs))
    _assert_recovered(res, truth, tol_px=0.05)
    kept = D.detect_vertebrae(scan, T.oracle_predictor(qbs),
                              D.DetectionParams(remove_single_slice=False))
    extra = [v for v in kept.vertebrae
             if v.slices == [2] and np.allclose(v.polygons[0], lonely[0], atol=0.05)]
    assert len(extra) == 1 and len(kept.vertebrae) == len(truth) + 1


def test_empty_prediction_and_bad_input():
    scan, _, _ = _synthetic_spine(shape=(200, 200), spacing=(1.0, 1.0), n_slices=2, seed=11)
    res = D.detect_vertebrae(scan, lambda p, b: np.zeros((len(b), 13, 224, 224), np.float32))
    assert res.vertebrae == []
    bad = _scan(np.full((50, 50, 2), np.nan), (1.0, 1.0))
    with pytest.raises(InputError):
        D.detect_vertebrae(bad, lambda p, b: None)
    with pytest.raises(ValueError):
        D.detect_vertebrae(scan, lambda p, b: np.zeros((len(b), 13, 100, 100), np.float32))


# ----------------------------------------------------------------------------- assembly, grouping


def _rect(x, y, w, h):
    return np.array([[x + w, y], [x + w, y + h], [x, y + h], [x, y]], float)


def test_corner_cut_by_a_patch_edge_is_dropped():
    boxes = [D.PatchBox(0, 0, 0, 224, 224), D.PatchBox(0, 0, 100, 224, 224)]
    quad = np.array([[[224.3, 50], [224.3, 80], [180, 80], [180, 50]]])   # rt just right of box 0
    out = T.oracle_predictor({0: quad})(np.zeros((2, 224, 224), np.float32), boxes)
    pts, _ = D.decode_corners(out, boxes, D.DetectionParams(), (224, 324))
    assert len(pts[0]) == 1 and np.allclose(pts[0][0], quad[0, 0], atol=1e-3)
    assert len(pts[2]) == 2                          # lb is whole in both patches: both kept
    pts, _ = D.decode_corners(out, boxes, D.DetectionParams(drop_edge_corners=False), (224, 324))
    assert len(pts[0]) == 2 and np.abs(pts[0][:, 0] - 223).min() < 1e-9   # official: cut blob kept
    # A corner on the image border is kept even on the patch edge.
    edge = np.array([[[323.0, 50], [323.0, 80], [280, 80], [280, 50]]])
    out = T.oracle_predictor({0: edge})(np.zeros((2, 224, 224), np.float32), boxes)
    pts, _ = D.decode_corners(out, boxes, D.DetectionParams(), (224, 324))
    assert len(pts[0]) == 1 and np.allclose(pts[0][0], edge[0, 0], atol=1e-3)


def test_assemble_quads_rules():
    q = _rect(10, 10, 40, 20)
    c = q.mean(axis=0)
    pts = [q[k:k + 1] for k in range(4)]
    disps = [(c - q[k])[None] for k in range(4)]
    assert np.allclose(D.assemble_quads(c[None], pts, disps)[0], q)
    # Centroid outside the quad (yet every displaced corner lands on it): rejected.
    shifted = [p + [100, 0] for p in pts]
    assert D.assemble_quads(c[None], shifted, [c - p for p in shifted]) == []
    # Self-intersecting order (rt and rb swapped): rejected.
    swapped = [pts[1], pts[0], pts[2], pts[3]]
    sdisp = [c - swapped[k] for k in range(4)]
    assert D.assemble_quads(c[None], swapped, sdisp) == []
    # A displaced corner 25 px from the centroid is missing (> 20 px) -> rebuilt from the opposite one.
    bad = [p.copy() for p in pts]
    bad_d = [d.copy() for d in disps]
    bad_d[1] = bad_d[1] + [25, 0]
    out = D.assemble_quads(c[None], bad, bad_d)
    assert len(out) == 1 and np.allclose(out[0][1], c + disps[3][0])
    # Relative rule: within 20 px but more than half the displacement away -> missing.
    small = _rect(10, 10, 12, 8)
    sc_ = small.mean(axis=0)
    sd = [(sc_ - small[k])[None] for k in range(4)]
    sd[0] = sd[0] + [4.0, 0]          # |disp| ~ 7.2, error 4 > 3.6
    out = D.assemble_quads(sc_[None], [small[k:k + 1] for k in range(4)], sd)
    assert np.allclose(out[0][0], sc_ + sd[2][0])
    sd[0] = sd[0] - [1.0, 0]          # error 3 < half of |disp|: kept as is
    out = D.assemble_quads(sc_[None], [small[k:k + 1] for k in range(4)], sd)
    assert np.allclose(out[0], small)
    # No corner of one type anywhere on the slice: nothing (official).
    assert D.assemble_quads(c[None], pts[:3] + [np.zeros((0, 2))], disps[:3] + [np.zeros((0, 2))]) == []


def test_shared_corner_rule_keeps_the_more_regular_quad():
    regular = _rect(10, 10, 40, 20)
    skewed = regular.copy()
    skewed[0] += [1.0, 0.5]            # same rt within 2 px, other corners moved
    skewed[2] += [-6, 3]
    far = _rect(10, 60, 40, 20)
    kept = D.remove_shared_corners([skewed, far, regular])
    assert len(kept) == 2 and any(np.allclose(k, regular) for k in kept)
    assert not any(np.allclose(k, skewed) for k in kept)


def test_group_across_slices_rules():
    a = _rect(0, 0, 40, 20)
    b = _rect(0, 30, 40, 20)
    drift = [a + [20 * s, 0] for s in range(5)]      # IoU with the previous slice 1/3 each time
    polys = {0: [drift[0], b], 1: [drift[1], b + 1], 2: [drift[2]], 3: [drift[3]], 4: [drift[4]],
             7: [_rect(200, 200, 10, 10)]}
    verts = D.group_across_slices(polys)
    assert [v.slices for v in verts] == [[0, 1, 2, 3, 4], [0, 1]]         # single-slice one dropped
    assert np.allclose(verts[0].polygons[4], drift[4])
    assert P.iou(drift[0], drift[4]) < 0.2          # linked through the last polygon, not the first
    # Sorted top to bottom whatever the creation order.
    verts = D.group_across_slices({0: [b, a], 1: [b, a]})
    assert [float(v.centroid_xy[1]) for v in verts] == [10.0, 40.0]
    # Two pieces of one vertebra that never overlap by > 0.2 on consecutive slices are merged
    # (their average polygons overlap by > 0.05), keeping one polygon per slice.
    p1, p2 = _rect(0, 0, 40, 20), _rect(28, 0, 40, 20)   # IoU 12/68 ~ 0.18
    verts = D.group_across_slices({0: [p1], 1: [p1, p2], 2: [p2]})
    assert len(verts) == 1 and verts[0].slices == [0, 1, 2]
    assert np.allclose(verts[0].polygons[1], (p1 + p2) / 2)
    assert isinstance(verts[0], Vertebra)
    keep = D.group_across_slices({0: [a]}, D.DetectionParams(remove_single_slice=False))
    assert len(keep) == 1 and keep[0].slices == [0]


def _labels_within_planes(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """ndimage.label with 4-connectivity inside each 2-D plane of the last two axes only."""
    from scipy import ndimage

    structure = np.zeros((3,) * mask.ndim, bool)
    structure[(1,) * (mask.ndim - 2)] = ndimage.generate_binary_structure(2, 1)
    return ndimage.label(mask, structure=structure)


def test_plane_components_number_pixels_as_ndimage_label_within_each_plane():
    """Blobs touching across the boundary of two maps (last row of one, first of the next) stay two."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        shape = [(2, 3, 17, 11), (40, 30), (5, 8, 8)][trial % 3]
        mask = rng.random(shape) > rng.uniform(0.3, 0.97)
        expected, n = _labels_within_planes(mask)
        index, labels, count = D._plane_components(mask)
        assert count == n
        np.testing.assert_array_equal(np.ravel_multi_index(index, mask.shape), np.flatnonzero(mask))
        np.testing.assert_array_equal(labels, expected[index])
    stacked = np.zeros((2, 4, 4), bool)
    stacked[0, 3, 1] = stacked[1, 0, 1] = True   # one above the other, but in different maps
    assert D._plane_components(stacked)[2] == 2
    assert D._plane_components(np.zeros((3, 5, 5), bool))[2] == 0


def test_component_maxima_are_each_components_first_highest_pixel():
    """Against a plain loop over the components, with many ties (the decoding takes one point per blob)."""
    rng = np.random.default_rng(5)
    for trial in range(40):
        values = np.round(rng.random((3, 30, 30)) * 6) / 6   # coarse: ties within a component
        labels, n = _labels_within_planes(values > 0.4)
        expected = []
        for k in range(1, n + 1):
            flat = np.flatnonzero(labels.ravel() == k)
            expected.append(flat[np.argmax(values.ravel()[flat])])   # argmax: the first on ties
        got = np.ravel_multi_index(D._component_maxima(values, values > 0.4), values.shape)
        np.testing.assert_array_equal(got, expected)


def test_a_512x512x15_scan_reports_its_network_and_postprocessing_seconds():
    """The timings users see in vertebrae.json add up (how fast they are is benchmarks/ business)."""
    scan, qbs, _ = _synthetic_spine(spacing=(0.6, 0.6), n_slices=15, seed=12)
    plan = D.plan_patches(scan.shape[:2], scan.spacing_mm[:2])
    mid = [D.PatchBox(7, b.y0, b.x0, b.height_px, b.width_px) for b in plan]
    cached = T.oracle_predictor(qbs)(np.zeros((len(plan), 224, 224), np.float32), mid)
    lookup = {(b.y0, b.x0): i for i, b in enumerate(plan)}
    predict = lambda p, bxs: cached[[lookup[(b.y0, b.x0)] for b in bxs]]  # noqa: E731
    res = D.detect_vertebrae(scan, predict, D.DetectionParams(plan="patches"))
    t = res.timings_s
    assert t["detection"] == pytest.approx(t["detection_network"] + t["detection_postprocessing"])
    assert min(t.values()) >= 0 and len(res.vertebrae) >= 8


# ----------------------------------------------------------------------------- phantom (if available)


def _phantom_case(**kw):
    from SpineNetLib.synthetic import phantom as phantom_mod
    ph = phantom_mod.make_phantom(**kw)
    qbs: dict[int, list] = {}
    truth = []
    for v in ph.vertebrae:
        per = {int(s): np.asarray(q, float) for s, q in v.quads.items()}
        for s, q in per.items():
            qbs.setdefault(s, []).append(q)
        truth.append((sorted(per), per))
    return ph.scan, {s: np.array(q) for s, q in qbs.items()}, truth


@pytest.mark.parametrize("kw", [
    dict(fov="lumbar", pixel_spacing=(0.6, 0.6), rotation_deg=0.0, reverse_slices=False, seed=0),
    dict(fov="lumbar", pixel_spacing=(0.5, 0.8), rotation_deg=15.0, reverse_slices=True, seed=1),
    dict(fov="whole", pixel_spacing=(1.2, 1.2), rotation_deg=-10.0, reverse_slices=False, seed=2),
    dict(fov="whole", pixel_spacing=(0.9, 1.3), rotation_deg=5.0, reverse_slices=True, seed=3),
])
def test_oracle_on_phantom(kw):
    scan, qbs, truth = _phantom_case(**kw)
    res = D.detect_vertebrae(scan, T.oracle_predictor(qbs))
    _assert_recovered(res, truth, tol_px=0.05)


# ----------------------------------------------------------------------------- weaker detections


def _weak_lowest_body_predictor(qbs, truth, strength):
    """Oracle maps in which the lowest body's heat maps (corners and centroid) peak at ``strength``."""
    slices, per = max(truth, key=lambda t: np.mean([q[:, 1].mean() for q in t[1].values()]))
    others = {s: np.array([q for q in qs if not (s in per and np.allclose(q, per[s]))]).reshape(-1, 4, 2)
              for s, qs in qbs.items()}
    full, without = T.oracle_predictor(qbs), T.oracle_predictor(others)

    def predict(patches, boxes):
        a, b = full(patches, boxes), without(patches, boxes)
        out = a.copy()
        out[:, :5] = b[:, :5] + strength * (a[:, :5] - b[:, :5])
        return out
    return predict, (slices, per)


def test_weak_body_is_kept_apart_as_a_candidate_and_only_then():
    scan, qbs, truth = _synthetic_spine(spacing=(0.6, 0.6), seed=7)
    predict, (slices, per) = _weak_lowest_body_predictor(qbs, truth, strength=0.45)
    res = D.detect_vertebrae(scan, predict)
    assert len(res.vertebrae) == len(truth) - 1             # under the official 0.6 threshold
    assert len(res.candidates) == 1                          # found again by the weaker decoding
    weak = res.candidates[0]
    assert weak.slices == slices
    assert max(np.abs(weak.polygon_on(s) - per[s]).max() for s in slices) < 0.05
    assert all(P.iou(weak.average_polygon, v.average_polygon) == 0 for v in res.vertebrae)
    off = D.detect_vertebrae(scan, predict, D.DetectionParams(candidate_threshold=None))
    assert off.candidates == [] and len(off.vertebrae) == len(truth) - 1
    assert res.faint_candidates == []                        # the third decoding adds no copy of it
    # A body too weak for the second decoding is found by the third (faint_threshold) alone ...
    faint, _ = _weak_lowest_body_predictor(qbs, truth, strength=0.2)
    found = D.detect_vertebrae(scan, faint)
    assert found.candidates == [] and len(found.faint_candidates) == 1
    assert max(np.abs(found.faint_candidates[0].polygon_on(s) - per[s]).max() for s in slices) < 0.05
    assert D.detect_vertebrae(scan, faint, D.DetectionParams(faint_threshold=None)).faint_candidates == []
    # ... and one weaker still is in no list.
    fainter, _ = _weak_lowest_body_predictor(qbs, truth, strength=0.1)
    lost = D.detect_vertebrae(scan, fainter)
    assert lost.candidates == [] and lost.faint_candidates == [] and len(lost.vertebrae) == len(truth) - 1


def test_candidate_threshold_is_checked():
    with pytest.raises(InputError, match="candidate_threshold"):
        D.DetectionParams(candidate_threshold=1.5)
    with pytest.raises(InputError, match="faint_threshold"):
        D.DetectionParams(faint_threshold=0.0)
