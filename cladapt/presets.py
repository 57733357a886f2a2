"""Config files and the bundled presets (``configs/train/*.yaml``, ``configs/methods/*.yaml``), read as data.

Every problem is appended to ``issues`` naming the file (or ``preset:NAME``), so
:func:`cladapt.config.load_config` can report them all at once. ``yaml.safe_load`` only: a config
never names code to import.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cladapt.errors import Issue


def preset_text(kind: str, name: str) -> str | None:
    node = resources.files("cladapt.configs").joinpath(kind, f"{name}.yaml")
    return node.read_text() if node.is_file() else None


def preset_names(kind: str) -> list[str]:
    folder = resources.files("cladapt.configs").joinpath(kind)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_yaml(text: str, source: str, issues: list[Issue]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        issues.append(Issue(source, f"not valid YAML: {exc}"))
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        issues.append(Issue(source, f"expected a mapping at the top level, got {type(data).__name__}"))
        return {}
    return data


def read_user_file(ref: str, issues: list[Issue]) -> tuple[str, dict[str, Any]]:
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            issues.append(Issue(ref, "config file not found"))
            return ref, {}
        return str(path), load_yaml(path.read_text(), str(path), issues)
    text = preset_text("train", ref)
    if text is None:
        close = difflib.get_close_matches(ref, preset_names("train"), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; presets: {', '.join(preset_names('train'))}"
        issues.append(Issue(ref, "neither a file nor a train preset" + hint))
        return ref, {}
    return f"preset:{ref}", load_yaml(text, f"preset:{ref}", issues)
