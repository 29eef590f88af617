"""Radiological gradings of the discs by the grading network (paper §3.4, official §3.4, §7).

Each :class:`SpineNetLib.discs.extraction.IVDVolume` ``(9, 112, 224)`` goes through the
11-head :class:`SpineNetLib.models.GradingNet` as ``[N, 1, 9, 112, 224]``,
as is: **no mean subtraction and no test-time augmentation** (the official V2
path, official §7; the V1 helpers that subtract means and average over crops are
not used).  Volumes are batched, which gives the same numbers as one at a time
(eval-mode BatchNorm).  For every head we report the argmax class as the
official ``format_gradings`` does (+1 for Pfirrmann, narrowing and central
canal stenosis, official §7) **and** the softmax probabilities, which the
official code hid.

Slice direction (official §4, §12): volumes are fed with slices running patient
right -> left (:mod:`SpineNetLib.discs.extraction`).  The direction the official network
was trained with is unknown; if it was left -> right, the network's
"ForaminalStenosisLeft" and "ForaminalStenosisRight" heads are swapped with
respect to the patient.  We keep the heads' names as the network outputs them
and do not swap anything.

Column names are the official ones made readable (``Narrowing`` ->
``DiscNarrowing``, ``UpperMarrow`` -> ``UpperMarrowChange``, ...);
:data:`OFFICIAL_NAMES` maps back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from SpineNetLib.discs.extraction import IVD_SHAPE, IVDVolume
from SpineNetLib.models.grading_heads import HEADS, GradingHead
from SpineNetLib.models.inference import network_outputs, softmax

_ABSENT_PRESENT = ("0: absent", "1: present")


@dataclass(frozen=True)
class GradeColumn:
    """One graded finding: its column name, network head, value offset and class meanings."""

    name: str
    #: Module name of the head in :class:`GradingNet` (``fc_pf``, ...).
    head: str
    #: Column name in the official output (official §7).
    official_name: str
    n_classes: int
    #: Reported value = argmax + offset (1 for Pfirrmann, narrowing, stenosis; else 0).
    offset: int
    description: str
    #: Meaning of each reported value, in class order ("3: ..." for value 3).
    classes: tuple[str, ...]

    @property
    def values(self) -> tuple[int, ...]:
        return tuple(range(self.offset, self.offset + self.n_classes))


_COLUMNS: tuple[GradeColumn, ...] = (
    GradeColumn("Pfirrmann", "fc_pf", "Pfirrmann", 5, 1,
                "Pfirrmann grade of disc degeneration on T2 (Pfirrmann et al., Spine 2001)",
                ("1: homogeneous bright nucleus, normal height",
                 "2: inhomogeneous nucleus (horizontal bands), clear nucleus/annulus distinction, normal height",
                 "3: inhomogeneous grey nucleus, unclear distinction, normal to slightly decreased height",
                 "4: inhomogeneous grey to black, lost distinction, normal to moderately decreased height",
                 "5: black, collapsed disc space")),
    GradeColumn("DiscNarrowing", "fc_nar", "Narrowing", 4, 1,
                "disc space narrowing (SpineNet grading; wording inferred from SpineNet V1, official §3.4)",
                ("1: normal", "2: mild", "3: moderate", "4: severe")),
    GradeColumn("CentralCanalStenosis", "fc_ccs", "CentralCanalStenosis", 4, 1,
                "central canal stenosis at the disc (wording inferred, official §3.4)",
                ("1: normal", "2: mild", "3: moderate", "4: severe")),
    GradeColumn("Spondylolisthesis", "fc_spn", "Spondylolisthesis", 3, 0,
                "spondylolisthesis at the disc; the official code and docs do not define classes 1 and 2 "
                "(official §3.4, §12)",
                ("0: none", "1: listhesis class 1 (meaning not documented)",
                 "2: listhesis class 2 (meaning not documented)")),
    GradeColumn("UpperEndplateDefect", "fc_ued", "UpperEndplateDefect", 2, 0,
                "defect of the endplate above the disc (the upper body's lower endplate)", _ABSENT_PRESENT),
    GradeColumn("LowerEndplateDefect", "fc_led", "LowerEndplateDefect", 2, 0,
                "defect of the endplate below the disc (the lower body's upper endplate)", _ABSENT_PRESENT),
    GradeColumn("UpperMarrowChange", "fc_umc", "UpperMarrow", 2, 0,
                "marrow signal change (Modic-type) in the body above the disc", _ABSENT_PRESENT),
    GradeColumn("LowerMarrowChange", "fc_lmc", "LowerMarrow", 2, 0,
                "marrow signal change (Modic-type) in the body below the disc", _ABSENT_PRESENT),
    GradeColumn("ForaminalStenosisLeft", "fc_fsl", "ForaminalStenosisLeft", 2, 0,
                "left foraminal stenosis (side as the network names it; training slice direction unknown, "
                "official §12)", _ABSENT_PRESENT),
    GradeColumn("ForaminalStenosisRight", "fc_fsr", "ForaminalStenosisRight", 2, 0,
                "right foraminal stenosis (side as the network names it; training slice direction unknown, "
                "official §12)", _ABSENT_PRESENT),
    GradeColumn("Herniation", "fc_hrn", "Herniation", 2, 0, "disc herniation", _ABSENT_PRESENT),
)

#: Column name -> :class:`GradeColumn`, in the network's head order (iterating gives the names).
GRADE_COLUMNS: dict[str, GradeColumn] = {c.name: c for c in _COLUMNS}
#: Column name -> the official output column name (official §7).
OFFICIAL_NAMES: dict[str, str] = {c.name: c.official_name for c in _COLUMNS}

# The table above must follow the network's heads exactly.
assert tuple((c.head, c.n_classes) for c in _COLUMNS) == tuple((h.name, h.n_classes) for h in HEADS)

#: One disc's grades: column -> (reported value, softmax probabilities over the classes).
DiscGrades = dict[str, tuple[int, np.ndarray]]


#: Why a column has no grade when the weights did not train its head.
NOT_TRAINED = "not trained: no graded data"


def trained_columns(grading_net) -> tuple[str, ...]:
    """The grade columns whose heads the weights trained, in column order.

    A checkpoint written by ``spinenet train grader`` records them (``trained_heads``: the heads
    its data graded); the official checkpoints record none, and all their heads were trained.
    """
    recorded = (getattr(grading_net, "checkpoint_meta", None) or {}).get("trained_heads")
    if recorded is None:
        return tuple(GRADE_COLUMNS)
    heads = {h.strip() for h in str(recorded).split(",") if h.strip()}
    return tuple(c.name for c in _COLUMNS if c.head in heads)


def untrained_heads(grading_net, heads: Sequence[GradingHead]) -> list[GradingHead]:
    """Those of ``heads`` whose grade column the weights did not train (:func:`trained_columns`): a
    hotspot map of such a head shows where an untrained classifier looks, not where a grade comes from."""
    trained = {GRADE_COLUMNS[c].head for c in trained_columns(grading_net)}
    return [h for h in heads if h.name not in trained]


def _as_array(volume) -> np.ndarray:
    v = volume.volume if isinstance(volume, IVDVolume) else volume
    v = np.asarray(v, np.float32)
    if v.shape != IVD_SHAPE:
        raise ValueError(f"an IVD volume must be {IVD_SHAPE}, got {v.shape}")
    return v


def grade_volumes(volumes: Sequence[IVDVolume | np.ndarray], grading_net, device="cpu", *,
                  batch_size: int = 4) -> list[DiscGrades]:
    """Grades of each volume, in the given order: ``[{column: (value, probabilities)}]``.

    ``grading_net`` (a torch module in eval mode, as :func:`checkpoints.load_model` returns it, or an
    ONNX network, ``models/onnx_runtime.py``) is called on batches of at most ``batch_size`` volumes.
    Only the columns whose heads the weights trained are graded (:func:`trained_columns`); the rest are
    absent.
    """
    graded = set(trained_columns(grading_net))
    arrays = [_as_array(v) for v in volumes]
    out: list[DiscGrades] = []
    for start in range(0, len(arrays), max(1, int(batch_size))):
        batch = np.stack(arrays[start:start + batch_size])[:, None]
        probs = [softmax(t) for t in network_outputs(grading_net, batch, device)]
        for k in range(len(batch)):
            grades: DiscGrades = {}
            for column, p in zip(_COLUMNS, probs):
                if column.name in graded:
                    grades[column.name] = (int(np.argmax(p[k])) + column.offset, p[k].copy())
            out.append(grades)
    return out

