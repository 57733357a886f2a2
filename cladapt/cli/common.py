"""Shared CLI plumbing: the registry option, the console, rendering helpers."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console

if TYPE_CHECKING:
    from cladapt.registry.store import Store

F = TypeVar("F", bound=Callable[..., Any])

# piped output (files, CI logs) gets wide tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def follower_process() -> bool:
    """True in a launched process other than rank 0 (torchrun, accelerate launch, mpirun set its rank).

    Read from the launcher's environment, before any process group exists, so that every command
    (``train``, ``forget``, a ``list`` someone launched the same way) prints from process 0 only.
    """
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            return value != "0"
    return False


def mute_followers() -> None:
    """Standard output from process 0 only; the others keep standard error (warnings, their own failures)."""
    console.quiet = follower_process()


def default_registry() -> Path:
    """``$CLADAPT_REGISTRY``, else ``./.cladapt``."""
    return Path(os.environ.get("CLADAPT_REGISTRY", ".cladapt"))


def registry_option(func: F) -> F:
    """``--registry PATH`` (env ``CLADAPT_REGISTRY``, default ``./.cladapt``)."""
    return click.option(
        "--registry",
        "registry",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="registry folder [env CLADAPT_REGISTRY; default ./.cladapt]",
    )(func)


def open_store(path: Path | None, *, create: bool = False, create_named: bool = False) -> Store:
    """Open the registry at ``path`` (or the default).

    ``create`` initialises the default registry (``$CLADAPT_REGISTRY``, else ``./.cladapt``) on first
    use. A ``--registry PATH`` that holds no registry is an error naming it (and ``registry init``),
    never a fresh empty registry: a typo would otherwise train into a new registry and the real one
    would look unchanged. ``create_named`` also creates a named one (``pull`` into a new folder).

    Raises:
        NotFound: ``path`` holds no registry and may not be created here.
    """
    from cladapt.registry.store import Store

    root = path or default_registry()
    if path is not None and not create_named:
        create = False  # Store.open names the path and `cladapt registry init PATH`
    if create and not (root / "cladapt-registry.json").exists():
        logging.getLogger("cladapt").info("Creating registry %s", root)
        return Store.init(root, exist_ok=True)
    return Store.open(root)


def echo_json(obj: Any) -> None:
    if not console.quiet:  # muted in processes other than 0 (mute_followers)
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def flat_items(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``{"eval": {"scores": {"a": 81.25}}}`` -> ``[("eval.scores.a", "81.25")]``: nested metrics as table rows.

    Numbers get at most 4 significant digits, lists of scalars are joined, lists of records are counted:
    a table a user reads, with ``--json`` for every digit.
    """
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += flat_items(value, name + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows.append((name, f"{len(value)} record(s); --json shows them"))
        elif isinstance(value, list):
            shown = ", ".join(scalar(v) for v in value[:8]) or "-"
            rows.append((name, shown + (f", … ({len(value)} values)" if len(value) > 8 else "")))
        else:
            rows.append((name, scalar(value)))
    return rows


def actor() -> str:
    """Who is recorded in the audit log: ``$CLADAPT_ACTOR``, else the login name."""
    import getpass

    try:
        return os.environ.get("CLADAPT_ACTOR") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cladapt"


def fixed(value: Any, digits: int = 1) -> str:
    """A score as a table cell: floats with ``digits`` decimals, None as ``-``."""
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def scalar(value: Any) -> str:
    """One value as a table cell: floats with 4 significant digits, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


#: what --data takes, for every command's help
DATA_HELP = (".jsonl/.json/.csv/.tsv/.parquet, a dataset folder (save_to_disk or data files), or a dataset name for "
             "datasets.load_dataset (imdb, imdb:test)")


def data_split_option(func: F) -> F:
    """``--data-split``: the split of every dataset folder and name given to --data without ``:SPLIT``."""
    return click.option(
        "--data-split", default=None, metavar="SPLIT",
        help="split of dataset folders and names given without NAME:SPLIT [default: train]",
    )(func)


class _Budget(click.ParamType):
    """``--max-new-tokens``: a positive number of tokens or ``auto`` (:func:`cladapt.budget.parse_max_new_tokens`)."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        from cladapt.budget import parse_max_new_tokens

        try:
            return parse_max_new_tokens(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def budget_type() -> click.ParamType:
    """The ``N|auto`` parameter type of every ``--max-new-tokens``."""
    return _Budget()


def max_new_tokens_option(auto_means: str) -> Callable[[F], F]:
    """``--max-new-tokens N|auto`` with the one default of every command (DEFAULT_MAX_NEW_TOKENS)."""
    from cladapt.budget import DEFAULT_MAX_NEW_TOKENS

    return click.option("--max-new-tokens", type=_Budget(), default=DEFAULT_MAX_NEW_TOKENS, show_default=True,
                        help=f"generation budget in tokens, or auto: {auto_means}")


def config_options(func: F) -> F:
    """``--config`` (repeatable) and ``--set`` (repeatable)."""
    func = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set lora.r=16 (repeatable)",
    )(func)
    func = click.option(
        "--config",
        "configs",
        multiple=True,
        metavar="FILE|PRESET",
        help="YAML config file or preset name (configs/train/*.yaml), applied in order (repeatable)",
    )(func)
    return func
