"""The tables ``spinenet evaluate``, ``benchmarks/validate_bundled.py`` and
``benchmarks/acquisition_variants.py`` print from a :func:`SpineNetLib.evaluation.evaluate.summarise`
result: shares with their 95 % intervals, per level, and how the review flag sorted the scans."""

from __future__ import annotations

from SpineNetLib.evaluation.intervals import percent_range


def review_lines(summary: dict) -> list[str]:
    """The lines of :func:`SpineNetLib.evaluation.evaluate.review_summary` (``summary["review"]``)."""
    r = summary["review"]
    unflagged = ", ".join(r["wrong_not_flagged"])
    return [f"review flag (needs_review): scans with a wrongly named body flagged {r['wrong_flagged']} of {r['wrong']} "
            f"({_percent_interval(r['ci95']['wrong_flagged'])}), scans entirely right flagged {r['right_flagged']} of "
            f"{r['right']} ({_percent_interval(r['ci95']['right_flagged'])})"
            + (f"; not flagged: {unflagged}" if unflagged else ""),
            f"scans not flagged: {r['unflagged']}, with no body named wrongly {r['unflagged_none_wrong']} "
            f"({_percent_interval(r['ci95']['unflagged_none_wrong'])})"]


def share_lines(summary: dict) -> list[str]:
    """Scans entirely right and the identification rate of a :func:`summarise` result, overall, per
    source and per sequence, with their 95 % intervals: how little a figure from a few scans rests on."""
    groups = [("overall", summary["overall"])]
    for key in ("source", "sequence"):
        groups += [(f"{key} {name}", group) for name, group in summary.get(f"by_{key}", {}).items()]
    lines = ["scans entirely right, scans shifted (every found body named off by the same number of levels) and "
             "identification rate, with 95 % intervals (Wilson; for the rate the scan is the unit; where a patient "
             "has several scans, the patient)"]
    for name, group in groups:
        right, idr = group["share_of_scans_all_levels_right"], group["identification_rate"]
        of_patients = _of_patients(group["n_patients"], group["n_cases"])
        lines.append(f"{name:<22} {group['scans_all_levels_right']}/{group['n_cases']} scans{of_patients} right "
                     f"{'n/a' if right is None else f'{100 * right:.1f}'} % "
                     f"({_percent_interval(group['ci95']['share_of_scans_all_levels_right'])}), "
                     f"shifted {group['scans_shifted']} ({_percent_interval(group['ci95']['share_of_scans_shifted'])}), "
                     f"IDR {'n/a' if idr is None else f'{100 * idr:.1f}'} % "
                     f"({_percent_interval(group['ci95']['identification_rate'])})")
    return lines


def level_lines(summary: dict) -> list[str]:
    """Recall and identification rate per true level of a :func:`summarise` result, then S1 on its own:
    the outlined S1 bodies (recall and IDR, with Wilson's 95 % interval over those bodies, one per scan,
    or over their patients where a patient has several scans)
    and, where S1 was scored below an annotated L5-S1 disc (point-annotated slices, disc masks), S1 found and
    named there, by source where several sources have such scans; then T12 above an annotated T12-L1 disc point
    (``evaluate.CaseMetrics.t12_named``): named T12 there, and the scans where another body is named T12."""
    lines = [f"{'level':8} {'bodies':>6} {'recall':>7} {'IDR':>7}"]
    for level, row in summary["by_level"].items():
        lines.append(f"{level:8} {row['n']:6d} {percent_cell(row['recall']):>7} {percent_cell(row['identification_rate']):>7}")
    s1 = summary["by_level"].get("S1")
    if s1:
        n = s1["n"]
        of_patients = _of_patients(s1["n_patients"], n)
        in_brackets = f" ({of_patients.strip()})" if of_patients else ""
        ci = s1["ci95"]
        lines.append(f"S1 where it is outlined: found {s1['found']} of {n}{in_brackets} "
                     f"(95 % interval {_percent_interval(ci['recall'])}), named S1 "
                     f"{s1['identified']} of {n} ({_percent_interval(ci['identification_rate'])})")
    else:
        lines.append("S1 where it is outlined: in no scored scan")
    overall = summary["overall"]
    if overall.get("s1_point_scans"):
        n = overall["s1_point_scans"]
        per_source = {name: group for name, group in summary.get("by_source", {}).items()
                      if group.get("s1_point_scans")}
        by_source = ("; by source: " + ", ".join(f"{name} {group['s1_point_named_s1']} of {group['s1_point_scans']}"
                                                 for name, group in per_source.items())) if len(per_source) > 1 else ""
        lines.append(f"S1 below an annotated L5-S1 disc where S1 is not outlined (point-annotated slices, disc masks; "
                     f"evaluation/evaluate.py): detected {overall['s1_point_detected']} of {n}, named S1 "
                     f"{overall['s1_point_named_s1']} of {n} "
                     f"(95 % interval {_percent_interval(overall['ci95']['s1_point_named_s1'])}){by_source}")
    for key, volumes in (("s1_below_l5", "that show S1 whole and unannotated (the next body below L5, "),
                         ("s1_cut_below_l5", "whose image cuts S1 below its centre (")):
        if not overall.get(f"{key}_scans"):
            continue
        missed = overall[f"{key}_not_named"]
        by_source = ", ".join(f"{name} {group[f'{key}_named_s1']} of {group[f'{key}_scans']}"
                              for name, group in summary.get("by_source", {}).items() if group.get(f"{key}_scans"))
        lines.append(f"S1 below an annotated L5 in volumes {volumes}evaluation/evaluate.{key}): named S1 "
                     f"{overall[f'{key}_named_s1']} of {overall[f'{key}_scans']} ({by_source})"
                     f"{'; not on ' + ', '.join(missed) if missed else ''}")
    if overall.get("t12_point_scans"):
        elsewhere = overall["t12_named_elsewhere"]
        hidden = [c for c in elsewhere if (summary.get("cases", {}).get(c) or {}).get("all_levels_right")]
        lines.append(f"T12 above an annotated T12-L1 disc (not annotated itself; evaluation/ground_truth.py): "
                     f"named T12 {overall['t12_point_named_t12']} of {overall['t12_point_scans']}; another body named "
                     f"T12 on {len(elsewhere)}{': ' + ', '.join(elsewhere) if elsewhere else ''}"
                     + (f"; of them entirely right by the annotated bodies: {', '.join(hidden)}" if hidden else ""))
    return lines


def _of_patients(patients: int, scans: int) -> str:
    """``" of 2 patients"`` where fewer patients than scans were scored (the intervals' unit), else ``""``."""
    return f" of {patients} patient{'s' if patients != 1 else ''}" if patients < scans else ""


def _percent_interval(interval) -> str:
    """``"56.6-100.0 %"``; ``"n/a"`` where there is no interval (no scans)."""
    return "n/a" if interval is None else f"{percent_range(interval)} %"


def percent_cell(x) -> str:
    """A share as a table cell: ``" 98.3%"``; ``"   n/a"`` without one."""
    return "   n/a" if x is None else f"{100 * x:5.1f}%"
