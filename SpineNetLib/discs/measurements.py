"""What spine radiologists measure, from the detected corners (beyond SpineNet).

Everything is computed on each vertebra's mid-slice polygon (the polygon on
round(median(slices)), or the average polygon where it was not detected
there), in physical millimetres: pixel coordinates are scaled by the column
and row spacing first, so anisotropic pixels give true lengths and angles.
Corners are rt, rb, lb, lt (docs/CONVENTIONS.md): the upper endplate is
lt -> rt, the lower endplate lb -> rb, the anterior wall lt -> lb and the
posterior wall rt -> rb.

Vertebral body (quantitative morphometry; Genant et al., JBMR 1993)
-------------------------------------------------------------------
* anterior / posterior height Ha, Hp: the anterior (lt -> lb) and posterior
  (rt -> rb) walls measured perpendicular to the bisector of the two
  endplates (the body's mid-plane), so a tilted body or a slanted wall does
  not lengthen them;
* middle height Hm: the distance between the midpoints of the upper and
  lower endplates;
* wedge ratio Ha / Hp; biconcavity ratio Hm / Hp (the mid/posterior ratio of
  quantitative morphometry);
* height reduction = 1 - min(Ha, Hm, Hp) / max(Ha, Hm, Hp), and the Genant
  semi-quantitative grade from it: < 20 % grade 0, 20-25 % grade 1 (mild),
  25-40 % grade 2 (moderate), > 40 % grade 3 (severe).  The reference is the
  body's own largest height, so wedge and biconcave deformities are graded;
  a crush deformity that lowers all three heights alike (needs the
  neighbours or normative data) is not detected.  C2 (whose body includes
  the dens) and the sacrum are measured but the grade is meant for T4-L5.
* upper endplate angle: the upper endplate's direction (lt -> rt) from the
  image rows; the lumbar lordosis below is the difference of two of them.

Disc (between the upper body's lower endplate and the lower body's upper endplate)
----------------------------------------------------------------------------------
* anterior / middle / posterior height: upper.lb -> lower.lt,
  endplate midpoints, upper.rb -> lower.rt, each measured perpendicular to
  the disc mid-plane (the bisector of its two endplates), so a slip does not
  add to the height; mean height = (Ha + Hm + Hp) / 3;
* disc height index = mean disc height / mean of the two bodies' middle
  heights (body-normalised disc height; independent of magnification);
  Farfan index = (Ha + Hp) / disc AP depth (mean length of its two endplates);
* slip: displacement of the upper body's posterior-inferior corner (rb)
  relative to the lower body's posterior-superior corner (rt) along the disc
  mid-plane, positive anterior (anterolisthesis), negative posterior
  (retrolisthesis); in mm and in % of the lower body's upper endplate length
  (Meyerding/Taillard).  Measured along the mid-plane rather than along the
  lower endplate so that a normal wedge-shaped (lordotic) disc reads 0: the
  lower-endplate convention adds about h * sin(wedge / 2) (~1 mm at L5-S1).
  Meyerding grade from |slip %|: I < 25 %, II 25-50 %, III 50-75 %,
  IV 75-100 %, V > 100 %; grade 0 (no listhesis) below
  :data:`LISTHESIS_THRESHOLD_MM` = 3 mm, the usual radiographic threshold;
* segmental angle (Cobb-like): between the upper body's upper endplate and
  the lower body's upper endplate, positive = lordotic (opening anteriorly);
  disc angle: between the two endplates bounding the disc, same sign;
* disc signal ratio (meaningful on T2): median intensity of the central part
  of the disc (the middle 60 % of its AP length and of its height, where the
  nucleus lies) on the disc mid slice, divided by the median intensity of
  the two bodies (the same reference as the grading volumes, official §6).
  A bright (hydrated) disc reads above 1; a desiccated one falls towards the
  annulus/body ratio.

Spine
-----
* lumbar lordosis: the angle between the upper endplates of L1 and S1
  (positive = lordotic), when both are labelled: L1's upper endplate angle
  minus S1's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from SpineNetLib.discs.extraction import (
    body_intensity_samples,
    body_mid_polygon,
    body_name,
    disc_mid_slice,
    disc_pairs,
    pixel_scale,
    polygon_on_or_average,
)
from SpineNetLib.core.levels import LUMBAR
from SpineNetLib.core.polygons import points_in_polygon
from SpineNetLib.core.results import OUTLINE_FROM_DETECTOR, OUTLINE_FROM_WEAKER_DETECTION, Vertebra
from SpineNetLib.core.scan import Scan

#: Genant grade thresholds on the height reduction (fraction).
GENANT_THRESHOLDS = (0.20, 0.25, 0.40)
#: Meyerding grade boundaries on |slip| as a fraction of the lower endplate length.
MEYERDING_THRESHOLDS = (0.25, 0.50, 0.75, 1.00)
#: Below this slip (mm) the Meyerding grade is 0 (no listhesis).
LISTHESIS_THRESHOLD_MM = 3.0
#: Central part of the disc used for its signal (fractions of AP length and height).
SIGNAL_CORE = (0.2, 0.8)


@dataclass
class VertebraMeasurements:
    """Morphometry of one vertebral body (module docstring)."""

    level: str
    index: int
    anterior_height_mm: float
    middle_height_mm: float
    posterior_height_mm: float
    wedge_ratio: float
    biconcavity_ratio: float
    height_reduction_percent: float
    genant_grade: int
    upper_endplate_length_mm: float
    lower_endplate_length_mm: float
    #: The upper endplate's direction (anterior to posterior corner) in the sagittal image, in degrees from
    #: the image rows, positive where it falls posteriorly (rows run downwards). The lumbar lordosis is the
    #: difference of L1's and S1's (:func:`lordosis_from_endplate_angles`), so a document whose levels are
    #: corrected later gives the lordosis of its new L1 and S1 without the scan.
    upper_endplate_angle_deg: float = float("nan")
    #: Which network drew the outline measured (``Vertebra.outline_from``): the discs beside a rougher one
    #: are warned about (:func:`rougher_outline_warning`).
    outline_from: str = OUTLINE_FROM_DETECTOR

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DiscMeasurements:
    """Geometry and signal of one disc (module docstring)."""

    level: str
    upper_index: int
    lower_index: int
    anterior_height_mm: float
    middle_height_mm: float
    posterior_height_mm: float
    mean_height_mm: float
    disc_height_index: float
    farfan_index: float
    slip_mm: float
    slip_percent: float
    meyerding_grade: int
    segmental_angle_deg: float
    disc_angle_deg: float
    signal_ratio: float | None
    #: Disc centre ``(x, y)`` in canonical pixels: mean of the 4 corners of the disc quad
    #: [upper.rb, lower.rt, lower.lt, upper.lb] on the disc's mid slice (official §6), and that slice.
    centre_xy: np.ndarray = field(default_factory=lambda: np.zeros(2))
    mid_slice: int = 0

    def values(self) -> dict:
        """The measurements only (names carry the units), for documents and tables."""
        d = asdict(self)
        for key in ("level", "upper_index", "lower_index", "centre_xy", "mid_slice"):
            d.pop(key)
        return d


@dataclass
class SpineMeasurements:
    """All measurements of one scan: per vertebra and per disc (top to bottom), and the spine's."""

    vertebrae: list[VertebraMeasurements]
    discs: list[DiscMeasurements]
    lumbar_lordosis_deg: float | None = None

    def disc(self, upper_index: int, lower_index: int) -> DiscMeasurements | None:
        for d in self.discs:
            if d.upper_index == upper_index and d.lower_index == lower_index:
                return d
        return None


# --------------------------------------------------------------------------- geometry in mm

def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.hypot(v[0], v[1]))
    return v / n if n > 1e-12 else np.array([np.nan, np.nan])


def _normal(e: np.ndarray) -> np.ndarray:
    """``e`` turned 90 degrees towards inferior in image axes ((1, 0) -> (0, 1))."""
    return np.array([-e[1], e[0]])


def _bisector(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unit bisector of two (roughly parallel) directions."""
    return _unit(_unit(a) + _unit(b))


def _angle_deg(v: np.ndarray) -> float:
    return math.degrees(math.atan2(float(v[1]), float(v[0])))


def lordotic_angle_deg(upper_dir: np.ndarray, lower_dir: np.ndarray) -> float:
    """Angle from an upper to a lower posterior-pointing endplate direction, positive = lordotic.

    In image axes (y down) a lordotic (anteriorly opening) pair has the lower
    endplate turned so that its anterior end drops: its angle is smaller.
    """
    d = _angle_deg(upper_dir) - _angle_deg(lower_dir)
    return float((d + 180.0) % 360.0 - 180.0)


def _mm(poly_px: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.asarray(poly_px, np.float64) * scale


def genant_grade(reduction: float) -> int:
    """0-3 from a height reduction fraction (< 20 %, 20-25 %, 25-40 %, > 40 %)."""
    if not math.isfinite(reduction):
        return 0
    g1, g2, g3 = GENANT_THRESHOLDS
    if reduction > g3:
        return 3
    if reduction >= g2:
        return 2
    if reduction >= g1:
        return 1
    return 0


def meyerding_grade(slip_mm: float, slip_fraction: float) -> int:
    """0 (below the 3 mm threshold), then I-V from |slip| / lower endplate length."""
    if not (math.isfinite(slip_mm) and math.isfinite(slip_fraction)) or abs(slip_mm) < LISTHESIS_THRESHOLD_MM:
        return 0
    f = abs(slip_fraction)
    return 1 + sum(f >= t for t in MEYERDING_THRESHOLDS[:3]) + (f > MEYERDING_THRESHOLDS[3])


# --------------------------------------------------------------------------- vertebrae

def body_heights_mm(q: np.ndarray) -> tuple[float, float, float]:
    """(Ha, Hm, Hp) of a body quad in mm (rt, rb, lb, lt)."""
    rt, rb, lb, lt = q
    n = _normal(_bisector(rt - lt, rb - lb))
    ha = float((lb - lt) @ n)
    hp = float((rb - rt) @ n)
    hm = float(np.linalg.norm(0.5 * (lb + rb) - 0.5 * (lt + rt)))
    return ha, hm, hp


def measure_vertebra(scan: Scan, vertebra: Vertebra, index: int = 0) -> VertebraMeasurements:
    """Heights, ratios and Genant grade of one body on its mid-slice polygon."""
    q = _mm(body_mid_polygon(vertebra), pixel_scale(scan))
    ha, hm, hp = body_heights_mm(q)
    heights = np.array([ha, hm, hp])
    reduction = float(1.0 - heights.min() / heights.max()) if heights.max() > 0 else float("nan")
    return VertebraMeasurements(
        level=body_name(vertebra, index), index=index,
        anterior_height_mm=ha, middle_height_mm=hm, posterior_height_mm=hp,
        wedge_ratio=ha / hp if hp > 0 else float("nan"),
        biconcavity_ratio=hm / hp if hp > 0 else float("nan"),
        height_reduction_percent=100.0 * reduction,
        genant_grade=genant_grade(reduction),
        upper_endplate_length_mm=float(np.linalg.norm(q[0] - q[3])),
        lower_endplate_length_mm=float(np.linalg.norm(q[1] - q[2])),
        upper_endplate_angle_deg=_angle_deg(q[0] - q[3]), outline_from=vertebra.outline_from)


# --------------------------------------------------------------------------- discs

def _bilinear(quad: np.ndarray, s: float, t: float) -> np.ndarray:
    """Point of the disc quad [u.rb, l.rt, l.lt, u.lb] at AP fraction s (A->P) and height fraction t (S->I)."""
    top = quad[3] + s * (quad[0] - quad[3])
    bottom = quad[2] + s * (quad[1] - quad[2])
    return top + t * (bottom - top)


def disc_signal_samples(scan: Scan, quad_px: np.ndarray, canonical_slice: int) -> np.ndarray:
    """Raw values of the pixels whose centres lie in the disc's central part on one slice."""
    a, b = SIGNAL_CORE
    core = np.array([_bilinear(quad_px, b, a), _bilinear(quad_px, b, b),
                     _bilinear(quad_px, a, b), _bilinear(quad_px, a, a)])
    return polygon_samples(scan, core, canonical_slice)


def polygon_samples(scan: Scan, polygon_px: np.ndarray, canonical_slice: int) -> np.ndarray:
    """Raw values of the pixels whose centres lie inside ``polygon_px`` (``[x, y]`` corners, even-odd rule)
    on one canonical slice; none for a slice outside the scan or a polygon with a non-finite corner."""
    polygon = np.asarray(polygon_px, np.float64)
    height, width, n_slices = scan.voxels.shape
    if not (0 <= canonical_slice < n_slices) or not np.all(np.isfinite(polygon)):
        return np.zeros(0, np.float32)
    x0, x1 = max(int(math.ceil(polygon[:, 0].min())), 0), min(int(math.floor(polygon[:, 0].max())), width - 1)
    y0, y1 = max(int(math.ceil(polygon[:, 1].min())), 0), min(int(math.floor(polygon[:, 1].max())), height - 1)
    if x0 > x1 or y0 > y1:
        return np.zeros(0, np.float32)
    yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    inside = points_in_polygon(np.stack([xx.ravel(), yy.ravel()], axis=1), polygon).reshape(yy.shape)
    return np.asarray(scan.voxels[y0:y1 + 1, x0:x1 + 1, canonical_slice][inside], np.float32)


def measure_disc(scan: Scan, upper: Vertebra, lower: Vertebra, *, level: str = "",
                 upper_index: int = 0, lower_index: int = 1,
                 body_samples: tuple[np.ndarray, np.ndarray] | None = None,
                 body_middle_heights: tuple[float, float] | None = None) -> DiscMeasurements:
    """Heights, slip, angles and signal of the disc between two bodies (module docstring)."""
    scale = pixel_scale(scan)
    up_px, lo_px = body_mid_polygon(upper), body_mid_polygon(lower)
    up, lo = _mm(up_px, scale), _mm(lo_px, scale)
    top_dir = up[1] - up[2]          # upper body's lower endplate lb -> rb
    bottom_dir = lo[0] - lo[3]       # lower body's upper endplate lt -> rt
    e = _bisector(top_dir, bottom_dir)
    n = _normal(e)
    ha = float((lo[3] - up[2]) @ n)
    hp = float((lo[0] - up[1]) @ n)
    hm = float((0.5 * (lo[0] + lo[3]) - 0.5 * (up[1] + up[2])) @ n)
    mean = (ha + hm + hp) / 3.0
    if body_middle_heights is None:
        body_middle_heights = (body_heights_mm(up)[1], body_heights_mm(lo)[1])
    body_mean = float(np.mean(body_middle_heights))
    depth = 0.5 * (float(np.linalg.norm(top_dir)) + float(np.linalg.norm(bottom_dir)))
    slip = float((lo[0] - up[1]) @ e)
    lower_length = float(np.linalg.norm(bottom_dir))
    slip_fraction = slip / lower_length if lower_length > 0 else float("nan")

    # Signal on the disc's own mid slice (official §6), from the bodies' polygons there.
    mid = disc_mid_slice(upper, lower)
    quad = np.stack([polygon_on_or_average(upper, mid)[1], polygon_on_or_average(lower, mid)[0],
                     polygon_on_or_average(lower, mid)[3], polygon_on_or_average(upper, mid)[2]])
    disc_values = disc_signal_samples(scan, quad, mid)
    if body_samples is None:
        body_samples = (body_intensity_samples(scan, upper), body_intensity_samples(scan, lower))
    pooled = np.concatenate(body_samples)
    reference = float(np.median(pooled)) if pooled.size else float("nan")
    signal = None
    if disc_values.size and math.isfinite(reference) and reference > 0:
        signal = float(np.median(disc_values)) / reference

    return DiscMeasurements(
        level=level, upper_index=upper_index, lower_index=lower_index,
        anterior_height_mm=ha, middle_height_mm=hm, posterior_height_mm=hp, mean_height_mm=mean,
        disc_height_index=mean / body_mean if body_mean > 0 else float("nan"),
        farfan_index=(ha + hp) / depth if depth > 0 else float("nan"),
        slip_mm=slip, slip_percent=100.0 * slip_fraction,
        meyerding_grade=meyerding_grade(slip, slip_fraction),
        segmental_angle_deg=lordotic_angle_deg(up[0] - up[3], bottom_dir),
        disc_angle_deg=lordotic_angle_deg(top_dir, bottom_dir),
        signal_ratio=signal, centre_xy=quad.mean(axis=0), mid_slice=mid)


# --------------------------------------------------------------------------- spine

def lordosis_from_endplate_angles(levels: Sequence[str | None], upper_endplate_angles_deg: Sequence[float]
                                  ) -> float | None:
    """Angle between the upper endplates of the bodies named L1 and S1 (positive = lordotic, as
    :func:`lordotic_angle_deg`), from each body's ``upper_endplate_angle_deg``; None unless both are
    named and measured."""
    by_level = {level: angle for level, angle in zip(levels, upper_endplate_angles_deg) if level}
    l1, s1 = by_level.get("L1"), by_level.get("S1")
    if l1 is None or s1 is None or not (math.isfinite(l1) and math.isfinite(s1)):
        return None
    return float((l1 - s1 + 180.0) % 360.0 - 180.0)


#: A disc mean height above this is not anatomical (adult lumbar discs measure about 8-14 mm): a body
#: between the two was probably missed.
MAX_PLAUSIBLE_DISC_HEIGHT_MM = 25.0


#: An anterior or middle height of the disc above S1 below this says S1's outline may reach into the disc
#: (its upper corners at L5's lower ones), the bundled detector's commonest outline error. Chosen on the
#: training-side clinical slices, where it marks 42 of the 46 whose radiologists' L5-S1 point lies inside
#: a detected outline and 3 of the 50 others; held out 26 of 33 and 3 of 22 (MODEL_CARD.md of the bundled
#: weights, "Outlines around the discs"; ``benchmarks/validate_bundled.py`` prints the line).
S1_OUTLINE_CHECK_HEIGHT_MM = 3.0


def disc_measurement_warnings(disc: DiscMeasurements, vertebrae: Sequence[VertebraMeasurements] = ()) -> list[str]:
    """:func:`disc_height_warnings` of a measured disc, ``vertebrae`` (the scan's, by ``index``) telling which
    of its two bodies have rougher outlines."""
    rougher = [v.level for v in vertebrae if v.index in (disc.upper_index, disc.lower_index)
               and v.outline_from == OUTLINE_FROM_WEAKER_DETECTION]
    return disc_height_warnings(disc.level, disc.anterior_height_mm, disc.middle_height_mm,
                                disc.posterior_height_mm, disc.mean_height_mm, rougher)


#: What both wordings of :func:`rougher_outline_warning` hold, and no other measurement line.
_ROUGH_MARK = " and may be rough; check "


def is_rougher_outline_warning(line: str) -> bool:
    """Whether a measurement line is one of :func:`rougher_outline_warning`'s."""
    return _ROUGH_MARK in line


def rougher_outline_warning(level: str, rougher_bodies: Sequence[str]) -> str | None:
    """The line for the disc ``level`` whose bodies ``rougher_bodies`` (none, one or both) were outlined from
    weaker detections (``Vertebra.outline_from``): over the 201 validation scans such an outline reached over
    the radiologist's point (or the mask's centre) of 12 of the 39 discs beside it, against 19 of the other 852
    (bundled MODEL_CARD.md, "Which network drew each outline")."""
    if not rougher_bodies:
        return None
    if len(rougher_bodies) == 1:
        return (f"{level}: {rougher_bodies[0]}'s outline comes from a weaker detection{_ROUGH_MARK}it "
                "before using these measurements")
    return (f"{level}: the outlines of {' and '.join(rougher_bodies)} come from weaker detections{_ROUGH_MARK}"
            "them before using these measurements")


def disc_height_warnings(level: str, anterior_mm: float, middle_mm: float, posterior_mm: float,
                         mean_mm: float, rougher_bodies: Sequence[str] = ()) -> list[str]:
    """One line per height of the disc ``level`` that cannot be anatomy (a detection error, not a finding),
    one where the disc above S1 is so thin in front or in the middle that S1's outline should be
    checked, and one where its bodies ``rougher_bodies`` have rougher outlines (:func:`rougher_outline_warning`).
    From numbers only, so that a document whose levels are corrected gets them again."""
    heights = {"anterior": anterior_mm, "middle": middle_mm, "posterior": posterior_mm}
    heights = {name: float("nan") if h is None else float(h) for name, h in heights.items()}
    mean_mm = float("nan") if mean_mm is None else float(mean_mm)
    problems = []
    for name, height in heights.items():
        if np.isfinite(height) and height < 0:
            problems.append(f"{level} {name} disc height {height:.1f} mm is negative: the outlines of the "
                            "two bodies overlap (check them)")
    # (height, name) under the bound; a negative one has its own line above, and then nothing more is said
    thin = [(h, name) for name in ("anterior", "middle")
            if (h := heights[name]) < S1_OUTLINE_CHECK_HEIGHT_MM]   # NaN: never
    if level.endswith("-S1") and thin and not problems:
        height, name = min(thin)
        problems.append(f"{level} {name} disc height {height:.1f} mm is under "
                        f"{S1_OUTLINE_CHECK_HEIGHT_MM:g} mm: S1's detected outline often reaches into this disc "
                        f"and makes it look thin; check S1's upper endplate before using the {level} "
                        "measurements")
    if np.isfinite(mean_mm) and mean_mm > MAX_PLAUSIBLE_DISC_HEIGHT_MM:
        problems.append(f"{level} mean disc height {mean_mm:.1f} mm is more than "
                        f"{MAX_PLAUSIBLE_DISC_HEIGHT_MM:g} mm: a vertebra between the two bodies was probably missed")
    if rough := rougher_outline_warning(level, rougher_bodies):
        problems.append(rough)
    return problems


#: Adult lumbar bodies measure about 25 mm in the middle, endplate to endplate.  Where the median of the
#: bodies named L1-L5 is more than a factor 1 / 0.7 (1.43) away from that (under 17.5 or over 35.7 mm),
#: every size in mm is suspect: a pixel spacing that the header gives wrongly is the likeliest cause (a
#: child's spine the other).  On the 197 held-out and training-side scans detected at their header's
#: spacing the median lies between 20.6 and 31.0 mm (bundled MODEL_CARD.md, "Body sizes"), so the
#: bound is 15 % beyond the largest and the smallest.
TYPICAL_LUMBAR_BODY_HEIGHT_MM = 25.0
LUMBAR_BODY_HEIGHT_RANGE_MM = (TYPICAL_LUMBAR_BODY_HEIGHT_MM * 0.7, TYPICAL_LUMBAR_BODY_HEIGHT_MM / 0.7)


#: How :func:`body_size_warning`'s line begins.
BODY_SIZE_WARNING_START = "the lumbar bodies measure "


def lumbar_body_size_warning(measurements: SpineMeasurements, spacing_mm: Sequence[float]) -> str | None:
    """:func:`body_size_warning` of measured vertebrae."""
    return body_size_warning([v.level for v in measurements.vertebrae],
                             [v.middle_height_mm for v in measurements.vertebrae], spacing_mm)


def body_size_warning(levels: Sequence[str | None], middle_heights_mm: Sequence[float],
                      spacing_mm: Sequence[float]) -> str | None:
    """A line when the median middle height of three or more bodies named L1-L5 lies outside
    :data:`LUMBAR_BODY_HEIGHT_RANGE_MM`, naming the in-plane pixel spacing (rows x columns) the sizes rest on."""
    heights = [float(h) for level, h in zip(levels, middle_heights_mm)
               if level in LUMBAR and h is not None and np.isfinite(h)]
    if len(heights) < 3:
        return None
    median = float(np.median(heights))
    low, high = LUMBAR_BODY_HEIGHT_RANGE_MM
    if low <= median <= high:
        return None
    return (f"{BODY_SIZE_WARNING_START}{median:.1f} mm high in the middle (median of {len(heights)}), "
            f"{'under' if median < low else 'over'} the {low:.1f}-{high:.1f} mm of an adult spine: check the "
            f"pixel spacing ({float(spacing_mm[0]):.3g} x {float(spacing_mm[1]):.3g} mm), which every size "
            "in mm uses, unless this is a child's spine")


def measure_spine(scan: Scan, vertebrae: Sequence[Vertebra]) -> SpineMeasurements:
    """Every vertebra, every disc of :func:`SpineNetLib.discs.extraction.disc_pairs` (top to bottom) and the lordosis."""
    verts = [measure_vertebra(scan, v, i) for i, v in enumerate(vertebrae)]
    samples: dict[int, np.ndarray] = {}

    def body(i: int) -> np.ndarray:
        if i not in samples:
            samples[i] = body_intensity_samples(scan, vertebrae[i])
        return samples[i]

    discs = [measure_disc(scan, vertebrae[i], vertebrae[j], level=name, upper_index=i, lower_index=j,
                          body_samples=(body(i), body(j)),
                          body_middle_heights=(verts[i].middle_height_mm, verts[j].middle_height_mm))
             for i, j, name in disc_pairs(vertebrae)]
    return SpineMeasurements(vertebrae=verts, discs=discs, lumbar_lordosis_deg=lordosis_from_endplate_angles(
        [v.level for v in verts], [v.upper_endplate_angle_deg for v in verts]))
