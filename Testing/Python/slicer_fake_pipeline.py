"""A stand-in pipeline for the Slicer/worker tests: no networks, documents read from files.

Used through the worker's documented hook ``--pipeline slicer_fake_pipeline:run``
(or this file's path).  Options (``--option KEY=VALUE``):

* ``vertebrae`` / ``discs``: JSON documents to return (RAS coordinates, so
  they fit whatever scan the worker read from the same data);
* ``steps``, ``delay``: report that many PROGRESS steps, sleeping ``delay``
  seconds after each (to test Cancel);
* ``fail``: raise an InputError with this message;
* ``hotspot``: ``DISC:HEAD`` - a Gaussian heat map of that disc on the
  scan's input grid, which the worker writes as ``hotspots/DISC_HEAD.nii.gz``.

Like every pipeline it writes no files and returns a
:class:`SpineNetLib.pipeline.RunResult`.

The returned vertebrae document gets an ``input_check`` entry with the scan's
shape and canonical-to-RAS as the worker saw them, so tests can check that
the volume reached SpineNetLib unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from SpineNetLib.core.errors import InputError

#: This pipeline as the worker's ``--pipeline`` option names it (the tests pass it along).
PIPELINE_SPEC = f"{Path(__file__).resolve()}:run"
from SpineNetLib.discs.hotspots import HotspotMap
from SpineNetLib.outputs.documents import disc_polygons
from SpineNetLib.pipeline import RunResult


def _hotspot(scan, centre_ras, name: str) -> HotspotMap:
    ni, nj, nk = scan.input_shape_ijk
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    ras = ijk @ np.asarray(scan.input_ijk_to_ras, float).T
    d2 = np.sum((ras[..., :3] - np.asarray(centre_ras, float)) ** 2, axis=-1)
    heat = np.exp(-d2 / (2 * 6.0 ** 2)).astype(np.float32)
    return HotspotMap(name=name, voxels_kji=heat, ijk_to_ras=np.asarray(scan.input_ijk_to_ras, float))


def run(scan, options: dict, progress) -> RunResult:
    steps, delay = int(options.get("steps", 3)), float(options.get("delay", 0))
    for n in range(steps):
        progress(n + 1, steps, "fake detection")
        if delay:
            time.sleep(delay)
    if options.get("fail"):
        raise InputError(options["fail"])
    vertebrae = json.loads(Path(options["vertebrae"]).read_text(encoding="utf-8"))
    vertebrae["input_check"] = {"shape": list(scan.shape), "canonical_to_ras": np.asarray(scan.canonical_to_ras).tolist(),
                                "input_ijk_to_ras": np.asarray(scan.input_ijk_to_ras).tolist()}
    discs = json.loads(Path(options["discs"]).read_text(encoding="utf-8")) if options.get("discs") else None
    hotspots = []
    if options.get("hotspot"):
        disc, _, head = options["hotspot"].partition(":")
        centre = {d["level"]: d["centre_ras"] for d in disc_polygons(vertebrae)}[disc]
        hotspots.append(_hotspot(scan, centre, f"hotspots/{disc}_{head}.nii.gz"))
    return RunResult(vertebrae_document=vertebrae, discs_document=discs, hotspots=hotspots,
                     warnings=["this is the fake pipeline"])
