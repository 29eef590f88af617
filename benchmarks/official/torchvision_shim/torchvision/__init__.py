"""A stand-in for torchvision in the official package's environment only (benchmarks/official/README.md).

The official SpineNetV2 package imports torchvision just to borrow the layer stack of an
untrained ResNet-50 for its detector (official §3.1), and PyPI's torchvision does not import
beside the CPU build of torch used here.  This stand-in builds that stack from this
repository's own ResNet blocks (same parameter names and shapes), which is all the official
detector needs: every weight is then replaced by the checkpoint.
"""
from . import models  # noqa: F401
