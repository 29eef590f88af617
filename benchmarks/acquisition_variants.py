"""Levels on the held-out real scans as another scanner or protocol might give them (issue 10): figures, not a test.

    python benchmarks/acquisition_variants.py [--variants NAME,...] [--pred DIR] [--threads 2] [--split val|train]
        [--calibration-studies] [--noise-seed K]
        [--precision fp32|bf16] [--runtime torch|openvino|onnx] [--plan patches|whole_slice]

Issue 10's goal is about scans from other centres, which ../shared does not hold.  This takes the 68
held-out cases of ``validate_bundled.py`` (never seen by any training run) and changes each the way
another acquisition would, then runs detection and labelling as ``spinenet run`` does and scores the
result against the case's own annotation (``spinenet evaluate``'s definitions):

* ``as_acquired``: unchanged (the model card's figures);
* ``gamma_0.6`` / ``gamma_1.6``: another intensity mapping (mid-grey brighter / darker);
* ``coil_falloff``: a receive-coil falloff, the signal scaled from 1.4 at the posterior edge to 0.6
  at the anterior edge of the image;
* ``noise``: Rician noise of 4 % of the 99th intensity percentile (a lower field or faster sequence);
* ``blur_1mm``: Gaussian in-plane blur of 1 mm (a coarser acquisition on the same pixel grid);
* ``ends_at_l5``: the field of view ends between L5 and S1 (rows cropped 0.5 of the L4-L5 step below
  the annotated L5 centre): no sacrum to count from;
* ``ends_at_l2``: the field of view ends between L2 and L3 (rows cropped 0.5 of the L2-L3 step below the
  annotated L2 centre): a thoracolumbar scan, whose levels rest on the appearance of T10-L2 alone;
* ``starts_at_l2``: the field of view starts between L1 and L2 (cropped 0.5 of the L2-L3 step above
  the annotated L2 centre): no thoracic spine to count from;
* ``pixels_x1.6`` / ``pixels_x0.6``: in-plane pixels 1.6 times as large (with a blur of 0.4 new
  pixels: a coarser matrix) or 0.6 times (a finer one), the same field of view;
* ``pixels_rows_x1.6`` / ``pixels_cols_x1.6``: rectangular pixels, 1.6 times as tall (superior-inferior) or as
  wide (anterior-posterior) with the same blur along that axis alone: a phase-encoding matrix smaller than the
  readout one, not interpolated to square pixels;
* ``rotated_12`` / ``rotated_-12``: the sagittal plane turned by 12 degrees either way about the image
  centre (a patient lying tilted, a steeper or flatter lordosis); corners turned out of the image are
  lost.
* ``curved_10mm`` / ``curved_20mm`` (volumes only): a lateral curve of the spine, as in a lumbar scoliosis
  with its apex mid-image: each axial level of the 1 mm volume is moved sideways by ``A sin(pi z / Z)``
  (A = 10 or 20 mm; z the row, Z the image height; zero at the top and bottom rows) before the volume is
  read as ``spinenet run`` reads it, so the vertebrae at mid-image lie A mm off the middle slice and the
  lowest and highest stay where they were.  The bodies' axial turn of a real scoliosis is not modelled.
  The predictions are moved back sideways before scoring, so the annotation scores them unchanged
  (``vertebrae.json``; the run's own document is kept beside it as ``vertebrae.as_run.json``).
* ``off_centre_12mm`` (volumes only): the slab placed 12 mm to one side of the spine: every axial level
  moved sideways by 12 mm, scored in the same way.
* ``slices_5mm`` / ``slices_5mm_gap_1mm`` (volumes only): a 2D sagittal protocol with thicker slices than the
  ~3.5 mm slabs ``spinenet run`` makes of a 1 mm volume: each slice the mean of 5 of the 1 mm slices (5 mm
  thick), the slices 5 mm apart, or 6 mm apart with a gap of 1 mm between them (a low-field or fast protocol;
  11-15 slices over these volumes), the run of slices centred on the volume;
* ``slab_32mm`` (volumes only): a narrow slab, 32 mm from side to side about the middle of the volume (a fast
  protocol of 8 slices of 4 mm), so that the vertebral bodies' sides lie outside it;
* ``ghosts``: motion ghosts along the superior-inferior (phase-encoding) axis: two copies of the image at
  12 % of its signal, moved up and down by a quarter of the image height (wrapping round, as ghosts do), so
  that faint vertebrae lie over the real ones a few levels away;
* ``combined``: several of the above at once, milder, as another centre's scan differs in more than one way:
  in-plane pixels 1.3 times as large (with their blur), gamma 1.3, the coil falloff and Rician noise of 3 %;
* ``combined_5mm`` (volumes only): the same on 5 mm slices 5 mm apart (``slices_5mm``).
* ``thin_1mm`` (volumes only): the volume's 1 mm slices as they are, not averaged into slabs (as a 3D
  thin-slice volume is read);
* ``space_like`` (volumes only): a 3D sagittal sequence such as T2 SPACE, pixels 0.5 mm and slices 1 mm, read
  as ``load_scan`` reads an image file holding it (``_read_as_loaded``; thin sagittal stacks are averaged into
  slabs since the sixty-third session).
* ``metal_l4_l5``: the artefact of metal at L4-L5 (fusion screws and cage, a disc prosthesis): no signal inside
  an ellipse centred between the annotated L4 and L5 centres, reaching each centre along the spine and 15 mm
  across it, ringed by 2 mm of pile-up at 1.2 times the 99th percentile, on every slice within 15 mm of L4's
  mid slice (a volume is changed at 1 mm, then read as ``spinenet run`` reads it).  A caricature too: real
  artefacts are distorted and vary with the metal and the sequence; it asks what a chain with bodies hidden
  in its middle does to the levels, and whether the review flag says so (``label/signal_void.py``).
* ``collapsed_l1``: L1 collapsed to half its height, as by a compression fracture (``_Collapsed``): the rows of
  the annotated body (0.35 of the L1-L2 step each way about its centre) squeezed into half as many over the whole
  width, the rows below moved up to close the gap; scored, as the sideways moves, after the outlines are moved
  back (the run's own document kept as ``vertebrae.as_run.json``). Asks whether a short body, which the
  detector may miss or the labelling may count as a disc, shifts the levels counted up from S1.
* ``t1_like`` (T2 scans only): a T1-like contrast made from the T2 image by a piecewise-linear intensity map
  (``SpineNetLib/training/contrast.py``): the 70th percentile of the scan's foreground, near the marrow of the
  T2 scans here (its median lies between their 44th and 87th percentiles), becomes the brightest tissue, and
  the brightest eighth (cerebrospinal fluid, healthy disc nuclei, fat) falls to dark grey, as on T1. A
  caricature, not a T1 sequence: fat turns dark with the fluid (on T1 it is bright), and an intensity map cannot
  change what only the tissue's relaxation times set. It asks whether the levels rest on the bright fluid and
  discs of T2, since real T1 scans here are one (zukic_02) and T1 is 44 % of SPIDER's series.

Crops, resampling and turns keep the scan's geometry (its canonical-to-RAS matrix follows the new
pixel grid), so the annotation scores them unchanged; bodies cropped away count as missed, so read recall and IDR there
as "of the annotated bodies".  The columns that matter: the share of scans with no body named wrongly
("none wrong"), and how many scans with a wrongly named body the review flag catches (and how many
of the others it flags).  Noise is seeded per case (``--noise-seed K`` adds K to each case's seed: another
draw, for how much of a row is the noise's luck).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from script_errors import InputError, at_least  # noqa: E402

VARIANTS = ("as_acquired", "gamma_0.6", "gamma_1.6", "coil_falloff", "noise", "blur_1mm", "ends_at_l5",
            "ends_at_l2", "starts_at_l2", "pixels_x1.6", "pixels_x0.6", "pixels_rows_x1.6",
            "pixels_cols_x1.6", "rotated_12", "rotated_-12",
            "curved_10mm", "curved_20mm", "off_centre_12mm", "slices_5mm", "slices_5mm_gap_1mm", "slab_32mm",
            "ghosts", "combined", "combined_5mm", "thin_1mm", "space_like", "t1_like", "metal_l4_l5",
            "collapsed_l1")


def _with_voxels(scan, voxels: np.ndarray):
    return dataclasses.replace(scan, voxels=np.ascontiguousarray(voxels, np.float32))


def _gamma(scan, gamma: float):
    v = np.clip(scan.voxels, 0, None)
    top = float(np.percentile(v, 99.5)) or 1.0
    return _with_voxels(scan, top * np.power(np.clip(v / top, 0, None), gamma))


def _rician(scan, fraction: float, seed: int):
    """Rician noise of ``fraction`` of the 99th intensity percentile (the magnitude of a noisy complex signal)."""
    rng = np.random.default_rng(seed)
    sigma = fraction * float(np.percentile(scan.voxels, 99))
    v = scan.voxels
    return _with_voxels(scan, np.hypot(v + rng.normal(0, sigma, v.shape), rng.normal(0, sigma, v.shape)))


def _t1_like(scan):
    """``scan`` with the T1-like contrast of ``SpineNetLib/training/contrast.py`` (``T1_LIKE_ROW``): the brightest
    tissue of a T2 image (fluid, disc nuclei, fat) dark grey, its mid-grey (marrow) the brightest."""
    from SpineNetLib.training.contrast import T1_LIKE_ROW, t1_like_map

    v = scan.voxels
    return _with_voxels(scan, t1_like_map(v, *T1_LIKE_ROW, every=max(1, v.size // 200_000)))


def _cropped(scan, axis: int, first: int, stop: int):
    """The scan cropped to ``first:stop`` along canonical ``axis`` (0: rows, 2: slices), with its geometry moved
    along."""
    first, stop = max(0, int(first)), min(scan.voxels.shape[axis], int(stop))
    shift = np.eye(4)
    shift[axis, 3] = first
    return dataclasses.replace(scan, voxels=np.ascontiguousarray(np.take(scan.voxels, range(first, stop), axis=axis)),
                               canonical_to_ras=scan.canonical_to_ras @ shift,
                               canonical_to_input_ijk=scan.canonical_to_input_ijk @ shift)


def _rows(scan, first: int, stop: int):
    """The scan cropped to canonical rows ``first:stop``."""
    return _cropped(scan, 0, first, stop)


def _coil_falloff(scan):
    """The signal scaled from 0.6 at the anterior edge of the image to 1.4 at the posterior edge."""
    gain = np.linspace(0.6, 1.4, scan.voxels.shape[1], dtype=np.float32)   # columns run anterior -> posterior
    return _with_voxels(scan, scan.voxels * gain[None, :, None])


def _resampled(scan, new_to_old: np.ndarray, shape: tuple[int, int], spacing_rc: tuple[float, float],
               blur_px: float = 0.0):
    """``scan`` sampled (bilinear, zeros outside) on a new in-plane grid of ``shape`` whose pixel
    ``(row, col)`` lies at old pixel ``new_to_old @ (row, col, 1)`` (a 2 x 3 affine), every slice alike;
    the geometry moves along, so the annotation still scores it."""
    from scipy import ndimage

    rows, cols = np.meshgrid(np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64),
                             indexing="ij")
    old_r = new_to_old[0, 0] * rows + new_to_old[0, 1] * cols + new_to_old[0, 2]
    old_c = new_to_old[1, 0] * rows + new_to_old[1, 1] * cols + new_to_old[1, 2]
    out = np.empty((*shape, scan.voxels.shape[2]), np.float32)
    for s in range(scan.voxels.shape[2]):
        plane = scan.voxels[:, :, s].astype(np.float32)
        if blur_px > 0:
            plane = ndimage.gaussian_filter(plane, blur_px)
        out[:, :, s] = ndimage.map_coordinates(plane, [old_r, old_c], order=1, cval=0.0)
    index_map = np.eye(4)
    index_map[:2, :2] = new_to_old[:, :2]
    index_map[:2, 3] = new_to_old[:, 2]
    return dataclasses.replace(scan, voxels=out, spacing_mm=(*spacing_rc, scan.spacing_mm[2]),
                               canonical_to_ras=scan.canonical_to_ras @ index_map,
                               canonical_to_input_ijk=scan.canonical_to_input_ijk @ index_map)


def _pixels_scaled(scan, factor: float, along: str = "both"):
    """In-plane pixels ``factor`` times as large (coarser above 1, with a matching blur; finer below), along both
    axes, or along the ``rows`` (superior-inferior) or the ``cols`` (anterior-posterior) alone: rectangular
    pixels, as a phase-encoding matrix smaller than the readout one gives where the scanner does not
    interpolate it to square pixels."""
    h, w = scan.voxels.shape[:2]
    f_r, f_c = (factor if along in ("both", "rows") else 1.0), (factor if along in ("both", "cols") else 1.0)
    new_to_old = np.array([[f_r, 0.0, 0.0], [0.0, f_c, 0.0]])
    shape = (max(1, int((h - 1) / f_r) + 1), max(1, int((w - 1) / f_c) + 1))
    spacing = (scan.spacing_mm[0] * f_r, scan.spacing_mm[1] * f_c)
    if along == "both":
        return _resampled(scan, new_to_old, shape, spacing, blur_px=0.4 * factor if factor > 1 else 0.0)
    blurred = _with_voxels(scan, _blurred_along(scan.voxels, 0 if along == "rows" else 1, 0.4 * factor)) \
        if factor > 1 else scan
    return _resampled(blurred, new_to_old, shape, spacing)


def _blurred_along(voxels: np.ndarray, axis: int, sigma_px: float) -> np.ndarray:
    """Gaussian blur of ``sigma_px`` of the scan's own pixels along one in-plane ``axis`` alone."""
    from scipy import ndimage

    sigma = [0.0, 0.0, 0.0]
    sigma[axis] = sigma_px
    return ndimage.gaussian_filter(voxels.astype(np.float32), sigma)


def _read_as_loaded(scan):
    """``scan`` read again as ``load_scan`` reads an image file that holds its voxels (the acquisition classified,
    thin slices averaged into slabs: inputs/canonical.py), its input geometry still pointing into the case's
    image, so the annotation scores it."""
    from SpineNetLib.inputs.canonical import scan_from_array

    swap = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])   # array (i, j, k) -> (row, col, slice)
    read = scan_from_array(scan.voxels, scan.canonical_to_ras @ swap, dict(scan.metadata))
    return dataclasses.replace(read, input_ijk_to_ras=scan.input_ijk_to_ras, input_shape_ijk=scan.input_shape_ijk,
                               input_slice_axis=scan.input_slice_axis,
                               canonical_to_input_ijk=scan.canonical_to_input_ijk @ swap @ read.canonical_to_input_ijk)


def _rotated(scan, degrees: float):
    """The sagittal plane turned by ``degrees`` about the image centre (a patient lying tilted), in
    millimetres (anisotropic pixels kept); corners that leave the image are cut, new ones are zero."""
    h, w = scan.voxels.shape[:2]
    sr, sc = float(scan.spacing_mm[0]), float(scan.spacing_mm[1])
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    linear = np.diag([1 / sr, 1 / sc]) @ rot @ np.diag([sr, sc])     # new pixel offsets -> old ones
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    new_to_old = np.hstack([linear, (centre - linear @ centre)[:, None]])
    return _resampled(scan, new_to_old, (h, w), (sr, sc))


def _corners_moved(document: dict, move) -> dict:
    """A copy of a run's ``vertebrae.json`` with ``move`` ((4, 3) RAS corners -> (4, 3)) applied to every outline's
    corners, rounded to the micrometre as the document writes them: the moves of ``_Sideways`` and ``_Collapsed``
    undone before scoring."""
    doc = copy.deepcopy(document)
    for v in doc.get("vertebrae", []):
        for p in v.get("polygons", []):
            p["corners_ras"] = move(np.asarray(p["corners_ras"], float)).round(3).tolist()
    return doc


class _Sideways:
    """A volume stored as a NIfTI file moved sideways: its voxels moved along the sagittal axis by
    ``amplitude_mm * sin(pi z / (Z - 1))`` at voxel row ``z`` of the superior-inferior axis (``curved_*``), or
    by ``amplitude_mm`` everywhere (``off_centre_*``, ``curved=False``)."""

    def __init__(self, path: Path, amplitude_mm: float, curved: bool = True):
        from SpineNetLib.inputs.canonical import sagittal_axis
        from SpineNetLib.inputs.image import read_image_arrays

        self.voxels_kji, self.ijk_to_ras = read_image_arrays(path)
        self.sagittal = sagittal_axis(self.ijk_to_ras)      # ijk axis
        self.axial = int(np.argmax(np.abs(self.ijk_to_ras[2, :3])))   # the ijk axis closest to S
        self.n_axial = self.voxels_kji.shape[2 - self.axial]
        self.step_mm = float(np.linalg.norm(self.ijk_to_ras[:3, self.sagittal]))
        self.amplitude_mm = float(amplitude_mm)
        self.curved = curved

    def shift_voxels(self, z) -> np.ndarray:
        """Sideways move, in voxels along the sagittal axis, of axial index ``z`` (array)."""
        z = np.asarray(z, float)
        shape = np.sin(np.pi * z / (self.n_axial - 1)) if self.curved else np.ones_like(z)
        return self.amplitude_mm / self.step_mm * shape

    def scan(self, resample_isotropic: bool):
        """The volume moved sideways, read as ``spinenet run`` reads an image file."""
        from scipy import ndimage

        from SpineNetLib.inputs.canonical import scan_from_array

        axial_axis, sagittal_axis = 2 - self.axial, 2 - self.sagittal   # array axes of [k, j, i]
        moved = np.moveaxis(self.voxels_kji.astype(np.float32), (axial_axis, sagittal_axis), (0, 1))
        out = np.empty_like(moved)
        for z, d in enumerate(self.shift_voxels(np.arange(moved.shape[0]))):
            out[z] = ndimage.shift(moved[z], (d, 0), order=1, cval=0.0)
        out = np.moveaxis(out, (0, 1), (axial_axis, sagittal_axis))
        return scan_from_array(out, self.ijk_to_ras, {}, resample_isotropic=resample_isotropic)

    def moved_back(self, document: dict) -> dict:
        """A copy of a run's ``vertebrae.json`` with every outline corner moved back sideways by the move at
        its own height, so that the annotation scores it."""
        ras_to_ijk = np.linalg.inv(self.ijk_to_ras)

        def back(corners):
            ijk = (ras_to_ijk @ np.c_[corners, np.ones(len(corners))].T)[:3].T
            return corners - self.shift_voxels(ijk[:, self.axial])[:, None] * self.ijk_to_ras[:3, self.sagittal]
        return _corners_moved(document, back)


class _Collapsed:
    """``scan`` with the annotated body of ``level`` collapsed to ``height`` of its own (a compression fracture,
    osteoporotic or from a tumour; most often at T12-L1): the canonical rows of the body, taken as 0.35 of the
    step to the next body each way about its centre (a body about 0.7 of the step:
    ``evaluation/evaluate.S1_WHOLE_BELOW_STEPS``), squeezed into ``height`` of their number, and the rows below
    moved up to close the gap, so that the bodies below come nearer the ones above as they do over a fracture.
    Over the whole width: the canal and the posterior elements are squeezed with the body (a caricature: a
    real fracture keeps its posterior wall and often wedges the front). The scan keeps its geometry, so its
    rows below the body lie where the image shows other anatomy; :meth:`moved_back` maps a run's outline corners
    back to the rows they were drawn from, so that the annotation scores them unchanged."""

    def __init__(self, scan, top_row: float, bottom_row: float, height: float):
        self.original, self.top, self.bottom, self.height = scan, top_row, bottom_row, height
        self.lost = (1.0 - height) * (bottom_row - top_row)

    @classmethod
    def of(cls, scan, gt, level: str, height: float):
        """The collapse of ``level``, or None without its annotated centre and the next one below."""
        from SpineNetLib.core.levels import LEVELS_TOP_DOWN

        centre = _centre_row(gt, level)
        below = _centre_row(gt, LEVELS_TOP_DOWN[LEVELS_TOP_DOWN.index(level) + 1])
        if centre is None or below is None or below <= centre:
            return None
        half = 0.35 * (below - centre)
        return cls(scan, centre - half, centre + half, height)

    def old_rows(self, rows) -> np.ndarray:
        """The original canonical row that each new row (array) shows."""
        rows = np.asarray(rows, float)
        squeezed_bottom = self.top + self.height * (self.bottom - self.top)
        inside = self.top + (rows - self.top) / self.height
        return np.where(rows <= self.top, rows, np.where(rows <= squeezed_bottom, inside, rows + self.lost))

    def scan(self):
        """The scan with the body collapsed (bilinear; ``lost`` rows fewer)."""
        from scipy import ndimage

        h, w, n = self.original.voxels.shape
        rows, cols = np.meshgrid(self.old_rows(np.arange(int(h - self.lost))), np.arange(w, dtype=float),
                                 indexing="ij")
        out = np.stack([ndimage.map_coordinates(self.original.voxels[:, :, s].astype(np.float32), [rows, cols],
                                                order=1, cval=0.0) for s in range(n)], axis=2)
        return _with_voxels(self.original, out)

    def moved_back(self, document: dict) -> dict:
        """A copy of a run's ``vertebrae.json`` with every outline corner moved back to the original row it shows."""
        to_ras = self.original.canonical_to_ras
        from_ras = np.linalg.inv(to_ras)

        def back(corners):
            canonical = (from_ras @ np.c_[corners, np.ones(len(corners))].T)[:3].T
            canonical[:, 0] = self.old_rows(canonical[:, 0])
            return (to_ras @ np.c_[canonical, np.ones(len(canonical))].T)[:3].T
        return _corners_moved(document, back)


def _thick_slices(scan, thick: int, step: int):
    """A 1 mm sagittal ``scan`` (not slab-averaged) as a 2D protocol would give it: slice t the mean of the
    ``thick`` slices ``start + step*t ...``, the run centred on the volume; the geometry moves along."""
    n_in = scan.voxels.shape[2]
    n_out = (n_in - thick) // step + 1
    start = (n_in - (step * (n_out - 1) + thick)) // 2
    voxels = np.stack([scan.voxels[:, :, start + step * t:start + step * t + thick].mean(axis=2)
                       for t in range(n_out)], axis=2)
    index_map = np.eye(4)                  # new slice t -> old slice start + step*t + (thick - 1)/2
    index_map[2, 2] = step
    index_map[2, 3] = start + (thick - 1) / 2.0
    metadata = {**scan.metadata, "acquisition": "2D sagittal"}
    return dataclasses.replace(scan, voxels=np.ascontiguousarray(voxels, np.float32),
                               spacing_mm=(scan.spacing_mm[0], scan.spacing_mm[1], scan.spacing_mm[2] * step),
                               canonical_to_ras=scan.canonical_to_ras @ index_map,
                               canonical_to_input_ijk=scan.canonical_to_input_ijk @ index_map, metadata=metadata)


def _centre(gt, level: str) -> tuple[float, float, int] | None:
    """(column, row, slice) of the annotated centre of ``level``, or None."""
    for v in gt.vertebrae:
        if v.level == level and not v.ignored:
            return float(v.centroid[0]), float(v.centroid[1]), int(v.mid_slice)
    return None


def _centre_row(gt, level: str) -> float | None:
    centre = _centre(gt, level)
    return None if centre is None else centre[1]


def _metal_artefact(scan, gt):
    """A metal artefact of lumbar fusion hardware at L4-L5 (cage and screws): no signal inside an ellipse centred
    between the annotated L4 and L5 centres, half the L4-L5 step long along the spine each way and 15 mm each way
    across it, ringed by a 2 mm band of pile-up at 1.2 times the 99th percentile, on every slice within 15 mm of
    L4's mid slice; None without L4 and L5."""
    l4, l5 = _centre(gt, "L4"), _centre(gt, "L5")
    if l4 is None or l5 is None:
        return None
    col_mm, row_mm = scan.spacing_mm[1], scan.spacing_mm[0]
    centre = np.array([(l4[0] + l5[0]) / 2 * col_mm, (l4[1] + l5[1]) / 2 * row_mm])
    along = np.array([(l5[0] - l4[0]) * col_mm, (l5[1] - l4[1]) * row_mm])
    half_length, half_depth = 0.5 * float(np.hypot(*along)), 15.0
    along /= max(float(np.hypot(*along)), 1e-6)
    rows, cols = np.mgrid[0:scan.voxels.shape[0], 0:scan.voxels.shape[1]]
    offset = np.stack([cols * col_mm - centre[0], rows * row_mm - centre[1]], axis=-1)
    u, w = offset @ along, offset @ np.array([-along[1], along[0]])
    radius = np.hypot(u / half_length, w / half_depth)           # 1 on the ellipse
    rim = (radius >= 1) & (radius < 1 + 2.0 / half_depth)
    voxels = scan.voxels.copy()
    bright = 1.2 * float(np.percentile(voxels, 99))
    near = np.abs(np.arange(voxels.shape[2]) - l4[2]) * scan.spacing_mm[2] <= 15.0
    for s in np.flatnonzero(near):
        voxels[..., s][radius < 1] = 0.0
        voxels[..., s][rim] = bright
    return _with_voxels(scan, voxels)


def vary(scan, variant: str, gt, seed: int):
    """``scan`` as ``variant`` would give it, or None when the case lacks what the variant needs."""
    if variant == "as_acquired":
        return scan
    if variant.startswith("gamma_"):
        return _gamma(scan, float(variant.split("_")[1]))
    if variant == "coil_falloff":
        return _coil_falloff(scan)
    if variant == "noise":
        return _rician(scan, 0.04, seed)
    if variant == "blur_1mm":
        from scipy import ndimage

        sigma = (1.0 / scan.spacing_mm[0], 1.0 / scan.spacing_mm[1], 0.0)
        return _with_voxels(scan, ndimage.gaussian_filter(scan.voxels, sigma))
    if variant == "ends_at_l5":
        l4, l5 = _centre_row(gt, "L4"), _centre_row(gt, "L5")
        return None if l4 is None or l5 is None else _rows(scan, 0, round(l5 + 0.5 * (l5 - l4)))
    if variant == "ends_at_l2":
        l2, l3 = _centre_row(gt, "L2"), _centre_row(gt, "L3")
        return None if l2 is None or l3 is None else _rows(scan, 0, round(l2 + 0.5 * (l3 - l2)))
    if variant == "starts_at_l2":
        l2, l3 = _centre_row(gt, "L2"), _centre_row(gt, "L3")
        return None if l2 is None or l3 is None else _rows(scan, round(l2 - 0.5 * (l3 - l2)), scan.voxels.shape[0])
    if variant.startswith("pixels_x"):
        return _pixels_scaled(scan, float(variant[len("pixels_x"):]))
    if variant.startswith(("pixels_rows_x", "pixels_cols_x")):
        along, factor = variant[len("pixels_"):].split("_x")
        return _pixels_scaled(scan, float(factor), along)
    if variant.startswith("rotated_"):
        return _rotated(scan, float(variant[len("rotated_"):]))
    if variant.startswith("slab_"):
        n_in = scan.voxels.shape[2]
        n = min(n_in, max(1, round(float(variant[len("slab_"):-len("mm")]) / scan.spacing_mm[2])))
        return _cropped(scan, 2, (n_in - n) // 2, (n_in - n) // 2 + n)
    if variant.startswith("combined"):
        if variant == "combined_5mm":       # needs the scan read at 1 mm, as the slices_ rows
            scan = _thick_slices(scan, 5, 5)
        scan = _gamma(_pixels_scaled(scan, 1.3), 1.3)
        return _rician(_coil_falloff(scan), 0.03, seed)
    if variant == "ghosts":
        quarter = scan.voxels.shape[0] // 4
        v = scan.voxels
        return _with_voxels(scan, v + 0.12 * (np.roll(v, quarter, axis=0) + np.roll(v, -quarter, axis=0)))
    if variant == "t1_like":
        return _t1_like(scan)
    if variant == "metal_l4_l5":         # a volume is read at 1 mm, as the annotation: slabs made afterwards
        changed = _metal_artefact(scan, gt)
        return changed if changed is None or scan.voxels.shape[2] == 1 else _read_as_loaded(changed)
    if variant == "thin_1mm":            # read at 1 mm by predict_variant: the slices as they are
        return scan
    if variant == "space_like":          # read at 1 mm: finer pixels, then read as an image file of them is
        return _read_as_loaded(_pixels_scaled(scan, 0.5))
    if variant.startswith("slices_"):    # needs the scan read at 1 mm: predict_variant does that
        return _thick_slices(scan, 5, 6 if variant.endswith("gap_1mm") else 5)
    raise InputError(f"unknown variant {variant!r} (use {', '.join(VARIANTS)})")


def predict_variant(cases, variant: str, networks, profile, pred_root: Path, detection_params=None,
                    noise_seed: int = 0) -> list[str]:
    """``vertebrae.json`` of every case under ``variant``; returns the case ids that were run. ``noise_seed`` is
    added to each case's seed (another draw of the noise)."""
    from SpineNetLib.evaluation.evaluate import annotated_with_points, ground_truth_of_case
    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.pipeline import RunOptions, run

    done = []
    for n, case in enumerate(cases, 1):
        target = pred_root / variant / case.case_id / "vertebrae.json"
        sideways = variant.startswith(("curved_", "off_centre_"))
        collapsed = variant == "collapsed_l1"             # moved back before scoring, as the sideways moves
        thin = variant.startswith(("slices_", "thin_", "space_")) or variant == "combined_5mm"   # read at 1 mm
        thin = thin or (variant == "metal_l4_l5" and not annotated_with_points(case))
        if (sideways or thin or variant.startswith("slab_")) and annotated_with_points(case):
            continue                              # one slice: nothing to move, thicken or narrow
        if variant == "t1_like" and case.sequence != "T2":
            continue                              # the map turns a T2 contrast into a T1-like one
        if not target.is_file():
            if sideways:
                move = _Sideways(case.path / "image.nii.gz", float(variant.split("_")[-1][:-len("mm")]),
                                 curved=variant.startswith("curved_"))
                changed = move.scan(profile.slab_average_thin_slices)
            else:
                scan = load_scan(case.path / "image.nii.gz",
                                 resample_isotropic=profile.slab_average_thin_slices and not thin)
                if collapsed:
                    move = _Collapsed.of(scan, ground_truth_of_case(case), "L1", 0.5)
                    changed = None if move is None else move.scan()
                else:
                    changed = vary(scan, variant, ground_truth_of_case(case),
                                   zlib.crc32(case.case_id.encode()) + noise_seed)
            if changed is None:
                continue
            result = run(changed, networks, RunOptions(grade=False, profile=profile.name,
                                                       detection_params=detection_params))
            target.parent.mkdir(parents=True, exist_ok=True)
            document = result.vertebrae_document
            if sideways or collapsed:
                target.with_name("vertebrae.as_run.json").write_text(json.dumps(document), encoding="utf-8")
                document = move.moved_back(document)
            target.write_text(json.dumps(document), encoding="utf-8")
        done.append(case.case_id)
        print(f"\r{variant}: {n}/{len(cases)}   ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return done


def row(variant: str, summary: dict, patients: dict[str, str] | None = None) -> tuple[str, int, int]:
    """One table line: recall and IDR of the annotated bodies, scans with no body named wrongly (its 95 %
    interval over patients, ``patients``: case id -> patient; zukic's T1 and TIRM are one subject's),
    scans shifted, and the review flag on the scans with a wrongly named body and on the others; with the
    number of scans not flagged and how many of those have a wrongly named body."""
    from SpineNetLib.evaluation.tables import percent_cell as _pct
    from SpineNetLib.evaluation.intervals import patient_share_interval, percent_range

    o = summary["overall"]
    cases = summary["cases"]
    flags = {k: m["needs_review"] for k, m in cases.items()}   # each run's own, as evaluate_directories read it
    wrong = sorted(k for k, m in cases.items() if m["wrong_levels"])
    others = [k for k in cases if k not in wrong]
    review = summary["review"]
    line = (f"{variant:14} {o['n_cases']:5d} {_pct(o['recall'])} {_pct(o['identification_rate'])} "
            f"{_pct(len(others) / len(cases)):>9} "
            f"{percent_range(patient_share_interval([k in others for k in cases], [(patients or {}).get(k, k) for k in cases])):>11} "
            f"{o['scans_shifted']:7d} {sum(flags[k] for k in wrong):3d}/{len(wrong):<3d} "
            f"{sum(flags[k] for k in others):3d}/{len(others):<3d}  {', '.join(wrong)}")
    return line, review["unflagged"], review["unflagged"] - review["unflagged_none_wrong"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: %(default)s")
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--data", default=None, help="data root (default ../shared/data)")
    parser.add_argument("--pred", default=None, help="prediction folder (kept; reused when it has a case)")
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="network arithmetic (SpineNetLib/models/precision.py)")
    parser.add_argument("--runtime", choices=("torch", "openvino", "onnx"), default="torch",
                        help="where the networks run (SpineNetLib/models/runtimes.py); onnx never imports torch "
                             "here, so the resampling runs in numpy as in `spinenet run --runtime onnx`")
    parser.add_argument("--split", choices=("val", "train"), default="val",
                        help="held-out cases (default) or the training side (which the networks saw)")
    parser.add_argument("--calibration-studies", action="store_true",
                        help="with --split train: the 30 calibration studies only (training side, kept out of "
                             "the appearance network's training: training.datasets.calibration_split)")
    parser.add_argument("--noise-seed", type=int, default=0,
                        help="added to each case's noise seed: another draw of the noise of the noise and combined "
                             "rows (the other rows have none); give each draw its own --pred folder")
    parser.add_argument("--plan", choices=("patches", "whole_slice"), default=None,
                        help="detection plan (default: DetectionParams' own; SpineNetLib/detect/plans.py)")
    args = parser.parse_args(argv)
    if args.calibration_studies and args.split != "train":
        raise InputError("--calibration-studies: the calibration studies are on the training side; add --split train")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        given = f"unknown {', '.join(unknown)}" if unknown else "none given"
        raise InputError(f"--variants: {given} (use {', '.join(VARIANTS)})")

    from SpineNetLib.evaluation.evaluate import evaluate_directories
    from SpineNetLib.evaluation.intervals import percent_range, wilson_interval
    from SpineNetLib.pipeline import load_networks, processing_profile
    from SpineNetLib.training.datasets import default_data_root
    from validate_bundled import detection_params_for, held_out_cases, training_cases

    if args.runtime != "onnx":   # ONNX Runtime takes its threads from load_networks, without torch
        import torch

        torch.set_num_threads(args.threads)
    data_root = Path(args.data) if args.data else default_data_root()
    cases = held_out_cases(data_root) if args.split == "val" else training_cases(data_root)
    if args.calibration_studies:
        from SpineNetLib.training.datasets import calibration_split, list_cases

        calibration = {c.case_id for c in calibration_split(list_cases(data_root))[1]}
        cases = [c for c in cases if c.case_id in calibration]
    pred_root = Path(args.pred) if args.pred else Path(tempfile.mkdtemp(prefix="spinenet-variants-"))
    networks = load_networks(args.weights, "cpu", precision=args.precision, runtime=args.runtime,
                             threads=args.threads)
    profile = processing_profile(None, networks.weights.source)
    start = time.perf_counter()
    detection_params = detection_params_for(args.plan)
    lines, unflagged, unflagged_wrong = [], 0, 0
    for variant in variants:
        ran = predict_variant(cases, variant, networks, profile, pred_root, detection_params, args.noise_seed)
        summary = evaluate_directories(data_root, pred_root / variant, case_ids=ran)
        line, n_unflagged, n_wrong = row(variant, summary, {c.case_id: c.patient_id for c in cases})
        lines.append(line)
        unflagged, unflagged_wrong = unflagged + n_unflagged, unflagged_wrong + n_wrong
    print(f"{len(cases)} {'held-out' if args.split == 'val' else 'calibration' if args.calibration_studies else 'training-side'} cases, weights {args.weights!r}, predictions in {pred_root} "
          f"({time.perf_counter() - start:.0f} s)\n")
    print(f"{'variant':14} {'scans':>5} {'recall':>6} {'IDR':>6} {'none wrong':>9} {'95% CI':>11} {'shifted':>7} "
          f"{'flagged':>7} {'others':>7}  scans with a wrongly named body (shifted: every body found named off by "
          "the same number of levels; flagged: of those; others: flagged of the rest; 95% CI: Wilson's interval "
          "of 'none wrong' over patients)")
    print("\n".join(lines))
    # what a reader relies on: a result that asks for no review names no body wrongly
    print(f"\nover the {len(lines)} rows, runs not flagged: {unflagged}, with a wrongly named body {unflagged_wrong} "
          f"(none wrong: {percent_range(wilson_interval(unflagged - unflagged_wrong, unflagged))} %, 95 % interval "
          "over runs, which are not independent: the same scans under each variant)")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
