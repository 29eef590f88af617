"""Pictures of a run's result, for a reader who opens no viewer: ``preview.png`` and ``hotspots.png``.

``preview.png`` (:func:`render_preview`), top to bottom:

* a dark header line: the levels found, the number of discs and whether they were graded, which
  sagittal slice is shown;
* when the labelling has warnings, an amber banner: "LEVELS NEED REVIEW" (when the labelling
  confidence asks for it) and every warning of the vertebrae and discs documents;
* the sagittal slice holding most vertebra outlines (ties: the one nearest the middle of the
  slices holding vertebrae), windowed from its 1st to its 99th intensity percentile, resampled to
  square millimetre pixels at least :data:`MIN_SLICE_HEIGHT_PX` tall, and oriented as a
  radiologist reads a sagittal image: anterior left, superior up.  That is the canonical slice as
  it is (``core/scan.py``: rows superior -> inferior, columns anterior -> posterior), marked
  A/P/S/I at its edges.  On it: each vertebra's outline (:data:`OUTLINE_COLOUR`; thinner when the
  body is not outlined on this slice and its nearest outline is shown; dashed, with a note at the
  slice's foot, where a detection weaker than the detector's threshold drew it) with its level anterior of
  the body, and each disc's centre (:data:`DISC_COLOUR`), joined by a line to a panel right of the
  slice that gives the disc's level and, when graded, up to three grades with the probability of
  the reported class ("Pfirrmann 3 (81 %)", "Herniation yes (87 %)": Pfirrmann and herniation
  first, then other abnormal findings). Where another sagittal series of the exam names a vertebra otherwise
  (``label/other_series.py``), the levels it gives are drawn at its vertebrae's centres in
  :data:`OTHER_SERIES_COLOUR`, so both readings are seen in one picture (where the scan took that series'
  levels, its own levels are drawn so instead). Where the levels need review, each vertebra that the
  labelling's best shifted alternative names otherwise carries that level too, "or S2" in
  :data:`NEXT_BEST_LEVEL_COLOUR` below its centre (``marker_ras``), so the reviewer sees the two candidate
  readings on the image.

``hotspots.png`` (:func:`render_hotspots`, only when the run computed evidence maps): one row per
map, one tile per disc the map covers: the disc's grading volume's mid slice (anterior left,
superior up) with the map over it, red (weak) to yellow (strong), opacity 0.7 x the map's value;
three tiles to a line.
A map that covers no disc volume is shown over the preview's slice instead.

Everything is drawn from the result documents (RAS millimetres) and the scan, so a plug-in
pipeline's result (``apps/worker.py``) gets the same pictures.  The functions return PNG bytes;
:func:`SpineNetLib.outputs.files.write_results` writes them with the other result files.  The PNG
text chunks say what is shown: ``SpineNet slice`` (canonical slice index), ``SpineNet slice box``
(left, top, width, height of the slice in the picture, pixels) and ``SpineNet pixel scale``
(picture pixels per canonical column and per row).

Pillow is imported only when a picture is drawn (:func:`pillow_missing` says whether it can be),
so the result files can be written without it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from SpineNetLib.outputs.documents import (NEXT_BEST_COLOUR, OTHER_READING_COLOUR, disc_polygons, next_best_reading,
                                          other_readings, reported_probability, rough_outline, shift_by_reader,
                                          vertebra_name)

PREVIEW_FILE = "preview.png"
HOTSPOTS_FILE = "hotspots.png"

#: The slice is drawn at least this many pixels tall (small scans are upscaled).
MIN_SLICE_HEIGHT_PX = 800
#: ... and, unless that needs more, at most this many pixels along its longer side.
MAX_SLICE_SIDE_PX = 1600
OUTLINE_COLOUR = (0, 215, 255)
#: Said at the foot of the slice where an outline is dashed.
ROUGHER_OUTLINE_NOTE = "dashed: outline from a weaker detection (rough)"
LABEL_COLOUR = (255, 235, 60)
DISC_COLOUR = (255, 140, 0)
#: The levels of another series of the exam that names a vertebra otherwise, or the scan's own where it took
#: another's (``documents.other_readings``).
OTHER_SERIES_COLOUR = OTHER_READING_COLOUR
#: Where the levels need review, the level the labelling's best shifted alternative gives a vertebra
#: (``documents.next_best_reading``).
NEXT_BEST_LEVEL_COLOUR = NEXT_BEST_COLOUR
BANNER_COLOUR = (255, 176, 0)
HEADER_COLOUR = (36, 36, 36)
PANEL_COLOUR = (16, 16, 16)
TEXT_COLOUR = (240, 240, 240)
#: Banner lines shown at most; the rest are in the documents.
MAX_BANNER_LINES = 10
#: Grades shown per disc at most.
MAX_GRADES_SHOWN = 3
#: The grading volume of a disc (``discs/extraction.py`` ``IVDVolume``: slices, rows, columns), whose
#: index grid ``discs.json``'s ``volume_to_ras`` maps; official §3.3.
_VOLUME_SHAPE = (9, 112, 224)
_HOTSPOT_TILE_HEIGHT_PX = 224
_HOTSPOT_TILES_PER_LINE = 3
#: Grades shown first, in this order; then the other abnormal findings, then the rest.
_MAIN_GRADES = ("Pfirrmann", "Herniation")
_SHORT_NAMES = {"DiscNarrowing": "Narrowing", "CentralCanalStenosis": "Canal stenosis",
                "Spondylolisthesis": "Listhesis", "UpperEndplateDefect": "Upper endplate defect",
                "LowerEndplateDefect": "Lower endplate defect", "UpperMarrowChange": "Upper marrow",
                "LowerMarrowChange": "Lower marrow", "ForaminalStenosisLeft": "Foraminal L",
                "ForaminalStenosisRight": "Foraminal R"}
#: Columns whose lowest (normal) value is 1, for a document that does not list the classes (``grade_columns``).
_GRADED_FROM_ONE = ("Pfirrmann", "DiscNarrowing", "Narrowing", "CentralCanalStenosis")


def pillow_missing() -> str | None:
    """Why no picture can be drawn (Pillow is not installed), or None when it can."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return "no preview.png: Pillow is not installed (pip install pillow)"
    return None


# --------------------------------------------------------------------------- geometry and pixels

def window_to_uint8(image: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.0) -> np.ndarray:
    """``image`` windowed from its ``low`` to its ``high`` percentile (finite values) onto 0..255."""
    image = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape, np.uint8)
    low, high = np.percentile(image[finite], [low_percentile, high_percentile])
    if not high > low:
        low, high = float(image[finite].min()), float(image[finite].max())
    if not high > low:  # a constant image: mid-grey
        return np.where(finite, 128, 0).astype(np.uint8)
    scaled = (np.where(finite, image, low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _ras_to_canonical(scan, ras) -> np.ndarray:
    """``(N, 3)`` canonical ``(row, col, slice)`` of RAS points."""
    ras = np.asarray(ras, dtype=float).reshape(-1, 3)
    to_canonical = np.linalg.inv(np.asarray(scan.canonical_to_ras, float))
    return (np.c_[ras, np.ones(len(ras))] @ to_canonical.T)[:, :3]


@dataclass
class _Outline:
    name: str
    #: Canonical slice of each polygon.
    slices: np.ndarray
    #: ``(4, 2)`` ``(x=col, y=row)`` canonical pixels per polygon.
    polygons: list
    #: Drawn from a detection weaker than the detector's threshold (``outline_from``): dashed.
    rougher: bool = False

    def nearest(self, canonical_slice: int) -> tuple[np.ndarray, bool]:
        """The polygon nearest ``canonical_slice`` and whether it lies on that slice."""
        k = int(np.argmin(np.abs(self.slices - canonical_slice)))
        return self.polygons[k], bool(abs(self.slices[k] - canonical_slice) < 0.5)


def _outlines(scan, vertebrae_doc: dict) -> list[_Outline]:
    out = []
    for i, vertebra in enumerate(vertebrae_doc.get("vertebrae") or []):
        slices, polygons = [], []
        for polygon in vertebra.get("polygons") or []:
            corners = _ras_to_canonical(scan, polygon["corners_ras"])
            if np.all(np.isfinite(corners)):
                slices.append(float(corners[:, 2].mean()))
                polygons.append(corners[:, [1, 0]])
        if polygons:
            out.append(_Outline(vertebra_name(vertebra, i), np.asarray(slices), polygons,
                                rougher=rough_outline(vertebra)))
    return out


def preview_slice(scan, vertebrae_doc: dict) -> int:
    """The canonical slice the preview shows: most vertebra outlines, ties nearest the middle of those
    holding vertebrae; the middle slice of the scan when there are no outlines."""
    n = scan.n_slices
    counts = np.zeros(n, int)
    for outline in _outlines(scan, vertebrae_doc):
        on = {int(s) for s in np.rint(outline.slices) if 0 <= s < n}
        counts[list(on)] += 1
    if not counts.any():
        return (n - 1) // 2
    middle = float(np.median(np.flatnonzero(counts)))
    best = np.flatnonzero(counts == counts.max())
    return int(min(best, key=lambda s: (abs(s - middle), s)))


def _pixels_per_mm(height_mm: float, width_mm: float, finest_mm: float) -> float:
    """Display scale: native resolution, capped at MAX_SLICE_SIDE_PX, but never under MIN_SLICE_HEIGHT_PX tall."""
    scale = min(1.0 / finest_mm, MAX_SLICE_SIDE_PX / max(height_mm, width_mm))
    return max(scale, MIN_SLICE_HEIGHT_PX / height_mm)


def _spacing(scan) -> tuple[float, float]:
    row_mm, col_mm = (float(v) for v in scan.spacing_mm[:2])
    ok = lambda v: math.isfinite(v) and v > 0  # noqa: E731
    return (row_mm if ok(row_mm) else 1.0), (col_mm if ok(col_mm) else 1.0)


# --------------------------------------------------------------------------- text

def _pil():
    from PIL import Image, ImageDraw, ImageFont

    return Image, ImageDraw, ImageFont


def _font(size: int):
    _, _, ImageFont = _pil()
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: float) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (a single long word stays whole)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def disc_grade_texts(disc: dict, grade_columns: dict) -> list[str]:
    """Up to MAX_GRADES_SHOWN texts such as "Pfirrmann 3 (81 %)": main grades, then abnormal findings."""
    grades = {k: v for k, v in (disc.get("grades") or {}).items()
              if isinstance(v, dict) and isinstance(v.get("value"), (int, float)) and not isinstance(v["value"], bool)}

    def abnormal(name):
        classes = (grade_columns.get(name) or {}).get("classes") or []
        lowest = str(classes[0]).split(":", 1)[0].strip() if classes else str(int(name in _GRADED_FROM_ONE))
        return str(int(grades[name]["value"])) != lowest

    order = [n for n in _MAIN_GRADES if n in grades]
    order += sorted((n for n in grades if n not in order), key=lambda n: not abnormal(n))
    texts = []
    for name in order[:MAX_GRADES_SHOWN]:
        entry, classes = grades[name], (grade_columns.get(name) or {}).get("classes")
        value = int(entry["value"])
        binary = len(entry.get("probabilities") or classes or []) == 2 and value in (0, 1)
        shown = ("yes" if value else "no") if binary else str(value)
        p = reported_probability(entry, classes)
        texts.append(f"{_SHORT_NAMES.get(name, name)} {shown}" + ("" if p is None else f" ({100 * p:.0f} %)"))
    return texts


def banner_lines(vertebrae_doc: dict, discs_doc: dict | None = None) -> list[str]:
    """The banner's lines: "LEVELS NEED REVIEW" when the labelling says so, then each warning once."""
    block = vertebrae_doc.get("labelling") or {}
    lines = ["LEVELS NEED REVIEW"] if block.get("needs_review") and not block.get("corrected_by_user") else []
    warnings = [*(block.get("warnings") or []), *(vertebrae_doc.get("warnings") or []),
                *((discs_doc or {}).get("warnings") or [])]
    for warning in dict.fromkeys(str(w) for w in warnings if str(w).strip()):
        lines.append(warning[:1].upper() + warning[1:])
    return lines


def _header_text(scan, vertebrae_doc: dict, discs_doc: dict | None, canonical_slice: int) -> str:
    names = [vertebra_name(v, i) for i, v in enumerate(vertebrae_doc.get("vertebrae") or [])]
    found = f"{len(names)} vertebrae ({names[0]}..{names[-1]})" if names else "no vertebrae found"
    if discs_doc is not None:
        grading = discs_doc.get("grading") or {}
        source = grading.get("source")
        graded = ("graded" + (f" ({source})" if source else "")) if grading.get("status") == "done" else "not graded"
        found += f", {len(discs_doc.get('discs') or [])} discs {graded}"
    if (vertebrae_doc.get("labelling") or {}).get("corrected_by_user"):
        found += " (levels confirmed by hand)" if shift_by_reader(vertebrae_doc) == 0 else " (levels corrected by hand)"
    return (f"SpineNet: {found}; sagittal slice {canonical_slice + 1} of {scan.n_slices} "
            f"(input slice {scan.input_slice_index(canonical_slice)}); anterior left, superior up")


# --------------------------------------------------------------------------- preview.png

@dataclass
class _Layout:
    """Where the slice is drawn: its top-left corner and picture pixels per canonical column and row."""

    left: int
    top: int
    scale_x: float
    scale_y: float
    width: int
    height: int

    def point(self, xy) -> tuple[float, float]:
        """Picture position of canonical ``(x=col, y=row)`` (pixel centres at integers in both)."""
        return (self.left + (float(xy[0]) + 0.5) * self.scale_x - 0.5,
                self.top + (float(xy[1]) + 0.5) * self.scale_y - 0.5)


def _disc_marks(scan, vertebrae_doc: dict, discs_doc: dict | None) -> list[tuple[str, np.ndarray, list[str]]]:
    """``(level, canonical (x, y), grade texts)`` of each disc, top to bottom."""
    geometry = {d["level"]: d["centre_ras"] for d in disc_polygons(vertebrae_doc)}
    columns = (discs_doc or {}).get("grade_columns") or {}
    graded = ((discs_doc or {}).get("grading") or {}).get("status") == "done"
    discs = (discs_doc or {}).get("discs") if discs_doc is not None else [{"level": k} for k in geometry]
    marks = []
    for disc in discs or []:
        centre = disc.get("centre_ras") or geometry.get(disc.get("level"))
        if centre is None or np.shape(centre) != (3,):
            continue
        rcs = _ras_to_canonical(scan, centre)[0]
        if not np.all(np.isfinite(rcs)):
            continue
        texts = disc_grade_texts(disc, columns)
        if graded and not texts:
            texts = ["no grades"]
        marks.append((str(disc.get("level")), rcs[[1, 0]], texts))
    return sorted(marks, key=lambda m: m[1][1])


def _stack_blocks(wanted: list[float], heights: list[float], top: float, bottom: float, gap: float) -> list[float]:
    """Tops of text blocks as near their wanted tops as possible without overlapping, within top..bottom."""
    tops: list[float] = []
    for k, y in enumerate(wanted):
        tops.append(max(y, tops[-1] + heights[k - 1] + gap if tops else top))
    for k in range(len(tops) - 1, -1, -1):   # pushed past the bottom: move back up
        limit = (tops[k + 1] - gap if k + 1 < len(tops) else bottom) - heights[k]
        tops[k] = max(top, min(tops[k], limit))
    return tops


def _draw_slice_marks(draw, layout: _Layout, outlines: list[_Outline], canonical_slice: int, font, size: int):
    """Each vertebra's outline (dashed where it is rougher, with a line saying so at the slice's foot) and
    level; orientation letters at the slice's edges."""
    stroke = max(2, size // 9)
    for outline in outlines:
        polygon, on_slice = outline.nearest(canonical_slice)
        points = [layout.point(p) for p in polygon]
        if outline.rougher:
            _dashed_polygon(draw, points, OUTLINE_COLOUR, stroke if on_slice else 1, dash=size / 2)
        else:
            draw.line(points + points[:1], fill=OUTLINE_COLOUR, width=stroke if on_slice else 1, joint="curve")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        width = draw.textlength(outline.name, font=font)
        x, y = min(xs) - size // 3 - width, sum(ys) / 4
        if x < layout.left + 2:  # no room anterior of the body: inside it
            x = sum(xs) / 4 - width / 2
        draw.text((x, y), outline.name, font=font, fill=LABEL_COLOUR, anchor="lm", stroke_width=2,
                  stroke_fill=(0, 0, 0))
    small = _font(max(12, size * 3 // 4))
    right, bottom = layout.left + layout.width, layout.top + layout.height
    if any(outline.rougher for outline in outlines):
        draw.text((layout.left + 4, bottom - size * 3 // 2), ROUGHER_OUTLINE_NOTE, font=small, fill=OUTLINE_COLOUR,
                  anchor="lb", stroke_width=2, stroke_fill=(0, 0, 0))
    for text, xy, anchor in (("A", (layout.left + 4, layout.top + layout.height / 2), "lm"),
                             ("P", (right - 4, layout.top + layout.height / 2), "rm"),
                             ("S", (layout.left + layout.width / 2, layout.top + 4), "mt"),
                             ("I", (layout.left + layout.width / 2, bottom - 4), "mb")):
        draw.text(xy, text, font=small, fill=(255, 255, 255), anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def _dashed_polygon(draw, points: list[tuple[float, float]], fill, width: int, dash: float) -> None:
    """The closed polygon through ``points`` in dashes ``dash`` pixels long, with gaps as long."""
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        length = math.hypot(x1 - x0, y1 - y0)
        for start in np.arange(0.0, length, 2 * dash):
            a, b = start / length, min(start + dash, length) / length
            draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                      fill=fill, width=width)


def _reading_marks(scan, readings: Sequence[dict], at: str = "centroid_ras") -> list[tuple[str, np.ndarray]]:
    """``(level, canonical (x, y))`` of each vertebra of each of ``readings`` (documents' readings of the
    levels, ``{"series", "vertebrae": [{"level", at, ...}]}``), at its ``at`` position."""
    return [(str(vertebra["level"]), _ras_to_canonical(scan, vertebra[at])[0][[1, 0]])
            for reading in readings for vertebra in reading.get("vertebrae") or []]


def _other_series_marks(scan, vertebrae_doc: dict) -> list[tuple[str, np.ndarray]]:
    """:func:`_reading_marks` of each other reading of the levels
    (:func:`~SpineNetLib.outputs.documents.other_readings`: an exam's series that names a vertebra otherwise, the
    scan's own levels where it took another series'), at the vertebrae's centres."""
    return _reading_marks(scan, other_readings(vertebrae_doc))


def _draw_other_series(draw, layout: _Layout, marks, font, size: int) -> None:
    """A dot at each centre and the level the other series gives, posterior of it (inside the body)."""
    r = max(3, size // 5)
    for level, xy in marks:
        x, y = layout.point(xy)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=OTHER_SERIES_COLOUR, outline=(0, 0, 0))
        draw.text((x + 2 * r, y), level, font=font, fill=OTHER_SERIES_COLOUR, anchor="lm", stroke_width=2,
                  stroke_fill=(0, 0, 0))


def _next_best_marks(scan, vertebrae_doc: dict) -> list[tuple[str, np.ndarray]]:
    """:func:`_reading_marks` of each vertebra that the labelling's best shifted alternative names otherwise,
    where the levels need review (:func:`~SpineNetLib.outputs.documents.next_best_reading`), at its marker."""
    reading = next_best_reading(vertebrae_doc)
    return _reading_marks(scan, [reading] if reading is not None else [], "marker_ras")


def _draw_next_best(draw, layout: _Layout, marks, font, size: int) -> None:
    """"or S2" centred on each marker, below the body's centre (clear of another series' level beside it)."""
    for level, xy in marks:
        draw.text(layout.point(xy), f"or {level}", font=font, fill=NEXT_BEST_LEVEL_COLOUR, anchor="mm",
                  stroke_width=2, stroke_fill=(0, 0, 0))


def _draw_disc_panel(draw, layout: _Layout, marks, font, size: int, panel_left: int):
    line_h = round(size * 1.3)
    heights = [line_h * (1 + len(texts)) for _, _, texts in marks]
    wanted = [layout.point(xy)[1] - h / 2 for (_, xy, _), h in zip(marks, heights)]
    tops = _stack_blocks(wanted, heights, layout.top + 2, layout.top + layout.height - 2, size * 0.4)
    for (level, xy, texts), top in zip(marks, tops):
        x, y = layout.point(xy)
        r = max(3, size // 5)
        draw.line([(x, y), (panel_left + 4, top + line_h / 2)], fill=DISC_COLOUR, width=1)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=DISC_COLOUR, outline=(0, 0, 0))
        draw.text((panel_left + 10, top + line_h / 2), level, font=font, fill=DISC_COLOUR, anchor="lm")
        for k, text in enumerate(texts, 1):
            draw.text((panel_left + 10 + size, top + line_h * (k + 0.5)), text, font=font, fill=TEXT_COLOUR,
                      anchor="lm")


def _png_bytes(image, text: dict[str, str]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    # zlib level 3 instead of Pillow's 6: half the seconds (0.03 instead of 0.06 s for a lumbar preview)
    # for a file 6 % larger, the same pixels
    image.save(buffer, format="PNG", pnginfo=info, optimize=False, compress_level=3)
    return buffer.getvalue()


def render_preview(scan, vertebrae_doc: dict, discs_doc: dict | None = None) -> bytes:
    """``preview.png`` of one run (module docstring) as PNG bytes."""
    Image, ImageDraw, _ = _pil()
    canonical_slice = preview_slice(scan, vertebrae_doc)
    pixels = window_to_uint8(scan.voxels[:, :, canonical_slice])
    rows, cols = pixels.shape
    row_mm, col_mm = _spacing(scan)
    per_mm = _pixels_per_mm(rows * row_mm, cols * col_mm, min(row_mm, col_mm))
    height, width = max(1, round(rows * row_mm * per_mm)), max(1, round(cols * col_mm * per_mm))
    size = max(18, round(height / 45))
    font, line_h, margin = _font(size), round(size * 1.3), size // 2
    marks = _disc_marks(scan, vertebrae_doc, discs_doc)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    panel = max([measure.textlength(t, font=font) + size * 2 for _, _, ts in marks for t in ts] +
                [measure.textlength(m[0], font=font) + size for m in marks] + [0])
    canvas_w = width + (round(panel) + margin if marks else 0)
    header = _wrap(measure, _header_text(scan, vertebrae_doc, discs_doc, canonical_slice), font, canvas_w - 2 * margin)
    banner = [w for line in banner_lines(vertebrae_doc, discs_doc)
              for w in _wrap(measure, line, font, canvas_w - 2 * margin)]
    if len(banner) > MAX_BANNER_LINES:
        banner = banner[:MAX_BANNER_LINES - 1] + [f"... {len(banner) - MAX_BANNER_LINES + 1} more lines "
                                                  "(vertebrae.json, discs.json)"]
    header_h = line_h * len(header) + 2 * margin
    banner_h = line_h * len(banner) + 2 * margin if banner else 0
    layout = _Layout(0, header_h + banner_h, width / cols, height / rows, width, height)
    canvas = Image.new("RGB", (canvas_w, layout.top + height), PANEL_COLOUR)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, canvas_w, header_h], fill=HEADER_COLOUR)
    for k, line in enumerate(header):
        draw.text((margin, margin + k * line_h), line, font=font, fill=TEXT_COLOUR)
    if banner:
        draw.rectangle([0, header_h, canvas_w, header_h + banner_h - 1], fill=BANNER_COLOUR)
        for k, line in enumerate(banner):
            draw.text((margin, header_h + margin + k * line_h), line, font=font, fill=(0, 0, 0))
    canvas.paste(Image.fromarray(pixels, "L").resize((width, height), Image.BILINEAR).convert("RGB"),
                 (layout.left, layout.top))
    _draw_slice_marks(draw, layout, _outlines(scan, vertebrae_doc), canonical_slice, font, size)
    _draw_other_series(draw, layout, _other_series_marks(scan, vertebrae_doc), font, size)
    _draw_next_best(draw, layout, _next_best_marks(scan, vertebrae_doc), font, size)
    _draw_disc_panel(draw, layout, marks, font, size, width + margin // 2)
    return _png_bytes(canvas, {
        "Title": "SpineNet result", "Description": " ".join(header),
        "SpineNet slice": str(canonical_slice),
        "SpineNet slice box": f"{layout.left} {layout.top} {width} {height}",
        "SpineNet pixel scale": f"{layout.scale_x:.6f} {layout.scale_y:.6f}"})


# --------------------------------------------------------------------------- hotspots.png

def _sample(volume: np.ndarray, coordinates: np.ndarray, outside: float | None) -> np.ndarray:
    """Linear interpolation of ``volume`` at ``(3, N)`` index coordinates (nearest edge value, or ``outside``)."""
    mode = "nearest" if outside is None else "constant"
    values = ndimage.map_coordinates(np.asarray(volume, np.float32), coordinates, order=1, mode=mode,
                                     cval=0.0 if outside is None else outside, prefilter=False)
    return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)


def _overlay(scan, hotspot, grid_ras: np.ndarray, mm: tuple[float, float], height_px: int):
    """RGB image of the scan and the map on a ``(rows, cols, 3)`` grid of RAS points, or None where the
    map is empty; ``mm`` is the grid's (row, col) spacing."""
    Image = _pil()[0]
    rows, cols = grid_ras.shape[:2]
    points = np.c_[grid_ras.reshape(-1, 3), np.ones(rows * cols)]
    rcs = points @ np.linalg.inv(np.asarray(scan.canonical_to_ras, float)).T
    ijk = points @ np.linalg.inv(np.asarray(hotspot.ijk_to_ras, float)).T
    values = np.clip(_sample(hotspot.voxels_kji, ijk[:, [2, 1, 0]].T, 0.0).reshape(rows, cols), 0.0, 1.0)
    if values.max() < 0.05:  # nothing that would show
        return None
    grey = window_to_uint8(_sample(scan.voxels, rcs[:, :3].T, None).reshape(rows, cols)).astype(float)
    colour = np.stack([np.full_like(values, 255.0), 255.0 * values, np.zeros_like(values)], axis=-1)
    alpha = (0.7 * values * (values >= 0.05))[..., None]
    rgb = np.clip(np.rint((1 - alpha) * grey[..., None] + alpha * colour), 0, 255).astype(np.uint8)
    width = max(1, round(height_px * cols * mm[1] / (rows * mm[0])))
    return Image.fromarray(rgb, "RGB").resize((width, height_px), Image.BILINEAR)


def _disc_grid(volume_to_ras) -> tuple[np.ndarray, tuple[float, float]] | None:
    """RAS points of a disc volume's mid slice ``(rows, cols, 3)`` and their spacing, or None."""
    matrix = np.asarray(volume_to_ras, float) if volume_to_ras is not None else None
    if matrix is None or matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        return None
    depth, rows, cols = _VOLUME_SHAPE
    r, c = np.meshgrid(np.arange(rows, dtype=float), np.arange(cols, dtype=float), indexing="ij")
    index = np.stack([np.full(r.size, (depth - 1) / 2), r.ravel(), c.ravel(), np.ones(r.size)])
    spacing = (float(np.linalg.norm(matrix[:3, 1])), float(np.linalg.norm(matrix[:3, 2])))
    return (matrix @ index)[:3].T.reshape(rows, cols, 3), spacing


def _slice_grid(scan, canonical_slice: int) -> tuple[np.ndarray, tuple[float, float]]:
    rows, cols = scan.voxels.shape[:2]
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    ras = scan.canonical_to_ras_points(r.ravel(), c.ravel(), np.full(r.size, canonical_slice))
    return ras.reshape(rows, cols, 3), _spacing(scan)


def _hotspot_rows(scan, maps, vertebrae_doc: dict, discs_doc: dict | None) -> list[tuple[str, list]]:
    """``(map name, [(caption, tile image)])`` per map."""
    grids = [(str(d.get("level")), _disc_grid(d.get("volume_to_ras"))) for d in (discs_doc or {}).get("discs") or []]
    grids = [(level, grid) for level, grid in grids if grid is not None]
    out = []
    for hotspot in maps:
        tiles = []
        for level, (ras, mm) in grids:
            tile = _overlay(scan, hotspot, ras, mm, _HOTSPOT_TILE_HEIGHT_PX)
            if tile is not None:
                tiles.append((level, tile))
        if not tiles:  # no disc volume under the map: the preview's slice
            canonical_slice = preview_slice(scan, vertebrae_doc)
            ras, mm = _slice_grid(scan, canonical_slice)
            tile = _overlay(scan, hotspot, ras, mm, 2 * _HOTSPOT_TILE_HEIGHT_PX)
            tiles = [(f"sagittal slice {canonical_slice + 1}" if tile is not None else "empty map",
                      tile if tile is not None else None)]
        out.append((str(hotspot.name), tiles))
    return out


def render_hotspots(scan, maps: Sequence, vertebrae_doc: dict, discs_doc: dict | None = None) -> bytes | None:
    """``hotspots.png`` (module docstring) as PNG bytes; None without maps.

    ``maps`` are :class:`SpineNetLib.discs.hotspots.HotspotMap` (a name, ``[k, j, i]`` values in 0..1
    and their IJK-to-RAS).
    """
    if not maps:
        return None
    Image, ImageDraw, _ = _pil()
    size = 18
    font, line_h, gap = _font(size), round(size * 1.3), size // 2
    per_line = _HOTSPOT_TILES_PER_LINE
    rows = [(name if k == 0 else "", tiles[k:k + per_line])   # a map's tiles, a few to a line
            for name, tiles in _hotspot_rows(scan, maps, vertebrae_doc, discs_doc)
            for k in range(0, len(tiles), per_line)]
    legend = ("Evidence hotspots over each disc's grading volume, mid slice: red (weak) to yellow (strong); "
              "anterior left, superior up")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_w = [sum((t.width if t is not None else 200) + gap for _, t in tiles) + gap for _, tiles in rows]
    width = int(max(row_w + [measure.textlength(legend, font=font) + 2 * gap]))
    row_h = [line_h * 2 + max((t.height if t is not None else line_h) for _, t in tiles) + gap for _, tiles in rows]
    canvas = Image.new("RGB", (width, line_h + 2 * gap + sum(row_h)), PANEL_COLOUR)
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, gap), legend, font=font, fill=TEXT_COLOUR)
    y = line_h + 2 * gap
    for (name, tiles), h in zip(rows, row_h):
        draw.text((gap, y), name, font=font, fill=LABEL_COLOUR)
        x = gap
        for caption, tile in tiles:
            draw.text((x, y + line_h), caption, font=font, fill=DISC_COLOUR)
            if tile is not None:
                canvas.paste(tile, (x, y + 2 * line_h))
            x += (tile.width if tile is not None else 200) + gap
        y += h
    return _png_bytes(canvas, {"Title": "SpineNet evidence hotspots", "Description": legend})


def result_images(scan, vertebrae_doc: dict, discs_doc: dict | None = None, maps: Sequence = ()) -> dict[str, bytes]:
    """``{file name: PNG bytes}``: ``preview.png``, and ``hotspots.png`` when there are maps."""
    images = {PREVIEW_FILE: render_preview(scan, vertebrae_doc, discs_doc)}
    hotspots = render_hotspots(scan, maps, vertebrae_doc, discs_doc)
    if hotspots is not None:
        images[HOTSPOTS_FILE] = hotspots
    return images
