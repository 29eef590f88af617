"""The real lumbar MRI cases of ``shared/data`` as training and validation material.

What is here, and why
---------------------
* :func:`list_cases` / :func:`load_case` read the cases (``image.nii.gz``,
  ``labels.nii.gz``, ``case.json``; see ``shared/data/README.md``) with
  SimpleITK into the canonical frame of :class:`SpineNetLib.core.scan.Scan`.
* :func:`vertebra_quad_from_mask` turns a vertebral-body mask on one sagittal
  slice into the quadrilateral the VFR detector is trained on (corner order
  rt, rb, lb, lt, docs/CONVENTIONS.md; paper §4.4.1), and
  :func:`slice_targets` does it for every body on a slice.
* :func:`annotated_band` and :func:`detection_loss_mask` say where the
  detection loss may be applied: only part of each spine is annotated, and an
  unannotated real vertebra must not be taught as background.
* :func:`patient_split` / :func:`default_split`: train/validation split by
  patient.

Orientation (verified against the NIfTI headers)
------------------------------------------------
SimpleITK returns the array as numpy ``[k, j, i]``.  In every case the
IJK-to-RAS matrix (LPS direction from SimpleITK, flipped to RAS) is, up to
the origin, ``i -> (0, 0, -1)`` (superior->inferior), ``j -> (0, -1, 0)``
(anterior->posterior), ``k -> (-1, 0, 0)`` (right->left), 1 mm each.  The
README's "array axis 0/1/2" are i/j/k.  The canonical frame
(``SpineNetLib.inputs.canonical.scan_from_array`` without resampling) is therefore
``[row, col, slice] = [i, j, k]``: a plain transpose of the SimpleITK array,
slices in stored order (the README notes that the true left-right direction
was not recorded; the headers say k runs right->left, and nothing here
depends on it).  Images were checked visually: head at the top, abdomen on
the left.  Nothing is resampled: every stored 1 mm slice is a training
sample.

Data quirks found while writing this (all 55 cases of shared/data)
------------------------------------------------------------------
* Many label slices equal their neighbour (myosegmentum 990 of 1794
  neighbouring annotated pairs, chu 104 of 944; the curators resampled
  thicker slices to 1 mm), so neighbouring slices are not independent samples.
* On the lateral edge slices a body's mask is often split into pieces (the
  curved lateral cortex is cut tangentially): about 4% of body masks on a
  slice have a largest 8-connected piece holding < 90% of the pixels.  Those
  get no quadrilateral and are masked out of the loss (:func:`detection_loss_mask`).
* ``ivd/`` annotates discs only: no vertebra targets (``DETECTION_SOURCES``).
* ``tianchi/`` holds one sagittal slice per study with centre points (drawn as 3 mm disks) of
  L1-L5 and of the discs: scored by :mod:`SpineNetLib.evaluation.evaluate`, no detection targets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from SpineNetLib.core import polygons
from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.canonical import scan_from_array
from SpineNetLib.inputs.image import image_ijk_to_ras

#: Folder name under the data root -> source name.
SOURCE_FOLDERS: dict[str, str] = {"chu": "chu", "myosegmentum": "myosegmentum", "ivd": "ivd", "zukic": "zukic",
                                   "tianchi": "tianchi"}
SOURCES: tuple[str, ...] = ("chu", "myosegmentum", "ivd", "zukic", "tianchi")
#: Sources annotated with centre points drawn as small disks (README: tianchi/ marks the centres of
#: L1-L5 and of the discs T12-L1 .. L5-S1 on one mid-sagittal slice), not with outlines.
POINT_SOURCES: tuple[str, ...] = ("tianchi",)
#: Sources whose labels hold vertebral bodies (ivd/ has discs only).
DETECTION_SOURCES: tuple[str, ...] = ("chu", "myosegmentum", "zukic")
#: Sources where S1 is visible but not annotated (README): mask the loss below the lowest body.
S1_UNANNOTATED_SOURCES: tuple[str, ...] = ("chu", "myosegmentum")

#: Label codes of vertebral bodies (README): C1..C7 = 1..7, T1..T12 = 8..19, L1..L5 = 20..24, S1 = 26.
VERTEBRA_CODES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{7 + i: f"T{i}" for i in range(1, 13)},
    **{19 + i: f"L{i}" for i in range(1, 6)},
    26: "S1",
}


def is_vertebral_body_code(code: int) -> bool:
    """Label value of a vertebral body (discs are 100 + code of the body above)."""
    return int(code) in VERTEBRA_CODES


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class RealCase:
    """One case folder of the real data set."""

    case_id: str      # folder name, e.g. "chu_06"
    source: str       # "chu" | "myosegmentum" | "ivd" | "zukic"
    patient_id: str   # cases of one patient share it
    sequence: str     # from case.json, e.g. "T2"
    path: Path        # the case folder


def default_data_root() -> Path:
    """``$SPINENET_DATA`` if set, else ``shared/data`` beside the repository root."""
    env = os.environ.get("SPINENET_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def patient_of(source: str, case_id: str) -> str:
    """Patient id of a case.

    zukic/ case names are ``zukic_<n>_<series>_<sequence>`` where the series
    is a patient code with a one-digit series number (``AKa3``, ``AKa4``: both
    patient AKa) or a subject code (``S01``).  Every other case is its own
    patient (README: one scan per subject).
    """
    if source == "zukic":
        parts = case_id.split("_")
        if len(parts) >= 3:
            series = parts[2]
            m = re.fullmatch(r"([A-Za-z]+)\d", series)
            return f"zukic_{m.group(1) if m else series}"
    return case_id


def list_cases(data_root: str | os.PathLike | None = None, sources: Sequence[str] | None = None) -> list[RealCase]:
    """All cases under ``data_root`` (default :func:`default_data_root`), sorted by (source, case_id).

    Cases whose ``case.json`` says ``suspect_label_order`` (5 of tianchi/) are left out.
    """
    root = Path(data_root) if data_root is not None else default_data_root()
    if not root.is_dir():
        raise InputError(f"no data folder at {root}")
    wanted = tuple(sources) if sources is not None else SOURCES
    for s in wanted:
        if s not in SOURCES:
            raise InputError(f"unknown data source {s!r} (known: {', '.join(SOURCES)})")
    cases = []
    for folder, source in SOURCE_FOLDERS.items():
        if source not in wanted or not (root / folder).is_dir():
            continue
        for case_dir in sorted((root / folder).iterdir()):
            meta_path = case_dir / "case.json"
            if not meta_path.is_file():
                continue
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("suspect_label_order"):
                continue  # two neighbouring labels swapped in the source annotation (README): not usable
            cases.append(RealCase(case_id=case_dir.name, source=source,
                                  patient_id=patient_of(source, case_dir.name),
                                  sequence=str(meta.get("sequence", "")), path=case_dir))
    cases.sort(key=lambda c: (SOURCES.index(c.source), c.case_id))
    return cases


class CaseData(NamedTuple):
    """A loaded case in the canonical frame (rows S->I, cols A->P, slices as stored)."""

    voxels: np.ndarray                      # float32 (H, W, S)
    labels: np.ndarray                      # uint8 (H, W, S)
    spacing_mm: tuple[float, float, float]  # (row, col, slice)
    level_names: dict[int, str]             # label value -> name from case.json ("L4", "L4-L5", ...)


@dataclass(frozen=True)
class CaseGeometry:
    """How a case's canonical voxel grid sits in its NIfTI's RAS space."""

    case_id: str
    shape: tuple[int, int, int]              # canonical (H, W, S)
    spacing_mm: tuple[float, float, float]   # (row, col, slice)
    canonical_to_ras: np.ndarray             # 4x4: [row, col, slice, 1] -> RAS mm
    input_ijk_to_ras: np.ndarray             # 4x4, the NIfTI's IJK-to-RAS
    input_shape_ijk: tuple[int, int, int]
    canonical_to_input_ijk: np.ndarray       # 4x4

    def ras_to_canonical(self, ras) -> np.ndarray:
        """``(N, 3)`` RAS mm -> ``(N, 3)`` canonical ``[row, col, slice]`` (floats)."""
        p = np.asarray(ras, dtype=float).reshape(-1, 3)
        hom = np.concatenate([p, np.ones((len(p), 1))], axis=1)
        return (hom @ np.linalg.inv(self.canonical_to_ras).T)[:, :3]


def read_volume(path: Path):
    """``(array [k, j, i], IJK-to-RAS)`` of a 3D scalar image file of the training data."""
    import SimpleITK as sitk

    if not path.is_file():
        raise InputError(f"missing file {path}")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} is not a 3D scalar volume")
    return sitk.GetArrayFromImage(img), image_ijk_to_ras(img)


def _canonical(array_kji: np.ndarray, ijk_to_ras: np.ndarray):
    """The pipeline's canonicalisation, without slab resampling (see module docstring)."""
    from SpineNetLib.inputs.canonical import scan_from_array

    return scan_from_array(array_kji, ijk_to_ras, resample_isotropic=False)


def _level_names(case: RealCase) -> dict[int, str]:
    meta = json.loads((case.path / "case.json").read_text(encoding="utf-8"))
    try:
        return {int(k): str(v) for k, v in meta["labels"].items()}
    except (KeyError, ValueError, AttributeError):
        raise InputError(f"{case.path / 'case.json'} has no valid 'labels' table") from None


def load_case(case: RealCase) -> CaseData:
    """Voxels and labels of a case in the canonical frame (no resampling)."""
    img, img_affine = read_volume(case.path / "image.nii.gz")
    lab, lab_affine = read_volume(case.path / "labels.nii.gz")
    if img.shape != lab.shape or not np.allclose(img_affine, lab_affine, atol=1e-3):
        raise InputError(f"{case.case_id}: image and labels differ in shape or geometry")
    scan = _canonical(img, img_affine)
    labels = _canonical(lab, lab_affine).voxels
    labels = np.rint(labels).astype(np.uint8)
    names = _level_names(case)
    unknown = sorted(set(np.unique(labels).tolist()) - set(names) - {0})
    if unknown:
        raise InputError(f"{case.case_id}: label values {unknown} are not named in case.json")
    return CaseData(voxels=scan.voxels, labels=labels, spacing_mm=tuple(scan.spacing_mm), level_names=names)


def case_geometry(case: RealCase) -> CaseGeometry:
    """Geometry of a case's ``image.nii.gz`` (header read + canonicalisation of a tiny stand-in)."""
    import SimpleITK as sitk

    path = case.path / "image.nii.gz"
    if not path.is_file():
        raise InputError(f"missing file {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = tuple(int(n) for n in reader.GetSize())
    ijk_to_ras = image_ijk_to_ras(reader)  # the reader has the image's geometry getters
    # Canonicalise a zero array of the right shape: same matrices as the real volume.
    scan = _canonical(np.zeros(size[::-1], dtype=np.uint8), ijk_to_ras)
    return CaseGeometry(case_id=case.case_id, shape=scan.shape, spacing_mm=tuple(scan.spacing_mm),
                        canonical_to_ras=scan.canonical_to_ras, input_ijk_to_ras=ijk_to_ras,
                        input_shape_ijk=size, canonical_to_input_ijk=scan.canonical_to_input_ijk)


# --------------------------------------------------------------------------- quadrilaterals

#: Body masks smaller than this (pixels) give no quadrilateral.
MIN_BODY_PIXELS = 30
#: The largest 8-connected piece must hold this share of the mask, else it is "fragmentary".
MIN_MAIN_PIECE_FRACTION = 0.9
#: The quad must overlap its mask piece by this IoU, else the mask is not box-like enough to
#: give corners.  Measured on the real data (13,901 slice masks): median 0.87, 2% below 0.7,
#: nearly all of them lateral edge slices where the mask is a partial, ragged cut of the body.
MIN_QUAD_IOU = 0.7
#: Candidate orientations of the body frame: every 0.5 degree of a quarter turn.
_ANGLES_DEG = np.array(sorted(np.arange(-45.0, 45.0, 0.5), key=lambda a: (abs(a), a)))
_EIGHT = np.ones((3, 3), dtype=bool)


def _main_piece(mask_2d: np.ndarray, min_pixels: int, min_main_fraction: float) -> np.ndarray | None:
    """Largest 8-connected piece of the mask, or None if tiny, fragmentary or clipped by the border."""
    mask = np.asarray(mask_2d, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a 2D mask is needed, got shape {mask.shape}")
    total = int(mask.sum())
    if total < min_pixels:
        return None
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        return None  # clipped at the image border: its true corners may be outside
    lab, n = ndimage.label(mask, structure=_EIGHT)
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        k = int(np.argmax(sizes)) + 1
        if sizes[k - 1] < min_main_fraction * total or sizes[k - 1] < min_pixels:
            return None
        mask = lab == k
    return mask


def body_axis_angle(xs: np.ndarray, ys: np.ndarray, prior_deg: float = 0.0) -> float:
    """Direction (degrees, image frame, y down) of the body's anterior->posterior axis.

    The body frame is that of the minimum-area bounding rectangle of the
    pixels (searched every 0.5 degree).  Principal axes were tried first but
    are undefined for near-square masks (eigenvalue ratio ~1 for ~10% of the
    real lumbar bodies, giving frames 30-45 degrees off); the minimum-area
    rectangle of a roughly box-shaped body aligns with its endplates
    regardless of its aspect ratio.  Of the rectangle's two axes, the AP axis
    is the one closer to ``prior_deg`` (0 = the image x axis; :func:`slice_targets`
    passes the normal of the local spine axis).  The result lies in
    (-90, 90], so the axis points posterior (+x side).
    """
    pts = np.stack([np.asarray(xs, float), np.asarray(ys, float)], axis=1)
    pts = pts - pts.mean(axis=0)
    theta = np.deg2rad(_ANGLES_DEG)
    u = pts @ np.stack([np.cos(theta), np.sin(theta)])          # (N, A)
    v = pts @ np.stack([-np.sin(theta), np.cos(theta)])
    areas = (np.ptp(u, axis=0) + 1.0) * (np.ptp(v, axis=0) + 1.0)
    best = float(_ANGLES_DEG[int(np.argmin(areas))])  # ties: smallest |angle| (angle order)
    other = best + 90.0 if best <= 0 else best - 90.0
    return best if abs(best - prior_deg) <= abs(other - prior_deg) else other


def quad_mask_iou(quad: np.ndarray, mask_2d: np.ndarray) -> float:
    """IoU of a quad (rasterised at pixel centres) and a mask."""
    mask = np.asarray(mask_2d, dtype=bool)
    h, w = mask.shape
    x0, x1 = max(int(np.floor(quad[:, 0].min())), 0), min(int(np.ceil(quad[:, 0].max())) + 1, w)
    y0, y1 = max(int(np.floor(quad[:, 1].min())), 0), min(int(np.ceil(quad[:, 1].max())) + 1, h)
    inside = np.zeros_like(mask)
    if x1 > x0 and y1 > y0:
        yy, xx = np.mgrid[y0:y1, x0:x1]
        pts = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(float)
        inside[y0:y1, x0:x1] = polygons.points_in_polygon(pts, quad).reshape(y1 - y0, x1 - x0)
    union = np.count_nonzero(inside | mask)
    return float(np.count_nonzero(inside & mask)) / union if union else 0.0


def _quad_and_angle(mask_2d, prior_deg: float, frame_deg: float | None, min_pixels: int,
                    min_main_fraction: float, min_quad_iou: float):
    piece = _main_piece(mask_2d, min_pixels, min_main_fraction)
    if piece is None:
        return None, None
    ys, xs = np.nonzero(piece)
    angle = body_axis_angle(xs, ys, prior_deg) if frame_deg is None else float(frame_deg)
    a = np.deg2rad(angle)
    u = xs * np.cos(a) + ys * np.sin(a)       # along AP, towards posterior
    v = -xs * np.sin(a) + ys * np.cos(a)      # along SI, towards inferior
    # Scale by the body's half extents so the diagonals are the body's own.
    un = (u - 0.5 * (u.max() + u.min())) / max(0.5 * np.ptp(u), 0.5)
    vn = (v - 0.5 * (v.max() + v.min())) / max(0.5 * np.ptp(v), 0.5)
    corners = []
    for su, sv in ((1, -1), (1, 1), (-1, 1), (-1, -1)):  # rt, rb, lb, lt
        i = int(np.argmax(su * un + sv * vn))
        corners.append((float(xs[i]), float(ys[i])))
    quad = np.array(corners, dtype=np.float64)
    if min_quad_iou > 0 and quad_mask_iou(quad, piece) < min_quad_iou:
        return None, None
    return quad, angle


def vertebra_quad_from_mask(mask_2d: np.ndarray, *, prior_angle_deg: float = 0.0,
                            frame_angle_deg: float | None = None,
                            min_pixels: int = MIN_BODY_PIXELS,
                            min_main_fraction: float = MIN_MAIN_PIECE_FRACTION,
                            min_quad_iou: float = MIN_QUAD_IOU) -> np.ndarray | None:
    """Corners ``(4, 2)`` ``[x=col, y=row]`` (rt, rb, lb, lt) of a body mask on one slice, or None.

    Each corner is the mask pixel (centre) extreme along one of the body's own
    diagonals: in the body frame (u along AP towards posterior, v along SI
    towards inferior; :func:`body_axis_angle` with ``prior_angle_deg``, or the
    given ``frame_angle_deg``), both scaled to [-1, 1] by the body's extents,
    rt maximises u - v, rb u + v, lb -u + v, lt -u - v.  So every corner is a
    mask pixel.  Only the largest 8-connected piece is used; None when the
    mask has < ``min_pixels`` pixels, when that piece holds <
    ``min_main_fraction`` of them (fragmentary lateral slices), when the mask
    touches the image border (its true corners may lie outside), and when
    the quad overlaps the piece by an IoU below ``min_quad_iou`` (ragged or
    partial masks whose "corners" are not the body's).
    """
    quad, _ = _quad_and_angle(mask_2d, prior_angle_deg, frame_angle_deg, min_pixels, min_main_fraction,
                              min_quad_iou)
    return quad


def mask_centroid(mask_2d: np.ndarray) -> np.ndarray:
    """``(x, y)`` centroid of a mask; if it falls outside the mask, the nearest mask pixel."""
    ys, xs = np.nonzero(mask_2d)
    c = np.array([xs.mean(), ys.mean()])
    r, q = int(np.rint(c[1])), int(np.rint(c[0]))
    if not mask_2d[r, q]:
        d2 = (xs - c[0]) ** 2 + (ys - c[1]) ** 2
        i = int(np.argmin(d2))
        c = np.array([float(xs[i]), float(ys[i])])
    return c


class BodyTarget(NamedTuple):
    """Detection target of one vertebral body on one slice."""

    level: str
    quad: np.ndarray       # (4, 2) [x, y], rt, rb, lb, lt
    centroid: np.ndarray   # (2,) [x, y]


#: Sacral AP-axis prior (degrees) when L5 is not on the slice: supine sacral slope ~30-40.
S1_PRIOR_DEG = -30.0
#: Slices where a body's mask is below this share of its largest area give no target (lateral edge).
MIN_AREA_FRACTION = 0.25


def body_reference_areas(labels: np.ndarray) -> dict[int, int]:
    """Largest mask area (pixels) over slices of every vertebral body in a ``(H, W, S)`` label volume."""
    out = {}
    for code in np.unique(labels):
        if is_vertebral_body_code(code):
            out[int(code)] = int((labels == code).sum(axis=(0, 1)).max())
    return out


def _ap_angle_from_spine_axis(si_direction) -> float:
    """AP-axis angle (degrees) perpendicular to a superior->inferior direction ``(dx, dy)``."""
    dx, dy = float(si_direction[0]), float(si_direction[1])
    return float(np.degrees(np.arctan2(-dx, dy)))


def _slice_bodies(labels_2d, label_to_level, reference_areas, min_area_fraction):
    """``[(code, level, mask, quad or None, centroid or None)]`` top to bottom (by code).

    Orientation: every body's AP axis is chosen (of its minimum-area
    rectangle's two axes) closest to the normal of the local spine axis, the
    line through the mask centroids of its neighbours on the slice.  This
    holds even for L5 tilted past 45 degrees.  The sacrum is no box: its
    minimum-area rectangle can sit 45 degrees off its endplates (zukic AKa),
    so S1's frame is the normal of the L5 -> S1 centroid line itself.
    """
    labels_2d = np.asarray(labels_2d)
    if labels_2d.ndim != 2:
        raise ValueError(f"a 2D label slice is needed, got shape {labels_2d.shape}")
    codes = sorted(int(c) for c in np.unique(labels_2d) if is_vertebral_body_code(c))
    masks = {c: labels_2d == c for c in codes}
    centres = {c: mask_centroid(m) for c, m in masks.items()}
    out = []
    for i, code in enumerate(codes):
        level = label_to_level.get(code, VERTEBRA_CODES[code])
        mask = masks[code]
        quad = None
        small = (reference_areas is not None and code in reference_areas
                 and mask.sum() < min_area_fraction * reference_areas[code])
        if not small:
            above = centres[codes[i - 1]] if i > 0 else None
            below = centres[codes[i + 1]] if i + 1 < len(codes) else None
            frame = None
            if above is None and below is None:
                prior = S1_PRIOR_DEG if code == 26 else 0.0
            else:
                upper = above if above is not None else centres[code]
                lower = below if below is not None else centres[code]
                prior = _ap_angle_from_spine_axis(lower - upper)
                if code == 26 and i > 0 and codes[i - 1] == 24:
                    frame = _ap_angle_from_spine_axis(centres[code] - above)
            quad, _ = _quad_and_angle(mask, prior, frame, MIN_BODY_PIXELS, MIN_MAIN_PIECE_FRACTION,
                                      MIN_QUAD_IOU)
        centroid = centres[code] if quad is not None else None
        out.append((code, level, mask, quad, centroid))
    return out


def slice_targets(labels_2d: np.ndarray, label_to_level: dict[int, str], *,
                  reference_areas: dict[int, int] | None = None,
                  min_area_fraction: float = MIN_AREA_FRACTION) -> list[BodyTarget]:
    """Targets of every vertebral body (codes 1..24, 26; discs ignored) on one slice, top to bottom.

    ``centroid`` is the mask centroid (the body's centre; the detector's
    centroid channel should mark it, and the evaluation's ground truth uses
    the same point, :mod:`SpineNetLib.evaluation.evaluate`).  It does not depend on the
    corner heuristic; on the real data it lies 0.87 px (mean; 95th percentile
    1.9 px, mid slices 0.71 px) from the corner mean, the centroid the
    pipeline reports, which bounds the localisation error a perfect detector
    would get.
    Bodies whose mask gives no quad (:func:`vertebra_quad_from_mask`), or
    whose area is below ``min_area_fraction`` of ``reference_areas[code]``
    (:func:`body_reference_areas`, lateral edge slices), are left out; mask
    them from the loss with :func:`detection_loss_mask`.  Orientation of each
    body frame: see :func:`_slice_bodies`.
    """
    return [BodyTarget(level, quad, centroid)
            for _, level, _, quad, centroid in _slice_bodies(labels_2d, label_to_level,
                                                             reference_areas, min_area_fraction)
            if quad is not None]


# --------------------------------------------------------------------------- where the loss applies

#: Extra millimetres of disc kept inside the band beyond the first/last annotated body.
BAND_MARGIN_MM = 2.0
#: Dilation (pixels) of bodies that have a mask but no target, before masking them out of the loss.
UNUSABLE_BODY_MARGIN_PX = 3


@dataclass(frozen=True)
class AnnotatedBand:
    """The part of every slice of a case that lies within the annotated vertebrae.

    Bounded by two lines ``row = a + b * col`` (``upper``, ``lower``), fitted
    to the superior edge of the highest annotated body and the inferior edge
    of the lowest one and moved ``margin`` into the neighbouring disc.  A line
    is None where nothing beyond it is left unannotated.
    """

    upper: tuple[float, float] | None
    lower: tuple[float, float] | None
    empty: bool = False  # no annotated body at all: nothing may be learned from the case

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` bool, True where the detection loss applies."""
        h, w = int(shape[0]), int(shape[1])
        if self.empty:
            return np.zeros((h, w), dtype=bool)
        rows = np.arange(h, dtype=float)[:, None]
        cols = np.arange(w, dtype=float)[None, :]
        out = np.ones((h, w), dtype=bool)
        if self.upper is not None:
            out &= rows >= self.upper[0] + self.upper[1] * cols
        if self.lower is not None:
            out &= rows <= self.lower[0] + self.lower[1] * cols
        return out

    def row_band(self, width: int) -> tuple[int | None, int | None]:
        """Conservative horizontal band ``(top_row, bottom_row)`` inside the lines over all columns."""
        cols = np.array([0.0, float(width - 1)])
        top = None if self.upper is None else int(np.ceil(np.max(self.upper[0] + self.upper[1] * cols)))
        bottom = None if self.lower is None else int(np.floor(np.min(self.lower[0] + self.lower[1] * cols)))
        return top, bottom


def _edge_line(mask_3d: np.ndarray, superior: bool) -> tuple[float, float]:
    """Line ``row = a + b*col`` through the superior (or inferior) edge of a body over all slices.

    For every column the topmost (bottom-most) mask row is taken; the outer
    20% of columns on each side (rounded corners) are left out of the fit.
    """
    m = mask_3d.any(axis=2) if mask_3d.ndim == 3 else mask_3d
    cols = np.nonzero(m.any(axis=0))[0]
    edge = np.array([np.nonzero(m[:, c])[0][0 if superior else -1] for c in cols], dtype=float)
    n = len(cols)
    keep = slice(int(0.2 * n), max(int(np.ceil(0.8 * n)), int(0.2 * n) + 1))
    x, y = cols[keep].astype(float), edge[keep]
    if len(x) >= 2 and np.ptp(x) > 0:
        b, a = np.polyfit(x, y, 1)
    else:
        b, a = 0.0, float(y.mean())
    # Make sure no pixel of the body's edge lies outside the line (the band must contain the body).
    resid = edge - (a + b * cols)
    a += resid.min() if superior else resid.max()
    return float(a), float(b)


def annotated_band(labels: np.ndarray, source: str, spacing_mm=(1.0, 1.0, 1.0), *,
                   margin_mm: float = BAND_MARGIN_MM) -> AnnotatedBand:
    """Where the detection loss applies on the slices of one case (label volume ``(H, W, S)``).

    Every source annotates a contiguous run of bodies only (chu T11-L5, myo
    L1-L5, zukic T10/T12-S1), but the bodies above the highest (and, for chu
    and myosegmentum, S1 below the lowest) are visible.  Teaching them as
    background would teach the detector to ignore real vertebrae (README), so
    the loss is masked beyond the superior endplate of the highest annotated
    body and, where S1 is unannotated, beyond the inferior endplate of the
    lowest.  The limits are straight lines along those endplates, not
    horizontal rows: the endplates are tilted by up to ~40 degrees (L5, S1)
    and a horizontal row through one end of an endplate cuts into the
    neighbouring body at the other end.  ``margin_mm`` (2 mm, less than the
    thinnest lumbar disc) keeps the rim of the disc so the edge corners'
    heat-map blobs are not cut.  For zukic (S1 annotated) only the upper line
    applies: below S1 lies the fused sacrum, which is not a detection target.
    With no annotated body (ivd/) the band is empty.
    """
    labels = np.asarray(labels)
    codes = sorted(int(c) for c in np.unique(labels) if is_vertebral_body_code(c))
    if not codes:
        return AnnotatedBand(None, None, empty=True)
    margin_px = float(margin_mm) / float(spacing_mm[0])
    a, b = _edge_line(labels == codes[0], superior=True)
    upper = (a - margin_px, b)
    lower = None
    if source in S1_UNANNOTATED_SOURCES:
        a, b = _edge_line(labels == codes[-1], superior=False)
        lower = (a + margin_px, b)
    return AnnotatedBand(upper, lower)


def ignore_below_row(labels: np.ndarray, source: str, spacing_mm=(1.0, 1.0, 1.0), *,
                     margin_mm: float = BAND_MARGIN_MM) -> int | None:
    """Row below which the loss must be masked (chu, myosegmentum: S1 unannotated), else None.

    The lowest row of the lowest annotated body plus ``margin_mm``: a simple
    horizontal rule.  Prefer :func:`annotated_band` / :func:`detection_loss_mask`,
    which also mask the unannotated bodies above and follow the endplate tilt.
    """
    labels = np.asarray(labels)
    codes = sorted(int(c) for c in np.unique(labels) if is_vertebral_body_code(c))
    if source not in S1_UNANNOTATED_SOURCES or not codes:
        return None
    rows = np.nonzero((labels == codes[-1]).reshape(labels.shape[0], -1).any(axis=1))[0]
    return int(rows.max() + np.ceil(float(margin_mm) / float(spacing_mm[0])))


def slice_targets_and_loss_mask(labels_2d: np.ndarray, band: AnnotatedBand, label_to_level: dict[int, str], *,
                                reference_areas: dict[int, int] | None = None,
                                min_area_fraction: float = MIN_AREA_FRACTION,
                                margin_px: int = UNUSABLE_BODY_MARGIN_PX) -> tuple[list[BodyTarget], np.ndarray]:
    """:func:`slice_targets` and :func:`detection_loss_mask` of one slice in one pass."""
    labels_2d = np.asarray(labels_2d)
    keep = band.mask(labels_2d.shape)
    unusable = np.zeros(labels_2d.shape, dtype=bool)
    targets = []
    for _, level, mask, quad, centroid in _slice_bodies(labels_2d, label_to_level, reference_areas,
                                                        min_area_fraction):
        if quad is None:
            unusable |= mask
        else:
            targets.append(BodyTarget(level, quad, centroid))
    if unusable.any():
        if margin_px > 0:
            unusable = ndimage.binary_dilation(unusable, structure=_EIGHT, iterations=int(margin_px))
        keep &= ~unusable
    return targets, keep


def detection_loss_mask(labels_2d: np.ndarray, band: AnnotatedBand, label_to_level: dict[int, str], *,
                        reference_areas: dict[int, int] | None = None,
                        min_area_fraction: float = MIN_AREA_FRACTION,
                        margin_px: int = UNUSABLE_BODY_MARGIN_PX) -> np.ndarray:
    """``(H, W)`` bool: True where the detection loss of this slice applies.

    The band of :func:`annotated_band`, minus every annotated body on the slice
    that got no target in :func:`slice_targets` (tiny, fragmentary, clipped
    or lateral-edge masks), dilated by ``margin_px``: those are real bodies
    without a usable quadrilateral, neither positives nor background.
    """
    return slice_targets_and_loss_mask(labels_2d, band, label_to_level, reference_areas=reference_areas,
                                       min_area_fraction=min_area_fraction, margin_px=margin_px)[1]


# --------------------------------------------------------------------------- split


def _hash_rank(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{int(seed)}:{patient_id}".encode()).hexdigest()


def patient_split(cases: Sequence[RealCase], n_val_patients: int | dict[str, int] | None = None, *,
                  val_patients: Sequence[str] | None = None, seed: int = 0
                  ) -> tuple[list[RealCase], list[RealCase]]:
    """``(train, val)`` with every patient wholly on one side; deterministic.

    Validation patients are ``val_patients`` (explicit ids) plus, per
    ``n_val_patients`` (a number over all sources, or ``{source: number}``),
    the first patients of each source when ordered by
    ``sha256(f"{seed}:{patient_id}")``: a fixed, seeded rule that does not
    depend on numpy's random streams or on which other cases exist.
    Both lists keep the order of ``cases``.
    """
    by_patient: dict[str, list[RealCase]] = {}
    for c in cases:
        by_patient.setdefault(c.patient_id, []).append(c)
    chosen = set()
    for p in val_patients or ():
        if p not in by_patient:
            raise InputError(f"validation patient {p!r} is not among the cases")
        chosen.add(p)
    if n_val_patients is not None:
        groups: dict[str | None, list[str]] = {}
        for p, cs in by_patient.items():
            key = cs[0].source if isinstance(n_val_patients, dict) else None
            groups.setdefault(key, []).append(p)
        counts = n_val_patients if isinstance(n_val_patients, dict) else {None: int(n_val_patients)}
        for key, n in counts.items():
            pool = sorted((p for p in groups.get(key, []) if p not in chosen), key=lambda p: _hash_rank(seed, p))
            if n > len(pool):
                raise InputError(f"cannot take {n} validation patients from {len(pool)} of source {key}")
            chosen.update(pool[:n])
    train = [c for c in cases if c.patient_id not in chosen]
    val = [c for c in cases if c.patient_id in chosen]
    return train, val


#: The default validation set (seed 2022): both zukic patients (S01: T2, pathology; AKa: the only
#: T1 and TIRM scans, so that non-T2 sequences are measured on a patient no run has seen; both have
#: S1 outlined), 4 chu + 6 myosegmentum patients and 50 tianchi studies (each study its own patient: the source
#: keeps no patient id, and the 146 usable studies have 146 different study UIDs).  ivd/ is not
#: split: no run trains on it, so all of it is held out.
DEFAULT_SPLIT_SEED = 2022
DEFAULT_VAL_FIXED: tuple[str, ...] = ("zukic_AKa", "zukic_S01")
DEFAULT_VAL_PER_SOURCE: dict[str, int] = {"chu": 4, "myosegmentum": 6, "tianchi": 50}
#: What the rule gives on the 201 usable cases of shared/data (checked by the tests).
DEFAULT_VAL_CASES: tuple[str, ...] = (
    "chu_02", "chu_05", "chu_07", "chu_20",
    "myo_01", "myo_05", "myo_10", "myo_15", "myo_23", "myo_26",
    "zukic_02_AKa3_T1", "zukic_03_AKa4_TIRM", "zukic_15_S01_T2",
    "tianchi_002-000", "tianchi_005-000", "tianchi_008-000", "tianchi_012-000", "tianchi_013-000",
    "tianchi_017-000", "tianchi_018-000", "tianchi_019-000", "tianchi_025-000", "tianchi_026-000",
    "tianchi_029-000", "tianchi_030-000", "tianchi_039-000", "tianchi_047-000", "tianchi_053-000",
    "tianchi_054-000", "tianchi_055-000", "tianchi_058-000", "tianchi_060-000", "tianchi_066-000",
    "tianchi_070-000", "tianchi_071-000", "tianchi_076-000", "tianchi_077-000", "tianchi_081-000",
    "tianchi_085-000", "tianchi_093-000", "tianchi_095-000", "tianchi_101-000", "tianchi_105-000",
    "tianchi_111-000", "tianchi_117-000", "tianchi_127-000", "tianchi_131-000", "tianchi_141-000",
    "tianchi_146-000", "tianchi_148-000", "tianchi_150-000", "tianchi_152-000", "tianchi_155-000",
    "tianchi_158-000", "tianchi_162-000", "tianchi_163-000", "tianchi_167-000", "tianchi_177-000",
    "tianchi_183-000", "tianchi_184-000", "tianchi_188-000", "tianchi_193-000", "tianchi_196-000",
)


def default_split(cases: Sequence[RealCase]) -> tuple[list[RealCase], list[RealCase]]:
    """The project's default ``(train, val)`` split (see :data:`DEFAULT_VAL_CASES`)."""
    fixed = [p for p in DEFAULT_VAL_FIXED if any(c.patient_id == p for c in cases)]
    counts = {}
    for source, n in DEFAULT_VAL_PER_SOURCE.items():
        available = len({c.patient_id for c in cases if c.source == source and c.patient_id not in fixed})
        counts[source] = min(n, available)
    return patient_split(cases, counts, val_patients=fixed, seed=DEFAULT_SPLIT_SEED)


#: Tianchi studies of the training side kept away from the appearance network's training, to choose
#: the labelling's appearance weight and review threshold on studies that network has not seen
#: (MODEL_CARD.md); the detector and the context network may train on them.
CALIBRATION_STUDIES = 30
CALIBRATION_SEED = 2023


def calibration_split(cases: Sequence[RealCase]) -> tuple[list[RealCase], list[RealCase]]:
    """``(train, calibration)`` of the training side of :func:`default_split`: the first
    :data:`CALIBRATION_STUDIES` tianchi studies by ``sha256(f"{CALIBRATION_SEED}:{patient}")``
    form the calibration set; every other training case stays in ``train``."""
    train, _ = default_split(cases)
    n = min(CALIBRATION_STUDIES, len({c.patient_id for c in train if c.source in POINT_SOURCES}))
    return patient_split(train, {source: n for source in POINT_SOURCES} if n else None, seed=CALIBRATION_SEED)


def case_scans(case):
    """(native 1 mm scan, slab-averaged ~4 mm scan as ``spinenet run`` makes it, CaseData)."""
    data = load_case(case)
    geo = case_geometry(case)
    arr = np.ascontiguousarray(data.voxels.transpose(2, 1, 0))  # canonical [row, col, slice] as [i, j, k]
    native = scan_from_array(arr, geo.canonical_to_ras, {"case": case.case_id}, resample_isotropic=False)
    thick = scan_from_array(arr, geo.canonical_to_ras, {"case": case.case_id})
    return native, thick, data
