"""Tiny random vision-language models with their processors, built offline in seconds.

Each family from a config (no download): LLaVA and LLaVA-NeXT (CLIP vision tower + Llama),
LLaVA-OneVision (SigLIP tower + Qwen2, any-resolution tiles), Idefics3 and SmolVLM (SigLIP-style
tower + pixel-shuffle connector + Llama) and Qwen2-VL / Qwen2.5-VL (their own ViT + Qwen2 with
multimodal RoPE). Every language model has hidden size 64 and 2 layers, every vision tower
hidden size 32 and 1 layer; images are 28x28 pixels, so one image is 1 (Qwen2-VL, Idefics3) or
4 (LLaVA) tokens. The tokenizer is the same BPE as ``tests/tiny.py`` plus each family's image
tokens as special tokens, and the chat templates follow the real models' formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("llava", "idefics3", "qwen2_vl", "llava_next", "qwen2_5_vl", "llava_onevision", "smolvlm")

_CHATML_PARTS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ IMAGE }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: SmolVLM's format: "User:<image>text<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _tokenizer(specials: list[str], eos: str) -> Any:
    from tiny import WORDS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = ["<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=base + specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    words = [*WORDS, "red", "green", "blue", "square", "circle", "colour", "shape", "image", "picture"]
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 3
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token=eos, pad_token=eos,
        extra_special_tokens={},
    )


def _llama_text(tok: Any) -> dict[str, Any]:
    return {
        "model_type": "llama", "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False,
    }


def _llava(folder: Path) -> None:
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _tokenizer(["<image>"], "<|im_end|>")
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(
        image_processor=image_proc, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        chat_template=_CHATML_PARTS.replace("IMAGE", "'<image>'"), image_token="<image>",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                       "projection_dim": 32},
        text_config=_llama_text(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    proc.save_pretrained(folder)


def _idefics3(folder: Path) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tok = _tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"], "<end_of_utterance>")
    image_proc = Idefics3ImageProcessorPil(
        size={"longest_edge": 28}, max_image_size={"longest_edge": 28}, do_image_splitting=False
    )
    proc = Idefics3Processor(image_processor=image_proc, tokenizer=tok, image_seq_len=1, chat_template=_IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        text_config=_llama_text(tok), image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    proc.save_pretrained(folder)


def _qwen2_vl(folder: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, "<|im_end|>")
    image_proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28, patch_size=14, merge_size=2)
    template = _CHATML_PARTS.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = {**_llama_text(tok), "model_type": "qwen2_vl_text",
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    config = Qwen2VLConfig(
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config=text, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    # Qwen2VLProcessor cannot be built without torchvision (its video processor needs it), so the
    # folder gets what a hub snapshot holds: tokenizer, image processor config, chat template
    tok.save_pretrained(folder)
    image_proc.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(template)


def _llava_next(folder: Path) -> None:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = _tokenizer(["<image>"], "<|im_end|>")
    pinpoints = [[28, 28], [28, 56], [56, 28]]
    image_proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=image_proc, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        chat_template=_CHATML_PARTS.replace("IMAGE", "'<image>'"), image_token="<image>", num_additional_image_tokens=1,
    )
    config = LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                       "projection_dim": 32},
        text_config=_llama_text(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
    )
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    proc.save_pretrained(folder)


def _qwen2_5_vl(folder: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, "<|im_end|>")
    image_proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28, patch_size=14, merge_size=2)
    template = _CHATML_PARTS.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = {**_llama_text(tok), "model_type": "qwen2_5_vl_text",
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 28,
                       "fullatt_block_indexes": [1]},
        text_config=text, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    image_proc.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(template)


def _snapshot(folder: Path, tok: Any, image_proc: Any, template: str, processor: dict[str, Any]) -> None:
    """What a hub snapshot of a processor with a video processor holds, written without torchvision
    (which building that processor needs): tokenizer, image processor, chat template, processor_config.json."""
    import json

    tok.save_pretrained(folder)
    image_proc.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(template)
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))


def _llava_onevision(folder: Path) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    tok = _tokenizer(["<image>", "<video>"], "<|im_end|>")
    pinpoints = [[28, 28], [28, 56], [56, 28]]
    image_proc = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints)
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        text_config={**_llama_text(tok), "model_type": "qwen2"}, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
    )
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    _snapshot(folder, tok, image_proc, _CHATML_PARTS.replace("IMAGE", "'<image>'"), {
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 4, "vision_feature_select_strategy": "full",
        "image_token": "<image>", "video_token": "<video>", "vision_aspect_ratio": "anyres_max_9"})


def _smolvlm(folder: Path) -> None:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    tok = _tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"], "<end_of_utterance>")
    image_proc = SmolVLMImageProcessorPil(
        size={"longest_edge": 28}, max_image_size={"longest_edge": 28}, do_image_splitting=False
    )
    config = SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        text_config=_llama_text(tok), image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    SmolVLMForConditionalGeneration(config).save_pretrained(folder)
    _snapshot(folder, tok, image_proc, _IDEFICS3_TEMPLATE, {"processor_class": "SmolVLMProcessor", "image_seq_len": 1})


def build_tiny_vlm(folder: Path, family: str, *, seed: int = 0) -> Path:
    """Write a tiny random ``family`` model and its processor to ``folder`` (a from_pretrained folder)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    builders = {"llava": _llava, "idefics3": _idefics3, "qwen2_vl": _qwen2_vl, "llava_next": _llava_next,
                "qwen2_5_vl": _qwen2_5_vl, "llava_onevision": _llava_onevision, "smolvlm": _smolvlm}
    builders[family](folder)
    return folder


def write_image(path: Path, colour: tuple[int, int, int], *, shape: str = "square", size: int = 28, mode: str = "RGB") -> Path:
    """A small picture: a coloured square or circle on white (PNG)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert(mode).save(path)
    return path
