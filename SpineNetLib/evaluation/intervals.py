"""95 % confidence intervals of the evaluation's shares, so that a figure from a few scans says how
little it rests on (issue 10: accuracy claims from held-out real data).

Two kinds, because the scans are independent but the bodies of one scan are not:

* **Scan-level shares** (scans entirely right, S1 named below an annotated L5-S1 disc): a
  binomial proportion over independent scans (the validation split holds out by patient); the
  Wilson score interval (Wilson, J. Am. Stat. Assoc. 1927; recommended over the normal
  approximation by Brown, Cai and DasGupta, Stat. Sci. 2001), which stays inside [0, 1] and is
  not empty at 0 of n or n of n: 5 of 5 scans right is 57-100 %, not 100 %.
* **Body-level rates** (recall, identification rate): one scan's bodies are wrong together (a
  shifted chain names all of them wrongly), so a binomial interval over bodies would be far too
  narrow.  The same Wilson interval is taken with the scan as the unit: the pooled rate over the
  number of scans with bodies, as if each scan's bodies were all right or all wrong together.
  That is conservative (wider than the truth where errors are single bodies), and unlike a
  bootstrap over scans it does not collapse to 100-100 % when every body was right.

Scans of one patient are not independent either (the same anatomy, often the same session: a T1 and a
T2 of one spine are named wrongly together), so where the evaluation knows patients
(:func:`patient_unit_interval`) the patient is the unit of both kinds, in the same way: each patient's
scans (or bodies) pooled, n = the patients.  With one scan per patient this is the interval above.

Pure functions over counts.
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence

#: Two-sided 95 %: the standard normal quantile 0.975.
Z_95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion ``successes / n``; None when ``n`` is 0."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def scan_unit_interval(successes: Sequence[int], totals: Sequence[int], z: float = Z_95) -> tuple[float, float] | None:
    """Wilson interval of the pooled rate ``sum(successes) / sum(totals)`` with the scan as the unit
    (one entry of each sequence per scan; n = the scans with a total); None when none has one."""
    if len(successes) != len(totals):
        raise ValueError("one success count and one total per scan")
    scans = sum(1 for t in totals if t > 0)
    if scans == 0:
        return None
    return wilson_interval(scans * sum(successes) / sum(totals), scans, z)


def patient_unit_interval(successes: Sequence[float], totals: Sequence[int], patients: Sequence[Hashable] | None = None,
                          z: float = Z_95) -> tuple[float, float] | None:
    """:func:`scan_unit_interval` with the patient as the unit: one entry of each sequence per scan,
    ``patients[i]`` the patient of scan ``i`` (None: each scan its own patient).  A scan-level share
    passes 1 or 0 successes of 1 per scan (with one scan per patient, Wilson's interval over scans)."""
    if patients is None:
        return scan_unit_interval(successes, totals, z)
    if not len(successes) == len(totals) == len(patients):
        raise ValueError("one success count, one total and one patient per scan")
    pooled: dict[Hashable, list[float]] = {}
    for success, total, patient in zip(successes, totals, patients):
        sums = pooled.setdefault(patient, [0.0, 0])
        sums[0] += success
        sums[1] += total
    return scan_unit_interval([s for s, _ in pooled.values()], [t for _, t in pooled.values()], z)


def patient_share_interval(outcomes: Sequence[bool], patients: Sequence[Hashable] | None = None,
                           z: float = Z_95) -> tuple[float, float] | None:
    """Interval of a scan-level share (one yes/no per scan: entirely right, shifted, flagged, ...) with the
    patient as the unit (:func:`patient_unit_interval`); with one scan per patient Wilson's over scans."""
    outcomes = [int(bool(x)) for x in outcomes]
    return patient_unit_interval(outcomes, [1] * len(outcomes), patients, z)


def rounded(interval: tuple[float, float] | None) -> list[float] | None:
    """An interval as JSON writes it: 6 decimals, so that a percentage printed from it with one decimal
    is the interval's own (4 would round 56.55 % down to 56.5)."""
    return None if interval is None else [round(float(interval[0]), 6), round(float(interval[1]), 6)]


def percent_range(interval: Sequence[float] | None) -> str:
    """``"90.0-99.2"`` (percent, one decimal); ``"n/a"`` without an interval."""
    if interval is None:
        return "n/a"
    return f"{100 * interval[0]:.1f}-{100 * interval[1]:.1f}"
