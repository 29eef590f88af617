"""The extension's build files and packaging: explicit file lists match the disk, metadata is complete."""

from __future__ import annotations

import re
import struct
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SpineNet"


def _cmake_lists(path: Path) -> dict[str, list[str]]:
    """``set(NAME item ...)`` blocks of a CMake file (quoted strings kept whole, ``${MODULE_NAME}`` expanded)."""
    text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.strip().startswith("#"))
    values = {}
    for match in re.finditer(r"\bset\(", text):
        items, token, quoted, n = [], "", False, match.end()
        while n < len(text):
            ch = text[n]
            if ch == '"':
                quoted = not quoted
                token += ch
            elif not quoted and ch == ")":
                break
            elif not quoted and ch.isspace():
                if token:
                    items.append(token)
                token = ""
            else:
                token += ch
            n += 1
        if token:
            items.append(token)
        if items:
            values[items[0]] = items[1:]
    module = values.get("MODULE_NAME", [""])[0]
    return {k: [v.replace("${MODULE_NAME}", module) for v in items] for k, items in values.items()}


def _files(folder: Path, keep) -> list[str]:
    return sorted(p.relative_to(folder.parent if folder.name == "SpineNetLib" else folder).as_posix()
                  for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts and keep(p))


def test_spinenetlib_files_are_listed_explicitly():
    lists = _cmake_lists(MODULE_DIR / "CMakeLists.txt")
    library = REPO / "SpineNetLib"
    scripts = _files(library, lambda p: p.suffix == ".py")
    resources = _files(library, lambda p: p.suffix not in (".py", ".pyc"))
    listed_scripts = lists["SPINENETLIB_SCRIPTS"]
    missing = sorted(set(scripts) - set(listed_scripts))
    stale = sorted(set(listed_scripts) - set(scripts))
    assert not missing and not stale, (
        f"update SPINENETLIB_SCRIPTS in SpineNet/CMakeLists.txt: add {missing}, remove {stale}")
    assert listed_scripts == sorted(listed_scripts), "keep SPINENETLIB_SCRIPTS sorted"
    assert sorted(lists.get("SPINENETLIB_RESOURCES", [])) == resources, (
        f"SPINENETLIB_RESOURCES in SpineNet/CMakeLists.txt must list exactly {resources}")


def test_module_scripts_and_resources_are_listed():
    lists = _cmake_lists(MODULE_DIR / "CMakeLists.txt")
    scripts = sorted(p.name for p in MODULE_DIR.glob("*.py"))
    assert sorted(lists["MODULE_PYTHON_SCRIPTS"]) == scripts
    # Resources: everything but the development script that draws the icon
    resources = _files(MODULE_DIR / "Resources", lambda p: p.suffix != ".py")
    resources = sorted(f"Resources/{r}" for r in resources)
    assert sorted(lists["MODULE_PYTHON_RESOURCES"]) == resources
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "file(GLOB" not in text.replace(" ", "")


def test_extension_metadata():
    lists = _cmake_lists(REPO / "CMakeLists.txt")
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                 "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert lists.get(name), f"{name} is not set"
    assert lists["EXTENSION_DEPENDS"] == ['"PyTorch"']
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "add_subdirectory(SpineNet)" in text
    assert "SpineNet.png" in " ".join(lists["EXTENSION_ICONURL"])
    screenshots = re.findall(r"docs/images/[\w.]+\.png", " ".join(lists["EXTENSION_SCREENSHOTURLS"]))
    assert screenshots and all((REPO / s).is_file() for s in screenshots)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icons_are_128_pixel_pngs():
    top, module = REPO / "SpineNet.png", MODULE_DIR / "Resources" / "Icons" / "SpineNet.png"
    assert _png_size(top) == (128, 128) and _png_size(module) == (128, 128)
    assert top.read_bytes() == module.read_bytes()
    assert (MODULE_DIR / "Resources" / "Icons" / "make_icon.py").is_file()


def test_licence_and_requirements():
    licence = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("BSD 3-Clause License")
    assert "non-commercial" in licence and "NOT part of this repository" in licence
    lines = [line for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {re.split(r"[<>=]", line)[0] for line in lines} == {"numpy", "scipy", "pydicom", "SimpleITK", "torch"}
