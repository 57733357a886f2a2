"""Packaging guards: every subfolder ships in the wheel, and the README lists every method."""

from __future__ import annotations

from pathlib import Path

import pytest

from cladapt.adapters import METHODS

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_python_folder_is_a_listed_package() -> None:
    tool = _pyproject()["tool"]["setuptools"]
    mapping = tool["package-dir"]
    listed = set(tool["packages"])
    on_disk = set()
    for package, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            on_disk.add(".".join([package, *rel.parts]) if rel.parts else package)
    # a subpackage of a mapped folder that is not listed would silently miss the wheel
    assert on_disk <= listed, sorted(on_disk - listed)
    for package in listed:
        parent = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / mapping[parent] / Path(*package[len(parent) + 1 :].split(".")) if package != parent else ROOT / mapping[parent]
        assert folder.is_dir(), f"{package} is listed but {folder} does not exist"


def test_configs_are_package_data() -> None:
    data = _pyproject()["tool"]["setuptools"]["package-data"]["cladapt.configs"]
    assert "**/*.yaml" in data
    for name in METHODS.names():
        assert (ROOT / "configs" / "methods" / f"{name}.yaml").is_file(), f"no preset for method {name}"


def test_readme_documents_every_method_and_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in METHODS.names():
        assert f"`{name}`" in readme, f"README's method table lacks {name}"
    assert "make demo" in readme and "make test" in readme


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()
