"""The four SpineNetV2 networks, with the official parameter names (FACTS.md §3)."""

from .appearance import AppearanceNet
from .context import ContextNet
from .detector import DetectorConfig, VFRDetector
from .grading import HEADS, GradingConfig, GradingHead, GradingNet

__all__ = [
    "AppearanceNet",
    "ContextNet",
    "DetectorConfig",
    "VFRDetector",
    "GradingConfig",
    "GradingHead",
    "GradingNet",
    "HEADS",
]
