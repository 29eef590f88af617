"""Write the README screenshots of the Slicer panel: docs/images/slicer_panel.png and slicer_results_table.png.

Run from the repository root (needs PySide6 and slicer-core, as the tests do)::

    QT_QPA_PLATFORM=offscreen python benchmarks/render_slicer_screenshots.py

The real ``SpineNet/SpineNet.py`` widget is built with PySide6 stand-ins for
Slicer's Qt (Testing/Python/slicer_standins.py) and filled with the results
of a synthetic phantom's ground truth (no networks involved);
Testing/Python/test_slicer_ui.py renders the same images into a temporary
folder on every test run.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path[:0] = [str(REPO), str(REPO / "Testing" / "Python")]

import slicer_standins  # noqa: E402


def main():
    for path in slicer_standins.render_screenshots(REPO / "docs" / "images"):
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
