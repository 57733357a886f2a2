"""Helpers for vision-language tests: small image tasks written as data files."""

from __future__ import annotations

import json
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def image_task_rows(kind: str, folder: Path, n: int = 8, *, chat: bool = False) -> list[dict]:
    """A tiny VQA task over generated pictures: the shape's colour, or its form.

    Images are written under ``folder/img`` and referenced relative to ``folder``.
    """
    from tiny_vlm import write_image

    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 2]
        shape = ("square", "circle")[(i // 2) % 2]
        ref = f"img/{colour}-{shape}-{i}.png"
        write_image(folder / ref, COLOURS[colour], shape=shape)
        question = "What colour is the shape?" if kind == "colour" else "What shape is in the picture?"
        answer = colour if kind == "colour" else shape
        if chat:
            content = [{"type": "image", "image": ref}, {"type": "text", "text": question}]
            rows.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]})
        else:
            rows.append({"instruction": question, "input": "", "image": ref, "output": answer})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
