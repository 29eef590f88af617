"""Only T2-weighted scans are graded: the weighting from the user, the DICOM header or the image."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from SpineNetLib import pipeline
from SpineNetLib.apps import cli
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.results import Vertebra
from SpineNetLib.core.mr_weighting import weighting_from_description, weighting_from_header
from SpineNetLib.discs.weighting import T1_MAX_FLUID_TO_MARROW, scan_weighting, user_weighting, weighting_from_image
from SpineNetLib.synthetic.phantom import make_phantom

from oracles import oracle_networks

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("header, expected", [
    ({"echo_time_ms": 102, "repetition_time_ms": 3500, "scanning_sequence": "SE"}, "T2"),    # T2 TSE
    ({"echo_time_ms": 11, "repetition_time_ms": 550, "scanning_sequence": "SE"}, "T1"),     # T1 TSE
    ({"echo_time_ms": 25, "repetition_time_ms": 2800, "scanning_sequence": "SE"}, "PD"),
    ({"echo_time_ms": 60, "repetition_time_ms": 4000, "inversion_time_ms": 150,
      "scanning_sequence": "SE IR"}, "STIR"),                                                # STIR / TIRM
    ({"echo_time_ms": 110, "repetition_time_ms": 9000, "inversion_time_ms": 2500, "scanning_sequence": "IR"}, "FLAIR"),
    ({"echo_time_ms": 10, "repetition_time_ms": 2000, "inversion_time_ms": 800, "scanning_sequence": "IR"}, "T1"),
    # gradient echo: its times follow other windows, so the description decides
    ({"echo_time_ms": 4, "repetition_time_ms": 9, "scanning_sequence": "GR", "series_description": "t2_trufi_sag"}, "T2"),
    # no times: the description
    ({"series_description": "SAG T1 TSE"}, "T1"),
    ({"series_description": "t2_tse_sag_384"}, "T2"),
    ({"series_description": "sag TIRM"}, "STIR"),
])
def test_the_dicom_header_tells_the_weighting(header, expected):
    weighting = weighting_from_header(header)
    assert weighting is not None and weighting.name == expected and weighting.source == "DICOM header"
    assert weighting.graded == (expected == "T2")


def test_a_header_that_does_not_tell_gives_no_answer():
    assert weighting_from_header({}) is None
    assert weighting_from_header({"series_description": "lumbar spine"}) is None
    # times between the windows (intermediate TE), and a description naming two weightings
    assert weighting_from_header({"echo_time_ms": 50, "repetition_time_ms": 1200}) is None
    assert weighting_from_description("T1 and T2 compare") is None
    assert weighting_from_description("sag T2 FLAIR") == "FLAIR"


def test_the_users_word_wins_and_a_typo_is_refused():
    assert user_weighting("t2").name == "T2" and user_weighting("t2").graded
    assert not user_weighting("other").graded
    with pytest.raises(InputError, match="--sequence"):
        user_weighting("T3")


def _truth(phantom) -> list[Vertebra]:
    return [Vertebra(slices=sorted(v.quads), polygons=[v.quads[s] for s in sorted(v.quads)], level=v.level)
            for v in phantom.vertebrae if not v.extra]


@pytest.mark.parametrize("contrast, expected", [("T1", "T1"), ("T2", "fluid bright"), ("STIR", "fluid bright")])
def test_the_image_tells_t1_from_fluid_bright_on_phantoms(contrast, expected):
    phantom = make_phantom(fov="lumbar", contrast=contrast, shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9,
                           seed=4)
    weighting = weighting_from_image(phantom.scan, _truth(phantom))
    assert weighting.name == expected and weighting.source == "image"
    # a NIfTI-like scan has no header: the image decides
    assert scan_weighting(phantom.scan, _truth(phantom)).name == expected
    assert weighting_from_image(phantom.scan, _truth(phantom)[:2]).name == "unknown"   # too few bodies


def test_the_image_reads_the_bodies_below_the_cord_first():
    """L2-L5 when three of them are measured (the cord fills the canal higher up), else every body above S1."""
    from dataclasses import replace

    from SpineNetLib.discs.weighting import fluid_to_marrow_ratio

    phantom = make_phantom(fov="lumbar", contrast="T2", shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9,
                           seed=4)
    truth = _truth(phantom)
    assert [v.level for v in truth] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert fluid_to_marrow_ratio(phantom.scan, truth)[1] == 4                      # L2-L5
    assert fluid_to_marrow_ratio(phantom.scan, truth[:4] + truth[6:])[1] == 4      # T12-L2: all above S1
    shifted = [replace(v, level=name) for v, name in zip(truth, ["T9", "T10", "T11", "T12", "L1", "L2", "L3"])]
    assert fluid_to_marrow_ratio(phantom.scan, shifted)[1] == 7                    # only L2, L3: every body


def _grader_networks(phantom):
    from SpineNetLib.weights.checkpoints import load_model

    networks = oracle_networks(phantom)
    networks.grading = load_model("grading", ROOT / "Testing" / "Data" / "grader_notch" / "grading.pt")
    return networks


def test_a_t1_dicom_series_is_measured_not_graded_unless_the_user_says_t2(tmp_path, monkeypatch, capsys):
    # a T2 phantom whose header says T1 (TE 11 ms, TR 550 ms): the header is believed over the image
    phantom = make_phantom(fov="lumbar", shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9, seed=5)
    dicom = tmp_path / "dicom"
    phantom.write_dicom(dicom, series_description="sag lumbar",
                        extra_tags={"EchoTime": "11", "RepetitionTime": "550", "ScanningSequence": "SE"})
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: _grader_networks(phantom))
    out = tmp_path / "t1"
    assert cli.main(["run", str(dicom), "-o", str(out), "--quiet", "--hotspots", "LowerEndplateDefect"]) == 0
    discs = json.loads((out / "discs.json").read_text())
    grading = discs["grading"]
    assert grading["status"] == "not run" and "T1-weighted (DICOM header: TE 11 ms, TR 550 ms)" in grading["reason"]
    assert grading["weighting"] == {"weighting": "T1", "source": "DICOM header", "detail": "TE 11 ms, TR 550 ms",
                                    "graded": False}
    assert discs["discs"] and all(not d.get("grades") for d in discs["discs"])
    assert all(d["measurements"] for d in discs["discs"]), "the discs are still measured"
    assert not list(out.glob("hotspots*")), "no hotspot maps without grades"
    assert any("discs not graded" in w for w in discs["warnings"])
    rows = list(csv.DictReader((out / "discs.csv").open()))
    assert rows and all(r["sequence"] == "T1 (DICOM header)" and r["Herniation"] == "" for r in rows)
    err = capsys.readouterr().err
    assert "discs not graded" in err and "--sequence T2" in err
    # the user knows better
    out = tmp_path / "as_t2"
    assert cli.main(["run", str(dicom), "-o", str(out), "--quiet", "--sequence", "T2"]) == 0
    grading = json.loads((out / "discs.json").read_text())["grading"]
    assert grading["status"] == "done" and grading["weighting"]["source"] == "user"
    assert {r["sequence"] for r in csv.DictReader((out / "discs.csv").open())} == {"T2 (as given)"}


def test_a_t2_dicom_series_is_graded_and_says_why(tmp_path, monkeypatch):
    phantom = make_phantom(fov="lumbar", shape=(320, 320), pixel_spacing=(0.9, 0.9), n_slices=9, seed=5)
    dicom = tmp_path / "dicom"
    phantom.write_dicom(dicom, extra_tags={"EchoTime": "96", "RepetitionTime": "3200", "ScanningSequence": "SE"})
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: _grader_networks(phantom))
    assert cli.main(["run", str(dicom), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    grading = json.loads((tmp_path / "out" / "discs.json").read_text())["grading"]
    assert grading["status"] == "done"
    assert grading["weighting"] == {"weighting": "T2", "source": "DICOM header", "detail": "TE 96 ms, TR 3200 ms",
                                    "graded": True}


def test_an_enhanced_dicom_file_gives_its_times_from_the_functional_groups(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset

    from SpineNetLib.inputs.load import load_scan
    from SpineNetLib.inputs.writers import write_enhanced_dicom

    phantom = make_phantom(fov="lumbar", shape=(256, 256), pixel_spacing=(1.0, 1.0), n_slices=5, seed=2)
    path = write_enhanced_dicom(phantom.voxels_kji, phantom.ijk_to_ras, tmp_path / "enhanced.dcm")
    ds = pydicom.dcmread(path)
    echo, timing = Dataset(), Dataset()
    echo.EffectiveEchoTime = 12.0
    timing.RepetitionTime = 600.0
    ds.SharedFunctionalGroupsSequence[0].MREchoSequence = [echo]
    ds.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence = [timing]
    ds.EchoPulseSequence = "SPIN"
    ds.save_as(path)
    scan = load_scan(path)
    assert (scan.metadata["echo_time_ms"], scan.metadata["repetition_time_ms"]) == (12.0, 600.0)
    assert scan.metadata["scanning_sequence"] == "SE"
    assert scan_weighting(scan, []).name == "T1"
    # a STIR: inversion recovery with its (multi-valued) inversion times in the per-frame groups
    for frame in ds.PerFrameFunctionalGroupsSequence:
        modifier = Dataset()
        modifier.InversionTimes = [150.0, 150.0]
        frame.MRModifierSequence = [modifier]
    echo.EffectiveEchoTime, timing.RepetitionTime = 60.0, 4000.0
    ds.InversionRecovery = "YES"
    ds.save_as(path)
    scan = load_scan(path)
    assert scan.metadata["inversion_time_ms"] == 150.0 and scan.metadata["scanning_sequence"] == "SE IR"
    weighting = scan_weighting(scan, [])
    assert (weighting.name, weighting.detail, weighting.graded) == ("STIR", "TE 60 ms, TR 4000 ms, TI 150 ms", False)


@pytest.mark.skipif(not (DATA / "zukic").is_dir(), reason="needs ../shared/data")
def test_real_t1_volume_is_not_graded_and_real_t2_volumes_are():
    """The held-out zukic volumes of one patient: T1 (fluid 0.52 times the marrow), T2 and TIRM (2.45, 2.75;
    benchmarks/sequence_check.py)."""
    from SpineNetLib.inputs.load import load_scan

    networks = pipeline.load_networks("bundled", "cpu")
    readings = {}
    for case in ("zukic_02_AKa3_T1", "zukic_15_S01_T2", "zukic_03_AKa4_TIRM"):
        scan = load_scan(DATA / "zukic" / case / "image.nii.gz")
        found = pipeline.detect_and_label(scan, networks)
        readings[case] = weighting_from_image(scan, found.vertebrae)
    assert readings["zukic_02_AKa3_T1"].name == "T1"
    assert readings["zukic_15_S01_T2"].name == readings["zukic_03_AKa4_TIRM"].name == "fluid bright"
    assert "0.52" in readings["zukic_02_AKa3_T1"].detail
    assert T1_MAX_FLUID_TO_MARROW == 0.8


def test_a_classic_stir_series_reads_its_inversion_time(tmp_path):
    from SpineNetLib.inputs.load import load_scan

    phantom = make_phantom(fov="lumbar", contrast="STIR", shape=(256, 256), pixel_spacing=(1.0, 1.0), n_slices=5,
                           seed=2)
    phantom.write_dicom(tmp_path / "stir", series_description="sag lumbar", extra_tags={
        "EchoTime": "70", "RepetitionTime": "3800", "InversionTime": "160", "ScanningSequence": ["SE", "IR"]})
    scan = load_scan(tmp_path / "stir")
    assert scan.metadata["scanning_sequence"] == "SE IR" and scan.metadata["inversion_time_ms"] == 160.0
    assert scan_weighting(scan, _truth(phantom)).name == "STIR"   # the header, though the image is fluid bright
