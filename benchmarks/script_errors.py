"""The entry point of every benchmark script: a plainly wrong input is one line on stderr and exit 2.

Each script ends with::

    if __name__ == "__main__":
        from script_errors import run_main   # benchmarks/ is on the path of a script run directly

        run_main(main)

SpineNetLib raises its own one-line errors for what a user can act on (``SpineNetLib.core.errors``:
``InputError``, ``WeightsError``, ...); the scripts raise ``InputError`` for theirs (a folder that
holds no case, a value out of range that argparse could not check).  :func:`run_main` runs ``main``
through :func:`SpineNetLib.core.errors.exit_status`, as ``spinenet`` does: such an error, or a file
that cannot be accessed, is printed as ``<script>: error: <message>`` with exit status 2.  Anything
else is a bug of the script and keeps its traceback (``debug=True``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NoReturn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from SpineNetLib.core.errors import InputError, exit_status  # noqa: E402  (no torch: cheap)

__all__ = ["InputError", "at_least", "run_main"]


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Exit with ``main()``'s status; a user's error (module docstring) is one stderr line and status 2."""
    sys.exit(exit_status(Path(sys.argv[0]).name, main, debug=True))


def at_least(minimum: int | float, kind: type = int) -> Callable[[str], int | float]:
    """An argparse ``type`` that reads a number of ``kind`` and refuses one below ``minimum``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}"
    return parse
