"""preview.png and hotspots.png: the picture of a result that `spinenet run`, the worker and the batch script write.

The networks are the phantom "oracles" (Testing/Python/oracles.py): detection and labelling follow
the phantom's ground truth whatever the voxels hold, so a test may paint the voxels to check where
the picture puts them.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from SpineNetLib import pipeline
from SpineNetLib.apps import cli
from SpineNetLib.core.levels import shifted_by
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.inputs.writers import write_image
from SpineNetLib.outputs import files, preview
from SpineNetLib.outputs.documents import mid_polygon, next_best_reading, vertebrae_document_from_truth
from SpineNetLib.synthetic.phantom import make_phantom

from batch_script import batch_script
from oracles import oracle_networks
from slicer_fake_pipeline import _hotspot

FAKE = f"{Path(__file__).resolve().parent / 'slicer_fake_pipeline.py'}:run"


@pytest.fixture(scope="module")
def phantom():
    """Reaches S1, with image below it: the labelling is sure and has no warning (448 rows would end
    8 mm below S1, which is said in a note)."""
    return make_phantom(fov="lumbar", pixel_spacing=(0.6, 0.7), shape=(480, 400), n_slices=9, rotation_deg=8.0,
                        seed=3)


@pytest.fixture(scope="module")
def small_phantom():
    """T12..L5, 1 mm pixels (256 px: upscaled in the preview); S1 is not found, a labelling warning."""
    return make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.0, 1.0), n_slices=5)


def _run(phantom, image, out, monkeypatch, *extra) -> Path:
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    assert cli.main(["run", str(image), "-o", str(out), "--quiet", *extra]) == 0
    return out


def _picture(path: Path):
    """(RGB array, PNG text chunks, slice box (left, top, width, height), scale (x, y), canonical slice)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        text = dict(image.text)
        pixels = np.asarray(image.convert("RGB"))
    box = tuple(int(v) for v in text["SpineNet slice box"].split())
    scale = tuple(float(v) for v in text["SpineNet pixel scale"].split())
    return pixels, text, box, scale, int(text["SpineNet slice"])


def _painted(phantom, tmp_path, bright) -> Path:
    """The phantom's input image with every voxel where ``bright(ras)`` set to 1000, the others to 100."""
    kji = np.stack(np.meshgrid(*(np.arange(n) for n in phantom.voxels_kji.shape), indexing="ij"), axis=-1)
    ijk = np.concatenate([kji[..., ::-1], np.ones(kji.shape[:-1] + (1,))], axis=-1).astype(float)
    ras = (ijk @ np.asarray(phantom.ijk_to_ras, float).T)[..., :3]
    voxels = np.where(bright(ras, ras.reshape(-1, 3).mean(axis=0)), 1000.0, 100.0).astype(np.float32)
    return write_image(voxels, phantom.ijk_to_ras, tmp_path / "painted.nii.gz")


# --------------------------------------------------------------------------- spinenet run

def test_run_writes_a_legible_preview_with_the_other_files(phantom, tmp_path, monkeypatch):
    out = _run(phantom, phantom.write_nifti(tmp_path / "scan.nii.gz"), tmp_path / "out", monkeypatch)
    assert sorted(p.name for p in out.iterdir()) == ["discs.csv", "discs.json", "preview.png", "result.json",
                                                     "vertebrae.csv", "vertebrae.json"]
    manifest = json.loads((out / "result.json").read_text())
    assert manifest["images"] == ["preview.png"]
    pixels, text, (left, top, width, height), _, shown = _picture(out / "preview.png")
    assert height >= preview.MIN_SLICE_HEIGHT_PX and pixels.shape[0] >= 800
    assert "7 vertebrae (T12..S1)" in text["Description"] and "anterior left, superior up" in text["Description"]
    # square millimetre pixels: 480 rows of 0.6 mm and 400 columns of 0.7 mm
    assert width / height == pytest.approx((400 * 0.7) / (480 * 0.6), rel=0.01)
    # the mid-sagittal slice: every vertebra is outlined on the middle of the 9 slices
    assert shown == 4
    # no labelling warning: no banner between the header and the slice
    assert not _has_colour(pixels[:top], preview.BANNER_COLOUR)


def test_no_preview_writes_no_picture(small_phantom, tmp_path, monkeypatch):
    out = _run(small_phantom, small_phantom.write_nifti(tmp_path / "scan.nii.gz"), tmp_path / "out", monkeypatch,
               "--no-preview")
    assert not (out / "preview.png").exists() and (out / "vertebrae.json").is_file()
    assert json.loads((out / "result.json").read_text())["images"] == []


def test_small_scans_are_upscaled(small_phantom, tmp_path, monkeypatch):
    out = _run(small_phantom, small_phantom.write_nifti(tmp_path / "scan.nii.gz"), tmp_path / "out", monkeypatch)
    _, _, (_, _, width, height), scale, _ = _picture(out / "preview.png")
    assert height >= preview.MIN_SLICE_HEIGHT_PX and scale[0] == pytest.approx(scale[1]) and scale[1] > 3


@pytest.mark.parametrize("side", ["anterior", "superior"])
def test_anterior_is_left_and_superior_is_up(small_phantom, tmp_path, monkeypatch, side):
    """Voxels brighter on the anterior (+A) or superior (+S) half of the body, in RAS: the left or the top
    half of the shown slice is the bright one."""
    axis = {"anterior": 1, "superior": 2}[side]
    image = _painted(small_phantom, tmp_path, lambda ras, centre: ras[..., axis] > centre[axis])
    out = _run(small_phantom, image, tmp_path / "out", monkeypatch, "--no-grade")
    pixels, _, (left, top, width, height), _, _ = _picture(out / "preview.png")
    grey = pixels[top:top + height, left:left + width].mean(axis=-1)
    if side == "anterior":
        first, second = grey[:, : width // 2].mean(), grey[:, width // 2:].mean()
    else:
        first, second = grey[: height // 2].mean(), grey[height // 2:].mean()
    assert first > 150 > 100 > second


def _has_colour(pixels: np.ndarray, colour, tolerance: int = 40) -> bool:
    return bool(np.any(np.all(np.abs(pixels.astype(int) - np.asarray(colour)) <= tolerance, axis=-1)))


def test_outlines_are_drawn_where_the_vertebrae_are(phantom, tmp_path, monkeypatch):
    image = phantom.write_nifti(tmp_path / "scan.nii.gz")
    out = _run(phantom, image, tmp_path / "out", monkeypatch)
    pixels, _, (left, top, width, height), (sx, sy), shown = _picture(out / "preview.png")
    scan = load_scan(image)
    to_canonical = np.linalg.inv(scan.canonical_to_ras)
    vertebrae = json.loads((out / "vertebrae.json").read_text())["vertebrae"]
    checked = 0
    for vertebra in vertebrae:
        for polygon in vertebra["polygons"]:
            rcs = (np.c_[polygon["corners_ras"], np.ones(4)] @ to_canonical.T)[:, :3]
            if round(float(rcs[:, 2].mean())) != shown:
                continue
            xy = np.c_[left + (rcs[:, 1] + 0.5) * sx - 0.5, top + (rcs[:, 0] + 0.5) * sy - 0.5]
            for a, b in zip(xy, np.roll(xy, -1, axis=0)):        # each edge, at a quarter and three quarters
                for t in (0.25, 0.75):
                    x, y = np.rint(a + t * (b - a)).astype(int)
                    near = pixels[y - 3:y + 4, x - 3:x + 4]
                    assert _has_colour(near, preview.OUTLINE_COLOUR, 30), (vertebra["level"], x, y)
            checked += 1
    assert checked == len(vertebrae) == 7
    # and nowhere near the left edge of the slice (in front of the spine)
    assert not _has_colour(pixels[top:top + height, left:left + width // 5], preview.OUTLINE_COLOUR, 30)


def test_an_outline_from_a_weaker_detection_is_dashed_and_said_so(phantom):
    """The outline a weaker detection drew (vertebrae.json's ``outline_from``) is rougher: it is drawn dashed,
    about half of each edge in the outline colour, where the others are solid, with a note at the slice's
    foot; without such an outline there is no note."""
    scan = phantom.scan
    vertebrae = vertebrae_document_from_truth(scan, phantom.vertebrae)
    to_canonical = np.linalg.inv(scan.canonical_to_ras)

    def drawn(document):
        image = Image.open(io.BytesIO(preview.render_preview(scan, document))).convert("RGB")
        pixels, shown = np.asarray(image), int(image.info["SpineNet slice"])
        left, top, width, height = (int(v) for v in image.info["SpineNet slice box"].split())
        sx, sy = (float(v) for v in image.info["SpineNet pixel scale"].split())
        coloured = []   # per vertebra: the share of points along its edges in the outline colour
        for vertebra in document["vertebrae"]:
            on_slices = [(np.c_[p["corners_ras"], np.ones(4)] @ to_canonical.T)[:, :3] for p in vertebra["polygons"]]
            rcs = next(rcs for rcs in on_slices if round(float(rcs[:, 2].mean())) == shown)
            xy = np.c_[left + (rcs[:, 1] + 0.5) * sx - 0.5, top + (rcs[:, 0] + 0.5) * sy - 0.5]
            points = [np.rint(a + t * (b - a)).astype(int) for a, b in zip(xy, np.roll(xy, -1, axis=0))
                      for t in np.linspace(0.1, 0.9, 41)]
            coloured.append(np.mean([_has_colour(pixels[y - 1:y + 2, x - 1:x + 2], preview.OUTLINE_COLOUR, 30)
                                     for x, y in points]))
        foot = pixels[top + height - height // 12:top + height, left:left + width // 2]
        return coloured, _has_colour(foot, preview.OUTLINE_COLOUR, 30)

    solid, note = drawn(vertebrae)
    assert min(solid) > 0.9 and not note
    vertebrae["vertebrae"][3]["outline_from"] = "weaker detection"
    dashed, note = drawn(vertebrae)
    assert 0.3 < dashed[3] < 0.8 and note, dashed
    assert min(dashed[:3] + dashed[4:]) > 0.9


def test_the_levels_of_a_series_of_the_exam_that_disagrees_are_drawn_at_its_vertebrae(small_phantom):
    """Another series of the exam that names the vertebrae otherwise: a dot and its level at each of its
    centres, in the other series' colour; an agreeing series is not drawn; where the scan took that series'
    levels, its own levels are drawn so instead."""
    scan = small_phantom.scan
    vertebrae = vertebrae_document_from_truth(scan, small_phantom.vertebrae)
    centres = [v["centroid_ras"] for v in vertebrae["vertebrae"]]
    levels = {"series": "'T1 SAG' (series 3)", "vertebrae": [{"level": "X", "centroid_ras": c} for c in centres]}
    own = [v["level"] for v in vertebrae["vertebrae"]]
    for disagreeing, taken, drawn in (([], {}, False), (["'T1 SAG' (series 3)"], {}, True),
                                      ([], {"series": levels["series"], "shift": 1, "own_levels": own}, True)):
        vertebrae["labelling"] = {"confidence": 0.99, "needs_review": bool(disagreeing or taken), "warnings": [],
                                  "compared_with_series": [levels["series"]], "disagreeing_series": disagreeing,
                                  "other_series_levels": [levels], **({"levels_taken_from_series": taken}
                                                                      if taken else {})}
        image = Image.open(io.BytesIO(preview.render_preview(scan, vertebrae))).convert("RGB")
        pixels = np.asarray(image)
        left, top, _, _ = (int(v) for v in image.info["SpineNet slice box"].split())
        sx, sy = (float(v) for v in image.info["SpineNet pixel scale"].split())
        to_canonical = np.linalg.inv(scan.canonical_to_ras)
        for centre in centres:
            row, col, _ = (np.r_[centre, 1.0] @ to_canonical.T)[:3]
            x, y = round(left + (col + 0.5) * sx - 0.5), round(top + (row + 0.5) * sy - 0.5)
            assert _has_colour(pixels[y - 2:y + 3, x - 2:x + 3], preview.OTHER_SERIES_COLOUR, 30) is drawn


def test_where_the_levels_need_review_the_next_best_labelling_is_drawn_below_each_centre(small_phantom):
    """A labelling that asks for a review: "or L2" below the centre of each vertebra that its best shifted
    alternative names otherwise, in its own colour; nothing once the levels need no review or a reader
    corrected them."""
    scan = small_phantom.scan
    vertebrae = vertebrae_document_from_truth(scan, small_phantom.vertebrae)
    own = [v["level"] for v in vertebrae["vertebrae"]]
    shifted = shifted_by(own, 1)
    markers = []   # 40 % of the way from each centre down to the middle of the lower edge of its mid outline
    for v in vertebrae["vertebrae"]:
        corners = np.asarray(mid_polygon(v)["corners_ras"])
        markers.append(np.add(v["centroid_ras"], 0.4 * ((corners[1] + corners[2]) / 2 - v["centroid_ras"])))
    for block, drawn in (({"needs_review": True}, True), ({"needs_review": False}, False),
                         ({"needs_review": True, "corrected_by_user": True}, False)):
        vertebrae["labelling"] = {"confidence": 1.0, "warnings": [], "shifted_alternative": shifted, **block}
        image = Image.open(io.BytesIO(preview.render_preview(scan, vertebrae))).convert("RGB")
        pixels = np.asarray(image)
        left, top, _, height = (int(v) for v in image.info["SpineNet slice box"].split())
        sx, sy = (float(v) for v in image.info["SpineNet pixel scale"].split())
        size = max(18, round(height / 45))   # the preview's font size
        to_canonical = np.linalg.inv(scan.canonical_to_ras)
        for marker in markers:
            row, col, _ = (np.r_[marker, 1.0] @ to_canonical.T)[:3]
            x, y = round(left + (col + 0.5) * sx - 0.5), round(top + (row + 0.5) * sy - 0.5)
            near = pixels[y - size // 2:y + size // 2, x - 2 * size:x + 2 * size]
            assert _has_colour(near, preview.NEXT_BEST_LEVEL_COLOUR, 30) is drawn
        assert _has_colour(pixels, preview.NEXT_BEST_LEVEL_COLOUR, 30) is drawn


def test_the_next_best_reading_is_that_of_the_scans_own_levels_and_only_where_they_differ():
    """A local alternative (one body renamed) gives that body only; an alternative that does not name the
    vertebrae one for one, and levels taken from another series (whose alternative is of the scan's own
    levels, drawn as that reading), give none."""
    vertebrae = [{"level": level, "centroid_ras": [0.0, 0.0, -30.0 * k]} for k, level in enumerate(["L4", "L5", "S1"])]
    doc = {"vertebrae": vertebrae,
           "labelling": {"needs_review": True, "shifted_alternative": ["L4", "L5", "L5"]}}
    assert next_best_reading(doc) == {"series": "the next best labelling",
                                      "vertebrae": [{"level": "L5", "centroid_ras": [0.0, 0.0, -60.0], "index": 2,
                                                     "marker_ras": [0.0, 0.0, -60.0]}]}
    doc["labelling"]["shifted_alternative"] = ["L5", "S1"]
    assert next_best_reading(doc) is None
    doc["labelling"].update(shifted_alternative=["L3", "L4", "L5"],
                            levels_taken_from_series={"series": "'T1' (series 3)", "shift": 1,
                                                      "own_levels": ["L3", "L4", "L5"]})
    assert next_best_reading(doc) is None
    del doc["labelling"]["levels_taken_from_series"]
    assert [v["level"] for v in next_best_reading(doc)["vertebrae"]] == ["L3", "L4", "L5"]


def test_a_labelling_warning_shows_as_a_banner(small_phantom, tmp_path, monkeypatch):
    out = _run(small_phantom, small_phantom.write_nifti(tmp_path / "scan.nii.gz"), tmp_path / "out", monkeypatch)
    vertebrae = json.loads((out / "vertebrae.json").read_text())
    assert vertebrae["labelling"]["warnings"], "this phantom stops at L5: S1 is not found"
    pixels, _, (_, top, _, _), _, _ = _picture(out / "preview.png")
    banner = np.all(pixels[:top] == preview.BANNER_COLOUR, axis=-1)
    rows = np.flatnonzero(banner.mean(axis=1) > 0.5)          # rows mostly banner-coloured, the text aside
    assert len(rows) >= 20 and rows.max() == top - 1          # right above the slice


def test_levels_that_need_review_are_said_first():
    doc = {"labelling": {"needs_review": True, "warnings": ["levels may be shifted by one (confidence 0.62)",
                                                            "S1 not found"]},
           "warnings": ["levels may be shifted by one (confidence 0.62)", "S1 not found"]}
    assert preview.banner_lines(doc, {"warnings": ["no disc between L3 and L5"]}) == [
        "LEVELS NEED REVIEW", "Levels may be shifted by one (confidence 0.62)", "S1 not found",
        "No disc between L3 and L5"]
    corrected = {"labelling": {"needs_review": True, "corrected_by_user": True, "warnings": []}}
    assert preview.banner_lines(corrected) == [] and preview.banner_lines({}) == []


def test_the_header_says_whether_a_reader_corrected_or_confirmed_the_levels():
    import types

    from SpineNetLib.outputs.documents import apply_level_correction

    scan = types.SimpleNamespace(n_slices=5, input_slice_index=lambda s: s)
    doc = {"vertebrae": [{"level": level} for level in ("L3", "L4", "L5")],
           "labelling": {"confidence": 0.6, "needs_review": True, "warnings": ["levels may be shifted by one"]}}
    header = lambda d: preview._header_text(scan, d, None, 2)  # noqa: E731
    assert header(doc).startswith("SpineNet: 3 vertebrae (L3..L5); sagittal slice 3 of 5")
    assert "(levels corrected by hand)" in header(apply_level_correction(doc, 2, "S1")[0])
    assert "(levels confirmed by hand)" in header(apply_level_correction(doc, 2, "L5")[0])


# --------------------------------------------------------------------------- grades

def test_grades_are_shown_compactly_whatever_heads_are_there():
    columns = {"Pfirrmann": {"classes": ["1: normal", "2: ...", "3: ...", "4: ...", "5: collapsed"]},
               "Herniation": {"classes": ["0: absent", "1: present"]}}
    full = {"grades": {"Pfirrmann": {"value": 3, "probabilities": [0.01, 0.1, 0.81, 0.07, 0.01]},
                       "Herniation": {"value": 1, "probabilities": [0.13, 0.87]},
                       "DiscNarrowing": {"value": 1, "probabilities": [0.9, 0.05, 0.03, 0.02]},
                       "UpperEndplateDefect": {"value": 1, "probabilities": [0.3, 0.7]},
                       "LowerMarrowChange": {"value": 0, "probabilities": [0.8, 0.2]}}}
    # main grades first, then abnormal findings; at most three
    assert preview.disc_grade_texts(full, columns) == ["Pfirrmann 3 (81 %)", "Herniation yes (87 %)",
                                                       "Upper endplate defect yes (70 %)"]
    # the bundled grader grades herniation only; probabilities may be missing
    assert preview.disc_grade_texts({"grades": {"Herniation": {"value": 0, "probabilities": [0.9, 0.1]}}}, {}) == \
        ["Herniation no (90 %)"]
    assert preview.disc_grade_texts({"grades": {"Pfirrmann": {"value": 2}}}, columns) == ["Pfirrmann 2"]
    assert preview.disc_grade_texts({"grades": {}}, columns) == []
    assert preview.disc_grade_texts({"grades": {"Pfirrmann": {"value": None}, "Herniation": "x"}}, columns) == []


def test_graded_discs_and_odd_inputs_still_give_a_picture(small_phantom):
    scan = small_phantom.scan
    vertebrae = vertebrae_document_from_truth(scan, small_phantom.vertebrae)
    discs = {"schema": "spinenet.discs/1", "grading": {"status": "done"}, "discs": [
        {"level": "L4-L5", "centre_ras": scan.xy_to_ras(small_phantom.discs[-1].centre_xy, 2)[0].tolist(),
         "grades": {"Herniation": {"value": 1, "probabilities": [0.2, 0.8]}}},
        {"level": "L5-S1", "centre_ras": None, "grades": {}}]}
    assert Image.open(io.BytesIO(preview.render_preview(scan, vertebrae, discs))).size[1] >= 800
    # no vertebrae, a constant scan, a scan of NaN
    for voxels in (np.full(scan.shape, 7.0, np.float32), np.full(scan.shape, np.nan, np.float32)):
        blank = type(scan)(**{**scan.__dict__, "voxels": voxels})
        png = preview.render_preview(blank, {"vertebrae": []}, None)
        with Image.open(io.BytesIO(png)) as image:
            assert "no vertebrae found" in image.text["Description"] and image.size[1] >= 800


# --------------------------------------------------------------------------- hotspots and the file set

def _result(phantom, hotspots=()):
    result = pipeline.run(phantom.scan, oracle_networks(phantom), pipeline.RunOptions(grade=False))
    centres = {d["level"]: d["centre_ras"] for d in result.discs_document["discs"]}
    result.hotspots = [_hotspot(phantom.scan, centres[disc], f"hotspots_{head}.nii.gz") for disc, head in hotspots]
    return result


def test_hotspot_maps_get_their_own_picture(small_phantom, tmp_path):
    result = _result(small_phantom, [("L3-L4", "Pfirrmann"), ("L1-L2", "Herniation")])
    files.write_results(tmp_path, result, scan=small_phantom.scan)
    assert json.loads((tmp_path / "result.json").read_text())["images"] == ["hotspots.png", "preview.png"]
    with Image.open(tmp_path / "hotspots.png") as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    # the map's colour (red to yellow) over the grey disc slices
    warm = (pixels[..., 0] > 200) & (pixels[..., 0] - pixels[..., 2] > 120) & (pixels[..., 1] > 100)
    assert warm.sum() > 1000
    files.write_results(tmp_path / "none", _result(small_phantom), scan=small_phantom.scan)
    assert not (tmp_path / "none" / "hotspots.png").exists() and (tmp_path / "none" / "preview.png").is_file()


def test_the_preview_is_part_of_the_atomic_file_set(small_phantom, tmp_path, monkeypatch):
    result = _result(small_phantom)
    files.write_results(tmp_path, result, scan=small_phantom.scan)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result.vertebrae_document["vertebrae"] = result.vertebrae_document["vertebrae"][:-1]
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(target).name == "preview.png" and str(source).endswith(".part"):   # the new picture only
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError):
        files.write_results(tmp_path, result, scan=small_phantom.scan)
    # the earlier run's files, all of them, as they were; nothing half-written
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.setattr(files.os, "replace", real_replace)

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(files, "result_images", broken)
    with pytest.raises(RuntimeError):
        files.write_results(tmp_path / "new", result, scan=small_phantom.scan)
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


# --------------------------------------------------------------------------- worker and batch script

def test_the_batch_script_and_worker_write_the_same_picture(small_phantom, tmp_path, capsys):
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(vertebrae_document_from_truth(small_phantom.scan, small_phantom.vertebrae)))
    image = small_phantom.write_nifti(tmp_path / "scan.nii.gz")
    batch = batch_script()
    common = ["--input", str(image), "--quiet", "--no-scene", "--pipeline", FAKE, "--option", f"vertebrae={truth}"]
    assert batch.main(common + ["--output", str(tmp_path / "out")]) == 0
    assert "preview.png" in capsys.readouterr().out
    pixels, text, box, _, _ = _picture(tmp_path / "out" / "preview.png")
    assert "6 vertebrae (T12..L5)" in text["Description"] and box[3] >= 800
    assert batch.main(common + ["--output", str(tmp_path / "plain"), "--no-preview"]) == 0
    assert not (tmp_path / "plain" / "preview.png").exists() and (tmp_path / "plain" / "vertebrae.json").is_file()
