"""The ground truth of an annotated case, in its canonical frame: its vertebral bodies from their masks, from the
discs between them (``ivd/``) or from radiologists' centre points (``tianchi/``), and the points that pin S1 and
T12 where the bodies are not annotated.  The definitions are those of :mod:`SpineNetLib.evaluation.evaluate`
(its module docstring), which scores predictions against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.evaluation.own_cases import load_own_case, marked_by_points
from SpineNetLib.training.datasets import (
    POINT_SOURCES,
    S1_UNANNOTATED_SOURCES,
    SOURCE_FOLDERS,
    CaseData,
    CaseGeometry,
    case_geometry,
    is_vertebral_body_code,
    load_case,
    mask_centroid,
)


@dataclass(frozen=True)
class GroundTruthVertebra:
    level: str
    mid_slice: int            # canonical slice index
    centroid: np.ndarray      # (2,) [x, y] on mid_slice
    #: Cut by the image border on its mid slice (e.g. L1 of myo_15 at row 0): not scored,
    #: and a prediction on it is neither TP nor FP.
    ignored: bool = False


@dataclass
class CaseGroundTruth:
    """Ground truth of one case, in its canonical frame."""

    case_id: str
    spacing_mm: tuple[float, float, float]   # (row, col, slice)
    vertebrae: list[GroundTruthVertebra]     # top to bottom
    #: Rows bounding the annotated range (superior edge of the highest body,
    #: inferior edge of the lowest, on their mid slices); None without bodies.
    range_top_row: float | None = None
    range_bottom_row: float | None = None
    #: Cases with an annotated L5-S1 disc and no outlined S1 (points of ``tianchi/``, disc masks of ``ivd/``):
    #: where S1 must be, on canonical slice ``s1_slice``: the L5 point mirrored through the L5-S1 disc point
    #: (``ground_truth_from_points``), or L5's centre carried across the disc mask along its normal
    #: (``ground_truth_from_disc_labels``); scored apart from the annotated bodies (``CaseMetrics.s1_detected``
    #: / ``s1_named``).
    s1_point: np.ndarray | None = None
    s1_slice: int = 0
    #: Point-annotated cases with a T12-L1 disc point: the L1 point mirrored through it, which lies inside T12,
    #: a body they do not annotate (on slice 0; ``ground_truth_from_points``). A body named T12 must hold it:
    #: one named T12 elsewhere stands above a body the detector missed (``CaseMetrics.t12_named_elsewhere``).
    t12_point: np.ndarray | None = None
    #: Cases with annotated discs (points of ``tianchi/``, masks of ``ivd/``): a point inside each disc,
    #: ``{"L5-S1": (slice, [x, y]), ...}`` (the radiologists' point; a mask's centroid on the slice where
    #: it is largest).  It lies between two bodies, so a predicted outline holding it reaches into the
    #: disc (``CaseMetrics.disc_points_inside_outlines``).
    disc_points: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    #: Volumes whose S1 is shown below the annotated L5 but neither outlined nor placed by a disc
    #: (``datasets.S1_UNANNOTATED_SOURCES``): the body the chain puts below L5 is scored as S1 where the image
    #: holds S1 whole (``CaseMetrics.s1_below_l5``), apart where it cuts S1 below its centre
    #: (``CaseMetrics.s1_cut_below_l5``); ``image_rows``, the canonical image's height, says where.
    s1_shown_not_annotated: bool = False
    image_rows: int | None = None


def ground_truth_from_labels(labels: np.ndarray, spacing_mm, level_names: dict[int, str],
                             case_id: str = "") -> CaseGroundTruth:
    """Ground truth from a canonical label volume ``(H, W, S)`` (vertebral-body codes only)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"labels must be a 3D volume, got shape {labels.shape}")
    vertebrae: list[GroundTruthVertebra] = []
    top = bottom = None
    codes = sorted(int(c) for c in np.unique(labels) if is_vertebral_body_code(c))
    for code in codes:
        mask = labels == code
        slices = np.nonzero(mask.any(axis=(0, 1)))[0]
        mid = int(np.round(np.median(slices)))
        if not mask[:, :, mid].any():  # a gap in the annotated slices: nearest annotated one
            mid = int(slices[np.argmin(np.abs(slices - mid))])
        m = mask[:, :, mid]
        clipped = bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
        vertebrae.append(GroundTruthVertebra(level=level_names.get(code, str(code)), mid_slice=mid,
                                             centroid=mask_centroid(m), ignored=clipped))
        rows = np.nonzero(m.any(axis=1))[0]
        if code == codes[0]:
            top = float(rows.min())
        if code == codes[-1]:
            bottom = float(rows.max())
    return CaseGroundTruth(case_id=case_id, spacing_mm=tuple(float(s) for s in spacing_mm),
                           vertebrae=vertebrae, range_top_row=top, range_bottom_row=bottom)


def ground_truth_from_disc_labels(labels: np.ndarray, spacing_mm, level_names: dict[int, str],
                                  case_id: str = "") -> CaseGroundTruth:
    """Ground truth of the bodies between annotated discs, for data with disc masks only (``ivd/``).

    A body counts where the discs above and below it are both annotated
    (discs "L1-L2" and "L2-L3" give body L2).  Its mid slice is the sagittal
    slice where the two discs have the largest product of areas; its
    centroid is the midpoint of the two disc centroids on that slice, which
    lies inside the body (the body fills the space between its endplates)
    but is not its mask centroid, so localisation errors are approximate.
    The annotated range runs from the centroid of the highest disc to that
    of the lowest: detections of the bodies beyond (e.g. L1, S1) are not
    scored as bodies.  S1 is scored apart, as on the point-annotated slices
    (``s1_point`` on L5's mid slice, :func:`point_across_disc`).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"labels must be a 3D volume, got shape {labels.shape}")
    discs = {}
    for code in np.unique(labels):
        name = level_names.get(int(code), "")
        if "-" in name:
            upper, lower = name.split("-", 1)
            discs[upper] = (int(code), lower)
    vertebrae: list[GroundTruthVertebra] = []
    rows = []
    disc_points = {}
    s1_point, s1_slice = None, 0
    for upper, (code, body) in discs.items():
        disc = labels == code
        rows.append(float(mask_centroid(disc.any(axis=2))[1]))
        largest = int(np.argmax(disc.sum(axis=(0, 1))))
        disc_points[f"{upper}-{body}"] = (largest, mask_centroid(disc[:, :, largest]))
        if body not in discs:
            continue
        above, below = disc, labels == discs[body][0]
        overlap = above.sum(axis=(0, 1)).astype(float) * below.sum(axis=(0, 1))
        mid = int(np.argmax(overlap))
        if overlap[mid] <= 0:
            continue
        centroid = (mask_centroid(above[:, :, mid]) + mask_centroid(below[:, :, mid])) / 2.0
        vertebrae.append(GroundTruthVertebra(level=body, mid_slice=mid, centroid=centroid))
        if body == "L5" and discs[body][1] == "S1":
            s1_point, s1_slice = point_across_disc(below[:, :, mid], centroid), mid
    vertebrae.sort(key=lambda v: float(v.centroid[1]))
    return CaseGroundTruth(case_id=case_id, spacing_mm=tuple(float(s) for s in spacing_mm), vertebrae=vertebrae,
                           range_top_row=min(rows) if rows else None, range_bottom_row=max(rows) if rows else None,
                           disc_points=disc_points, s1_point=s1_point, s1_slice=s1_slice)


def point_across_disc(disc_2d: np.ndarray, above: np.ndarray) -> np.ndarray:
    """The point ``[x, y]`` as far below the disc mask ``disc_2d`` (one slice) as ``above``, the centre of the
    body above it, lies above the disc's centroid, along the disc's own normal (the minor axis of its
    pixels, pointing down): the centre of the body below it.  Why not ``above`` mirrored through the
    centroid, as for points: the lumbosacral disc is a wedge and S1 leans back against L5, so the mirror
    image lands at S1's front lower corner (on ``ivd/``); the disc's normal lies between the two bodies'
    axes and keeps the point inside S1."""
    rows, cols = np.nonzero(disc_2d)
    xy = np.stack([cols, rows], axis=1).astype(float)
    centre = xy.mean(axis=0)
    if len(xy) < 3:
        return 2.0 * centre - np.asarray(above, float)
    normal = np.linalg.eigh(np.cov((xy - centre).T))[1][:, 0]   # eigenvalues ascending: the minor axis
    normal = normal if normal[1] > 0 else -normal
    return centre + normal * float(np.linalg.norm(np.asarray(above, float) - centre))


def ground_truth_from_points(labels: np.ndarray, spacing_mm, level_names: dict[int, str],
                             case_id: str = "") -> CaseGroundTruth:
    """Ground truth of point-annotated cases (``tianchi/``): body centre points drawn as small disks.

    Each body's centroid is its point (the disk's centroid).  The annotated
    range runs from the highest to the lowest DISC point (T12-L1 .. L5-S1):
    the bodies beyond them (T12 and above, S1 and below) are visible but not
    annotated, so detections there are neither TP nor FP.  Without disc
    points the range is that of the body points.  S1 is scored apart
    (``s1_point``: the L5 point mirrored through the L5-S1 disc point, which
    lies inside S1), so the body tables stay those of the annotated L1-L5; so is T12 (``t12_point``, the L1
    point mirrored through the T12-L1 disc point).
    """
    gt = ground_truth_from_labels(labels, spacing_mm, level_names, case_id)
    labels = np.asarray(labels)
    disc_masks = {name.split()[0]: (labels == code).any(axis=2) for code, name in level_names.items() if "-" in name}
    disc_centres = {name: mask_centroid(m) for name, m in disc_masks.items() if m.any()}
    if disc_centres:
        rows = [float(c[1]) for c in disc_centres.values()]
        gt.range_top_row, gt.range_bottom_row = min(rows), max(rows)
    gt.disc_points = {name: (0, centre) for name, centre in disc_centres.items()}
    l5 = [v for v in gt.vertebrae if v.level == "L5"]
    if l5 and "L5-S1" in disc_centres:
        # S1 has no point: the L5 centre mirrored through the L5-S1 disc point lies inside S1
        # (the disc separates two bodies of about the same height along the spine's axis).
        gt.s1_point = 2.0 * disc_centres["L5-S1"] - np.asarray(l5[0].centroid, float)
    l1 = [v for v in gt.vertebrae if v.level == "L1"]
    if l1 and "T12-L1" in disc_centres:   # the same for T12 above the T12-L1 disc
        gt.t12_point = 2.0 * disc_centres["T12-L1"] - np.asarray(l1[0].centroid, float)
    return gt


def annotated_with_points(case) -> bool:
    """Whether a case's bodies are annotated with centre points (``tianchi/``, or a case of one's own
    with Slicer point markups or whose ``case.json`` says ``"annotation": "points ..."``:
    :func:`~SpineNetLib.evaluation.own_cases.marked_by_points`), not outlines."""
    return case.source in POINT_SOURCES or marked_by_points(case.path)


def ground_truth_of_case(case) -> CaseGroundTruth:
    """Vertebral-body ground truth of a real case (:func:`ground_truth_of`)."""
    return ground_truth_of(case, case_data_and_geometry(case)[0])


def case_data_and_geometry(case) -> tuple[CaseData, CaseGeometry]:
    """Scan and labels of a case in the canonical frame, and its geometry: a case of ``../shared/data``
    (:func:`~SpineNetLib.training.datasets.load_case`) or one of one's own (:mod:`.own_cases`)."""
    if case.source in SOURCE_FOLDERS.values():
        return load_case(case), case_geometry(case)
    return load_own_case(case)


def ground_truth_of(case, data: CaseData) -> CaseGroundTruth:
    """Vertebral-body ground truth of a loaded case; from its discs when no body is annotated (``ivd/``),
    from its centre points for point-annotated cases (``tianchi/``; :func:`annotated_with_points`)."""
    if annotated_with_points(case):
        return ground_truth_from_points(data.labels, data.spacing_mm, data.level_names, case.case_id)
    if any(is_vertebral_body_code(int(c)) for c in np.unique(data.labels)):
        truth = ground_truth_from_labels(data.labels, data.spacing_mm, data.level_names, case.case_id)
        truth.s1_shown_not_annotated = case.source in S1_UNANNOTATED_SOURCES
        truth.image_rows = int(np.asarray(data.labels).shape[0])
        return truth
    return ground_truth_from_disc_labels(data.labels, data.spacing_mm, data.level_names, case.case_id)
