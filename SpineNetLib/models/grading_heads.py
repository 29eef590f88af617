"""The grading network's heads, input shape and configuration, without torch.

:mod:`SpineNetLib.models.grading` builds the network from them; the disc stage and the ONNX runtime
(``models/onnx_runtime.py``) read them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class GradingHead(NamedTuple):
    """One classification head: module name, number of classes, output column."""

    name: str
    n_classes: int
    column: str


#: Heads in the official output order (official §3.4 table; columns as in §7).
#: Reported values: argmax + 1 for Pfirrmann, Narrowing, CentralCanalStenosis; argmax otherwise.
HEADS: tuple[GradingHead, ...] = (
    GradingHead("fc_pf", 5, "Pfirrmann"),
    GradingHead("fc_nar", 4, "Narrowing"),
    GradingHead("fc_ccs", 4, "CentralCanalStenosis"),
    GradingHead("fc_spn", 3, "Spondylolisthesis"),
    GradingHead("fc_ued", 2, "UpperEndplateDefect"),
    GradingHead("fc_led", 2, "LowerEndplateDefect"),
    GradingHead("fc_umc", 2, "UpperMarrow"),
    GradingHead("fc_lmc", 2, "LowerMarrow"),
    GradingHead("fc_fsl", 2, "ForaminalStenosisLeft"),
    GradingHead("fc_fsr", 2, "ForaminalStenosisRight"),
    GradingHead("fc_hrn", 2, "Herniation"),
)

#: Input shape (slices, rows, cols) of one IVD volume (official §6).
GRADING_INPUT_SHAPE = (9, 112, 224)


@dataclass(frozen=True)
class GradingConfig:
    """Shape of a :class:`GradingNet`; defaults are the official ResNet-34 layout.

    Stage widths are w, 2w, 4w, 8w with ``w = base_width``.
    """

    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    base_width: int = 64
    #: Slices of the disc volume the network reads: the central ones of the 9 (official: all 9).  A
    #: grader trained on single mid-sagittal slices (the bundled one, MODEL_CARD.md) reads 1.
    input_slices: int = GRADING_INPUT_SHAPE[0]

    def __post_init__(self) -> None:
        if int(self.input_slices) not in (1, 3, 5, 7, 9):
            raise ValueError(f"GradingConfig.input_slices must be 1, 3, 5, 7 or 9, got {self.input_slices!r}")
        object.__setattr__(self, "input_slices", int(self.input_slices))
        blocks = tuple(int(b) for b in self.blocks)
        if len(blocks) != 4 or any(b < 1 for b in blocks):
            raise ValueError(f"GradingConfig.blocks must be 4 positive integers, got {self.blocks!r}")
        if int(self.base_width) < 1:
            raise ValueError(f"GradingConfig.base_width must be positive, got {self.base_width!r}")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "base_width", int(self.base_width))


def reads_one_slice(net) -> bool:
    """Whether ``net`` is a grader that reads only the central slice of a disc volume
    (``GradingConfig.input_slices == 1``, as the bundled one, trained on single clinical slices)."""
    config = getattr(net, "config", None)
    return config is not None and int(getattr(config, "input_slices", GRADING_INPUT_SHAPE[0])) == 1


#: Said whenever a grader that reads one slice (the bundled one) grades a scan of several slices.
#: Figures from the volumes of healthy volunteers (``benchmarks/grader_on_volumes.py``; MODEL_CARD.md "On volumes").
SINGLE_SLICE_GRADER_ON_A_VOLUME = (
    "the grader was validated on single clinical mid-sagittal T2 slices only: its grades on volumes are "
    "not validated (the bundled grader calls 11-32 % of healthy volunteers' discs herniated, depending on "
    "the scanner, and 47 % of their L5-S1 discs; MODEL_CARD.md); treat them as a hint only")
