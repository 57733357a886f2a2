"""Shared fixtures: a tiny random model, a store, small task files, and an offline guard."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py (no __init__.py in tests/)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_TQDM", "1")

SHARED = Path(os.environ.get("CLADAPT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
CL_BENCHMARK = SHARED / "data" / "cl-benchmark"
GENERAL_REPLAY = SHARED / "data" / "general-replay"

_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address: object) -> object:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"tests must not use the network (tried {address})")
    return _real_connect(self, address)


@pytest.fixture(autouse=True, scope="session")
def _offline_guard() -> None:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fingerprint memos go to a temp cache, never the user's (the real model's cache is kept)."""
    if "CLADAPT_CACHE" not in os.environ:
        monkeypatch.setenv("CLADAPT_FINGERPRINT_CACHE", str(tmp_path_factory.getbasetemp() / "fp-cache"))


@pytest.fixture(scope="session")
def tiny_base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_loaded(tiny_base_path: Path):
    """A freshly loaded (model, tokenizer, info) of the tiny model."""
    from cladapt.base_model import load

    return load(str(tiny_base_path))


@pytest.fixture
def store(tmp_path: Path):
    from cladapt.registry.store import Store

    return Store.init(tmp_path / "reg")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_rows(kind: str, n: int = 16) -> list[dict]:
    """Small synthetic classification tasks the tiny model can fit a little."""
    if kind == "sentiment":
        words = [("the film was great", "positive"), ("the film was terrible", "negative")]
        instr = "What is the sentiment of the following paragraph? Option: positive, negative\n"
    else:
        words = [("the actor plays sports", "sports"), ("the company does business", "business")]
        instr = "What is the topic of the following paragraph? Option: sports, business\n"
    return [{"instruction": instr, "input": f"{words[i % 2][0]} {i}", "output": words[i % 2][1]} for i in range(n)]


@pytest.fixture
def two_tasks(tmp_path: Path) -> dict[str, Path]:
    return {
        "sentiment": write_jsonl(tmp_path / "sentiment.jsonl", task_rows("sentiment")),
        "topics": write_jsonl(tmp_path / "topics.jsonl", task_rows("topics")),
    }


def tiny_overrides(**extra: object) -> list[str]:
    """--set overrides that keep training on the tiny model to a few steps."""
    base = {
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.logging_steps": 1,
        "train.save_steps": 2,
        "train.learning_rate": 0.01,
        "lora.r": 4,
        "lora.dropout": 0.0,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def cli_run(*args: object, ok: bool = True):
    """Invoke the cladapt CLI in-process; with ``ok``, assert it succeeded (showing its output)."""
    from click.testing import CliRunner

    from cladapt.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def set_args(**extra: object) -> list[str]:
    """``--set`` pairs of :func:`tiny_overrides` for CLI calls."""
    out: list[str] = []
    for item in tiny_overrides(**extra):
        out += ["--set", item]
    return out
