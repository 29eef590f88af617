"""A ZIP archive as the input (a study as a PACS or web viewer hands it out): ``spinenet run``, ``spinenet
correct --input`` and the batch script read what it holds as they read a folder or a file, DICOM results
included, and leave no unpacked file behind; a bad archive is one line and exit status 2
(``inputs/archive.py``)."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest

from SpineNetLib import pipeline
from SpineNetLib.apps import cli
from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs import archive
from SpineNetLib.inputs.load import load_scan
from SpineNetLib.synthetic.phantom import make_phantom

from oracles import oracle_networks


@pytest.fixture()
def phantom_files(tmp_path, monkeypatch):
    """(phantom, DICOM folder, NIfTI file); the networks are oracles; temporary folders under tmp_path/tmp."""
    phantom = make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=5)
    dicom = tmp_path / "dicom"
    phantom.write_dicom(dicom)
    nifti = phantom.write_nifti(tmp_path / "scan.nii.gz")
    monkeypatch.setattr(pipeline, "load_networks", lambda *a, **k: oracle_networks(phantom))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    return phantom, dicom, Path(nifti)


def _zip(path: Path, files: dict[str, Path | bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as opened:
        for name, content in files.items():
            if isinstance(content, Path):
                opened.write(content, name)
            else:
                opened.writestr(name, content)
    return path


def _documents(folder: Path) -> dict:
    out = {}
    for name in ("vertebrae.json", "discs.json"):
        doc = json.loads((folder / name).read_text())
        doc.pop("timings_s", None)
        out[name] = doc
    return out


def _one_line_error(capsys, argv, *words) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_a_zipped_dicom_series_gives_what_its_folder_gives(phantom_files, tmp_path, capsys):
    phantom, dicom, _ = phantom_files
    exam = _zip(tmp_path / "exam.zip", {f"EXAM/SERIES5/{p.name}": p for p in sorted(dicom.iterdir())})
    assert cli.main(["run", str(dicom), "-o", str(tmp_path / "from_folder"), "--quiet", "--dicom-out"]) == 0
    assert cli.main(["run", str(exam), "-o", str(tmp_path / "from_zip"), "--quiet", "--dicom-out"]) == 0
    capsys.readouterr()
    assert _documents(tmp_path / "from_zip") == _documents(tmp_path / "from_folder")
    for name in ("preview.png", "segmentation.dcm", "report.dcm"):   # DICOM results made from the zipped files
        assert (tmp_path / "from_zip" / name).is_file(), name
    assert (tmp_path / "from_zip" / "preview.png").read_bytes() == (tmp_path / "from_folder" / "preview.png").read_bytes()
    assert not any((tmp_path / "tmp").iterdir())                    # nothing unpacked is left

    # the correction reads the scan from the archive as well, DICOM results made again
    top = phantom.levels[0]
    assert cli.main(["correct", str(tmp_path / "from_zip"), top, "T9", "--input", str(exam)]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "from_zip" / "vertebrae.json").read_text())["vertebrae"][0]["level"] == "T9"
    assert not any((tmp_path / "tmp").iterdir())


def test_a_zipped_image_file_gives_what_the_file_gives(phantom_files, tmp_path, capsys):
    _, _, nifti = phantom_files
    packed = _zip(tmp_path / "scan.zip", {"scan.nii.gz": nifti, "__MACOSX/._scan.nii.gz": b"\x00\x05\x16\x07"})
    assert cli.main(["run", str(nifti), "-o", str(tmp_path / "from_file"), "--quiet", "--no-grade"]) == 0
    assert cli.main(["run", str(packed), "-o", str(tmp_path / "from_zip"), "--quiet", "--no-grade"]) == 0
    capsys.readouterr()
    assert _documents(tmp_path / "from_zip") == _documents(tmp_path / "from_file")
    assert not any((tmp_path / "tmp").iterdir())


def test_a_bad_archive_is_one_line_naming_it_and_writes_nothing(phantom_files, tmp_path, capsys, monkeypatch):
    _, dicom, _ = phantom_files
    empty = _zip(tmp_path / "empty.zip", {})
    text = _zip(tmp_path / "notes.zip", {"notes/readme.txt": b"no images here"})
    locked = _zip(tmp_path / "locked.zip", {"IM0001": b"x" * 10})
    data = bytearray(locked.read_bytes())        # mark the file encrypted, as an archive with a password does:
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):   # the local and the central header
        data[data.index(signature) + offset] |= 0x1
    locked.write_bytes(bytes(data))
    cases = [(empty, ["empty.zip holds no files"]),
             (text, ["no DICOM files in notes.zip"]),
             (locked, ["locked.zip is encrypted"])]
    for path, words in cases:
        out = tmp_path / f"out_{path.stem}"
        _one_line_error(capsys, ["run", str(path), "-o", str(out), "--quiet"], *words)
        assert not out.exists() and not any((tmp_path / "tmp").iterdir()), path
    assert str(tmp_path / "tmp") not in capsys.readouterr().err     # the archive named, not the folder

    exam = _zip(tmp_path / "exam.zip", {p.name: p for p in dicom.iterdir()})
    monkeypatch.setattr(archive.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10, 10, 10))
    _one_line_error(capsys, ["run", str(exam), "-o", str(tmp_path / "out_full"), "--quiet"],
                    "exam.zip unpacks to", "free in the temporary folder")
    assert not (tmp_path / "out_full").exists()


def test_a_name_that_leaves_the_archive_stays_inside_the_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sneaky = _zip(tmp_path / "sneaky.zip", {"../../escaped.txt": b"outside?", "/abs/escaped2.txt": b"outside?"})
    with pytest.raises(InputError):
        with archive.unpacked(sneaky) as source:
            assert {p.name for p in Path(source).rglob("*") if p.is_file()} == {"escaped.txt", "escaped2.txt"}
            load_scan(source)
    assert not (tmp_path.parent / "escaped.txt").exists() and not Path("/abs/escaped2.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sneaky.zip"]


def test_the_library_reader_points_to_the_archive_helper(tmp_path):
    packed = _zip(tmp_path / "exam.zip", {"a.txt": b"x"})
    with pytest.raises(InputError, match="exam.zip is a ZIP archive: .*inputs.archive.unpacked"):
        load_scan(packed)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with archive.unpacked(plain) as source:          # anything else passes through unchanged
        assert source == plain
