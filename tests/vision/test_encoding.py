"""Encoding image rows: placeholders expanded by the processor, labels on answer tokens only."""

from __future__ import annotations

from pathlib import Path

import pytest
from vision_helpers import image_task_rows, write_rows

from cladapt.data.rows import load_examples
from cladapt.train.chat import IGNORE_INDEX, encode


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_vl"])
def test_image_tokens_expanded_and_only_the_answer_labelled(family: str, vlm_paths: dict[str, Path], tmp_path: Path) -> None:
    from cladapt.base_model import load_tokenizer

    tok = load_tokenizer(str(vlm_paths[family]))
    ex = load_examples([write_rows(tmp_path / "t.jsonl", image_task_rows("colour", tmp_path, n=1))]).examples[0]
    enc = encode(tok, ex, max_length=256, overlong="truncate")
    image_id = tok.convert_tokens_to_ids(tok.image_token)
    n_image = enc.input_ids.count(image_id)
    assert n_image == {"llava": 4, "idefics3": 1, "qwen2_vl": 1}[family]  # 28x28 pixels in 14-pixel patches
    labelled = [i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(labelled).strip().startswith(("red", "blue"))
    assert all(lab == IGNORE_INDEX for i, lab in zip(enc.input_ids, enc.labels, strict=True) if i == image_id)
    assert enc.extra["vision"] and all(len(v) == len(enc.input_ids) for k, v in enc.extra.items() if k != "vision")


def test_text_rows_on_a_vlm_lose_their_middle_image_rows_are_never_cut(vlm_paths: dict[str, Path], tmp_path: Path) -> None:
    from cladapt.base_model import load_tokenizer

    tok = load_tokenizer(str(vlm_paths["qwen2_vl"]))
    long_text = {"instruction": "Answer yes or no.", "input": " ".join(["the film was great"] * 30), "output": "yes"}
    rows = [long_text, *image_task_rows("colour", tmp_path, n=1)]
    text_ex, image_ex = load_examples([write_rows(tmp_path / "t.jsonl", rows)]).examples
    enc = encode(tok, text_ex, max_length=48, overlong="truncate")
    assert enc.truncated and len(enc.input_ids) == 48 and len(enc.extra["mm_token_type_ids"]) == 48
    assert tok.decode(enc.input_ids).startswith("<|im_start|>user\nAnswer yes or no.")
    with pytest.raises(ValueError, match="image rows are never cut"):
        encode(tok, image_ex, max_length=12, overlong="truncate")
