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
from cladapt.adapters.targets import check_lora_fits
from cladapt.base_model import BaseModelInfo, check_compatible
from cladapt.base_model import load as load_base
from cladapt.data.rows import Example, LoadedData, load_examples
from cladapt.errors import CladaptError
from cladapt.evaluation.gate import Admission
from cladapt.evaluation.history_eval import TrainedModel
from cladapt.registry.refs import validate_task_name
from cladapt.train import quantization
from cladapt.train.checkpoint_state import check_resumable
from cladapt.train.distributed import commit_once, on_main, require_deepspeed, start
from cladapt.train.history import StoreHistory
from cladapt.train.loop import CLTrainer
from cladapt.train.progress import use_training_progress
from cladapt.train.reporting import LossCurve, keep_logs, report_settings
from cladapt.train.signatures import signature_sidecars
from cladapt.train.trainer_setup import check_zero3, encoded_rows, latest_complete_checkpoint, training_arguments
from cladapt.train.vision_encode import collator_for
from cladapt.vision import scope_targets

if TYPE_CHECKING:
    from cladapt.config import RunConfig
    from cladapt.registry.store import Store, VersionRecord
    from cladapt.train.evaluation_hooks import AfterTrain, Evaluator

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
    from cladapt.train.evaluation_hooks import after_train_for, continual_extension
    from cladapt.train.extensions import build_extensions

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
    after_train = after_train_for(store, cfg, task, eval_data, evaluator=evaluator, forgetting=forgetting)
    return train_task(store, task, data, cfg, resume=resume, extensions=extensions, after_train=after_train,
                      loaded=loaded, forgetting=forgetting, callbacks=callbacks)


@dataclass
class _Prepared:
    """A run once its inputs are checked and encoded: nothing trained, nothing written yet."""

    ctx: RunContext
    data: LoadedData
    method: CLMethod
    history: StoreHistory
    frozen: list[dict[str, Any]]  # factors of the earlier summed adapters, folded into the base
    lora_config: Any
    rows: list[dict[str, Any]]
    stats: dict[str, Any]
    seed: int
    started: float


def _load_checked(
    store: Store, task: str, data_files: list[str], cfg: RunConfig, loaded: tuple[Any, Any, BaseModelInfo] | None,
    forgetting: bool,
) -> tuple[RunContext, LoadedData, CLMethod, Any]:
    """Data, base model and method, with every check that can fail before training (cheapest first)."""
    validate_task_name(task)
    data: LoadedData = load_examples(data_files)
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
    ctx = RunContext(store, task, cfg, model, tokenizer, base, list(data.examples))
    return ctx, data, method, lora_config


def _prepare(
    store: Store, task: str, data_files: list[str], cfg: RunConfig, *, extensions: list[RunExtension],
    loaded: tuple[Any, Any, BaseModelInfo] | None, forgetting: bool,
) -> _Prepared:
    """Check, extend (ASD, replay, forget set), encode, and fix the run's seed and folded history."""
    started = time.time()
    ctx, data, method, lora_config = _load_checked(store, task, data_files, cfg, loaded, forgetting)
    history = StoreHistory(store, base_fingerprint=ctx.base.fingerprint, current_task=task)
    for extend in extensions:
        extend(ctx)
    rows, stats = encoded_rows(ctx)
    summed = method.summed_history(history)
    frozen = [factors(history.adapter_state(e.ref), history.adapter_config(e.ref)) for e in summed]
    for e in summed:
        check_compatible(store.get(e.ref).manifest.base_model, ctx.base, what=f"adapter {e.ref}")
    _note_other_bases(ctx, method, history)
    # a fresh random A per task and place in the sequence (PEFT's init draws from the global RNG);
    # methods that draw their own init (OWLoRA) get the same seed through TaskSpec.seed
    position = sequence_position(store, ctx.base)
    seed = init_seed(cfg.train.seed, task, position)
    torch.manual_seed(seed)
    quantized = quantization.prepare_run(
        ctx.model, kind=cfg.train.quantization, dtype=cfg.train.dtype, folded_versions=len(frozen),
        gradient_checkpointing=cfg.train.gradient_checkpointing, method=cfg.method.name,
    )
    world = distributed.world_size()  # train.batch_size is per process: the optimizer sees world x more rows
    ctx.manifest_extra.setdefault("train_stats", {}).update(
        init_seed=seed, sequence_position=position, train_rows=len(rows), extra_rows=len(ctx.rows_extra),
        processes=world, global_batch=cfg.train.batch_size * cfg.train.grad_accum * world,
        **({"quantization": quantized} if quantized else {}),
    )
    return _Prepared(ctx, data, method, history, frozen, lora_config, rows, stats, seed, started)


def _trainer(p: _Prepared, peft_model: Any, run_dir: Path, plugins: list[TrainingPlugin], callbacks: list[Any]) -> Any:
    import datasets

    cfg = p.ctx.config
    world = distributed.world_size()
    steps_per_epoch = max(1, len(p.rows) // (cfg.train.batch_size * cfg.train.grad_accum * world))
    report_to, reporters = report_settings(cfg.train, run_dir)  # TensorBoard / W&B / MLflow (train.report_to)
    trainer = CLTrainer(
        model=peft_model,
        args=training_arguments(cfg, run_dir, steps_per_epoch=steps_per_epoch, report_to=report_to),
        train_dataset=datasets.Dataset.from_list(p.rows),
        data_collator=collator_for(p.ctx.tokenizer),
        plugins=plugins,
        train_sampler=p.ctx.train_sampler(p.rows) if p.ctx.train_sampler is not None else None,
        loss_logits=cfg.train.loss_logits,
        group_by_length=cfg.train.group_by_length,
        length_window=cfg.train.length_window,
        callbacks=[*callbacks, *reporters, LossCurve(p.ctx.manifest_extra.setdefault("train_stats", {}))],
    )
    use_training_progress(trainer)  # rounded, named log lines instead of the Trainer's raw dicts
    return trainer


def _fit(
    p: _Prepared, peft_model: Any, run_dir: Path, *, resume: bool, callbacks: list[Any], after_train: AfterTrain | None,
) -> tuple[Any, Sidecars, Admission | None]:
    """Train with the earlier summed adapters folded in; finalize the plugins; evaluate and gate."""
    ctx, cfg = p.ctx, p.ctx.config
    loader = torch.utils.data.DataLoader(p.rows[: len(p.data.examples)], batch_size=cfg.train.batch_size,
                                         collate_fn=collator_for(ctx.tokenizer))
    spec = TaskSpec(name=ctx.task, rows=len(p.data.examples), seed=p.seed, dataloader=loader, extra=ctx.task_extra)
    plugins: list[TrainingPlugin] = [p.method, *ctx.plugins]
    admission: Admission | None = None
    with folded(peft_model, p.frozen):
        for plugin in plugins:
            plugin.prepare(peft_model, spec, p.history)
        trainable = sum(t.numel() for t in peft_model.parameters() if t.requires_grad)
        logger.info(
            "Training %s with %s: %d rows (+%d extra), %d trainable parameters, %d earlier adapters folded",
            ctx.task, cfg.method.name, len(p.data.examples), len(ctx.rows_extra), trainable, len(p.frozen),
        )
        trainer = _trainer(p, peft_model, run_dir, plugins, callbacks)
        checkpoint = latest_complete_checkpoint(run_dir) if resume else None
        check_resumable(checkpoint, deepspeed=cfg.train.deepspeed)
        if resume:
            logger.info("Resuming from %s", checkpoint or "the start (no complete checkpoint)")
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        sidecars = Sidecars()
        for plugin in plugins:
            sidecars.merge(plugin.finalize(peft_model, spec))
        sidecars.merge(ctx.sidecars)
        if after_train is not None:  # evaluation and the gate: once, in process 0, on the model as trained
            trained = TrainedModel(ctx.task, peft_model, ctx.tokenizer, ctx.base.fingerprint, p.history, p.frozen)
            admission, _ = on_main(lambda: after_train(trained))
    return result, sidecars, admission


def train_task(
    store: Store,
    task: str,
    data_files: list[str],
    cfg: RunConfig,
    *,
    resume: bool = False,
    extensions: list[RunExtension] | None = None,
    after_train: AfterTrain | None = None,
    loaded: tuple[Any, Any, BaseModelInfo] | None = None,
    forgetting: bool = False,
    callbacks: list[Any] | None = None,
) -> VersionRecord:
    """Train one task version with exactly the given hooks and commit it to ``store``.

    The core of :func:`train_from_config`, which applies the config's extensions, evaluation and
    gate; call this directly only to compose those hooks differently (tests, timing benchmarks).

    Args:
        extensions: run extensions (ASD, replay) applied in order before encoding.
        after_train: called with the :class:`~cladapt.evaluation.history_eval.TrainedModel` after
            training, before staging; returns the version's :class:`~cladapt.evaluation.gate.Admission`
            (status, reason, metrics) or None to commit it as trained.
        loaded: an already-loaded (model, tokenizer, info) to reuse (tests, benchmarks).
        forgetting: True only for a forgetting request (forget set in ``extensions``): forgetting
            methods (``forgetting`` capability) are trained so, every other method without it.
        callbacks: extra ``transformers.TrainerCallback`` objects (benchmarks' step timers, curves).

    Raises:
        DataError, ConfigError, CapacityError, IncompatibleBaseModel: before anything is written.
    """
    p = _prepare(store, task, data_files, cfg, extensions=list(extensions or []), loaded=loaded, forgetting=forgetting)
    from peft import get_peft_model

    peft_model = get_peft_model(p.ctx.model, p.lora_config, adapter_name=TRAIN_ADAPTER)
    # a checkpoint folder of this run's own (two identical runs never share one); --resume takes
    # over a killed run's. Process 0 claims it, the others checkpoint into the same folder
    run, run_path = on_main(lambda: store.claim_run(task, run_key(task, p.data.sha256, cfg), resume=resume),
                            publish=lambda r: str(r.path))
    try:
        result, sidecars, admission = _fit(p, peft_model, Path(run_path), resume=resume, callbacks=list(callbacks or []),
                                           after_train=after_train)
        # the routing signature sees the adapter alone on the unmodified base (earlier summed adapters
        # unfolded again), exactly as a router embeds a query with one candidate's adapter
        on_main(lambda: sidecars.merge(signature_sidecars(peft_model, p.ctx.tokenizer, p.data.examples,
                                                          adapter=TRAIN_ADAPTER, seed=cfg.train.seed, base=p.ctx.base)))
        # one registry write per run: process 0 commits, the others read the version it committed
        record = commit_once(store, lambda: _commit(store, p, peft_model, sidecars, result, admission, Path(run_path)))
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
    store: Store, p: _Prepared, peft_model: Any, sidecars: Sidecars, result: Any, admission: Admission | None,
    run_dir: Path,
) -> VersionRecord:
    ctx, cfg, data = p.ctx, p.ctx.config, p.data
    admission = admission or Admission()
    with store.stage(ctx.task) as staging:
        peft_model.save_pretrained(str(staging.adapter_dir), selected_adapters=[TRAIN_ADAPTER])
        keep_logs(staging, cfg.train, run_dir)  # TensorBoard files of the run's folder, kept with the version
        # PEFT writes adapters other than "default" into a subfolder; ours is "default"
        for stem, tensors in sidecars.tensors.items():
            staging.write_tensors(f"sidecars/{stem}.safetensors", tensors)
        for stem, obj in sidecars.json.items():
            staging.write_json(f"sidecars/{stem}.json", obj)
        staging.manifest_fields.update(
            method=cfg.method.name,
            method_config=cfg.method.model_dump(mode="json"),
            composition=p.method.composition,
            base_model=ctx.base.as_dict(),
            lora=cfg.lora.model_dump(mode="json"),
            data={**data.manifest_data(), **p.stats},  # files or datasets (name, split, fingerprint), rows' sha256
            config=cfg.model_dump(mode="json"),
            seed=cfg.train.seed,
            parents=p.method.parents(p.history),
            train_stats={
                "steps": int(result.global_step),
                "train_loss": round(float(result.training_loss), 6),
                "wall_seconds": round(time.time() - p.started, 2),
                **{k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
                **ctx.manifest_extra.get("train_stats", {}),
            },
            metrics={**sidecars.metrics, **ctx.manifest_extra.get("metrics", {}), **admission.metrics},
        )
        return store.commit(staging, status=admission.status, reason=admission.reason)
