"""A phantom in input space and on disk (step 4 of :mod:`SpineNetLib.synthetic.phantom`).

What is here: the input array layout (how the canonical ``(H, W, S)`` array
is permuted and flipped into ``voxels_kji``, and its IJK-to-RAS matrix, for
the "dicom" and "ras" orientations), and writing a phantom's input array as
an MR DICOM series or as an image file (NIfTI, NRRD, ...) through
:mod:`SpineNetLib.inputs.writers`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from SpineNetLib.inputs.writers import write_dicom_series, write_image
from SpineNetLib.synthetic.params import PhantomParams

# --------------------------------------------------------------------------- input layout


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


def input_arrays(p: PhantomParams, canon: np.ndarray, spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels_kji, ijk_to_ras)`` of the canonical ``(H, W, S)`` array in the requested input layout.

    ``spacing`` is ``(row_mm, col_mm)``.  RAS: the image centre is at the
    origin, rows run to -S, columns to -A, canonical slices to -R.
    """
    h, w, n_s = canon.shape
    rmm, cmm = spacing
    thk = float(p.slice_thickness_mm)
    c2r = np.zeros((4, 4))
    c2r[0, 2], c2r[0, 3] = -thk, (n_s - 1) / 2.0 * thk                # R: slices run right -> left
    c2r[1, 1], c2r[1, 3] = -cmm, (w - 1) / 2.0 * cmm                  # A: columns run anterior -> posterior
    c2r[2, 0], c2r[2, 3] = -rmm, (h - 1) / 2.0 * rmm                  # S: rows run superior -> inferior
    c2r[3, 3] = 1.0
    m = _input_layout(p, (h, w, n_s))
    return _to_input(canon, m), c2r @ m


# --------------------------------------------------------------------------- files


def write_phantom_dicom(phantom, folder, **kwargs) -> list[Path]:
    """Write a :class:`~SpineNetLib.synthetic.phantom.Phantom`'s input array as an MR DICOM series.

    ``kwargs`` go to :func:`~SpineNetLib.inputs.writers.write_dicom_series`;
    the series description defaults to "phantom FOV CONTRAST".
    """
    kwargs.setdefault("series_description", f"phantom {phantom.params.fov} {phantom.params.contrast}")
    return write_dicom_series(phantom.voxels_kji, phantom.ijk_to_ras, folder, **kwargs)


def write_phantom_image(phantom, path) -> Path:
    """Write a phantom's input array as an image file (.nii.gz, .nrrd, ...) via
    :func:`~SpineNetLib.inputs.writers.write_image`."""
    return write_image(phantom.voxels_kji, phantom.ijk_to_ras, path)
