"""What a ``bench cl`` run is: the profiles, the spec, the task order, the cells and their configs.

A *cell* is one method (with its variants, ``seq-lora+asd``) over one task order; every cell is
trained with the config :func:`cell_config` builds and never mixed with results of other settings
(:func:`config_changes`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cladapt.errors import ConfigError, DataError, Issue


@dataclass(frozen=True)
class Profile:
    name: str
    train_rows: int | None  # per task; None = all
    test_rows: int | None
    max_tasks: int | None = None  # smoke: only the first tasks of the order
    max_new_tokens: int | None = None  # None: longest label + margin (labels are short)
    mode: str = "both"  # strict exact match + constrained (superficial vs essential forgetting)
    overrides: dict[str, Any] = field(default_factory=dict)


PROFILES = {
    "smoke": Profile("smoke", 16, 16, max_tasks=2, overrides={"train.max_steps": 2, "train.max_length": 256}),
    # quick: all 8 methods of one order fit in about an hour on 2 CPU cores
    "quick": Profile("quick", 160, 60, overrides={"train.max_length": 256, "train.mixed_precision": "auto"}),
    "small": Profile("small", 300, 100, overrides={"train.max_length": 384, "train.mixed_precision": "auto"}),
    "full": Profile("full", None, None, max_new_tokens=50, overrides={"train.mixed_precision": "auto"}),
}


def read_order(data_dir: Path, order: str) -> tuple[list[str], dict[str, list[str]]]:
    """(tasks of ``order``, labels per task) from ``manifest.json``; every task folder must be present."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DataError([Issue(str(data_dir), "no manifest.json: not a CL benchmark folder")])
    manifest = json.loads(manifest_path.read_text())
    orders = manifest.get("orders") or {}
    if order not in orders:
        raise ConfigError([Issue("--order", f"unknown order {order!r}; the manifest has {', '.join(orders)}")])
    tasks = list(orders[order])
    missing = [t for t in tasks if not (data_dir / t / "train.jsonl").is_file() or not (data_dir / t / "test.jsonl").is_file()]
    if missing:
        alt = [o for o, ts in orders.items() if all((data_dir / t / "test.jsonl").is_file() for t in ts)]
        raise DataError([Issue(str(data_dir / t), "task folder (train.jsonl/test.jsonl) is missing") for t in missing],
                        hint=f"orders whose tasks are all present: {', '.join(alt)}")
    labels = {t: list((manifest.get("tasks", {}).get(t) or {}).get("labels") or []) for t in tasks}
    return tasks, labels


def sample_rows(src: Path, n: int | None, dst: Path, *, seed: int = 0) -> Path:
    """A seeded sample of ``n`` lines of ``src`` (file order kept) written to ``dst``."""
    lines = [ln for ln in src.read_text(encoding="utf-8").split("\n") if ln.strip()]
    if n is not None and n < len(lines):
        lines = [lines[i] for i in sorted(random.Random(seed).sample(range(len(lines)), n))]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


@dataclass
class BenchSpec:
    data_dir: Path
    order: str
    profile: Profile
    methods: list[str]
    out: Path
    base_model: str | None = None
    overrides: list[str] = field(default_factory=list)  # --set for every method
    fresh: bool = False
    work: Path | None = None  # scratch root (sampled data, one registry per method); default <out>/.cl_work
    ppl_files: list[Path] = field(default_factory=list)  # general text (JSON Lines, 'text') for the ppl column
    ppl_samples: int = 64
    ppl_length: int = 256
    replay_data: Path | None = None  # general texts for the ``+gere-<loss>`` variants
    command: str = ""  # the command line that ran the benchmark, recorded with the results


#: GeRe losses a ``+gere-<loss>`` variant may name (methods.md §5)
REPLAY_LOSSES = ("tm", "lf", "kl", "l1", "l2")

#: every cell trains the same LoRA shape, so methods are compared at equal targets and rank (and
#: trainable parameters); a method preset with another shape (RegLoRA's all-layers SEFE preset)
#: runs as the separately labelled ``+preset`` variant
EQUAL_BUDGET = ["lora.r=8", 'lora.target_modules=["q_proj", "v_proj"]']


def parse_cell(name: str, replay_data: Path | None = None) -> tuple[str, list[str]]:
    """``method[+variant...]`` -> (method, ``--set`` overrides of the cell).

    Every cell gets :data:`EQUAL_BUDGET` unless it carries ``+preset`` (the method preset's own
    LoRA shape, e.g. ``reglora+preset``: all 7 linear layers). The other variants put the data
    pipeline on top of a method, each cell in its own registry: ``+asd`` (answer-style
    diversification, base-model explanations) and ``+gere-<loss>`` (general replay of 128 texts x
    128 tokens from ``replay_data``, concatenated with the task rows), e.g. ``seq-lora+asd``,
    ``olora+gere-lf``, ``inc-lora+asd+gere-tm``.
    """
    method, *variants = name.split("+")
    sets: list[str] = [] if "preset" in variants else list(EQUAL_BUDGET)
    for variant in variants:
        if variant == "preset":
            continue
        if variant == "asd":
            sets.append("asd.enabled=true")
        elif variant.startswith("gere-") and variant[5:] in REPLAY_LOSSES:
            if replay_data is None:
                raise ConfigError([Issue("--methods", f"{name}: the {variant} variant replays general text; "
                                         "pass --replay-data FILE (JSON Lines with a 'text' field)")])
            sets += ["replay.enabled=true", f"replay.loss={variant[5:]}", f"replay.texts={replay_data}",
                     "replay.n_replay=128", "replay.max_tokens=128"]
        else:
            known = ", ".join(["preset", "asd", *(f"gere-{loss}" for loss in REPLAY_LOSSES)])
            raise ConfigError([Issue("--methods", f"{name}: unknown variant {variant!r}")], hint=f"variants: {known}")
    return method, sets


def lora_label(lora: dict[str, Any]) -> str:
    """A LoRA shape as the tables show it: ``q,v r8``, ``q,k,v,o,gate,up,down r8``."""
    targets = ",".join(str(t).removesuffix("_proj") for t in lora.get("target_modules") or [])
    return f"{targets} r{lora.get('r')}"


def cell_config(spec: BenchSpec, cell: str) -> Any:
    from cladapt.config import load_config

    method, variant_sets = parse_cell(cell, spec.replay_data)
    sets = [f"{k}={json.dumps(v)}" for k, v in spec.profile.overrides.items()]
    if spec.base_model:
        sets.append(f"base_model={spec.base_model}")
    return load_config(method="lora" if method == "mtl" else method, overrides=[*sets, *variant_sets, *spec.overrides])[0]


def config_changes(recorded: dict[str, Any], cfg: Any, sections: tuple[str, ...] = ("method", "lora", "train")) -> list[str]:
    """``section.key`` of every setting recorded with a cell or version that ``cfg`` now sets otherwise.

    Keys only one side knows (a setting added to cladapt since) are not compared.
    """
    now = cfg.model_dump(mode="json")
    changed = []
    for section in sections:
        old, new = recorded.get(section) or {}, now.get(section) or {}
        changed += [f"{section}.{k}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    return changed


def stale_error(what: str, changed: list[str]) -> ConfigError:
    return ConfigError([Issue(what, f"measured with other settings ({', '.join(changed[:6])})")],
                       hint="results of other settings are never mixed: pass --fresh, or another --out and --work-dir")


def work_dir(spec: BenchSpec) -> Path:
    """Scratch of one (order, profile): sampled data and one registry per method (kept for resuming)."""
    return (spec.work or spec.out / ".cl_work") / f"cl_{spec.order}_{spec.profile.name}"
