"""The four SpineNetV2 networks, with the official parameter names (official §3)."""

from SpineNetLib.models.appearance import AppearanceNet
from SpineNetLib.models.context import ContextNet
from SpineNetLib.models.detector import DetectorConfig, VFRDetector
from SpineNetLib.models.grading import HEADS, GradingConfig, GradingHead, GradingNet

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
