"""Detection, labelling and disc grading of a whole scan: the stages glued together.

``load_networks`` resolves and loads the weights once; ``detect_and_label``
runs detection (paper §3.1) and labelling (paper §3.2) on a :class:`Scan` and
returns vertebrae top to bottom, in canonical coordinates, with per-stage
timings.  ``grade_discs`` cuts the disc volumes (paper §3.3), grades them when
a grading network is loaded (paper §3.4) and measures the discs and bodies.
``SpineNetLib.outputs.vertebrae`` and ``SpineNetLib.outputs.discs`` map them back to the
input's RAS space.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from SpineNetLib.weights import checkpoints
from SpineNetLib.detect import vfr as detection
from SpineNetLib.label import labelling
from SpineNetLib.core.errors import InputError, SpineNetError
from SpineNetLib.core.progress import ProgressCallback, scaled
from SpineNetLib.core.results import DetectionResult, Vertebra
from SpineNetLib.core.scan import Scan
from SpineNetLib.weights.resolve import WeightSet, resolve_weights


def choose_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SpineNetError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine")
    try:
        return torch.device(spec)
    except RuntimeError as error:
        raise InputError(f"unknown device {spec!r} (use auto, cpu or cuda)") from error


@dataclass
class Networks:
    """The loaded networks of one weight set, in eval mode on one device."""

    detector: torch.nn.Module
    appearance: torch.nn.Module
    context: torch.nn.Module
    device: torch.device
    weights: WeightSet
    grading: torch.nn.Module | None = None
    load_seconds: float = 0.0
    #: Optional ``predict(patches, boxes)`` used instead of running ``detector``
    #: (e.g. another runtime, or ground-truth "oracle" maps in tests).
    predictor: detection.Predictor | None = None
    extra: dict = field(default_factory=dict)


def load_networks(weights: str | None = "bundled", device: str = "auto", *,
                  trusted_sha256: set[str] | None = None, with_grading: bool = False) -> Networks:
    start = time.perf_counter()
    weight_set = resolve_weights(weights)
    dev = choose_device(device)
    load = lambda kind: checkpoints.load_model(kind, weight_set.path(kind), device=str(dev),  # noqa: E731
                                               trusted_sha256=trusted_sha256)
    grading = load("grading") if (with_grading and weight_set.grading is not None) else None
    return Networks(detector=load("detector"), appearance=load("appearance"), context=load("context"),
                    grading=grading, device=dev, weights=weight_set,
                    load_seconds=time.perf_counter() - start)


def detect_and_label(scan: Scan, networks: Networks, *,
                     detection_params: detection.DetectionParams | None = None,
                     labelling_params: labelling.LabellingParams | None = None,
                     progress: ProgressCallback | None = None) -> DetectionResult:
    """Detect every vertebral body in ``scan`` and label its level."""
    detection_params = detection_params or detection.DetectionParams()
    labelling_params = labelling.params_for_context(networks.context, labelling_params)
    predict = networks.predictor or detection.network_predictor(networks.detector, device=networks.device)
    result = detection.detect_vertebrae(scan, predict, detection_params,
                                        progress=scaled(progress, "detecting vertebrae"))
    start = time.perf_counter()
    if result.vertebrae:
        labelling.label_vertebrae(scan, result.vertebrae, networks.appearance, networks.context,
                                  labelling_params, device=networks.device,
                                  progress=scaled(progress, "labelling levels"))
    result.timings_s["labelling"] = time.perf_counter() - start
    result.labelling = {"repeat_s1_penalty": float(labelling_params.repeat_s1_penalty)}
    return result


@dataclass
class DiscResult:
    """The disc stage's results: volumes, grades (None when not graded), measurements, status."""

    ivds: list
    grades: list | None
    measurements: object
    #: {"status": "done", "weights": ...} or {"status": "not run", "reason": "..."}.
    grading_status: dict
    timings_s: dict[str, float] = field(default_factory=dict)


def grade_discs(scan: Scan, vertebrae: list[Vertebra], networks: Networks, *, grade: bool = True,
                batch_size: int = 4, progress: ProgressCallback | None = None) -> DiscResult:
    """Disc volumes, gradings (if ``grade`` and ``networks.grading``) and measurements.

    Without a grading network (no grading weights in the set) or with
    ``grade=False`` the discs are still cut and measured; the status says why
    they were not graded.
    """
    from SpineNetLib.discs.grading import grade_volumes
    from SpineNetLib.discs.extraction import extract_ivd_volumes
    from SpineNetLib.discs.measurements import measure_spine

    timings: dict[str, float] = {}
    start = time.perf_counter()
    ivds = extract_ivd_volumes(scan, vertebrae)
    timings["disc_volumes"] = time.perf_counter() - start
    start = time.perf_counter()
    measurements = measure_spine(scan, vertebrae)
    timings["measurements"] = time.perf_counter() - start
    grades = None
    if not grade:
        status = {"status": "not run", "reason": "grading was switched off (--no-grade)"}
    elif networks.grading is None:
        status = {"status": "not run",
                  "reason": f"no grading weights in the {networks.weights.source!r} weight set "
                            "(add grading.pt or the official grading/ folder)"}
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
        status = {"status": "done", "weights": str(weights_path) if weights_path else networks.weights.source}
        timings["grading"] = time.perf_counter() - start
    return DiscResult(ivds=ivds, grades=grades, measurements=measurements, grading_status=status,
                      timings_s=timings)
