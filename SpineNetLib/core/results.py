"""Result dataclasses shared by the detection, labelling and output stages.

All in-slice coordinates are canonical pixel coordinates ``(x=col, y=row)``
of ``Scan.voxels`` and all slice indices are canonical slice indices; the
output writers map them to RAS millimetres and to the input's own slice index.
Quadrilateral corners are always in the official order **rt, rb, lb, lt**
(right-top, right-bottom, left-bottom, left-top in the canonical image, where
"right" is posterior and "top" is superior).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: Which network drew a body's outline (:attr:`Vertebra.outline_from`, ``vertebrae.json``, ``vertebrae.csv``):
#: the detector at full strength; the detector below its threshold (a weaker or faint detection, or one on
#: slices turned upright: ``label/missed_bodies.py``, ``detect/turned.py``), whose outlines are rougher
#: (bundled MODEL_CARD.md, "Bodies in a gap, found among the weaker detections"); the second detector
#: (``detect/s1_outline.py``), which draws S1's outline and the bodies it adds down to S1.
OUTLINE_FROM_DETECTOR = "detector"
OUTLINE_FROM_WEAKER_DETECTION = "weaker detection"
OUTLINE_FROM_S1_DETECTOR = "S1-outline detector"


@dataclass
class Vertebra:
    """One vertebral body, found on one or more sagittal slices."""

    #: Canonical slice indices, ascending.
    slices: list[int]
    #: One (4, 2) float array ``[[x, y] * 4]`` (rt, rb, lb, lt) per entry of ``slices``.
    polygons: list[np.ndarray]
    #: Level name ("L4", "S1", "S2", ...) once labelled, else None.
    level: str | None = None
    #: (24,) probabilities over ``levels.LEVELS`` after context (None before labelling).
    level_probabilities: np.ndarray | None = None
    #: (24,) appearance-network probabilities (None before labelling).
    appearance_probabilities: np.ndarray | None = None
    #: The canonical slices ``(first, last)`` the appearance network saw of the scan; None: every slice
    #: (``label/appearance_slices.py``).
    appearance_slices: tuple[int, int] | None = None
    #: Which network drew the outline: one of the ``OUTLINE_FROM_*`` names above.
    outline_from: str = OUTLINE_FROM_DETECTOR

    @property
    def average_polygon(self) -> np.ndarray:
        """Element-wise mean of the per-slice polygons, (4, 2)."""
        return np.mean(np.stack(self.polygons), axis=0)

    @property
    def mid_slice(self) -> int:
        """round(median(slices)), the slice the official code calls the mid slice."""
        return int(np.round(np.median(self.slices)))

    def polygon_on(self, canonical_slice: int) -> np.ndarray | None:
        for s, p in zip(self.slices, self.polygons):
            if s == canonical_slice:
                return p
        return None

    @property
    def centroid_xy(self) -> np.ndarray:
        """Mean of the average polygon's corners, (2,)."""
        return self.average_polygon.mean(axis=0)

    @property
    def centroid_slice(self) -> float:
        return float(np.mean(self.slices))


@dataclass
class DetectionResult:
    """Vertebrae sorted top to bottom, with per-stage timings in seconds."""

    vertebrae: list[Vertebra]
    timings_s: dict[str, float] = field(default_factory=dict)
    #: Labelling settings that a later level correction must reuse (e.g. the repeat-S1 penalty).
    labelling: dict = field(default_factory=dict)
    #: Weaker detections (``DetectionParams.candidate_threshold``) overlapping no vertebra; the
    #: sacral search (``label/missed_bodies.py``) may take one as S1.  Not written to any output.
    candidates: list[Vertebra] = field(default_factory=list)
    #: Decodes the fainter detections (``DetectionParams.faint_threshold``) when
    #: :attr:`faint_candidates` is first read; None when there is nothing (more) to decode.  It holds
    #: the detector's maps below the bodies, so set it to None once the faint detections cannot be
    #: needed (``pipeline.detect_and_label`` does).
    faint_decoding: Callable[[], list[Vertebra]] | None = field(default=None, repr=False, compare=False)
    _faint_candidates: list[Vertebra] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def faint_candidates(self) -> list[Vertebra]:
        """Fainter detections still, overlapping no vertebra and no candidate, decoded on first use:
        they are needed only below a labelled chain that ends above S1, which is known only after
        labelling, and decoding them costs about as much as the full-strength decoding.  Not written
        to any output."""
        if self.faint_decoding is not None:
            start = time.perf_counter()
            self._faint_candidates, self.faint_decoding = self.faint_decoding(), None
            for stage in ("detection", "detection_postprocessing"):   # its seconds count as detection
                self.timings_s[stage] = self.timings_s.get(stage, 0.0) + time.perf_counter() - start
        return self._faint_candidates
