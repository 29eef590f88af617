"""Synthetic sagittal spine MRI phantom with exact ground truth.

Why: tests, the demo and the small networks trained later need scans whose
vertebral corners are known exactly.  :func:`make_phantom` builds a sagittal
T1/T2/STIR-like scan of a textbook adult spine and returns it together with
the exact corner quadrilaterals (order rt, rb, lb, lt, docs/CONVENTIONS.md)
of every vertebral body in the canonical frame of ``Phantom.scan``.

How the phantom is built
------------------------
1. **Anatomy (mm).**  The vertebral bodies C2..S1 (then S2..S5 and the coccyx)
   are stacked as a chain of trapezoids and discs.  Every segment (body or
   disc) is given by the AP lengths of its upper and lower endplates
   (``L1``, ``L2``), its anterior and posterior heights and an optional AP
   shift.  With ``e`` the endplate direction (anterior -> posterior) and the
   segment's wedge angle ``w`` (positive = anterior taller = lordotic), the
   lower endplate is ``e2 = rot(-w) e1`` and its midpoint
   ``M2 = M1 + h n_b + shift e_b`` where ``e_b = rot(-w/2) e1`` is the
   segment's axis and ``n_b`` its normal (pointing inferior).  Then exactly
   ``anterior height = h + (L1+L2)/2 sin(w/2)`` and
   ``posterior height = h - (L1+L2)/2 sin(w/2)`` measured along ``n_b``, and
   ``|M2 - M1| = h`` (the body height of :data:`BODY_TABLE`).  Lordosis and
   kyphosis come from the wedges of :data:`BODY_TABLE` and :data:`DISC_TABLE`;
   the whole chain is then turned so that the C7 centroid lies plumb above
   the posterior-superior corner of S1 (sagittal vertical axis 0).
2. **Slices.**  Canonical slice ``s`` lies ``x = (s - (S-1)/2) * thickness -
   midline_offset_mm`` mm left of the spine's midline.  A body of lateral
   half-width ``hw`` (:data:`BODY_TABLE`) is visible on the slice when
   ``f = |x| / hw < VISIBLE_FRACTION`` (0.9).  There its outline is the
   mid-slice trapezoid scaled about its centroid, along its own axes, by
   ``1 - 0.25 f^2`` (AP) and ``1 - 0.06 f^2`` (SI); the ground-truth quad on
   that slice is exactly that scaled trapezoid.  Discs join the scaled
   bodies above and below.
3. **Rendering.**  Every structure is a polygon in mm mapped to canonical
   pixels (field of view window, in-plane rotation ``rotation_deg``,
   anisotropic pixels) and painted with exact anti-aliased area coverage
   (:func:`polygon_coverage`), so the 50 % contour of a body lies on its
   ground-truth edges.  Vertebral bodies have sharp corners: the GT corner
   is the rendered corner.  Tissues take intensities from
   :data:`TISSUE_TABLE` (per sequence), multiplied by smooth random texture,
   blurred by a symmetric point-spread (:data:`PSF_MM`, which keeps straight
   edges in place), multiplied by a smooth bias field, then Rician noise;
   values are rounded to integers in 0..4095.
4. **Input layout.**  The canonical array is permuted/flipped into the
   requested input layout (``voxels_kji`` + ``ijk_to_ras``) and passed
   through :func:`SpineNetLib.inputs.canonical.scan_from_array` (with
   ``resample_isotropic=False``); the result is checked to reproduce the
   canonical array exactly.  RAS: the image centre is at the origin, rows
   run to -S, columns to -A, canonical slices to -R (patient left).

Ground truth
------------
``Phantom.vertebrae`` lists, top to bottom, every body C2..S1 (plus "S2"
with ``extra=True`` when ``include_s2``) whose quads on all its slices lie
inside the image; cut-off bodies at the edges are rendered but not listed.
``Phantom.discs`` lists the discs between consecutive listed bodies.

Pathologies (``pathology={"L4-L5": ["narrow_disc"], "L3": ["endplate_notch"]}``):

* ``narrow_disc`` (disc key): both disc heights x :data:`NARROW_DISC_FACTOR`.
* ``dark_disc`` (disc key): desiccated nucleus (``nucleus_dark`` intensity).
* ``slip`` (level key "L4" or disc key "L4-L5"): the upper body (and the spine
  above) moves :data:`SLIP_MM` anteriorly along the disc relative to the
  lower one (anterolisthesis).
* ``wedge_fracture`` (level key): anterior height x
  :data:`WEDGE_FRACTURE_FACTOR`, posterior height kept; marrow oedema band
  under the superior endplate (bright on T2/STIR, dark on T1).
* ``endplate_notch``: a dark 9 x 4 mm semi-elliptical defect, at the superior
  endplate of a level key or at the inferior endplate of the upper body of a
  disc key, on slices within :data:`NOTCH_HALF_WIDTH_MM` of the midline;
  recorded in ``Phantom.lesions`` with per-slice pixel boxes.

Everything depends only on the parameters (``seed`` included); with
``variability=0`` the geometry is the textbook one whatever the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.core.scan import Scan

# --------------------------------------------------------------------------- tables

FOVS = ("cervical", "thoracic", "lumbar", "whole")
CONTRASTS = ("T1", "T2", "STIR")
ORIENTATIONS = ("dicom", "ras")
PATHOLOGIES = ("narrow_disc", "dark_disc", "slip", "wedge_fracture", "endplate_notch")
TRANSITIONAL = ("lumbarised_S1", "sacralised_L5")

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
#: Gaussian point-spread of the "scanner" (mm), applied before bias and noise; symmetric, so
#: straight edges keep their 50 % contour on the ground-truth line.
PSF_MM = 0.35

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


# --------------------------------------------------------------------------- public dataclasses


@dataclass
class PhantomParams:
    """What to synthesise; see the module docstring for the geometry rules."""

    fov: str = "lumbar"
    contrast: str = "T2"
    #: (rows, cols); None = keep the FOV's physical size (:data:`DEFAULT_GRID`).
    shape: tuple[int, int] | None = None
    #: (row_mm, col_mm); None = keep the FOV's physical size.
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness_mm: float = 4.0
    n_slices: int = 15
    #: In-plane tilt of the whole patient, degrees, counter-clockwise as displayed
    #: (head at the top, anterior on the left), about the image centre.
    rotation_deg: float = 0.0
    #: Standard deviation of the Gaussian noise in each quadrature channel, as a
    #: fraction of 1000 scanner units (Rician magnitude noise).
    noise: float = 0.025
    #: Strength of the smooth multiplicative bias field (0 = none; 0.2 = about +-20 %).
    bias_field: float = 0.15
    #: Level ("L3") or disc ("L4-L5") -> list of :data:`PATHOLOGIES`.
    pathology: dict[str, list[str]] = field(default_factory=dict)
    #: Reverse the input slice axis (dicom: k runs L->R instead of R->L; ras: i runs R->L instead of L->R).
    reverse_slices: bool = False
    #: Input array layout: "dicom" (i = A->P columns, j = S->I rows, k = slices) or
    #: "ras" (NIfTI-like: i = slices towards R, j = P->A, k = I->S).
    orientation: str = "dicom"
    seed: int = 0
    #: Partial field of view: the window covers these levels with 15 mm margins.
    top_level: str | None = None
    bottom_level: str | None = None
    #: None, "lumbarised_S1" or "sacralised_L5".
    transitional: str | None = None
    #: Also list the first fused sacral segment as "S2" (marked ``extra=True``).
    include_s2: bool = False
    #: Lateral position of the spine's midline, mm to the patient's left of the slab centre.
    midline_offset_mm: float = 0.0
    #: Scale of the tissue textures (0 = piecewise-constant tissues, handy for tests).
    texture: float = 1.0
    #: Tissue name (:data:`TISSUE_TABLE`) -> intensity replacing the sequence's value.
    intensity_overrides: dict[str, float] | None = None
    #: Inter-subject variation: 0 = textbook geometry and intensities (tables exact);
    #: 1 = typical variation of sizes (~4 %), curvature (~30 %) and intensities (~8 %).
    variability: float = 0.0


@dataclass
class PhantomVertebra:
    """Ground truth of one vertebral body in the canonical frame of ``Phantom.scan``."""

    level: str
    #: Canonical slice indices where the body is visible, ascending.
    slices: list[int]
    #: Canonical slice -> (4, 2) ``[x=col, y=row]`` corners rt, rb, lb, lt (pixels).
    quads: dict[int, np.ndarray]
    #: (2,) mean of the corners (the same on every slice: profiles scale about it).
    centroid_xy: np.ndarray
    #: Visible slice closest to the spine's midline.
    mid_slice: int
    #: Pathologies applied to this body ("wedge_fracture", "slip", "endplate_notch").
    pathology: list[str] = field(default_factory=list)
    #: True for bodies below S1 (the "S2" of ``include_s2``), not part of the C2..S1 levels.
    extra: bool = False
    #: Body height (mm, mid-endplate to mid-endplate) and anterior/posterior heights (mm) on the mid slice.
    height_mm: float = 0.0
    anterior_height_mm: float = 0.0
    posterior_height_mm: float = 0.0


@dataclass
class PhantomDisc:
    """Ground truth of one intervertebral disc (between two listed vertebrae)."""

    upper: str
    lower: str
    #: (2,) mean of the disc's corners [upper.lb, upper.rb, lower.rt, lower.lt] on the mid slice.
    centre_xy: np.ndarray
    #: round(mean of the two bodies' mid slices) (official §6).
    mid_slice: int
    #: Heights along the disc axis (the bisector of its two endplates), mm, on the body mid slices.
    anterior_height_mm: float
    posterior_height_mm: float
    pathology: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.upper}-{self.lower}"


@dataclass
class Phantom:
    """A synthetic scan, its input-space representation and exact ground truth."""

    scan: Scan
    voxels_kji: np.ndarray
    ijk_to_ras: np.ndarray
    vertebrae: list[PhantomVertebra]
    discs: list[PhantomDisc]
    params: PhantomParams
    #: Focal lesions: dicts with "type", "level", "endplate", "slices", "boxes"
    #: (canonical slice -> [x0, y0, x1, y1] pixels) and "box_xy" (union of the boxes).
    lesions: list[dict] = field(default_factory=list)

    @property
    def levels(self) -> list[str]:
        return [v.level for v in self.vertebrae]

    def vertebra(self, level: str) -> PhantomVertebra:
        for v in self.vertebrae:
            if v.level == level:
                return v
        raise KeyError(f"level {level} is not in this phantom (has {', '.join(self.levels)})")

    def disc(self, name: str) -> PhantomDisc:
        for d in self.discs:
            if d.name == name:
                return d
        raise KeyError(f"disc {name} is not in this phantom")

    def write_dicom(self, folder, **kwargs) -> list[Path]:
        """Write the input array as an MR DICOM series (``io_write.write_dicom_series``)."""
        from SpineNetLib.inputs.writers import write_dicom_series

        kwargs.setdefault("series_description", f"phantom {self.params.fov} {self.params.contrast}")
        return write_dicom_series(self.voxels_kji, self.ijk_to_ras, folder, **kwargs)

    def write_nifti(self, path) -> Path:
        """Write the input array as an image file (.nii.gz, .nrrd, ...) via ``io_write.write_image``."""
        from SpineNetLib.inputs.writers import write_image

        return write_image(self.voxels_kji, self.ijk_to_ras, path)


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
        """Outline on a slice at relative lateral position f (module docstring, rule 2)."""
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
    """Lower endplate (midpoint, direction) of a segment with the given heights (module docstring)."""
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
    ax = abs(x)
    H = anat.head
    # ---- posterior fossa, brainstem, clivus, face details
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

    # ---- airway: naso/oropharynx, larynx, trachea (to the carina at T5)
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

    # ---- thorax: mediastinum (fat, heart, great vessels, oesophagus), sternum
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

    # ---- abdomen and pelvis: loops/gas/fluid/fat, liver, bladder, rectum, psoas, vessels
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


#: Lateral half-width (mm) of an endplate notch.
NOTCH_HALF_WIDTH_MM = 5.0


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


def _draw_spine(cv: _Canvas, anat: _Anatomy, x: float) -> None:
    """Canal, cord, posterior elements, foramina, discs and vertebral bodies on one slice."""
    ax = abs(x)
    pc = anat.post
    bodies = anat.bodies
    cb = anat.canal_bodies
    L = anat.lev_at
    verts = [b for b in cb if b.kind == "vertebra" and (b.name != "S1" or b.lumbar_like)]
    disc_after = {d.upper: d for d in anat.discs}
    disc_before = {d.lower: d for d in anat.discs}

    def dh_below(b):
        d = disc_after.get(anat.idx[b.name])
        return d.posterior_height if d else 0.0

    def dh_above(b):
        d = disc_before.get(anat.idx[b.name])
        return d.posterior_height if d else 0.0

    s4 = anat.body("S4")
    s_canal_end = s4.s_bot
    s2 = anat.body("S2")
    s_sac_end = 0.5 * (s2.s_top + s2.s_bot)
    l1 = anat.body("L1")
    s_conus = l1.s_top + 0.75 * (l1.s_bot - l1.s_top)
    sa0 = verts[0].s_top + 0.55 * (verts[0].s_bot - verts[0].s_top)
    sb1 = verts[-1].s_bot + 0.5 * dh_below(verts[-1])

    def depth(s):
        return L(s, 0)

    # ---- posterior soft tissue: interspinous ligaments/fat, ligamentum flavum
    if ax < 5.5:
        reach_vals = [b_row[7] * math.cos(math.radians(b_row[8])) * 0.9 for b_row in anat.lev]
        cv.fill(pc.band(sa0, sb1, lambda s: depth(s) + 3.0,
                        lambda s: depth(s) + L(s, 10) + np.interp(s, anat.lev_s, reach_vals)), "interspinous")
    if ax < 14.0:
        cv.fill(pc.band(sa0, sb1, lambda s: depth(s) - 0.5, lambda s: depth(s) + 0.7 * L(s, 10)), "ligament")

    # ---- canal (epidural fat), dural sac (CSF), cord, cauda equina
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

    # ---- lateral: neural foramina, pedicles, articular pillars (off the canal)
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

    # ---- laminae and spinous processes (C2..L5), C1 arches
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
    c2 = bodies[0]
    if ax < 12:  # C1 anterior arch in front of the dens
        cv.fill(anat.head(*_ellipse((-13.5, 9.0), 5.5, 7.0, n=24).T), "cortex")
        cv.fill(anat.head(*_ellipse((-13.5, 9.0), 4.0, 5.5, n=24).T), "flat_bone")
    if ax < 15:  # C1 posterior arch
        p, nrm, _ = pc.at([c2.s_top + 6.0])
        cc = p[0] + (L(c2.s_top, 0) + 7.0) * nrm[0]
        cv.fill(_ellipse(cc, 6.0, 5.0, n=24), "cortex")
        cv.fill(_ellipse(cc, 4.5, 3.5, n=24), "flat_bone")

    # ---- sacrum: fused dorsal plate and median crest
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

    # ---- discs then vertebral bodies
    prof = {}
    for i, b in enumerate(bodies):
        f = ax / b.half_width
        if f < VISIBLE_FRACTION:
            prof[i] = b.profile(f)
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
    notch = _notches(anat)
    for i, q in prof.items():
        b = bodies[i]
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


# --------------------------------------------------------------------------- assembly


def _validate(params: PhantomParams | None, kwargs: dict) -> PhantomParams:
    names = {f.name for f in fields(PhantomParams)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise InputError(f"unknown phantom parameter(s): {', '.join(unknown)}")
    base = params if params is not None else PhantomParams()
    vals = {f.name: getattr(base, f.name) for f in fields(PhantomParams)}
    vals.update(kwargs)
    p = PhantomParams(**vals)
    if p.fov not in FOVS:
        raise InputError(f"unknown fov {p.fov!r}: use one of {', '.join(FOVS)}")
    c = str(p.contrast).upper()
    if c not in CONTRASTS:
        raise InputError(f"unknown contrast {p.contrast!r}: use one of {', '.join(CONTRASTS)}")
    p.contrast = c
    if p.orientation not in ORIENTATIONS:
        raise InputError(f"unknown orientation {p.orientation!r}: use one of {', '.join(ORIENTATIONS)}")
    if p.transitional is not None and p.transitional not in TRANSITIONAL:
        raise InputError(f"unknown transitional anatomy {p.transitional!r}: use None or one of "
                         f"{', '.join(TRANSITIONAL)}")
    if p.shape is not None:
        if len(tuple(p.shape)) != 2 or min(int(v) for v in p.shape) < 32:
            raise InputError(f"shape must be (rows, cols) of at least 32 pixels each, got {p.shape!r}")
        p.shape = (int(p.shape[0]), int(p.shape[1]))
    if p.pixel_spacing is not None:
        sp = tuple(float(v) for v in p.pixel_spacing)
        if len(sp) != 2 or not all(0.05 <= v <= 5.0 for v in sp):
            raise InputError(f"pixel_spacing must be (row_mm, col_mm) between 0.05 and 5 mm, got {p.pixel_spacing!r}")
        p.pixel_spacing = sp
    if not 0.2 <= float(p.slice_thickness_mm) <= 20.0:
        raise InputError(f"slice_thickness_mm must be between 0.2 and 20 mm, got {p.slice_thickness_mm!r}")
    if not 2 <= int(p.n_slices) <= 256:
        raise InputError(f"n_slices must be between 2 and 256, got {p.n_slices!r}")
    for name in ("noise", "bias_field", "variability", "texture"):
        if not float(getattr(p, name)) >= 0.0:
            raise InputError(f"{name} must be >= 0, got {getattr(p, name)!r}")
    for name in ("top_level", "bottom_level"):
        lv = getattr(p, name)
        if lv is not None and lv not in LEVELS_TOP_DOWN:
            raise InputError(f"{name} {lv!r} is not a level C2..S1")
    top = p.top_level or _FOV_LEVELS[p.fov][0]
    bot = p.bottom_level or _FOV_LEVELS[p.fov][1]
    if LEVELS_TOP_DOWN.index(top) > LEVELS_TOP_DOWN.index(bot):
        raise InputError(f"top_level {top} lies below bottom_level {bot}")
    _parse_pathology(p.pathology)
    if p.intensity_overrides is not None:
        bad = sorted(set(p.intensity_overrides) - set(TISSUE_TABLE))
        if bad:
            raise InputError(f"unknown tissue(s) in intensity_overrides: {', '.join(bad)}")
    return p


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


def _input_layout(p: PhantomParams, shape_hws: tuple[int, int, int]) -> np.ndarray:
    """4x4 mapping input ``[i, j, k, 1]`` to canonical ``[row, col, slice, 1]`` (permutation + flips)."""
    h, w, s = shape_hws
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    if p.orientation == "dicom":        # i = col, j = row, k = slice (R->L; reversed: L->R)
        m[0, 1] = 1.0
        m[1, 0] = 1.0
        if p.reverse_slices:
            m[2, 2], m[2, 3] = -1.0, s - 1
        else:
            m[2, 2] = 1.0
    else:                               # ras: i = slice towards R, j = towards A, k = towards S
        m[0, 2], m[0, 3] = -1.0, h - 1
        m[1, 1], m[1, 3] = -1.0, w - 1
        if p.reverse_slices:
            m[2, 0] = 1.0
        else:
            m[2, 0], m[2, 3] = -1.0, s - 1
    return m


def _to_input(canon: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Input array ``[k, j, i]`` whose voxel (i, j, k) is canonical voxel ``m @ (i, j, k)``."""
    arr = canon
    # canonical axis c is input axis a where m[c, a] != 0
    axis_of = [int(np.flatnonzero(m[c, :3])[0]) for c in range(3)]
    for c in range(3):
        if m[c, axis_of[c]] < 0:
            arr = np.flip(arr, axis=c)
    # reorder canonical axes into (k, j, i) = input axes (2, 1, 0)
    order = [axis_of.index(a) for a in (2, 1, 0)]
    return np.ascontiguousarray(np.transpose(arr, order))


def make_phantom(params: PhantomParams | None = None, **kwargs) -> Phantom:
    """Synthesise a sagittal spine scan with exact ground truth; kwargs are :class:`PhantomParams` fields."""
    from SpineNetLib.inputs.canonical import scan_from_array

    p = _validate(params, kwargs)
    ss_anat, ss_int, ss_tex, ss_noise = np.random.SeedSequence(int(p.seed)).spawn(4)
    by_level, by_disc = _parse_pathology(p.pathology)
    anat = _Anatomy(p, np.random.default_rng(ss_anat), by_level, by_disc)
    win = _window(anat, p)
    h, w = win.shape
    rmm, cmm = win.spacing
    n_s = int(p.n_slices)
    thk = float(p.slice_thickness_mm)
    xs = (np.arange(n_s) - (n_s - 1) / 2.0) * thk - float(p.midline_offset_mm)
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
        cv = _Canvas((h, w), values, win.to_px)
        cv.ch[...] = static.ch
        _draw_soft(cv, anat, float(xs[s]))
        _draw_spine(cv, anat, float(xs[s]))
        ch = cv.ch
        tex = np.zeros((h, w), np.float32)
        for c, fld in enumerate(fields_):   # the same periodic fields, shifted differently on every slice
            tex += ch[c + 1] * np.roll(fld, (int(rng_tex.integers(h)), int(rng_tex.integers(w))), axis=(0, 1))
        img = ch[0] * np.maximum(1.0 + tex, 0.0)
        canon[..., s] = ndimage.gaussian_filter(img, (PSF_MM / rmm, PSF_MM / cmm), mode="nearest")
    rng_n = np.random.default_rng(ss_noise)
    if p.bias_field > 0:
        canon *= _bias(p, rng_n, (h, w))[..., None]
    sigma = 1000.0 * float(p.noise)
    if sigma > 0:
        re = canon + sigma * rng_n.standard_normal(canon.shape, dtype=np.float32)
        im = sigma * rng_n.standard_normal(canon.shape, dtype=np.float32)
        canon = np.sqrt(re * re + im * im)
    canon = np.rint(np.clip(canon, 0.0, 4095.0)).astype(np.float32)

    # ---- geometry of the input array
    c2r = np.zeros((4, 4))
    c2r[0, 2], c2r[0, 3] = -thk, (n_s - 1) / 2.0 * thk                # R: slices run right -> left
    c2r[1, 1], c2r[1, 3] = -cmm, (w - 1) / 2.0 * cmm                  # A: columns run anterior -> posterior
    c2r[2, 0], c2r[2, 3] = -rmm, (h - 1) / 2.0 * rmm                  # S: rows run superior -> inferior
    c2r[3, 3] = 1.0
    m = _input_layout(p, (h, w, n_s))
    ijk_to_ras = c2r @ m
    voxels_kji = _to_input(canon, m)
    meta = {"source": "SpineNetLib.synthetic.phantom", "fov": p.fov, "contrast": p.contrast, "seed": int(p.seed),
            "SeriesDescription": f"phantom {p.fov} {p.contrast}"}
    scan = scan_from_array(voxels_kji, ijk_to_ras, meta, resample_isotropic=False)
    if scan.voxels.shape != canon.shape or not np.array_equal(scan.voxels, canon):
        raise RuntimeError("phantom: canonical scan does not reproduce the generated array (layout bug)")

    # ---- ground truth
    gt_v: list[PhantomVertebra] = []
    listed: list[int] = []
    for i, b in enumerate(anat.bodies):
        if not (b.kind == "vertebra" or (p.include_s2 and b.name == "S2")):
            continue
        quads = {}
        for s in range(n_s):
            f = abs(xs[s]) / b.half_width
            if f < VISIBLE_FRACTION:
                quads[s] = win.to_px(b.profile(f))
        if not quads:
            continue
        allq = np.concatenate(list(quads.values()))
        if allq.min() < 0 or allq[:, 0].max() > w - 1 or allq[:, 1].max() > h - 1:
            continue
        sl = sorted(quads)
        mid = min(sl, key=lambda s: (abs(xs[s]), s))
        gt_v.append(PhantomVertebra(level=b.name, slices=sl, quads=quads,
                                    centroid_xy=win.to_px(b.centroid), mid_slice=int(mid),
                                    pathology=list(b.pathology), extra=b.kind != "vertebra",
                                    height_mm=b.height, anterior_height_mm=b.anterior_height,
                                    posterior_height_mm=b.posterior_height))
        listed.append(i)
    gt_d: list[PhantomDisc] = []
    for d in anat.discs:
        if d.upper in listed and d.lower in listed:
            vu, vl = gt_v[listed.index(d.upper)], gt_v[listed.index(d.lower)]
            ms = int(round(0.5 * (vu.mid_slice + vl.mid_slice)))
            up = anat.bodies[d.upper].profile(min(abs(xs[ms]) / anat.bodies[d.upper].half_width, 1.0))
            lo = anat.bodies[d.lower].profile(min(abs(xs[ms]) / anat.bodies[d.lower].half_width, 1.0))
            corners = win.to_px(np.array([up[2], up[1], lo[0], lo[3]]))
            gt_d.append(PhantomDisc(upper=vu.level, lower=vl.level, centre_xy=corners.mean(axis=0), mid_slice=ms,
                                    anterior_height_mm=d.anterior_height, posterior_height_mm=d.posterior_height,
                                    pathology=list(d.pathology)))
    lesions = []
    for i, ep in _notches(anat):
        b = anat.bodies[i]
        boxes = {}
        for s in range(n_s):
            f = abs(xs[s]) / b.half_width
            if f < VISIBLE_FRACTION and abs(xs[s]) < NOTCH_HALF_WIDTH_MM:
                px = win.to_px(_notch_polygon(b.profile(f), b, ep))
                boxes[s] = [float(px[:, 0].min()), float(px[:, 1].min()), float(px[:, 0].max()), float(px[:, 1].max())]
        if boxes:
            allb = np.array(list(boxes.values()))
            lesions.append({"type": "endplate_notch", "level": b.name, "endplate": ep, "slices": sorted(boxes),
                            "boxes": boxes, "box_xy": [float(allb[:, 0].min()), float(allb[:, 1].min()),
                                                       float(allb[:, 2].max()), float(allb[:, 3].max())]})
    return Phantom(scan=scan, voxels_kji=voxels_kji, ijk_to_ras=ijk_to_ras, vertebrae=gt_v, discs=gt_d,
                   params=p, lesions=lesions)
