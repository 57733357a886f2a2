"""Image rows: both spellings, paths relative to the data file, and clear errors for bad images."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_vlm import write_image
from vision_helpers import write_rows

from cladapt.data.rows import load_examples
from cladapt.errors import DataError


def test_short_form_and_chat_parts_resolve_relative_to_the_file(tmp_path: Path) -> None:
    data = tmp_path / "sub"
    write_image(data / "img" / "a.png", (255, 0, 0))
    write_image(data / "img" / "b.png", (0, 0, 255), shape="circle")
    rows = [
        {"instruction": "What colour?", "image": "img/a.png", "output": "red"},
        {"messages": [
            {"role": "system", "content": "Look closely."},
            {"role": "user", "content": [{"type": "text", "text": "Which shape?"}, {"type": "image", "image": "img/b.png"}]},
            {"role": "assistant", "content": "circle"},
        ]},
        {"messages": [{"role": "user", "content": "Both?", "images": ["img/a.png", "img/b.png"]},
                      {"role": "assistant", "content": "yes"}]},
        {"instruction": "text only", "output": "fine"},
    ]
    loaded = load_examples([write_rows(data / "rows.jsonl", rows)])
    ex = loaded.examples
    assert ex[0].messages[0] == {"role": "user", "content": "What colour?", "images": [str(data / "img" / "a.png")]}
    assert ex[1].messages[1] == {"role": "user", "content": "Which shape?", "images": [str(data / "img" / "b.png")]}
    assert ex[2].images == [str(data / "img" / "a.png"), str(data / "img" / "b.png")]
    assert ex[3].images == [] and "images" not in ex[3].messages[0]
    # the same prompt with another picture is another row (fingerprint and duplicates see images)
    again = load_examples([write_rows(data / "other.jsonl", [{**rows[0], "image": "img/b.png"}])])
    assert again.sha256 != load_examples([write_rows(data / "one.jsonl", rows[:1])]).sha256


def _error(tmp_path: Path, rows: list[dict]) -> str:
    path = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_examples([path])
    return str(info.value)


def test_missing_unreadable_and_wrong_mode_images_name_file_and_line(tmp_path: Path) -> None:
    write_image(tmp_path / "ok.png", (0, 255, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    write_image(tmp_path / "deep.png", (0, 0, 0), mode="I;16")
    msg = _error(tmp_path, [
        {"instruction": "q", "image": "ok.png", "output": "a"},
        {"instruction": "q", "image": "nowhere.png", "output": "a"},
        {"instruction": "q", "image": "broken.png", "output": "a"},
        {"instruction": "q", "image": "deep.png", "output": "a"},
        {"instruction": "q", "image": "https://example.com/x.png", "output": "a"},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": [{"type": "image", "image": "ok.png"}]}]},
    ])
    bad = tmp_path / "bad.jsonl"
    assert f"{bad}:1" not in msg
    assert f"{bad}:2" in msg and "'nowhere.png' not found" in msg
    assert f"{bad}:3" in msg and "not a readable image" in msg
    assert f"{bad}:4" in msg and "mode I;16" in msg
    assert f"{bad}:5" in msg and "only local files" in msg
    assert f"{bad}:6: messages[0].content[0]" in msg
    assert f"{bad}:7" in msg and "not in the assistant" in msg


def test_image_rows_on_a_text_base_are_refused_before_training(tmp_path: Path, tiny_base_path: Path) -> None:
    from conftest import tiny_overrides

    from cladapt.config import load_config
    from cladapt.registry.store import Store
    from cladapt.train.run import train_task

    write_image(tmp_path / "a.png", (255, 0, 0))
    data = write_rows(tmp_path / "t.jsonl", [{"instruction": "What colour?", "image": "a.png", "output": "red"}] * 2)
    store = Store.init(tmp_path / "reg")
    cfg = load_config(overrides=[*tiny_overrides(), f"base_model={tiny_base_path}"])[0]
    with pytest.raises(DataError, match=rf"{data}:1.*text-only"):
        train_task(store, "colour", [str(data)], cfg)
    assert store.list() == []
