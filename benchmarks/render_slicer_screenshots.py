"""Write the README screenshots of the Slicer module into docs/images/.

Run from the repository root (needs PySide6 and slicer-core, as the tests do)::

    OMP_NUM_THREADS=1 QT_QPA_PLATFORM=offscreen python benchmarks/render_slicer_screenshots.py [OUTDIR]

What it does (Testing/Python/slicer_standins.py, ``render_screenshots``): the
phantom that ``spinenet demo`` writes (lumbar T2, seed 7) is put into a
slicer-core MRML scene as the volume "phantom"; the real ``SpineNet/SpineNet.py``
panel, built with PySide6 stand-ins for Slicer's Qt, runs *Detect & Grade*
with its defaults (bundled weights, grading on) through the module's logic
and the worker's entry point in this process.  So the panel, the grades table
and the scene's nodes hold the bundled networks' real result.

* ``slicer_panel.png``: the panel after the run;
* ``slicer_results_table.png``: the "phantom SpineNet grades" table node;
* ``slicer_slice_view.png``: the middle sagittal slice as Slicer's slice view
  draws it, rendered by VTK offscreen (EGL; Mesa's software renderer is
  enough, no X server) with slicer-core's slice logic and Slicer's own
  segmentation and markups displayable managers, from the MRML nodes the
  run made;
* ``slicer_layout.png``: the panel and the slice view side by side.

The captions in README.md and docs/SLICER.md describe these images (levels,
counts, warnings): check them after regenerating with other weights.

The slice views need VTK offscreen rendering; without it this script stops
(the test Testing/Python/test_slicer_ui.py renders the same images into a
temporary folder, the slice view only where VTK can render offscreen).
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path[:0] = [str(REPO), str(REPO / "Testing" / "Python")]

#: The screenshots must stay small (bytes).
MAX_BYTES = 300_000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=REPO / "docs" / "images",
                        help="folder to write the four PNGs into (default: docs/images)")
    outdir = parser.parse_args(argv).outdir.resolve()

    import slicer_standins  # Testing/Python; needs PySide6 and slicer-core

    if not slicer_standins.offscreen_rendering_works():
        sys.exit("VTK cannot render offscreen here (no EGL/OSMesa/X): the slice view cannot be drawn")
    for path in slicer_standins.render_screenshots(outdir, slice_view=True):
        size = path.stat().st_size
        if size > MAX_BYTES:
            sys.exit(f"{path} is {size} bytes, more than {MAX_BYTES}")
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        print(f"wrote {shown} ({size // 1000} kB)")
    return 0


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
