"""What the Trainer is given for a run: its arguments, the encoded rows, the checkpoint to resume from,
and the checks on the launch configuration that must pass before any work starts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cladapt.errors import CladaptError
from cladapt.precision import resolve as resolve_precision
from cladapt.train.chat import encode_all

if TYPE_CHECKING:
    from cladapt.adapters.base import CLMethod
    from cladapt.config import RunConfig
    from cladapt.train.run import RunContext

logger = logging.getLogger(__name__)


def check_zero3(cfg: RunConfig, method_cls: type[CLMethod]) -> None:
    """Refuse DeepSpeed ZeRO-3 for methods that need whole parameter matrices (projections, masks)."""
    if not cfg.train.deepspeed:
        return
    path = Path(cfg.train.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CladaptError(f"cannot read the DeepSpeed config {path}: {exc}", hint="pass a JSON file") from exc
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3 and not method_cls.supports_zero3:
        raise CladaptError(
            f"method {cfg.method.name!r} needs whole LoRA matrices and cannot run sharded under ZeRO-3 ({path})",
            hint="use ZeRO stage 2 (or no DeepSpeed) for this method",
        )


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was fully written.

    A run killed while saving leaves a checkpoint folder without ``trainer_state.json`` (the
    Trainer writes it last); such folders are removed so resuming never reads a torn checkpoint.
    """
    complete: list[tuple[int, Path]] = []
    for ckpt in run_dir.glob("checkpoint-*"):
        step = ckpt.name.rsplit("-", 1)[-1]
        if not step.isdigit():
            continue
        if _readable_json(ckpt / "trainer_state.json"):
            complete.append((int(step), ckpt))
        else:
            logger.warning("Removing incomplete checkpoint %s (the run was interrupted while saving it)", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
    return max(complete)[1] if complete else None


def training_arguments(cfg: RunConfig, out: Path, *, steps_per_epoch: int, report_to: list[str] | None = None) -> Any:
    """``report_to``: the Trainer integrations (cladapt.train.reporting.report_settings); none by default."""
    from transformers import TrainingArguments

    t = cfg.train
    precision = resolve_precision(t.mixed_precision)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=int(t.warmup_ratio * max(1, steps_per_epoch) * t.epochs),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        seed=t.seed,
        data_seed=t.seed,
        report_to=report_to or ["none"],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        activation_checkpointing=t.gradient_checkpointing,
        bf16=precision == "bf16" or (t.dtype == "bfloat16" and torch.cuda.is_available()),
        fp16=precision == "fp16",
        deepspeed=t.deepspeed,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def encoded_rows(ctx: RunContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t = ctx.config.train
    encoded, stats = encode_all(ctx.tokenizer, ctx.examples, max_length=t.max_length, overlong=t.overlong)
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels, "sample_kind": 0, "row_index": i, **e.extra}
        for i, e in enumerate(encoded)
    ]
    return rows + ctx.rows_extra, stats
