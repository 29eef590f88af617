"""Which sagittal slices the appearance network sees of each body (not official; docs/PROFILES.md).

The official code gives the appearance network every sagittal slice of the scan, resampled to 16
(official §5.4), and the networks learned from spines that lie in the middle of the slab: in training
the slab's sides were trimmed by less than a sixth each (``training.labelling.appearance_volume``).  A
spine that runs off the middle, as in a lateral curve (scoliosis) or a slab not centred on the spine,
shows the network its bodies at one side of those slices, and it names them worse: with the held-out
volumes curved sideways by 20 mm at mid-height, 3 of 18 came out with wrong levels, one of them not
flagged (``benchmarks/acquisition_variants.py --variants curved_20mm``; model card, "A spine off the
middle of the slab").

So a body is given the slices centred on the spine at its height, as many on each side as the scan
holds on the nearer side, where the spine there lies more than :data:`OFF_CENTRE_MM` from the middle
of the slab; otherwise every slice, as before.  Where the spine lies is the running median, over the
body and :data:`NEIGHBOURS` bodies on each side, of the middle of each body's run of slices: a body
found on a few slices to one side only (S1 often is) does not move its own slices.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import groupby
from typing import Sequence

import numpy as np

from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.scan import Scan

#: How far (mm) the spine may lie from the middle of the slab before a body's slices are centred on it.
#: 8 mm is two 4 mm slices: the middle of 95 % of the bodies' slice runs in the real volumes lies within
#: it (386 bodies of 55 volumes, both splits), so the slices of a straight spine stay as they were.
OFF_CENTRE_MM = 8.0
#: Bodies on each side of a body whose slice runs say with its own where the spine lies.
NEIGHBOURS = 2

#: The canonical slices ``(first, last)`` the appearance network sees of one body; None: every slice.
SliceRun = tuple[int, int] | None


def spine_centres(ordered: Sequence[Vertebra]) -> np.ndarray:
    """Where the spine lies at each body (top to bottom), in canonical slice numbers: the running median
    of the middles of the bodies' slice runs over :data:`NEIGHBOURS` bodies on each side."""
    middles = np.array([(min(v.slices) + max(v.slices)) / 2.0 for v in ordered], np.float64)
    return np.array([np.median(middles[max(0, i - NEIGHBOURS):i + NEIGHBOURS + 1]) for i in range(len(middles))])


def appearance_slice_runs(ordered: Sequence[Vertebra], n_slices: int, slice_mm: float,
                          off_centre_mm: float = OFF_CENTRE_MM) -> list[SliceRun]:
    """For each body (top to bottom) the slices the appearance network sees (see the module docstring)."""
    if n_slices < 3:
        return [None] * len(ordered)
    middle = (n_slices - 1) / 2.0
    runs: list[SliceRun] = []
    for centre in spine_centres(ordered):
        if abs(centre - middle) * slice_mm <= off_centre_mm:
            runs.append(None)
            continue
        half = min(centre, n_slices - 1 - centre)
        first, last = int(np.floor(centre - half + 1e-6)), int(np.ceil(centre + half - 1e-6))
        runs.append((max(0, first), min(n_slices - 1, last)))
    return runs


def off_middle_note(vertebrae: Sequence[Vertebra]) -> str | None:
    """The note, for the warnings, naming the labelled vertebrae (top to bottom) that the appearance network
    saw on slices centred on the spine (``.appearance_slices`` set); None when it saw every slice of each.

    Not a review reason of its own: the margin and the other checks judge those levels as any others
    (model card, "A spine off the middle of the slab").  It tells whoever reads only the warnings that the
    slab does not lie evenly about the spine there, which the per-vertebra field alone does not."""
    runs = [list(run) for centred, run in groupby(vertebrae, key=lambda v: v.appearance_slices is not None)
            if centred]
    if not runs:
        return None
    named = ", ".join(run[0].level if len(run) == 1 else f"{run[0].level}-{run[-1].level}" for run in runs)
    return (f"the spine lies off the middle of the slab at {named} (a lateral curve, or the slab placed to one "
            "side): the appearance network saw the slices centred on the spine there (appearance_slices)")


def slices_seen(scan: Scan, run: SliceRun) -> Scan:
    """``scan`` cut to the slice run (its in-plane geometry is all the appearance volume reads)."""
    return scan if run is None else replace(scan, voxels=scan.voxels[:, :, run[0]:run[1] + 1])
