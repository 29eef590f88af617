"""Why a run found no vertebra, as far as the image tells (issue 12): the one-line warning of an empty result."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from SpineNetLib.core.results import DetectionResult
from SpineNetLib.core.scan import Scan

#: A field of view smaller than this (mm, either side) cannot show a vertebral body with its neighbours.
MIN_FIELD_OF_VIEW_MM = 60.0


def _neighbour_correlation(image: np.ndarray) -> float:
    """Mean correlation of neighbouring pixels along rows and columns: about 0 for noise, near 1
    for MR anatomy (smooth at the pixel scale)."""
    a = np.asarray(image, np.float64) - float(np.mean(image))
    variance = float(np.mean(a * a))
    if variance == 0 or min(a.shape) < 2:
        return 1.0
    return float((np.mean(a[:, 1:] * a[:, :-1]) + np.mean(a[1:] * a[:-1])) / (2 * variance))


def no_vertebrae_reason(scan: Scan, result: DetectionResult, retried_factors: Sequence[float] = ()) -> str:
    """The warning of a run that found no vertebra, with the reason the image suggests (issue 12):
    a field of view too small, a blank, empty or noise-like image, detections too weak to keep, or
    nothing like a vertebral body at all.  ``retried_factors``: the multiples of the header's pixel
    spacing also tried (``pipeline.PIXEL_SPACING_FACTORS_TO_TRY``), none when it was not retried."""
    rows_mm, cols_mm = (n * mm for n, mm in zip(scan.voxels.shape[:2], scan.spacing_mm[:2]))
    mid = np.asarray(scan.voxels[:, :, scan.voxels.shape[2] // 2], np.float64)
    low, high = float(mid.min()), float(mid.max())
    background = float(np.mean(mid <= low + 0.05 * (high - low)))   # within 5 % of the range above the darkest
    if min(rows_mm, cols_mm) < MIN_FIELD_OF_VIEW_MM:
        reason = (f"the image covers only {rows_mm:.0f} x {cols_mm:.0f} mm, too little to show a vertebral body "
                  "with its neighbours")
    elif high <= low:
        reason = "the middle slice is uniform: there is no anatomy to see"
    elif background > 0.9:
        reason = f"{100 * background:.0f} % of the middle slice is background: little or no anatomy"
    elif (correlation := _neighbour_correlation(mid)) < 0.3:
        reason = (f"the image looks like noise (neighbouring pixels correlate at {round(correlation, 2) + 0.0:.2f}; "
                  "MR anatomy is smooth)")
    elif result.candidates:
        reason = (f"{len(result.candidates)} weaker detection(s) fell below the detection threshold: the spine may "
                  "be faint, cut off, or of a contrast the networks were not trained on")
    else:
        reason = "the detector saw nothing like a vertebral body"
    tried = f"at the header's pixel spacing ({scan.spacing_mm[0]:.3g} x {scan.spacing_mm[1]:.3g} mm)" + (
        f" and at {min(retried_factors):g} to {max(retried_factors):g} times it" if len(retried_factors) else "")
    return (f"no vertebra was found {tried}: {reason}; check that this is a sagittal MR image of the spine and "
            "that its pixel spacing is right")
