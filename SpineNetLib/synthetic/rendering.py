"""Painting the phantom's tissues into the voxel grid (step 3 of :mod:`SpineNetLib.synthetic.phantom`).

What is here:

* the tissue intensities per contrast and their texture amplitudes
  (:data:`TISSUE_TABLE`) and the scanner point-spread (:data:`PSF_MM`);
* the anti-aliased polygon rasteriser (:func:`polygon_coverage`) and the
  painter's-algorithm :class:`_Canvas` that composites tissue polygons;
* the drawing of one sagittal slice from :class:`~SpineNetLib.synthetic.anatomy._Anatomy`:
  the soft tissues that are the same on every slice (``_draw_static``), those
  that change with the lateral position (``_draw_soft``: head, airway, thorax,
  abdomen, retroperitoneum) and the spine (``_draw_spine``: canal, posterior
  elements, foramina, sacrum, discs, vertebral bodies);
* contrast, texture, point-spread, bias field and Rician noise
  (:func:`render_canonical`, which returns the canonical ``(H, W, S)`` array).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from SpineNetLib.synthetic.anatomy import (
    NOTCH_HALF_WIDTH_MM, VISIBLE_FRACTION, _Anatomy, _bilinear, _ellipse, _inset_quad, _notch_polygon, _notches,
    _posterior_table, _region, _rot, _Window,
)
from SpineNetLib.synthetic.params import CONTRASTS, PhantomParams

# --------------------------------------------------------------------------- tables


#: Gaussian point-spread of the "scanner" (mm), applied before bias and noise; symmetric, so
#: straight edges keep their 50 % contour on the ground-truth line.
PSF_MM = 0.35

#: Tissue intensities (T1, T2, STIR) in scanner units and texture amplitudes
#: (fine ~0.5 mm, medium ~3x1 mm fibres, coarse ~6 mm).  T1: fat and marrow
#: bright, CSF dark; T2 (fast spin echo): fluid, nucleus and fat bright,
#: marrow intermediate; STIR: fat suppressed, fluid and oedema bright.
TISSUE_TABLE: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "air": ((0, 0, 0), (0, 0, 0)),
    "fat": ((1150, 850, 70), (0.03, 0.04, 0.02)),
    "muscle": ((380, 230, 260), (0.03, 0.12, 0.04)),
    "marrow": ((800, 520, 170), (0.12, 0.05, 0.07)),
    "marrow_c": ((700, 470, 190), (0.12, 0.05, 0.07)),
    "flat_bone": ((720, 450, 160), (0.12, 0.05, 0.05)),
    "cortex": ((45, 35, 28), (0.15, 0.0, 0.0)),
    "annulus": ((300, 210, 200), (0.04, 0.02, 0.0)),
    "nucleus": ((380, 1100, 950), (0.04, 0.02, 0.03)),
    "nucleus_dark": ((320, 300, 270), (0.04, 0.02, 0.0)),
    "remnant": ((340, 460, 380), (0.04, 0.0, 0.0)),
    "csf": ((170, 1350, 1250), (0.02, 0.0, 0.01)),
    "cord": ((540, 480, 430), (0.02, 0.0, 0.02)),
    "root": ((430, 380, 360), (0.02, 0.0, 0.0)),
    "ligament": ((70, 55, 50), (0.1, 0.0, 0.0)),
    "interspinous": ((560, 380, 150), (0.06, 0.15, 0.05)),
    "vessel": ((60, 45, 45), (0.1, 0.0, 0.0)),
    "vein": ((260, 800, 700), (0.05, 0.0, 0.0)),
    "lung": ((25, 20, 20), (0.2, 0.0, 0.5)),
    "heart": ((330, 220, 240), (0.03, 0.12, 0.2)),
    "liver": ((520, 300, 330), (0.03, 0.03, 0.05)),
    "bowel": ((430, 520, 450), (0.05, 0.12, 0.3)),
    "gas": ((15, 12, 12), (0.2, 0.0, 0.0)),
    "fluid": ((150, 1300, 1200), (0.02, 0.0, 0.02)),
    "stool": ((500, 420, 300), (0.05, 0.1, 0.2)),
    "brain": ((560, 640, 520), (0.03, 0.05, 0.08)),
    "cerebellum": ((500, 660, 560), (0.06, 0.15, 0.05)),
    "oedema": ((430, 950, 1150), (0.05, 0.03, 0.05)),
    "notch": ((110, 110, 100), (0.05, 0.0, 0.0)),
    "airway": ((8, 6, 6), (0.2, 0.0, 0.0)),
}


# --------------------------------------------------------------------------- rasteriser


def polygon_coverage(poly_xy: np.ndarray, shape: tuple[int, int], ss: int = 4):
    """Exact-in-x, ``ss``-times supersampled-in-y area coverage of a simple polygon.

    ``poly_xy`` is (N, 2) ``[x=col, y=row]`` pixel coordinates (pixel centres
    at integers).  Returns ``(r0, c0, cov)`` with ``cov`` the coverage in
    [0, 1] of rows ``r0..`` and columns ``c0..`` of its bounding box, or None
    when the polygon misses the image.  On each of the ``ss`` sub-rows of a
    pixel the covered length of every pixel is computed exactly from the
    edge crossings (signed by edge direction, so orientation does not
    matter), which puts the 0.5 contour on the true edges.
    """
    p = np.asarray(poly_xy, dtype=float)
    h, w = shape
    x, y = p[:, 0], p[:, 1]
    r0 = max(int(math.floor(y.min() + 0.5)), 0)
    r1 = min(int(math.floor(y.max() + 0.5)), h - 1)
    c0 = max(int(math.floor(x.min() + 0.5)), 0)
    c1 = min(int(math.floor(x.max() + 0.5)), w - 1)
    if r1 < r0 or c1 < c0:
        return None
    nr, nc = r1 - r0 + 1, c1 - c0 + 1
    n = nr * ss
    y_first = r0 - 0.5 + 0.5 / ss
    xb, yb = np.roll(x, -1), np.roll(y, -1)
    lo, hi = np.minimum(y, yb), np.maximum(y, yb)
    j0 = np.clip(np.ceil((lo - y_first) * ss), 0, n).astype(np.int64)
    j1 = np.clip(np.ceil((hi - y_first) * ss), 0, n).astype(np.int64)
    cnt = j1 - j0
    total = int(cnt.sum())
    if total == 0:
        return None
    e = np.repeat(np.arange(len(x)), cnt)
    j = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt) + j0[e]
    ys = y_first + j / ss
    dy = yb[e] - y[e]
    xs = x[e] + (ys - y[e]) / dy * (xb[e] - x[e])
    d = np.sign(dy)
    col = np.floor(xs + 0.5).astype(np.int64) - c0
    frac = xs - (col + c0) + 0.5
    width = nc + 1
    size = n * width
    # every crossing adds d to all columns left of it, and d*frac to its own column
    diff = np.bincount(j * width, weights=d, minlength=size)
    diff -= np.bincount(j * width + np.clip(col, 0, nc), weights=d, minlength=size)
    inside = (col >= 0) & (col < nc)
    own = np.bincount(j[inside] * width + col[inside], weights=d[inside] * frac[inside], minlength=size)
    sub = np.cumsum(diff.reshape(n, width), axis=1)[:, :nc] + own.reshape(n, width)[:, :nc]
    cov = np.clip(np.abs(sub), 0.0, 1.0).reshape(nr, ss, nc).mean(axis=1)
    return r0, c0, cov.astype(np.float32)


class _Canvas:
    """Painter's-algorithm compositing of tissue polygons into 4 channels.

    Channel 0 is the base intensity, 1-3 the texture amplitudes (fine,
    medium, coarse) of whatever tissue covers the pixel.
    """

    def __init__(self, shape: tuple[int, int], values: dict[str, np.ndarray], to_px):
        self.shape = shape
        self.ch = np.zeros((4,) + tuple(shape), np.float32)
        self.values = values
        self.to_px = to_px

    def fill(self, poly_mm, tissue: str, ss: int = 4, opacity: float = 1.0) -> None:
        if poly_mm is None or len(poly_mm) < 3:
            return
        res = polygon_coverage(self.to_px(poly_mm), self.shape, ss)
        if res is None:
            return
        r0, c0, cov = res
        if opacity != 1.0:
            cov = cov * opacity
        sub = self.ch[:, r0:r0 + cov.shape[0], c0:c0 + cov.shape[1]]
        val = self.values[tissue]
        sub += cov[None] * (val[:, None, None] - sub)


# --------------------------------------------------------------------------- rendering one slice


def _ell_section(x: float, xc: float, rx: float) -> float:
    """Relative size of an ellipsoid's cross-section at lateral x (0 = not cut)."""
    t = (x - xc) / rx
    return math.sqrt(1.0 - t * t) if abs(t) < 1.0 else 0.0


def _draw_static(cv: _Canvas, anat: _Anatomy) -> None:
    """Large soft-tissue regions that are the same on every slice (rendered once, then copied)."""
    v_top = anat.dens[1] - 40.0
    v_bot = anat.vc("Co3") + 60.0
    v = np.arange(v_top, v_bot, 3.0)
    uc = anat.u_c(v)
    ant, post = uc - anat.prof_at(v, 0), uc + anat.prof_at(v, 1)
    fa, fp = anat.prof_at(v, 2), anat.prof_at(v, 3)
    t = np.linspace(np.pi, 0, 9)[1:-1]
    mid, half = 0.5 * (ant[-1] + post[-1]), 0.5 * (post[-1] - ant[-1])
    bottom = np.stack([mid + half * np.cos(t), v[-1] + 25.0 * np.sin(t)], 1)
    cv.fill(np.concatenate([np.stack([ant, v], 1), bottom, np.stack([post, v], 1)[::-1]]), "fat", 2)
    bottom_in = np.stack([mid + (half - fp[-1]) * np.cos(t), v[-1] + 5.0 * np.sin(t)], 1)
    cv.fill(np.concatenate([np.stack([ant + fa, v], 1), bottom_in, np.stack([post - fp, v], 1)[::-1]]), "muscle", 2)
    # head (C2 frame: a posterior, b inferior, origin at the dens tip): scalp, skull, brain
    H = anat.head
    # skull: inner table through the basion (-4, -6) and the opisthion (32, -4), tilted so that the
    # occiput rises behind the foramen magnum
    c, tilt = (33.4, -71.5), -0.3
    cv.fill(H(*_ellipse(c, 88 + 14, 66 + 14, tilt, n=72).T), "fat", 2)
    cv.fill(H(*_ellipse(c, 88 + 8, 66 + 8, tilt, n=72).T), "cortex", 2)
    cv.fill(H(*_ellipse(c, 88 + 6.5, 66 + 6.5, tilt, n=72).T), "flat_bone", 2)
    cv.fill(H(*_ellipse(c, 88 + 1.5, 66 + 1.5, tilt, n=72).T), "cortex", 2)
    cv.fill(H(*_ellipse(c, 88, 66, tilt, n=72).T), "brain", 2)
    # face below the anterior skull base: skin/fat, then muscle (tongue, floor of mouth)
    face = np.array([(-8, -2), (-22, -44), (-60, -60), (-105, -64), (-116, -35), (-110, -5), (-116, 15),
                     (-108, 45), (-92, 62), (-72, 70), (-8, 70)], float)
    cv.fill(H(*face.T), "fat", 2)
    inner = face + np.array([(0, 0), (0, 0), (2, 6), (6, 6), (7, 2), (6, 0), (7, 0),
                             (6, -3), (4, -6), (6, 0), (0, 0)], float)
    cv.fill(H(*inner.T), "muscle", 2)
    # thorax below the sternal notch: lung everywhere, the mediastinum is added per slice
    dia = anat.diaphragm()
    vt = anat.vc("T2")
    vs = np.linspace(vt, dia[0, 1], 40)
    va = np.linspace(dia[-1, 1], vt, 30)
    thorax = np.concatenate([np.stack([anat.u_all(vs) - 3, vs], 1), dia, np.stack([anat.u_wall(va), va], 1)])
    cv.fill(thorax, "lung", 2)
    # abdomen and pelvis: bowel
    v_end = anat.vc("Co3") + 30
    van = np.linspace(dia[-1, 1], v_end, 60)
    vpo = np.linspace(v_end, dia[0, 1], 60)
    abd = np.concatenate([dia, np.stack([anat.u_wall(van), van], 1), np.stack([anat.u_all(vpo) - 5, vpo], 1)])
    cv.fill(abd, "bowel", 2)


def _draw_soft(cv: _Canvas, anat: _Anatomy, x: float) -> None:
    """Soft tissues that change from slice to slice (lateral position ``x`` mm from the midline)."""
    _draw_head(cv, anat, x)
    _draw_airway(cv, anat, x)
    _draw_thorax(cv, anat, x)
    _draw_abdomen(cv, anat, x)
    _draw_retroperitoneum(cv, anat, x)


def _draw_head(cv: _Canvas, anat: _Anatomy, x: float) -> None:
    """Posterior fossa, brainstem, clivus and face details."""
    ax = abs(x)
    H = anat.head
    s = _ell_section(x, 0.0, 45.0)
    if s > 0:  # cerebellum and cisterna magna
        cv.fill(H(*_ellipse((42, -34), 40 * s, 26, -0.2, n=48).T), "cerebellum")
        cv.fill(H(*_ellipse((32, -10), 12 * s, 7, 0.3, n=32).T), "csf")
    if ax < 14:  # medulla and pons in front of the 4th ventricle, bathed in CSF, continuous with the cord
        k = math.sqrt(1 - (x / 14.0) ** 2)
        stem = np.array([(7, 2), (-2, -25), (-11, -45), (-15, -72), (8, -76), (15, -45), (19, -20), (19, 2)], float)
        mid = np.array([13.0, -40.0])
        cv.fill(H(*(stem + [[-5, 0], [-5, 0], [-5, 0], [-5, 0], [0, -3], [4, 0], [4, 0], [4, 0]]).T), "csf")
        cv.fill(H(*(mid + (stem - mid) * [0.55 + 0.45 * k, 1.0]).T), "cord")
        cv.fill(H(*_ellipse((18, -38), 3.5 * k, 9, -0.3, n=24).T), "csf")
    cl = np.array([(-3, -5), (-20, -44), (-32, -47), (-15, -5)], float)
    cv.fill(H(*cl.T), "cortex")
    cv.fill(H(*(cl.mean(0) + (cl - cl.mean(0)) * 0.75).T), "flat_bone")
    s = _ell_section(x, 0.0, 22.0)
    if s > 0:  # sphenoid sinus, nasal cavity
        cv.fill(H(*_ellipse((-45, -50), 13 * s, 9 * s, n=32).T), "air")
        cv.fill(H(*_ellipse((-85, -35), 22 * s, 12 * s, 0.2, n=32).T), "air")
    if ax < 25:  # hard palate, mandible
        cv.fill(H(*np.array([(-38, -7), (-90, -11), (-90, -5), (-38, -2)], float).T), "cortex")
        cv.fill(H(*np.array([(-40, -6), (-88, -9.5), (-88, -6.5), (-40, -3)], float).T), "flat_bone")
        cv.fill(H(*np.array([(-38, -7), (-20, -2), (-22, 6), (-38, -2)], float).T), "muscle")   # soft palate
        cv.fill(H(*_ellipse((-98, 45), 9, 17, 0.25, n=32).T), "cortex")
        cv.fill(H(*_ellipse((-98, 45), 6.5, 14.5, 0.25, n=32).T), "flat_bone")


def _draw_airway(cv: _Canvas, anat: _Anatomy, x: float) -> None:
    """Naso/oropharynx, larynx and trachea (to the carina at T5)."""
    ax = abs(x)
    if ax < 14.0:
        s_c7 = anat.ant_s[anat.idx["C7"]][0]
        s_end = anat.ant_s[anat.idx["T4"]][1]
        lv_s = np.array([0.0] + [a for a, _ in anat.ant_s[:10]])
        prev = np.array([6, 5, 5, 6, 12, 14, 16, 18, 20, 22, 24], float)
        thick = np.array([12, 12, 12, 14, 15, 15, 16, 16, 16, 16, 15], float)
        k_ph = math.sqrt(1 - (x / 14.0) ** 2)
        k_tr = math.sqrt(1 - (x / 9.0) ** 2) if ax < 9.0 else 0.0

        def centre(s):
            return -np.interp(s, lv_s, prev) - 0.5 * np.interp(s, lv_s, thick)

        def half(s):
            return 0.5 * np.interp(s, lv_s, thick) * np.where(s > s_c7, k_tr, k_ph)

        cv.fill(anat.ant.band(8.0, s_end, lambda s: centre(s) + half(s), lambda s: centre(s) - half(s)), "airway")


def _draw_thorax(cv: _Canvas, anat: _Anatomy, x: float) -> None:
    """Mediastinum (fat, heart, great vessels, oesophagus), lung apices and sternum."""
    ax = abs(x)
    dia = anat.diaphragm()
    vt = anat.vc("T2")
    if ax >= 12:  # lung apices, above the sternal notch off the midline
        vs = np.linspace(anat.vc("C7"), vt + 10, 12)
        back = min((ax - 12) * 1.5, 20.0)
        ua = anat.u_all(vs) - 3 + back
        uw = anat.u_wall(vs[::-1]) + 8
        cv.fill(np.concatenate([np.stack([ua, vs], 1), np.stack([uw, vs[::-1]], 1)]), "lung")
    if ax < 12:  # mediastinal fat between the spine and ~60 % of the way to the sternum
        k = math.sqrt(1 - (x / 12.0) ** 2)
        vs = np.linspace(anat.vc("T1"), dia[0, 1], 40)
        va = np.linspace(dia[-1, 1], vt + 15, 30)
        ua = anat.u_all(vs) - 3
        ub = anat.u_all(va)
        front = ub + (anat.u_wall(va) - ub) * 0.6 * k
        med = np.concatenate([np.stack([ua, vs], 1), dia[:14], np.stack([front, va], 1)[np.argsort(-va)]])
        cv.fill(med, "fat")
    s = _ell_section(x, 15.0, 60.0)
    vh = anat.vc("T8")
    uw, ua = float(anat.u_wall(vh)), float(anat.u_all(vh))
    if s > 0:  # heart in its pericardial fat
        uh = uw + 0.45 * (ua - uw)
        rad_u = 0.36 * (ua - uw)
        cv.fill(_ellipse((uh, vh + 5), rad_u * s + 4, 60 * s + 4, -0.5), "fat")
        cv.fill(_ellipse((uh, vh + 5), rad_u * s, 60 * s, -0.5), "heart")
    s = _ell_section(x, 8.0, 30.0)
    if s > 0:  # aortic arch cut across, above the heart and in front of the trachea
        cv.fill(_ellipse((0.5 * (uw + ua) + 12, anat.vc("T3") - 2), 14 * s, 13 * s), "vessel")
    s = _ell_section(x, 20.0, 20.0)
    if s > 0:  # left pulmonary artery, below the arch
        cv.fill(_ellipse((0.5 * (uw + ua) + 18, anat.vc("T5")), 11 * s, 10 * s), "vessel")
    if ax < 8:
        k = math.sqrt(1 - (x / 8.0) ** 2)
        s0, s1 = anat.ant_s[anat.idx["C6"]][0], anat.ant_s[anat.idx["T10"]][1]
        cv.fill(anat.ant.band(s0, s1, -8.0 + 5.0 * k, -8.0 - 5.0 * k), "muscle")
    if ax < 14:  # sternum
        v0, v1 = anat.vc("T3"), anat.vc("T9")
        vv = np.linspace(v0, v1, 20)
        uw_v = anat.u_wall(vv)
        stern = np.concatenate([np.stack([uw_v - 4, vv], 1), np.stack([uw_v + 8, vv], 1)[::-1]])
        c = stern.mean(axis=0)
        cv.fill(stern, "cortex")
        cv.fill(c + (stern - c) * [0.8, 0.96], "flat_bone")


def _draw_abdomen(cv: _Canvas, anat: _Anatomy, x: float) -> None:
    """Bowel loops, gas, fluid and fat lobules, liver, bladder and rectum."""
    dia = anat.diaphragm()
    tt = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    for centre_b, ra, rb, ang, xc, rx, kind, ph in anat.blobs:
        s = _ell_section(x, xc, rx)
        if s > 0.15:   # an irregular loop: ellipse with a wobbling radius
            wob = 1.0 + 0.12 * np.sin(2 * tt + ph[0] + 0.1 * x) + 0.08 * np.sin(3 * tt + ph[1]) \
                + 0.05 * np.sin(5 * tt + ph[2] - 0.1 * x)
            pts = np.stack([ra * s * wob * np.cos(tt), rb * s * wob * np.sin(tt)], 1)
            cv.fill(_rot(pts, ang) + centre_b, kind)
    if x < 45:  # liver under the (right) dome, smaller to the left
        rise = max(0.0, x) * 1.6
        v_post, v_ant = anat.vc("L1") - rise, anat.vc("L2") - rise
        p_post = np.array([float(anat.u_all(v_post)) - 10, v_post])
        p_ant = np.array([float(anat.u_wall(v_ant)), v_ant])
        ctrl = 0.5 * (p_post + p_ant) + [0.0, 25.0]
        t = np.linspace(0, 1, 16)[:, None]
        lower = (1 - t) ** 2 * p_ant + 2 * (1 - t) * t * ctrl + t ** 2 * p_post
        top = dia + [0.0, 3.0]
        top[:, 1] = np.minimum(top[:, 1], np.interp(top[:, 0], lower[::-1, 0], lower[::-1, 1]) - 5)
        cv.fill(np.concatenate([top, lower]), "liver")
    vbl = anat.vc("Co1") + 5.0
    s = _ell_section(x, 0.0, 45.0)
    if s > 0:
        cv.fill(_ellipse((float(anat.u_wall(vbl)) + 45, vbl), 42 * s, 32 * s, 0.2), "fluid")
    s = _ell_section(x, 0.0, 22.0)
    if s > 0:
        s4 = anat.body("S4")
        cr = 0.5 * (s4.quad[3] + s4.quad[2]) - 24.0 * s4.e
        cv.fill(_ellipse(cr, 14 * s, 38 * s, math.atan2(-s4.n[0], s4.n[1]), n=32), "stool")


def _draw_retroperitoneum(cv: _Canvas, anat: _Anatomy, x: float) -> None:
    """Psoas, prevertebral fat, descending aorta and inferior vena cava."""
    ax = abs(x)
    if ax >= 14:
        s0, s1 = anat.ant_s[anat.idx["T12"]][0], anat.ant_s[anat.idx["S1"]][0]
        cv.fill(anat.ant.band(s0, s1, 3.0, lambda s: -12.0 - 33.0 * (s - s0) / (s1 - s0)), "muscle")
    s0, s1 = anat.ant_s[anat.idx["T1"]][0], anat.ant_s[anat.idx["S2"]][1]
    cv.fill(anat.ant.band(s0, s1, 2.0, -4.0), "fat")
    s = _ell_section(x, 12.0, 12.0)
    if s > 0:  # descending aorta, left of the midline
        s0, s1 = anat.ant_s[anat.idx["T4"]][0], 0.5 * sum(anat.ant_s[anat.idx["L4"]])
        cv.fill(anat.ant.band(s0, s1, -15.0 + 12 * s, -15.0 - 12 * s), "vessel")
    s = _ell_section(x, -22.0, 11.0)
    if s > 0:  # inferior vena cava, right of the midline
        s0, s1 = anat.ant_s[anat.idx["T12"]][0], 0.5 * sum(anat.ant_s[anat.idx["L4"]])
        cv.fill(anat.ant.band(s0, s1, -14.0 + 11 * s, -14.0 - 11 * s), "vessel")


# --------------------------------------------------------------------------- the spine on one slice


def _cortex_and_marrow(cv: _Canvas, outer, inner, marrow: str = "flat_bone", ss: int = 4) -> None:
    cv.fill(outer, "cortex", ss)
    cv.fill(inner, marrow, ss)


def _spinous(anat: _Anatomy, s0: float, s1: float, base_off: float, length: float, ang_deg: float,
             tip_h: float) -> np.ndarray:
    """Spinous process polygon: base on the lamina between arc lengths s0..s1, rounded tip."""
    pc = anat.post
    p, nrm, tan = pc.at([s0, s1, 0.5 * (s0 + s1)])
    b1 = p[0] + base_off * nrm[0]
    b2 = p[1] + base_off * nrm[1]
    a = math.radians(ang_deg)
    d = math.cos(a) * nrm[2] + math.sin(a) * tan[2]
    q = np.array([-d[1], d[0]])          # towards inferior for d pointing posterior
    tc = 0.5 * (b1 + b2) + length * d
    phi = np.linspace(-np.pi / 2, np.pi / 2, 9)
    tip = tc + (tip_h / 2) * (np.sin(phi)[:, None] * q + 0.6 * np.cos(phi)[:, None] * d)
    return np.concatenate([[b1], tip, [b2]])


class _SpineLandmarks:
    """What the spine drawing steps share: the vertebrae with posterior elements, disc heights and
    arc lengths on the posterior wall curve (canal end, end of the dural sac, conus, ligament span)."""

    def __init__(self, anat: _Anatomy):
        self.anat = anat
        cb = anat.canal_bodies
        self.verts = [b for b in cb if b.kind == "vertebra" and (b.name != "S1" or b.lumbar_like)]
        self.disc_after = {d.upper: d for d in anat.discs}
        self.disc_before = {d.lower: d for d in anat.discs}
        verts = self.verts
        s4 = anat.body("S4")
        self.s_canal_end = s4.s_bot
        s2 = anat.body("S2")
        self.s_sac_end = 0.5 * (s2.s_top + s2.s_bot)
        self.l1 = l1 = anat.body("L1")
        self.s_conus = l1.s_top + 0.75 * (l1.s_bot - l1.s_top)
        self.sa0 = verts[0].s_top + 0.55 * (verts[0].s_bot - verts[0].s_top)
        self.sb1 = verts[-1].s_bot + 0.5 * self.dh_below(verts[-1])

    def dh_below(self, b):
        d = self.disc_after.get(self.anat.idx[b.name])
        return d.posterior_height if d else 0.0

    def dh_above(self, b):
        d = self.disc_before.get(self.anat.idx[b.name])
        return d.posterior_height if d else 0.0

    def depth(self, s):
        return self.anat.lev_at(s, 0)


def _draw_spine(cv: _Canvas, anat: _Anatomy, x: float) -> None:
    """Canal, cord, posterior elements, foramina, discs and vertebral bodies on one slice."""
    sp = _SpineLandmarks(anat)
    _draw_posterior_soft(cv, sp, x)
    _draw_canal(cv, sp, x)
    _draw_foramina(cv, sp, x)
    _draw_arches(cv, sp, x)
    _draw_sacrum(cv, sp, x)
    prof = _body_profiles(anat, x)
    _draw_discs(cv, anat, x, prof)
    _draw_bodies(cv, anat, x, prof)


def _draw_posterior_soft(cv: _Canvas, sp: _SpineLandmarks, x: float) -> None:
    """Interspinous ligaments/fat and the ligamentum flavum."""
    ax = abs(x)
    anat, pc, L, depth = sp.anat, sp.anat.post, sp.anat.lev_at, sp.depth
    sa0, sb1 = sp.sa0, sp.sb1
    if ax < 5.5:
        reach_vals = [b_row[7] * math.cos(math.radians(b_row[8])) * 0.9 for b_row in anat.lev]
        cv.fill(pc.band(sa0, sb1, lambda s: depth(s) + 3.0,
                        lambda s: depth(s) + L(s, 10) + np.interp(s, anat.lev_s, reach_vals)), "interspinous")
    if ax < 14.0:
        cv.fill(pc.band(sa0, sb1, lambda s: depth(s) - 0.5, lambda s: depth(s) + 0.7 * L(s, 10)), "ligament")


def _draw_canal(cv: _Canvas, sp: _SpineLandmarks, x: float) -> None:
    """Canal (epidural fat), dural sac (CSF), cord and cauda equina."""
    ax = abs(x)
    pc, L, depth = sp.anat.post, sp.anat.lev_at, sp.depth
    s_canal_end, s_sac_end, s_conus, l1 = sp.s_canal_end, sp.s_sac_end, sp.s_conus, sp.l1

    def k_canal(s):
        hw = L(s, 1)
        return np.sqrt(np.clip(1.0 - (ax / hw) ** 4, 0.0, 1.0))

    cv.fill(pc.band(0.0, s_canal_end, -4.0, lambda s: depth(s) * k_canal(s)), "fat")

    def sac_c(s):
        return 0.5 * (L(s, 4) + depth(s) - L(s, 3))

    def sac_h(s):
        hw = L(s, 2)
        k = np.sqrt(np.clip(1.0 - (ax / np.maximum(hw, 1e-3)) ** 2, 0.0, 1.0))
        taper = np.clip((s_sac_end - s) / 12.0, 0.0, 1.0)
        return 0.5 * (depth(s) - L(s, 3) - L(s, 4)) * k * np.sqrt(taper)

    cv.fill(pc.band(0.0, s_sac_end, lambda s: sac_c(s) - sac_h(s), lambda s: sac_c(s) + sac_h(s)), "csf")

    def cord_h(s):
        hw = L(s, 6)
        k = np.sqrt(np.clip(1.0 - (ax / np.maximum(hw, 1e-3)) ** 2, 0.0, 1.0))
        taper = np.clip((s_conus - s) / 18.0, 0.0, 1.0)
        ap = np.where(s < l1.s_top, L(s, 5), 6.0)
        return 0.5 * ap * k * np.sqrt(taper)

    cv.fill(pc.band(0.0, s_conus, lambda s: sac_c(s) - 0.5 - cord_h(s), lambda s: sac_c(s) - 0.5 + cord_h(s)),
            "cord")
    if ax < 7.0:  # nerve roots of the cauda equina, lying posteriorly in the sac
        for j, frac in enumerate((0.15, 0.35, 0.55)):
            off = frac + 0.08 * math.sin(0.7 * x + j)
            cv.fill(pc.band(s_conus - 4, s_sac_end - 8, lambda s, o=off: sac_c(s) + o * sac_h(s) - 0.3,
                            lambda s, o=off: sac_c(s) + o * sac_h(s) + 0.3), "root", opacity=0.7)


def _draw_foramina(cv: _Canvas, sp: _SpineLandmarks, x: float) -> None:
    """Lateral, off the canal: neural foramina, pedicles and articular pillars."""
    ax = abs(x)
    pc, L, dh_above, dh_below, verts = sp.anat.post, sp.anat.lev_at, sp.dh_above, sp.dh_below, sp.verts
    for b in verts:
        hwc, dep, lam_t = L(0.5 * (b.s_top + b.s_bot), 1), L(0.5 * (b.s_top + b.s_bot), 0), \
            L(0.5 * (b.s_top + b.s_bot), 10)
        hgt = b.s_bot - b.s_top
        s_a = b.s_top - 0.5 * dh_above(b)
        s_b = b.s_bot + 0.5 * dh_below(b)
        if ax < hwc:
            continue
        reg = _region(b.name)
        ped_w = {"C": 5.0, "T": 6.0}.get(reg, 8.0)
        if ax < hwc + 13:
            cv.fill(pc.band(s_a, s_b, -4.0, dep), "fat")
        if ax < hwc + 10:
            p, nrm, _ = pc.at([b.s_top + 0.62 * hgt])
            cv.fill(_ellipse(p[0] + 0.45 * dep * nrm[0], 2.8, 3.2, n=20), "root")
        if ax < hwc + ped_w:
            _cortex_and_marrow(cv, pc.band(b.s_top + 0.05 * hgt, b.s_top + 0.45 * hgt, -3.0, dep + 1.0),
                               pc.band(b.s_top + 0.05 * hgt + 1, b.s_top + 0.45 * hgt - 1, -2.0, dep))
        if hwc + 1 <= ax < hwc + 15:
            _cortex_and_marrow(cv, pc.band(s_a, s_b, 0.6 * dep, dep + lam_t + 4),
                               pc.band(s_a + 1, s_b - 1, 0.6 * dep + 1, dep + lam_t + 3))
            sj = b.s_bot + 0.5 * dh_below(b)
            cv.fill(pc.band(sj - 0.7, sj + 0.7, 0.6 * dep, dep + lam_t + 4), "csf", opacity=0.6)


def _draw_arches(cv: _Canvas, sp: _SpineLandmarks, x: float) -> None:
    """Laminae and spinous processes (C2..L5), C1 arches."""
    ax = abs(x)
    anat = sp.anat
    pc, L, depth, dh_below, verts = anat.post, anat.lev_at, sp.depth, sp.dh_below, sp.verts
    for b in verts:
        row = _posterior_table("L4" if b.lumbar_like else b.name)
        dep, hwc, sp_len, sp_ang, tip_h, lam_t, sp_hw, lam0 = (row[0], row[1], row[7], row[8], row[9],
                                                               row[10], row[11], row[12])
        hgt = b.s_bot - b.s_top
        sa, sb = b.s_top + lam0 * hgt, b.s_bot + 0.5 * dh_below(b)
        if ax < hwc + 4:
            _cortex_and_marrow(cv, pc.band(sa, sb, lambda s: depth(s) - 0.5, lambda s: depth(s) + lam_t),
                               pc.band(sa + 1, sb - 1, lambda s: depth(s) + 0.8, lambda s: depth(s) + lam_t - 0.8))
        if ax < sp_hw and sp_len > 0:
            sc, sd = sa + 0.1 * (sb - sa), sb - 0.1 * (sb - sa)
            outer = _spinous(anat, sc, sd, dep + lam_t - 1.0, sp_len, sp_ang, tip_h)
            inner = _spinous(anat, sc + 1.2, sd - 1.2, dep + lam_t - 0.5, sp_len - 1.5, sp_ang, tip_h - 2.4)
            _cortex_and_marrow(cv, outer, inner)
    c2 = anat.bodies[0]
    if ax < 12:  # C1 anterior arch in front of the dens
        cv.fill(anat.head(*_ellipse((-13.5, 9.0), 5.5, 7.0, n=24).T), "cortex")
        cv.fill(anat.head(*_ellipse((-13.5, 9.0), 4.0, 5.5, n=24).T), "flat_bone")
    if ax < 15:  # C1 posterior arch
        p, nrm, _ = pc.at([c2.s_top + 6.0])
        cc = p[0] + (L(c2.s_top, 0) + 7.0) * nrm[0]
        cv.fill(_ellipse(cc, 6.0, 5.0, n=24), "cortex")
        cv.fill(_ellipse(cc, 4.5, 3.5, n=24), "flat_bone")


def _draw_sacrum(cv: _Canvas, sp: _SpineLandmarks, x: float) -> None:
    """Fused dorsal plate and median crest of the sacrum."""
    ax = abs(x)
    anat = sp.anat
    pc, depth, s_canal_end = anat.post, sp.depth, sp.s_canal_end
    first = anat.body("S2") if anat.body("S1").lumbar_like else anat.body("S1")
    ss0 = first.s_top + 0.3 * (first.s_bot - first.s_top)
    if ax < 16:
        def plate(s):
            return np.interp(s, [ss0, s_canal_end], [9.0, 5.0])
        _cortex_and_marrow(cv, pc.band(ss0, s_canal_end, lambda s: depth(s) - 0.5, lambda s: depth(s) + plate(s)),
                           pc.band(ss0 + 1, s_canal_end - 1, lambda s: depth(s) + 0.8,
                                   lambda s: depth(s) + plate(s) - 0.8))
    if ax < 3:
        for nm in ("S1", "S2", "S3"):
            b = anat.body(nm)
            if b is first or b.s_top >= first.s_top:
                sc, sd = b.s_top + 0.3 * (b.s_bot - b.s_top), b.s_bot - 0.1 * (b.s_bot - b.s_top)
                row = _posterior_table(nm)
                plate_here = float(np.interp(0.5 * (sc + sd), [ss0, s_canal_end], [9.0, 5.0]))
                outer = _spinous(anat, sc, sd, row[0] + plate_here - 1.0, row[7], 0.0, row[9])
                inner = _spinous(anat, sc + 1, sd - 1, row[0] + plate_here - 0.5, row[7] - 1.5, 0.0, row[9] - 2)
                _cortex_and_marrow(cv, outer, inner)


def _body_profiles(anat: _Anatomy, x: float) -> dict[int, np.ndarray]:
    """Body index -> outline (mm) of every body visible on the slice at lateral position ``x``."""
    ax = abs(x)
    prof = {}
    for i, b in enumerate(anat.bodies):
        f = ax / b.half_width
        if f < VISIBLE_FRACTION:
            prof[i] = b.profile(f)
    return prof


def _draw_discs(cv: _Canvas, anat: _Anatomy, x: float, prof: dict[int, np.ndarray]) -> None:
    """Annulus, nucleus (and its cleft) of every disc between two visible bodies; fused remnants."""
    ax = abs(x)
    bodies = anat.bodies
    for d in anat.discs:
        if d.upper not in prof or d.lower not in prof:
            continue
        up, lo = prof[d.upper], prof[d.lower]
        ub, lb_ = bodies[d.upper], bodies[d.lower]
        q = np.array([up[1], lo[0], lo[3], up[2]])     # disc as a quad: rt, rb, lb, lt
        ed = ub.e + lb_.e
        ed /= np.linalg.norm(ed)
        reg = _region(ub.name)
        bulge = 0.0 if d.kind == "remnant" else {"C": 0.8, "T": 1.0}.get(reg, 1.5)
        t = np.linspace(0, 1, 9)[1:-1, None]
        post_side = q[0] + t * (q[1] - q[0]) + bulge * np.sin(np.pi * t) * ed
        ant_side = q[2] + t * (q[3] - q[2]) - bulge * np.sin(np.pi * t) * ed
        poly = np.concatenate([[q[0]], post_side, [q[1], q[2]], ant_side, [q[3]]])
        if d.kind == "remnant":
            if ub.kind == "vertebra":  # S1-S2: the whole rudimentary disc; the fused ones: _draw_fused_sacrum
                cv.fill(poly, "remnant", 8)
            continue
        cv.fill(poly, "annulus", 8)
        f = ax / min(ub.half_width, lb_.half_width)
        if f < 0.75:
            k = math.sqrt(1.0 - (f / 0.75) ** 2)
            tt = np.linspace(0, 2 * np.pi, 32, endpoint=False)
            tissue = "nucleus_dark" if "dark_disc" in d.pathology else "nucleus"
            # inner annulus (half way) then the nucleus proper
            cv.fill(_bilinear(q, 0.54 + 0.43 * k * np.cos(tt), 0.5 + 0.46 * np.sin(tt)), tissue, 8, opacity=0.5)
            cv.fill(_bilinear(q, 0.55 + 0.37 * k * np.cos(tt), 0.5 + 0.39 * np.sin(tt)), tissue, 8)
            if reg in "TL" and f < 0.5 and tissue == "nucleus":   # intranuclear cleft
                cleft = _bilinear(q, np.array([0.36, 0.76, 0.76, 0.36]), np.array([0.485, 0.49, 0.51, 0.515]))
                cv.fill(cleft, "annulus", 8, opacity=0.35)


def _draw_bodies(cv: _Canvas, anat: _Anatomy, x: float, prof: dict[int, np.ndarray]) -> None:
    """Cortex and marrow of every visible body, basivertebral vein, fracture oedema, endplate notches."""
    ax = abs(x)
    bodies = anat.bodies
    notch = _notches(anat)
    for i, q in prof.items():
        b = bodies[i]
        if b.kind != "vertebra":
            continue  # S2 and below: one fused bone, not separate bodies
        reg = _region(b.name)
        t = 0.9 if reg == "C" else (0.8 if b.kind != "vertebra" else 1.0)
        marrow = "marrow_c" if reg == "C" else "marrow"
        cv.fill(q, "cortex", 8)
        inner = _inset_quad(q, t)
        cv.fill(inner, marrow, 8)
        if b.kind == "vertebra" and reg != "C" and ax < 4.0:  # basivertebral vein
            cv.fill(_bilinear(inner, np.array([1.0, 1.0, 0.86]), np.array([0.42, 0.58, 0.5])), "vein", 8)
        if "wedge_fracture" in b.pathology:  # acute fracture: marrow oedema under the top endplate
            a = np.linspace(0, 1, 12)
            bot = 0.42 + 0.04 * np.sin(9 * a + 1.0)
            cv.fill(_bilinear(inner, np.concatenate([a, a[::-1]]), np.concatenate([np.zeros(12), bot[::-1]])),
                    "oedema", 8, opacity=0.85)
        for j, ep in notch:
            if j == i and ax < NOTCH_HALF_WIDTH_MM:
                cv.fill(_notch_polygon(q, b, ep), "notch", 8)
    _draw_fused_sacrum(cv, anat, prof)


def _draw_fused_sacrum(cv: _Canvas, anat: _Anatomy, prof: dict[int, np.ndarray]) -> None:
    """The segments below S1 as one fused bone, as in an adult sacrum and coccyx.

    One cortical shell around the fused segments; marrow that runs on through
    the junctions between them (each segment's marrow reaches 15 % beyond an
    endplate shared with another fused segment); those former discs only as
    short, faint rudiments in the middle of the junction.  The S1-S2 junction
    keeps its cortex and its whole rudimentary disc, the clearest of them on
    real T2 scans.  Drawing every segment as its own cortex-rimmed box made
    them look like vertebral bodies, and a detector counts those as levels.
    """
    bodies = anat.bodies
    fused = [i for i in prof if bodies[i].kind != "vertebra"]
    for i in fused:
        cv.fill(prof[i], "cortex", 8)
    for i in fused:
        quad, centre, ap_axis = prof[i], prof[i].mean(axis=0), bodies[i].e
        offsets = quad - centre
        along_ap = (offsets @ ap_axis)[:, None] * ap_axis
        top, bottom = (1.15 if i - 1 in fused else 0.8), (1.15 if i + 1 in fused else 0.8)
        si_scale = np.array([top, bottom, bottom, top])[:, None]  # corners rt, rb, lb, lt
        cv.fill(centre + 0.8 * along_ap + si_scale * (offsets - along_ap), "marrow", 8)
    for d in anat.discs:
        if d.kind == "remnant" and d.upper in prof and d.lower in prof:
            up, lo = prof[d.upper], prof[d.lower]
            junction = np.array([up[1], lo[0], lo[3], up[2]])
            if bodies[d.upper].kind == "vertebra":
                continue  # S1-S2, drawn with the discs
            rudiment = _bilinear(junction, np.array([0.25, 0.75, 0.75, 0.25]), np.array([0.0, 0.0, 1.0, 1.0]))
            cv.fill(rudiment, "remnant", 8, opacity=0.5)


# --------------------------------------------------------------------------- contrast, texture, bias, noise


def _tissue_values(p: PhantomParams, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ci = CONTRASTS.index(p.contrast)
    over = p.intensity_overrides or {}
    out = {}
    for name, (ints, tex) in TISSUE_TABLE.items():
        val = float(ints[ci])
        if p.variability > 0 and name != "air":
            val *= max(0.3, 1.0 + 0.08 * p.variability * rng.standard_normal())
        if name in over:
            val = float(over[name])
        out[name] = np.array([val, *(float(p.texture) * np.asarray(tex))], np.float32)
    return out


def _texture(rng, shape, sigma_px) -> np.ndarray:
    """Periodic Gaussian-filtered white noise with unit standard deviation (filtered in Fourier space)."""
    h, w = shape
    spec = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    spec *= np.exp(-2.0 * np.pi ** 2 * ((sigma_px[0] * fy) ** 2 + (sigma_px[1] * fx) ** 2))
    f = np.fft.irfft2(spec, s=shape).astype(np.float32)
    return f / max(float(f.std()), 1e-6)


def _bias(p: PhantomParams, rng, shape) -> np.ndarray:
    """Smooth multiplicative field: brighter posteriorly (spine coil) plus random low-frequency waves."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    g = 0.6 * (xx / max(w - 1, 1) * 2 - 1)
    wave = np.zeros(shape, np.float32)
    for _ in range(3):
        fr, fc, ph = rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0), rng.uniform(0, 2 * np.pi)
        wave += np.cos(2 * np.pi * (fr * yy / h + fc * xx / w) + ph).astype(np.float32)
    g += 0.4 * wave / max(float(wave.std()), 1e-6) * 0.5
    return np.exp(float(p.bias_field) * g).astype(np.float32)


def render_canonical(p: PhantomParams, anat: _Anatomy, win: _Window, xs: np.ndarray,
                     seeds: tuple[np.random.SeedSequence, np.random.SeedSequence, np.random.SeedSequence]
                     ) -> np.ndarray:
    """Canonical ``(H, W, S)`` float32 image (integers 0..4095) of the slices at lateral positions ``xs`` (mm).

    ``seeds`` (intensities, texture, noise) feed the tissue values, the
    texture fields and their per-slice shifts, and the bias field and noise.
    """
    ss_int, ss_tex, ss_noise = seeds
    h, w = win.shape
    rmm, cmm = win.spacing
    n_s = len(xs)
    values = _tissue_values(p, np.random.default_rng(ss_int))
    rng_tex = np.random.default_rng(ss_tex)
    sig_f = (0.5 / rmm, 0.5 / cmm)
    sig_m = (3.0 / rmm, 0.8 / cmm)
    sig_c = (6.0 / rmm, 6.0 / cmm)

    static = _Canvas((h, w), values, win.to_px)
    _draw_static(static, anat)
    fields_ = [_texture(rng_tex, (h, w), sig) for sig in (sig_f, sig_m, sig_c)]
    canon = np.empty((h, w, n_s), np.float32)
    for s in range(n_s):
        canon[..., s] = _render_slice(static, anat, float(xs[s]), fields_, rng_tex, win)
    return _acquire(p, canon, np.random.default_rng(ss_noise))


def _render_slice(static: _Canvas, anat: _Anatomy, x: float, fields_: list[np.ndarray],
                  rng_tex: np.random.Generator, win: _Window) -> np.ndarray:
    """One slice: the static tissues plus this slice's, textured, blurred by the point-spread."""
    h, w = win.shape
    rmm, cmm = win.spacing
    cv = _Canvas((h, w), static.values, win.to_px)
    cv.ch[...] = static.ch
    _draw_soft(cv, anat, x)
    _draw_spine(cv, anat, x)
    ch = cv.ch
    tex = np.zeros((h, w), np.float32)
    for c, fld in enumerate(fields_):   # the same periodic fields, shifted differently on every slice
        tex += ch[c + 1] * np.roll(fld, (int(rng_tex.integers(h)), int(rng_tex.integers(w))), axis=(0, 1))
    img = ch[0] * np.maximum(1.0 + tex, 0.0)
    return ndimage.gaussian_filter(img, (PSF_MM / rmm, PSF_MM / cmm), mode="nearest")


def _acquire(p: PhantomParams, canon: np.ndarray, rng_n: np.random.Generator) -> np.ndarray:
    """Bias field, Rician noise and rounding to integers in 0..4095 (float32)."""
    h, w = canon.shape[:2]
    if p.bias_field > 0:
        canon *= _bias(p, rng_n, (h, w))[..., None]
    sigma = 1000.0 * float(p.noise)
    if sigma > 0:
        re = canon + sigma * rng_n.standard_normal(canon.shape, dtype=np.float32)
        im = sigma * rng_n.standard_normal(canon.shape, dtype=np.float32)
        canon = np.sqrt(re * re + im * im)
    return np.rint(np.clip(canon, 0.0, 4095.0)).astype(np.float32)
