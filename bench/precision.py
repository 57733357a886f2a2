"""Mixed precision on the default model: speed of bf16 autocast against fp32, and what it changes in scores.

Measured in one process on the same rows:

1. LoRA training step (plain ``transformers.Trainer`` + PEFT, r=8 on q/v, batch 8, CL-benchmark rows up to
   ``--max-length`` tokens): median seconds per optimizer step in fp32 and under ``bf16=True``;
2. evaluation of ``--rows`` dbpedia test rows, mode ``both`` (greedy exact match + constrained): seconds,
   exact match, constrained accuracy and format rate under each precision;
3. constrained scoring alone: the packed tree-mask pass against the KV-cached label passes, in both
   precisions (seconds, max |Δ log p| and agreement of the chosen label against fp32 cached).

Writes ``bench/results/precision.json`` (machine, versions, command).

    python bench/precision.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLADAPT_SHARED", ROOT.parent / "shared")) / "data" / "cl-benchmark"


def train_step_seconds(model: Any, tok: Any, rows: Path, *, bf16: bool, args: argparse.Namespace) -> float:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from cladapt.data.rows import load_examples
    from cladapt.train.chat import encode_all
    from cladapt.train.loop import Collator

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    enc, _ = encode_all(tok, load_examples([rows]).examples, max_length=args.max_length, overlong="truncate")
    ds = datasets.Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in enc])
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=8, max_steps=args.steps + 2, learning_rate=1e-3,
                                  report_to=[], save_strategy="no", logging_steps=1000, seed=0, bf16=bf16,
                                  use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        Trainer(model=peft_model, args=targs, train_dataset=ds, data_collator=Collator(tok.pad_token_id), callbacks=[Timer()]).train()
    peft_model.unload()
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision.json")
    args = ap.parse_args()

    import peft
    import torch
    import transformers

    from cladapt import evaluation as E
    from cladapt.base_model import load
    from cladapt.precision import autocast, cpu_has_fast_bf16

    model, tok, _ = load("smollm2-135m-instruct")
    out: dict[str, Any] = {"benchmark": "precision", "args": vars(args) | {"out": str(args.out)}, "command": " ".join(sys.argv),
                           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                                       "cpu_fast_bf16": cpu_has_fast_bf16(), "python": platform.python_version(), "torch": torch.__version__,
                                       "transformers": transformers.__version__, "peft": peft.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "train.jsonl"
        rows.write_text("\n".join((DATA / "dbpedia" / "train.jsonl").read_text().splitlines()[:80]) + "\n")
        out["train_step_s"] = {p: round(train_step_seconds(model, tok, rows, bf16=p == "bf16", args=args), 3) for p in ("no", "bf16")}
        print("train step s:", out["train_step_s"], flush=True)

    es = E.load_eval_set(DATA / "dbpedia" / "test.jsonl", limit=args.rows)
    runs = {p: E.evaluate(model, tok, es, mode="both", max_new_tokens=None, precision=p) for p in ("no", "bf16")}
    out["eval"] = {p: {"seconds": r.seconds, "exact_match": r.exact_match, "constrained": r.constrained, "format_rate": r.format_rate}
                   for p, r in runs.items()}
    print("eval:", out["eval"], flush=True)

    convs = [ex.prompt_messages for ex in es.examples]
    scoring: dict[str, Any] = {}
    lps: dict[tuple[str, bool], Any] = {}
    for prec in ("no", "bf16"):
        for packed in (True, False):
            with autocast(prec, "cpu"):
                t0 = time.perf_counter()
                lps[(prec, packed)] = torch.tensor(E.label_logprobs(model, tok, convs, es.labels, packed=packed))
                scoring[f"{prec}_{'packed' if packed else 'cached'}_s"] = round(time.perf_counter() - t0, 2)
    ref = lps[("no", False)]
    for (prec, packed), lp in lps.items():
        name = f"{prec}_{'packed' if packed else 'cached'}"
        scoring[f"{name}_max_abs_diff_vs_fp32_cached"] = round(float((lp - ref).abs().max()), 5)
        scoring[f"{name}_choice_agreement_vs_fp32_cached"] = round(float((lp.argmax(1) == ref.argmax(1)).float().mean()), 4)
    out["constrained_scoring"] = scoring
    print("constrained scoring:", scoring, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
