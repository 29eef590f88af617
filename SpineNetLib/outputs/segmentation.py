"""Vertebra and disc masks on the input's voxel grid, filled from the ``vertebrae.json`` polygons.

Pure numpy, shared by the Slicer segmentation (:func:`SpineNetLib.slicer.mrml.add_segmentation`)
and the DICOM Segmentation (:mod:`SpineNetLib.outputs.dicom_results`), so that both show exactly
the same voxels.  A mask is a ``[k, j, i]`` bool array of the input grid (the SimpleITK / Slicer
``arrayFromVolume`` convention, docs/CONVENTIONS.md): for a DICOM series ``k`` is the slice in
position order, ``j`` the image row and ``i`` the image column, so ``mask[k]`` lies pixel for pixel
on the ``k``-th image of ``Scan.metadata["files_in_slice_order"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from SpineNetLib.outputs.documents import disc_polygons, vertebra_name

#: Tolerance (in voxels) for a voxel centre lying on a polygon edge: it counts as inside.
EDGE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class FilledSegment:
    """One vertebra or disc of a result, filled on the input grid."""

    #: The vertebra's level ("L4"; "V3" when unlabelled) or the disc's ("L4-L5").
    name: str
    #: "vertebra" or "disc".
    kind: str
    #: ``[k, j, i]`` bool mask of the input grid.
    mask: np.ndarray


def polygon_mask(polygon_2d: np.ndarray, shape_2d: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """Voxels (integer centres) of a plane polygon: ``(mask, first_a, first_b)``.

    ``polygon_2d`` is ``(n, 2)`` in (a, b) voxel coordinates; the mask
    covers the polygon's bounding box clipped to ``shape_2d`` = (na, nb) and
    is indexed ``[a - first_a, b - first_b]``.  A centre is inside by the
    even-odd rule, or when it lies within :data:`EDGE_TOLERANCE` of an edge.
    """
    poly = np.asarray(polygon_2d, float)
    lo = np.maximum(np.ceil(poly.min(axis=0) - EDGE_TOLERANCE), 0).astype(int)
    hi = np.minimum(np.floor(poly.max(axis=0) + EDGE_TOLERANCE), np.asarray(shape_2d) - 1).astype(int)
    if np.any(hi < lo):
        return np.zeros((0, 0), bool), int(lo[0]), int(lo[1])
    a, b = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    pa, pb = a.ravel()[:, None].astype(float), b.ravel()[:, None].astype(float)
    a1, b1 = poly[:, 0][None, :], poly[:, 1][None, :]
    a2, b2 = np.roll(poly[:, 0], -1)[None, :], np.roll(poly[:, 1], -1)[None, :]
    # even-odd crossings of a ray towards +a
    straddles = (b1 > pb) != (b2 > pb)
    with np.errstate(divide="ignore", invalid="ignore"):
        a_cross = a1 + (pb - b1) * (a2 - a1) / (b2 - b1)
    inside = (np.count_nonzero(straddles & (pa < a_cross), axis=1) % 2) == 1
    # on an edge: distance to the segment below the tolerance
    da, db = a2 - a1, b2 - b1
    length2 = da * da + db * db
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip(np.where(length2 > 0, ((pa - a1) * da + (pb - b1) * db) / length2, 0.0), 0.0, 1.0)
    dist2 = (pa - (a1 + t * da)) ** 2 + (pb - (b1 + t * db)) ** 2
    on_edge = np.any(dist2 <= EDGE_TOLERANCE ** 2, axis=1)
    mask = (inside | on_edge).reshape(a.shape)
    return mask, int(lo[0]), int(lo[1])


def ras_to_ijk_points(points_ras, ijk_to_ras_matrix) -> np.ndarray:
    """Continuous IJK coordinates of RAS points, (n, 3)."""
    pts = np.asarray(points_ras, float).reshape(-1, 3)
    inverse = np.linalg.inv(np.asarray(ijk_to_ras_matrix, float))
    return (np.c_[pts, np.ones(len(pts))] @ inverse.T)[:, :3]


def fill_polygons(polygons_ras, ijk_to_ras_matrix, dims_ijk) -> np.ndarray:
    """A ``[k, j, i]`` bool mask of the volume grid with every polygon filled on its slice.

    Each polygon's corners go RAS -> IJK through the inverse IJK-to-RAS; the
    axis along which they are (nearly) constant is the slice axis, their
    rounded mean there the slice; the polygon is filled in the plane of the
    two other axes (:func:`polygon_mask`).  Polygons outside the volume add
    nothing.
    """
    ni, nj, nk = (int(n) for n in dims_ijk)
    mask = np.zeros((nk, nj, ni), bool)
    dims = (ni, nj, nk)
    for corners in polygons_ras:
        ijk = ras_to_ijk_points(corners, ijk_to_ras_matrix)
        axis = int(np.argmin(np.ptp(ijk, axis=0)))
        index = int(np.floor(ijk[:, axis].mean() + 0.5))
        if not 0 <= index < dims[axis]:
            continue
        a, b = [ax for ax in range(3) if ax != axis]
        plane, first_a, first_b = polygon_mask(ijk[:, [a, b]], (dims[a], dims[b]))
        if plane.size == 0:
            continue
        target = [slice(None)] * 3  # indexed [i, j, k] through a transposed view
        target[axis] = index
        target[a] = slice(first_a, first_a + plane.shape[0])
        target[b] = slice(first_b, first_b + plane.shape[1])
        view = mask.transpose(2, 1, 0)  # [i, j, k]
        region = view[tuple(target)]
        view[tuple(target)] = region | plane
    return mask


def filled_segments(vertebrae_doc: dict, ijk_to_ras_matrix, dims_ijk) -> Iterator[FilledSegment]:
    """Every vertebra (its polygons on every slice where it was found), then every disc
    (:func:`SpineNetLib.outputs.documents.disc_polygons`), top to bottom, filled on the grid of
    ``dims_ijk`` = (ni, nj, nk) with IJK-to-RAS ``ijk_to_ras_matrix``.  Masks may be empty (a
    polygon outside the grid).  Made one at a time, as they are taken: each is a mask of the whole grid, and
    a caller that keeps less of each (the DICOM Segmentation) then never holds them all."""
    for i, v in enumerate(vertebrae_doc["vertebrae"]):
        mask = fill_polygons([p["corners_ras"] for p in v["polygons"]], ijk_to_ras_matrix, dims_ijk)
        yield FilledSegment(vertebra_name(v, i), "vertebra", mask)
    for d in disc_polygons(vertebrae_doc):
        mask = fill_polygons([p["corners_ras"] for p in d["polygons"]], ijk_to_ras_matrix, dims_ijk)
        yield FilledSegment(d["level"], "disc", mask)
