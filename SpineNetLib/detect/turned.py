"""A second detection on the slices turned so that the lowest body found stands upright (issue 10).

The bundled detector trained on patches turned by up to 20 degrees, but L5 and S1 already lean
20-40 degrees in most sagittal images; where the spine lies tilted so that they lean further, it
misses them (held-out scans turned by 12 degrees that way: L5 missed on 12 of 68; bundled
MODEL_CARD.md, "Other acquisitions").  When a labelled chain still ends above S1,
``pipeline.detect_and_label`` looks below it again with the bodies found here: every slice is turned
in-plane about the lowest body's centre by that body's own lean (measured in millimetres from its
two endplates), detected at the weaker threshold, and the outlines are turned back to scan pixels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from SpineNetLib.core.results import OUTLINE_FROM_WEAKER_DETECTION, Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.detect.plans import DetectionParams


def lean_degrees(body: Vertebra, spacing_rc: tuple[float, float]) -> float:
    """The lean of ``body``'s endplates from the image rows, in degrees, in millimetres (positive:
    the endplates fall towards larger x, i.e. posteriorly, as rows run downwards)."""
    p = np.asarray(body.average_polygon, float)          # rt, rb, lb, lt as [x, y]
    along = (p[0] - p[3]) + (p[1] - p[2])                # upper lt->rt plus lower lb->rb
    return float(np.degrees(np.arctan2(along[1] * spacing_rc[0], along[0] * spacing_rc[1])))


def _turn(points_xy: np.ndarray, degrees: float, centre_xy: np.ndarray, spacing_rc) -> np.ndarray:
    """Scan-pixel points ``[x, y]`` turned by ``degrees`` about ``centre_xy`` in millimetres."""
    mm = np.array([spacing_rc[1], spacing_rc[0]], float)
    a = np.radians(degrees)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return ((np.asarray(points_xy, float) - centre_xy) * mm) @ rot.T / mm + centre_xy


def turned_slices(voxels: np.ndarray, degrees: float, centre_xy: np.ndarray, spacing_rc) -> np.ndarray:
    """Every slice of ``voxels`` (rows, cols, slices) turned so that what leaned ``degrees`` stands
    level (bilinear, zeros outside); :func:`_turn` by ``degrees`` maps its pixels back."""
    rows, cols = voxels.shape[:2]
    yy, xx = np.meshgrid(np.arange(rows, dtype=float), np.arange(cols, dtype=float), indexing="ij")
    source = _turn(np.stack([xx.ravel(), yy.ravel()], axis=1), degrees, centre_xy, spacing_rc)
    coords = [source[:, 1].reshape(rows, cols), source[:, 0].reshape(rows, cols)]
    out = np.empty(voxels.shape, np.float32)
    for s in range(voxels.shape[2]):
        out[:, :, s] = ndimage.map_coordinates(voxels[:, :, s].astype(np.float32), coords, order=1, cval=0.0)
    return out


def bodies_on_turned_slices(scan: Scan, lowest: Vertebra, detect, params: DetectionParams,
                            min_lean_deg: float, further_deg: float = 0.0) -> list[Vertebra]:
    """The bodies ``detect(scan, params)`` (a ``detect_vertebrae``) finds, full-strength and weaker,
    on ``scan``'s slices turned so that ``lowest`` stands upright (turned ``further_deg`` more in the
    same direction), in scan pixels; none when it leans less than ``min_lean_deg``."""
    spacing_rc = (float(scan.spacing_mm[0]), float(scan.spacing_mm[1]))
    lean = lean_degrees(lowest, spacing_rc)
    if abs(lean) < min_lean_deg:
        return []
    lean += float(np.sign(lean)) * further_deg
    centre = np.asarray(lowest.average_polygon, float).mean(axis=0)
    turned = dataclasses.replace(scan, voxels=turned_slices(np.asarray(scan.voxels), lean, centre, spacing_rc))
    found = detect(turned, params)
    return [Vertebra(slices=list(v.slices), polygons=[_turn(p, lean, centre, spacing_rc) for p in v.polygons],
                     outline_from=OUTLINE_FROM_WEAKER_DETECTION)   # turned back: rougher, like the weaker ones
            for v in list(found.vertebrae) + list(found.candidates)]
