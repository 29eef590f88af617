"""Bring any 3D scan into the canonical sagittal orientation of :class:`~SpineNetLib.core.scan.Scan`.

Input: a numpy array ``[k, j, i]`` (SimpleITK / Slicer ``arrayFromVolume``
convention) and its 4x4 IJK-to-RAS matrix.  Output: a :class:`Scan` whose
voxels are indexed ``[row, col, slice]`` with rows S->I, columns A->P and
slices R->L (docs/CONVENTIONS.md, official §4).

What this module does, and why
------------------------------
* The canonical array is a **permutation and flip of the input axes only**;
  nothing is interpolated, so every canonical voxel is an input voxel and
  results map exactly back to the input.  For each canonical axis we pick the
  input axis whose direction is closest to it (best of the 6 assignments);
  oblique or rotated sagittal scans therefore stay oblique.
* **2D acquisitions** (one spacing clearly larger, > 1.5x, than the other
  two) must be sagittal: SpineNet's networks only see sagittal slices
  (official §4), and re-slicing thick axial or coronal slices into sagittal
  ones would give images with 4-6 mm pixels along the spine, which the
  networks never saw.  Such scans are refused with a one-line message.
* **Near-isotropic thin-slice 3D acquisitions** (all spacings within 1.5x,
  all <= 2 mm) are, whatever plane they were acquired in, permuted so that
  the input axis closest to left-right holds the slices, and that axis is
  then **slab-averaged** to slices of about 3.5 mm
  (:data:`TARGET_SLICE_MM`).  The official networks were trained on 2D
  sagittal TSE with 3-4.5 mm slices (no resampling in the official code,
  official §4); on thin-slice isotropic data they miss and mislabel
  vertebrae (official §10, issue #2, where sub-sampling the slices helped).
  Averaging the thin slices within each slab reproduces the partial-volume
  look and signal-to-noise of a thick slice; point sampling every n-th slice
  would keep the thin-slice noise and throw away most of the data.  Each
  output slice is the plain mean of ``f = round(3.5 mm / s)`` whole input
  slices (1 mm -> 4 slices = 4 mm, 0.8 mm -> 3.2 mm, 0.5 mm -> 3.5 mm, all
  within the 3-4.5 mm range), so its centre is exactly the mean input index
  and the geometry stays an exact affine map; the ``n mod f`` left-over
  edge slices (under 3.5 mm of lateral tissue) are dropped, split between
  both sides.  Pass ``resample_isotropic=False`` to keep the native slices.
* **Sagittal stacks of thin slices** (slices <= 2 mm apart, more than 1.5x the
  pixel spacing, so the rule above calls them 2D) are slab-averaged in the
  same way: a 3D sagittal sequence such as T2 SPACE (0.47 mm pixels, 0.9 mm
  slices) is the common thin-slice acquisition of the spine, and all 58 3D
  series of the SPIDER data set's overview (``../shared/data/spider/``) are
  of this kind.  Their slices are as thin as a near-isotropic volume's, so
  the same reason holds.  The bundled networks, which trained on 1 mm slices
  too, name the 18 held-out volumes made so (0.5 mm pixels, 1 mm slices)
  right either way; averaged, a run takes a third of the time (bundled
  MODEL_CARD.md, "Other acquisitions", ``space_like``).
* Anything else (e.g. a 3 mm isotropic volume) is only permuted/flipped.
"""

from __future__ import annotations

import itertools

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.scan import Scan

#: Slab thickness (mm) for thin-slice 3D volumes: middle of the 3-4.5 mm
#: slice thickness of the 2D sagittal TSE the networks were trained on.
TARGET_SLICE_MM = 3.5
#: A spacing this many times larger than the others marks a 2D (slice) acquisition.
ANISOTROPY_RATIO = 1.5
#: Near-isotropic volumes with every spacing at or below this are "thin-slice 3D".
THIN_SLICE_MM = 2.0
#: Largest image side and voxel count read (a 1 MB file may claim gigabytes: issue 12).  Clinical
#: spinal MRI is at most 1024 pixels per side and a few hundred slices; 2^27 voxels are 512 MB as float32.
MAX_SIDE_PX = 4096
MAX_VOXELS = 1 << 27
#: Plausible in-plane pixel spacing of spinal MRI (mm; clinical scans use 0.2-2 mm); outside it the
#: header is wrong (100 mm pixels would make thousands of 26 cm detector patches of 3 pixels).
PIXEL_SPACING_RANGE_MM = (0.05, 5.0)
#: ... and the largest in-plane field of view (a whole spine is under a metre).
MAX_FIELD_OF_VIEW_MM = 1500.0
#: Plausible spacing between sagittal slices (mm; clinical 2D scans use 3-6 mm, 3D ones under 2 mm): a
#: header or an override beyond it is wrong (1000 mm slices would pass unseen, each body on one slice).
SLICE_SPACING_RANGE_MM = (0.05, 50.0)
_OVERRIDE_RANGES_MM = {"pixel_spacing": PIXEL_SPACING_RANGE_MM, "slice_spacing": SLICE_SPACING_RANGE_MM}

#: RAS axis each canonical axis follows, and the RAS sign it runs towards:
#: rows -> inferior (-S), cols -> posterior (-A), slices -> left (-R).
_CANONICAL_RAS_AXIS = (2, 1, 0)
_ORIENTATION_NAMES = {0: ("sagittal", "L-R"), 1: ("coronal", "A-P"), 2: ("axial", "S-I")}


def _validate_voxels(voxels_kji) -> np.ndarray:
    arr = np.asarray(voxels_kji)
    if arr.ndim == 4:
        raise InputError(
            f"4D or multi-component (vector) data of shape {arr.shape} is not supported: "
            "give a single 3D scalar volume")
    if arr.ndim != 3:
        raise InputError(f"expected a 3D volume, got an array with {arr.ndim} dimension(s) of shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"voxel type {arr.dtype} is not supported: give real-valued (scalar) voxels")
    if min(arr.shape) < 1:
        raise InputError(f"the volume is empty (shape {arr.shape})")
    if arr.size > MAX_VOXELS or max(arr.shape) > max(MAX_SIDE_PX, 4096):
        raise InputError(f"the volume of shape {arr.shape} is larger than SpineNet reads "
                         f"(at most {MAX_VOXELS} voxels)")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"the volume has {n_bad} NaN or infinite voxel(s)")
    return arr


def plain_numbers(values) -> str:
    """Numbers for a message, plainly: "0.8 x 0.8 x 4" (not a list of numpy scalars)."""
    return " x ".join(f"{float(v):g}" for v in values)


def _validate_affine(ijk_to_ras) -> np.ndarray:
    try:
        a = np.asarray(ijk_to_ras, dtype=float)
    except (TypeError, ValueError):
        raise InputError("the IJK-to-RAS matrix is not numeric") from None
    if a.shape != (4, 4):
        raise InputError(f"the IJK-to-RAS matrix must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError("the IJK-to-RAS matrix has NaN or infinite entries")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise InputError("the IJK-to-RAS matrix is not affine (last row must be 0 0 0 1)")
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(spacing <= 1e-6):
        raise InputError(f"degenerate IJK-to-RAS matrix: voxel spacing "
                         f"{plain_numbers(spacing)} mm has a zero")
    unit = a[:3, :3] / spacing
    if abs(np.linalg.det(unit)) < 1e-3:
        raise InputError("degenerate IJK-to-RAS matrix: the voxel axes are (nearly) coplanar")
    return a


def _best_assignment(unit_dirs: np.ndarray, fixed_slice_axis: int | None = None) -> tuple[int, int, int]:
    """Input axis (0=i, 1=j, 2=k) for canonical row, col and slice.

    Picks, of the 6 one-to-one assignments, the one whose input directions
    are closest (largest sum of |cosine|) to S-I, A-P and L-R respectively.
    """
    best, best_score = None, -1.0
    for perm in itertools.permutations(range(3)):
        if fixed_slice_axis is not None and perm[2] != fixed_slice_axis:
            continue
        score = sum(abs(unit_dirs[_CANONICAL_RAS_AXIS[c], perm[c]]) for c in range(3))
        if score > best_score + 1e-9:
            best, best_score = perm, score
    return best  # type: ignore[return-value]


def sagittal_axis(ijk_to_ras) -> int:
    """Input axis (0=i, 1=j, 2=k) that holds the sagittal slices (closest to L-R)."""
    a = np.asarray(ijk_to_ras, dtype=float)
    unit = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    return _best_assignment(unit)[2]


def classify_acquisition(spacing_ijk, unit_dirs: np.ndarray) -> tuple[str, int | None, int | None]:
    """``(kind, slice_axis, normal_ras_axis)`` from voxel spacings and directions.

    kind is "2D" (one spacing > 1.5x the other two: slice axis = that one,
    normal_ras_axis = 0/1/2 for the RAS axis closest to the slice normal),
    "3D-thin" (all spacings within 1.5x and <= 2 mm) or "3D" (anything else).
    """
    sp = np.asarray(spacing_ijk, dtype=float)
    order = np.argsort(sp, kind="stable")
    if sp[order[2]] > ANISOTROPY_RATIO * sp[order[1]]:
        s = int(order[2])
        a, b = [ax for ax in range(3) if ax != s]
        normal = np.cross(unit_dirs[:, a], unit_dirs[:, b])
        return "2D", s, int(np.argmax(np.abs(normal)))
    if sp[order[2]] <= ANISOTROPY_RATIO * sp[order[0]] and sp[order[2]] <= THIN_SLICE_MM:
        return "3D-thin", None, None
    return "3D", None, None


def averages_slices(kind: str, slice_mm: float) -> bool:
    """Whether a scan of ``kind`` (:func:`classify_acquisition`) with slices ``slice_mm`` apart has its slices
    averaged into slabs (the module docstring says why): near-isotropic thin-slice volumes, and 2D (sagittal)
    stacks whose slices are no more than :data:`THIN_SLICE_MM` apart."""
    return kind == "3D-thin" or (kind == "2D" and slice_mm <= THIN_SLICE_MM)


def slab_factor(n_slices: int, slice_mm: float, target_mm: float = TARGET_SLICE_MM) -> int:
    """Number of thin slices averaged per output slice (1 = no resampling); keeps >= 2 output slices."""
    f = int(np.floor(target_mm / slice_mm + 0.5))
    f = min(f, n_slices // 2)
    return max(f, 1)


def spacing_override(value, n: int, name: str, label: str | None = None) -> np.ndarray | None:
    """Validate a user spacing override: None, or ``n`` positive mm values (a scalar is repeated) within the
    plausible range of ``name`` ("pixel_spacing": :data:`PIXEL_SPACING_RANGE_MM`, "slice_spacing":
    :data:`SLICE_SPACING_RANGE_MM`).  ``label`` names the override in the messages (the command's option,
    e.g. "--pixel-spacing"; default "<name> override")."""
    if value is None:
        return None
    label = label or f"{name} override"
    try:
        arr = np.atleast_1d(np.asarray(value, dtype=float)).ravel()
    except (TypeError, ValueError):
        raise InputError(f"{label} must be {n} positive, finite number(s) in mm, got {value!r}") from None
    if arr.size == 1 and n == 2:
        arr = np.repeat(arr, 2)
    if arr.size != n or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise InputError(f"{label} must be {n} positive, finite number(s) in mm, got "
                         f"{plain_numbers(arr) if arr.size else repr(value)}")
    low, high = _OVERRIDE_RANGES_MM[name]
    if not np.all((arr >= low) & (arr <= high)):
        raise InputError(f"{label} {plain_numbers(arr)} mm is not plausible for spinal MRI ({low:g} to {high:g} mm)")
    return arr


def _slab_means(canon: np.ndarray, start: int, n_out: int, f: int) -> np.ndarray:
    """Slices ``start + f*t ... start + f*t + f - 1`` of a canonical ``(rows, cols, slices)`` array
    (a view of the input) averaged into slab t, for t < ``n_out``; float64.

    The slabs are summed straight from the input's layout, before anything is copied into the canonical
    one, which then holds f times fewer slices (0.16 -> 0.12 s to read chu_02).  Every scan is float32:
    the slabs average those values, slice by slice in order (the sums numpy's mean makes).
    """
    canon = canon.astype(np.float32, copy=False)   # keeps the input's memory order
    stop = start + n_out * f
    total = canon[:, :, start:stop:f].astype(np.float64)
    for offset in range(1, f):
        total += canon[:, :, start + offset:stop:f]
    return total / f


def _check_spacings(spacing_ijk: np.ndarray, shape_ijk: tuple, perm: tuple[int, int, int]) -> None:
    """Refuse pixel and slice spacings outside those of spinal MRI, and an in-plane field of view over
    :data:`MAX_FIELD_OF_VIEW_MM` (``perm``: the input axes of the canonical rows, columns and slices)."""
    low_mm, high_mm = PIXEL_SPACING_RANGE_MM
    in_plane = [float(spacing_ijk[perm[0]]), float(spacing_ijk[perm[1]])]
    if not all(low_mm <= s_mm <= high_mm for s_mm in in_plane):
        raise InputError(f"in-plane pixel spacing {in_plane[0]:g} x {in_plane[1]:g} mm is not plausible for spinal "
                         f"MRI ({low_mm:g} to {high_mm:g} mm): check the header, or give --pixel-spacing")
    slice_mm = float(spacing_ijk[perm[2]])
    low_mm, high_mm = SLICE_SPACING_RANGE_MM
    if not low_mm <= slice_mm <= high_mm:
        raise InputError(f"slice spacing {slice_mm:g} mm is not plausible for spinal MRI ({low_mm:g} to "
                         f"{high_mm:g} mm): check the header, or give --slice-spacing")
    extent = [in_plane[0] * shape_ijk[perm[0]], in_plane[1] * shape_ijk[perm[1]]]
    if max(extent) > MAX_FIELD_OF_VIEW_MM:
        raise InputError(f"the image covers {extent[0]:.0f} x {extent[1]:.0f} mm in plane, more than the "
                         f"{MAX_FIELD_OF_VIEW_MM:.0f} mm of any spine scan: check the pixel spacing")


def scan_from_array(voxels_kji: np.ndarray, ijk_to_ras: np.ndarray, metadata: dict | None = None, *,
                    resample_isotropic: bool = True) -> Scan:
    """Canonical :class:`Scan` of a ``[k, j, i]`` array with its IJK-to-RAS matrix.

    Raises :class:`InputError` (one line) for 4D/vector data, non-finite
    voxels, a degenerate matrix, a single slice that is not sagittal, and 2D
    axial or coronal acquisitions.  A single sagittal slice is accepted with a
    warning in ``metadata["warnings"]``.  See the module docstring for the rules.
    """
    arr = _validate_voxels(voxels_kji)
    affine = _validate_affine(ijk_to_ras)
    nk, nj, ni = arr.shape
    shape_ijk = (int(ni), int(nj), int(nk))
    spacing_ijk = np.linalg.norm(affine[:3, :3], axis=0)
    unit = affine[:3, :3] / spacing_ijk

    kind, slice_axis, normal_axis = classify_acquisition(spacing_ijk, unit)
    if kind == "2D" and normal_axis != 0:
        plane, axis_name = _ORIENTATION_NAMES[normal_axis]
        raise InputError(f"{plane} acquisition: SpineNet needs sagittal slices "
                         f"(slice normal is closest to {axis_name})")
    perm = _best_assignment(unit, fixed_slice_axis=slice_axis if kind == "2D" else None)
    _check_spacings(spacing_ijk, shape_ijk, perm)

    singleton = [ax for ax in range(3) if shape_ijk[ax] == 1]
    if singleton and singleton != [perm[2]]:
        raise InputError(f"a single slice (input shape ijk {shape_ijk}) that is not sagittal: "
                         "SpineNet needs sagittal slices")
    single_sagittal_slice = shape_ijk[perm[2]] == 1

    # canonical axis c <- input axis perm[c]; flip where the input runs the other way.
    flips = [bool(unit[_CANONICAL_RAS_AXIS[c], perm[c]] > 0) for c in range(3)]
    canon = np.transpose(arr, tuple(2 - perm[c] for c in range(3)))
    for c in range(3):
        if flips[c]:
            canon = np.flip(canon, axis=c)

    to_ijk = np.zeros((4, 4))
    to_ijk[3, 3] = 1.0
    for c in range(3):
        ax = perm[c]
        if flips[c]:
            to_ijk[ax, c] = -1.0
            to_ijk[ax, 3] = shape_ijk[ax] - 1
        else:
            to_ijk[ax, c] = 1.0

    meta = dict(metadata or {})
    n_in = canon.shape[2]
    s_in = float(spacing_ijk[perm[2]])
    averaged = averages_slices(kind, s_in)
    meta["acquisition"] = {"2D": "thin-slice sagittal" if averaged else "2D sagittal", "3D-thin": "3D thin-slice",
                           "3D": "3D"}[kind]
    if single_sagittal_slice:
        # A key image or a 2D study: processed, but every body is seen on one slice only, the
        # appearance crops and disc volumes repeat that slice, and no left-right extent is known.
        meta["acquisition"] = "single sagittal slice"
        meta.setdefault("warnings", []).append(
            "a single sagittal slice: each vertebra is seen on this slice only, so levels and grades "
            "rest on less evidence than with a stack of slices")
    if averaged and resample_isotropic:
        f = slab_factor(n_in, s_in)
        if f > 1:
            n_out = n_in // f
            start = (n_in - n_out * f) // 2
            canon = _slab_means(canon, start, n_out, f)
            # canonical slice t = mean of slices start + f*t ... start + f*t + f - 1
            slab = np.eye(4)
            slab[2, 2] = f
            slab[2, 3] = start + (f - 1) / 2.0
            to_ijk = to_ijk @ slab
            meta["resampled"] = {"from_slices": int(n_in), "to_slices": int(n_out), "slices_per_slab": int(f),
                                 "dropped_edge_slices": int(n_in - n_out * f),
                                 "from_mm": s_in, "to_mm": s_in * f, "method": "slab average"}

    canon = np.ascontiguousarray(canon, dtype=np.float32)
    canonical_to_ras = affine @ to_ijk
    spacing = tuple(float(x) for x in np.linalg.norm(canonical_to_ras[:3, :3], axis=0))
    for key, value in list(meta.items()):
        if isinstance(value, np.ndarray):
            meta[key] = value.tolist()
    return Scan(
        voxels=canon,
        spacing_mm=spacing,  # type: ignore[arg-type]
        canonical_to_ras=canonical_to_ras,
        input_ijk_to_ras=affine.copy(),
        input_shape_ijk=shape_ijk,
        canonical_to_input_ijk=to_ijk,
        input_slice_axis=int(perm[2]),
        metadata=meta,
    )
