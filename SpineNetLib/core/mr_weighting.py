"""What an MR series' own header says of its weighting (T1, T2, proton density, STIR, FLAIR).

Two readers need it: the grader, which grades T2-weighted scans only (``discs/weighting.py``, whose
docstring gives the rules), and the DICOM reader, which reads the one sagittal T2 series of an exam
folder when it holds several sagittal series and none was named (``inputs/dicom.py``).  The rules: the
echo, repetition and inversion times against the textbook spin-echo windows below; where they do not
settle it (gradient echo, a time missing), the series description's own words (``t1``, ``t2``, ``stir``,
``tirm``, ``pd``, ``flair``) when they name one weighting.

Pure functions over a header dictionary with the keys of ``Scan.metadata`` for DICOM
(``inputs/dicom.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

#: The weightings this module names; "other": a user's word for none of the named ones; "fluid bright":
#: what the image alone can say of T2, STIR and their kin; "unknown": nothing could be told.
WEIGHTINGS = ("T2", "T1", "PD", "STIR", "FLAIR", "other", "fluid bright", "unknown")

#: The weightings the grader is given: T2, and "fluid bright" / "unknown", where nothing says it is not T2.
GRADED_WEIGHTINGS = ("T2", "fluid bright", "unknown")

#: Spin-echo windows in milliseconds (a radiology textbook's, e.g. Westbrook, "MRI in Practice", ch. 2:
#: T1 TR 300-700 / TE 10-30; PD TR > 2000 / TE 10-30; T2 TR > 2000 / TE 70-120), widened to the
#: protocols of fast spin echo spines (T2 TSE TE 80-120 ms, TR 2500-4500; T1 TSE TR 400-800).
T1_MAX_TR_MS = 1000.0
SHORT_TE_MAX_MS = 40.0
LONG_TR_MIN_MS = 1500.0
LONG_TE_MIN_MS = 60.0
#: Inversion recovery: short tau (STIR, Siemens' TIRM) nulls fat at 1.5-3 T with TI 130-230 ms; fluid
#: attenuated (FLAIR) nulls water with TI 1800-2500 ms; in between, T1-weighted inversion recovery.
STIR_MAX_TI_MS = 300.0
FLAIR_MIN_TI_MS = 1500.0


@dataclass(frozen=True)
class Weighting:
    """A scan's weighting and where that came from."""

    #: One of :data:`WEIGHTINGS`.
    name: str
    #: "user", "DICOM header", "image" or "none".
    source: str
    #: What the decision rests on, for the user (e.g. "TE 12 ms, TR 550 ms").
    detail: str = ""

    @property
    def graded(self) -> bool:
        """Whether the grader is given this scan."""
        return self.name in GRADED_WEIGHTINGS

    def description(self) -> str:
        """E.g. "T1-weighted (DICOM header: TE 12 ms, TR 550 ms)"."""
        name = {"T1": "T1-weighted", "T2": "T2-weighted", "PD": "proton-density weighted",
                "STIR": "a short-tau inversion recovery (STIR/TIRM)", "FLAIR": "a fluid-attenuated inversion recovery",
                "other": "of another weighting", "fluid bright": "fluid bright",
                "unknown": "of unknown weighting"}.get(self.name, self.name)
        where = {"user": "as given", "DICOM header": "DICOM header", "image": "image"}.get(self.source, self.source)
        return f"{name} ({where}{': ' + self.detail if self.detail else ''})"

    def as_dict(self) -> dict:
        return {"weighting": self.name, "source": self.source, "detail": self.detail, "graded": self.graded}


def _ms(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


_DESCRIPTION_WORDS = (("STIR", r"stir|tirm"), ("FLAIR", r"flair"), ("PD", r"pd|pdw|proton"),
                      ("T1", r"t1|t1w"), ("T2", r"t2|t2w"))


def weighting_from_description(description: str) -> str | None:
    """The one weighting that a series description names (words such as ``t2_tse_sag``), else None."""
    words = set(re.split(r"[^a-z0-9]+", str(description).lower()))
    named = [name for name, pattern in _DESCRIPTION_WORDS if any(re.fullmatch(pattern, w) for w in words)]
    if "FLAIR" in named and "T2" in named:   # "T2 FLAIR" is a FLAIR
        named.remove("T2")
    return named[0] if len(named) == 1 else None


def weighting_from_header(header: Mapping) -> Weighting | None:
    """The weighting that a DICOM series' metadata (``Scan.metadata`` of ``inputs/dicom.py``) tells, or None.

    Keys read: ``echo_time_ms``, ``repetition_time_ms``, ``inversion_time_ms``, ``scanning_sequence``
    (DICOM's ScanningSequence: SE, IR, GR, EP, RM), ``series_description``.
    """
    te, tr, ti = (_ms(header.get(k)) for k in ("echo_time_ms", "repetition_time_ms", "inversion_time_ms"))
    kinds = set(str(header.get("scanning_sequence") or "").upper().replace("\\", " ").split())
    times = ", ".join(f"{name} {value:g} ms" for name, value in (("TE", te), ("TR", tr), ("TI", ti)) if value)
    from_times = None
    if ti is not None and ("IR" in kinds or not kinds):
        from_times = "STIR" if ti < STIR_MAX_TI_MS else "FLAIR" if ti >= FLAIR_MIN_TI_MS else "T1"
    elif "GR" not in kinds and te is not None and tr is not None:
        if tr <= T1_MAX_TR_MS and te <= SHORT_TE_MAX_MS:
            from_times = "T1"
        elif tr >= LONG_TR_MIN_MS and te >= LONG_TE_MIN_MS:
            from_times = "T2"
        elif tr >= LONG_TR_MIN_MS and te <= SHORT_TE_MAX_MS:
            from_times = "PD"
    if from_times is not None:
        return Weighting(from_times, "DICOM header", times)
    description = str(header.get("series_description") or "")
    from_words = weighting_from_description(description)
    if from_words is not None:
        return Weighting(from_words, "DICOM header", f"series description {description!r}")
    return None
