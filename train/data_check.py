"""``cladapt data check``'s report: rows per file, labels, duplicates, conflicts and token lengths.

In ``train`` because the token lengths are measured the way training encodes a row (chat template
applied, answer tokens counted), through :mod:`cladapt.train.chat`.
"""

from __future__ import annotations

from typing import Any

from cladapt.data.rows import LoadedData, conflicts, label_counts
from cladapt.train.chat import IGNORE_INDEX, encode


def _spread(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": pick(0.5), "p95": pick(0.95), "max": s[-1]}


def describe(
    loaded: LoadedData, *, tokenizer: Any = None, max_length: int | None = None, top_labels: int = 20
) -> dict[str, Any]:
    """Statistics of validated data for ``cladapt data check``: rows per file, label counts,
    duplicates and conflicting answers, and with a tokenizer the token lengths (chat template
    applied, as training sees them) and the rows longer than ``max_length``.
    """
    exs = loaded.examples
    labels = label_counts(exs)
    report: dict[str, Any] = {
        "files": {f: sum(ex.file == f for ex in exs) for f in loaded.files},
        "rows": len(exs),
        "sha256": loaded.sha256,
        "labels": {"distinct": len(labels), "top": dict(labels.most_common(top_labels))},
        "duplicates": [{"where": w, "first": f} for w, f in loaded.duplicates],
        "conflicts": [{"where": w, "first": f} for w, f in conflicts(exs)],
    }
    if tokenizer is not None:
        totals: list[int] = []
        answers: list[int] = []
        over: list[dict[str, Any]] = []
        for ex in exs:
            enc = encode(tokenizer, ex, max_length=1 << 30, overlong="truncate")
            totals.append(len(enc.input_ids))
            answers.append(sum(lab != IGNORE_INDEX for lab in enc.labels))
            if max_length is not None and totals[-1] > max_length:
                over.append({"where": ex.where, "tokens": totals[-1], "answer_tokens": answers[-1]})
        report["tokens"] = {"total": _spread(totals), "answer": _spread(answers), "max_length": max_length}
        report["overlong"] = over
    return report
