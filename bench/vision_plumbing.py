"""Real-weights plumbing check of vision-language adapters: a LLaVA-style model whose language model is
the offline SmolLM2-135M-Instruct and whose vision tower is small and random, trained on a two-task toy
image sequence the script generates (colour of a shape, then which shape), with a sum-composed CL
method (O-LoRA), on CPU in minutes.

The CLIP vision tower (2 layers, hidden 128, 56-pixel images in 14-pixel patches: 16 image tokens)
and projector are random and stay frozen; only LoRA on the language model learns. Whatever the model
learns about a picture it reads from random but fixed features. So this checks that images reach the
loss and the adapters, not how good a VLM cladapt makes: a plumbing check, not a quality claim.

Recorded per task, before training and after each task (the model = base + the sum of the versions
trained so far): mean answer-token loss and constrained accuracy on each task's held-out rows, plus
each training run's loss and step time.

    python bench/vision_plumbing.py                          # bench/results/vision_plumbing.json
    python bench/vision_plumbing.py --steps 20 --n-train 64 --n-test 30 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: SmolLM2's ChatML template with image parts (images before the text, as LLaVA does)
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_llava_smollm2(folder: Path, *, seed: int = 0, image_size: int = 56) -> Path:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from cladapt.base_model import DEFAULT_BASE_MODEL, resolve_path

    source = resolve_path(DEFAULT_BASE_MODEL)
    tok = AutoTokenizer.from_pretrained(source)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    text = lm.config.to_dict()
    text.update(vocab_size=len(tok), model_type="llama")
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 128, "intermediate_size": 256,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": image_size, "patch_size": 14,
                       "projection_dim": 128},
        text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    lm.resize_token_embeddings(len(tok), mean_resizing=True)
    missing = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    assert not missing.missing_keys
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   chat_template=TEMPLATE, image_token="<image>", num_additional_image_tokens=1).save_pretrained(folder)
    return folder


SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}


def toy_image(path: Path, colour: str, shape: str, *, rng: object, size: int = 56) -> Path:
    """A shape of a colour at a random place and size on white."""
    from PIL import Image, ImageDraw

    r = rng.randint(size // 5, size // 3)  # type: ignore[attr-defined]
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)  # type: ignore[attr-defined]
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def toy_tasks(folder: Path, *, n_train: int = 96, n_test: int = 30, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Two VQA tasks over the same kind of pictures: the colour, then the shape (train/test files)."""
    import random

    rng = random.Random(seed)
    out: dict[str, dict[str, Path]] = {}
    for task, question in (("colour", "What colour is the shape? Answer with one word."),
                           ("shape", "Which shape is in the picture: square, circle or triangle?")):
        out[task] = {}
        for split, n in (("train", n_train), ("test", n_test)):
            rows = []
            for i in range(n):
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                ref = f"img/{task}-{split}-{i}.png"
                toy_image(folder / ref, colour, shape, rng=rng)
                rows.append({"instruction": question, "image": ref, "output": colour if task == "colour" else shape})
            path = folder / f"{task}-{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            out[task][split] = path
    return out


def answer_loss(model: Any, tok: Any, path: Path, *, batch_size: int = 8) -> float:
    """Mean loss over the answer tokens of ``path``'s rows (images through the processor, as in training)."""
    import torch

    from cladapt.data.rows import load_examples
    from cladapt.train.vision_encode import VisionCollator, encode_vision
    from cladapt.vision import forward_inputs

    rows = []
    for ex in load_examples([path]).examples:
        enc = encode_vision(tok, ex, max_length=512, overlong="reject")
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels, **enc.extra})
    collate = VisionCollator(tok)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            logits = model(**forward_inputs(batch, model.device)).logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    return total / max(count, 1)


def score(model: Any, tok: Any, tasks: dict[str, dict[str, Path]]) -> dict[str, dict[str, float]]:
    """Per task: answer-token loss and constrained accuracy (%) on its held-out rows."""
    from cladapt.evaluation.scoring import evaluate, load_eval_set

    out = {}
    for task, files in tasks.items():
        res = evaluate(model, tok, load_eval_set(files["test"]), mode="constrained", batch_size=8)
        out[task] = {"loss": round(answer_loss(model, tok, files["test"]), 4), "accuracy": round(res.constrained, 2)}
    return out


def run(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cladapt.adapters.loading import attach_sum
    from cladapt.base_model import load
    from cladapt.config import load_config
    from cladapt.registry.store import Store
    from cladapt.train.run import train_task

    t0 = time.perf_counter()
    base = build_llava_smollm2(tmp / "model")
    model, tok, info = load(str(base))
    tasks = toy_tasks(tmp / "data", n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    result: dict[str, Any] = {"base": "LLaVA(SmolLM2-135M-Instruct + random CLIP tower, 2 layers, hidden 128, "
                                      "56 px, 16 image tokens)", "method": args.method, "tasks": list(tasks),
                              "before": score(model, tok, tasks), "after": {}, "training": {}}
    print("before:", result["before"], file=sys.stderr)
    store = Store.init(tmp / "reg")
    over = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.learning_rate={args.lr}",
            "train.max_length=256", f"train.seed={args.seed}", f"base_model={base}"]
    for task, files in tasks.items():
        t1 = time.perf_counter()
        rec = train_task(store, task, [str(files["train"])], load_config(method=args.method, overrides=over)[0],
                         loaded=(model, tok, info))
        stats = rec.manifest.train_stats
        result["training"][task] = {"steps": stats["steps"], "train_loss": stats.get("train_loss"),
                                    "seconds": round(time.perf_counter() - t1, 1)}
        fresh, _, _ = load(str(base))
        composed, _ = attach_sum(fresh, store, info, tmp / "scratch")
        result["after"][task] = score(composed, tok, tasks)
        print(f"after {task}:", result["after"][task], file=sys.stderr)
    first, last = list(tasks)[0], list(tasks)[-1]
    result["learns"] = {t: result["after"][t][t]["loss"] < result["before"][t]["loss"] for t in tasks}
    result["forgetting_first_task_accuracy"] = round(result["after"][first][first]["accuracy"]
                                                     - result["after"][last][first]["accuracy"], 2)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def machine() -> dict[str, Any]:
    import os
    import platform

    import peft
    import torch
    import transformers

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "command": " ".join(["python", *sys.argv])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="olora", help="a sum-composed CL method (the model after a task = the sum)")
    ap.add_argument("--steps", type=int, default=12, help="training steps per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "vision_plumbing.json")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cladapt-vision-plumbing-") as tmp:
        result = run(Path(tmp), args)
    result["note"] = ("plumbing check, not a quality claim: a random frozen vision tower, a 135M language model, "
                      "a few LoRA steps per task on generated pictures")
    result["train_loss_note"] = ("train_loss is the method's training objective: for O-LoRA on the second task it "
                                 "includes lambda1 x the orthogonality penalty summed over modules, so it is not "
                                 "comparable with the first task's")
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
