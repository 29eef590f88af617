"""SpineNetLib: SpineNetV2 vertebra detection, labelling and disc grading, without Slicer.

Import the stages you need, e.g. ``from SpineNetLib.inputs.load import load_scan`` and
``from SpineNetLib.pipeline import detect_and_label``.
"""

__version__ = "0.1.0"
