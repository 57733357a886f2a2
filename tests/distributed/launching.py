"""Helpers of the multi-process tests: launch ``cladapt`` under torchrun / accelerate, read the registry."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(launcher: list[str], args: list[object], cwd: Path, *, env: dict[str, str] | None = None) -> str:
    """Run ``cladapt <args>`` under ``launcher`` with 2 processes; returns the combined output."""
    full_env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full_env.pop("ACCELERATE_USE_CPU", None)  # the run must set the CPU flag itself
    cmd = [*launcher, "-m", "cladapt", *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def accelerate_launch() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    if not exe.is_file():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    return [str(exe), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def only_version(registry: Path, task: str) -> tuple[dict, Path]:
    versions = sorted((registry / "tasks" / task).glob("v*"))
    assert [v.name for v in versions] == ["v1"], versions  # exactly one version: no duplicate commit
    status = json.loads((registry / "tasks" / task / "status.json").read_text())
    assert json.dumps(status).count('"active"') >= 1, status
    return json.loads((versions[0] / "manifest.json").read_text()), versions[0]


def updates(version: Path) -> dict[str, torch.Tensor]:
    """Per module, the adapter's update ``B @ A`` (invariant to the sign of designed eigenvectors)."""
    state = load_file(str(version / "adapter" / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if ".lora_A." in key:
            out[key.split(".lora_A.")[0]] = state[key.replace(".lora_A.", ".lora_B.")].double() @ a.double()
    assert out
    return out


def assert_same_adapter(one: Path, two: Path) -> None:
    u1, u2 = updates(one), updates(two)
    assert u1.keys() == u2.keys()
    for k in u1:
        assert u1[k].abs().max() > 0, k  # trained: a zero update would make the comparison vacuous
        torch.testing.assert_close(u2[k], u1[k], rtol=1e-4, atol=1e-6, msg=k)
