"""The generation budget (``max_new_tokens``): one default, and ``auto``, the same in every command.

``generate``, ``eval`` and the evaluation during training (``eval.max_new_tokens``) share
:data:`DEFAULT_MAX_NEW_TOKENS` (methods.md §11.5: 50) and all take ``auto``:

- scoring (``eval``, training's evaluation): each task's longest label in tokens + 4 for
  classification tasks (decoding past that can only turn an exact match into a miss), 50 for
  free-text answers;
- ``generate``: the budget the adapter's own evaluation used (recorded with its scores), else 50.

Kept free of heavy imports: the CLI reads it to build its options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: the one default generation budget: `generate`, `eval` and the evaluation during training (methods.md §11.5)
DEFAULT_MAX_NEW_TOKENS = 50


def parse_max_new_tokens(value: object) -> int | str:
    """A generation budget as users write it: a positive number of tokens, or ``auto``.

    Raises:
        ValueError: anything else (the message names both accepted forms).
    """
    if value == "auto":
        return "auto"
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1:
        raise ValueError(f"must be a positive number of tokens or 'auto', got {value!r}")
    return number


def recorded_budget(store: Any, refs: Sequence[str]) -> int:
    """``auto`` for ``generate``: the largest budget the adapters' own evaluations used, else the default.

    An evaluation records the budget it decoded with (``max_new_tokens`` per task: the longest
    label + 4 under ``auto``), both the one run after training (``metrics.eval``) and the ones
    ``cladapt eval`` attached later; only scores of the adapter's own task count.
    """
    budgets: list[int] = []
    for ref in refs:
        rec = store.get(ref)
        own = ((rec.manifest.metrics.get("eval") or {}).get("scores") or {}).get(rec.task) or {}
        later = [p for p in store.evaluations(str(rec.ref)).values() if p.get("task") == rec.task]
        budgets += [p["max_new_tokens"] for p in (own, *later) if isinstance(p.get("max_new_tokens"), int)]
    return max(budgets, default=DEFAULT_MAX_NEW_TOKENS)
