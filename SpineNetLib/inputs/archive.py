"""A ZIP archive as the input: a study as a PACS, a web viewer or a data portal hands it out.

:func:`unpacked` unpacks it into a temporary folder for as long as the caller needs the files (a
DICOM run's segmentation and report are made from the DICOM files after the inference) and removes
it afterwards; anything else passes through unchanged. Inside the archive the usual rules hold: a
DICOM folder (its sagittal series, ``--series``, a DICOMDIR's medium) or one image file.

Checked before a byte is written: the archive must be readable and unencrypted, and its files must
fit in the temporary folder's free space. Every file stays inside the folder (the standard library's
extraction strips absolute paths and ``..`` from the names; a file that still lands outside is
refused). macOS resource forks (``__MACOSX/``) are left out. Errors name the archive, not the
temporary folder.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from SpineNetLib.core.errors import InputError
from SpineNetLib.inputs.image import image_suffix

#: The folder that macOS's archiver adds beside the files (resource forks, never images).
MACOS_RESOURCE_FOLDER = "__MACOSX"


def is_zip_archive(path: Path) -> bool:
    """Whether ``path`` is a file in ZIP format (not an image file, not a DICOM file whose bytes happen
    to end like a ZIP archive)."""
    if not path.is_file() or image_suffix(path) is not None:
        return False
    try:
        with open(path, "rb") as handle:
            if handle.read(132)[128:] == b"DICM":   # a DICOM file's preamble
                return False
    except OSError:
        return False
    return zipfile.is_zipfile(path)


@contextlib.contextmanager
def unpacked(path) -> Iterator[Path]:
    """``path`` as it is, or for a ZIP archive the path to read inside the folder it is unpacked into:
    its one image file when it holds exactly one file and that is an image, else the folder. The folder
    is removed when the ``with`` block ends; an :class:`InputError` raised inside it names the archive
    instead of the folder."""
    archive = Path(path).expanduser()
    if not is_zip_archive(archive):
        yield archive
        return
    with unpacked_folder(archive) as folder:
        files = [p for p in folder.rglob("*") if p.is_file()]
        yield files[0] if len(files) == 1 and image_suffix(files[0]) is not None else folder


@contextlib.contextmanager
def unpacked_folder(archive: Path, only: str | None = None) -> Iterator[Path]:
    """The folder the ZIP archive ``archive`` is unpacked into (named after the archive, in a temporary
    folder), removed when the ``with`` block ends; an :class:`InputError` raised inside it names the
    archive instead of the folder. ``only``: a folder inside the archive (POSIX, as it is unpacked):
    only the files under it are unpacked, at their places (a cohort study of an archive of many)."""
    archive = Path(archive)
    with tempfile.TemporaryDirectory(prefix="spinenet-zip-") as temporary:
        folder = Path(temporary) / (archive.name[:-len(".zip")] if archive.name.lower().endswith(".zip")
                                    else archive.name)
        folder.mkdir()
        try:
            _extract(archive, folder, only)
            yield folder
        except InputError as error:
            raise InputError(str(error).replace(str(folder), archive.name)) from None


def _unpacked_name(member: zipfile.ZipInfo) -> str:
    """Where the standard library's extraction puts ``member``, relative to the folder (POSIX): its name
    without empty, ``.`` and ``..`` parts."""
    return "/".join(part for part in member.filename.split("/") if part not in ("", ".", ".."))


def _extract(archive: Path, folder: Path, only: str | None = None) -> None:
    """Unpack the archive's files (``only``: those under that folder) into ``folder`` after the checks of
    the module docstring."""
    try:
        with zipfile.ZipFile(archive) as opened:
            members = [m for m in opened.infolist() if not m.is_dir()
                       and PurePosixPath(m.filename).parts[:1] != (MACOS_RESOURCE_FOLDER,)]
            if not members:
                raise InputError(f"the ZIP archive {archive.name} holds no files")
            if only not in (None, "", "."):
                members = [m for m in members if f"{_unpacked_name(m)}/".startswith(f"{only.rstrip('/')}/")]
                if not members:
                    raise InputError(f"the ZIP archive {archive.name} holds nothing under {only} (was it changed?)")
            if any(m.flag_bits & 0x1 for m in members):
                raise InputError(f"the ZIP archive {archive.name} is encrypted: unpack it with its password first")
            needed = sum(m.file_size for m in members)
            free = shutil.disk_usage(folder).free
            if needed > free:
                raise InputError(f"the ZIP archive {archive.name} unpacks to {needed / 1e9:.1f} GB, more than the "
                                 f"{free / 1e9:.1f} GB free in the temporary folder (set TMPDIR, or unpack it yourself)")
            root = folder.resolve()
            for member in members:
                if root not in Path(opened.extract(member, folder)).resolve().parents:
                    raise InputError(f"the ZIP archive {archive.name} names a file outside its folder: "
                                     f"{member.filename!r}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as error:
        raise InputError(f"cannot read the ZIP archive {archive.name}: {' '.join(str(error).split())}") from None
    except OSError as error:
        raise InputError(f"cannot unpack the ZIP archive {archive.name}: {error.strerror or error}") from None
