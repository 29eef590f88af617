"""Several contrasts in one DICOM series, told apart into stacks.

Some scanners store every image of a multi-contrast acquisition under one SeriesInstanceUID: the water,
fat, in-phase and opposed-phase images of a Dixon sequence (T2 Dixon often stands in for STIR in spine
protocols), or the echoes of a dual-echo one. Such a series holds two or more images at every slice
position, so it cannot be read as one volume. Where the images at the same positions differ in their
image type, echo number or echo time, and each such group holds every position once, each group is a
*stack*, read and chosen like a series of its own under the key ``"<SeriesInstanceUID> [<label>]"``
(:func:`stack_key`): its label names what tells the stacks apart (``W`` and ``F``, ``WATER`` and ``FAT``,
``echo 2, TE 80``). A series with repeated positions that nothing tells apart stays one series, which the
loader refuses (duplicate positions).

Pure functions over header values, shared by the loader (:mod:`SpineNetLib.inputs.dicom`) and the cohort's
header-only discovery (:mod:`SpineNetLib.cohort.discover`), so both see the same stacks.
"""

from __future__ import annotations

from typing import Sequence

#: A position rounded to this many decimals of a millimetre is the same position.
_POSITION_DECIMALS = 2
#: What each element of a contrast (:func:`contrast_of`) is called in a label.
_LABEL_PREFIXES = ("", "echo ", "TE ")


def _text(value) -> str:
    """A header value as text: several values (a list, pydicom's MultiValue) joined by "/", numbers in
    their shortest form, words upper case."""
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "/".join(_text(v) for v in value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip().upper()
    return f"{number:g}"


def group_value(groups: Sequence, sequence: str, keyword: str):
    """``keyword`` of the first item of ``sequence`` in the first of the functional ``groups`` (an enhanced
    multi-frame file's per-frame and shared groups; None entries skipped) having it, else None."""
    for group in groups:
        items = getattr(group, sequence, None) if group is not None else None
        if items is not None and len(items) and keyword in items[0]:
            return items[0].get(keyword)
    return None


def contrast_of(header, frame_groups: Sequence = ()) -> tuple[str, str, str]:
    """(image type, echo number, echo time) of one image, as text: a file's header, or for a frame of an
    enhanced multi-frame file its per-frame and shared functional groups (``frame_groups``; their frame
    type and effective echo time). The image type leaves out its first two values (ORIGINAL or DERIVED,
    PRIMARY or SECONDARY), which say nothing of the contrast."""
    if frame_groups:
        frame_type = group_value(frame_groups, "MRImageFrameTypeSequence", "FrameType")
        image_type = frame_type if frame_type is not None else header.get("ImageType")
        echo_time = group_value(frame_groups, "MREchoSequence", "EffectiveEchoTime")
        echo_number = None
    else:
        image_type, echo_number, echo_time = (header.get(k) for k in ("ImageType", "EchoNumbers", "EchoTime"))
    values = list(image_type) if image_type is not None and not isinstance(image_type, str) else [image_type]
    return _text([v for v in values[2:] if v is not None]), _text(echo_number), _text(echo_time)


def _rounded(position) -> tuple | None:
    try:
        return None if position is None else tuple(round(float(v), _POSITION_DECIMALS) for v in position)
    except (TypeError, ValueError):
        return None


def split_into_stacks(positions: Sequence, contrasts: Sequence[tuple[str, str, str]]) -> dict[str, list[int]] | None:
    """``{label: indices of its images}`` when the images of one series (their ImagePositionPatient and
    :func:`contrast_of`) hold some positions more than once and fall into two or more contrasts that each
    hold every one of their positions once; else None (one series as it is)."""
    rounded = [_rounded(p) for p in positions]
    if any(p is None for p in rounded) or len(set(rounded)) == len(rounded):
        return None
    groups: dict[tuple, list[int]] = {}
    for index, contrast in enumerate(contrasts):
        groups.setdefault(tuple(contrast), []).append(index)
    if len(groups) < 2 or any(len({rounded[i] for i in members}) != len(members) for members in groups.values()):
        return None
    stacks = {_label(contrast, list(groups)): members for contrast, members in groups.items()}
    return stacks if len(stacks) == len(groups) else None


def _label(contrast: tuple, contrasts: list[tuple]) -> str:
    """What tells ``contrast`` apart from the other ``contrasts`` of its series, in a few words: the image
    type's values no other stack shares all of, the echo number, the echo time, where they differ."""
    parts = []
    for element, prefix in enumerate(_LABEL_PREFIXES):
        if len({c[element] for c in contrasts}) < 2:
            continue
        value = contrast[element]
        if element == 0:   # keep the image type's own values, those of every stack left out
            shared = set.intersection(*(set(c[0].split("/")) for c in contrasts))
            value = "/".join(dict.fromkeys(v for v in value.split("/") if v not in shared)) or value
        parts.append(f"{prefix}{value}" if value else f"{prefix}none")
    return ", ".join(parts)


def stack_key(series_uid: str, label: str) -> str:
    """The key a stack is read and chosen by (``--series``), in the place of its series' UID."""
    return f"{series_uid} [{label}]"


def series_uid_of(key: str) -> str:
    """The SeriesInstanceUID in a series' or a stack's key (:func:`stack_key`)."""
    return key.split(" [", 1)[0]


def stack_label_of(key: str) -> str:
    """The stack's label in a stack's key (:func:`stack_key`); "" for a whole series' UID."""
    uid, _, rest = key.partition(" [")
    return rest[:-1] if rest.endswith("]") else ""
