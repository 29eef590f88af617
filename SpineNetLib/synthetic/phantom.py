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

Modules
-------
This module is the public entry: :func:`make_phantom`, the result classes and
(re-exported) the tables and constants of the modules that do the work:
:mod:`~SpineNetLib.synthetic.params` (:class:`PhantomParams`),
:mod:`~SpineNetLib.synthetic.anatomy` (tables, spine geometry, pathology
geometry, field of view; steps 1-2), :mod:`~SpineNetLib.synthetic.rendering`
(tissues, contrast, texture, bias field, noise; step 3) and
:mod:`~SpineNetLib.synthetic.writing` (input layout, DICOM and image files;
step 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.core.scan import Scan
from SpineNetLib.inputs.canonical import scan_from_array
from SpineNetLib.synthetic.anatomy import (
    AP_SHRINK, BODY_TABLE, DEFAULT_GRID, DISC_TABLE, NARROW_DISC_FACTOR, NOTCH_HALF_WIDTH_MM, SACRAL_TABLE,
    SI_SHRINK, SLIP_MM, VISIBLE_FRACTION, WEDGE_FRACTURE_FACTOR, _FOV_LEVELS, _Anatomy, _notch_polygon, _notches,
    _parse_pathology, _window, _Window,
)
from SpineNetLib.synthetic.params import (
    CONTRASTS, FOVS, ORIENTATIONS, PATHOLOGIES, TRANSITIONAL, PhantomParams,
)
from SpineNetLib.synthetic.rendering import PSF_MM, TISSUE_TABLE, polygon_coverage, render_canonical
from SpineNetLib.synthetic.writing import input_arrays, write_phantom_dicom, write_phantom_image

__all__ = [
    "make_phantom", "Phantom", "PhantomParams", "PhantomVertebra", "PhantomDisc",
    "FOVS", "CONTRASTS", "ORIENTATIONS", "PATHOLOGIES", "TRANSITIONAL", "DEFAULT_GRID",
    "BODY_TABLE", "SACRAL_TABLE", "DISC_TABLE", "TISSUE_TABLE",
    "VISIBLE_FRACTION", "AP_SHRINK", "SI_SHRINK", "SLIP_MM", "WEDGE_FRACTURE_FACTOR", "NARROW_DISC_FACTOR",
    "NOTCH_HALF_WIDTH_MM", "PSF_MM", "polygon_coverage",
]


# --------------------------------------------------------------------------- public dataclasses


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
    #: Bodies cut by the image edge whose centre is inside the image (e.g. T11 at the top of a
    #: lumbar phantom): visible, so a detector may find them, but not part of ``vertebrae``
    #: (no complete outline).  Their quads are unclipped and may reach outside the image.
    cut_vertebrae: list[PhantomVertebra] = field(default_factory=list)

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
        """Write the input array as an MR DICOM series (:func:`.writing.write_phantom_dicom`)."""
        return write_phantom_dicom(self, folder, **kwargs)

    def write_nifti(self, path) -> Path:
        """Write the input array as an image file (.nii.gz, .nrrd, ...) (:func:`.writing.write_phantom_image`)."""
        return write_phantom_image(self, path)


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


def make_phantom(params: PhantomParams | None = None, **kwargs) -> Phantom:
    """Synthesise a sagittal spine scan with exact ground truth; kwargs are :class:`PhantomParams` fields."""
    p = _validate(params, kwargs)
    ss_anat, ss_int, ss_tex, ss_noise = np.random.SeedSequence(int(p.seed)).spawn(4)
    by_level, by_disc = _parse_pathology(p.pathology)
    anat = _Anatomy(p, np.random.default_rng(ss_anat), by_level, by_disc)
    win = _window(anat, p)
    n_s = int(p.n_slices)
    thk = float(p.slice_thickness_mm)
    xs = (np.arange(n_s) - (n_s - 1) / 2.0) * thk - float(p.midline_offset_mm)
    canon = render_canonical(p, anat, win, xs, (ss_int, ss_tex, ss_noise))
    voxels_kji, ijk_to_ras = input_arrays(p, canon, win.spacing)
    scan = _checked_scan(p, voxels_kji, ijk_to_ras, canon)
    gt_v, listed, cut = _ground_truth_vertebrae(anat, win, xs, p.include_s2)
    gt_d = _ground_truth_discs(anat, win, xs, gt_v, listed)
    return Phantom(scan=scan, voxels_kji=voxels_kji, ijk_to_ras=ijk_to_ras, vertebrae=gt_v, discs=gt_d,
                   cut_vertebrae=cut,
                   params=p, lesions=_lesions(anat, win, xs))


def _checked_scan(p: PhantomParams, voxels_kji: np.ndarray, ijk_to_ras: np.ndarray, canon: np.ndarray) -> Scan:
    """The canonical :class:`Scan` of the input arrays, checked to reproduce the generated array."""
    meta = {"source": "SpineNetLib.synthetic.phantom", "fov": p.fov, "contrast": p.contrast, "seed": int(p.seed),
            "SeriesDescription": f"phantom {p.fov} {p.contrast}"}
    scan = scan_from_array(voxels_kji, ijk_to_ras, meta, resample_isotropic=False)
    if scan.voxels.shape != canon.shape or not np.array_equal(scan.voxels, canon):
        raise RuntimeError("phantom: canonical scan does not reproduce the generated array (layout bug)")
    return scan


# --------------------------------------------------------------------------- ground truth


def _ground_truth_vertebrae(anat: _Anatomy, win: _Window, xs: np.ndarray, include_s2: bool
                            ) -> tuple[list[PhantomVertebra], list[int], list[PhantomVertebra]]:
    """Listed vertebrae (inside the image on all their slices), their body indices in ``anat.bodies``,
    and the bodies cut by the image edge whose centroid is inside the image."""
    h, w = win.shape
    n_s = len(xs)
    gt_v: list[PhantomVertebra] = []
    listed: list[int] = []
    cut: list[PhantomVertebra] = []
    for i, b in enumerate(anat.bodies):
        if not (b.kind == "vertebra" or (include_s2 and b.name == "S2")):
            continue
        quads = {}
        for s in range(n_s):
            f = abs(xs[s]) / b.half_width
            if f < VISIBLE_FRACTION:
                quads[s] = win.to_px(b.profile(f))
        if not quads:
            continue
        allq = np.concatenate(list(quads.values()))
        sl = sorted(quads)
        mid = min(sl, key=lambda s: (abs(xs[s]), s))
        vertebra = PhantomVertebra(level=b.name, slices=sl, quads=quads,
                                   centroid_xy=win.to_px(b.centroid), mid_slice=int(mid),
                                   pathology=list(b.pathology), extra=b.kind != "vertebra",
                                   height_mm=b.height, anterior_height_mm=b.anterior_height,
                                   posterior_height_mm=b.posterior_height)
        if allq.min() < 0 or allq[:, 0].max() > w - 1 or allq[:, 1].max() > h - 1:
            x, y = vertebra.centroid_xy
            if 0 <= x <= w - 1 and 0 <= y <= h - 1:
                cut.append(vertebra)
            continue
        gt_v.append(vertebra)
        listed.append(i)
    return gt_v, listed, cut


def _ground_truth_discs(anat: _Anatomy, win: _Window, xs: np.ndarray, gt_v: list[PhantomVertebra],
                        listed: list[int]) -> list[PhantomDisc]:
    """The discs between consecutive listed vertebrae (``listed``: their body indices)."""
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
    return gt_d


def _lesions(anat: _Anatomy, win: _Window, xs: np.ndarray) -> list[dict]:
    """Endplate notches with their per-slice pixel boxes and the union box (see :class:`Phantom`)."""
    n_s = len(xs)
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
    return lesions
