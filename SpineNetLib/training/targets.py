"""Vector Field Regression target maps (detector output channels, official §3.1).

:func:`render_vfr_maps` draws, for a set of vertebral-body quadrilaterals,
the 13 maps the VFR detector predicts (paper §4.4.1, official §3.1):

* channels 0-3: corner heat maps (rt, rb, lb, lt) and channel 4: centroid
  heat map.  Each point is an isotropic Gaussian peaking at 1.0 whose
  variance is proportional to the body's area:
  ``sigma = sigma_scale * sqrt(area)``, i.e. ``variance = sigma_scale**2 * area``.
  Overlapping Gaussians are combined with ``max`` so every peak stays 1.0.
* channels 5-8 (x) and 9-12 (y): the displacement from each corner to its
  body's centroid, in this frame's pixels, written into every pixel within
  ``radius = radius_scale * sqrt(area)`` of the corner (the nearest corner
  wins where neighbourhoods of the same channel overlap); 0 elsewhere.

Choice of constants (defaults).  A Gaussian exceeds the official 0.6
threshold within ``1.01 sigma`` of its centre, so with ``sigma_scale = 0.1``
the thresholded blob has a radius of about a tenth of the body's size: the
same-channel points of neighbouring bodies (at least ~1.2 sqrt(area) apart
even for cervical bodies with thin discs) give separate components, and the
pixel nearest to the true point (at most 0.71 px away) always exceeds the
threshold as long as ``sigma >= 0.75`` px, which holds for any body larger
than 7.5 px across.  A floor of ``sigma >= 0.75`` px keeps that guarantee for
tiny bodies.  ``radius_scale = 0.25`` (floor 1.5 px) makes the vector field
cover the corner's whole above-threshold blob plus a margin, so the
displacement read at the decoded corner pixel is the true one.

:func:`oracle_predictor` turns ground-truth quads into a detector stand-in
with the ``predict(patches, boxes)`` protocol of ``SpineNetLib.detect.vfr``;
tests of the post-processing and of the whole pipeline use it.
"""

from __future__ import annotations

import numpy as np

from SpineNetLib.core import polygons

N_CHANNELS = 13
#: Defaults, see the module docstring.
SIGMA_SCALE = 0.1
RADIUS_SCALE = 0.25
MIN_SIGMA_PX = 0.75
MIN_RADIUS_PX = 1.5


def render_vfr_maps(quads: np.ndarray, shape: tuple[int, int], *,
                    centroids: np.ndarray | None = None,
                    sigma_scale: float = SIGMA_SCALE,
                    radius_scale: float = RADIUS_SCALE,
                    corner_present: np.ndarray | None = None) -> np.ndarray:
    """Target maps ``(13, h, w)`` float32 for quads ``(N, 4, 2)`` ``[x, y]`` (rt, rb, lb, lt).

    ``quads`` are in this frame's pixel coordinates (pixel centres at
    integers) and may lie partly or wholly outside the frame.  ``centroids``
    ``(N, 2)`` defaults to the mean of each quad's corners.
    ``corner_present`` ``(N, 4)`` bool leaves out the heat-map blob and the
    vector field of the corners marked False (for tests of missing corners).
    """
    h, w = int(shape[0]), int(shape[1])
    maps = np.zeros((N_CHANNELS, h, w), dtype=np.float32)
    q = np.asarray(quads, dtype=np.float64).reshape(-1, 4, 2)
    if len(q) == 0 or h <= 0 or w <= 0:
        return maps
    c = q.mean(axis=1) if centroids is None else np.asarray(centroids, float).reshape(-1, 2)
    if len(c) != len(q):
        raise ValueError("centroids must have one row per quad")
    present = (np.ones((len(q), 4), bool) if corner_present is None
               else np.asarray(corner_present, bool).reshape(len(q), 4))
    # Distance of the current owner of each vector-field pixel, per corner channel.
    owner_d2 = np.full((4, h, w), np.inf)
    for i in range(len(q)):
        size = np.sqrt(max(polygons.area(q[i]), 0.0))
        sigma = max(sigma_scale * size, MIN_SIGMA_PX)
        radius = max(radius_scale * size, MIN_RADIUS_PX)
        _splat_gaussian(maps[4], c[i], sigma)
        for k in range(4):
            if not present[i, k]:
                continue
            _splat_gaussian(maps[k], q[i, k], sigma)
            disp = c[i] - q[i, k]
            _splat_vector(maps[5 + k], maps[9 + k], owner_d2[k], q[i, k], radius, disp)
    return maps


def _window(center, half: float, h: int, w: int):
    x0 = max(int(np.floor(center[0] - half)), 0)
    x1 = min(int(np.ceil(center[0] + half)) + 1, w)
    y0 = max(int(np.floor(center[1] - half)), 0)
    y1 = min(int(np.ceil(center[1] + half)) + 1, h)
    return x0, x1, y0, y1


def _splat_gaussian(channel: np.ndarray, center, sigma: float) -> None:
    h, w = channel.shape
    x0, x1, y0, y1 = _window(center, 4.0 * sigma, h, w)
    if x0 >= x1 or y0 >= y1:
        return
    gx = np.exp(-((np.arange(x0, x1) - center[0]) ** 2) / (2 * sigma * sigma))
    gy = np.exp(-((np.arange(y0, y1) - center[1]) ** 2) / (2 * sigma * sigma))
    patch = channel[y0:y1, x0:x1]
    np.maximum(patch, np.outer(gy, gx).astype(np.float32), out=patch)


def _splat_vector(cx: np.ndarray, cy: np.ndarray, owner_d2: np.ndarray, center,
                  radius: float, disp) -> None:
    h, w = cx.shape
    x0, x1, y0, y1 = _window(center, radius, h, w)
    if x0 >= x1 or y0 >= y1:
        return
    dx = np.arange(x0, x1) - center[0]
    dy = np.arange(y0, y1) - center[1]
    d2 = dy[:, None] ** 2 + dx[None, :] ** 2
    own = owner_d2[y0:y1, x0:x1]
    take = (d2 <= radius * radius) & (d2 < own)
    own[take] = d2[take]
    cx[y0:y1, x0:x1][take] = disp[0]
    cy[y0:y1, x0:x1][take] = disp[1]


def oracle_predictor(quads_by_slice: dict[int, np.ndarray], *,
                     corner_present_by_slice: dict[int, np.ndarray] | None = None,
                     sigma_scale: float = SIGMA_SCALE, radius_scale: float = RADIUS_SCALE):
    """A ``predict(patches, boxes)`` that renders the ground truth instead of running a network.

    ``quads_by_slice`` maps a canonical slice index to ``(N, 4, 2)`` quads in
    scan pixels ``[x=col, y=row]``.  Each box gets :func:`render_vfr_maps`
    of those quads mapped into its network frame (``box.net_px``: 224 x 224 for a
    patch, a whole slice at the network's scale) with
    ``SpineNetLib.detect.vfr.scan_to_patch_xy`` (the mapping the decoder
    inverts), at the top left of outputs of the inputs' shape (zeros on the padding).
    ``corner_present_by_slice`` optionally gives ``(N, 4)`` bool masks per
    slice (see :func:`render_vfr_maps`).
    """
    from SpineNetLib.detect.vfr import scan_to_patch_xy

    def predict(patches: np.ndarray, boxes) -> np.ndarray:
        out = np.zeros((len(boxes), N_CHANNELS, *np.shape(patches)[-2:]), np.float32)
        for n, box in enumerate(boxes):
            q = quads_by_slice.get(box.slice_index)
            if q is None or len(q) == 0:
                continue
            q = np.asarray(q, float).reshape(-1, 4, 2)
            qp = scan_to_patch_xy(q, box)
            rows, cols = box.net_px
            pres = None
            if corner_present_by_slice is not None and box.slice_index in corner_present_by_slice:
                pres = corner_present_by_slice[box.slice_index]
            # Skip bodies far outside the frame (cheap cull; rendering clips anyway).
            lo, hi = qp.min(axis=1), qp.max(axis=1)
            margin = 0.5 * (hi - lo).max(axis=1) + 4.0
            keep = ((hi[:, 0] + margin >= 0) & (lo[:, 0] - margin < cols)
                    & (hi[:, 1] + margin >= 0) & (lo[:, 1] - margin < rows))
            if not np.any(keep):
                continue
            out[n, :, :rows, :cols] = render_vfr_maps(qp[keep], (rows, cols),
                                     sigma_scale=sigma_scale, radius_scale=radius_scale,
                                     corner_present=None if pres is None else np.asarray(pres)[keep])
        return out

    return predict
