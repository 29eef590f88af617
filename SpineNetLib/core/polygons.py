"""Plane polygon geometry for vertebra quadrilaterals, without shapely.

The official code uses shapely for three things (official §5.2-5.3): the
validity of a decoded quad, whether it contains its centroid, and the IoU of
two quads.  This module provides exact equivalents for *simple* polygons
(no self-intersections), which is what valid vertebra quads are, plus the
internal angles used by the shared-corner rule.

Polygons are ``(n, 2)`` arrays of ``[x, y]`` vertices, closed implicitly.
Orientation does not matter to any public function: areas, intersections and
angles are computed on a positively oriented copy.  "Positive" means a
positive shoelace sum; in image coordinates (y down) the official corner
order rt, rb, lb, lt is positive.

Intersections use Sutherland-Hodgman clipping against a *convex* clip
region.  Clipping any positively oriented simple polygon against one
half-plane keeps its winding number inside the half-plane and makes it zero
outside (the added edges lie on the clip line), so the shoelace area of the
clipped ring is exactly the area of the intersection even when the subject is
concave.  When neither polygon is convex, the clip polygon is split into
triangles by ear clipping and the pieces are summed, which is exact for any
pair of simple polygons.  A self-intersecting (invalid) polygon has no
well-defined interior; for areas and IoU it is replaced by its convex hull.
"""

from __future__ import annotations

import math

import numpy as np

_EPS = 1e-12


def _following(a: np.ndarray) -> np.ndarray:
    """``a`` with each row replaced by the next one, the last by the first: ``np.roll(a, -1, axis=0)``,
    which costs more than the arithmetic on a quad (the decoding asks for thousands per scan)."""
    return np.concatenate((a[1:], a[:1]))


def _preceding(a: np.ndarray) -> np.ndarray:
    """``a`` with each row replaced by the one before it: ``np.roll(a, 1, axis=0)``."""
    return np.concatenate((a[-1:], a[:-1]))


def as_polygon(poly) -> np.ndarray:
    """``(n, 2)`` float64 copy of a polygon; raises ValueError on a bad shape."""
    p = np.array(poly, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 3:
        raise ValueError(f"a polygon must be an (n>=3, 2) array, got shape {p.shape}")
    return p


def signed_area(poly) -> float:
    """Shoelace area: positive for the official rt, rb, lb, lt order in image coordinates."""
    p = as_polygon(poly)
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, _following(y)) - np.dot(_following(x), y))


def area(poly) -> float:
    """Area enclosed by a simple polygon (absolute shoelace area)."""
    return abs(signed_area(poly))


def _positive(p: np.ndarray) -> np.ndarray:
    return p if signed_area(p) >= 0 else p[::-1].copy()


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _on_segment(p, q, r, tol: float) -> bool:
    """r collinear with p-q (already checked) and within its bounding box."""
    return (min(p[0], q[0]) - tol <= r[0] <= max(p[0], q[0]) + tol
            and min(p[1], q[1]) - tol <= r[1] <= max(p[1], q[1]) + tol)


def segments_intersect(p1, p2, q1, q2, tol: float = 1e-9) -> bool:
    """True if closed segments p1-p2 and q1-q2 share at least one point."""
    d1 = _cross(q1, q2, p1)
    d2 = _cross(q1, q2, p2)
    d3 = _cross(p1, p2, q1)
    d4 = _cross(p1, p2, q2)
    if ((d1 > tol and d2 < -tol) or (d1 < -tol and d2 > tol)) and \
            ((d3 > tol and d4 < -tol) or (d3 < -tol and d4 > tol)):
        return True
    return ((abs(d1) <= tol and _on_segment(q1, q2, p1, tol))
            or (abs(d2) <= tol and _on_segment(q1, q2, p2, tol))
            or (abs(d3) <= tol and _on_segment(p1, p2, q1, tol))
            or (abs(d4) <= tol and _on_segment(p1, p2, q2, tol)))


def is_valid_polygon(poly, min_area: float = 1e-9) -> bool:
    """Shapely-like validity: finite, >= 3 distinct vertices, area > min_area, no self-intersection.

    Non-adjacent edges must not touch at all; adjacent edges may only share
    their common vertex (a zero-angle spike that folds back is invalid).
    """
    try:
        p = as_polygon(poly)
    except ValueError:
        return False
    # The tests below run on Python floats: the same double arithmetic as on numpy's scalars, at a
    # fifth of the cost (the decoding validates thousands of quads per scan).
    pts = p.tolist()
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    if not all(math.isfinite(v) for v in xs + ys):
        return False
    n = len(pts)
    scale = max(max(xs) - min(xs), max(ys) - min(ys), 1.0)
    tol = 1e-12 * scale * scale
    if any(math.hypot(xs[i] - xs[i - 1], ys[i] - ys[i - 1]) <= 1e-12 * scale for i in range(n)):
        return False  # repeated consecutive vertex
    if area(p) <= min_area:
        return False
    for i in range(n):
        a1, a2 = pts[i], pts[(i + 1) % n]
        # Adjacent edge (i+1): only the shared vertex may be common.
        b2 = pts[(i + 2) % n]
        if abs(_cross(a1, a2, b2)) <= tol and (a2[0] - a1[0]) * (b2[0] - a2[0]) + (a2[1] - a1[1]) * (b2[1] - a2[1]) < 0:
            return False  # folds back on itself
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:
                continue  # edges n-1 and 0 are adjacent
            if segments_intersect(a1, a2, pts[j], pts[(j + 1) % n], tol):
                return False
    return True


def is_convex(poly) -> bool:
    """True for a convex polygon (collinear vertices allowed), either orientation."""
    p = as_polygon(poly)
    e = _following(p) - p
    cr = e[:, 0] * _following(e[:, 1]) - e[:, 1] * _following(e[:, 0])
    scale = max(float(np.max(np.abs(e))), 1e-300) ** 2
    cr = cr[np.abs(cr) > 1e-12 * scale]
    if not (np.all(cr > 0) or np.all(cr < 0)):
        return False
    # A convex polygon turns exactly once around (excludes star-shaped windings).
    ang = np.arctan2(e[:, 1], e[:, 0])
    turn = np.angle(np.exp(1j * (_following(ang) - ang)))
    return bool(abs(abs(turn.sum()) - 2 * np.pi) < 1e-6)


def points_in_polygon(points, poly) -> np.ndarray:
    """Even-odd test for many points ``(m, 2)``; returns (m,) bool.

    Points exactly on an edge may go either way (shapely's ``contains``
    excludes them); the pipeline only asks about interior centroids.
    """
    p = as_polygon(poly)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x, y = pts[:, 0:1], pts[:, 1:2]
    x1, y1 = p[:, 0][None, :], p[:, 1][None, :]
    x2, y2 = _following(p[:, 0])[None, :], _following(p[:, 1])[None, :]
    straddles = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    hits = straddles & (x < x_cross)
    return (np.count_nonzero(hits, axis=1) % 2) == 1


def point_in_polygon(point, poly) -> bool:
    """True if ``point`` ``[x, y]`` lies inside ``poly`` (see :func:`points_in_polygon`)."""
    return bool(points_in_polygon(np.asarray(point, float).reshape(1, 2), poly)[0])


def convex_hull(points) -> np.ndarray:
    """Positively oriented convex hull (Andrew's monotone chain), (k, 2)."""
    pts = np.unique(np.asarray(points, dtype=np.float64).reshape(-1, 2), axis=0)
    if len(pts) < 3:
        return pts

    def half(seq):
        out: list = []
        for q in seq:
            while len(out) >= 2 and _cross(out[-2], out[-1], q) <= 0:
                out.pop()
            out.append(q)
        return out

    lower = half(pts)
    upper = half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _clip_half_plane(subject: list, a, b) -> list:
    """Sutherland-Hodgman step: keep the part left of a->b (cross >= 0)."""
    out = []
    n = len(subject)
    if n == 0:
        return out
    ex, ey = b[0] - a[0], b[1] - a[1]
    side = [ex * (q[1] - a[1]) - ey * (q[0] - a[0]) for q in subject]
    for i in range(n):
        cur, nxt = subject[i], subject[(i + 1) % n]
        sc, sn = side[i], side[(i + 1) % n]
        if sc >= 0:
            out.append(cur)
        if (sc >= 0) != (sn >= 0):
            t = sc / (sc - sn)
            out.append((cur[0] + t * (nxt[0] - cur[0]), cur[1] + t * (nxt[1] - cur[1])))
    return out


def _clip_area(subject: np.ndarray, convex_clip: np.ndarray) -> float:
    """Area of (positive simple subject) ∩ (positive convex clip)."""
    ring = [tuple(q) for q in subject]
    n = len(convex_clip)
    for i in range(n):
        ring = _clip_half_plane(ring, convex_clip[i], convex_clip[(i + 1) % n])
        if len(ring) < 3:
            return 0.0
    return max(0.0, signed_area(np.array(ring)))


def triangulate(poly) -> list[np.ndarray]:
    """Ear-clipping triangulation of a simple polygon; list of positive (3, 2) triangles."""
    p = _positive(as_polygon(poly))
    idx = list(range(len(p)))
    tris: list[np.ndarray] = []
    guard = 0
    while len(idx) > 3 and guard < 10 * len(p) ** 2:
        guard += 1
        m = len(idx)
        for k in range(m):
            i0, i1, i2 = idx[k - 1], idx[k], idx[(k + 1) % m]
            a, b, c = p[i0], p[i1], p[i2]
            if _cross(a, b, c) <= 0:
                continue  # reflex or degenerate: not an ear
            others = [p[j] for j in idx if j not in (i0, i1, i2)]
            if others:
                o = np.array(others)
                inside = ((_cross_many(a, b, o) > 0) & (_cross_many(b, c, o) > 0)
                          & (_cross_many(c, a, o) > 0))
                if np.any(inside):
                    continue
            tris.append(np.array([a, b, c]))
            del idx[k]
            break
        else:
            break  # no ear found: numerically degenerate remainder
    if len(idx) == 3:
        tri = p[idx]
        if signed_area(tri) > 0:
            tris.append(tri)
    return tris


def _cross_many(a, b, pts: np.ndarray) -> np.ndarray:
    return (b[0] - a[0]) * (pts[:, 1] - a[1]) - (b[1] - a[1]) * (pts[:, 0] - a[0])


def _region(poly) -> np.ndarray:
    """Positive simple ring for area computations (convex hull if self-intersecting)."""
    p = as_polygon(poly)
    if not is_valid_polygon(p, min_area=0.0):
        return convex_hull(p)
    return _positive(p)


def _boxes_apart(pa: np.ndarray, pb: np.ndarray) -> bool:
    return bool(pa[:, 0].max() <= pb[:, 0].min() or pb[:, 0].max() <= pa[:, 0].min()
                or pa[:, 1].max() <= pb[:, 1].min() or pb[:, 1].max() <= pa[:, 1].min())


def _region_intersection(ra: np.ndarray, rb: np.ndarray) -> float:
    """Intersection area of two positive simple rings (:func:`_region`)."""
    if len(ra) < 3 or len(rb) < 3:
        return 0.0
    if is_convex(rb):
        return _clip_area(ra, rb)
    if is_convex(ra):
        return _clip_area(rb, ra)
    return float(sum(_clip_area(ra, t) for t in triangulate(rb)))


def intersection_area(a, b) -> float:
    """Area of the intersection of two simple polygons (exact up to rounding)."""
    pa, pb = as_polygon(a), as_polygon(b)
    if _boxes_apart(pa, pb):
        return 0.0
    return _region_intersection(_region(pa), _region(pb))


def iou(a, b) -> float:
    """Intersection over union of two polygons' areas (0 when the union is empty).

    Each polygon's region is made once (the grouping of detections calls this thousands of times)."""
    pa, pb = as_polygon(a), as_polygon(b)
    if _boxes_apart(pa, pb):
        return 0.0
    return iou_of_regions(_region(pa), _region(pb))


def region(poly) -> np.ndarray:
    """The ring :func:`iou` measures ``poly`` by (positive, or the convex hull of a polygon that crosses
    itself), for :func:`iou_of_regions`: made once for a polygon compared with many others, as when
    detections are grouped across slices, it saves checking the polygon again for every pair."""
    return _region(as_polygon(poly))


def iou_of_regions(ra: np.ndarray, rb: np.ndarray) -> float:
    """:func:`iou` of two polygons given by their :func:`region` (a region has its polygon's bounding box)."""
    if len(ra) < 3 or len(rb) < 3 or _boxes_apart(ra, rb):
        return 0.0
    inter = _region_intersection(ra, rb)
    if inter <= 0.0:
        return 0.0
    union = area(ra) + area(rb) - inter
    return float(inter / union) if union > 0 else 0.0


def internal_angles(poly) -> np.ndarray:
    """Interior angle at each vertex in degrees, (n,); they sum to (n-2)*180 for a simple polygon.

    Reflex vertices get angles above 180.  Used by the shared-corner rule
    (official §5.2), which compares the spread max - min of these angles.
    """
    p = _positive(as_polygon(poly))
    e_in = p - _preceding(p)
    e_out = _following(p) - p
    cr = e_in[:, 0] * e_out[:, 1] - e_in[:, 1] * e_out[:, 0]
    dt = np.sum(e_in * e_out, axis=1)
    turn = np.degrees(np.arctan2(cr, dt))
    angles = 180.0 - turn
    if signed_area(as_polygon(poly)) < 0:
        # Report angles in the caller's vertex order.
        angles = angles[::-1]
    return angles
