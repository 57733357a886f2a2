"""Training step time of a vision-language base against its text-only language model.

The model is the LLaVA-style one of ``bench/vision_plumbing.py`` (SmolLM2-135M-Instruct as the
language model, a small random CLIP tower: 16 image tokens a picture). Both models get LoRA r 8 on
the language model's ``q_proj``/``v_proj`` (the vision tower and projector stay frozen, as
``cladapt train`` does by default) and train on the same rows: the VLM sees each row's picture, the
text-only model the same question and answer without it. One step = forward, backward and an AdamW
step on a batch, in fp32; steps of the two models alternate after a warm-up, so a change in machine
load hits both; the median per model and their ratio are written with the machine and versions.

    python bench/vision_step_time.py                       # bench/results/vision_step_time.json
    python bench/vision_step_time.py --steps 12 --batch-size 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision_plumbing import build_llava_smollm2, machine, toy_tasks  # noqa: E402


def _batches(tok: Any, path: Path, *, vision: bool, batch_size: int) -> tuple[list[dict[str, Any]], float]:
    """Collated batches of ``path``'s rows and the mean tokens per row the model reads."""
    from cladapt.data.rows import load_examples
    from cladapt.train.chat import encode
    from cladapt.train.loop import Collator
    from cladapt.train.vision_encode import VisionCollator, encode_vision

    examples = load_examples([path]).examples
    if vision:
        rows = [encode_vision(tok, ex, max_length=512, overlong="reject") for ex in examples]
        collate: Any = VisionCollator(tok)
        dicts = [{"input_ids": r.input_ids, "labels": r.labels, **r.extra} for r in rows]
    else:
        rows = [encode(tok, ex, max_length=512, overlong="reject") for ex in examples]
        collate = Collator(tok.pad_token_id)
        dicts = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    tokens = statistics.mean(len(r.input_ids) for r in rows)
    return [collate(dicts[i : i + batch_size]) for i in range(0, len(dicts) - batch_size + 1, batch_size)], tokens


def _lora(model: Any, *, vision: bool) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from cladapt.vision import scope_targets

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    if vision:  # the language model only, as `cladapt train` does on a vision-language base
        config = scope_targets(config, model, "language_model")
    peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    return peft_model, opt


def _step(model: Any, opt: Any, batch: dict[str, Any]) -> float:
    from cladapt.vision import forward_inputs

    t0 = time.perf_counter()
    out = model(**forward_inputs(batch, model.device), labels=batch["labels"].to(model.device))
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cladapt.base_model import DEFAULT_BASE_MODEL, load

    folder = build_llava_smollm2(tmp / "model")
    tasks = toy_tasks(tmp / "data", n_train=args.batch_size * 4, n_test=1, seed=0)
    rows = tasks["colour"]["train"]
    text_rows = tmp / "colour-text.jsonl"
    text_rows.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "image"}) + "\n"
                                 for line in rows.read_text().splitlines()))
    vlm, vtok, _ = load(str(folder))
    lm, ltok, _ = load(DEFAULT_BASE_MODEL)
    models = {"vision-language": _lora(vlm, vision=True), "text-only": _lora(lm, vision=False)}
    data = {"vision-language": _batches(vtok, rows, vision=True, batch_size=args.batch_size),
            "text-only": _batches(ltok, text_rows, vision=False, batch_size=args.batch_size)}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.warmup + args.steps):
        for name, (model, opt) in models.items():
            batches = data[name][0]
            seconds = _step(model, opt, batches[i % len(batches)])
            if i >= args.warmup:
                times[name].append(seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "models": {name: {"median_step_s": round(med[name], 4), "steps_s": [round(t, 4) for t in times[name]],
                          "tokens_per_row": round(data[name][1], 1)} for name in models},
        "ratio_vision_over_text": round(med["vision-language"] / med["text-only"], 3),
        "setup": {"batch_size": args.batch_size, "lora": "r 8 on the language model's q_proj, v_proj", "dtype": "fp32",
                  "vision_tower": "CLIP 2 layers, hidden 128, 56 px, 16 image tokens (random, frozen)"},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "vision_step_time.json")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cladapt-vision-step-") as tmp:
        result = run(Path(tmp), args)
    result["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
