"""Does a LoRA shape fit the loaded base model? Checked before any training work starts."""

from __future__ import annotations

from typing import Any

from cladapt.adapters.base import LoraSpec
from cladapt.errors import ConfigError, Issue


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
