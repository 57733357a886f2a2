"""Where a benchmark number came from: the machine, the library versions and the source commit.

The commit is read from the repository's own files (``.git/HEAD``, the ref it names or
``packed-refs``) rather than by running ``git``: library code starts no processes it does not need,
and a benchmark run from an installed wheel, with no repository around it, records the package
version instead (``source: "package"``), never a wrong commit.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def _git_dir(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        candidate = folder / ".git"
        if candidate.is_dir():
            return candidate
        if candidate.is_file():  # a worktree: ".git" is a file saying "gitdir: <path>"
            text = candidate.read_text(encoding="utf-8").strip()
            if text.startswith("gitdir:"):
                return (folder / text.removeprefix("gitdir:").strip()).resolve()
    return None


def _resolve_ref(git_dir: Path, ref: str) -> str | None:
    for folder in (git_dir, _common_dir(git_dir)):
        loose = folder / ref
        if loose.is_file():
            return loose.read_text(encoding="utf-8").strip() or None
        packed = folder / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8").splitlines():
                sha, _, name = line.partition(" ")
                if name.strip() == ref and not line.startswith(("#", "^")):
                    return sha
    return None


def _common_dir(git_dir: Path) -> Path:
    common = git_dir / "commondir"  # worktrees keep their refs in the main repository
    return (git_dir / common.read_text(encoding="utf-8").strip()).resolve() if common.is_file() else git_dir


def source_commit(start: Path | None = None) -> dict[str, str | None]:
    """``{"source": "git", "commit": sha}`` of the checkout holding this package, or, with no
    repository around it, ``{"source": "package", "version": ...}`` (an installed wheel)."""
    git_dir = _git_dir((start or Path(__file__)).resolve().parent)
    if git_dir is not None and (git_dir / "HEAD").is_file():
        head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
        sha = _resolve_ref(git_dir, head.removeprefix("ref:").strip()) if head.startswith("ref:") else head
        if sha:
            return {"source": "git", "commit": sha}
    try:
        version: str | None = metadata.version("cladapt")
    except metadata.PackageNotFoundError:
        version = None
    return {"source": "package", "version": version}


def machine_info() -> dict[str, Any]:
    """The machine and library versions a result was measured with, and the source it ran from."""
    import peft
    import torch
    import transformers

    source = source_commit()
    return {
        "platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(), "git_commit": source.get("commit"), "source": source,
    }
