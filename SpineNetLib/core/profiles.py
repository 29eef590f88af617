"""Processing profiles: how the stages around the networks work, ours or the official code's (issue 11).

Plain settings with no dependency, so that a caller can choose how a scan is read (thin slices averaged
into slabs or not) before torch and the networks are loaded.  ``pipeline`` re-exports these names.
docs/PROFILES.md lists every switch with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from SpineNetLib.core.errors import InputError


@dataclass(frozen=True)
class ProcessingProfile:
    """How the stages around the networks work (issue 11): ours, or the official code's.

    ``default`` holds this project's deliberate deviations (docs/PROFILES.md,
    each with its reason); ``official`` follows the official implementation
    where the deviation is implemented as a switch (official §4-6).  A run
    with the official weights uses ``official`` unless told otherwise.
    """

    name: str
    #: Average thin (~1 mm) sagittal slices into ~3.5 mm slabs at load time (``inputs/canonical.py``);
    #: the official code runs every native slice (official §4).
    slab_average_thin_slices: bool
    #: ``LabellingParams.official_crop``: the official appearance-volume crop (official §5.4).
    official_appearance_crop: bool
    #: ``LabellingParams.drop_lower_sacral_segments``: leave out a third S1 at the bottom.
    drop_lower_sacral_segments: bool
    #: Make a disc between two detected bodies whose levels are not adjacent (official §6).
    discs_across_missed_levels: bool
    #: ``DetectionParams.official_arithmetic`` with integer-pixel maxima and every corner kept, on the
    #: official patch plan (official §5.1-5.2).
    official_detection: bool = False
    #: Cut the disc volumes with the official arithmetic (rotate-bound canvas in square pixels, box
    #: rounded to whole pixels, resized; ``discs.extraction.extract_ivd_volume_official``, official §6).
    official_disc_volumes: bool = False
    #: Detect again at other multiples of the header's pixel spacing when it finds too few bodies
    #: (``detect_and_label``; not official).
    retry_pixel_spacing: bool = True
    #: ``LabellingParams.relabel_s1_at_image_edge`` (not official).
    relabel_s1_at_image_edge: bool = True
    #: ``LabellingParams.move_up_to_weaker_s1`` (not official).
    move_up_to_weaker_s1: bool = True
    #: ``LabellingParams.skip_across_gaps``: a level skipped freely across a gap that holds a missed body
    #: (not official).
    skip_across_gaps: bool = True
    #: ``LabellingParams.centre_appearance_slices``: the appearance network sees the slices centred on a
    #: spine that lies off the middle of the slab (not official).
    centre_appearance_slices: bool = True
    #: S1's outline from the weight set's second detector, when it has one (``detect/s1_outline.py``; not official).
    refine_s1_outline: bool = True


PROFILES: dict[str, ProcessingProfile] = {
    "default": ProcessingProfile("default", slab_average_thin_slices=True, official_appearance_crop=False,
                                 drop_lower_sacral_segments=True, discs_across_missed_levels=False),
    "official": ProcessingProfile("official", slab_average_thin_slices=False, official_appearance_crop=True,
                                  drop_lower_sacral_segments=False, discs_across_missed_levels=True,
                                  official_detection=True, official_disc_volumes=True, retry_pixel_spacing=False,
                                  relabel_s1_at_image_edge=False, move_up_to_weaker_s1=False,
                                  skip_across_gaps=False, refine_s1_outline=False, centre_appearance_slices=False),
}


def processing_profile(name: str | None, weights_source: str | None = None) -> ProcessingProfile:
    """The named profile; without a name, ``official`` for the official weights and ``default`` otherwise."""
    if name is None:
        return PROFILES["official" if weights_source == "official" else "default"]
    if name not in PROFILES:
        raise InputError(f"unknown processing profile {name!r} (use {' or '.join(PROFILES)})")
    return PROFILES[name]
