"""Data validation (file:line errors) and the statistics behind ``cladapt data check``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from cladapt.data.rows import conflicts, load_examples
from cladapt.errors import DataError
from cladapt.text.texts import load_texts
from cladapt.train.data_check import describe


def test_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"instruction": "q", "output": "a"}) + "\n"
        + "{not json\n"
        + "\n"
        + json.dumps({"instruction": "q", "ouput": "a"}) + "\n"
        + json.dumps({"instruction": "q", "output": ""}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    with pytest.raises(DataError) as err:
        load_examples([path])
    wheres = [i.where for i in err.value.issues]
    assert wheres == [f"{path}:2", f"{path}:4", f"{path}:4", f"{path}:5", f"{path}:6"]
    text = str(err.value)
    assert f"{path}:4: unknown field(s) ['ouput']" in text and "not valid JSON" in text
    assert "cladapt data check" in (err.value.hint or "")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"}).encode() + b"\n"
    path.write_bytes(good + good + b'{"instruction": "caf\xe9", "output": "a"}\n')
    with pytest.raises(DataError) as err:
        load_examples([path])
    assert [i.where for i in err.value.issues] == [f"{path}:3"]
    assert "not valid UTF-8" in str(err.value)


def test_csv_lines_and_missing_file(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text("instruction,input,output\nq1,x,a\nq2,y,\n")
    with pytest.raises(DataError) as err:
        load_examples([csv, tmp_path / "nope.jsonl"])
    assert [i.where for i in err.value.issues] == [f"{csv}:3", str(tmp_path / "nope.jsonl")]


def test_describe_counts_duplicates_conflicts_and_tokens(tmp_path: Path, tiny_loaded) -> None:  # noqa: ANN001
    _, tok, _ = tiny_loaded
    rows = [{"instruction": "topic?", "input": f"text {i % 5}", "output": ["sports", "business"][i % 2]}
            for i in range(10)]
    rows.append({"instruction": "topic?", "input": "a very long text " * 40, "output": "sports"})
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    loaded = load_examples([path])
    report = describe(loaded, tokenizer=tok, max_length=64)
    assert report["rows"] == 11 and report["files"] == {str(path): 11}
    assert report["labels"] == {"distinct": 2, "top": {"sports": 6, "business": 5}}
    # row i+5 repeats row i's prompt with the other answer (5 is odd): a conflict, not a duplicate
    assert [d["where"] for d in report["conflicts"]] == [f"{path}:{i}" for i in range(6, 11)]
    assert report["duplicates"] == []
    t = report["tokens"]
    assert t["total"]["max"] > 64 and t["answer"]["min"] >= 1
    assert [o["where"] for o in report["overlong"]] == [f"{path}:11"]
    assert "tokens" not in describe(loaded)


def test_duplicates_reported_with_both_lines(tmp_path: Path) -> None:
    row = {"instruction": "q", "output": "a"}
    path = write_jsonl(tmp_path / "d.jsonl", [row, {"instruction": "r", "output": "b"}, row])
    report = describe(load_examples([path]))
    assert report["duplicates"] == [{"where": f"{path}:3", "first": f"{path}:1"}]
    assert conflicts(load_examples([path]).examples) == []


def test_general_texts_loader(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "g.jsonl", [{"text": "one", "id": "a"}, {"text": "  "}, {"text": "two"}])
    assert [(t["text"], t["id"]) for t in load_texts(good)] == [("one", "a"), ("two", "g.jsonl:3")]
    txt = tmp_path / "g.txt"
    txt.write_text("first\n\nsecond\n")
    assert [t["text"] for t in load_texts(txt)] == ["first", "second"]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(DataError, match=r"b.jsonl:2"):
        load_texts(bad)


def test_jsonl_rows_keep_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    # review texts in the benchmark pack hold U+0085 and U+2028 inside strings, written raw
    path = tmp_path / "reviews.jsonl"
    rows = [{"instruction": "Sentiment?", "input": "great\u0085film\u2028really", "output": "positive"},
            {"instruction": "Sentiment?", "input": "dull", "output": "negative"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    examples = load_examples([path]).examples
    assert [e.line for e in examples] == [1, 2]
    assert examples[0].input_text == "great\u0085film\u2028really"
