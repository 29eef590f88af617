"""Draw the SpineNet icon: a stylised sagittal lumbar spine with coloured vertebral quadrilaterals.

Run from the repository root (needs numpy and Pillow, development only)::

    python SpineNet/Resources/Icons/make_icon.py

It writes the 128x128 module icon ``SpineNet/Resources/Icons/SpineNet.png``
and the same image as the extension icon ``SpineNet.png`` at the top level.
The picture mirrors what the module shows: a sagittal MR slice (dark, head
up, anterior to the left), each vertebral body outlined as a quadrilateral
in its region colour (thoracic blue, lumbar orange/yellow, sacrum green, as
in ``SpineNetLib.outputs.documents.REGION_COLOURS``), the discs between them in cyan, and
the labelling as a small level tag.  Drawn at 8x and downsampled for
anti-aliasing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SCALE = 8
REPO = Path(__file__).resolve().parents[3]

THORACIC = (64, 148, 227)
LUMBAR = ((245, 148, 48), (252, 201, 79))
SACRUM = (92, 194, 107)
DISC = (90, 230, 242)


def _rgba(colour, alpha=255):
    return tuple(colour) + (alpha,)


def _spine_quads():
    """Quads (rt, rb, lb, lt) in icon pixels along a lordotic curve, top to bottom."""
    quads = []
    # centre line: x(y) bows anteriorly (to the left) in the lumbar region
    top, bottom = 11.0, 114.0
    heights = [10.0, 10.5, 11.0, 11.5, 11.5, 11.0, 12.0]  # T12, L1..L5, S1
    gap = 3.0
    y = top
    for n, h in enumerate(heights):
        yc = y + h / 2
        t = (yc - top) / (bottom - top)
        xc = 70 - 13 * math.sin(math.pi * t) + 6 * t
        angle = math.radians(-28 * (t - 0.45))          # endplates tilt with the curve
        width = 23.0 + 1.8 * n
        c, s = math.cos(angle), math.sin(angle)
        ex, ey = c, s          # along the endplate (anterior -> posterior is +x)
        nx, ny = -s, c         # along the body axis (down)
        corners = []
        for a, b in ((+1, -1), (+1, +1), (-1, +1), (-1, -1)):   # rt, rb, lb, lt
            corners.append((xc + a * width / 2 * ex + b * h / 2 * nx, yc + a * width / 2 * ey + b * h / 2 * ny))
        quads.append(corners)
        y += h + gap
    return quads


def draw() -> Image.Image:
    big = SIZE * SCALE
    # background: rounded square, dark MR-like vertical gradient
    yy = np.linspace(0, 1, big)[:, None]
    base = np.stack([18 + 12 * yy, 24 + 16 * yy, 38 + 22 * yy], axis=-1) * np.ones((1, big, 1))
    img = Image.fromarray(base.astype(np.uint8), "RGB").convert("RGBA")
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).rounded_rectangle((2 * SCALE, 2 * SCALE, big - 2 * SCALE, big - 2 * SCALE),
                                           radius=22 * SCALE, fill=255)

    quads = _spine_quads()
    glow = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d_glow, d = ImageDraw.Draw(glow), ImageDraw.Draw(layer)

    # faint "tissue": the spinal canal and cord behind the bodies
    canal = [(q[0][0] + 9, q[0][1]) for q in quads] + [(q[1][0] + 9, q[1][1]) for q in quads]
    canal.sort(key=lambda p: p[1])
    for (x0, y0), (x1, y1) in zip(canal[:-1], canal[1:]):
        d_glow.line([(x0 * SCALE, y0 * SCALE), (x1 * SCALE, y1 * SCALE)], fill=(140, 170, 220, 150), width=6 * SCALE)

    colours = [THORACIC, LUMBAR[0], LUMBAR[1], LUMBAR[0], LUMBAR[1], LUMBAR[0], SACRUM]
    # discs: between the lower edge of one body and the upper edge of the next
    for upper, lower in zip(quads[:-1], quads[1:]):
        disc = [upper[1], lower[0], lower[3], upper[2]]
        d.polygon([(x * SCALE, y * SCALE) for x, y in disc], fill=_rgba(DISC, 150))
    for quad, colour in zip(quads, colours):
        points = [(x * SCALE, y * SCALE) for x, y in quad]
        d_glow.polygon(points, fill=_rgba(colour, 120))
        d.polygon(points, fill=_rgba(colour, 95), outline=_rgba(colour), width=int(2.2 * SCALE))
        for x, y in points:  # corner points, as the detector finds them
            r = 1.7 * SCALE
            d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255, 235))
    glow = glow.filter(ImageFilter.GaussianBlur(3 * SCALE))
    img = Image.alpha_composite(img, glow)
    img = Image.alpha_composite(img, layer)

    # a level tag pointing at L4 (the labelling)
    tag = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    dt = ImageDraw.Draw(tag)
    q = quads[4]
    cy = float(np.mean([p[1] for p in q]))
    box = (95, cy - 7, 122, cy + 7)
    dt.line([((q[0][0] + q[1][0]) / 2 * SCALE, cy * SCALE), (box[0] * SCALE, cy * SCALE)],
            fill=(255, 255, 255, 220), width=int(1.4 * SCALE))
    dt.rounded_rectangle(tuple(v * SCALE for v in box), radius=4 * SCALE, fill=(255, 255, 255, 235))
    _draw_l4(dt, box)
    img = Image.alpha_composite(img, tag)

    out = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    out.paste(img, (0, 0), mask)
    return out.resize((SIZE, SIZE), Image.LANCZOS)


def _draw_l4(draw: ImageDraw.ImageDraw, box) -> None:
    """The text "L4" drawn with strokes (no font files needed)."""
    x0, y0, x1, y1 = box
    ink = (30, 36, 52, 255)
    w = int(2.4 * SCALE)
    left, top, bottom = x0 + 7, y0 + 3.2, y1 - 3.2
    line = lambda a, b: draw.line([(a[0] * SCALE, a[1] * SCALE), (b[0] * SCALE, b[1] * SCALE)], fill=ink, width=w)  # noqa: E731
    # L
    line((left, top), (left, bottom))
    line((left, bottom), (left + 5, bottom))
    # 4
    fx = left + 7.5
    line((fx + 4, top), (fx + 4, bottom))
    line((fx + 4, top), (fx - 0.5, bottom - 3))
    line((fx - 0.5, bottom - 3), (fx + 6, bottom - 3))


def main() -> None:
    icon = draw()
    for path in (REPO / "SpineNet" / "Resources" / "Icons" / "SpineNet.png", REPO / "SpineNet.png"):
        icon.save(path, optimize=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
