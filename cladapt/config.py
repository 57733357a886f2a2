"""Run configuration: YAML presets + ``--set`` overrides -> one validated :class:`RunConfig`.

Resolution order (later wins), each key remembering where it came from:

1. the config classes' field defaults;
2. ``configs/train/default.yaml``;
3. the method's preset ``configs/methods/<method>.yaml``;
4. the user's ``--config`` files (a preset name such as ``cpu-small``, or a path);
5. ``--set a.b=c`` overrides (values parsed as YAML: ``--set lora.target_modules=[q_proj,k_proj]``).

Every problem is collected and reported together, naming the file and key path
(``my.yaml: train.learning_rate: Input should be a valid number``). Configs are data: they are
loaded with ``yaml.safe_load`` and never name code to import.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from cladapt.adapters import METHODS
from cladapt.adapters.base import LoraSpec, MethodConfig
from cladapt.base_model import DEFAULT_BASE_MODEL
from cladapt.budget import DEFAULT_MAX_NEW_TOKENS, parse_max_new_tokens
from cladapt.errors import CladaptError, ConfigError, Issue
from cladapt.presets import load_yaml, preset_text, read_user_file

#: seeds reach numpy (``transformers.set_seed``), which takes 0 .. 2**32 - 1
SEED_MAX = 2**32 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSettings(_Strict):
    """Optimisation settings, passed to ``transformers.TrainingArguments``."""

    learning_rate: float = Field(1e-3, gt=0, description="peak learning rate (methods.md §1: 1e-3 for 135M)")
    epochs: float = Field(1.0, gt=0, description="passes over the task data")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: use epochs)")
    batch_size: int = Field(8, ge=1, description="rows per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr_scheduler: str = Field("constant", description="transformers scheduler name (constant, linear, cosine)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 disables)")
    max_length: int = Field(512, ge=8, description="maximum tokens per example (prompt + answer)")
    overlong: Literal["truncate", "reject"] = Field(
        "truncate", description="what to do with examples longer than max_length: cut the middle of the input, or reject"
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed for initialisation, shuffling and every method's random choice")
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(50, ge=1, description="checkpoint every N optimizer steps (for --resume)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="base-model dtype")
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = Field(
        "no",
        description="fp32 weights with bf16/fp16 autocast for training and the evaluation done during a run "
        "(auto: bf16 on CUDA or on CPUs with AMX/AVX512-BF16, else no)",
    )
    gradient_checkpointing: bool = False
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="load the frozen base through bitsandbytes (4bit: QLoRA's NF4 with double quantization, "
        "compute in train.dtype; 8bit: LLM.int8); the adapter stays a plain LoRA of the unquantised base",
    )
    loss_logits: Literal["labelled", "full"] = Field(
        "labelled",
        description="where the LM head and the cross-entropy run: only at positions with a label (rows whose "
        "loss reads every position keep them; same loss and gradients), or at every position. Models whose "
        "logits are not the LM head of the last hidden state fall back to full, with a warning",
    )
    group_by_length: bool = Field(
        False,
        description="batch rows of similar length together (seeded by seed; less padding per batch); "
        "not applied when replay rows are mixed in (GeRe weights task and replay rows per batch)",
    )
    length_window: int = Field(
        32, ge=1, description="with group_by_length: rows are sorted by length within windows of this many batches"
    )
    deepspeed: str | None = Field(None, description="path to a DeepSpeed JSON config, passed through unchanged")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="where the Trainer also sends its logs (its own report_to): tensorboard, wandb, mlflow, or none "
        "(default); TensorBoard writes into train.logging_dir",
    )
    logging_dir: str | None = Field(
        None, description="TensorBoard's folder (default: logs/ in the run's folder, kept with the version)"
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: object) -> object:
        # `--set train.report_to=tensorboard` and `none`, as transformers takes them
        items = [value] if isinstance(value, str) else value
        return [v for v in items if v != "none"] if isinstance(items, list) else value

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        # transformers reads any value <= 0 as "use epochs"; only -1 says so on purpose
        if value < 1 and value != -1:
            raise ValueError(f"must be -1 (train for `epochs`) or a positive number of steps, got {value}")
        return value


class AsdSettings(_Strict):
    """Answer-style diversification (methods.md §4.1)."""

    enabled: bool = False
    percent: float = Field(20.0, ge=0, le=100, description="share of rows converted to other answer styles (X)")
    generator: Literal["base", "none"] = Field(
        "base", description="who writes BE/DE explanations: the base model, or nobody (quota redistributed)"
    )
    original_style: Literal["SA", "YN", "MCQ", "BE", "DE"] = Field("SA", description="the task's own answer style")
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="seed of the conversion (default: train.seed); stored in asd.json"
    )
    labels: list[str] | None = Field(
        None, description="the task's label set L (default: the distinct answers of the task's rows)"
    )
    generator_batch_size: int = Field(16, ge=1, description="rows per batch when the base model writes explanations")


class ReplaySettings(_Strict):
    """GeRe general-sample replay (methods.md §5)."""

    enabled: bool = False
    loss: Literal["tm", "lf", "kl", "l1", "l2"] = "tm"
    weight: str = Field("100", description="TM weight: a number, or 'dy' (CE/TM, dynamic)")
    ratio: float | None = Field(None, gt=0, lt=1, description="replay rows per batch share (BI mode); unset = concat")
    k_sigma: float = Field(1.0, gt=0, description="band half-width in standard deviations")
    lambda_kl: float = Field(1.0, ge=0)
    lambda_f: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0, description="KL temperature")
    texts: str | None = Field(
        None,
        description="general texts to replay (.jsonl/.json with a 'text' field, or .txt one per line); "
        "unset: the set already recorded for this base model, else texts self-generated by the base model",
    )
    n_replay: int | None = Field(None, ge=1, description="replay texts (unset: as recorded; 256 when recording)")
    max_tokens: int | None = Field(
        None, ge=2, description="tokens per replay text (unset: as recorded; 256 when recording)"
    )
    record_batch_size: int = Field(8, ge=1, description="texts per forward pass when recording base statistics")

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, value: object) -> object:
        # YAML and --set parse `100` as a number; keep the field a string ("100" or "dy")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value != "dy":
            try:
                if float(value) < 0:
                    raise ValueError
            except ValueError:
                raise ValueError("must be a non-negative number or 'dy'") from None
        return value


class EvalSettings(_Strict):
    """Evaluation during and after training (methods.md §11)."""

    on_history: bool = Field(False, description="after training, re-score every earlier task")
    every: int = Field(0, ge=0, description="continual evaluation every N optimizer steps (0: off)")
    samples: int = Field(100, ge=1, description="rows per task for continual evaluation")
    max_new_tokens: int | Literal["auto"] = Field(
        DEFAULT_MAX_NEW_TOKENS,
        description="generation budget per answer (methods.md §11.5: 50); auto: each task's longest label in tokens "
        "+ 4 (classification), 50 for free-text answers",
    )
    batch_size: int = Field(16, ge=1)
    mode: Literal["generate", "constrained", "both"] = Field(
        "generate", description="strict exact match, constrained log-likelihood over labels, or both (methods.md §4.3)"
    )
    limit: int | None = Field(None, ge=1, description="score a seeded sample of this many rows per task (None: all)")
    ppl_data: list[str] | None = Field(
        None, description="general texts (JSON Lines with a 'text' field) for the general-perplexity check"
    )
    ppl_samples: int = Field(32, ge=1, description="texts used for general perplexity")
    ppl_length: int = Field(256, ge=8, description="tokens per text for general perplexity")

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _budget(cls, value: object) -> object:
        return parse_max_new_tokens(value)

    @property
    def budget(self) -> int | None:
        """``max_new_tokens`` as the scoring functions take it: None picks each task's own (auto)."""
        return None if self.max_new_tokens == "auto" else int(self.max_new_tokens)


class RunConfig(_Strict):
    """Everything one ``cladapt train`` run needs; stored verbatim in the version's manifest."""

    base_model: str = Field(DEFAULT_BASE_MODEL, description="Hugging Face id, local folder, or the default alias")
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: MethodConfig(name="lora"))
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSettings = Field(default_factory=TrainSettings)
    asd: AsdSettings = Field(default_factory=AsdSettings)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)


def _merge(dst: dict[str, Any], src: dict[str, Any], source: str, prov: dict[str, str], prefix: str = "") -> None:
    for key, value in src.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key, {}), dict):
            _merge(dst.setdefault(key, {}), value, source, prov, path + ".")
        else:
            dst[key] = value
            prov[path] = source


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> (["a", "b"], yaml-parsed "c")."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([Issue(f"--set {text}", "expected KEY=VALUE, e.g. --set lora.r=16")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError([Issue(f"--set {text}", f"value is not valid YAML: {exc}")]) from exc
    return [k.strip() for k in key.split(".")], value


def load_config(
    *, method: str | None = None, files: Sequence[str] = (), overrides: Sequence[str] = ()
) -> tuple[RunConfig, dict[str, str]]:
    """Resolve and validate a run configuration.

    Returns:
        (the validated config, provenance: key path -> where its value came from).

    Raises:
        ConfigError: listing every problem with its source and key path.
    """
    issues: list[Issue] = []
    user = [read_user_file(f, issues) for f in files]
    parsed = [(f"--set {o}", *parse_override(o)) for o in overrides]

    # the method's preset is merged before user files, so its name is settled first:
    # --method, then --set method.name, then the last user file that names one
    name = method
    for _src, keys, value in parsed:
        if keys == ["method", "name"]:
            name = name or str(value)
    for _, data in reversed(user):
        section = data.get("method")
        if name is None and isinstance(section, dict) and section.get("name"):
            name = str(section["name"])
    name = name or "lora"

    merged: dict[str, Any] = {}
    prov: dict[str, str] = {}
    default_text = preset_text("train", "default")
    if default_text:
        _merge(merged, load_yaml(default_text, "preset:default", issues), "preset:default", prov)
    method_text = preset_text("methods", name)
    if method_text:
        _merge(merged, load_yaml(method_text, f"preset:methods/{name}", issues), f"preset:methods/{name}", prov)
    for source, data in user:
        _merge(merged, data, source, prov)
    for src, keys, value in parsed:
        node = merged
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                issues.append(Issue(src, f"{'.'.join(keys[:-1])} is not a section"))
                break
        else:
            node[keys[-1]] = value
            prov[".".join(keys)] = src
    merged.setdefault("method", {})
    if isinstance(merged["method"], dict):
        merged["method"]["name"] = name
    if issues:
        raise ConfigError(issues)
    return _validate(merged, name, prov), prov


def _where(loc: tuple[Any, ...], prov: dict[str, str]) -> str:
    path = ".".join(str(p) for p in loc)
    for cut in range(len(loc), 0, -1):
        src = prov.get(".".join(str(p) for p in loc[:cut]))
        if src:
            return f"{src}: {path}"
    return path


def _describe(err: dict[str, Any], model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        fields: list[str] = []
        node: Any = model
        for part in loc[:-1]:
            info = getattr(node, "model_fields", {}).get(part)
            node = info.annotation if info is not None else None
        fields = list(getattr(node, "model_fields", {}) or [])
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}")
    return msg


def _validate(merged: dict[str, Any], name: str, prov: dict[str, str]) -> RunConfig:
    issues: list[Issue] = []
    try:
        method_cls = METHODS.get(name)
    except CladaptError as exc:
        raise ConfigError([Issue(prov.get("method.name", "method.name"), f"{exc} ({exc.hint})")]) from exc
    method_data = merged.pop("method")
    method_cfg: MethodConfig | None = None
    try:
        method_cfg = method_cls.Config.model_validate(method_data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ("method", *err["loc"])
            issues.append(Issue(_where(loc, prov), _describe(err, method_cls.Config, tuple(err["loc"]))))
    cfg: RunConfig | None = None
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as exc:
        for err in exc.errors():
            issues.append(Issue(_where(tuple(err["loc"]), prov), _describe(err, RunConfig, tuple(err["loc"]))))
    if issues or cfg is None or method_cfg is None:
        raise ConfigError(issues, hint="`cladapt config check FILE` validates a config without training")
    cfg.method = method_cfg
    return cfg


def config_from_manifest(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig stored in a manifest (method section validated against its method)."""
    data = dict(data)
    method_data = dict(data.pop("method"))
    cfg = RunConfig.model_validate(data)
    cfg.method = METHODS.get(method_data["name"]).Config.model_validate(method_data)
    return cfg
