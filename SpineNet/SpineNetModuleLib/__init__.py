"""The SpineNet module's own code beside ``SpineNet.py``: the logic and its workers.

Slicer loads every ``.py`` file directly in a module folder as a module, so
the module's helpers live in this package (as Slicer's own ``DICOMLib`` or
``SegmentEditorEffects`` do); ``SpineNet.py`` re-exports their public names.

* :mod:`.workers`: :class:`~.workers.Signal`, the worker interface
  (:class:`~.workers.WorkerProcess`) with its two implementations and
  :class:`~.workers.SpineNetRun`;
* :mod:`.logic`: :class:`~.logic.SpineNetLogic` (no GUI calls), the
  parameter node and the temporary folders of runs.

:data:`LIBRARY_PARENT` is the folder holding ``SpineNetLib``: the module
folder once installed, the repository root when run from source.  It is put
on ``sys.path`` here, before anything imports ``SpineNetLib``.
"""

import os
import sys


def _libraryParent():
    """Folder holding SpineNetLib: the module folder once installed, the repository root from source."""
    moduleFolder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (moduleFolder, os.path.dirname(moduleFolder)):
        if os.path.isfile(os.path.join(candidate, "SpineNetLib", "__init__.py")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return candidate
    return moduleFolder


LIBRARY_PARENT = _libraryParent()
