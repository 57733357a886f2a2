"""Every accepted file format loads the same rows, and labels cover answer tokens only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cladapt.data.rows import Example, load_examples
from cladapt.errors import DataError
from cladapt.train.chat import IGNORE_INDEX, encode

ROWS = [
    {"instruction": "Sentiment?", "input": "the film was great", "output": "positive"},
    {"instruction": "Sentiment?", "input": "the film was terrible", "output": "negative"},
]


def _messages(paths: list[Path]) -> list[list[dict[str, str]]]:
    return [ex.messages for ex in load_examples(paths).examples]


def test_jsonl_json_csv_parquet_and_saved_dataset_agree(tmp_path: Path) -> None:
    import datasets

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS}))
    csv = tmp_path / "rows.csv"
    csv.write_text("instruction,input,output\n" + "".join(f"{r['instruction']},{r['input']},{r['output']}\n" for r in ROWS))
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(saved))
    expected = _messages([jsonl])
    assert expected[0] == [{"role": "user", "content": "Sentiment?\nthe film was great"},
                           {"role": "assistant", "content": "positive"}]
    for path in (array, wrapped, csv, parquet, saved):
        assert _messages([path]) == expected, path


def test_unsupported_suffix_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "rows.xml").write_text("<rows/>")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError) as err:
        load_examples([tmp_path / "rows.xml", tmp_path / "empty.jsonl"])
    text = str(err.value)
    assert "unsupported file type .xml" in text and "empty.jsonl: the file holds no rows" in text


def test_chat_rows_label_every_assistant_turn_only(tiny_loaded) -> None:  # noqa: ANN001
    _, tok, _ = tiny_loaded
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the film"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "the plot"},
        {"role": "assistant", "content": "negative"},
    ]
    enc = encode(tok, Example(msgs, "x.jsonl", 1), max_length=512, overlong="reject")
    labelled = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])
    assert "positive" in labelled and "negative" in labelled
    assert "the film" not in labelled and "be brief" not in labelled and "user" not in labelled
    # the prompt part is never labelled, and the labelled ids are exactly the answer ids
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in enc.labels[:first])
    assert [lab for lab in enc.labels if lab != IGNORE_INDEX] == [
        t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX
    ]


def test_truncation_keeps_the_answer(tiny_loaded) -> None:  # noqa: ANN001
    _, tok, _ = tiny_loaded
    long = Example([{"role": "user", "content": "the film was great " * 100},
                    {"role": "assistant", "content": "positive"}], "x.jsonl", 7)
    enc = encode(tok, long, max_length=40, overlong="truncate")
    assert enc.truncated and len(enc.input_ids) == 40
    assert "positive" in tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != -100])
    with pytest.raises(ValueError, match="max_length 40"):
        encode(tok, long, max_length=40, overlong="reject")


def _decoded(tok, enc, *, answer: bool) -> str:  # noqa: ANN001
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if (lab != IGNORE_INDEX) == answer])


def test_overlong_row_loses_the_middle_of_its_input(tmp_path: Path, tiny_loaded) -> None:  # noqa: ANN001
    _, tok, _ = tiny_loaded
    instruction = "What is the topic of the following paragraph? Choose one from the option.\nOption: sports, business\n"
    middle = " ".join(["the company does business"] * 60)
    row = {"instruction": instruction, "input": f"title first sentence {middle} last sentence true", "output": "business"}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ex = load_examples([path]).examples[0]
    full = encode(tok, ex, max_length=4096, overlong="reject")
    enc = encode(tok, ex, max_length=80, overlong="truncate")
    assert not full.truncated and len(full.input_ids) > 200
    assert enc.truncated and len(enc.input_ids) == 80
    prompt = _decoded(tok, enc, answer=False)
    # the instruction with its option list, the input's start and end, the answer: all kept
    assert prompt.startswith("<|im_start|>user\n" + instruction + "title first sentence")
    assert prompt.endswith("last sentence true<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count("business") < middle.count("business")
    assert _decoded(tok, enc, answer=True).startswith("business")
    # a chat row keeps its system prompt; its last user message is cut in the middle
    chat = Example([{"role": "system", "content": "answer with one word"},
                    {"role": "user", "content": f"topic? {middle} end"},
                    {"role": "assistant", "content": "business"}], "x.jsonl", 1)
    enc = encode(tok, chat, max_length=60, overlong="truncate")
    prompt = _decoded(tok, enc, answer=False)
    assert len(enc.input_ids) == 60 and prompt.startswith("<|im_start|>system\nanswer with one word<|im_end|>\n")
    assert "topic?" in prompt and "end<|im_end|>" in prompt
    with pytest.raises(ValueError, match="even without its input"):
        encode(tok, ex, max_length=20, overlong="truncate")
