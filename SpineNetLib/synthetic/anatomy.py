"""Spine geometry of the phantom, in patient millimetres (steps 1-2 of :mod:`SpineNetLib.synthetic.phantom`).

What is here:

* the tables of textbook adult vertebral bodies, sacral segments and discs
  (:data:`BODY_TABLE`, :data:`SACRAL_TABLE`, :data:`DISC_TABLE`) and the
  pathology factors (:data:`SLIP_MM`, :data:`WEDGE_FRACTURE_FACTOR`,
  :data:`NARROW_DISC_FACTOR`, :data:`NOTCH_HALF_WIDTH_MM`);
* small 2-D geometry helpers (rotations, ellipses, quads, the resampled
  :class:`_Curve` along the vertebral walls);
* the chain construction that places every body and disc (``_build_chain``),
  the canal and posterior-element table (``_posterior_table``) and
  :class:`_Anatomy`, which holds all of it plus the soft-tissue landmarks;
* where each body is seen on an off-midline slice (``_Body.profile``) and
  the pathology geometry (``_parse_pathology``, endplate notches);
* the field of view: which anatomy the image window covers (``_window``).

Nothing here paints pixels; :mod:`SpineNetLib.synthetic.rendering` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.synthetic.params import PATHOLOGIES, PhantomParams

# --------------------------------------------------------------------------- tables

#: Default (rows, cols) and pixel spacing (row_mm, col_mm) per field of view.
#: When only one of shape / pixel_spacing is given, the other keeps this
#: physical field of view (rows * row_mm, cols * col_mm).
DEFAULT_GRID = {
    "lumbar": ((512, 512), (0.6, 0.6)),       # 307 x 307 mm
    "cervical": ((512, 512), (0.5, 0.5)),     # 256 x 256 mm
    "thoracic": ((512, 512), (0.75, 0.75)),   # 384 x 384 mm
    "whole": ((1024, 512), (0.8, 0.8)),       # 819 x 410 mm
}

#: Body is drawn on a slice (and listed in the GT) while |x| / half_width < this.
VISIBLE_FRACTION = 0.9
#: AP and SI shrink of an off-centre profile: scale = 1 - k * f**2.
AP_SHRINK, SI_SHRINK = 0.25, 0.06
#: Anterolisthesis of the upper body for "slip" (mm), wedge fracture anterior height factor,
#: narrowed disc height factor.
SLIP_MM = 6.0
WEDGE_FRACTURE_FACTOR = 0.65
NARROW_DISC_FACTOR = 0.5
#: Lateral half-width (mm) of an endplate notch.
NOTCH_HALF_WIDTH_MM = 5.0

#: Vertebral bodies: height (mm, mid-endplate to mid-endplate), AP depth of the
#: superior and inferior endplates (mm), lateral half-width (mm), wedge (deg,
#: positive = anterior taller).  Textbook adult values (C2 includes the dens).
BODY_TABLE: dict[str, tuple[float, float, float, float, float]] = {
    "C2": (35.0, 10.0, 16.0, 9.0, 0.0),
    "C3": (14.0, 15.0, 15.5, 8.5, 0.0),
    "C4": (14.0, 15.5, 16.0, 9.0, 0.0),
    "C5": (14.0, 16.0, 16.5, 9.5, 0.0),
    "C6": (14.0, 16.5, 17.0, 10.0, 0.0),
    "C7": (15.0, 17.0, 18.0, 11.0, -1.0),
    "T1": (17.0, 19.0, 20.0, 12.0, -1.0),
    "T2": (17.5, 20.5, 21.5, 12.5, -2.0),
    "T3": (18.0, 22.0, 23.0, 13.0, -3.0),
    "T4": (18.5, 23.0, 24.0, 13.5, -3.5),
    "T5": (19.0, 24.0, 25.0, 14.0, -3.5),
    "T6": (19.5, 25.0, 26.0, 14.5, -3.5),
    "T7": (20.0, 26.0, 27.0, 15.0, -3.5),
    "T8": (20.5, 27.0, 28.0, 15.5, -3.5),
    "T9": (21.0, 28.0, 29.0, 16.5, -3.5),
    "T10": (22.0, 29.0, 30.0, 17.0, -3.0),
    "T11": (23.0, 30.0, 31.0, 18.0, -2.0),
    "T12": (24.0, 31.0, 32.0, 19.0, -1.5),
    "L1": (25.0, 32.0, 34.0, 20.0, -1.0),
    "L2": (26.0, 34.0, 35.5, 21.0, 0.0),
    "L3": (27.0, 35.5, 37.0, 22.0, 1.5),
    "L4": (27.5, 37.0, 38.0, 23.0, 3.0),
    "L5": (27.0, 38.0, 37.0, 24.0, 7.0),
    "S1": (28.0, 40.0, 33.0, 24.0, -3.0),
}
#: Fused sacral segments and coccyx below S1 (same columns; not in the GT
#: unless ``include_s2`` adds S2).
SACRAL_TABLE: dict[str, tuple[float, float, float, float, float]] = {
    "S2": (22.0, 33.0, 28.0, 20.0, -8.0),
    "S3": (18.0, 28.0, 23.0, 16.0, -12.0),
    "S4": (14.0, 23.0, 18.0, 12.0, -12.0),
    "S5": (11.0, 18.0, 14.0, 9.0, -12.0),
    "Co1": (9.0, 13.0, 11.0, 7.0, -8.0),
    "Co2": (8.0, 10.0, 8.0, 6.0, -8.0),
    "Co3": (7.0, 7.0, 5.0, 5.0, -8.0),
}
#: Discs (and fused remnants below S1): anterior and posterior height (mm)
#: measured along the disc axis.  Their difference makes the lordosis.
DISC_TABLE: dict[str, tuple[float, float]] = {
    "C2-C3": (4.5, 3.5), "C3-C4": (5.5, 4.0), "C4-C5": (6.0, 4.0), "C5-C6": (6.0, 4.0),
    "C6-C7": (5.5, 4.0), "C7-T1": (5.0, 4.5),
    "T1-T2": (4.0, 4.5), "T2-T3": (4.0, 4.5), "T3-T4": (4.0, 4.5), "T4-T5": (4.0, 4.5),
    "T5-T6": (4.2, 4.7), "T6-T7": (4.5, 5.0), "T7-T8": (4.8, 5.2), "T8-T9": (5.0, 5.5),
    "T9-T10": (5.3, 5.7), "T10-T11": (5.8, 6.0), "T11-T12": (6.3, 6.3), "T12-L1": (7.5, 7.0),
    "L1-L2": (10.5, 6.5), "L2-L3": (12.0, 7.0), "L3-L4": (13.0, 7.5), "L4-L5": (14.0, 7.5),
    "L5-S1": (15.0, 6.0),
    "S1-S2": (2.5, 2.0), "S2-S3": (1.5, 1.5), "S3-S4": (1.5, 1.5), "S4-S5": (1.5, 1.5),
    "S5-Co1": (3.0, 2.5), "Co1-Co2": (2.0, 2.0), "Co2-Co3": (2.0, 2.0),
}


# --------------------------------------------------------------------------- small geometry helpers


def _rot(v: np.ndarray, ang: float) -> np.ndarray:
    """Rotate 2-vectors (u right, v down) by ``ang`` radians (positive = clockwise as displayed)."""
    c, s = math.cos(ang), math.sin(ang)
    v = np.asarray(v, float)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], axis=-1)


def _perp(e: np.ndarray) -> np.ndarray:
    """Normal pointing inferior for an AP direction pointing posterior: rot +90 deg."""
    return np.array([-e[1], e[0]])


def _ellipse(c, ra: float, rb: float, ang: float = 0.0, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([ra * np.cos(t), rb * np.sin(t)], axis=1)
    return _rot(pts, ang) + np.asarray(c, float)


def _bilinear(q: np.ndarray, a, b) -> np.ndarray:
    """Point at AP fraction ``a`` (0 anterior .. 1 posterior) and SI fraction ``b`` (0 top .. 1 bottom)
    of a quad (rt, rb, lb, lt)."""
    a = np.asarray(a, float)[..., None]
    b = np.asarray(b, float)[..., None]
    rt, rb, lb, lt = q
    top = lt + a * (rt - lt)
    bot = lb + a * (rb - lb)
    return top + b * (bot - top)


def _inset_quad(q: np.ndarray, t: float) -> np.ndarray:
    """Convex quad with every edge moved inwards by ``t`` mm (exact line offsets)."""
    n = len(q)
    c = q.mean(axis=0)
    lines = []
    for i in range(n):
        a, b = q[i], q[(i + 1) % n]
        d = (b - a) / np.linalg.norm(b - a)
        nrm = np.array([-d[1], d[0]])
        if np.dot(c - a, nrm) < 0:
            nrm = -nrm
        lines.append((a + t * nrm, d))
    out = []
    for i in range(n):
        (p1, d1), (p2, d2) = lines[i - 1], lines[i]
        m = np.array([d1, -d2]).T
        s = np.linalg.solve(m, p2 - p1)
        out.append(p1 + s[0] * d1)
    return np.array(out)


class _Curve:
    """A polyline resampled every 1 mm, with smoothed normals for offsets."""

    def __init__(self, pts: np.ndarray, sigma: float = 4.0):
        pts = np.asarray(pts, float)
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        keep = np.concatenate([[True], seg > 1e-9])
        pts = pts[keep]
        self.vertex_s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        self.length = float(self.vertex_s[-1])
        self.s = np.arange(0.0, self.length + 1e-9, 1.0)
        raw = np.stack([np.interp(self.s, self.vertex_s, pts[:, k]) for k in range(2)], axis=1)
        smooth = ndimage.gaussian_filter1d(raw, sigma, axis=0, mode="nearest")
        tang = np.gradient(smooth, axis=0)
        tang /= np.linalg.norm(tang, axis=1, keepdims=True)
        self.raw = raw
        self.smooth = smooth
        self.normal = np.stack([tang[:, 1], -tang[:, 0]], axis=1)  # posterior for a downward curve
        self.tangent = tang

    def at(self, s, which: str = "smooth") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(point, posterior normal, inferior tangent) at arc lengths ``s`` (arrays (N, 2))."""
        s = np.atleast_1d(np.asarray(s, float))
        base = self.smooth if which == "smooth" else self.raw
        p = np.stack([np.interp(s, self.s, base[:, k]) for k in range(2)], axis=1)
        nrm = np.stack([np.interp(s, self.s, self.normal[:, k]) for k in range(2)], axis=1)
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        tan = np.stack([-nrm[:, 1], nrm[:, 0]], axis=1)
        return p, nrm, tan

    def band(self, s0: float, s1: float, off_in, off_out, which: str = "smooth", step: float = 1.0):
        """Polygon between offsets ``off_in(s)`` and ``off_out(s)`` (mm along the posterior normal)."""
        if s1 <= s0:
            return None
        n = max(2, int(math.ceil((s1 - s0) / step)) + 1)
        s = np.linspace(s0, s1, n)
        p, nrm, _ = self.at(s, which)
        a = np.broadcast_to(np.asarray(off_in(s) if callable(off_in) else off_in, float), s.shape)
        b = np.broadcast_to(np.asarray(off_out(s) if callable(off_out) else off_out, float), s.shape)
        inner = p + a[:, None] * nrm
        outer = p + b[:, None] * nrm
        return np.concatenate([inner, outer[::-1]], axis=0)


# --------------------------------------------------------------------------- anatomy (mm)


@dataclass
class _Body:
    name: str
    kind: str                 # "vertebra" (C2..S1), "sacral", "coccyx"
    quad: np.ndarray          # (4, 2) mm, rt rb lb lt, mid slice
    half_width: float
    e: np.ndarray             # body AP axis (posterior), unit
    n: np.ndarray             # body SI axis (inferior), unit
    height: float
    anterior_height: float
    posterior_height: float
    pathology: list[str]
    lumbar_like: bool = False  # lumbarised S1: gets lumbar posterior elements, no fusion
    s_top: float = 0.0         # arc positions of rt / rb on the posterior-wall curve
    s_bot: float = 0.0

    @property
    def centroid(self) -> np.ndarray:
        return self.quad.mean(axis=0)

    def profile(self, f: float) -> np.ndarray:
        """Outline on a slice at relative lateral position f (phantom docstring, rule 2)."""
        a, b = 1.0 - AP_SHRINK * f * f, 1.0 - SI_SHRINK * f * f
        c = self.centroid
        d = self.quad - c
        return c + np.outer(d @ self.e, self.e) * a + np.outer(d @ self.n, self.n) * b


@dataclass
class _Disc:
    upper: int
    lower: int
    name: str
    anterior_height: float
    posterior_height: float
    kind: str                 # "disc" or "remnant"
    pathology: list[str]


def _region(name: str) -> str:
    return name[0] if name[0] in "CTL" else "S"


def _segment(m1, e1, l1, l2, ha, hp, shift=0.0):
    """Lower endplate (midpoint, direction) of a segment with the given heights (phantom docstring, rule 1)."""
    lm = 0.5 * (l1 + l2)
    h = 0.5 * (ha + hp)
    half = math.asin(float(np.clip((ha - hp) / (2.0 * lm), -0.95, 0.95)))
    e_b = _rot(e1, -half)
    n_b = _perp(e_b)
    e2 = _rot(e1, -2.0 * half)
    m2 = m1 + h * n_b + shift * e_b
    return m2, e2, e_b, n_b


def _parse_pathology(pathology) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split the user's pathology dict into per-level and per-disc lists (validated)."""
    if pathology is None:
        return {}, {}
    if not isinstance(pathology, dict):
        raise InputError("pathology must be a dict mapping a level or disc name to a list of pathologies")
    valid_levels = set(LEVELS_TOP_DOWN)
    by_level: dict[str, list[str]] = {}
    by_disc: dict[str, list[str]] = {}
    for key, items in pathology.items():
        if isinstance(items, str):
            items = [items]
        items = list(items)
        for it in items:
            if it not in PATHOLOGIES:
                raise InputError(f"unknown pathology {it!r} for {key}: use one of {', '.join(PATHOLOGIES)}")
        if "-" in str(key):
            up, _, lo = str(key).partition("-")
            if up not in valid_levels or lo not in valid_levels or \
                    LEVELS_TOP_DOWN.index(lo) != LEVELS_TOP_DOWN.index(up) + 1:
                raise InputError(f"unknown disc {key!r}: name two adjacent levels, e.g. 'L4-L5'")
            if "wedge_fracture" in items:
                raise InputError(f"wedge_fracture applies to a level, not to the disc {key}")
            by_disc.setdefault(str(key), []).extend(items)
        else:
            if key not in valid_levels:
                raise InputError(f"unknown level {key!r} in pathology: use C2..S1 or a disc such as 'L4-L5'")
            for it in items:
                if it in ("narrow_disc", "dark_disc"):
                    raise InputError(f"{it} applies to a disc such as 'L4-L5', not to the level {key}")
            if key == "S1" and "slip" in items:
                raise InputError("slip of S1 is not supported: give the level that slips forward over the one below")
            by_level.setdefault(str(key), []).extend(items)
    return by_level, by_disc


def _build_chain(p: PhantomParams, rng: np.random.Generator, by_level, by_disc):
    """Bodies (C2 .. Co3) and discs in mm, chain construction + plumb-line orientation."""
    body = dict(BODY_TABLE)
    body.update(SACRAL_TABLE)
    disc = dict(DISC_TABLE)
    lumbar_like = set()
    if p.transitional == "lumbarised_S1":
        body["L5"] = (27.0, 38.0, 38.0, 24.0, 4.0)
        body["S1"] = (26.0, 38.0, 37.0, 23.0, 2.0)
        body["S2"] = (27.0, 37.0, 30.0, 22.0, -4.0)
        disc["L5-S1"] = (12.5, 8.0)
        disc["S1-S2"] = (12.0, 5.5)
        lumbar_like.add("S1")
    elif p.transitional == "sacralised_L5":
        body["L5"] = (25.0, 37.0, 40.0, 24.0, 9.0)
        disc["L5-S1"] = (4.0, 2.5)
    v = float(p.variability)
    names = list(LEVELS_TOP_DOWN) + list(SACRAL_TABLE)
    curv_scale = 1.0 + 0.3 * v * rng.standard_normal() if v > 0 else 1.0
    dims = {}
    for name in names:
        h, l1, l2, hw, wedge = body[name]
        if v > 0:
            size = 1.0 + 0.04 * v * rng.standard_normal()
            h, l1, l2, hw, wedge = h * size, l1 * size, l2 * size, hw * size, wedge * curv_scale
        dims[name] = (h, l1, l2, hw, wedge)
    bodies: list[_Body] = []
    discs: list[_Disc] = []
    m = np.zeros(2)
    e = np.array([1.0, 0.0])
    for i, name in enumerate(names):
        h, l1, l2, hw, wedge = dims[name]
        lm = 0.5 * (l1 + l2)
        ha = h + lm * math.sin(math.radians(wedge) / 2)
        hp = h - lm * math.sin(math.radians(wedge) / 2)
        path = list(by_level.get(name, []))
        if "wedge_fracture" in path:
            ha *= WEDGE_FRACTURE_FACTOR
        shift = -(l2 - l1) / 2.0 if name == "C2" else 0.0  # straight posterior wall of the dens
        m2, e2, e_b, n_b = _segment(m, e, l1, l2, ha, hp, shift)
        quad = np.array([m + l1 / 2 * e, m2 + l2 / 2 * e2, m2 - l2 / 2 * e2, m - l1 / 2 * e])
        kind = "vertebra" if name in BODY_TABLE else ("coccyx" if name.startswith("Co") else "sacral")
        b = _Body(name, kind, quad, hw, e_b, n_b, float(np.linalg.norm(m2 - m)),
                  float((quad[2] - quad[3]) @ n_b), float((quad[1] - quad[0]) @ n_b), path, name in lumbar_like)
        bodies.append(b)
        if i == len(names) - 1:
            break
        lower = names[i + 1]
        dname = f"{name}-{lower}"
        dha, dhp = disc[dname]
        if v > 0 and name in BODY_TABLE:
            dh = 1.0 + 0.1 * v * rng.standard_normal()
            mean = 0.5 * (dha + dhp) * dh
            half_diff = 0.5 * (dha - dhp) * dh * curv_scale
            dha, dhp = mean + half_diff, mean - half_diff
        dpath = list(by_disc.get(dname, []))
        if "narrow_disc" in dpath:
            dha, dhp = dha * NARROW_DISC_FACTOR, dhp * NARROW_DISC_FACTOR
        dshift = 0.0
        if "slip" in dpath or "slip" in path:
            dshift = SLIP_MM   # lower body moves posteriorly = upper body slips anteriorly
            if "slip" not in dpath:
                dpath.append("slip")
            if "slip" not in b.pathology:
                b.pathology.append("slip")
        kind_d = "disc" if lower in BODY_TABLE else "remnant"
        if dname == "S1-S2" and "S1" in lumbar_like:
            kind_d = "disc"
        if dname == "L5-S1" and p.transitional == "sacralised_L5":
            kind_d = "remnant"
            dpath.append("transitional")
        m, e, _, _ = _segment(m2, e2, l2, dims[lower][1], dha, dhp, dshift)
        discs.append(_Disc(i, i + 1, dname, float(dha), float(dhp), kind_d, dpath))
    # plumb line: C7 centroid straight above the posterior-superior corner of S1
    idx = {b.name: k for k, b in enumerate(bodies)}
    pivot = bodies[idx["S1"]].quad[0].copy()
    vec = bodies[idx["C7"]].centroid - pivot
    ang = -math.pi / 2 - math.atan2(vec[1], vec[0])
    for b in bodies:
        b.quad = _rot(b.quad - pivot, ang)
        b.e = _rot(b.e, ang)
        b.n = _rot(b.n, ang)
    return bodies, discs


def _posterior_table(name: str) -> tuple[float, ...]:
    """Spinal canal and posterior elements of a vertebra (mm / deg), textbook adult values.

    canal depth, canal half-width, dural sac half-width, posterior and anterior
    epidural fat, cord AP thickness, cord half-width, spinous process length,
    its downward angle, tip height, lamina thickness, spinous half-width and
    where the lamina starts (fraction of the body height below its top).
    """
    r = _region(name)
    if name == "C2":
        return (16, 12, 10.5, 1.0, 0.7, 9.0, 7.0, 30, 15, 12, 6.0, 4.0, 0.55)
    if r == "C":
        cord = 9.0 if name in ("C5", "C6") else 8.0
        sp = {"C3": 16, "C4": 16, "C5": 17, "C6": 22, "C7": 32}[name]
        return (14, 12, 10.5, 1.0, 0.7, cord, 6.5, sp, 25, 7 if name != "C7" else 9, 4.0, 3.0, 0.15)
    if r == "T":
        k = int(name[1:])
        depth = 14.0 if k < 12 else 15.0
        hw = 10.0 if k == 1 else (9.5 if k == 12 else 8.5)
        cord = 8.0 if k == 12 else (7.5 if k == 11 else 6.5)
        sp = {1: 36, 10: 36, 11: 32, 12: 30}.get(k, 38)
        ang = {1: 35, 10: 45, 11: 30, 12: 15}.get(k, 55)
        tip = {11: 9, 12: 11}.get(k, 7)
        return (depth, hw, 7.5, 2.0, 0.8, cord, 5.0 if k >= 11 else 4.5, sp, ang, tip, 5.0, 3.0, 0.2)
    if r == "L":
        k = int(name[1:])
        depth = {1: 16, 2: 16.5, 3: 17, 4: 17, 5: 18}[k]
        sp = {1: 30, 2: 32, 3: 32, 4: 30, 5: 24}[k]
        ang = {1: 8, 2: 5, 3: 5, 4: 5, 5: 0}[k]
        return (depth, 11, 9.5, 4.0, 1.0 if k < 5 else 3.0, 6.0 if k == 1 else 0.0, 4.0, sp, ang,
                13 if k != 5 else 12, 6.5, 4.0, 0.3)
    # sacrum / coccyx
    depth = {"S1": 15, "S2": 11, "S3": 8, "S4": 6, "S5": 4}.get(name, 0.0)
    hw = {"S1": 10, "S2": 8, "S3": 7, "S4": 6, "S5": 5}.get(name, 0.0)
    sac = {"S1": 8.0, "S2": 5.0}.get(name, 0.0)
    sp = {"S1": 12, "S2": 10, "S3": 8}.get(name, 0.0)
    return (depth, hw, sac, 4.0, 3.0, 0.0, 0.0, sp, 0.0, 8.0, 8.0, 3.0, 0.3)


class _Anatomy:
    """Everything in patient millimetres (u = posterior, v = inferior) on the midline."""

    def __init__(self, p: PhantomParams, rng: np.random.Generator, by_level, by_disc):
        self.bodies, self.discs = _build_chain(p, rng, by_level, by_disc)
        self.idx = {b.name: i for i, b in enumerate(self.bodies)}
        self.p = p
        b = self.bodies
        c2 = b[0]
        # head frame: origin = dens tip, axes of C2
        self.dens = 0.5 * (c2.quad[0] + c2.quad[3])
        self.he, self.hn = c2.e, c2.n
        # posterior wall curve (from 8 mm above the dens tip, the foramen magnum)
        canal_bodies = [x for x in b if x.kind != "coccyx"]
        pts = [c2.quad[0] - 8.0 * c2.n]
        for x in canal_bodies:
            pts += [x.quad[0], x.quad[1]]
        self.post = _Curve(np.array(pts), sigma=3.0)
        for i, x in enumerate(canal_bodies):
            x.s_top = float(self.post.vertex_s[1 + 2 * i])
            x.s_bot = float(self.post.vertex_s[2 + 2 * i])
        # anterior wall curve (with 45 mm above the dens tip for the pharynx)
        pts = [c2.quad[3] - 45.0 * c2.n]
        for x in b:
            pts += [x.quad[3], x.quad[2]]
        self.ant = _Curve(np.array(pts), sigma=3.0)
        self.ant_s = [(float(self.ant.vertex_s[1 + 2 * i]), float(self.ant.vertex_s[2 + 2 * i]))
                      for i in range(len(b))]
        # per-level canal parameters along the posterior curve
        mids, rows = [], []
        for x in canal_bodies:
            mids.append(0.5 * (x.s_top + x.s_bot))
            rows.append(_posterior_table("L4" if x.lumbar_like else x.name))
        self.lev_s = np.array(mids)
        self.lev = np.array(rows, float)
        self.canal_bodies = canal_bodies
        # soft-tissue profiles, functions of v (inferior mm)
        cent = np.array([x.centroid for x in b])
        self.cent_v, self.cent_u = cent[:, 1], cent[:, 0]
        land = {"C2": (75, 85, 6, 6), "C4": (60, 80, 6, 7), "C7": (75, 85, 8, 8), "T2": (110, 80, 10, 9),
                "T4": (150, 78, 12, 9), "T7": (175, 75, 14, 10), "T10": (185, 78, 18, 12),
                "T12": (190, 85, 22, 14), "L2": (190, 95, 25, 16), "L4": (180, 100, 25, 18),
                "S1": (160, 95, 25, 22), "S3": (140, 75, 22, 28), "Co2": (130, 55, 20, 30)}
        lv = np.array([b[self.idx[k]].centroid[1] for k in land])
        vals = np.array(list(land.values()), float)
        if p.variability > 0:
            vals[:, :2] *= 1.0 + 0.12 * p.variability * rng.standard_normal(2)
            vals[:, 2:] *= np.clip(1.0 + 0.3 * p.variability * rng.standard_normal(2), 0.4, None)
        self.prof_v, self.prof = lv, vals
        antp = self.ant.raw
        order = np.argsort(antp[:, 1])
        self.all_v, self.all_u = antp[order, 1], antp[order, 0]
        self.blobs = self._make_blobs(rng)

    # ---- landmark helpers
    def body(self, name: str) -> _Body:
        return self.bodies[self.idx[name]]

    def vc(self, name: str) -> float:
        return float(self.body(name).centroid[1])

    def u_c(self, v):
        return np.interp(v, self.cent_v, self.cent_u)

    def prof_at(self, v, k: int):
        return np.interp(v, self.prof_v, self.prof[:, k])

    def u_all(self, v):
        """Anterior surface of the vertebral column at height v."""
        return np.interp(v, self.all_v, self.all_u)

    def u_wall(self, v):
        """Inner surface of the anterior body wall (skin - fat - 10 mm muscle)."""
        return self.u_c(v) - self.prof_at(v, 0) + self.prof_at(v, 2) + 10.0

    def lev_at(self, s, col: int):
        return np.interp(s, self.lev_s, self.lev[:, col])

    def head(self, a, b) -> np.ndarray:
        """Anatomy point from C2-frame coordinates (a posterior, b inferior of the dens tip)."""
        a = np.asarray(a, float)[..., None]
        b = np.asarray(b, float)[..., None]
        return self.dens + a * self.he + b * self.hn

    def diaphragm(self) -> np.ndarray:
        vp, va, vd = self.vc("T11") + 10.0, self.vc("T10"), self.vc("T9")
        up, ua = float(self.u_all(vp)) - 4.0, float(self.u_wall(va))
        ud = up + 0.45 * (ua - up)
        ctrl = np.array([ud, 2 * vd - 0.5 * (vp + va)])
        t = np.linspace(0, 1, 24)[:, None]
        p0, p2 = np.array([up, vp]), np.array([ua, va])
        return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p2

    def _make_blobs(self, rng):
        """Bowel loops, gas, fluid and fat lobules: 3D ellipsoids in the abdomen and pelvis."""
        out = []
        v0, v1 = self.vc("T12") + 10.0, self.vc("Co1")
        kinds = ["gas", "fluid", "stool", "fat", "bowel"]
        prob = [0.1, 0.2, 0.2, 0.3, 0.2]
        for _ in range(130):
            v = rng.uniform(v0, v1)
            r = rng.uniform(5, 14)
            lo, hi = float(self.u_wall(v)) + r + 4, float(self.u_all(v)) - r - 12
            if hi <= lo:
                continue
            u = rng.uniform(lo, hi)
            out.append((np.array([u, v]), r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3),
                        rng.uniform(0, np.pi), rng.uniform(-35, 35), rng.uniform(8, 25),
                        kinds[rng.choice(len(kinds), p=prob)], rng.uniform(0, 2 * np.pi, 3)))
        return out


# --------------------------------------------------------------------------- field of view


_FOV_LEVELS = {"lumbar": ("T12", "S1"), "cervical": ("C2", "T3"), "thoracic": ("T1", "T12"), "whole": ("C2", "S1")}


@dataclass
class _Window:
    shape: tuple[int, int]
    spacing: tuple[float, float]     # row_mm, col_mm
    centre: np.ndarray               # anatomy point at the image centre
    angle: float                     # radians, counter-clockwise as displayed

    def to_px(self, pts) -> np.ndarray:
        """Anatomy mm -> canonical pixel (x=col, y=row)."""
        p = _rot(np.asarray(pts, float) - self.centre, -self.angle)
        h, w = self.shape
        return np.stack([p[..., 0] / self.spacing[1] + (w - 1) / 2.0,
                         p[..., 1] / self.spacing[0] + (h - 1) / 2.0], axis=-1)


def _grid(p: PhantomParams) -> tuple[tuple[int, int], tuple[float, float]]:
    (dh, dw), (dr, dc) = DEFAULT_GRID[p.fov]
    fov_mm = (dh * dr, dw * dc)
    if p.shape is not None and p.pixel_spacing is not None:
        return tuple(int(x) for x in p.shape), tuple(float(x) for x in p.pixel_spacing)
    if p.shape is not None:
        shp = tuple(int(x) for x in p.shape)
        return shp, (fov_mm[0] / shp[0], fov_mm[1] / shp[1])
    if p.pixel_spacing is not None:
        sp = tuple(float(x) for x in p.pixel_spacing)
        return (int(round(fov_mm[0] / sp[0])), int(round(fov_mm[1] / sp[1]))), sp
    return (dh, dw), (dr, dc)


def _window(anat: _Anatomy, p: PhantomParams) -> _Window:
    (h, w), (rmm, cmm) = _grid(p)
    top_name, bot_name = _FOV_LEVELS[p.fov]
    top_name = p.top_level or top_name
    bot_name = p.bottom_level or bot_name
    v_top = float(anat.body(top_name).quad[:, 1].min())
    v_bot = float(anat.body(bot_name).quad[:, 1].max())
    partial = p.top_level is not None or p.bottom_level is not None
    if partial:
        margin = 15.0
        if p.shape is None:
            h = int(math.ceil((v_bot - v_top + 2 * margin) / rmm))
        vc = 0.5 * (v_top + v_bot)
    elif p.fov == "lumbar":
        vc = v_top - 22.0 + h * rmm / 2.0
    elif p.fov == "cervical":
        vc = v_top - 45.0 + h * rmm / 2.0
    elif p.fov == "thoracic":
        vc = 0.5 * (v_top + v_bot)
    else:  # whole: skull base to coccyx
        vc = 0.5 * ((v_top - 45.0) + (anat.body("Co3").quad[:, 1].max() + 40.0))
    half = h * rmm / 2.0
    sel = [b.centroid[0] for b in anat.bodies if vc - half <= b.centroid[1] <= vc + half]
    uc = float(np.mean(sel)) if sel else float(anat.u_c(vc))
    uc -= 0.04 * w * cmm
    return _Window((int(h), int(w)), (float(rmm), float(cmm)), np.array([uc, vc]), math.radians(p.rotation_deg))


# --------------------------------------------------------------------------- pathology geometry


def _notch_polygon(q: np.ndarray, body: _Body, endplate: str) -> np.ndarray:
    """Endplate defect (semi-ellipse 9 x 4 mm) in a body outline ``q``, opening into the disc."""
    depth = 0.5 * (np.linalg.norm(q[0] - q[3]) + np.linalg.norm(q[1] - q[2]))
    ra, rb, out = 4.5 / depth, 4.0 / body.height, 0.6 / body.height
    t = np.linspace(0, np.pi, 13)
    a = 0.55 + ra * np.cos(t)
    if endplate == "superior":
        b = rb * np.sin(t)
        ends = -out
    else:
        b = 1.0 - rb * np.sin(t)
        ends = 1.0 + out
    a = np.concatenate([[a[0]], a, [a[-1]]])
    b = np.concatenate([[ends], b, [ends]])
    return _bilinear(q, a, b)


def _notches(anat: _Anatomy) -> list[tuple[int, str]]:
    """(body index, endplate) of every endplate_notch: a level key -> its superior endplate,
    a disc key -> the inferior endplate of its upper body."""
    out = []
    for i, b in enumerate(anat.bodies):
        if "endplate_notch" in b.pathology:
            out.append((i, "superior"))
    for d in anat.discs:
        if "endplate_notch" in d.pathology:
            out.append((d.upper, "inferior"))
    return out
