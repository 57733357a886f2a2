"""The import graph stays one-way: a lower part of the package never imports a higher one.

Parts, lowest first (README, "Architecture"):

0. ``core``: every other module directly in ``cladapt/`` (``errors``, ``plugins``, ``precision``,
   ``distributed``, ``vision``, ``features``, ``base_model``, ...) and ``cladapt.text`` (the chat
   template, generation, plain texts): it imports nothing above it;
1. ``cladapt.registry``; 2. ``cladapt.adapters``; 3. ``cladapt.config``; 4. ``cladapt.evaluation``;
5. ``cladapt.train`` and ``cladapt.serve`` (peers: neither imports the other);
6. ``cladapt.bench`` and ``cladapt.route_eval`` (routers scored with evaluation);
7. ``cladapt.cli``; 8. ``cladapt.__main__``.

Every import counts, lazy ones inside functions and ``TYPE_CHECKING`` ones included: a type-only
import upward is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

LEVELS = {"core": 0, "registry": 1, "adapters": 2, "config": 3, "evaluation": 4, "train": 5, "serve": 5,
          "bench": 6, "route_eval": 6, "cli": 7, "__main__": 8}

#: imports that break the order today, each with the reason; remove an entry when its module moves
ALLOWED = {
}


def part(module: str) -> str:
    """``cladapt.train.run`` -> ``train``; ``cladapt.errors`` -> ``core``."""
    name = module.split(".")[1] if module.count(".") >= 1 else ""
    return name if name in LEVELS else "core"  # any other module directly in cladapt/ is core


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, from pyproject's package-dir mapping."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out: dict[str, Path] = {}
    for package in config["packages"]:
        folder = ROOT / config["package-dir"].get(package, "")
        if package not in config["package-dir"]:  # a subpackage: the nearest mapped parent + the rest
            parent = max((p for p in config["package-dir"] if package.startswith(p + ".")), key=len)
            folder = ROOT / config["package-dir"][parent] / package[len(parent) + 1 :].replace(".", "/")
        for path in folder.glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(path: Path) -> set[str]:
    """Every ``cladapt.*`` module ``path`` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cladapt.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "cladapt":  # from cladapt import distributed
                found |= {f"cladapt.{a.name}" for a in node.names}
            elif node.module.startswith("cladapt."):
                found.add(node.module)
    return found


def violations() -> list[str]:
    out = []
    for module, path in sorted(modules().items()):
        if module == "cladapt":
            continue
        here = part(module)
        for target in sorted(imports(path)):
            there = part(target)
            if there == here or LEVELS[there] < LEVELS[here]:
                continue
            if not any(here == h and (target == t or target.startswith(t + ".")) for h, t in ALLOWED):
                out.append(f"{path.relative_to(ROOT)}: {here} imports {target} ({there} is not below {here})")
    return out


def test_no_part_imports_a_higher_or_peer_part() -> None:
    assert violations() == []


def test_the_check_sees_lazy_and_type_only_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cladapt.serve.app import App\n"
        "def f():\n    import cladapt.train.run\n    from cladapt import distributed\n"
    )
    assert imports(probe) == {"cladapt.serve.app", "cladapt.train.run", "cladapt.distributed"}
    assert part("cladapt.train.run") == "train" and part("cladapt.text.generation") == "core"


def test_every_module_of_the_package_is_checked() -> None:
    found = modules()
    for expected in ("cladapt.evaluation.scoring", "cladapt.bench.cl", "cladapt.train.run", "cladapt.serve.routers.base",
                     "cladapt.registry.store", "cladapt.text.generation", "cladapt.cli.train"):
        assert expected in found
    assert {part(m) for m in found} >= set(LEVELS) - {"__main__"} | {"core"}


def test_allowed_exceptions_are_still_needed() -> None:
    """An exception nobody needs any more is removed, so the list says only what is true."""
    used = {(part(m), t) for m, p in modules().items() for t in imports(p)}
    for here, target in ALLOWED:
        assert any(h == here and (t == target or t.startswith(target + ".")) for h, t in used), (here, target)
