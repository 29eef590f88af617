"""Detection, labelling and the disc stage of a whole scan: the stages glued together.

:func:`run` is the one orchestrator every caller uses (``spinenet run``, the
Slicer worker and batch script, Python code): given a :class:`Scan` and the
:class:`Networks` of :func:`load_networks`, it detects and labels the
vertebrae, cuts, measures and (with a grading network) grades the discs,
computes hotspot maps when asked, and returns a :class:`RunResult`.  It
writes no files; :func:`SpineNetLib.outputs.files.write_results` does.

The stages, usable on their own: :func:`load_networks` (``networks.py``,
re-exported here) resolves and loads the weights once;
:func:`detect_and_label` runs detection (paper §3.1) and labelling (paper
§3.2) and returns vertebrae top to bottom, in canonical coordinates, with
per-stage timings; :func:`grade_discs` cuts the disc
volumes (paper §3.3), grades them when a grading network is loaded (paper
§3.4) and measures the discs and bodies.  :mod:`SpineNetLib.outputs.vertebrae`
and :mod:`SpineNetLib.outputs.discs` map the results back to the input's RAS
space as the ``spinenet.vertebrae/1`` and ``spinenet.discs/1`` documents.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from SpineNetLib.core.errors import InputError
from SpineNetLib.core.levels import N_LEVELS, level_index
# the profiles live in core/profiles.py (no torch there); pipeline.processing_profile etc. stay the API's names
from SpineNetLib.core.profiles import PROFILES, ProcessingProfile, processing_profile  # noqa: F401
from SpineNetLib.core.progress import ProgressCallback, scaled
from SpineNetLib.core.results import DetectionResult, Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.detect import vfr as detection
from SpineNetLib.detect.no_bodies import no_vertebrae_reason
from SpineNetLib.detect.s1_outline import bodies_clear_of_the_lower_edge, refine_s1_outline
from SpineNetLib.detect.turned import bodies_on_turned_slices
from SpineNetLib.discs.extraction import extract_ivd_volumes, skipped_discs
from SpineNetLib.discs.grading import GRADE_COLUMNS, NOT_TRAINED, grade_volumes, trained_columns, untrained_heads
# the hotspot maps themselves (discs/hotspots.py) need torch, and are imported only when asked for
from SpineNetLib.discs.hotspot_options import (
    DEFAULT_METHOD, METHODS, HotspotMap, check_hotspot_precision, parse_heads,
)
from SpineNetLib.discs.measurements import MAX_PLAUSIBLE_DISC_HEIGHT_MM, lumbar_body_size_warning, measure_spine
from SpineNetLib.discs.weighting import (Weighting, not_graded_reason, not_graded_warning, scan_weighting,
                                         user_sequence)
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.label import labelling
from SpineNetLib.label.confidence import (LabellingConfidence, ask_for_review, ask_for_review_where_in_doubt,
                                          beyond_lumbar_field, confidence_of_vertebrae, missed_vertebra_reasons,
                                          s1_at_lower_edge, same_level_twice)
from SpineNetLib.label.missed_bodies import (bodies_below, chain_ends_above_s1, gap_fillers, keeps_bodies_below,
                                             level_in, levels_down_to_s1, names_bodies_down_to_s1, same_body,
                                             weaker_body_below_s1)
from SpineNetLib.label.orientation import orientation_warning, surer_reoriented
from SpineNetLib.label.other_series import review_against_other_series, series_name
from SpineNetLib.label.signal_void import ask_for_review_over_a_void, levels_counted_across_a_void
from SpineNetLib.label.void_path import pairs_in_a_void
from SpineNetLib.outputs.discs import discs_document
from SpineNetLib.outputs.vertebrae import vertebrae_document
from SpineNetLib.models.grading_heads import SINGLE_SLICE_GRADER_ON_A_VOLUME, reads_one_slice
from SpineNetLib.models.inference import is_torch_module
from SpineNetLib.models.runtime_choice import slow_arithmetic_warnings
# the API's names: the networks are loaded in networks.py
from SpineNetLib.networks import Networks, load_networks  # noqa: F401
# torch and its networks are imported where a run needs them: --runtime onnx never does (models/onnx_runtime.py)


#: A scan on which fewer bodies than this are found at the header's pixel spacing is detected again
#: at these multiples of it, and the one that finds most bodies (at least this many) is kept.  A
#: pixel spacing wrong by about 2 is a real header fault: 2 of the 50 held-out clinical slices
#: (``tianchi/``) give 1.44 mm pixels on which the lumbar bodies measure about 60 mm, and nothing
#: was found on them at that spacing (bundled MODEL_CARD.md, "Validation").
MIN_BODIES_AT_HEADER_SPACING = 4
PIXEL_SPACING_FACTORS_TO_TRY = (0.5, 0.7, 1.4, 2.0)


def _detect_at_plausible_spacing(scan: Scan, predict, params: detection.DetectionParams,
                                 progress, retry: bool = True) -> tuple[Scan, DetectionResult, float]:
    """Detection at the header's pixel spacing, or (with ``retry``) at a multiple of it when that finds
    too few bodies.

    Returns the scan as detected (its in-plane spacing multiplied by the factor), the result, and
    the factor (1.0: the header's spacing).
    """
    start = time.perf_counter()
    result = detection.detect_vertebrae(scan, predict, params, progress=scaled(progress, "detecting vertebrae"))
    best = (scan, result, 1.0)
    if not retry or len(result.vertebrae) >= MIN_BODIES_AT_HEADER_SPACING:
        return best
    for factor in PIXEL_SPACING_FACTORS_TO_TRY:
        row_mm, col_mm, slice_mm = scan.spacing_mm
        rescaled = replace(scan, spacing_mm=(row_mm * factor, col_mm * factor, slice_mm))
        retried = detection.detect_vertebrae(rescaled, predict, params)
        if len(retried.vertebrae) >= max(MIN_BODIES_AT_HEADER_SPACING, len(best[1].vertebrae) + 1):
            best = (rescaled, retried, factor)
    best[1].timings_s["detection"] = time.perf_counter() - start  # every try
    return best


def _weaker_s1_below_full_strength_s1(labelled: list[Vertebra], candidates: list[Vertebra],
                                       taken: list[Vertebra], spacing_rc) -> Vertebra | None:
    """The unused weaker detection lying where S1 would lie below an L5, under a full-strength lowest
    body named S1 (:func:`~SpineNetLib.label.missed_bodies.weaker_body_below_s1`): the sign that
    the body named S1 may be L5 (``s1_may_be_l5``).  None when there is no such pair."""
    if not labelled or labelled[-1].level != "S1" or any(same_body(labelled[-1], t) for t in taken):
        return None
    unused = [c for c in candidates if not any(c is t for t in taken)]
    return weaker_body_below_s1(labelled, unused, spacing_rc)


def _moved_up_to_weaker_s1(labelled: list[Vertebra], weaker: Vertebra, label,
                           params: labelling.LabellingParams) -> list[Vertebra] | None:
    """The chain moved up by one level with ``weaker`` named S1, when three signs agree that the body
    named S1 is L5: it is a full-strength detection with ``weaker`` below it where S1 would lie
    (:func:`_weaker_s1_below_full_strength_s1`; with the bundled detector S1 is rarely full-strength),
    and the two bodies above it, named L4 and L5, both favour L4 at 0.95 or more
    (:func:`~SpineNetLib.label.confidence.same_level_twice`).  None otherwise, or when the pinned
    labelling does not move every body up by exactly one level.

    Labelling again with that detection added names it S2 (the networks take the body above for
    S1), so the body above it is pinned to L5 as a user's correction would
    (``labelling.relabel_with_correction``; pinning the added one to S1 gives two S1s instead).
    Chosen on the training side (``benchmarks/acquisition_variants.py --split train``, six runs of its
    133 scans): the first two signs together held on 13 runs of a wrongly named scan and 2 of a right
    one; the pair named L4 and L5 favouring L4 on 12 of the wrong ones, all then named right, and on
    neither right one (their pairs: L2-L3 favouring L3; L5-S1 favouring L5, as on the ``spinenet
    demo`` phantom, which stays as it is).  Held out, it moves 4 scans of the variants, all then right,
    and none as acquired (bundled MODEL_CARD.md, "Review flag").
    """
    if not params.move_up_to_weaker_s1:
        return None
    twice = same_level_twice(labelled)
    if twice is None or twice.named != ("L4", "L5") or twice.level != "L4":
        return None
    again = label([*labelled, weaker], labelled)   # copies: relabelling them leaves ``labelled`` as it is
    at = next((i for i, v in enumerate(again) if same_body(v, weaker)), None)
    if not at:
        return None
    moved = labelling.relabel_with_correction(again, at - 1, "L5", params)
    if moved[at].level != "S1":
        return None
    for old in labelled:
        new_level = level_in(moved, old)
        if new_level is None or level_index(new_level) != level_index(old.level) + 1:   # LEVELS run S1 upwards
            return None
    return moved


def _labelled_without_edge_appearance(scan: Scan, labelled: list[Vertebra], found: list[Vertebra],
                                      label) -> list[Vertebra] | None:
    """The labelling again without the appearance of a body named S1 at the lower image edge, when
    that changes the levels (else None).

    An image that ends right below a body looks like S1 to the bundled appearance network (model
    card, "Other acquisitions"): its training volumes end right below S1, and its training cuts came
    no nearer than 0.3 body heights.  So when the body named S1 has less than half its height of
    image below it (:func:`~SpineNetLib.label.confidence.s1_at_lower_edge`), its appearance is replaced
    by a uniform one (no evidence) and the spine labelled again from the others.  On held-out scans
    cut between L5 and S1 (``benchmarks/acquisition_variants.py``, which it was designed on) it
    relabelled 7, all then right (18 -> 11 shifted); on the training side cut the same way 2, both then
    right (18 -> 16); it changed none of the 27 scans ending right below a real S1."""
    if s1_at_lower_edge(labelled, scan.voxels.shape[0], scan.spacing_mm[0]) is None:
        return None
    blind = replace(labelled[-1], appearance_probabilities=np.full(N_LEVELS, 1.0 / N_LEVELS))
    again = label(found, labelled[:-1] + [blind])
    return again if [v.level for v in again] != [v.level for v in labelled] else None


def _bodies_on_turned_slices(scan: Scan, result: DetectionResult, predict,
                             params: detection.DetectionParams, further_deg: float = 0.0) -> list[Vertebra]:
    """The bodies found with the slices turned so that the lowest labelled body stands upright
    (``detect/turned.py``; ``further_deg`` further), apart from those already found; their seconds
    count as detection."""
    if params.turned_min_lean_deg is None or not result.vertebrae:
        return []
    start = time.perf_counter()
    once = replace(params, faint_threshold=None, turned_min_lean_deg=None)
    found = bodies_on_turned_slices(scan, result.vertebrae[-1],
                                    lambda turned, p: detection.detect_vertebrae(turned, predict, p), once,
                                    params.turned_min_lean_deg, further_deg)
    found = detection.apart_from(found, list(result.vertebrae) + list(result.candidates), params.merge_iou)
    result.timings_s["detection"] = result.timings_s.get("detection", 0.0) + time.perf_counter() - start
    return found


def _s1_from_second_detector(scan: Scan, result: DetectionResult, found: list[Vertebra], label, predict,
                             params: detection.DetectionParams, labelling_params: labelling.LabellingParams
                             ) -> tuple[list[Vertebra], list[Vertebra]] | None:
    """(the labelled vertebrae with the bodies added, the bodies added) when ``predict``'s detector finds the
    bodies step by step below the chain's lowest body (L1-L5) down to S1 (``label/missed_bodies.bodies_below``;
    none reaching the image's last row, where an L5 cannot be told from S1) and the labelling names each the
    next level, the lowest S1, while every other body keeps its level but for a level counted across a wide
    space above (``missed_bodies.names_bodies_down_to_s1``); else None.  Nothing is added anywhere else
    (MODEL_CARD.md, "S1 below an L5 from the second detector" and "... below an L1-L4")."""
    start = time.perf_counter()
    bodies = bodies_clear_of_the_lower_edge(scan, predict, params)
    result.timings_s["detection"] = result.timings_s.get("detection", 0.0) + time.perf_counter() - start
    added = bodies_below(result.vertebrae, detection.apart_from(bodies, list(result.vertebrae), params.merge_iou),
                         scan.spacing_mm[:2])
    if len(added) != len(levels_down_to_s1(result.vertebrae[-1].level)):   # the search stopped above S1
        return None
    relabelled = label(found + added, result.vertebrae)
    named = names_bodies_down_to_s1(result.vertebrae, relabelled, added, labelling_params)
    return (relabelled, added) if named else None


def detect_and_label(scan: Scan, networks: Networks, *,
                     detection_params: detection.DetectionParams | None = None,
                     labelling_params: labelling.LabellingParams | None = None,
                     progress: ProgressCallback | None = None,
                     retry_pixel_spacing: bool = True,
                     second_detector: detection.Predictor | None = None) -> DetectionResult:
    """Detect every vertebral body in ``scan`` and label its level.

    ``second_detector`` (the weight set's S1-outline detector): where the chain still ends above S1 (at
    L1-L5), the last place the bodies down to S1 are looked for (:func:`_s1_from_second_detector`).

    When the header's pixel spacing finds too few bodies (and ``retry_pixel_spacing``), detection
    and labelling run at the multiple of it that finds most (:data:`PIXEL_SPACING_FACTORS_TO_TRY`);
    the factor is in ``result.labelling["pixel_spacing_factor"]``.  Vertebrae stay in the scan's
    pixels either way.
    """
    detection_params = detection_params or detection.DetectionParams()
    labelling_params = labelling.params_for_context(networks.context, labelling_params)
    predict = networks.predictor or detection.network_predictor(networks.detector, device=networks.device)
    scan, result, spacing_factor = _detect_at_plausible_spacing(scan, predict, detection_params, progress,
                                                                retry=retry_pixel_spacing)
    start = time.perf_counter()
    fillers = gap_fillers(result.vertebrae, result.candidates, scan.spacing_mm[:2])
    found = list(result.vertebrae) + fillers   # label_vertebrae sorts them top to bottom
    label = lambda vertebrae, before=(): labelling.label_vertebrae(  # noqa: E731
        scan, vertebrae, networks.appearance, networks.context, labelling_params, device=networks.device,
        progress=scaled(progress, "labelling levels again" if before else "labelling levels"),  # its own 0..n
        labelled_before=before)
    if found:
        result.vertebrae = label(found)
    below: list[Vertebra] = []
    detection_s = result.timings_s.get("detection", 0.0)
    # Below a chain that ends above S1: the weaker detections first, then the faint ones
    # (DetectionParams.faint_threshold), decoded only if it still ends above S1, then a detection on
    # the slices turned so that its lowest body stands upright (DetectionParams.turned_min_lean_deg).
    # (DetectionParams.turned_further_deg: again, turned further, while it still ends above S1).
    turned = [lambda further=further: _bodies_on_turned_slices(scan, result, predict, detection_params, further)
              for further in (0.0, *detection_params.turned_further_deg)]
    for weaker in (lambda: result.candidates, lambda: result.faint_candidates, *turned):
        if not chain_ends_above_s1(result.vertebrae):
            break
        added = bodies_below(result.vertebrae, weaker(), scan.spacing_mm[:2])
        if added:
            relabelled = label(found + added, result.vertebrae)   # the appearance net runs on the new bodies only
            if keeps_bodies_below(result.vertebrae, relabelled, added, labelling_params):
                result.vertebrae, found, below = relabelled, found + added, below + added
    down_to_s1 = None
    if second_detector is not None and chain_ends_above_s1(result.vertebrae):
        down_to_s1 = _s1_from_second_detector(scan, result, found, label, second_detector, detection_params,
                                              labelling_params)
        if down_to_s1 is not None:
            result.vertebrae, added = down_to_s1
            found, below = found + added, below + added
    result.faint_decoding = None   # frees the detector maps it holds when the faint pass was not needed
    at_edge = (_labelled_without_edge_appearance(scan, result.vertebrae, found, label)
               if labelling_params.relabel_s1_at_image_edge else None)
    if at_edge is not None:
        result.vertebrae = at_edge
    faint_s = result.timings_s.get("detection", 0.0) - detection_s   # counted as detection
    result.timings_s["labelling"] = time.perf_counter() - start - faint_s
    result.labelling = {"repeat_s1_penalty": float(labelling_params.repeat_s1_penalty),
                        "appearance_weight": float(labelling_params.appearance_weight),
                        # lower sacral segments below S2 (labelling.sacral_run_end): said, not silently dropped
                        "sacral_segments_left_out": len(found) - len(result.vertebrae)}
    if spacing_factor != 1.0:
        result.labelling["pixel_spacing_factor"] = spacing_factor
    if down_to_s1 is not None:
        result.labelling["s1_from_second_detector"] = True
        if len(down_to_s1[1]) > 1:   # a review reason (_ask_for_review_where_in_doubt)
            result.labelling["levels_from_second_detector"] = [level_in(down_to_s1[0], b) for b in down_to_s1[1]]
    if at_edge is not None:
        result.labelling["s1_at_image_edge_relabelled"] = True
    weaker_s1 = _weaker_s1_below_full_strength_s1(result.vertebrae, list(result.candidates), fillers + below,
                                                  scan.spacing_mm[:2])
    moved = None if weaker_s1 is None else _moved_up_to_weaker_s1(result.vertebrae, weaker_s1, label,
                                                                   labelling_params)
    if moved is not None:
        result.vertebrae, below = moved, below + [weaker_s1]
        result.labelling["moved_up_to_weaker_s1"] = True
    elif weaker_s1 is not None:
        result.labelling["s1_may_be_l5"] = True
    # bodies taken from weaker or faint detections, turned slices or the second detector (each body's
    # Vertebra.outline_from says which network drew its outline)
    result.labelling["bodies_from_weaker_detections"] = len(fillers) + len(below)
    _count_levels_across_a_void(scan, result, labelling_params)
    return result


def _count_levels_across_a_void(scan: Scan, result: DetectionResult, params: labelling.LabellingParams) -> None:
    """Where a signal void right above the body named S1 hides bodies, the levels above it counted on from S1
    (``label/signal_void.levels_counted_across_a_void``), the levels before in the labelling block; with
    ``skip_across_gaps`` (not official), which lets a level be skipped across a gap."""
    counted = levels_counted_across_a_void(scan, result.vertebrae) if params.skip_across_gaps else None
    if counted is None:
        return
    names, hidden = counted
    result.labelling["levels_counted_across_void"] = {"bodies_hidden": hidden,
                                                      "levels_before": [v.level for v in result.vertebrae]}
    result.vertebrae = [replace(v, level=name) for v, name in zip(result.vertebrae, names)]


@dataclass
class DiscResult:
    """The disc stage's results: volumes, grades (None when not graded), measurements, status."""

    ivds: list
    grades: list | None
    measurements: object
    #: {"status": "done", "weights": source, "weights_file": ...} or {"status": "not run", "reason": "...",
    #: "weights": source}; source: the weight set's ("bundled", "official" or the folder).
    grading_status: dict
    timings_s: dict[str, float] = field(default_factory=dict)


def grade_discs(scan: Scan, vertebrae: list[Vertebra], networks: Networks, *, grade: bool = True,
                batch_size: int = 4, progress: ProgressCallback | None = None,
                across_missed_levels: bool = False, official_disc_volumes: bool = False,
                weighting: Weighting | None = None) -> DiscResult:
    """Disc volumes, gradings (if ``grade``, ``networks.grading`` and a ``weighting`` the grader reads:
    ``discs/weighting.py``; None: not asked) and measurements.

    ``across_missed_levels`` and ``official_disc_volumes``: the profile's switches
    (:class:`ProcessingProfile`).  The discs are cut and measured either way; the status says why
    they were not graded.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    ivds = extract_ivd_volumes(scan, vertebrae, across_missed_levels, official_arithmetic=official_disc_volumes)
    timings["disc_volumes"] = time.perf_counter() - start
    start = time.perf_counter()
    measurements = measure_spine(scan, vertebrae)
    timings["measurements"] = time.perf_counter() - start
    grades = None
    # "weights": the weight set's source (bundled, official or the folder), in every status
    if not grade:
        status = {"status": "not run", "reason": "grading was switched off (--no-grade)",
                  "weights": networks.weights.source}
    elif networks.grading is None:
        status = {"status": "not run",
                  "reason": f"no grading weights in the {networks.weights.source!r} weight set "
                            "(add grading.pt or the official grading/ folder)", "weights": networks.weights.source}
    elif weighting is not None and not weighting.graded:
        status = {"status": "not run", "reason": not_graded_reason(weighting), "weights": networks.weights.source}
    else:
        start = time.perf_counter()
        report = scaled(progress, "grading discs")
        grades = []
        for first in range(0, len(ivds), batch_size):
            if report:
                report(first, len(ivds))
            grades += grade_volumes(ivds[first:first + batch_size], networks.grading, networks.device,
                                    batch_size=batch_size)
        if report:
            report(len(ivds), len(ivds))
        weights_path = getattr(networks.grading, "weights_path", None)
        status = {"status": "done", "weights": networks.weights.source}
        if weights_path:
            status["weights_file"] = str(weights_path)
        if networks.precision != "fp32":   # the arithmetic the grades came from (a 1-slice grader stays fp32)
            from SpineNetLib.models.precision import precision_of

            status["precision"] = precision_of(networks.grading)
        graded_columns = trained_columns(networks.grading)
        untrained = {c: NOT_TRAINED for c in GRADE_COLUMNS if c not in graded_columns}
        if untrained:  # e.g. the bundled grader: only the heads the clinical tags grade
            status["heads_not_trained"] = untrained
        timings["grading"] = time.perf_counter() - start
    if weighting is not None:
        status["weighting"] = weighting.as_dict()
    return DiscResult(ivds=ivds, grades=grades, measurements=measurements, grading_status=status,
                      timings_s=timings)


# --------------------------------------------------------------------------- the whole run

def read_input(path, profile: ProcessingProfile, *, series_uid: str | None = None, pixel_spacing=None,
               slice_spacing: float | None = None) -> tuple[Scan, float]:
    """The scan of ``path`` (anything :func:`load_scan` reads) as ``profile`` wants it, and the seconds it took.

    The profile decides whether thin slices are averaged into slabs when the scan is read
    (``ProcessingProfile.slab_average_thin_slices``); ``spinenet run`` and ``spinenet cohort`` both
    read their input here, so a study gives the same result through either.
    ``pixel_spacing=(row_mm, col_mm)`` and ``slice_spacing`` override the input's spacings.
    """
    start = time.perf_counter()
    scan = load_scan(path, series_uid=series_uid, pixel_spacing=tuple(pixel_spacing) if pixel_spacing else None,
                     slice_spacing=slice_spacing, resample_isotropic=profile.slab_average_thin_slices)
    return scan, time.perf_counter() - start


def profiled_detection_params(params: detection.DetectionParams | None,
                              profile: ProcessingProfile) -> detection.DetectionParams:
    """``params`` (default: ours) with the profile's detection arithmetic."""
    params = params or detection.DetectionParams()
    if not profile.official_detection:
        return params
    return replace(params, official_arithmetic=True, plan="patches", stride_fraction=detection.OFFICIAL_STRIDE_FRACTION,
                   subpixel=False, drop_edge_corners=False, candidate_threshold=None, faint_threshold=None,
                   turned_min_lean_deg=None, turned_further_deg=())


def profiled_labelling_params(context_net, params: labelling.LabellingParams | None,
                              profile: ProcessingProfile) -> labelling.LabellingParams:
    """The context checkpoint's labelling numbers (or ``params``) with the profile's switches."""
    base = labelling.params_for_context(context_net, params)
    return replace(base, official_crop=profile.official_appearance_crop,
                   drop_lower_sacral_segments=profile.drop_lower_sacral_segments,
                   relabel_s1_at_image_edge=profile.relabel_s1_at_image_edge,
                   move_up_to_weaker_s1=base.move_up_to_weaker_s1 and profile.move_up_to_weaker_s1,
                   skip_across_gaps=base.skip_across_gaps and profile.skip_across_gaps,
                   centre_appearance_slices=base.centre_appearance_slices and profile.centre_appearance_slices)


@dataclass
class RunOptions:
    """What :func:`run` does beyond detection and labelling."""

    #: Grade the discs (needs a grading network); the discs are cut and measured either way.
    grade: bool = True
    #: The scan's weighting as the user knows it (one of ``discs.weighting.USER_SEQUENCES``: "T2", "T1",
    #: ...); None: from the DICOM header, else from the image.  Only T2-weighted scans are graded.
    sequence: str | None = None
    #: Grading heads whose evidence maps are computed (names or columns, e.g. ``["Pfirrmann"]``);
    #: needs the grading.
    hotspot_heads: Sequence[str] = ()
    #: One of :data:`SpineNetLib.discs.hotspots.METHODS`.
    hotspot_method: str = DEFAULT_METHOD
    #: Test-time augmentations averaged per hotspot map (fewer is faster on a CPU).
    hotspot_augmentations: int = 16
    #: Arithmetic of the hotspot maps (:data:`SpineNetLib.discs.hotspots.HOTSPOT_PRECISIONS`; "auto":
    #: bfloat16 where the CPU computes it natively, see the hotspots module).
    hotspot_precision: str = "auto"
    #: Seconds the caller already spent on this run (e.g. ``{"load_scan": 0.8, "load_networks": 2.1}``):
    #: listed first in the timings and counted in their total.
    earlier_timings_s: dict[str, float] = field(default_factory=dict)
    detection_params: detection.DetectionParams | None = None
    labelling_params: labelling.LabellingParams | None = None
    #: Disc volumes per grading-network call.
    grading_batch_size: int = 4
    #: ``PROFILES`` name; None: ``official`` with the official weights, else ``default``
    #: (:func:`processing_profile`).  Slab averaging is decided when the scan is loaded
    #: (``load_scan(resample_isotropic=...)``); the caller passes the profile's choice there.
    profile: str | None = None
    #: Other sagittal series of the scan's exam, in its frame of reference (``Scan.metadata
    #: ["other_sagittal_series"]``, read): each is detected and labelled too, and where one names a vertebra
    #: otherwise, the levels ask for a review (:mod:`SpineNetLib.label.other_series`).
    other_series: Sequence[Scan] = ()
    #: Labelling confidence below which the levels are flagged for review
    #: (:mod:`SpineNetLib.label.confidence`); None: the margin calibrated for the context weights
    #: (``LabellingParams.review_margin_nats`` via ``labelling.params_for_context``).
    min_labelling_confidence: float | None = None


@dataclass
class RunResult:
    """Everything a run found; :func:`SpineNetLib.outputs.files.write_results` writes it.

    A plug-in pipeline of the Slicer worker returns one too, filling at
    least ``vertebrae_document``.
    """

    #: The ``spinenet.vertebrae/1`` document (input RAS space).
    vertebrae_document: dict
    #: The ``spinenet.discs/1`` document, or None for a pipeline without a disc stage.
    discs_document: dict | None = None
    #: Evidence maps, not yet written (each knows its file name).
    hotspots: list[HotspotMap] = field(default_factory=list)
    #: Things the user should know (e.g. asked for grades, but the weights have no grading network).
    warnings: list[str] = field(default_factory=list)
    #: Seconds per step, with ``"total"``; the same as in the vertebrae document.
    timings_s: dict[str, float] = field(default_factory=dict)
    #: The vertebrae in canonical coordinates (None when a plug-in did not provide them).
    detection: DetectionResult | None = None
    #: The disc stage's volumes, grades and measurements (None when a plug-in did not provide them).
    discs: DiscResult | None = None
    #: How sure the level labelling is against the best labelling shifted by one level (None when a
    #: plug-in did not provide it); also in the vertebrae document's ``"labelling"`` block.
    labelling_confidence: LabellingConfidence | None = None


def _check_options(options: RunOptions, networks: Networks) -> list:
    """The options a typo can spoil (``sequence``, the hotspot settings), checked before any work so that it
    fails at once; returns the hotspot heads."""
    user_sequence(options.sequence)
    if options.hotspot_heads and networks.grading is not None and not is_torch_module(networks.grading):
        raise InputError(f"hotspot maps need the grader's gradients, which --runtime {networks.runtime} does not "
                         "give: use --runtime torch for them")
    if not options.hotspot_heads:
        return []
    if options.hotspot_method not in METHODS:
        raise InputError(f"unknown hotspot method {options.hotspot_method!r}: use one of {', '.join(METHODS)}")
    if options.hotspot_augmentations < 1:
        raise InputError("the hotspot maps need at least 1 augmentation")
    check_hotspot_precision(options.hotspot_precision)
    return parse_heads(options.hotspot_heads)


def _weighting_to_grade(scan: Scan, vertebrae: list[Vertebra], networks: Networks, options: RunOptions,
                        warning_lists: tuple[list[str], ...]) -> Weighting | None:
    """The scan's weighting where the discs are to be graded (``discs/weighting.py``; None where they are not);
    when the grader is not given the scan, the reason goes into each of ``warning_lists`` (the run's, and
    the discs document's, which the preview's banner shows)."""
    if not options.grade or networks.grading is None:
        return None
    weighting = scan_weighting(scan, vertebrae, options.sequence)
    if not weighting.graded:
        for warnings in warning_lists:
            warnings.append(not_graded_warning(not_graded_reason(weighting)))
    return weighting


def _hotspot_maps(scan: Scan, heads: list, discs: DiscResult, networks: Networks, options: RunOptions,
                  warnings: list[str], progress) -> list[HotspotMap]:
    if not heads:
        return []
    if not options.grade:
        warnings.append("no hotspot maps: they need the grading, which was switched off")
        return []
    if networks.grading is None or discs.grades is None:
        return []  # the warning about the missing grading network, or the scan's weighting, covers the maps too
    if not discs.ivds:
        warnings.append("no hotspot maps: no discs were found")
        return []
    untrained = untrained_heads(networks.grading, heads)
    if untrained:
        which = "that head" if len(untrained) == 1 else "those heads"
        warnings.append(f"no hotspot map for {', '.join(h.column for h in untrained)}: the "
                        f"{networks.weights.source} grader did not train {which} (no graded data), so "
                        "a map would not show where a grade comes from")
        heads = [h for h in heads if h not in untrained]
        if not heads:
            return []
    from SpineNetLib.discs.hotspots import hotspot_maps

    return hotspot_maps(scan, discs.ivds, networks.grading, heads, options.hotspot_method,
                        options.hotspot_augmentations, progress=progress, precision=options.hotspot_precision)


def _labelled_on_its_own(scan: Scan, networks: Networks, labelled_with: dict, params: labelling.LabellingParams,
                         options: RunOptions, progress: ProgressCallback | None) -> tuple[list[Vertebra], bool]:
    """The vertebrae of another series of the exam, detected and labelled as the run's scan, and whether its
    own labelling asks for a review: its margin and the reasons of ``ask_for_review_where_in_doubt`` and
    ``beyond_lumbar_field`` (the orientation check only adds a reason where the margin already asks)."""
    result = detect_and_label(scan, networks, progress=scaled(progress, f"comparing with the exam's series "
                                                                        f"{series_name(scan)}"), **labelled_with)
    confidence, beyond = _own_review(scan, result, networks, params, options)
    return result.vertebrae, confidence is not None and (confidence.needs_review or beyond is not None)


def _own_review(scan: Scan, result: DetectionResult, networks: Networks, params: labelling.LabellingParams,
                options: RunOptions) -> tuple[LabellingConfidence | None, str | None]:
    """The labelling's confidence (None without one) with the review reasons of the labelling itself
    (``ask_for_review_where_in_doubt``; a signal void on the spine's path first: ``label/signal_void.py``), and
    the reason that the chain reaches beyond a lumbar field of view (``beyond_lumbar_field``, with lumbar
    weights), which the caller asks last so that it goes first."""
    in_void = pairs_in_a_void(scan, result.vertebrae) if params.skip_across_gaps else frozenset()
    confidence = confidence_of_vertebrae(result.vertebrae, params, options.min_labelling_confidence, in_void)
    if confidence is None:
        return None, None
    ask_for_review_where_in_doubt(scan, result.vertebrae, result.labelling, confidence)
    ask_for_review_over_a_void(scan, result.vertebrae, result.labelling, confidence)
    return confidence, beyond_lumbar_field(result.vertebrae) if networks.weights.lumbar_only else None


def _ask_for_review_if_misoriented(scan: Scan, result: DetectionResult, networks: Networks,
                                   params: labelling.LabellingParams, confidence: LabellingConfidence) -> None:
    """When the labelling is unsure by its margin, read the same bodies on the image turned head up,
    then mirrored front to back (``label/orientation.py``); if a reading reaches the review margin
    calibrated for these weights, the header probably has that direction wrong: say so first.  Off for
    weights that record no calibrated margin (the official ones), where the default margin would be
    too low a bar for the other reading."""
    calibrated = labelling.calibrated_review_margin(networks.context)
    if calibrated is None or confidence.margin_nats >= confidence.review_margin_nats:
        return
    start = time.perf_counter()
    label = lambda image, bodies: labelling.label_vertebrae(  # noqa: E731
        image, bodies, networks.appearance, networks.context, params, device=networks.device)
    margin_of = lambda labelled: getattr(confidence_of_vertebrae(labelled, params), "margin_nats", None)  # noqa: E731
    found = surer_reoriented(scan, result.vertebrae, label, margin_of, calibrated)
    result.timings_s["labelling"] = result.timings_s.get("labelling", 0.0) + time.perf_counter() - start
    if found is not None:
        error, margin = found
        result.labelling["orientation_doubt"] = {"image_seems": error.seems,
                                                 "margin_nats_set_right": round(margin, 3)}
        ask_for_review(confidence, orientation_warning(error, confidence.margin_nats, margin))


def _ask_for_review_where_a_vertebra_was_missed(confidence: LabellingConfidence | None, vertebrae: list[Vertebra],
                                                discs: DiscResult) -> tuple[list[str], int]:
    """With the discs measured: a review reason for each disc between bodies named consecutive levels that is
    higher than a disc can be (``missed_vertebra_reasons``); the reasons and where they went among the
    labelling's warnings: first, or after the first reason where the labelling asked for a review already."""
    if confidence is None:
        return [], 0
    missed = missed_vertebra_reasons([(vertebrae[d.upper_index].level, vertebrae[d.lower_index].level,
                                       d.mean_height_mm) for d in discs.measurements.discs],
                                     MAX_PLAUSIBLE_DISC_HEIGHT_MM, confidence.warnings)
    at = 1 if confidence.needs_review and missed else 0
    confidence.warnings[at:at] = missed
    confidence.needs_review = confidence.needs_review or bool(missed)
    return missed, at


def _measurement_warnings(scan: Scan, result: DetectionResult, discs: DiscResult, discs_doc: dict) -> list[str]:
    """Measurements that cannot be anatomy, or that rest on an outline to check, as the discs document names
    them; first, bodies of an implausible size (unless the pixel spacing was retried: that has its own reason)."""
    found = [line for d in discs_doc["discs"] for line in d.get("measurement_warnings") or []]
    if "pixel_spacing_factor" not in result.labelling:
        found[:0] = [w for w in [lumbar_body_size_warning(discs.measurements, scan.spacing_mm)] if w is not None]
    return found


def run(scan: Scan, networks: Networks, options: RunOptions | None = None,
        progress: ProgressCallback | None = None) -> RunResult:
    """Detect and label the vertebrae, then the disc stage and the hotspot maps asked for; writes nothing.

    The discs are always cut and measured; they are graded when
    ``options.grade`` and a grading network is loaded (a warning says when
    grading was asked for but the weights have none).  Hotspot maps need the
    grading too.  The labelling's confidence against the best labelling
    shifted by one level (:mod:`SpineNetLib.label.confidence`) goes into
    ``RunResult.labelling_confidence`` and the vertebrae document, and its
    warnings (levels that may be shifted, S1 not found) into the warnings of
    both.  ``progress(done, total, message)`` hears every stage.
    """
    options = options or RunOptions()
    heads = _check_options(options, networks)
    start = time.perf_counter()
    # warnings about the input itself (e.g. a single sagittal slice) travel with the vertebrae
    scan_warnings = [str(w) for w in scan.metadata.get("warnings", [])]
    warnings: list[str] = list(scan_warnings)
    warnings += slow_arithmetic_warnings(networks.precision, networks.device)
    profile = processing_profile(options.profile, networks.weights.source)
    params = profiled_labelling_params(networks.context, options.labelling_params, profile)
    detection_params = profiled_detection_params(options.detection_params, profile)
    labelled_with = dict(detection_params=detection_params, labelling_params=params,
                         retry_pixel_spacing=profile.retry_pixel_spacing,
                         second_detector=networks.s1_outline if profile.refine_s1_outline else None)
    result = detect_and_label(scan, networks, progress=progress, **labelled_with)
    # the confidence is scored with the same penalties as the labelling itself
    confidence, beyond = _own_review(scan, result, networks, params, options)
    if confidence is not None:
        _ask_for_review_if_misoriented(scan, result, networks, params, confidence)
        if options.other_series:   # a second opinion: the exam's other sagittal series, labelled as this one
            began = time.perf_counter()
            result.labelling.update(review_against_other_series(
                scan, result.vertebrae, options.other_series,
                lambda other: _labelled_on_its_own(other, networks, labelled_with, params, options, progress),
                confidence, asks_on_its_own=confidence.needs_review or beyond is not None))
            result.timings_s["other_series"] = time.perf_counter() - began
        if beyond is not None:   # first: what the levels' own reasons cannot show
            ask_for_review(confidence, beyond)
    if profile.refine_s1_outline and networks.s1_outline is not None:   # after the checks, set on the main outlines
        refine_s1_outline(scan, result, networks.s1_outline, detection_params)
    labelling_warnings = list(confidence.warnings) if confidence is not None else []
    if not result.vertebrae:  # never a silent "0 vertebrae": say why, as far as the image tells
        labelling_warnings.insert(0, no_vertebrae_reason(
            scan, result, PIXEL_SPACING_FACTORS_TO_TRY if profile.retry_pixel_spacing else ()))
    left_out = int(result.labelling.get("sacral_segments_left_out", 0))
    if left_out:
        labelling_warnings.append(f"{left_out} lower sacral segment{'s' if left_out > 1 else ''} below S2 "
                                  f"{'were' if left_out > 1 else 'was'} detected and left out "
                                  "(not a vertebral level SpineNet reports)")
    warnings += labelling_warnings
    disc_warnings = [] if profile.discs_across_missed_levels else skipped_discs(result.vertebrae)
    warnings += disc_warnings
    if options.grade and networks.grading is None:
        warnings.append(f"the {networks.weights.source} weights have no grading network: "
                        "disc measurements only, no grades")
    weighting = _weighting_to_grade(scan, result.vertebrae, networks, options, (warnings, disc_warnings))
    discs = grade_discs(scan, result.vertebrae, networks, grade=options.grade,
                        batch_size=options.grading_batch_size, progress=progress,
                        across_missed_levels=profile.discs_across_missed_levels,
                        official_disc_volumes=profile.official_disc_volumes, weighting=weighting)
    missed, at = _ask_for_review_where_a_vertebra_was_missed(confidence, result.vertebrae, discs)
    labelling_warnings[at:at], warnings[len(warnings):] = missed, missed
    discs_doc = discs_document(scan, result.vertebrae, discs.ivds, discs.grades, discs.measurements,
                               discs.grading_status)
    discs_doc["profile"] = profile.name
    measurement_warnings = _measurement_warnings(scan, result, discs, discs_doc)
    disc_warnings += measurement_warnings
    warnings += measurement_warnings
    if discs.grades and reads_one_slice(networks.grading) and scan.voxels.shape[2] > 1:
        disc_warnings.append(SINGLE_SLICE_GRADER_ON_A_VOLUME)
        warnings.append(SINGLE_SLICE_GRADER_ON_A_VOLUME)
    if disc_warnings:
        discs_doc["warnings"] = disc_warnings
    not_trained = discs.grading_status.get("heads_not_trained")
    if not_trained:
        graded = [c for c in GRADE_COLUMNS if c not in not_trained]
        warnings.append(f"the {networks.weights.source} grader grades {', '.join(graded)} only: its other heads "
                        "were not trained (no graded data)")
    hotspot_start = time.perf_counter()
    maps = _hotspot_maps(scan, heads, discs, networks, options, warnings, progress)
    hotspot_timing = {"hotspots": time.perf_counter() - hotspot_start} if maps else {}
    earlier = dict(options.earlier_timings_s)
    result.timings_s = {**earlier, **result.timings_s, **discs.timings_s, **hotspot_timing,
                        "total": sum(earlier.values()) + time.perf_counter() - start}
    vertebrae_doc = vertebrae_document(scan, result, confidence)
    vertebrae_doc["profile"] = profile.name
    vertebrae_doc["weights"] = networks.weights.source
    if networks.precision != "fp32":
        vertebrae_doc["precision"] = networks.precision
    if networks.runtime != "torch":
        vertebrae_doc["runtime"] = networks.runtime
    if scan_warnings or labelling_warnings:
        vertebrae_doc["warnings"] = scan_warnings + labelling_warnings
    return RunResult(
        vertebrae_document=vertebrae_doc,
        discs_document=discs_doc,
        hotspots=maps, warnings=warnings, timings_s=dict(result.timings_s), detection=result, discs=discs,
        labelling_confidence=confidence)
