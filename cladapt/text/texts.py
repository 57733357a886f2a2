"""Plain texts (general-domain data): the one reader behind GeRe replay's ``--texts`` and general perplexity.

Accepted files: ``.jsonl`` / ``.json`` rows with a ``text`` field (as in ``shared/data/general-replay``)
or plain strings, and ``.txt`` with one text per non-empty line. Every malformed row is reported at
once, with file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cladapt.errors import DataError, Issue


def _records(path: Path, raw: str, issues: list[Issue]) -> list[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [(n, line.strip()) for n, line in enumerate(raw.split("\n"), start=1) if line.strip()]
    if suffix in (".jsonl", ".ndjson"):
        records: list[tuple[int, Any]] = []
        # split on "\n" only: str.splitlines also breaks at U+2028/U+0085 inside JSON strings
        for n, line in enumerate(raw.split("\n"), start=1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    issues.append(Issue(f"{path}:{n}", f"not valid JSON: {exc.msg}"))
        return records
    if suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError([Issue(f"{path}:{exc.lineno}", f"not valid JSON: {exc.msg}")]) from exc
        if not isinstance(data, list):
            raise DataError([Issue(str(path), "a .json file of texts must hold an array of rows")])
        return list(enumerate(data, start=1))
    raise DataError([Issue(str(path), f"unsupported file type {path.suffix!r}; use .jsonl, .json or .txt")])


def load_texts(path: str | Path, *, limit: int | None = None) -> list[dict[str, str]]:
    """The non-empty texts of ``path`` as ``{"text", "id", "source"}`` dicts, in file order.

    Args:
        limit: keep the first ``limit`` texts (the whole file is still validated).

    Raises:
        DataError: naming the file and line of every malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError([Issue(str(path), "file not found")])
    issues: list[Issue] = []
    out: list[dict[str, str]] = []
    for n, rec in _records(path, path.read_text(encoding="utf-8"), issues):
        text = rec.get("text") if isinstance(rec, dict) else rec if isinstance(rec, str) else None
        if not isinstance(text, str):
            issues.append(Issue(f"{path}:{n}", "expected a string or an object with a string field 'text'"))
        elif text.strip():
            rid = str(rec.get("id", f"{path.name}:{n}")) if isinstance(rec, dict) else f"{path.name}:{n}"
            out.append({"text": text, "id": rid, "source": str(path)})
    if issues:
        raise DataError(issues, hint="each row needs a non-empty string field 'text'")
    return out[:limit] if limit is not None else out


def texts_sha256(texts: Sequence[str]) -> str:
    """sha256 over the texts in order (NUL-separated), to tell whether a text set changed."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()
