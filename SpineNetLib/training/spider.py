"""SPIDER-format lumbar MRI (van der Graaf et al., Sci Data 11, 264, 2024) as grading training data.

Layout read (the SPIDER release; only the tables are in ``shared/data/spider``)::

    DIR/images/NAME.mha            sagittal T1, T2 or T2-SPACE volume, NAME = "<patient>_<series>"
    DIR/masks/NAME.mha             label volume on the same grid
    DIR/radiological_gradings.csv  one row per disc and patient
    DIR/overview.csv               optional: per series "subset" (training / validation)

Label conventions, and what was verified
----------------------------------------
* ``radiological_gradings.csv`` (verified on the real file, 1,520 rows):
  header ``Patient, IVD label, Modic, UP endplate, LOW endplate,
  Spondylolisthesis, Disc herniation, Disc narrowing, Disc bulging,
  Pfirrman grade``; ``IVD label`` 1..9 counts discs upward from 1 = L5-S1
  (shared/data/README.md); Modic 0-3, Pfirrmann 1-5, every other grade 0/1.
  Two rows have ``IVD label`` 0 (no such disc in the masks): they match no
  disc and are never used.
* Masks (the SPIDER paper; *not verifiable here*, the images are not in
  shared/data): vertebrae 1..25, discs 201..225, spinal canal 100.  We rely
  on "disc 200 + n is the disc of ``IVD label`` n" (so 201 = L5-S1) only; the
  two vertebrae of a disc are found **geometrically** (the vertebra labels
  touching the disc, above and below it along the disc's own normal), so
  nothing depends on how the vertebrae are numbered (1 = L5 counting upward
  is assumed only in :func:`phantom_case`) or on whether the sacrum has a
  label at all.  When no labelled vertebra lies below a disc (L5-S1 with an
  unlabelled sacrum) the lower body is a stand-in: the disc's lower edge as
  its upper endplate, extended downwards by the upper body's height.
* SPIDER vertebra masks cover the whole vertebra, posterior elements
  included (an assumption, documented by the paper's figures).  Everything
  posterior to the spinal canal's anterior wall (per image row, over all
  slices) is cut off before the body quadrilateral is fitted
  (``datasets.vertebra_quad_from_mask``).
* Level names: disc 200 + n lies between ``LEVELS_TOP_DOWN[23 - n]`` and the
  level below it (n = 1: L5-S1, 2: L4-L5, ...).

Mapping of SPIDER's grades onto the grading heads (:data:`TASK_COLUMNS`;
the losses live in ``train_grader``): Pfirrmann 1-5 -> ``fc_pf`` class 0-4;
narrowing 0/1 -> ``fc_nar`` class 0 / any of 1-3 (SPIDER does not grade the
severity); spondylolisthesis 0/1 -> ``fc_spn`` 0 / any of 1-2 (the meaning of
classes 1 and 2 is unknown, official §3.4); UP / LOW endplate -> ``fc_ued`` /
``fc_led`` (the endplates above and below the disc); herniation ->
``fc_hrn``; Modic 0 -> no marrow change at either endplate (``fc_umc`` and
``fc_lmc`` both 0), Modic 1-3 -> a change at the upper **or** lower endplate
(SPIDER does not say which).  Bulging has no head; central canal and
foraminal stenosis have no SPIDER grade, so those heads get no labels.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import LEVELS_TOP_DOWN
from SpineNetLib.core.results import Vertebra
from SpineNetLib.training.datasets import read_volume

GRADINGS_FILE = "radiological_gradings.csv"
OVERVIEW_FILE = "overview.csv"
#: The header of SPIDER's radiological_gradings.csv (verified on the real file).
GRADING_COLUMNS: tuple[str, ...] = ("Patient", "IVD label", "Modic", "UP endplate", "LOW endplate",
                                    "Spondylolisthesis", "Disc herniation", "Disc narrowing", "Disc bulging",
                                    "Pfirrman grade")
CANAL_LABEL = 100
DISC_LABEL_BASE = 200
MAX_STRUCTURES = 25
#: Training task -> (CSV column, function of the raw grade giving the task value or None).
TASK_COLUMNS: dict[str, tuple[str, Callable[[int], int | None]]] = {
    "pfirrmann": ("Pfirrman grade", lambda g: g - 1 if 1 <= g <= 5 else None),
    "narrowing": ("Disc narrowing", lambda g: g if g in (0, 1) else None),
    "spondylolisthesis": ("Spondylolisthesis", lambda g: g if g in (0, 1) else None),
    "upper_endplate": ("UP endplate", lambda g: g if g in (0, 1) else None),
    "lower_endplate": ("LOW endplate", lambda g: g if g in (0, 1) else None),
    "herniation": ("Disc herniation", lambda g: g if g in (0, 1) else None),
    "modic": ("Modic", lambda g: (0 if g == 0 else 1) if 0 <= g <= 3 else None),
}
#: A body mask on a slice must reach this share of its largest slice area to give a quadrilateral.
MIN_AREA_FRACTION = 0.5
_S1_INDEX = LEVELS_TOP_DOWN.index("S1")   # 23


# --------------------------------------------------------------------------- names


def is_vertebra_label(code: int) -> bool:
    return 1 <= int(code) <= MAX_STRUCTURES


def is_disc_label(code: int) -> bool:
    return DISC_LABEL_BASE + 1 <= int(code) <= DISC_LABEL_BASE + MAX_STRUCTURES


def disc_level(ivd_label: int) -> str:
    """``IVD label`` n (mask label 200 + n) -> disc name: 1 -> "L5-S1", 2 -> "L4-L5", ..."""
    n = int(ivd_label)
    if not 1 <= n <= _S1_INDEX:
        raise InputError(f"SPIDER IVD label {n} is outside 1..{_S1_INDEX}")
    return f"{LEVELS_TOP_DOWN[_S1_INDEX - n]}-{LEVELS_TOP_DOWN[_S1_INDEX - n + 1]}"


def ivd_label_of(disc_name: str) -> int:
    """Inverse of :func:`disc_level`: "L4-L5" -> 2."""
    upper = disc_name.split("-")[0]
    if upper not in LEVELS_TOP_DOWN[:-1]:
        raise InputError(f"no SPIDER IVD label for disc {disc_name!r}")
    return _S1_INDEX - LEVELS_TOP_DOWN.index(upper)


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class SpiderCase:
    """One series: ``images/NAME.mha`` with ``masks/NAME.mha``."""

    name: str                 # "12_t2"
    patient: str              # "12"
    sequence: str             # "t2", "t1", "t2_SPACE"
    image: Path
    mask: Path
    subset: str | None = None  # "training" / "validation" from overview.csv, if given


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return header, rows


def list_spider_cases(root, sequences: Sequence[str] | None = ("t2",)) -> list[SpiderCase]:
    """Series of a SPIDER folder with both image and mask, sorted by patient (numeric) then name.

    ``sequences``: series suffixes to keep ("t1", "t2", "t2_SPACE"; any case), None = all.
    """
    root = Path(root)
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise InputError(f"{root} is not a SPIDER folder (needs images/ and masks/)")
    subsets = {}
    if (root / OVERVIEW_FILE).is_file():
        header, rows = _read_csv(root / OVERVIEW_FILE)
        if "new_file_name" in header and "subset" in header:
            subsets = {r["new_file_name"]: r["subset"] or None for r in rows}
    wanted = None if sequences is None else {s.lower() for s in sequences}
    cases = []
    for img in sorted(images.glob("*.mha")):
        name = img.name[:-4]
        patient, _, seq = name.partition("_")
        if wanted is not None and seq.lower() not in wanted:
            continue
        mask = masks / img.name
        if not mask.is_file():
            continue
        cases.append(SpiderCase(name, patient, seq, img, mask, subsets.get(name)))
    cases.sort(key=lambda c: (int(c.patient) if c.patient.isdigit() else math.inf, c.patient, c.name))
    return cases


def read_gradings(path) -> dict[tuple[str, int], dict[str, int | None]]:
    """``(patient, IVD label) -> {column: grade or None}`` from radiological_gradings.csv.

    Raises InputError naming the missing columns if the header is not SPIDER's.
    Empty or non-integer cells are None (missing).
    """
    path = Path(path)
    header, rows = _read_csv(path)
    missing = [c for c in GRADING_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path.name} lacks the SPIDER column(s) {', '.join(missing)}")
    out = {}
    for row in rows:
        try:
            key = (row["Patient"], int(row["IVD label"]))
        except ValueError:
            continue
        grades: dict[str, int | None] = {}
        for col in GRADING_COLUMNS[2:]:
            try:
                grades[col] = int(float(row[col]))
            except ValueError:
                grades[col] = None
        out[key] = grades
    return out


def task_values(grades: dict[str, int | None]) -> dict[str, int]:
    """SPIDER grades of one disc -> ``{task: value}`` (tasks without a valid grade left out)."""
    out = {}
    for task, (col, fn) in TASK_COLUMNS.items():
        g = grades.get(col)
        if g is None:
            continue
        v = fn(int(g))
        if v is not None:
            out[task] = int(v)
    return out


# --------------------------------------------------------------------------- volumes


def load_spider_case(case: SpiderCase):
    """``(Scan, labels)``: the image as ``spinenet run`` sees it and its mask on the same canonical grid.

    Thin-slice series (near-isotropic ones, and sagittal stacks of slices 2 mm apart or less, such as
    SPIDER's T2 SPACE) are slab-averaged by ``canonical.scan_from_array``; the mask then takes, for every
    slab, its middle thin slice.
    """
    from SpineNetLib.inputs.canonical import scan_from_array

    img, a_img = read_volume(case.image)
    lab, a_lab = read_volume(case.mask)
    if img.shape != lab.shape or not np.allclose(a_img, a_lab, atol=1e-3):
        raise InputError(f"{case.name}: image and mask differ in shape or geometry")
    scan = scan_from_array(img.astype(np.float32), a_img, {"source": str(case.image)})
    labels = scan_from_array(lab.astype(np.float32), a_lab, resample_isotropic=False).voxels
    labels = np.rint(labels).astype(np.int32)
    res = scan.metadata.get("resampled")
    if res:
        f, n_out, n_in = res["slices_per_slab"], res["to_slices"], res["from_slices"]
        start = (n_in - n_out * f) // 2
        labels = labels[:, :, [start + f * t + (f - 1) // 2 for t in range(n_out)]]
    return scan, labels


def anterior_region(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels anterior to the spinal canal's anterior wall (all True without a canal).

    Per image row the wall is the smallest canal column over all slices; rows
    above or below the canal take the nearest row's wall.
    """
    h, w = labels.shape[:2]
    canal = (labels == CANAL_LABEL).any(axis=2)
    rows = np.flatnonzero(canal.any(axis=1))
    if rows.size == 0:
        return np.ones((h, w), dtype=bool)
    wall_rows = np.array([np.flatnonzero(canal[r]).min() for r in rows], float)
    wall = np.interp(np.arange(h), rows, wall_rows)
    return np.arange(w)[None, :] < wall[:, None]


def _ap_angle(si_direction) -> float:
    """AP-axis angle (degrees, image frame) perpendicular to a superior->inferior direction ``(dx, dy)``."""
    return float(np.degrees(np.arctan2(-float(si_direction[0]), float(si_direction[1]))))


def vertebrae_from_labels(labels: np.ndarray) -> dict[int, Vertebra]:
    """Label code -> :class:`Vertebra` (``level`` None) with a body quad on every usable slice.

    Posterior elements are cut off (:func:`anterior_region`); a slice is used
    when the body covers >= :data:`MIN_AREA_FRACTION` of its largest slice
    area and ``datasets.vertebra_quad_from_mask`` accepts it.  The AP axis is
    chosen closest to the normal of the line through the neighbouring
    vertebrae's centroids (as ``datasets`` does for the real data).
    """
    from SpineNetLib.training.datasets import vertebra_quad_from_mask

    front = anterior_region(labels)
    codes = [int(c) for c in np.unique(labels) if is_vertebra_label(c)]
    masks = {c: (labels == c) & front[:, :, None] for c in codes}
    centres = {}
    for c in codes:
        rr, cc, _ = np.nonzero(masks[c])
        if rr.size:
            centres[c] = np.array([cc.mean(), rr.mean()])
    order = sorted(centres, key=lambda c: centres[c][1])  # top to bottom
    out = {}
    for i, c in enumerate(order):
        above = centres[order[i - 1]] if i > 0 else centres[c]
        below = centres[order[i + 1]] if i + 1 < len(order) else centres[c]
        prior = _ap_angle(below - above) if i > 0 or i + 1 < len(order) else 0.0
        areas = masks[c].sum(axis=(0, 1))
        slices, polys = [], []
        for s in np.flatnonzero(areas >= MIN_AREA_FRACTION * areas.max()):
            quad = vertebra_quad_from_mask(masks[c][:, :, s], prior_angle_deg=prior)
            if quad is not None:
                slices.append(int(s))
                polys.append(quad)
        if slices:
            out[c] = Vertebra(slices=slices, polygons=polys)
    return out


def _disc_normal(disc_2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centroid ``(x, y)``, unit normal pointing inferior) of a disc mask on one slice (its minor axis)."""
    ys, xs = np.nonzero(disc_2d)
    pts = np.stack([xs, ys], axis=1).astype(float)
    c = pts.mean(axis=0)
    cov = np.cov((pts - c).T) if len(pts) > 2 else np.eye(2)
    vals, vecs = np.linalg.eigh(cov)
    n = vecs[:, 0]
    return c, (n if n[1] >= 0 else -n)


def disc_neighbours(labels: np.ndarray, disc_code: int) -> tuple[int | None, int | None, int]:
    """``(upper vertebra code, lower vertebra code, slice)`` of a disc, found geometrically.

    On the slice where the disc is largest, the vertebra labels touching the
    disc (within 3 pixels) are split by the side of the disc's normal their
    contact lies on; on each side the one with the longest contact wins.
    """
    disc = labels == disc_code
    s = int(np.argmax(disc.sum(axis=(0, 1))))
    d2 = disc[:, :, s]
    centre, normal = _disc_normal(d2)
    ring = ndimage.binary_dilation(d2, iterations=3) & ~d2
    lab2 = labels[:, :, s]
    best: dict[str, tuple[int, int]] = {}
    for code in np.unique(lab2[ring]):
        code = int(code)
        if not is_vertebra_label(code):
            continue
        ys, xs = np.nonzero(ring & (lab2 == code))
        side = "upper" if float((np.array([xs.mean(), ys.mean()]) - centre) @ normal) < 0 else "lower"
        if side not in best or xs.size > best[side][1]:
            best[side] = (code, int(xs.size))
    return (best["upper"][0] if "upper" in best else None,
            best["lower"][0] if "lower" in best else None, s)


def lower_body_stand_in(labels: np.ndarray, disc_code: int, upper: Vertebra) -> Vertebra | None:
    """A body below a disc with no labelled vertebra under it (e.g. an unlabelled sacrum).

    On each slice of the disc: its quad (``vertebra_quad_from_mask``, AP axis
    along the upper body's lower endplate); the disc's rb / lb corners become
    the stand-in's rt / lt, pushed down by the upper body's height.
    """
    from SpineNetLib.training.datasets import vertebra_quad_from_mask

    disc = labels == disc_code
    slices, polys = [], []
    up_avg = upper.average_polygon
    edge = up_avg[1] - up_avg[2]               # lb -> rb: posterior along the lower endplate
    prior = float(np.degrees(np.arctan2(edge[1], edge[0])))
    height = 0.5 * (np.linalg.norm(up_avg[0] - up_avg[1]) + np.linalg.norm(up_avg[3] - up_avg[2]))
    for s in np.flatnonzero(disc.any(axis=(0, 1))):
        dq = vertebra_quad_from_mask(disc[:, :, s], prior_angle_deg=prior, min_pixels=10, min_quad_iou=0.5)
        if dq is None:
            continue
        rt, lt = dq[1], dq[2]
        e = rt - lt
        e = e / max(np.linalg.norm(e), 1e-6)
        n = np.array([-e[1], e[0]])             # towards inferior
        polys.append(np.stack([rt, rt + height * n, lt + height * n, lt]))
        slices.append(int(s))
    return Vertebra(slices=slices, polygons=polys) if slices else None


@dataclass
class SpiderDisc:
    """One disc of one series with its grades."""

    case: str
    patient: str
    subset: str | None
    ivd_label: int
    ivd: object                    # discs.extraction.IVDVolume
    grades: dict[str, int | None]  # raw CSV grades (empty when the CSV has no row for this disc)
    lower_stand_in: bool = False


def case_discs(case: SpiderCase, gradings: dict | None = None, log=None) -> list[SpiderDisc]:
    """Grading volumes (``discs.extraction.extract_ivd_volume``) of every disc label in a series, bottom to top."""
    from SpineNetLib.discs.extraction import extract_ivd_volume

    scan, labels = load_spider_case(case)
    verts = vertebrae_from_labels(labels)
    out = []
    for code in sorted(int(c) for c in np.unique(labels) if is_disc_label(c)):
        n = code - DISC_LABEL_BASE
        up_code, lo_code, _ = disc_neighbours(labels, code)
        upper = verts.get(up_code) if up_code is not None else None
        if upper is None:
            if log:
                log(f"{case.name}: disc {code} has no usable vertebra above it; skipped")
            continue
        lower = verts.get(lo_code) if lo_code is not None else None
        stand_in = lower is None
        if stand_in:
            lower = lower_body_stand_in(labels, code, upper)
            if lower is None:
                if log:
                    log(f"{case.name}: disc {code} has no usable body below it; skipped")
                continue
        try:
            level = disc_level(n)
        except InputError:
            level = f"disc{code}"
        vol = extract_ivd_volume(scan, upper, lower, level=level)
        if vol is None:
            continue
        grades = dict((gradings or {}).get((case.patient, n), {}))
        out.append(SpiderDisc(case.name, case.patient, case.subset, n, vol, grades, stand_in))
    return out


# --------------------------------------------------------------------------- fixtures from phantoms


def phantom_case(ph, root, name: str, *, posterior_elements: bool = True) -> SpiderCase:
    """Write a phantom as a SPIDER series ``root/images/NAME.mha`` + ``root/masks/NAME.mha``.

    Codes as SPIDER: vertebra L5 = 1 counting upward (S1 unlabelled), disc
    200 + n for ``IVD label`` n (201 = L5-S1), canal 100.  Bodies and discs
    come from the exact ground-truth quads; with ``posterior_elements`` each
    vertebra label also gets a block behind the canal (as SPIDER's
    whole-vertebra masks) that the loader must cut off.
    """
    from SpineNetLib.inputs.writers import write_image
    from SpineNetLib.core.polygons import points_in_polygon

    root = Path(root)
    scan = ph.scan
    h, w, n_s = scan.shape
    labels = np.zeros((h, w, n_s), np.int16)

    def fill(poly, s, code):
        poly = np.asarray(poly, float)
        x0, x1 = int(max(np.floor(poly[:, 0].min()), 0)), int(min(np.ceil(poly[:, 0].max()), w - 1))
        y0, y1 = int(max(np.floor(poly[:, 1].min()), 0)), int(min(np.ceil(poly[:, 1].max()), h - 1))
        if x1 < x0 or y1 < y0:
            return
        yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
        inside = points_in_polygon(np.stack([xx.ravel(), yy.ravel()], axis=1).astype(float), poly)
        region = labels[y0:y1 + 1, x0:x1 + 1, s]
        region[inside.reshape(region.shape)] = code

    col_mm = float(scan.spacing_mm[1])
    verts = {v.level: v for v in ph.vertebrae if not v.extra}
    for v in verts.values():
        if v.level == "S1":
            continue
        code = _S1_INDEX - LEVELS_TOP_DOWN.index(v.level)
        for s in v.slices:
            q = np.asarray(v.quads[s], float)
            fill(q, s, code)
            if posterior_elements:   # a block 18..30 mm behind the posterior wall
                near, far = np.array([18.0 / col_mm, 0.0]), np.array([30.0 / col_mm, 0.0])
                fill(np.stack([q[0] + near, q[0] + far, q[1] + far, q[1] + near]), s, code)
    for d in ph.discs:
        if d.upper not in verts or d.lower not in verts:
            continue
        up, lo = verts[d.upper], verts[d.lower]
        code = DISC_LABEL_BASE + ivd_label_of(d.name)
        for s in sorted(set(up.slices) & set(lo.slices)):
            qu, ql = np.asarray(up.quads[s]), np.asarray(lo.quads[s])
            fill(np.stack([qu[2], qu[1], ql[0], ql[3]]), s, code)
    if posterior_elements:   # canal: 3..15 mm behind the posterior walls, on the three middle slices
        walls = np.concatenate([np.asarray(v.quads[v.mid_slice])[[0, 1]] for v in verts.values()])
        walls = walls[np.argsort(walls[:, 1])]
        rows = np.arange(int(np.ceil(walls[0, 1])), int(np.floor(walls[-1, 1])) + 1)
        wall = np.interp(rows, walls[:, 1], walls[:, 0])
        mid = n_s // 2
        for s in range(max(0, mid - 1), min(n_s, mid + 2)):
            for r, wc in zip(rows, wall):
                c0, c1 = int(np.ceil(wc + 3.0 / col_mm)), int(np.floor(wc + 15.0 / col_mm)) + 1
                seg = labels[r, c0:c1, s]
                seg[seg == 0] = CANAL_LABEL
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image = root / "images" / f"{name}.mha"
    mask = root / "masks" / f"{name}.mha"
    write_image(ph.voxels_kji.astype(np.int16), ph.ijk_to_ras, image)
    write_image(canonical_to_input_array(labels, scan), ph.ijk_to_ras, mask)
    patient, _, seq = name.partition("_")
    return SpiderCase(name, patient, seq, image, mask)


def canonical_to_input_array(canon: np.ndarray, scan) -> np.ndarray:
    """A canonical ``(H, W, S)`` array on the input's own grid, as ``[k, j, i]`` (no resampling allowed)."""
    ni, nj, nk = scan.input_shape_ijk
    to_canon = np.linalg.inv(np.asarray(scan.canonical_to_input_ijk, float))
    ii, jj, kk = np.meshgrid(np.arange(ni), np.arange(nj), np.arange(nk), indexing="ij")
    rcs = np.rint(to_canon[:3, :3] @ np.stack([ii.ravel(), jj.ravel(), kk.ravel()]) + to_canon[:3, 3:]).astype(int)
    if rcs.min() < 0 or np.any(rcs.max(axis=1) >= np.array(canon.shape)):
        raise ValueError("the scan's canonical grid is not a permutation of its input grid")
    out = canon[rcs[0], rcs[1], rcs[2]].reshape(ni, nj, nk)
    return np.ascontiguousarray(out.transpose(2, 1, 0))
