"""Test helpers: a run as it goes on a machine where an optional package is not installed."""

from __future__ import annotations

import builtins

import numpy as np


def block_package(monkeypatch, package: str) -> None:
    """Make every later ``import package`` (and its sub-modules) fail as on a machine without it."""
    real_import = builtins.__import__

    def without_it(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {package!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_it)


def run_on_a_noise_scan(cli, tmp_path, capsys, *options: str) -> tuple[int, list[str]]:
    """``spinenet run`` with ``options`` on a small noise volume written under ``tmp_path`` (results in
    ``tmp_path / "out"``): (exit status, the lines it wrote to stderr)."""
    import SimpleITK as sitk

    image = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((5, 64, 64), np.float32)), str(image))
    status = cli.main(["run", str(image), "-o", str(tmp_path / "out"), *options, "--quiet"])
    return status, capsys.readouterr().err.strip().splitlines()
