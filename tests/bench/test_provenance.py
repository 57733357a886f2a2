"""Benchmark provenance: the source commit is read from the repository's files, with a clear fallback."""

from __future__ import annotations

from pathlib import Path

from cladapt.bench.provenance import source_commit

SHA = "0123456789abcdef0123456789abcdef01234567"


def _repo(root: Path) -> Path:
    git = root / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "pkg").mkdir()
    return git


def test_a_branch_ref_loose_or_packed(tmp_path: Path) -> None:
    git = _repo(tmp_path)
    (git / "refs" / "heads" / "main").write_text(SHA + "\n")
    assert source_commit(tmp_path / "pkg" / "mod.py") == {"source": "git", "commit": SHA}
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{SHA} refs/heads/main\n^{'f' * 40}\n")
    assert source_commit(tmp_path / "pkg" / "mod.py")["commit"] == SHA


def test_a_detached_head_and_a_worktree(tmp_path: Path) -> None:
    git = _repo(tmp_path / "main")
    (git / "HEAD").write_text(SHA + "\n")
    assert source_commit(tmp_path / "main" / "pkg" / "mod.py")["commit"] == SHA
    worktree_git = git / "worktrees" / "wt"
    worktree_git.mkdir(parents=True)
    (worktree_git / "HEAD").write_text("ref: refs/heads/topic\n")
    (worktree_git / "commondir").write_text("../..\n")
    (git / "refs" / "heads" / "topic").write_text("f" * 40 + "\n")
    (tmp_path / "wt" / "pkg").mkdir(parents=True)
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {worktree_git}\n")
    assert source_commit(tmp_path / "wt" / "pkg" / "mod.py") == {"source": "git", "commit": "f" * 40}


def test_no_repository_records_the_package_version(tmp_path: Path) -> None:
    (tmp_path / "site" / "cladapt").mkdir(parents=True)
    found = source_commit(tmp_path / "site" / "cladapt" / "mod.py")
    assert found["source"] == "package" and "commit" not in found and found["version"]


def test_this_checkout_is_recorded_by_its_commit() -> None:
    import shutil
    import subprocess

    import pytest

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    assert source_commit() == {"source": "git", "commit": head}
