"""The scan every pipeline stage works on, in one canonical orientation.

Canonical orientation (documented in docs/CONVENTIONS.md)
---------------------------------------------------------
``Scan.voxels`` is a float32 array indexed ``[row, col, slice]`` with shape
``(H, W, S)`` where

* rows run superior -> inferior (head at the top of the image),
* columns run anterior -> posterior (the front of the body on the left),
* slices run patient right -> patient left.

This is the orientation the official SpineNetV2 networks were trained on
(official §4: rows S->I, cols A->P).  In-slice points are written ``(x, y) =
(col, row)`` in pixel units with pixel centres at integers, as in the official
code.

The canonical array is obtained from the input only by permuting and
flipping axes (no interpolation), except for near-isotropic 3D acquisitions,
whose left-right axis is resampled to sagittal slices of a sensible thickness.
``canonical_to_input_ijk`` maps canonical indices back to the input's own
voxel indices and ``canonical_to_ras`` to RAS millimetres, so every result
maps exactly back to the input's space.

Input arrays follow the convention of SimpleITK and of Slicer's
``arrayFromVolume``: numpy ``[k, j, i]`` with a 4x4 IJK-to-RAS matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Scan:
    """A sagittal MR scan in canonical orientation (see module docstring)."""

    #: float32 ``(H, W, S)``: rows S->I, cols A->P, slices R->L.
    voxels: np.ndarray
    #: ``(row_mm, col_mm, slice_mm)``: spacing along the canonical axes.
    spacing_mm: tuple[float, float, float]
    #: 4x4: ``[row, col, slice, 1]`` -> ``[R, A, S, 1]`` in millimetres.
    canonical_to_ras: np.ndarray
    #: 4x4: the input's own ``[i, j, k, 1]`` -> RAS (as Slicer's IJKToRAS).
    input_ijk_to_ras: np.ndarray
    #: ``(ni, nj, nk)``: the input's voxel dimensions.
    input_shape_ijk: tuple[int, int, int]
    #: 4x4: ``[row, col, slice, 1]`` -> the input's ``[i, j, k, 1]``.
    canonical_to_input_ijk: np.ndarray
    #: Which input axis (0=i, 1=j, 2=k) holds the sagittal slices.
    input_slice_axis: int
    #: Free-form description of the source: path, format, series UID,
    #: sequence description, manufacturer, overrides used, ...
    metadata: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.voxels.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return int(self.voxels.shape[2])

    def canonical_to_ras_points(self, rows, cols, slices) -> np.ndarray:
        """RAS millimetres of canonical (row, col, slice) positions; returns (N, 3)."""
        rcs = np.stack(np.broadcast_arrays(
            np.asarray(rows, float), np.asarray(cols, float), np.asarray(slices, float)), axis=-1)
        rcs = rcs.reshape(-1, 3)
        hom = np.concatenate([rcs, np.ones((len(rcs), 1))], axis=1)
        return (hom @ self.canonical_to_ras.T)[:, :3]

    def xy_to_ras(self, xy: np.ndarray, canonical_slice: float) -> np.ndarray:
        """RAS of in-slice points ``(x=col, y=row)`` on one canonical slice; (N, 3)."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        return self.canonical_to_ras_points(xy[:, 1], xy[:, 0], np.full(len(xy), float(canonical_slice)))

    def input_slice_position(self, canonical_slice: float) -> float:
        """Fractional position along the input's own slice axis of a canonical slice (a slab's centre)."""
        ijk = np.asarray(self.canonical_to_input_ijk, float) @ np.array([0.0, 0.0, float(canonical_slice), 1.0])
        return float(ijk[self.input_slice_axis])

    def input_slice_index(self, canonical_slice: float) -> int:
        """Index along the input's own slice axis of a canonical slice."""
        n = self.input_shape_ijk[self.input_slice_axis]
        return int(np.clip(np.rint(self.input_slice_position(canonical_slice)), 0, n - 1))


def vertebra_centroid_ras(scan: Scan, vertebra) -> np.ndarray:
    """A vertebra's (``core.results.Vertebra``) 3D centroid: the mean over its slices of each slice
    polygon's corner mean, in RAS mm."""
    points = [scan.xy_to_ras(poly.mean(axis=0), s)[0] for s, poly in zip(vertebra.slices, vertebra.polygons)]
    return np.mean(points, axis=0)
