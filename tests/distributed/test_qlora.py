"""QLoRA: ``cladapt train --load-in-4bit`` / ``--load-in-8bit`` on the tiny model.

bitsandbytes >= 0.48 quantises and trains on CPU, so the CPU tests run wherever the ``bnb`` extra
is installed (they skip, saying so, where it is not); the ``gpu`` test repeats the 4-bit run on
CUDA and skips without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cli_run, set_args, task_rows, write_jsonl
from safetensors.torch import load_file

from cladapt.errors import CladaptError
from cladapt.train import quantization as Q


def _bnb_or_skip() -> None:
    pytest.importorskip("bitsandbytes", reason="the bnb extra (bitsandbytes) is not installed")


def _train_quantized(tmp_path: Path, tiny_base_path: Path, flag: str) -> tuple[dict, Path]:
    rows = write_jsonl(tmp_path / "s.jsonl", task_rows("sentiment", 8))
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    cli_run("train", "--registry", reg, "--task", "s", "--data", rows, "--base-model", tiny_base_path, flag,
            *set_args(**{"train.max_steps": 2}))
    version = reg / "tasks" / "s" / "v1"
    return json.loads((version / "manifest.json").read_text()), version


def _check_plain_lora_on_full_base(version: Path, tiny_base_path: Path) -> None:
    """The saved adapter is an ordinary fp32 PEFT LoRA that loads on the unquantised base and acts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    state = load_file(str(version / "adapter" / "adapter_model.safetensors"))
    assert state and all(t.dtype == torch.float32 for t in state.values())
    assert any(".lora_B." in k and t.abs().max() > 0 for k, t in state.items())  # trained
    config = json.loads((version / "adapter" / "adapter_config.json").read_text())
    assert "quantization" not in json.dumps(config).lower()
    base = AutoModelForCausalLM.from_pretrained(tiny_base_path, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(version / "adapter"))(input_ids=ids).logits
    assert not torch.allclose(plain, tuned)


@pytest.mark.parametrize(("flag", "bits"), [("--load-in-4bit", 4), ("--load-in-8bit", 8)])
def test_quantized_base_trains_a_plain_lora_and_records_it(
    tmp_path: Path, tiny_base_path: Path, flag: str, bits: int
) -> None:
    _bnb_or_skip()
    manifest, version = _train_quantized(tmp_path, tiny_base_path, flag)
    assert manifest["config"]["train"]["quantization"] == f"{bits}bit"
    q = manifest["train_stats"]["quantization"]
    assert q["bits"] == bits and q["bitsandbytes"]
    if bits == 4:
        assert (q["quant_type"], q["double_quant"], q["compute_dtype"]) == ("nf4", True, "float32")
    # the base fingerprint is the weight files': the version applies to the full-precision base
    from cladapt.base_model import fingerprint_folder

    assert manifest["base_model"]["fingerprint"] == fingerprint_folder(tiny_base_path)[0]
    _check_plain_lora_on_full_base(version, tiny_base_path)


def test_flags_exclude_each_other(tmp_path: Path, tiny_base_path: Path) -> None:
    rows = write_jsonl(tmp_path / "s.jsonl", task_rows("sentiment", 4))
    result = cli_run("train", "--registry", tmp_path / "reg", "--task", "s", "--data", rows, "--load-in-4bit",
                     "--load-in-8bit", ok=False)
    assert result.exit_code == 2 and "exclude each other" in result.output
    assert not (tmp_path / "reg" / "tasks").exists()


def test_folding_earlier_versions_into_a_quantized_base_is_refused() -> None:
    quantized = SimpleNamespace(is_loaded_in_4bit=True)
    Q.check_fold(quantized, 0, "inflora")  # nothing to fold: fine
    Q.check_fold(SimpleNamespace(), 3, "inflora")  # full-precision base: fine
    with pytest.raises(CladaptError, match="'inflora' adds 2 earlier version.*4/8-bit base") as info:
        Q.check_fold(quantized, 2, "inflora")
    assert "train.quantization=none" in (info.value.hint or "")


def test_a_model_passed_in_unquantized_is_refused() -> None:
    with pytest.raises(CladaptError, match="train.quantization=4bit but the base model was passed in"):
        Q.prepare_run(SimpleNamespace(), kind="4bit", dtype="float32", gradient_checkpointing=False,
                      folded_versions=0, method="lora")
    assert Q.prepare_run(SimpleNamespace(), kind="none", dtype="float32", gradient_checkpointing=False,
                         folded_versions=0, method="lora") is None


def test_backend_failure_names_the_version_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    _bnb_or_skip()
    import bitsandbytes

    def unsupported(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", unsupported)
    with pytest.raises(CladaptError, match=rf"bitsandbytes {bitsandbytes.__version__} cannot quantise to 4bit on cpu"):
        Q.check_backend("4bit", "cpu")


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_bnb(name: str, *args: object, **kwargs: object) -> object:
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(CladaptError, match="needs the bitsandbytes package") as info:
        Q.load_options("4bit", "float32")
    assert "cladapt[bnb]" in (info.value.hint or "")
    assert Q.load_options("none", "float32") is None


@pytest.mark.gpu
def test_qlora_on_cuda(tmp_path: Path, tiny_base_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _bnb_or_skip()
    torch.cuda.reset_peak_memory_stats()
    manifest, version = _train_quantized(tmp_path, tiny_base_path, "--load-in-4bit")
    assert manifest["train_stats"]["quantization"]["bits"] == 4
    assert torch.cuda.max_memory_allocated() > 0  # the run used the GPU
    _check_plain_lora_on_full_base(version, tiny_base_path)
