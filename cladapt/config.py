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
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from cladapt.adapters import METHODS
from cladapt.adapters.base import LoraSpec, MethodConfig
from cladapt.base_model import DEFAULT_BASE_MODEL
from cladapt.errors import CladaptError, ConfigError, Issue

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
    max_new_tokens: int = Field(50, ge=1, description="generation budget per answer (methods.md §11.5: 50)")
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


class RunConfig(_Strict):
    """Everything one ``cladapt train`` run needs; stored verbatim in the version's manifest."""

    base_model: str = Field(DEFAULT_BASE_MODEL, description="Hugging Face id, local folder, or the default alias")
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: MethodConfig(name="lora"))
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSettings = Field(default_factory=TrainSettings)
    asd: AsdSettings = Field(default_factory=AsdSettings)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)


def _preset_text(kind: str, name: str) -> str | None:
    node = resources.files("cladapt.configs").joinpath(kind, f"{name}.yaml")
    return node.read_text() if node.is_file() else None


def preset_names(kind: str) -> list[str]:
    folder = resources.files("cladapt.configs").joinpath(kind)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _load_yaml(text: str, source: str, issues: list[Issue]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        issues.append(Issue(source, f"not valid YAML: {exc}"))
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        issues.append(Issue(source, f"expected a mapping at the top level, got {type(data).__name__}"))
        return {}
    return data


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


def _read_user_file(ref: str, issues: list[Issue]) -> tuple[str, dict[str, Any]]:
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            issues.append(Issue(ref, "config file not found"))
            return ref, {}
        return str(path), _load_yaml(path.read_text(), str(path), issues)
    text = _preset_text("train", ref)
    if text is None:
        close = difflib.get_close_matches(ref, preset_names("train"), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; presets: {', '.join(preset_names('train'))}"
        issues.append(Issue(ref, "neither a file nor a train preset" + hint))
        return ref, {}
    return f"preset:{ref}", _load_yaml(text, f"preset:{ref}", issues)


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
    user = [_read_user_file(f, issues) for f in files]
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
    default_text = _preset_text("train", "default")
    if default_text:
        _merge(merged, _load_yaml(default_text, "preset:default", issues), "preset:default", prov)
    method_text = _preset_text("methods", name)
    if method_text:
        _merge(merged, _load_yaml(method_text, f"preset:methods/{name}", issues), f"preset:methods/{name}", prov)
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


def _matrix_shape(module: Any) -> tuple[int, int] | None:
    """(out, in) of a module PEFT can put a LoRA on (Linear, quantised Linear, Embedding, Conv1D)."""
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return out_f, in_f
    n, d = getattr(module, "num_embeddings", None), getattr(module, "embedding_dim", None)
    if isinstance(n, int) and isinstance(d, int):
        return n, d
    weight = getattr(module, "weight", None)
    shape = tuple(getattr(weight, "shape", ()))
    if len(shape) == 2 and not list(module.children()):
        return int(shape[0]), int(shape[1])
    return None


def check_lora_fits(lora: LoraSpec, model: Any, peft_config: Any) -> None:
    """Check ``lora.target_modules`` and ``lora.r`` against the loaded base model, before training.

    Config validation cannot see the model, and PEFT is lenient where a user needs an answer: a
    name that matches nothing is dropped silently when another name matches (and fails deep in
    ``get_peft_model`` otherwise), and any rank is accepted, although a LoRA on a ``d_out x d_in``
    matrix cannot have rank above ``min(d_out, d_in)`` (a larger ``r`` adds parameters, not capacity,
    and shrinks the ``alpha / r`` scaling).

    Args:
        peft_config: the LoRA config as it will be applied (after ``vision.scope_targets``).

    Raises:
        ConfigError: naming ``lora.target_modules`` (with the names the model has) or ``lora.r``.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = [(name, shape) for name, m in model.named_modules() if name and (shape := _matrix_shape(m))]
    available = sorted({name.rsplit(".", 1)[-1] for name, _ in modules})
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n, _ in modules)]
    matched = [(n, shape) for n, shape in modules if check_target_module_exists(peft_config, n)]
    issues: list[Issue] = []
    if missing or not matched:
        what = f"no module named {', '.join(missing)}" if missing else "no module in scope (lora.target_scope)"
        issues.append(Issue("lora.target_modules", f"{what}; modules that can take a LoRA: {', '.join(available)}"))
    if matched:
        name, shape = min(matched, key=lambda item: min(item[1]))
        if lora.r > min(shape):
            issues.append(Issue(
                "lora.r", f"{lora.r} is above the rank a LoRA on {name} ({shape[0]}x{shape[1]}) can have: {min(shape)}"
            ))
    if issues:
        raise ConfigError(issues, hint="fix the keys above (--set or your config file); nothing was trained")


def config_from_manifest(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig stored in a manifest (method section validated against its method)."""
    data = dict(data)
    method_data = dict(data.pop("method"))
    cfg = RunConfig.model_validate(data)
    cfg.method = METHODS.get(method_data["name"]).Config.model_validate(method_data)
    return cfg
