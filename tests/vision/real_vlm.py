"""A LLaVA-style model with real language weights, built offline: SmolLM2-135M + a small random vision tower.

No PyPI package ships small VLM weights, so the real-weights check puts the offline default base
(SmolLM2-135M-Instruct, cladapt's converted cache folder) in as the language model of a
``LlavaForConditionalGeneration`` whose CLIP vision tower (2 layers, hidden 128, 56-pixel images
in 14-pixel patches: 16 image tokens) and projector are random and stay frozen. Only LoRA on the
language model learns, so whatever the model learns about a picture it reads from random but
fixed features: a plumbing check that images reach the loss, not a quality claim.
"""

from __future__ import annotations

from pathlib import Path

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
    import json
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
