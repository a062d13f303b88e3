"""The demo model is package data: pyproject.toml maps the package bitnet_run.demo onto models/demo/
and ships demo.bnr, which is where paths.default_model looks in an installed package.

(Building a wheel takes about a minute here, compiling the runtime; the real install from a fresh
clone, `pip install .` then `cd /tmp && bitnet-run run -p ...`, was checked by hand, without network.)
"""
from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from bitnet_run import paths

ROOT = Path(__file__).resolve().parent.parent


def test_demo_model_is_package_data():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = ".".join(paths.PACKAGED_DEMO_MODEL.parent.relative_to(ROOT).parts)  # bitnet_run.demo
    assert package in setuptools["packages"]
    folder = ROOT / setuptools["package-dir"][package]
    shipped = [p for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, g) for g in setuptools["package-data"][package])]
    assert shipped == [folder / paths.PACKAGED_DEMO_MODEL.name]
    assert folder / paths.PACKAGED_DEMO_MODEL.name == ROOT / paths.DEMO_MODEL


def test_default_model_ignores_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.MODEL_ENV, raising=False)
    (tmp_path / "models" / "demo").mkdir(parents=True)
    (tmp_path / "models" / "demo" / "demo.bnr").write_bytes(b"not this one")
    monkeypatch.chdir(tmp_path)
    assert paths.default_model() == ROOT / paths.DEMO_MODEL
