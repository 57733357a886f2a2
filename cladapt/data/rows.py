"""Load and validate task data. Every bad row is reported at once, with file, line and field.

Accepted sources (``cladapt.data.sources``): JSON Lines, JSON (an array of rows, or
``{"data": [...]}``), CSV/TSV, Parquet, a dataset folder (``Dataset.save_to_disk`` or data files), or
a dataset name for ``datasets.load_dataset`` (``imdb``, ``imdb:test``). Accepted rows:

* instruction rows ``{"instruction": str, "input": str, "output": str}`` (``instruction`` or
  ``input`` may be absent or empty, not both; ``output`` must be non-empty);
* chat rows ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` ending
  with an assistant message.

Image rows (vision-language bases) add images by local path: content parts
``{"type": "image", "image": PATH}`` in chat messages, or an ``image`` field on instruction rows
(``cladapt.data.image_rows``); such a message carries ``images`` (absolute paths).

Optional metadata fields (``task``, ``id``, ``source``, ``label``, ``meta``) are kept; any other
field is an error, because a misspelt ``ouput`` would otherwise train on nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cladapt.data import image_rows
from cladapt.data.sources import JSON_SUFFIXES, parse_source, read_source
from cladapt.errors import DataError, Issue

logger = logging.getLogger(__name__)

INSTRUCTION_FIELDS = ("instruction", "input", "output")
META_FIELDS = ("task", "id", "source", "label", "meta", "style", "gold")
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One validated training/evaluation example, with where it came from."""

    messages: list[dict[str, Any]]  # {"role", "content": str} (+ "images": [abs paths] on image rows)
    file: str
    line: int
    meta: dict[str, Any] = field(default_factory=dict)
    #: an instruction row's ``input`` field: the part of the prompt an over-long row loses first
    #: (train.chat); empty for chat rows
    input_text: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def images(self) -> list[str]:
        """Every image of the conversation, in order (empty for text rows)."""
        return [p for m in self.messages for p in m.get("images") or ()]

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """Everything before the final assistant answer (what a model sees at inference)."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt_text(self) -> str:
        """The last user message: the text routers and evaluators look at."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


def join_prompt(instruction: str, inp: str) -> str:
    """``instruction`` and ``input`` as one user message (newline between unless one is there)."""
    if not instruction:
        return inp
    if not inp:
        return instruction
    sep = "" if instruction.endswith(("\n", " ")) else "\n"
    return instruction + sep + inp


def _check_str(rec: dict[str, Any], key: str, where: str, issues: list[Issue], *, required: bool,
               null_ok: bool = True) -> str:
    if key in rec and rec[key] is None and not null_ok:
        issues.append(Issue(where, f"field {key!r} is null; give a string ('' for none) or leave the field out"))
        return ""
    if key not in rec or rec[key] is None:
        if required:
            issues.append(Issue(where, f"missing field {key!r}"))
        return ""
    value = rec[key]
    if not isinstance(value, str):
        issues.append(Issue(where, f"field {key!r} must be a string, got {type(value).__name__}"))
        return ""
    return value


def _messages_from_chat(rec: dict[str, Any], where: str, issues: list[Issue]) -> list[dict[str, Any]] | None:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        issues.append(Issue(where, "field 'messages' must be a non-empty list"))
        return None
    out: list[dict[str, Any]] = []
    for k, m in enumerate(msgs):
        at = f"{where}: messages[{k}]"
        if image_rows.has_images(m) and set(m) <= {"role", "content", "images"} and m.get("role") in ROLES:
            parsed = image_rows.parse_message(m, at, image_rows.base_dir(where.rsplit(":", 1)[0]), issues)
            if parsed is None:
                return None
            out.append(parsed)
            continue
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            issues.append(Issue(at, "each message must be {'role': ..., 'content': ...}"))
            return None
        if m["role"] not in ROLES:
            issues.append(Issue(at, f"role must be one of {ROLES}, got {m['role']!r}"))
            return None
        if not isinstance(m["content"], str):
            issues.append(Issue(at, f"content must be a string, got {type(m['content']).__name__}"))
            return None
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        issues.append(Issue(where, "the last message must be the assistant's answer"))
        return None
    if not out[-1]["content"].strip():
        issues.append(Issue(f"{where}: messages[{len(out) - 1}]", "empty assistant answer"))
        return None
    if not any(m["role"] == "user" for m in out):
        issues.append(Issue(where, "no user message"))
        return None
    return out


def _to_example(rec: Any, file: str, line: int, issues: list[Issue], *, null_ok: bool = True) -> Example | None:
    """One row -> an Example, or None with its problems in ``issues``.

    ``null_ok``: a null field counts as absent (a table's empty cell); in JSON, where a field can
    simply be left out, an explicit null is more likely a broken export and is refused.
    """
    where = f"{file}:{line}"
    if not isinstance(rec, dict):
        issues.append(Issue(where, f"a row must be an object, got {type(rec).__name__}"))
        return None
    meta = {k: rec[k] for k in META_FIELDS if k in rec and rec[k] is not None}
    if "messages" in rec:
        unknown = sorted(set(rec) - {"messages", *META_FIELDS})
        if unknown:
            issues.append(Issue(where, f"unknown field(s) {unknown} in a chat row"))
        msgs = _messages_from_chat(rec, where, issues)
        return Example(msgs, file, line, meta) if msgs and not unknown else None
    unknown = sorted(set(rec) - {*INSTRUCTION_FIELDS, *META_FIELDS, *image_rows.IMAGE_FIELDS})
    before = len(issues)
    images = None
    for key in image_rows.IMAGE_FIELDS:
        if key in rec and rec[key] is not None:
            images = (images or []) + (image_rows.image_list(rec[key], image_rows.base_dir(file), where, issues) or [])
    if unknown:
        issues.append(
            Issue(where, f"unknown field(s) {unknown}; rows use instruction/input/output or messages")
        )
    instruction = _check_str(rec, "instruction", where, issues, required=False, null_ok=null_ok)
    inp = _check_str(rec, "input", where, issues, required=False, null_ok=null_ok)
    output = _check_str(rec, "output", where, issues, required=True, null_ok=null_ok)
    if "output" in rec and isinstance(rec.get("output"), str) and not output.strip():
        issues.append(Issue(where, "field 'output' is empty"))
    if not instruction.strip() and not inp.strip() and "instruction" not in unknown:
        issues.append(Issue(where, "both 'instruction' and 'input' are empty or missing"))
    if len(issues) > before:
        return None
    messages: list[dict[str, Any]] = [{"role": "user", "content": join_prompt(instruction, inp)}]
    if images:
        messages[0]["images"] = images
    messages.append({"role": "assistant", "content": output})
    return Example(messages, file, line, meta, input_text=inp)


@dataclass
class LoadedData:
    examples: list[Example]
    files: list[str]  # every source as given (a path, or a dataset as NAME[SPLIT])
    sha256: str  # of the validated rows (fingerprint_examples): the data's identity, whatever its source
    duplicates: list[tuple[str, str]]  # (where, where of the first occurrence)
    #: what the manifest records per source: {"file": absolute path} or {"dataset", "split", "rows", "fingerprint"}
    sources: list[dict[str, Any]] = field(default_factory=list)

    def manifest_data(self) -> dict[str, Any]:
        """The manifest's ``data`` section: sources, the rows' sha256 and their count."""
        files = [s.get("file") or f"{s['dataset']}[{s['split']}]" for s in self.sources] or self.files
        return {"files": files, "sources": self.sources, "sha256": self.sha256, "rows": len(self.examples)}


def fingerprint_examples(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.messages, ensure_ascii=False, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_examples(paths: Iterable[str | Path], *, split: str | None = None) -> LoadedData:
    """Read and validate every row of every source (a file, a dataset folder or a dataset name).

    ``split``: the split of dataset folders and names given without ``:SPLIT`` (default train).

    Raises:
        DataError: with one issue per bad row (file:line: field: problem), nothing loaded.
    """
    issues: list[Issue] = []
    examples: list[Example] = []
    files: list[str] = []
    sources: list[dict[str, Any]] = []
    for p in paths:
        source = parse_source(p, split=split)
        files.append(source.label)
        rows, entry = read_source(source, issues)
        sources.append(entry)
        count = 0
        json_rows = source.kind == "file" and Path(source.text).suffix.lower() in JSON_SUFFIXES
        for line, rec in rows:
            count += 1
            ex = _to_example(rec, source.label, line, issues, null_ok=not json_rows)
            if ex is not None:
                examples.append(ex)
        if count == 0 and not any(i.where.startswith(source.label) for i in issues):
            issues.append(Issue(source.label, "the file holds no rows" if source.kind == "file" else "the split holds no rows"))
    if issues:
        raise DataError(issues, hint="fix the rows listed above; `cladapt data check FILE` re-checks without training")
    seen: dict[str, str] = {}
    dups: list[tuple[str, str]] = []
    for ex in examples:
        key = json.dumps(ex.messages, sort_keys=True)
        if key in seen:
            dups.append((ex.where, seen[key]))
        else:
            seen[key] = ex.where
    if dups:
        logger.warning("%d duplicate rows (first: %s repeats %s)", len(dups), dups[0][0], dups[0][1])
    return LoadedData(examples, files, fingerprint_examples(examples), dups, sources)


def label_counts(examples: list[Example]) -> Counter[str]:
    return Counter(ex.answer for ex in examples)


def conflicts(examples: list[Example]) -> list[tuple[str, str]]:
    """Rows whose prompt repeats an earlier row's with a *different* answer: (where, first where)."""
    first: dict[str, tuple[str, str]] = {}
    out: list[tuple[str, str]] = []
    for ex in examples:
        key = json.dumps(ex.prompt_messages, sort_keys=True)
        if key not in first:
            first[key] = (ex.answer, ex.where)
        elif first[key][0] != ex.answer:
            out.append((ex.where, first[key][1]))
    return out
