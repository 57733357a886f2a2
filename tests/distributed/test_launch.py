"""Launch detection, the world-size check, DeepSpeed config resolution and ZeRO-3 refusal (one process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cladapt.errors import CladaptError, ConfigError
from cladapt.train import distributed as D


def test_detect_launch_reads_torchrun_and_mpi_variables() -> None:
    assert D.detect_launch({}) == D.Launch(world_size=1, rank=0, local_rank=0, launcher="none")
    tr = D.detect_launch({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (tr.world_size, tr.rank, tr.local_rank, tr.launcher, tr.distributed) == (4, 3, 1, "torchrun", True)
    mpi = D.detect_launch({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"})
    assert (mpi.world_size, mpi.rank, mpi.launcher) == (2, 1, "mpi")
    with pytest.raises(CladaptError, match="WORLD_SIZE='two'"):
        D.detect_launch({"WORLD_SIZE": "two"})


def test_check_world_refuses_processes_that_would_train_alone() -> None:
    launch = D.Launch(world_size=2, rank=0, local_rank=0, launcher="torchrun")
    D.check_world(launch, 2, 2)  # consistent: no error
    with pytest.raises(CladaptError, match="started 2 processes but training would see 1") as info:
        D.check_world(launch, 1, 2)
    assert "ACCELERATE_USE_CPU=1" in (info.value.hint or "")


def test_start_is_a_no_op_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    launch = D.start(cuda=False)
    assert not launch.distributed
    import os

    assert "ACCELERATE_USE_CPU" not in os.environ  # nothing changed for a single process


def test_on_main_single_process_runs_once_and_propagates_errors() -> None:
    calls: list[int] = []
    result, shared = D.on_main(lambda: calls.append(1) or "done", publish=lambda r: r.upper())
    assert (result, shared, calls) == ("done", "DONE", [1])
    assert D.main_first(lambda: 7) == 7

    def boom() -> None:
        raise CladaptError("bad")

    with pytest.raises(CladaptError, match="bad"):
        D.on_main(boom)


def test_deepspeed_presets_resolve_to_bundled_json(tmp_path: Path) -> None:
    for name, stage in (("zero2", 2), ("zero3", 3)):
        path = Path(D.deepspeed_config(name))
        assert path.name == f"{name}.json"
        cfg = json.loads(path.read_text())
        assert cfg["zero_optimization"]["stage"] == stage
        # the Trainer fills these from the run config: batch sizes and clipping never disagree with it
        assert cfg["train_micro_batch_size_per_gpu"] == cfg["gradient_accumulation_steps"] == "auto"
    own = tmp_path / "ds.json"
    own.write_text("{}")
    assert D.deepspeed_config(str(own)) == str(own.resolve())
    with pytest.raises(ConfigError, match="missing.json.*presets: zero2, zero3"):
        D.deepspeed_config(str(tmp_path / "missing.json"))


def test_zero3_refused_for_whole_matrix_methods_and_allowed_for_lora() -> None:
    from cladapt.adapters import METHODS
    from cladapt.config import load_config
    from cladapt.train.trainer_setup import check_zero3

    for method, allowed in (("inflora", False), ("reglora", False), ("lora", True)):
        cfg, _ = load_config(method=method, overrides=[f"train.deepspeed={D.deepspeed_config('zero3')}"])
        if allowed:
            check_zero3(cfg, METHODS.get(method))
        else:
            with pytest.raises(CladaptError, match=f"{method}.*ZeRO-3") as info:
                check_zero3(cfg, METHODS.get(method))
            assert "ZeRO stage 2" in (info.value.hint or "")
        cfg2, _ = load_config(method=method, overrides=[f"train.deepspeed={D.deepspeed_config('zero2')}"])
        check_zero3(cfg2, METHODS.get(method))  # ZeRO-2 keeps whole parameters: every method runs


def test_require_deepspeed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_deepspeed(name: str, *args: object, **kwargs: object) -> object:
        if name == "deepspeed":
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    with pytest.raises(CladaptError, match="--deepspeed needs the deepspeed package") as info:
        D.require_deepspeed(D.deepspeed_config("zero2"))
    assert "cladapt[deepspeed]" in (info.value.hint or "")


def test_zero3_is_refused_for_every_method_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))  # installed or not
    D.require_deepspeed(D.deepspeed_config("zero2"))
    with pytest.raises(CladaptError, match="ZeRO-3 .*zero3.json.* process 0 alone") as info:
        D.require_deepspeed(D.deepspeed_config("zero3"))
    assert "--deepspeed zero2" in (info.value.hint or "")
