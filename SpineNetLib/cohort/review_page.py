"""``cohort_review.html``: one page to go through a cohort's results by eye, made from its tables.

A reader of a cohort wants to look at the studies whose levels may be wrong first, each with its
picture and the reason (the study's own review flag, or another series of its exam that names its
vertebrae otherwise: :func:`asks_for_review`), and to correct a wrong one at once. The page lists every
finished study of ``cohort_studies.csv`` in that order: those that ask for a review of their levels (least sure first),
then those a reader corrected, then the others (least sure first); each with its ``preview.png``
(linked, full size), its levels, how sure they are and why a review is asked for, its grading and
other warnings, and the ``spinenet correct`` command to type, run from the cohort's folder. The studies
without a result (``cohort_failures.csv``) follow with their reasons.

The page is made from the tables' CSV texts alone, so it is written with them, from the same rows,
whenever they are (:mod:`SpineNetLib.cohort.tables`): it never disagrees with them. It is a static
file with relative links (the previews under ``studies/``): open it from the output folder, or copy
the folder elsewhere whole. Nothing in it runs.
"""

from __future__ import annotations

import csv
import html
import io

from SpineNetLib.core.levels import margin_of_confidence

#: The page's file name in the cohort's output folder.
REVIEW_PAGE_FILE = "cohort_review.html"

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.4em; vertical-align: top; text-align: left; font-size: 0.9em; }
th { background: #eee; }
tr.review td { background: #fff3d6; }
tr.corrected td { background: #e8f4e8; }
code { user-select: all; white-space: nowrap; }
"""


def _rows(csv_text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(csv_text)))


def _sure(row: dict[str, str]) -> float:
    """The study's labelling confidence (0 when it has none: the least sure)."""
    try:
        return float(row.get("labelling_confidence") or 0.0)
    except ValueError:
        return 0.0


def _margin_cell(row: dict[str, str]) -> float | None:
    """The study's ``labelling_margin_nats`` (nats), None where the table has none (written before that column)
    or the cell is empty or no number."""
    try:
        return float(row["labelling_margin_nats"])
    except (KeyError, ValueError):
        return None


def _margin(row: dict[str, str]) -> float:
    """The study's labelling margin in nats (:func:`_margin_cell`; from its confidence in a table written
    before that column, which reads 1 from about 14.5 nats on; 0 when it has neither: the least sure)."""
    margin = _margin_cell(row)
    if margin is not None:
        return margin
    sure = _sure(row)
    return margin_of_confidence(sure) if sure > 0.0 else 0.0


def asks_for_review(row: dict[str, str]) -> bool:
    """Whether a ``cohort_studies.csv`` row asks for a review of its levels: its own review flag, or another
    series of its exam naming its vertebrae otherwise (``exam_disagreement``), unless a reader has corrected
    or confirmed its levels since."""
    return row.get("levels_need_review") == "true" or (
        bool(row.get("exam_disagreement")) and row.get("corrected_by_user") != "true")


def review_order(row: dict[str, str]) -> tuple:
    """The sort key of a ``cohort_studies.csv`` row on the page: review first, then corrected, then the
    others; the least sure first within each, by the labelling margin (the confidence cannot order them: it
    reads 1.00 on most studies that ask for a review)."""
    corrected = row.get("corrected_by_user") == "true"
    return (0 if asks_for_review(row) else 1 if corrected else 2, _margin(row), row.get("input", ""))


def _lowest_level(levels: str) -> str:
    """The lowest level of a ``levels`` cell (``T11..S1`` -> ``S1``), or "" when it names none."""
    lowest = levels.rpartition("..")[2]
    return lowest if lowest and not lowest.startswith("V") else ""


def _study_row(row: dict[str, str]) -> str:
    e = lambda text: html.escape(str(text or ""))  # noqa: E731
    review = asks_for_review(row)
    corrected = row.get("corrected_by_user") == "true"
    shift = row.get("shift_by_reader") or ""
    network = e(row.get("levels_by_network"))
    by_reader = ("levels confirmed by hand" if shift == "0" else
                 f"corrected by hand from {network} (moved unevenly)" if shift == "mixed" else
                 f"corrected by hand: moved {e(shift)} from {network}" if shift else "corrected by hand")
    picture = (f'<a href="{e(row["preview"])}"><img src="{e(row["preview"])}" width="260" loading="lazy" alt="preview"></a>'
               if row.get("preview") else "no preview")
    lowest = _lowest_level(row.get("levels", ""))
    command = (f'<code>spinenet correct studies/{e(row["study"])} {e(lowest)} LEVEL</code>' if lowest else "")
    sure = f"{_sure(row):.2f}" if row.get("labelling_confidence") else ""
    margin = _margin_cell(row)
    margin = "" if margin is None else f" (margin {margin:.1f} nats)"
    reason = "<br>".join(e(text) for text in (row.get("labelling_warning"), row.get("exam_disagreement")) if text)
    return ("<tr class=\"{}\">".format("review" if review else "corrected" if corrected else "")
            + f"<td>{picture}</td>"
            + f"<td><b>{e(row.get('input'))}</b><br>{e(row.get('series_description'))}<br><small>{e(row.get('study'))}"
              "</small></td>"
            + f"<td>{e(row.get('levels'))}<br>{e(row.get('vertebrae'))} vertebrae</td>"
            + f"<td>{'<b>review</b>' if review else by_reader if corrected else 'no'}<br>confidence {sure}{margin}"
              f"<br>S1 found: {e(row.get('s1_found'))}</td>"
            + f"<td>{reason}</td>"
            + f"<td>{e(row.get('grading'))}<br>{e(row.get('sequence'))}</td>"
            + f"<td>{e(row.get('other_warnings'))}</td>"
            + f"<td>{command}</td></tr>")


def review_page_html(studies_csv: str, failures_csv: str) -> str:
    """The page (module docstring) of the texts of ``cohort_studies.csv`` and ``cohort_failures.csv``."""
    studies = sorted(_rows(studies_csv), key=review_order)
    failures = _rows(failures_csv)
    review = sum(asks_for_review(r) for r in studies)
    corrected = sum(r.get("corrected_by_user") == "true" for r in studies)
    shifts = [r.get("shift_by_reader") for r in studies if r.get("corrected_by_user") == "true"]
    right, one_off = shifts.count("0"), sum(s in ("+1", "-1") for s in shifts)
    checked = (f" Of the {corrected} checked by a reader, the network had named the levels right on {right}, one "
               f"level off on {one_off}, further off or otherwise on {corrected - right - one_off} (the studies a "
               "reader checks are mostly those that asked for a review: no accuracy of the whole cohort)."
               if corrected else "")
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>SpineNet cohort review</title>", f"<style>{_STYLE}</style></head><body>",
        "<h1>SpineNet cohort review</h1>",
        f"<p>{len(studies)} finished {'study' if len(studies) == 1 else 'studies'}: {review} "
        f"ask{'s' if review == 1 else ''} for a review of "
        f"their levels (listed first, the least sure first), {corrected} corrected by hand; {len(failures)} without "
        "a result (at the end). Correct a study's levels from this folder with the command in its row, LEVEL being "
        "the level its lowest vertebra really has (its own level when the levels are right: that records the "
        "review), or name another vertebra (e.g. <code>#3</code>); the pictures, this page and the cohort tables "
        "follow." + checked + "</p>",
        "<table><tr><th>preview</th><th>input</th><th>levels</th><th>review?</th><th>why</th><th>grading</th>"
        "<th>other warnings</th><th>to correct</th></tr>",
        *(_study_row(row) for row in studies),
        "</table>",
    ]
    if failures:
        parts += ["<h2>Studies without a result</h2>", "<table><tr><th>input</th><th>reason</th></tr>",
                  *(f"<tr><td>{e(r.get('input', ''))}<br><small>{e(r.get('study', ''))}</small></td>"
                    f"<td>{e(r.get('reason', ''))}</td></tr>" for r in failures),
                  "</table>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
