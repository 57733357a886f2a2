"""``train_from_config`` (one user action) and ``train_task`` (its core): data -> trainer -> commit.

:func:`train_from_config` is what ``cladapt train``, ``cladapt forget`` and ``bench cl`` call: it
wires everything the config and the registry ask for (ASD and GeRe replay extensions, the forget
set, ``--eval-every`` curves, evaluation and the admission gate) around :func:`train_task`, so no
caller can train a config without its data pipeline.

The order: validate the data (before any model is loaded, so a bad row costs nothing), load the
base model, encode, build the method and its plugins, fold earlier summed adapters into the
frozen base, train with :class:`CLTrainer`, finalize (sidecars), stage, commit. Only the commit
touches registry state, so a run killed at any moment leaves the registry as it was; its
checkpoints stay in ``<registry>/.work/runs/`` for ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cladapt import distributed
from cladapt.adapters import METHODS
from cladapt.adapters.base import TRAIN_ADAPTER, CLMethod, Sidecars, TaskSpec, TrainingPlugin
from cladapt.adapters.compose import factors, folded
from cladapt.base_model import BaseModelInfo, check_compatible
from cladapt.base_model import load as load_base
from cladapt.config import check_lora_fits
from cladapt.errors import CladaptError
from cladapt.precision import resolve as resolve_precision
from cladapt.registry.refs import validate_task_name
from cladapt.train import quantization
from cladapt.train.chat import encode_all
from cladapt.train.checkpoint_state import check_resumable
from cladapt.train.data import Example, LoadedData, load_examples
from cladapt.train.distributed import commit_once, on_main, require_deepspeed, start
from cladapt.train.history import StoreHistory
from cladapt.train.loop import CLTrainer
from cladapt.train.signatures import signature_sidecars
from cladapt.train.vision_encode import collator_for
from cladapt.vision import scope_targets

if TYPE_CHECKING:
    from cladapt.config import RunConfig
    from cladapt.registry.store import Store, VersionRecord

logger = logging.getLogger(__name__)

#: hooks that extend a run (data transforms like ASD, loss plugins like GeRe replay). Each takes
#: the run context and may rewrite ``ctx.examples`` or append to ``ctx.plugins``.
RunExtension = Callable[["RunContext"], None]


@dataclass
class RunContext:
    """Everything a run extension may read or extend."""

    store: Store
    task: str
    config: RunConfig
    model: Any
    tokenizer: Any
    base: BaseModelInfo
    examples: list[Example]
    plugins: list[TrainingPlugin] = field(default_factory=list)
    rows_extra: list[dict[str, Any]] = field(default_factory=list)  # encoded rows added to the task's (replay)
    #: optional: final training rows -> the sampler that orders them (GeRe's BI mixing); None = shuffle
    train_sampler: Callable[[list[dict[str, Any]]], Any] | None = None
    sidecars: Sidecars = field(default_factory=Sidecars)
    manifest_extra: dict[str, Any] = field(default_factory=dict)
    #: set by ``after_train`` hooks (the admission gate): the status the version is committed with
    commit_status: str = "active"
    commit_reason: str = "trained"
    #: extra inputs handed to the plugins' ``TaskSpec.extra`` (e.g. a forgetting method's paired
    #: forget-set loader, set by ``train.forget``)
    task_extra: dict[str, Any] = field(default_factory=dict)


def init_seed(seed: int, task: str, position: int) -> int:
    """The seed a new task adapter is initialised from: stable in (seed, task, position).

    ``position`` is the number of versions the registry holds on this base model before this one,
    so consecutive tasks of a sequence (and a re-training of a task) start from different random
    ``A`` -- orthogonality and subspace methods measure nothing when every task starts from the
    same ``A`` -- while re-running the same step of the same sequence reproduces it bit-exactly.
    sha256, not ``hash()``: Python salts string hashes per process.
    """
    digest = hashlib.sha256(f"cladapt-adapter-init\0{seed}\0{task}\0{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # torch.manual_seed takes < 2**63 on every platform


def sequence_position(store: Store, base: BaseModelInfo) -> int:
    """How many versions (any task, any status) the registry holds on ``base``: this version's place."""
    return sum(1 for r in store.list() if r.manifest.base_model.get("fingerprint") == base.fingerprint)


def run_key(task: str, data_sha: str, cfg: RunConfig) -> str:
    blob = json.dumps({"task": task, "data": data_sha, "config": cfg.model_dump(mode="json")}, sort_keys=True)
    return f"{task}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


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


def _training_args(cfg: RunConfig, out: Path, *, steps_per_epoch: int) -> Any:
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
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        activation_checkpointing=t.gradient_checkpointing,
        bf16=precision == "bf16" or (t.dtype == "bfloat16" and torch.cuda.is_available()),
        fp16=precision == "fp16",
        deepspeed=t.deepspeed,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def _encoded_rows(ctx: RunContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t = ctx.config.train
    encoded, stats = encode_all(ctx.tokenizer, ctx.examples, max_length=t.max_length, overlong=t.overlong)
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels, "sample_kind": 0, "row_index": i, **e.extra}
        for i, e in enumerate(encoded)
    ]
    return rows + ctx.rows_extra, stats


#: scores a freshly trained version: (run context, PEFT model) -> the evaluation row
#: (:class:`cladapt.train.history_eval.HistoryEvaluator` is the standard one)
Evaluator = Callable[["RunContext", Any], dict[str, Any]]


def train_from_config(
    store: Store,
    task: str,
    data: list[str],
    cfg: RunConfig,
    *,
    eval_data: list[str] | None = None,
    forget_data: list[str] | None = None,
    resume: bool = False,
    loaded: tuple[Any, Any, BaseModelInfo] | None = None,
    evaluator: Evaluator | None = None,
    callbacks: list[Any] | None = None,
) -> VersionRecord:
    """Train ``task`` on ``data`` as ``cfg`` says and commit one version: the library's train action.

    In order: the config's extensions (``asd``, then ``replay``), the forget set (forgetting
    methods), the continual-eval plugin (``eval.every``); after training, evaluation and the
    registry's gate policy (which sets the commit status; forgetting versions are evaluated as
    configured but not gated, since losing a task is their purpose); then the commit. Nothing is
    written to the registry unless the run finishes.

    Args:
        data: training files (a forgetting method's *retain* set).
        eval_data: this task's held-out files, scored after training and recorded for later tasks.
        forget_data: the rows to forget; required for, and only for, forgetting methods.
        resume: continue an interrupted run of the same task, data and config.
        loaded: an already-loaded ``(model, tokenizer, info)`` to reuse; left as it was given.
        evaluator: replaces the evaluation built from ``cfg.eval`` (benchmarks score a fixed set of
            tasks); its row is recorded and gated like the standard one.
        callbacks: extra ``transformers.TrainerCallback`` objects (timers, curves).

    Raises:
        DataError, ConfigError, CapacityError, IncompatibleBaseModel: before anything is written.
    """
    from cladapt.train.continual import continual_extension
    from cladapt.train.extensions import build_extensions
    from cladapt.train.gate import load_policy, make_after_train, record_row

    start()  # under torchrun / accelerate launch: join the other processes (no-op otherwise)
    forgetting = METHODS.get(cfg.method.name).forgetting
    extensions = build_extensions(cfg, store)
    if forgetting or forget_data:
        if not forgetting or not forget_data:
            raise CladaptError(
                f"method {cfg.method.name!r} {'needs' if forgetting else 'takes no'} forget data",
                hint="`cladapt forget --forget F --retain R` trains forgetting methods; `cladapt train` the others",
            )
        from cladapt.train.forget import forget_set_extension

        extensions.append(forget_set_extension(forget_data))
    continual = continual_extension(store, cfg, task, eval_data)
    if continual is not None:
        extensions.append(continual)
    after_train: Callable[[RunContext, Any], None] | None = None
    if evaluator is None and not forgetting:
        after_train = make_after_train(store, cfg, task, eval_data)
    else:
        if evaluator is None and (cfg.eval.on_history or eval_data):
            from cladapt.train.history_eval import EvalOptions, HistoryEvaluator

            evaluator = HistoryEvaluator(store, cfg, task, eval_data, EvalOptions.from_config(cfg))
        # a forgetting version is meant to lose a task: the gate's max_drop would reject every success
        policy = None if forgetting else load_policy(store)
        if evaluator is not None:
            scorer = evaluator

            def after_train(ctx: RunContext, peft_model: Any) -> None:
                record_row(ctx, scorer(ctx, peft_model), policy, store)

    return train_task(store, task, data, cfg, resume=resume, extensions=extensions, after_train=after_train,
                      loaded=loaded, forgetting=forgetting, callbacks=callbacks)


def train_task(
    store: Store,
    task: str,
    data_files: list[str],
    cfg: RunConfig,
    *,
    resume: bool = False,
    extensions: list[RunExtension] | None = None,
    after_train: Callable[[RunContext, Any], None] | None = None,
    loaded: tuple[Any, Any, BaseModelInfo] | None = None,
    forgetting: bool = False,
    callbacks: list[Any] | None = None,
) -> VersionRecord:
    """Train one task version with exactly the given hooks and commit it to ``store``.

    The core of :func:`train_from_config`, which applies the config's extensions, evaluation and
    gate; call this directly only to compose those hooks differently (tests, timing benchmarks).

    Args:
        extensions: run extensions (ASD, replay) applied in order before encoding.
        after_train: called with (context, peft model) after training, before staging; evaluation
            uses it to score the new version and record metrics.
        loaded: an already-loaded (model, tokenizer, info) to reuse (tests, benchmarks).
        forgetting: True only for a forgetting request (forget set in ``extensions``): forgetting
            methods (``forgetting`` capability) are trained so, every other method without it.
        callbacks: extra ``transformers.TrainerCallback`` objects (benchmarks' step timers, curves).

    Raises:
        DataError, ConfigError, CapacityError, IncompatibleBaseModel: before anything is written.
    """
    validate_task_name(task)
    data: LoadedData = load_examples(data_files)
    started = time.time()
    quant = None if loaded is not None else quantization.load_options(cfg.train.quantization, cfg.train.dtype)
    model, tokenizer, base = (
        loaded if loaded is not None else load_base(cfg.base_model, dtype=cfg.train.dtype, quantization=quant)
    )
    torch.manual_seed(cfg.train.seed)
    method_cls = METHODS.get(cfg.method.name)
    if method_cls.forgetting and not forgetting:
        raise CladaptError(f"method {cfg.method.name!r} removes knowledge", hint="use `cladapt forget` for it")
    if forgetting and not method_cls.forgetting:
        raise CladaptError(f"method {cfg.method.name!r} is not a forgetting method", hint="use `cladapt train` for it")
    method: CLMethod = method_cls(cfg.method, cfg.lora)
    # the adapter_config points at the local base folder (what PeftModel.from_pretrained can load);
    # the manifest keeps the id the user gave
    lora_config = scope_targets(method.lora_config(str(base.path)), model, cfg.lora.target_scope)
    check_lora_fits(cfg.lora, model, lora_config)  # a module name or rank the base cannot take: before any work
    check_zero3(cfg, method_cls)
    if cfg.train.deepspeed:
        require_deepspeed(cfg.train.deepspeed)
    history = StoreHistory(store, base_fingerprint=base.fingerprint, current_task=task)
    ctx = RunContext(store, task, cfg, model, tokenizer, base, list(data.examples))
    for extend in extensions or []:
        extend(ctx)
    rows, stats = _encoded_rows(ctx)

    summed = method.summed_history(history)
    frozen = [factors(history.adapter_state(e.ref), history.adapter_config(e.ref)) for e in summed]
    for e in summed:
        check_compatible(store.get(e.ref).manifest.base_model, base, what=f"adapter {e.ref}")
    _note_other_bases(ctx, method, history)

    from peft import get_peft_model

    # a fresh random A per task and place in the sequence (PEFT's init draws from the global RNG);
    # methods that draw their own init (OWLoRA) get the same seed through TaskSpec.seed
    position = sequence_position(store, base)
    seed = init_seed(cfg.train.seed, task, position)
    ctx.manifest_extra.setdefault("train_stats", {}).update(
        init_seed=seed, sequence_position=position, train_rows=len(rows), extra_rows=len(ctx.rows_extra)
    )
    torch.manual_seed(seed)
    quantized = quantization.prepare_run(
        model, kind=cfg.train.quantization, dtype=cfg.train.dtype, folded_versions=len(frozen),
        gradient_checkpointing=cfg.train.gradient_checkpointing, method=cfg.method.name,
    )
    world = distributed.world_size()  # train.batch_size is per process: the optimizer sees world x more rows
    ctx.manifest_extra["train_stats"].update(
        processes=world, global_batch=cfg.train.batch_size * cfg.train.grad_accum * world,
        **({"quantization": quantized} if quantized else {}),
    )
    peft_model = get_peft_model(model, lora_config, adapter_name=TRAIN_ADAPTER)
    collate = collator_for(tokenizer)
    loader = torch.utils.data.DataLoader(rows[: len(data.examples)], batch_size=cfg.train.batch_size, collate_fn=collate)
    spec = TaskSpec(name=task, rows=len(data.examples), seed=seed, dataloader=loader, extra=ctx.task_extra)
    plugins: list[TrainingPlugin] = [method, *ctx.plugins]
    # a checkpoint folder of this run's own (two identical runs never share one); --resume takes
    # over a killed run's. Process 0 claims it, the others checkpoint into the same folder
    run, run_path = on_main(lambda: store.claim_run(task, run_key(task, data.sha256, cfg), resume=resume),
                            publish=lambda r: str(r.path))
    run_dir = Path(run_path)
    try:
        with folded(peft_model, frozen):
            for p in plugins:
                p.prepare(peft_model, spec, history)
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            logger.info(
                "Training %s with %s: %d rows (+%d extra), %d trainable parameters, %d earlier adapters folded",
                task, cfg.method.name, len(data.examples), len(ctx.rows_extra), trainable, len(frozen),
            )
            import datasets

            train_ds = datasets.Dataset.from_list(rows)
            steps_per_epoch = max(1, len(rows) // (cfg.train.batch_size * cfg.train.grad_accum * world))
            trainer = CLTrainer(
                model=peft_model,
                args=_training_args(cfg, run_dir, steps_per_epoch=steps_per_epoch),
                train_dataset=train_ds,
                data_collator=collate,
                plugins=plugins,
                train_sampler=ctx.train_sampler(rows) if ctx.train_sampler is not None else None,
                loss_logits=cfg.train.loss_logits,
                group_by_length=cfg.train.group_by_length,
                length_window=cfg.train.length_window,
                callbacks=list(callbacks or []),
            )
            checkpoint = latest_complete_checkpoint(run_dir) if resume else None
            check_resumable(checkpoint, deepspeed=cfg.train.deepspeed)
            if resume:
                logger.info("Resuming from %s", checkpoint or "the start (no complete checkpoint)")
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            sidecars = Sidecars()
            for p in plugins:
                sidecars.merge(p.finalize(peft_model, spec))
            sidecars.merge(ctx.sidecars)
            if after_train is not None:  # evaluation and the gate: once, in process 0
                on_main(lambda: after_train(ctx, peft_model))
        # the routing signature sees the adapter alone on the unmodified base (earlier summed adapters
        # unfolded again), exactly as a router embeds a query with one candidate's adapter
        on_main(lambda: sidecars.merge(signature_sidecars(peft_model, tokenizer, data.examples, adapter=TRAIN_ADAPTER,
                                                          seed=cfg.train.seed, base=base)))
        # one registry write per run: process 0 commits, the others read the version it committed
        record = commit_once(store, lambda: _commit(store, ctx, method, history, peft_model, sidecars, data, stats,
                                                    result, started))
        if run is not None:  # committed: the checkpoints are no longer needed for --resume
            run.finish()
    except BaseException:
        # leave a model passed in with `loaded=` as it was given (no LoRA layers left behind)
        peft_model.unload()
        raise
    finally:
        if run is not None:  # the checkpoints stay for --resume; the folder is free to take over
            run.release()
    # leave the caller's base model as it was given
    peft_model.unload()
    return record


def _note_other_bases(ctx: RunContext, method: CLMethod, history: StoreHistory) -> None:
    """Say which earlier adapters a summing method cannot fold because they were trained on another
    base model (an adapter only applies to its own base): this version starts its own sequence on
    this base. A warning, not an error: moving a registry to a new base is legitimate, but never
    silent; the refs are recorded in ``train_stats.other_base_versions``."""
    if method.composition != "sum":
        return
    other = [(ref, base_id) for ref, composition, base_id in history.elsewhere if composition == "sum"]
    if not other:
        return
    refs = [ref for ref, _ in other]
    ctx.manifest_extra.setdefault("train_stats", {})["other_base_versions"] = refs
    logger.warning(
        "%s on %s folds %d earlier adapter(s); left out, trained on another base model (%s): %s",
        method.name, ctx.base.id, len(method.summed_history(history)), ", ".join(sorted({b for _, b in other})),
        ", ".join(refs),
    )


def _commit(
    store: Store,
    ctx: RunContext,
    method: CLMethod,
    history: StoreHistory,
    peft_model: Any,
    sidecars: Sidecars,
    data: LoadedData,
    stats: dict[str, Any],
    result: Any,
    started: float,
) -> VersionRecord:
    cfg = ctx.config
    with store.stage(ctx.task) as staging:
        peft_model.save_pretrained(str(staging.adapter_dir), selected_adapters=[TRAIN_ADAPTER])
        # PEFT writes adapters other than "default" into a subfolder; ours is "default"
        for stem, tensors in sidecars.tensors.items():
            staging.write_tensors(f"sidecars/{stem}.safetensors", tensors)
        for stem, obj in sidecars.json.items():
            staging.write_json(f"sidecars/{stem}.json", obj)
        staging.manifest_fields.update(
            method=cfg.method.name,
            method_config=cfg.method.model_dump(mode="json"),
            composition=method.composition,
            base_model=ctx.base.as_dict(),
            lora=cfg.lora.model_dump(mode="json"),
            data={"files": [str(Path(f).resolve()) for f in data.files], "sha256": data.sha256, "rows": len(data.examples), **stats},
            config=cfg.model_dump(mode="json"),
            seed=cfg.train.seed,
            parents=method.parents(history),
            train_stats={
                "steps": int(result.global_step),
                "train_loss": round(float(result.training_loss), 6),
                "wall_seconds": round(time.time() - started, 2),
                **{k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
                **ctx.manifest_extra.get("train_stats", {}),
            },
            metrics={**sidecars.metrics, **ctx.manifest_extra.get("metrics", {})},
        )
        return store.commit(staging, status=ctx.commit_status, reason=ctx.commit_reason)
