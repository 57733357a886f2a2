"""Where task rows come from: a local file, a dataset folder, or a dataset name for ``datasets.load_dataset``.

A ``--data`` value is read as, in this order:

1. an existing file, by suffix: JSON Lines (``.jsonl``/``.ndjson``), JSON, CSV/TSV, Parquet;
2. an existing folder: one written by ``Dataset.save_to_disk`` (a ``DatasetDict`` gives its split),
   else a folder of data files that ``datasets.load_dataset(folder)`` reads (no loading script);
3. a value with a data-file suffix, or one written as a path (``./``, ``../``, ``/``, ``~``): a file
   that does not exist (an error naming it, never a download);
4. anything else: a dataset name for ``datasets.load_dataset`` (``imdb``, ``org/name``), from the
   Hub or, offline, from the local datasets cache. ``NAME:SPLIT`` picks the split (default ``train``;
   the CLI's ``--data-split`` sets it for every name given without one).

Rows of datasets are numbered from 1 and located as ``NAME[SPLIT]:ROW`` in error messages.
Datasets never run code: ``load_dataset`` is called without ``trust_remote_code``.

JSON and JSON Lines are parsed here rather than by ``datasets``' Arrow reader because only a
line-by-line parse can name the line of a malformed record; CSV, Parquet and datasets go through
``datasets``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cladapt.errors import Issue

#: files whose rows are JSON objects (a null there is explicit, not an empty table cell)
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
FILE_SUFFIXES = (*JSON_SUFFIXES, ".csv", ".tsv", ".parquet")
DEFAULT_SPLIT = "train"
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Source:
    """One ``--data`` value, resolved (module docstring)."""

    text: str
    kind: Literal["file", "saved", "folder", "dataset"]
    split: str = DEFAULT_SPLIT

    @property
    def label(self) -> str:
        """How rows of this source are located in messages: the path, or ``NAME[SPLIT]``."""
        return self.text if self.kind == "file" else f"{self.text}[{self.split}]"

    @property
    def is_dataset(self) -> bool:
        return self.kind != "file"


def parse_source(value: str | Path, *, split: str | None = None) -> Source:
    """Resolve a ``--data`` value; ``split`` applies to folders and names given without ``:SPLIT``."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_file():
        return Source(text, "file")
    if path.is_dir():
        return _folder(text, split or DEFAULT_SPLIT)
    name, sep, given = text.rpartition(":")
    if sep and name and given and "/" not in given and "\\" not in given:
        if Path(name).expanduser().is_dir():
            return _folder(name, given)
        if not _looks_like_file(name):
            return Source(name, "dataset", given)
    if _looks_like_file(text):
        return Source(text, "file")
    return Source(text, "dataset", split or DEFAULT_SPLIT)


def with_split(values: Iterable[str | Path], split: str | None) -> list[str]:
    """``values`` with ``:split`` added to every dataset folder and name given without one (``--data-split``)."""
    out: list[str] = []
    for value in values:
        source = parse_source(value)
        explicit = source.is_dataset and str(value) != source.text
        out.append(f"{value}:{split}" if split and source.is_dataset and not explicit else str(value))
    return out


def _folder(text: str, split: str) -> Source:
    saved = any((Path(text).expanduser() / m).is_file() for m in _SAVED_MARKERS)
    return Source(text, "saved" if saved else "folder", split)


def _looks_like_file(text: str) -> bool:
    return Path(text).suffix.lower() in FILE_SUFFIXES or text.startswith(("/", "./", "../", "~", ".\\", "..\\"))


def read_source(source: Source, issues: list[Issue]) -> tuple[Iterable[tuple[int, Any]], dict[str, Any]]:
    """(rows as (line or row number, raw record), what the manifest records about the source).

    Problems go to ``issues`` (with no rows): a missing file, an unreadable one, an unknown dataset.
    """
    if source.kind == "file":
        path = Path(source.text)
        if not path.exists():
            issues.append(Issue(source.text, "file not found"))
            return [], {"file": source.text}
        return _read_file(path, issues), {"file": str(path.resolve())}
    ds = _load_dataset(source, issues)
    if ds is None:
        return [], {"dataset": source.text, "split": source.split}
    entry = {"dataset": str(Path(source.text).resolve()) if source.kind != "dataset" else source.text,
             "split": source.split, "rows": len(ds), "fingerprint": getattr(ds, "_fingerprint", None)}
    return ((i + 1, row) for i, row in enumerate(ds)), entry


@contextmanager
def _quiet() -> Iterator[None]:
    """datasets' "Generating train split" bars off while a source is read (restored after)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _load_dataset(source: Source, issues: list[Issue]) -> Any:

    try:
        with _quiet():
            return _pick_split(_load(source), source, issues)
    except Exception as exc:  # datasets raises many types (not found, offline, bad files); named here
        what = "a saved Hugging Face dataset" if source.kind == "saved" else "a dataset datasets.load_dataset can read"
        hint = "" if source.kind != "dataset" else " (offline, only datasets already in the local cache load)"
        issues.append(Issue(source.label, f"not {what}: {type(exc).__name__}: {exc}{hint}"))
        return None


def _load(source: Source) -> Any:
    import datasets

    if source.kind == "saved":
        return datasets.load_from_disk(source.text)
    return datasets.load_dataset(source.text, split=source.split)


def _pick_split(ds: Any, source: Source, issues: list[Issue]) -> Any:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if source.split not in ds:
            issues.append(Issue(source.label, f"no split {source.split!r} (has {', '.join(ds)}); pick one with "
                                              "--data-split or NAME:SPLIT"))
            return None
        ds = ds[source.split]
    return ds


def _read_file(path: Path, issues: list[Issue]) -> Iterable[tuple[int, Any]]:
    """Yield (line number or row number, raw record)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path, issues)
    elif suffix == ".json":
        yield from _read_json(path, issues)
    elif suffix in (".csv", ".tsv", ".parquet"):
        yield from _read_table(path, suffix, issues)
    else:
        issues.append(Issue(str(path), f"unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv, .tsv, "
                                       ".parquet, a dataset folder or a dataset name"))


def _read_jsonl(path: Path, issues: list[Issue]) -> Iterable[tuple[int, Any]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = path.read_bytes()[: exc.start].count(b"\n") + 1
        issues.append(Issue(f"{path}:{bad_line}", f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
        return
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            issues.append(Issue(f"{path}:{n}", f"not valid JSON: {exc.msg} (column {exc.colno})"))


def _read_json(path: Path, issues: list[Issue]) -> Iterable[tuple[int, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        issues.append(Issue(str(path), f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
        return
    except json.JSONDecodeError as exc:
        issues.append(Issue(f"{path}:{exc.lineno}", f"not valid JSON: {exc.msg}"))
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        issues.append(Issue(str(path), "a .json file must hold an array of rows (or {\"data\": [...]})"))
        return
    yield from ((i + 1, row) for i, row in enumerate(data))


def _read_table(path: Path, suffix: str, issues: list[Issue]) -> Iterable[tuple[int, Any]]:
    import datasets

    kind = "parquet" if suffix == ".parquet" else "csv"
    kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        with _quiet():
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files; re-raised as a DataError
        issues.append(Issue(str(path), f"cannot read as {kind}: {exc}"))
        return
    offset = 2 if kind == "csv" else 1  # CSV: line 1 is the header
    for i, row in enumerate(ds):
        # CSV readers give None for empty cells; treat it as an empty string
        yield i + offset, {k: ("" if v is None and kind == "csv" else v) for k, v in row.items()}
