"""The extension's build files and packaging: explicit file lists match the disk, metadata is complete."""

from __future__ import annotations

import ast
import os
import re
import struct
from pathlib import Path

import pytest

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


#: SpineNetLib's sub-packages the extension installs: everything inference needs.
INSTALLED_PACKAGES = ("core", "inputs", "detect", "label", "discs", "models", "weights", "outputs", "apps", "cohort",
                      "slicer")
#: Development tools, not installed (the module's self-test does not use the phantom).
NOT_INSTALLED_PACKAGES = ("training", "evaluation", "synthetic")


def _installed_library_files(keep) -> list[str]:
    """Files of SpineNetLib the extension must install (paths from the repository root)."""
    library = REPO / "SpineNetLib"
    files = [p for p in library.iterdir() if p.is_file() and keep(p)]
    for package in INSTALLED_PACKAGES:
        files += [p for p in (library / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts and keep(p)]
    return sorted(p.relative_to(REPO).as_posix() for p in files)


def _macro_arguments(text: str, macro: str) -> dict[str, list[str]]:
    """Keyword -> values of a CMake macro call such as ``slicerMacroBuildScriptedModule(NAME x SCRIPTS a b ...)``."""
    body = text[text.index(macro + "(") + len(macro) + 1:]
    body = body[:body.index(")")]
    arguments, keyword = {}, None
    for token in body.split():
        if token.isupper() and not token.startswith("$"):
            keyword = token
            arguments[keyword] = []
        elif keyword is not None:
            arguments[keyword].append(token)
    return arguments


def test_every_sub_package_is_either_installed_or_a_development_tool():
    packages = sorted(p.name for p in (REPO / "SpineNetLib").iterdir() if (p / "__init__.py").is_file())
    unknown = sorted(set(packages) - set(INSTALLED_PACKAGES) - set(NOT_INSTALLED_PACKAGES))
    assert not unknown, (f"new SpineNetLib sub-package(s) {unknown}: add them to SPINENETLIB_SCRIPTS in "
                         "SpineNet/CMakeLists.txt (and INSTALLED_PACKAGES here) if inference needs them, "
                         "else to NOT_INSTALLED_PACKAGES")
    assert sorted(set(INSTALLED_PACKAGES) | set(NOT_INSTALLED_PACKAGES)) == packages


def test_spinenetlib_files_are_listed_explicitly():
    lists = _cmake_lists(MODULE_DIR / "CMakeLists.txt")
    scripts = _installed_library_files(lambda p: p.suffix == ".py")
    resources = _installed_library_files(lambda p: p.suffix not in (".py", ".pyc"))
    listed_scripts = lists["SPINENETLIB_SCRIPTS"]
    missing = sorted(set(scripts) - set(listed_scripts))
    stale = sorted(set(listed_scripts) - set(scripts))
    assert not missing and not stale, (
        f"update SPINENETLIB_SCRIPTS in SpineNet/CMakeLists.txt: add {missing}, remove {stale}")
    assert listed_scripts == sorted(listed_scripts), "keep SPINENETLIB_SCRIPTS sorted"
    assert sorted(lists.get("SPINENETLIB_RESOURCES", [])) == resources, (
        f"SPINENETLIB_RESOURCES in SpineNet/CMakeLists.txt must list exactly {resources}")
    # what inference needs is there: the pipeline, the worker, the MRML writer, the bundled weights
    for name in ("SpineNetLib/__init__.py", "SpineNetLib/__main__.py", "SpineNetLib/pipeline.py",
                 "SpineNetLib/apps/worker.py", "SpineNetLib/apps/cli.py", "SpineNetLib/slicer/mrml.py"):
        assert name in listed_scripts
    bundled = sorted(p.name for p in (REPO / "SpineNetLib" / "weights" / "bundled").iterdir() if p.is_file())
    assert "MODEL_CARD.md" in bundled and any(n.endswith(".pt") for n in bundled)
    assert sorted(lists["SPINENETLIB_RESOURCES"]) == [f"SpineNetLib/weights/bundled/{n}" for n in bundled]


def test_training_evaluation_and_synthetic_are_not_installed():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = " ".join(" ".join(v) for v in _cmake_lists(MODULE_DIR / "CMakeLists.txt").values())
    for package in NOT_INSTALLED_PACKAGES:
        assert f"SpineNetLib/{package}/" not in listed, f"SpineNetLib/{package}/ must not be installed"
        assert (REPO / "SpineNetLib" / package / "__init__.py").is_file()   # it exists: the check means something
    assert "None are committed yet" not in text


def _library_imports(path: Path) -> set[str]:
    """Every ``SpineNetLib...`` module a file imports (module level, inside functions, ``from X import y``
    as X and, where y is a module file, X.y)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] == "SpineNetLib"}


def _module_file(name: str) -> str | None:
    """Repository-relative file of a SpineNetLib module, or None for a name that is not a module."""
    parts = name.split(".")
    for candidate in ("/".join(parts) + ".py", "/".join(parts) + "/__init__.py"):
        if (REPO / candidate).is_file():
            return candidate
    return None


def test_what_the_module_runs_imports_only_installed_files():
    """The import closure of the module, the batch script and the worker (lazy imports included) is installed."""
    installed = set(_cmake_lists(MODULE_DIR / "CMakeLists.txt")["SPINENETLIB_SCRIPTS"])
    roots = [MODULE_DIR / "SpineNet.py", *sorted((MODULE_DIR / "SpineNetModuleLib").glob("*.py")),
             MODULE_DIR / "Scripts" / "SpineNetBatch.py",
             REPO / "SpineNetLib" / "apps" / "worker.py", REPO / "SpineNetLib" / "pipeline.py"]
    seen, todo, outside = set(), list(roots), []
    while todo:
        path = todo.pop()
        for name in sorted(_library_imports(path)):
            parts = name.split(".")
            for n in range(1, len(parts) + 1):       # a module's parent packages are imported too
                relative = _module_file(".".join(parts[:n]))
                if relative is None or relative in seen:
                    continue
                seen.add(relative)
                if relative not in installed:
                    outside.append(f"{path.relative_to(REPO)} imports {relative}")
                todo.append(REPO / relative)
    assert not outside, "the installed extension lacks what this code imports:\n" + "\n".join(outside)
    assert {"SpineNetLib/apps/worker.py", "SpineNetLib/slicer/mrml.py", "SpineNetLib/pipeline.py"} <= seen


def test_module_scripts_and_resources_are_listed():
    lists = _cmake_lists(MODULE_DIR / "CMakeLists.txt")
    scripts = sorted(p.name for p in MODULE_DIR.glob("*.py"))
    assert scripts == ["SpineNet.py"]
    # the module's own package (logic, workers): every file listed
    package = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "SpineNetModuleLib").rglob("*.py"))
    assert "SpineNetModuleLib/__init__.py" in package
    assert sorted(lists["MODULE_PYTHON_SCRIPTS"]) == sorted(scripts + package)
    # Resources: everything but the development script that draws the icon
    resources = _files(MODULE_DIR / "Resources", lambda p: p.suffix != ".py")
    resources = sorted(f"Resources/{r}" for r in resources)
    assert sorted(lists["MODULE_PYTHON_RESOURCES"]) == resources
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "file(GLOB" not in text.replace(" ", "")


def test_every_python_file_in_the_module_folder_is_a_module():
    """Slicer loads every .py file of a module folder as a module (and logs an error for one that is not)."""
    for path in MODULE_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
        assert classes.get(path.stem) == ["ScriptedLoadableModule"], (
            f"{path.name} is not a scripted module: move it out of {MODULE_DIR.name}/ (e.g. to Scripts/)")


def test_batch_script_is_installed_as_a_script_not_as_a_module():
    lists = _cmake_lists(MODULE_DIR / "CMakeLists.txt")
    scripts = sorted(f"Scripts/{p.name}" for p in (MODULE_DIR / "Scripts").glob("*.py"))
    assert scripts == ["Scripts/SpineNetBatch.py"] == lists["MODULE_PYTHON_USER_SCRIPTS"]
    assert not (MODULE_DIR / "SpineNetBatch.py").exists()
    assert not any("Batch" in s for s in lists["MODULE_PYTHON_SCRIPTS"])
    macro = _macro_arguments((MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8"),
                             "slicerMacroBuildScriptedModule")
    # RESOURCES are copied to <qt-scripted-modules>/Scripts/ as they are; SCRIPTS would be byte-compiled
    assert "${MODULE_PYTHON_USER_SCRIPTS}" in macro["RESOURCES"]
    assert "${MODULE_PYTHON_USER_SCRIPTS}" not in macro["SCRIPTS"]
    assert macro["SCRIPTS"] == ["${MODULE_PYTHON_SCRIPTS}", "${SPINENETLIB_BINARY_SCRIPTS}"]
    for doc in ("README.md", "docs/SLICER.md"):
        text = (REPO / doc).read_text(encoding="utf-8")
        assert "SpineNet/Scripts/SpineNetBatch.py" in text and "SpineNet/SpineNetBatch.py" not in text, doc


_INSTALLED_CHECK = r"""
import importlib.util, json, sys
install, tests, fake, scan_path, truth, out = sys.argv[1:7]
sys.path.insert(0, install)          # Slicer puts the module folder on sys.path
sys.path.insert(1, tests)
import slicer_standins as standins
from SpineNetLib.slicer import mrml

scene = mrml.new_scene()
qt, ctk, slicer, slm, _ = standins.make_modules(scene)
sys.modules.update({"qt": qt, "ctk": ctk, "slicer": slicer, "slicer.ScriptedLoadableModule": slm})

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

module = load("SpineNet", install + "/SpineNet.py")
test = module.SpineNetTest()
test.runTest()
batch = load("SpineNetBatch", install + "/Scripts/SpineNetBatch.py")
code = batch.main(["--input", scan_path, "--output", out, "--quiet", "--pipeline", fake,
                   "--option", "vertebrae=" + truth])
import SpineNetLib
tooling = sorted(m for m in sys.modules if m.split(".")[:2] in (["SpineNetLib", "training"],
                 ["SpineNetLib", "evaluation"], ["SpineNetLib", "synthetic"]))
print(json.dumps({"library": SpineNetLib.__file__, "selftest": test.messages, "batch": code, "tooling": tooling}))
"""


def test_the_installed_file_set_runs_the_module_and_the_batch_script(tmp_path):
    """Lay out the files as the extension installs them (from the CMake lists), then run the module's
    self-test (through the worker's entry point) and the batch script from there, in a fresh Python."""
    import json
    import shutil
    import subprocess
    import sys

    pytest.importorskip("slicer")
    pytest.importorskip("PySide6")
    lists = _cmake_lists(MODULE_DIR / "CMakeLists.txt")
    install = tmp_path / "qt-scripted-modules"
    for name in lists["MODULE_PYTHON_SCRIPTS"] + lists["MODULE_PYTHON_RESOURCES"] + lists["MODULE_PYTHON_USER_SCRIPTS"]:
        (install / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MODULE_DIR / name, install / name)
    for name in lists["SPINENETLIB_SCRIPTS"] + lists["SPINENETLIB_RESOURCES"]:
        (install / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, install / name)

    from SpineNetLib.inputs.writers import write_image
    from SpineNetLib.outputs import documents
    from SpineNetLib.synthetic.phantom import make_phantom

    phantom = make_phantom(fov="lumbar", shape=(128, 128), pixel_spacing=(2.3, 2.3), n_slices=7)
    scan_path = write_image(phantom.voxels_kji, phantom.ijk_to_ras, tmp_path / "scan.nii.gz")
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(documents.vertebrae_document_from_truth(phantom.scan, phantom.vertebrae)))
    check = tmp_path / "check_installed.py"
    check.write_text(_INSTALLED_CHECK)
    tests = Path(__file__).resolve().parent
    fake = f"{tests / 'slicer_fake_pipeline.py'}:run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["QT_QPA_PLATFORM"] = "offscreen"
    proc = subprocess.run([sys.executable, str(check), str(install), str(tests), fake, str(scan_path), str(truth),
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["library"]).resolve().is_relative_to(install.resolve()), report["library"]
    assert report["selftest"][-1] == "SpineNet self-test passed"
    assert "Running the worker's entry point in process" in report["selftest"]
    assert report["batch"] == 0 and report["tooling"] == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["discs.csv", "preview.png", "result.json",
                                                                   "scene.mrb", "vertebrae.csv", "vertebrae.json"]


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
    # what benchmarks/render_slicer_screenshots.py writes: panel and slice view first, then each alone, the table
    assert screenshots == [f"docs/images/{name}.png" for name in
                           ("slicer_layout", "slicer_slice_view", "slicer_panel", "slicer_results_table")]


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
    assert {re.split(r"[<>=]", line)[0] for line in lines} == {"numpy", "scipy", "pydicom", "SimpleITK", "pillow",
                                                              "scikit-image", "python-gdcm", "torch"}
