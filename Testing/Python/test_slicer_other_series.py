"""The Slicer panel checks a volume's levels against the other sagittal volumes of its exam in the scene, as
`spinenet run` checks an exam folder's series (SpineNetLib/label/other_series.py).

Slicer's DICOM database places each volume in its exam (StudyInstanceUID, FrameOfReferenceUID); slicer-core
has none, so a stand-in answers per series. The run goes through the worker's entry point in process with
the default pipeline; the networks are oracles (exact levels) unless a test makes one series name its
vertebrae a level off.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("slicer")
pytest.importorskip("PySide6")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer_standins as standins  # noqa: E402
from PySide6 import QtWidgets  # noqa: E402

from SpineNetLib import pipeline  # noqa: E402
from SpineNetLib.core.levels import LEVELS_TOP_DOWN  # noqa: E402
from SpineNetLib.slicer import mrml  # noqa: E402
from SpineNetLib.synthetic.phantom import make_phantom  # noqa: E402

from oracles import name_series_a_level_lower, oracle_networks  # noqa: E402

STUDY, FRAME, OTHER_FRAME = "1.2.826.0.1.49.1", "1.2.826.0.1.49.2", "1.2.826.0.1.49.9"
#: Volume name -> (first instance UID, the DICOM tags Slicer's database holds for its series).
SERIES = {
    "4: T2 SAG": ("1.2.4.1", {"0020,000E": "1.2.4", "0020,0011": "4", "0008,103E": "T2 SAG",
                              "0018,0081": "95", "0018,0080": "3500", "0020,0052": FRAME}),
    "3: T1 SAG": ("1.2.3.1", {"0020,000E": "1.2.3", "0020,0011": "3", "0008,103E": "T1 SAG",
                              "0018,0081": "10", "0018,0080": "550", "0020,0052": FRAME}),
    "5: STIR SAG": ("1.2.5.1", {"0020,000E": "1.2.5", "0020,0011": "5", "0008,103E": "STIR SAG",
                                "0018,0081": "60", "0018,0080": "4000", "0018,0082": "150", "0020,0052": FRAME}),
    "4: T2 SAG (loaded twice)": ("1.2.4.1", {}),
    "1: SAG LOC": ("1.2.1.1", {"0020,000E": "1.2.1", "0020,0011": "1", "0008,103E": "SAG LOC",
                               "0008,0008": "ORIGINAL\\PRIMARY\\LOCALIZER", "0020,0052": FRAME}),
    "2: SmartSurvey": ("1.2.2.1", {"0020,000E": "1.2.2", "0020,0011": "2", "0008,103E": "SmartSurvey",
                                   "0008,0008": "ORIGINAL\\PRIMARY\\M\\FFE", "0020,0052": FRAME}),
    "7: T1 SAG elsewhere": ("1.2.7.1", {"0020,000E": "1.2.7", "0020,0011": "7", "0008,103E": "T1 SAG elsewhere",
                                        "0018,0081": "10", "0018,0080": "550", "0020,0052": OTHER_FRAME}),
    "from a file": (None, {}),
}


class _SeriesDatabase:
    """Slicer's DICOM database (ctkDICOMDatabase.instanceValue) answering per series."""

    def __init__(self, values_by_instance):
        self.values_by_instance = values_by_instance

    def instanceValue(self, uid, tag):
        return self.values_by_instance.get(uid, {}).get(tag, "")


@pytest.fixture()
def exam(monkeypatch):
    """(module, scene, phantom, volumes by name): one phantom as the series of :data:`SERIES` in one scene,
    with oracle networks."""
    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=5)
    module, scene, *nodes = standins.module_on_new_scene(monkeypatch, phantom.voxels_kji, phantom.ijk_to_ras,
                                                         names=tuple(SERIES))
    volumes = dict(zip(SERIES, nodes))
    values = {}
    for name, (uid, tags) in SERIES.items():
        if uid:
            volumes[name].SetAttribute("DICOM.instanceUIDs", uid)
            values.setdefault(uid, {"0008,0060": "MR", "0020,000D": STUDY, "0018,0020": "SE", **tags})
    monkeypatch.setattr(mrml.slicer, "dicomDatabase", _SeriesDatabase(values), raising=False)
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    return module, scene, phantom, volumes


def _labelling(logic, volume):
    vertebrae, _, _ = logic.documents(volume)
    return vertebrae["labelling"]


def test_the_exams_other_sagittal_volumes_are_compared_by_series_number(exam):
    """The T1 and STIR of the T2's exam are labelled too and agree: recorded, no review; the same series
    loaded twice, two scouts (by ImageType, by name), a series of another frame of reference and a volume from a
    file are left out."""
    module, scene, phantom, volumes = exam
    t2 = volumes["4: T2 SAG"]
    assert [n.GetName() for n in mrml.exam_volumes(t2, 3)] == ["3: T1 SAG", "5: STIR SAG"]
    assert mrml.exam_volumes(t2, 1) == [volumes["3: T1 SAG"]]
    assert mrml.exam_volumes(volumes["from a file"], 3) == []
    logic = module.SpineNetLogic(scene=scene)
    heard = []
    logic.runSynchronously(t2, grading=False, progress=lambda done, total, message: heard.append(message))
    labelling = _labelling(logic, t2)
    assert labelling["compared_with_series"] == ["'T1 SAG' (series 3)", "'STIR SAG' (series 5)"]
    # the progress bar says what the seconds of each other series go to
    assert "comparing with the exam's series 'STIR SAG' (series 5)" in heard
    assert labelling["needs_review"] is False and not any("series" in w for w in labelling["warnings"])
    assert logic.labellingStatus(t2)[0].endswith(
        "The exam's series 'T1 SAG' (series 3) and 'STIR SAG' (series 5) name the vertebrae alike.")
    assert mrml.result_nodes(scene, t2, "other-series-levels") == []   # agreeing levels are not drawn twice
    logic.runSynchronously(t2, grading=False, compare_series=False)
    assert "compared_with_series" not in _labelling(logic, t2)


def test_a_volume_of_the_exam_a_level_off_asks_for_a_review_in_the_panel(exam, monkeypatch):
    """The T1 labelled one level lower: the T2's levels stay its own, yet ask for a review, with the T1's
    series and the vertebra in the warning, as `spinenet run` says it."""
    module, scene, phantom, volumes = exam
    name_series_a_level_lower(monkeypatch, "T1 SAG")
    logic = module.SpineNetLogic(scene=scene)
    t2 = volumes["4: T2 SAG"]
    logic.runSynchronously(t2, grading=False)
    labelling = _labelling(logic, t2)
    top = phantom.levels[0]
    expected = (f"levels may be shifted: the series 'T1 SAG' (series 3) of the same exam names the vertebra {top} "
                f"here {LEVELS_TOP_DOWN[LEVELS_TOP_DOWN.index(top) + 1]} ({len(phantom.levels)} vertebrae differ); "
                "one of the two series is named wrongly")
    assert labelling["needs_review"] is True and labelling["warnings"][0] == expected
    text, review = logic.labellingStatus(t2)
    assert review is True and expected[:1].upper() + expected[1:] in text
    assert text.endswith(module.NEXT_BEST_SHOWN)     # the scene shows the next best labelling too (below)
    # the T1's levels shown on the T2: one point per vertebra, at the T2's own vertebra, a level lower
    (shown,) = mrml.result_nodes(scene, t2, "other-series-levels")
    assert shown.GetName() == "4: T2 SAG SpineNet levels of 'T1 SAG' (series 3)"
    centroids = mrml.result_nodes(scene, t2, "centroids")[0]
    assert [shown.GetNthControlPointLabel(n) for n in range(shown.GetNumberOfControlPoints())] == \
        [LEVELS_TOP_DOWN[LEVELS_TOP_DOWN.index(level) + 1] for level in phantom.levels]
    for n in range(shown.GetNumberOfControlPoints()):
        assert np.allclose(shown.GetNthControlPointPositionVector(n), centroids.GetNthControlPointPositionVector(n),
                           atol=0.5)
    parameters = logic.getParameterNode()
    parameters.SetNodeReferenceID("InputVolume", t2.GetID())
    logic.updateResultReferences(parameters)
    assert parameters.GetNodeReference("ResultOtherSeriesLevels") is shown
    # its own next best labelling is shown too, since the levels need review
    (next_best,) = mrml.result_nodes(scene, t2, "next-best-levels")
    assert parameters.GetNodeReference("ResultNextBestLevels") is next_best
    vertebrae, _, _ = logic.documents(t2)
    assert [v["level"] for v in vertebrae["vertebrae"]] == phantom.levels


def test_an_unsure_volume_takes_the_levels_of_the_exams_sure_volumes_only_where_they_all_agree(exam, monkeypatch):
    """The T2's own labelling asks for a review; the T1, sure of itself, names every vertebra a level lower. While
    the STIR, sure too, names them as the T2 does, the T2 keeps its levels (the T1 is said to disagree); with the
    STIR a level lower as well, the T2 takes their levels: its points in the scene and its table carry them, and
    the levels line says whose they are."""
    module, scene, phantom, volumes = exam
    name_series_a_level_lower(monkeypatch, "T1 SAG", unsure=("T2 SAG",))
    logic = module.SpineNetLogic(scene=scene)
    t2 = volumes["4: T2 SAG"]
    logic.runSynchronously(t2, grading=False)
    labelling = _labelling(logic, t2)
    assert "levels_taken_from_series" not in labelling and labelling["disagreeing_series"] == ["'T1 SAG' (series 3)"]
    assert [v["level"] for v in logic.documents(t2)[0]["vertebrae"]] == phantom.levels
    name_series_a_level_lower(monkeypatch, "STIR SAG")
    logic.runSynchronously(t2, grading=False)
    labelling = _labelling(logic, t2)
    lower = [LEVELS_TOP_DOWN[LEVELS_TOP_DOWN.index(level) + 1] for level in phantom.levels]
    assert labelling["levels_taken_from_series"]["series"] == "'T1 SAG' (series 3)"
    assert labelling["needs_review"] is True and labelling["disagreeing_series"] == []
    centroids = mrml.result_nodes(scene, t2, "centroids")[0]
    assert [centroids.GetNthControlPointLabel(n) for n in range(centroids.GetNumberOfControlPoints())] == lower
    text, review = logic.labellingStatus(t2)
    assert review is True and "Levels taken from the series 'T1 SAG' (series 3) of the same exam" in text
    # the other reading on this volume: its own levels, in magenta at its vertebrae
    (own,) = mrml.result_nodes(scene, t2, "other-series-levels")
    assert own.GetName() == "4: T2 SAG SpineNet levels of this series on its own"
    assert [own.GetNthControlPointLabel(n) for n in range(own.GetNumberOfControlPoints())] == phantom.levels


def test_the_panel_setting_reaches_the_run_and_the_parameter_node(exam, tmp_path):
    module, scene, phantom, volumes = exam
    parent = QtWidgets.QWidget()
    widget = module.SpineNetWidget(parent)
    widget.setup()
    try:
        parameters = widget.logic.getParameterNode()
        assert widget.ui.compareSeriesCheckBox.isChecked() and widget.settings()["compare_series"] is True
        assert widget.logic.runSettings(parameters)["compare_series"] is True
        widget.ui.compareSeriesCheckBox.setChecked(False)
        assert parameters.GetParameter("CompareSeries") == "false"
        assert widget.settings()["compare_series"] is False
        assert widget.logic.runSettings(parameters)["compare_series"] is False
        t2 = volumes["4: T2 SAG"]
        for compare, others in ((True, 2), (False, 0)):
            run = widget.logic.prepareRun(t2, compare_series=compare, workFolder=str(tmp_path / str(compare)))
            assert run["workerArguments"].count("--other-series") == others
            assert run["workerArguments"].count("--other-geometry") == others
    finally:
        widget.cleanup()
        parent.close()


def test_a_volume_chosen_to_compare_with_is_compared_where_the_scene_knows_no_exam(exam, monkeypatch):
    """Volumes loaded from files carry no DICOM study: the panel's "Also compare with" names the other series,
    compared as the exam's volumes are (and as `spinenet run --compare-with`); one the run cannot use is
    refused before the worker starts."""
    module, scene, phantom, volumes = exam
    t1_file = mrml.add_volume(scene, phantom.voxels_kji, phantom.ijk_to_ras, "T1 from a file")
    logic = module.SpineNetLogic(scene=scene)
    t2_file = volumes["from a file"]
    logic.runSynchronously(t2_file, grading=False, compare_with=t1_file)
    labelling = _labelling(logic, t2_file)
    assert labelling["compared_with_series"] == labelling["agreeing_series"] == ["'T1 from a file'"]
    name_series_a_level_lower(monkeypatch, "T1 from a file")
    logic.runSynchronously(t2_file, grading=False, compare_with=t1_file)
    labelling = _labelling(logic, t2_file)
    assert labelling["needs_review"] is True and labelling["disagreeing_series"] == ["'T1 from a file'"]

    # a DICOM volume chosen that the exam holds anyway is compared once, first
    t2 = volumes["4: T2 SAG"]
    logic.runSynchronously(t2, grading=False, compare_with=volumes["5: STIR SAG"])
    assert _labelling(logic, t2)["compared_with_series"] == ["'STIR SAG' (series 5)", "'T1 SAG' (series 3)"]

    label_map = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a segmentation")
    for chosen, settings, says in (
            (t2_file, {}, "is the input volume itself"),
            (volumes["7: T1 SAG elsewhere"], {}, "lies in another DICOM frame of reference than the input"),
            (t1_file, {"compare_series": False}, "comparing the series is switched off"),
            (label_map, {}, "the volume to compare with cannot be used: ")):
        source = t2 if chosen is volumes["7: T1 SAG elsewhere"] else t2_file
        with pytest.raises(module.SpineNetError, match=says):
            logic.prepareRun(source, compare_with=chosen, **settings)


def test_a_refused_volume_to_compare_with_leaves_no_run_folder_behind(exam, monkeypatch):
    """The label map is found unusable once the run folder is made: the folder goes again."""
    import tempfile

    module, scene, phantom, volumes = exam
    made, real = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    logic = module.SpineNetLogic(scene=scene)
    label_map = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a segmentation")
    with pytest.raises(module.SpineNetError, match="the volume to compare with cannot be used"):
        logic.prepareRun(volumes["from a file"], compare_with=label_map)
    assert made and not any(os.path.exists(folder) for folder in made)


def test_a_volume_loaded_from_an_image_of_a_bids_session_is_compared_with_the_sessions_other_volumes(exam, tmp_path):
    """As `spinenet run` on the file: the scene's volumes loaded from the session's other sagittal images (the
    T1w), not those of another subject or of no file."""
    module, scene, phantom, volumes = exam
    anat = tmp_path / "ds" / "sub-01" / "ses-1" / "anat"
    files = {name: phantom.write_nifti(anat / f"{name}.nii.gz") for name in ("sub-01_ses-1_T2w", "sub-01_ses-1_T1w")}
    files["sub-02_T1w"] = phantom.write_nifti(tmp_path / "ds" / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    loaded = {}
    for name, path in files.items():
        node = mrml.add_volume(scene, phantom.voxels_kji, phantom.ijk_to_ras, name)
        node.AddDefaultStorageNode()
        node.GetStorageNode().SetFileName(str(path))
        loaded[name] = node
    t2 = loaded["sub-01_ses-1_T2w"]
    assert mrml.exam_volumes(t2, 3) == [loaded["sub-01_ses-1_T1w"]]
    assert mrml.exam_volumes(loaded["sub-02_T1w"], 3) == [] and mrml.exam_volumes(volumes["from a file"], 3) == []
    logic = module.SpineNetLogic(scene=scene)
    logic.runSynchronously(t2, grading=False)
    labelling = _labelling(logic, t2)
    assert labelling["compared_with_series"] == labelling["agreeing_series"] == ["'sub-01_ses-1_T1w'"]
