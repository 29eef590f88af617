"""The four SpineNetV2 networks, with the official parameter names (official §3).

The names below are imported on first use (PEP 562), so that the torch-free modules of this package
(``grading_heads``, ``inference``, ``onnx_runtime``) can be imported without torch.
"""

from importlib import import_module

_WHERE = {
    "AppearanceNet": "appearance",
    "ContextNet": "context",
    "DetectorConfig": "detector",
    "VFRDetector": "detector",
    "GradingConfig": "grading_heads",
    "GradingHead": "grading_heads",
    "HEADS": "grading_heads",
    "GradingNet": "grading",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
