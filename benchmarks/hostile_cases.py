"""The cases of ``benchmarks/hostile_sweep.py`` (issue 12): hostile inputs, faults and DICOM header mutants.

Everything is made from one small synthetic lumbar phantom (:class:`Base`: 192 x 160 pixels of
1.6 mm, 5 sagittal slices), written as every supported file type and as a DICOM series, then
broken in the ways each category's builder lists.  :func:`build_cases` returns them as
:class:`Case` objects; the sweep runs and judges them.
"""

from __future__ import annotations

import gzip
import os
import random
import re
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from SpineNetLib.inputs.writers import write_dicom_series, write_image  # noqa: E402
from SpineNetLib.synthetic.phantom import make_phantom  # noqa: E402

#: What a case must do: exit 0; exit 2; exit 2 or exit 0 with a warning; exit 0 or 2.
OK, REFUSE, WARN, ANY = "ok", "refuse", "warn", "any"
RESULT_SET = ("vertebrae.json", "vertebrae.csv", "discs.json", "discs.csv", "result.json")
CATEGORIES = ("files", "geometry", "voxels", "nothing", "dicom", "permissions", "options", "valid", "mutants")


@dataclass
class Case:
    category: str
    name: str
    input: str
    expect: str
    options: tuple = ()
    #: None: a fresh folder of its own.
    output: Path | None = None
    threads: bool = True
    quiet: bool = True
    #: RLIMIT_FSIZE in bytes (a "full disk"), or None.
    file_size_limit: int | None = None
    env: dict = field(default_factory=dict)
    #: Run after the case: the reason it failed, or None.
    check: Callable[[], str | None] | None = None
    #: Words the warning of a WARN case must hold (any warning when empty).
    warning: str = ""


# --------------------------------------------------------------------------- the valid base inputs

class Base:
    """The phantom every hostile input is made from, written once as each supported file type."""

    def __init__(self, root: Path):
        self.root = root / "base"
        self.root.mkdir(parents=True)
        self.phantom = make_phantom(fov="lumbar", shape=(192, 160), pixel_spacing=(1.6, 1.6), n_slices=5, seed=1)
        self.voxels = self.phantom.voxels_kji.astype(np.float32)
        self.affine = np.asarray(self.phantom.ijk_to_ras, dtype=float)
        self.files = {ext: self.image(self.voxels, f"scan{ext}") for ext in (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")}
        self.dicom = self.root / "dicom"
        write_dicom_series(self.phantom.voxels_kji, self.affine, self.dicom)
        self.dicom_files = sorted(self.dicom.iterdir())

    def image(self, voxels, name: str, affine=None) -> Path:
        return write_image(voxels, self.affine if affine is None else affine, self.root / name)

    def affine_with_pixels(self, pixel_mm: float) -> np.ndarray:
        """The phantom's orientation with in-plane pixels of ``pixel_mm``."""
        a = self.affine.copy()
        a[:3, :2] = a[:3, :2] / np.linalg.norm(a[:3, :2], axis=0) * pixel_mm
        return a


def _copy_series(base: Base, folder: Path) -> list[Path]:
    shutil.copytree(base.dicom, folder)
    return sorted(folder.iterdir())


def _edit_dicom(path: Path, **values) -> None:
    """Set (or, with None, delete) header keywords of one DICOM file, bypassing pydicom's checks."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                del ds[keyword]
        elif keyword in ds:
            ds[keyword]._value = value
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _nifti_with(base: Base, name: str, edits: dict[int, tuple[str, tuple]], gz: bool = False) -> Path:
    """The phantom's .nii with ``{offset: (struct format, values)}`` written into its header."""
    raw = bytearray(base.files[".nii"].read_bytes())
    for offset, (fmt, values) in edits.items():
        struct.pack_into("<" + fmt, raw, offset, *values)
    path = base.root / name
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(bytes(raw))
    else:
        path.write_bytes(bytes(raw))
    return path


def _metaimage(base: Base, name: str, fields: dict[str, str], data_name: str | None = None) -> Path:
    """A detached MetaImage header like the phantom's, with ``fields`` changed (data file: ``data_name``)."""
    header = base.files[".mhd"].read_text(encoding="latin-1").splitlines()
    out = []
    for line in header:
        key = line.partition("=")[0].strip()
        if key == "ElementDataFile":
            for k, v in fields.items():
                if not any(h.partition("=")[0].strip() == k for h in header):
                    out.append(f"{k} = {v}")
            out.append(f"ElementDataFile = {data_name or line.partition('=')[2].strip()}")
        else:
            out.append(f"{key} = {fields[key]}" if key in fields else line)
    path = base.root / name
    path.write_text("\n".join(out) + "\n", encoding="latin-1")
    return path


# --------------------------------------------------------------------------- categories

def files_cases(base: Base, work: Path) -> list[Case]:
    """Empty, garbage and truncated files of every supported type, and things that are no file."""
    rng = np.random.default_rng(5)
    cases = []
    inputs = {**base.files, ".dcm": base.dicom_files[0]}
    for ext, good in inputs.items():
        whole = good.read_bytes()
        for kind, data in (("empty", b""), ("garbage", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
                           ("cut in half", whole[:len(whole) // 2]), ("first 64 bytes", whole[:64])):
            folder = work / "files" / f"{ext.strip('.')}-{kind.replace(' ', '_')}"
            folder.mkdir(parents=True)
            if ext == ".mhd":      # the header is broken; its data file is there, whole
                shutil.copy(base.root / "scan.raw", folder / "scan.raw")
            (folder / f"scan{ext}").write_bytes(data)
            cases.append(Case("files", f"{ext} {kind}", str(folder / f"scan{ext}"), REFUSE))
    for kind in ("empty", "garbage", "cut in half", "first 200 bytes"):
        folder = work / "files" / f"dicomdir-{kind.replace(' ', '_')}"
        files = _copy_series(base, folder)
        for f in files:
            whole = f.read_bytes()
            f.write_bytes({"empty": b"", "garbage": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                           "cut in half": whole[:len(whole) // 2], "first 200 bytes": whole[:200]}[kind])
        cases.append(Case("files", f"DICOM folder, every file {kind}", str(folder), REFUSE))
    odd = work / "files" / "odd"
    odd.mkdir()
    (odd / "empty_folder").mkdir()
    (odd / "notes").mkdir()
    (odd / "notes" / "readme.txt").write_text("not a scan")
    (odd / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    os.mkfifo(odd / "pipe.nii.gz")
    (odd / "folder.nii.gz").mkdir()
    loop = odd / "loop"
    loop.mkdir()
    (loop / "self").symlink_to(loop)
    (loop / "other").symlink_to(odd / "loop2")
    (odd / "loop2").symlink_to(loop / "other")
    cases += [Case("files", name, str(path), REFUSE) for name, path in (
        ("missing path", odd / "nothing_here.nii.gz"), ("empty folder", odd / "empty_folder"),
        ("folder without DICOM", odd / "notes"), ("unsupported type (.png)", odd / "picture.png"),
        ("named pipe as .nii.gz", odd / "pipe.nii.gz"), ("folder named .nii.gz", odd / "folder.nii.gz"),
        ("/dev/zero", Path("/dev/zero")), ("symlink loops", loop))]
    return cases + _zip_cases(base, work / "files" / "zip")


def _zip_cases(base: Base, folder: Path) -> list[Case]:
    """ZIP archives that hold nothing to read, or are broken (``inputs/archive.py``)."""
    import zipfile

    folder.mkdir(parents=True)

    def archive(name: str, members: dict[str, bytes]) -> Path:
        path = folder / name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as opened:
            for member, data in members.items():
                opened.writestr(member, data)
        return path

    series = {f"../../{f.name}": f.read_bytes() for f in base.dicom_files}     # names that would leave the folder
    whole = archive("series.zip", {f.name: f.read_bytes() for f in base.dicom_files}).read_bytes()
    (folder / "cut.zip").write_bytes(whole[:len(whole) // 2])
    encrypted = bytearray(archive("locked.zip", {"IM1": base.dicom_files[0].read_bytes()}).read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        encrypted[encrypted.index(signature) + offset] |= 0x1
    (folder / "locked.zip").write_bytes(bytes(encrypted))
    cases = [("empty ZIP archive", archive("empty.zip", {}), REFUSE),
             ("ZIP archive cut in half", folder / "cut.zip", REFUSE),
             ("ZIP archive marked encrypted", folder / "locked.zip", REFUSE),
             ("ZIP archive of notes", archive("notes.zip", {"readme.txt": b"not a scan"}), REFUSE),
             ("ZIP archive inside a ZIP archive", archive("nested.zip", {"series.zip": whole}), REFUSE),
             ("ZIP archive of garbage DICOM files", archive("garbage.zip", {f"IM{k}": bytes(300) for k in range(5)}),
              REFUSE),
             ("ZIP archive whose names climb out (../)", archive("climb.zip", series), OK)]
    return [Case("files", name, str(path), expect) for name, path, expect in cases]


def geometry_cases(base: Base, work: Path) -> list[Case]:
    """Absurd spacings and sizes, decompression bombs, MetaImage headers naming odd data files."""
    small = base.voxels[:, :64, :48]
    cases = [Case("geometry", f"NIfTI with {mm:g} mm pixels", str(base.image(small, f"px{mm:g}.nii.gz",
                                                                         base.affine_with_pixels(mm))), REFUSE)
             for mm in (10.0, 100.0, 0.001)]
    for name, values in (("zero", (0.0, 0.0)), ("negative", (-1.6, -1.6)), ("NaN", (float("nan"),) * 2),
                         ("infinite", (float("inf"),) * 2)):
        # pixdim[1..2] (and the sform rows, which ITK prefers when set) carry the spacing
        edits = {80: ("2f", values), 254: ("h", (0,))}
        expect = ANY if name == "negative" else REFUSE   # NIfTI takes |pixdim|: a negative one is legal
        cases.append(Case("geometry", f"NIfTI with {name} pixel spacing",
                          str(_nifti_with(base, f"spacing_{name}.nii", edits)), expect))
    cases.append(Case("geometry", "small .nii.gz claiming 1 G voxels",
                      str(_nifti_with(base, "bomb.nii.gz", {40: ("8h", (3, 2048, 2048, 256, 1, 1, 1, 1))}, gz=True)),
                      REFUSE))
    cases.append(Case("geometry", ".nii claiming 32767^3 voxels",
                      str(_nifti_with(base, "huge_dims.nii", {40: ("8h", (3, 32767, 32767, 32767, 1, 1, 1, 1))})),
                      REFUSE))
    cases.append(Case("geometry", ".nii with negative dimensions",
                      str(_nifti_with(base, "neg_dims.nii", {40: ("8h", (3, -5, 160, 5, 1, 1, 1, 1))})), REFUSE))
    nrrd = base.files[".nrrd"].read_bytes()
    head, sep, body = nrrd.partition(b"\n\n")
    lines = head.decode("latin-1").splitlines()
    for name, key, value in (("sizes 100000 x 100000 x 100", "sizes", "100000 100000 100"),
                             ("zero spacings", "space directions", "(0,0,0) (0,0,0) (0,0,0)")):
        changed = "\n".join(f"{key}: {value}" if ln.startswith(key + ":") else ln for ln in lines)
        path = base.root / f"nrrd_{key.replace(' ', '_')}.nrrd"
        path.write_bytes(changed.encode("latin-1") + sep + body)
        cases.append(Case("geometry", f"NRRD with {name}", str(path), REFUSE))
    cases += _metaimage_cases(base)
    cases.append(_within_limit_bomb(base))
    mha = base.files[".mha"].read_bytes()
    at = mha.index(b"ElementDataFile")
    (base.root / "device.mha").write_bytes(mha[:at] + b"ElementDataFile = /dev/zero\n")
    cases.append(Case("geometry", ".mha, data file /dev/zero", str(base.root / "device.mha"), REFUSE))
    header = nrrd.partition(b"\n\n")[0].decode("latin-1")
    (base.root / "scan_nrrd.raw").write_bytes(nrrd.partition(b"\n\n")[2])
    for name, data_file, suffix, expect in (("data file /dev/zero", "/dev/zero", ".nhdr", REFUSE),
                                            ("data file a named pipe", "fifo.raw", ".nhdr", REFUSE),
                                            ("data file a LIST of named pipes", "LIST\n" + "fifo.raw\n" * 5, ".nhdr", REFUSE),
                                            ("data file beside it", "scan_nrrd.raw", ".nhdr", OK),
                                            ("(attached) naming a named pipe", "fifo.raw", ".nrrd", REFUSE)):
        path = base.root / f"detached_{len(cases)}{suffix}"
        path.write_text(header + f"\ndata file: {data_file}" + ("\n" if suffix == ".nhdr" else "\n\n"),
                        encoding="latin-1")
        cases.append(Case("geometry", f"NRRD {suffix}, {name}", str(path), expect))
    return cases


def _metaimage_cases(base: Base) -> list[Case]:
    data = base.root / "scan.raw"
    data.write_bytes(base.voxels.astype("<f4").tobytes())
    (base.root / "short.raw").write_bytes(data.read_bytes()[:1000])
    sparse = base.root / "sparse.raw"
    shutil.copy(data, sparse)
    os.truncate(sparse, 4 << 30)                      # 4 GiB, nearly all a hole
    zeros = base.root / "zeros_1g.raw"
    zeros.write_bytes(b"")
    os.truncate(zeros, 1 << 30)     # the voxel limit in doubles: 1 GiB of zeros (a hole)
    bomb = base.root / "bomb.zraw"
    compressor, chunk = zlib.compressobj(9), bytes(1 << 24)
    bomb.write_bytes(b"".join(compressor.compress(chunk) for _ in range(64)) + compressor.flush())   # 1 GiB
    os.mkfifo(base.root / "fifo.raw")
    plain = {"ElementType": "MET_FLOAT"}
    specs = [
        ("data file /dev/zero", plain, "/dev/zero", REFUSE),
        ("data file a named pipe", plain, "fifo.raw", REFUSE),
        ("data file 1000 bytes short", plain, "short.raw", REFUSE),
        ("data file missing", plain, "nowhere.raw", REFUSE),
        ("data file 4 GiB (sparse)", plain, "sparse.raw", OK),
        ("data file the header itself", plain, "self.mhd", REFUSE),
        ("DimSize 100000^3", {**plain, "DimSize": "100000 100000 100000"}, "scan.raw", REFUSE),
        ("1e6 channels per voxel", {**plain, "ElementNumberOfChannels": "1000000"}, "scan.raw", REFUSE),
        ("ElementSpacing 0", {**plain, "ElementSpacing": "0 0 0"}, "scan.raw", REFUSE),
        ("ElementSpacing nan", {**plain, "ElementSpacing": "nan nan nan"}, "scan.raw", REFUSE),
        ("DimSize at the voxel limit, 1 GiB of doubles (all 0)",
         {"ElementType": "MET_DOUBLE", "DimSize": "512 512 512", "ElementSpacing": "0.5 0.5 0.5"},
         "zeros_1g.raw", REFUSE),
        ("compressed 1 GiB into a 5-slice header",
         {**plain, "CompressedData": "True", "CompressedDataSize": str(bomb.stat().st_size)}, "bomb.zraw", REFUSE),
        ("compressed, DimSize at the voxel limit",
         {"ElementType": "MET_DOUBLE", "DimSize": "512 512 512", "ElementSpacing": "0.5 0.5 0.5",
          "CompressedData": "True", "CompressedDataSize": str(bomb.stat().st_size)}, "bomb.zraw", REFUSE),
    ]
    specs += [("LIST of 5 named pipes", plain, "LIST 2D\n" + "fifo.raw\n" * 5, REFUSE)]
    cases = []
    for i, (name, fields, data_name, expect) in enumerate(specs):
        header = f"mhd{i}.mhd" if data_name != "self.mhd" else "self.mhd"
        cases.append(Case("geometry", f".mhd, {name}", str(_metaimage(base, header, fields, data_name)), expect))
    return cases


def _within_limit_bomb(base: Base) -> Case:
    """A 1 MB .nii.gz of 512^3 float64 zeros: within the voxel limit, refused as empty, in bounded memory."""
    raw = bytearray(base.files[".nii"].read_bytes()[:352])
    struct.pack_into("<8h", raw, 40, 3, 512, 512, 512, 1, 1, 1, 1)
    struct.pack_into("<hh", raw, 70, 64, 64)                       # float64
    struct.pack_into("<4f", raw, 76, 1.0, 0.5, 0.5, 0.5)
    path = base.root / "zeros_512cubed_f8.nii.gz"
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(bytes(raw))
        chunk = bytes(1 << 24)
        for _ in range((512 ** 3 * 8) // len(chunk)):
            fh.write(chunk)
    return Case("geometry", ".nii.gz of 512^3 float64 zeros (1 MB file, 1 GiB voxels)", str(path), REFUSE)


def voxels_cases(base: Base, work: Path) -> list[Case]:
    """NaN/Inf, constant, 2D, 4D, vector, label maps, extreme and odd voxel types."""
    import SimpleITK as sitk

    v = base.voxels
    cases = []
    for ext in (".nii.gz", ".nrrd", ".mha"):
        for bad in (np.nan, np.inf):
            voxels = v.copy()
            voxels[2, 50:52, 60] = bad
            name = f"{'NaN' if np.isnan(bad) else 'Inf'} voxels"
            cases.append(Case("voxels", f"{ext} {name}", str(base.image(voxels, f"{name[:3]}{ext}")), REFUSE))
    labels = np.zeros(v.shape, np.uint8)
    for level, row in enumerate(range(20, 180, 20), start=20):
        labels[:, row:row + 12, 40:90] = level
    specs = [
        ("constant", np.full(v.shape, 7.0, np.float32), REFUSE),
        ("all zero", np.zeros(v.shape, np.int16), REFUSE),
        ("label map", labels, REFUSE),
        ("values near the float32 maximum", (v / max(float(v.max()), 1.0) * 3e38).astype(np.float32), ANY),
        ("values of 1e-30", (v * 1e-30).astype(np.float32), ANY),
        ("negative int16 (offset -2000)", (v - 2000).astype(np.int16), OK),
        ("uint8 (rescaled)", (v / max(float(v.max()), 1.0) * 255).astype(np.uint8), ANY),
        ("2 x 2 x 2 voxels", v[:2, 90:92, 80:82].copy(), ANY),
        ("1 x 1 x 1 voxel", v[:1, 90:91, 80:81].copy(), REFUSE),
    ]
    cases += [Case("voxels", name, str(base.image(arr, f"vox_{i}.nii.gz")), expect)
              for i, (name, arr, expect) in enumerate(specs)]
    one = sitk.GetImageFromArray(v[2])                                 # a true 2D image
    one.SetSpacing((1.6, 1.6))
    cases.append(Case("voxels", "2D image (one slice, no third axis)", _sitk_write(one, base.root / "2d.nii.gz"), ANY))
    cases.append(Case("voxels", "one sagittal slice in 3D", str(base.image(v[2:3], "one_slice.nii.gz")), WARN,
                      warning="single sagittal slice"))
    for t, expect in ((3, REFUSE), (1, OK)):
        img = sitk.JoinSeries([sitk.ReadImage(str(base.files[".nii.gz"]))] * t)   # keeps the sagittal direction
        cases.append(Case("voxels", f"4D image, {t} volume{'s' * (t > 1)}", _sitk_write(img, base.root / f"4d_{t}.nii.gz"),
                          expect))
    rgb = sitk.GetImageFromArray(np.stack([v] * 3, axis=-1).astype(np.uint8), isVector=True)
    cases.append(Case("voxels", "RGB (3 components)", _sitk_write(rgb, base.root / "rgb.nrrd"), REFUSE))
    cplx = _nifti_with(base, "complex.nii", {70: ("hh", (32, 64))})    # complex64 over float32 data
    cases.append(Case("voxels", "complex NIfTI datatype", str(cplx), ANY))
    return cases


def _sitk_write(img, path: Path) -> str:
    import SimpleITK as sitk

    sitk.WriteImage(img, str(path))
    return str(path)


def nothing_cases(base: Base, work: Path) -> list[Case]:
    """Images with no spine in them: a run may end with 0 vertebrae only with a warning saying why."""
    rng = np.random.default_rng(3)
    shape = base.voxels.shape
    square = np.zeros(shape, np.float32)
    square[:, 90:100, 70:80] = 1000.0
    faint = square + rng.uniform(0, 2, shape).astype(np.float32)
    ramp = np.broadcast_to(np.linspace(0, 1000, shape[1], dtype=np.float32)[None, :, None], shape).copy()
    checker = ((np.indices(shape[1:]).sum(axis=0) // 8) % 2 * 800.0).astype(np.float32)[None].repeat(shape[0], 0)
    flipped = base.voxels[:, ::-1, ::-1].max() - base.voxels[:, ::-1, ::-1]
    specs = [("pure noise", rng.uniform(0, 1000, shape).astype(np.float32)),
             ("black with a small bright square", square), ("the square on faint noise", faint),
             ("smooth ramp", ramp), ("checkerboard", checker),
             ("phantom inverted and upside down", flipped.astype(np.float32)),
             ("phantom at 1/20 contrast on noise", base.voxels * 0.05 + rng.normal(500, 100, shape).astype(np.float32))]
    # an inverted spine is still a spine: it may be found (any "0 vertebrae" needs its reason anyway)
    return [Case("nothing", name, str(base.image(arr, f"nothing_{i}.nii.gz")),
                 ANY if name.startswith("phantom inverted") else WARN, warning="no vertebra")
            for i, (name, arr) in enumerate(specs)]


def dicom_cases(base: Base, work: Path) -> list[Case]:
    """Broken DICOM series: files, positions, series, pixel encodings, sizes and spacings."""
    cases: list[Case] = []

    def series(name: str, expect: str, edit: Callable[[list[Path], Path], None], options: tuple = (),
               warning: str = "") -> None:
        folder = work / "dicom" / re.sub(r"\W+", "_", name)
        files = _copy_series(base, folder)
        edit(files, folder)
        cases.append(Case("dicom", name, str(folder), expect, options=options, warning=warning))

    def each(**values):
        return lambda files, folder: [_edit_dicom(f, **values) for f in files]

    def first(**values):
        return lambda files, folder: _edit_dicom(files[0], **values)

    def cut(fraction):
        return lambda files, folder: files[-1].write_bytes(files[-1].read_bytes()[:int(files[-1].stat().st_size * fraction)])

    def move(index, mm):
        def edit(files, folder):
            ds = pydicom.dcmread(files[index])
            _edit_dicom(files[index], ImagePositionPatient=[float(x) + mm for x in ds.ImagePositionPatient])
        return edit

    def other_series(plane, times=None):
        def edit(files, folder):
            affine = base.affine if plane == "sagittal" else np.diag([0.8, 0.8, 4.0, 1.0])
            write_dicom_series(base.phantom.voxels_kji[:, :, :], affine, folder / "second", file_prefix="B",
                               series_description=f"another {plane} series", seed=9, extra_tags=times)
        return edit

    t1_times, t2_times = {"EchoTime": 10, "RepetitionTime": 550}, {"EchoTime": 95, "RepetitionTime": 3500}

    def as_t2_beside(times):
        """The series made T2-weighted by its times, another sagittal series with ``times`` beside it."""
        def edit(files, folder):
            for f in files:
                _edit_dicom(f, **t2_times)
            other_series("sagittal", times)(files, folder)
        return edit

    def t1_of_the_exam_turned(files, folder):
        """The series made T2-weighted, a T1 of its exam and frame of reference beside it, one of whose images
        is turned against the others: the T1 cannot be read, so it is not compared."""
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        exam = {"StudyInstanceUID": ds.StudyInstanceUID, "FrameOfReferenceUID": ds.FrameOfReferenceUID}
        for f in files:
            _edit_dicom(f, **t2_times)
        other_series("sagittal", {**t1_times, **exam})(files, folder)
        turned = ["0", "1", "0", "0", "0.01", "-1"]
        _edit_dicom(sorted((folder / "second").iterdir())[1], ImageOrientationPatient=turned)

    series("valid series (reference)", OK, lambda files, folder: None)
    series("last file cut in half", REFUSE, cut(0.5))
    series("last file cut to its preamble", REFUSE, cut(0.02))
    series("a non-DICOM file mixed in", OK, lambda files, folder: (folder / "notes.txt").write_text("hello"))
    series("one slice moved 1.5 mm", REFUSE, move(2, 1.5))
    series("one slice missing", REFUSE, lambda files, folder: files[2].unlink())
    series("duplicate positions", REFUSE, lambda files, folder: shutil.copy(files[1], folder / "copy.dcm"))
    series("duplicate positions, another SOP instance", REFUSE,
           lambda files, folder: (shutil.copy(files[1], folder / "dup.dcm"),
                                  _edit_dicom(folder / "dup.dcm", SOPInstanceUID="1.2.3.4.5.6.7")))
    series("an axial series beside it", OK, other_series("axial"))
    series("two sagittal series", REFUSE, other_series("sagittal"))
    series("a sagittal T2 and a sagittal T1 (the T2 is read)", WARN, as_t2_beside(t1_times),
           warning="read the T2-weighted one")
    series("two sagittal T2 series", REFUSE, as_t2_beside(t2_times))
    series("a sagittal T2 and an unreadable T1 of its exam (the T1 is named, not compared)", WARN,
           t1_of_the_exam_turned, warning="was not compared with the one read")
    series("unknown --series", REFUSE, lambda files, folder: None, options=("--series", "1.2.3"))
    series("PALETTE COLOR", REFUSE, each(PhotometricInterpretation="PALETTE COLOR"))
    series("MONOCHROME1", OK, each(PhotometricInterpretation="MONOCHROME1"))
    series("RescaleSlope 0", REFUSE, each(RescaleSlope="0"))
    series("RescaleSlope nan", REFUSE, each(RescaleSlope="nan"))
    series("RescaleIntercept 'abc' in one file", REFUSE, first(RescaleIntercept="abc"))
    series("non-numeric InstanceNumber", OK, each(InstanceNumber="abc"))
    series("Rows = Columns = 65535 in one file", REFUSE, first(Rows=65535, Columns=65535))
    series("PixelSpacing 100 mm", REFUSE, each(PixelSpacing=["100", "100"]))
    series("PixelSpacing missing", REFUSE, each(PixelSpacing=None))
    series("PixelSpacing 0", REFUSE, each(PixelSpacing=["0", "0"]))
    series("PixelSpacing 'abc'", REFUSE, first(PixelSpacing="abc"))
    series("ImageOrientationPatient missing", REFUSE, each(ImageOrientationPatient=None))
    series("ImageOrientationPatient zeros", REFUSE, each(ImageOrientationPatient=["0"] * 6))
    series("ImageOrientationPatient not orthogonal", REFUSE, each(ImageOrientationPatient=["0", "1", "0", "0", "1", "0"]))
    series("ImagePositionPatient missing in one file", REFUSE, first(ImagePositionPatient=None))
    series("ImagePositionPatient missing everywhere", REFUSE, each(ImagePositionPatient=None))
    series("mixed image sizes", REFUSE, first(Rows=96))
    series("SamplesPerPixel 3", REFUSE, each(SamplesPerPixel=3))
    series("BitsAllocated 32 over 16-bit data", REFUSE, first(BitsAllocated=32))
    series("PixelData removed from one file", REFUSE, first(PixelData=None))
    series("NumberOfFrames 1000 in one file", REFUSE, first(NumberOfFrames="1000"))
    series("one slice only", WARN, lambda files, folder: [f.unlink() for f in files[1:]])
    cases[-1].warning = "single sagittal slice"
    cases.append(Case("dicom", "one DICOM file given (its series is read)", str(base.dicom_files[0]), OK))
    return cases


def permissions_cases(base: Base, work: Path) -> list[Case]:
    """Unreadable inputs, unwritable outputs and a full disk; the cases run without root's override."""
    root = work / "permissions"
    root.mkdir()
    unreadable = root / "unreadable.nii.gz"
    shutil.copy(base.files[".nii.gz"], unreadable)
    unreadable.chmod(0)
    one_file = root / "one_unreadable"
    _copy_series(base, one_file)[-1].chmod(0)
    closed = root / "closed"
    _copy_series(base, closed)
    closed.chmod(0)
    split = root / "split"            # the last two slices in a subfolder nobody may list
    split.mkdir()
    for f in base.dicom_files[:3]:
        shutil.copy(f, split / f.name)
    (split / "more").mkdir()
    for f in base.dicom_files[3:]:
        shutil.copy(f, split / "more" / f.name)
    (split / "more").chmod(0)
    locked = root / "locked_out"
    locked.mkdir()
    locked.chmod(0o555)
    a_file = root / "a_file"
    a_file.write_text("x")
    earlier = _old_results(root / "earlier_results")
    earlier_full_disk = _old_results(root / "earlier_results_full_disk")
    nii = str(base.files[".nii.gz"])
    return [
        Case("permissions", "unreadable .nii.gz", str(unreadable), REFUSE),
        Case("permissions", "one unreadable file in the series", str(one_file), REFUSE),
        Case("permissions", "unreadable DICOM folder", str(closed), REFUSE),
        Case("permissions", "unreadable subfolder holding 2 of 5 slices", str(split), REFUSE),
        Case("permissions", "output folder not writable", nii, REFUSE, output=locked),
        Case("permissions", "output inside a folder not writable", nii, REFUSE, output=locked / "out"),
        Case("permissions", "output path is a file", nii, REFUSE, output=a_file),
        Case("permissions", "output path below a file", nii, REFUSE, output=a_file / "out"),
        Case("permissions", "output in /proc", nii, REFUSE, output=Path("/proc/spinenet_out")),
        Case("permissions", "full disk (files over 2 kB fail)", nii, REFUSE, file_size_limit=2048),
        Case("permissions", "full disk, earlier results in the folder", nii, REFUSE, output=earlier_full_disk,
             file_size_limit=2048),
        Case("permissions", "bad input, earlier results in the folder", str(root / "missing.nii.gz"), REFUSE,
             output=earlier),
    ]


def _old_results(folder: Path) -> Path:
    """An earlier result set, which a failed run must leave exactly as it was."""
    folder.mkdir()
    for name in RESULT_SET:
        (folder / name).write_text(f"earlier {name}\n")
    return folder


def options_cases(base: Base, work: Path) -> list[Case]:
    """Bad option values, and weights the tool must refuse (never run code from an unverified file)."""
    nii, dicom = str(base.files[".nii.gz"]), str(base.dicom)
    weights = _weights_folders(work / "weights")
    marker = work / "weights" / "PLANTED_CODE_RAN"
    no_code = lambda: "the planted pickle ran" if marker.exists() else None  # noqa: E731
    specs = [
        ("--pixel-spacing 1000 1000", nii, ("--pixel-spacing", "1000", "1000"), REFUSE),
        ("--pixel-spacing 0.001 0.001", nii, ("--pixel-spacing", "0.001", "0.001"), REFUSE),
        ("--pixel-spacing 1000 1000 (DICOM)", dicom, ("--pixel-spacing", "1000", "1000"), REFUSE),
        ("--pixel-spacing 0 1", nii, ("--pixel-spacing", "0", "1"), REFUSE),
        ("--pixel-spacing nan nan", nii, ("--pixel-spacing", "nan", "nan"), REFUSE),
        ("--pixel-spacing inf inf", nii, ("--pixel-spacing", "inf", "inf"), REFUSE),
        ("--slice-spacing -4", nii, ("--slice-spacing", "-4"), REFUSE),
        ("--slice-spacing nan", dicom, ("--slice-spacing", "nan"), REFUSE),
        ("--slice-spacing 1e9", nii, ("--slice-spacing", "1e9"), ANY),
        ("--slice-spacing 1e-9", nii, ("--slice-spacing", "1e-9"), ANY),
        ("--threads 0", nii, ("--threads", "0"), REFUSE),
        ("--threads abc", nii, ("--threads", "abc"), REFUSE),
        ("--series on a NIfTI file", nii, ("--series", "1.2.3"), REFUSE),
        ("--dicom-out on a NIfTI file", nii, ("--dicom-out",), REFUSE),
        ("--hotspots Bogus", nii, ("--hotspots", "Bogus"), REFUSE),
        ("--hotspots with --no-grade", nii, ("--hotspots", "Herniation", "--no-grade"), REFUSE),
        ("--hotspot-augmentations 0", nii, ("--hotspots", "Herniation", "--hotspot-augmentations", "0"), REFUSE),
        ("--profile bogus", nii, ("--profile", "bogus"), REFUSE),
        ("--precision fp8", nii, ("--precision", "fp8"), REFUSE),
        ("--device bogus", nii, ("--device", "bogus"), REFUSE),
        ("--device cuda (no GPU here)", nii, ("--device", "cuda"), ANY),
        ("unknown option", nii, ("--frobnicate",), REFUSE),
        ("--weights missing folder", nii, ("--weights", str(work / "nowhere")), REFUSE),
        ("--weights a file", nii, ("--weights", nii), REFUSE),
        ("--weights official, nothing downloaded", nii, ("--weights", "official"), REFUSE),
    ]
    cases = [Case("options", name, path, expect, options=opts, threads=opts[0] != "--threads")
             for name, path, opts, expect in specs]
    for name, folder in weights.items():
        cases.append(Case("options", f"--weights {name}", nii, REFUSE, options=("--weights", str(folder)), check=no_code))
    planted = weights["with a planted pickle"]
    cases.append(Case("options", "--weights planted pickle, --trust-sha256 of another file", nii, REFUSE,
                      options=("--weights", str(planted), "--trust-sha256", "0" * 64), check=no_code))
    cache = work / "weights" / "cache"
    for sub in ("detect-vfr", "appearance", "context", "grading"):      # the official layout, unverified
        (cache / "official" / sub).mkdir(parents=True)
        shutil.copy(planted / "detector.pt", cache / "official" / sub / "model.pt")
    cases.append(Case("options", "--weights official, a pickle planted in the cache", nii, REFUSE,
                      options=("--weights", "official"), env={"SPINENET_CACHE": str(cache)}, check=no_code))
    return cases


def _weights_folders(root: Path) -> dict[str, Path]:
    """Weight folders that must be refused: NaN values, garbage, truncation, a pickle that runs code."""
    import pickle

    import torch

    bundled = ROOT / "SpineNetLib" / "weights" / "bundled"
    folders = {}
    for name in ("with NaN weights", "with a garbage detector.pt", "with a truncated context.pt",
                 "with a planted pickle"):
        folder = root / re.sub(r"\W+", "_", name)
        shutil.copytree(bundled, folder)
        folders[name] = folder
    ckpt = torch.load(folders["with NaN weights"] / "appearance.pt", map_location="cpu", weights_only=True)
    next(v for v in ckpt["net"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(ckpt, folders["with NaN weights"] / "appearance.pt")
    (folders["with a garbage detector.pt"] / "detector.pt").write_bytes(os.urandom(5000))
    context = folders["with a truncated context.pt"] / "context.pt"
    context.write_bytes(context.read_bytes()[:context.stat().st_size // 2])

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PLANTED_CODE_RAN'}",))

    (folders["with a planted pickle"] / "detector.pt").write_bytes(pickle.dumps({"state_dict": Planted()}))
    return folders


def valid_cases(base: Base, work: Path) -> list[Case]:
    """Full default runs (grading, preview) of every file type, and the expensive options once."""
    cases = [Case("valid", f"{ext} (defaults)", str(path), OK) for ext, path in base.files.items()]
    cases.append(Case("valid", "DICOM folder (defaults, with progress)", str(base.dicom), OK, quiet=False))
    cases.append(Case("valid", "DICOM folder --dicom-out", str(base.dicom), OK, options=("--dicom-out",)))
    packed = shutil.make_archive(str(work / "valid" / "series"), "zip", base.dicom)
    cases.append(Case("valid", "ZIP archive of the DICOM folder --dicom-out", packed, OK, options=("--dicom-out",)))
    cases.append(Case("valid", "--hotspots Herniation, 1 augmentation", str(base.files[".nii.gz"]), OK,
                      options=("--hotspots", "Herniation", "--hotspot-augmentations", "1")))
    cases.append(Case("valid", "--profile official", str(base.files[".nii.gz"]), OK, options=("--profile", "official")))
    cases.append(Case("valid", "default threads", str(base.files[".nii.gz"]), OK, threads=False))
    return cases


# --------------------------------------------------------------------------- DICOM header mutants

#: Header elements most worth corrupting; other elements of the file are picked too.
KEY_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "SamplesPerPixel", "PhotometricInterpretation", "PixelSpacing", "ImageOrientationPatient",
                "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices", "RescaleSlope",
                "RescaleIntercept", "InstanceNumber", "SeriesInstanceUID", "SOPClassUID", "Modality",
                "PixelData", "NumberOfFrames", "WindowCenter", "SliceLocation", "SeriesDescription")
GARBAGE_TEXT = ("", "abc", "-1", "0", "1e400", "-1e400", "nan", "inf", "9" * 30, "65535", "4294967296",
                "1\\2\\3", "0.0000001", "-0", "1" * 200, "\\\\\\", " ", "NaN\\NaN", "\u0661\u0662", "1e-400")
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _elements(raw: bytes) -> list[tuple[int, str, int, int, int]]:
    """(tag, VR, element start, value start, value length) of the top-level elements after the file meta."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw), force=True)
    out = []
    for tag in list(ds._dict):
        elem = ds._dict[tag]
        if tag >> 16 == 2 or not hasattr(elem, "value_tell") or elem.length == 0xFFFFFFFF:
            continue
        vr = str(elem.VR)
        header = 12 if vr in _LONG_VRS else 8
        out.append((int(tag), vr, elem.value_tell - header, elem.value_tell, elem.length))
    return out


def _mutated_value(rng: random.Random, vr: str, length: int) -> bytes:
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "AT", "OB", "OW", "OF", "OD", "UN") or rng.random() < 0.15:
        n = rng.choice([0, 1, 2, 3, 4, 6, 8, 16, max(0, length // 2), length + 2])
        kind = rng.random()
        if kind < 0.3:
            return struct.pack("<d", rng.choice([float("nan"), float("inf"), 1e308, -1e308]))[:n] or b""
        if kind < 0.5:
            return b"\xff" * n
        return bytes(rng.randrange(256) for _ in range(n))
    return rng.choice(GARBAGE_TEXT).encode("utf-8", "surrogatepass")


def mutate_file(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random corruption of one header element: a garbage value, a wrong length, or deletion."""
    elements = _elements(raw)
    by_name = {pydicom.datadict.keyword_for_tag(e[0]): e for e in elements}
    keys = [k for k in KEY_KEYWORDS if k in by_name]
    tag, vr, start, value_at, length = by_name[rng.choice(keys)] if keys and rng.random() < 0.7 else rng.choice(elements)
    name = pydicom.datadict.keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    action = rng.random()
    if action < 0.1:
        return raw[:start] + raw[value_at + length:], f"{name} deleted"
    if action < 0.2:          # a length that lies: longer than the value, up to the end of the file
        claimed = min(0xFFFF if vr not in _LONG_VRS else 0xFFFFFFF0, length + rng.choice([1, 2, 100, 65533]))
        fmt = "<I" if vr in _LONG_VRS else "<H"
        return raw[:value_at - struct.calcsize(fmt)] + struct.pack(fmt, claimed) + raw[value_at:], \
            f"{name} length {length} -> {claimed}"
    value = _mutated_value(rng, vr, length)
    if vr not in _LONG_VRS:
        value = value[:0xFFFF]
    fmt = "<I" if vr in _LONG_VRS else "<H"
    patched = raw[:value_at - struct.calcsize(fmt)] + struct.pack(fmt, len(value)) + value + raw[value_at + length:]
    return patched, f"{name} = {value[:24]!r}"


def mutant_cases(base: Base, work: Path, n: int, seed: int) -> list[Case]:
    """``n`` copies of the phantom's series, each with 1-3 random header corruptions in one or all files."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        folder = work / "mutants" / f"m{i:03d}"
        files = _copy_series(base, folder)
        targets = files if rng.random() < 0.3 else [rng.choice(files)]
        changes = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            mutation_seed = rng.randrange(1 << 30)
            for f in targets:
                patched, what = mutate_file(f.read_bytes(), random.Random(mutation_seed))
                f.write_bytes(patched)
            changes.append(what)
        where = "every file" if len(targets) > 1 else targets[0].name
        extra = ("--dicom-out",) if i % 4 == 3 else ()       # the DICOM results read the headers again
        cases.append(Case("mutants", f"#{i}: {'; '.join(changes)} in {where}", str(folder), ANY, options=extra))
    return cases


def build_cases(base: Base, work: Path, only: set[str], mutants: int, seed: int) -> list[Case]:
    builders = {"files": files_cases, "geometry": geometry_cases, "voxels": voxels_cases, "nothing": nothing_cases,
                "dicom": dicom_cases, "permissions": permissions_cases, "options": options_cases,
                "valid": valid_cases}
    cases = []
    for category in CATEGORIES:
        if category not in only:
            continue
        if category == "mutants":
            cases += mutant_cases(base, work, mutants, seed)
        else:
            cases += builders[category](base, work)
    return cases
