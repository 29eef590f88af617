"""A T1-like contrast made from a T2 image by an intensity map (numpy only, so that a benchmark run on ONNX
Runtime can use it without torch).

On T2 the brightest tissue of a lumbar scan is cerebrospinal fluid, healthy disc nuclei and fat, and the marrow
is mid-grey; on T1 the marrow is bright and fluid dark.  :func:`t1_like_map` moves the intensities piecewise-
linearly with knots at percentiles of the image's foreground: the middle knot (near the marrow) becomes the
brightest, the bright knot and the brightest voxel dark grey.  A caricature: fat turns dark with the fluid,
where on T1 it is bright.  ``benchmarks/acquisition_variants.py``'s ``t1_like`` row uses the fixed member
:data:`T1_LIKE_ROW`; ``augment.t1_like_contrast`` draws random members for ``--degradation t1-contrast``.
"""

from __future__ import annotations

import numpy as np

#: The benchmark row's member: the middle knot at the foreground's 70th percentile (the marrow of the T2 scans
#: here lies at their 44th-87th), the bright knot at its 92nd, and the new intensities of the knots (the
#: foreground's darkest voxel, the middle and bright knots, the brightest voxel) as shares of the 99.5th
#: percentile.
T1_LIKE_ROW = (70.0, 92.0, (0.15, 1.0, 0.35, 0.25))


def t1_like_map(x: np.ndarray, middle_percentile: float, bright_percentile: float,
                values: tuple[float, float, float, float], every: int = 1) -> np.ndarray:
    """``x`` (an image with a dark background at 0) with its intensities mapped piecewise-linearly: 0 stays 0,
    the foreground's darkest voxel (the foreground: voxels above a tenth of the 99.5th percentile), its
    ``middle_percentile`` and ``bright_percentile`` and the brightest voxel go to ``values`` times the 99.5th
    percentile.  The percentiles are taken over every ``every``-th voxel (fast on a volume).  Returned as it is
    (float32) where the foreground has fewer than 16 voxels."""
    x = np.asarray(x, np.float32)
    sample = x.ravel()[::max(1, int(every))]
    top = float(np.percentile(sample, 99.5)) or 1.0
    foreground = sample[sample > 0.1 * top]
    if foreground.size < 16:
        return x
    knots = [*np.percentile(foreground, (0.0, middle_percentile, bright_percentile)), float(x.max())]
    knots = np.maximum.accumulate(np.asarray(knots) + 1e-6 * top * np.arange(len(knots)))   # strictly rising
    return (top * np.interp(x, [0.0, *knots], [0.0, *values])).astype(np.float32)
