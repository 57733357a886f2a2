"""Continual-learning metrics (methods.md §11): pure functions over the accuracy matrix.

Conventions:

* ``R[t][i]`` is the score (in %) on task ``i``'s test set after training task ``t``; tasks are
  0-based here (methods.md writes 1..T). Row ``t`` may hold ``None`` for tasks not evaluated.
* ``b[i]`` is the score of the model before any continual training (the base model).
* Every aggregate skips ``None`` entries and returns ``None`` when no term is left (a
  registry whose early versions were trained without evaluation still gets the metrics its
  data supports). On a full matrix the formulas are exactly those of methods.md §11.2.

Continual-evaluation metrics (§11.3, De Lange et al. 2023) work on curves ``a_i(n)``: the
accuracy of task ``i`` at successive evaluation points while later tasks train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Matrix = Sequence[Sequence[float | None]]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _at(R: Matrix, t: int, i: int) -> float | None:
    row = R[t]
    return row[i] if i < len(row) else None


def average_accuracy(R: Matrix) -> float | None:
    """AA = (1/T) sum_i R[T][i]: mean score on every task after the last one (O-LoRA's metric)."""
    if not R:
        return None
    T = len(R)
    return _mean([_at(R, T - 1, i) for i in range(T)])


def learning_accuracy(R: Matrix) -> float | None:
    """LA = (1/T) sum_i R[i][i]: mean score on each task right after learning it."""
    return _mean([_at(R, i, i) for i in range(len(R))])


def backward_transfer(R: Matrix) -> float | None:
    """BWT (GEM) = (1/(T-1)) sum_{i<T} (R[T][i] - R[i][i]); negative means forgetting."""
    T = len(R)
    terms = []
    for i in range(T - 1):
        last, own = _at(R, T - 1, i), _at(R, i, i)
        terms.append(None if last is None or own is None else last - own)
    return _mean(terms)


def forward_transfer(R: Matrix, b: Sequence[float | None]) -> float | None:
    """FWT (GEM) = (1/(T-1)) sum_{i>=2} (R[i-1][i] - b[i]): what earlier tasks give a new one for free."""
    terms = []
    for i in range(1, len(R)):
        before = _at(R, i - 1, i)
        base = b[i] if i < len(b) else None
        terms.append(None if before is None or base is None else before - base)
    return _mean(terms)


def forgetting_measure(R: Matrix) -> float | None:
    """FM (Chaudhry et al.) = (1/(T-1)) sum_{j<T} max_{l in j..T-1} (R[l][j] - R[T][j])."""
    T = len(R)
    terms = []
    for j in range(T - 1):
        last = _at(R, T - 1, j)
        earlier = [v for v in (_at(R, l_, j) for l_ in range(j, T - 1)) if v is not None]
        terms.append(None if last is None or not earlier else max(v - last for v in earlier))
    return _mean(terms)


def mean_average_accuracy(R: Matrix) -> float | None:
    """MAA (SEFE; MOS's average incremental accuracy) = (1/T) sum_t mean_{i<=t} R[t][i]."""
    return _mean([_mean([_at(R, t, i) for i in range(t + 1)]) for t in range(len(R))])


def summary(R: Matrix, b: Sequence[float | None] | None = None) -> dict[str, float | None]:
    """Every end-of-task aggregate of §11.2, rounded to 4 decimals (``None`` where undefined)."""
    values = {
        "AA": average_accuracy(R),
        "LA": learning_accuracy(R),
        "BWT": backward_transfer(R),
        "FWT": forward_transfer(R, b) if b is not None else None,
        "FM": forgetting_measure(R),
        "MAA": mean_average_accuracy(R),
    }
    return {k: (round(v, 4) if v is not None else None) for k, v in values.items()}


# ------------------------------------------------------------------ continual evaluation (§11.3)


def min_acc(curves_since_finished: Sequence[Sequence[float]]) -> float | None:
    """min-ACC_k: mean over earlier tasks of the lowest accuracy seen since each was finished.

    Args:
        curves_since_finished: per earlier task ``i < k``, its accuracies ``a_i(n)`` from the point
            task ``i`` finished training up to now.
    """
    mins = [min(c) for c in curves_since_finished if len(c)]
    return sum(mins) / len(mins) if mins else None


def wc_acc(current: float, min_acc_k: float | None, k: int) -> float:
    """WC-ACC(n) = (1/k) a_k(n) + (1 - 1/k) min-ACC_k, with ``k`` the 1-based index of the task training."""
    if k <= 1 or min_acc_k is None:
        return float(current)
    return current / k + (1 - 1 / k) * min_acc_k


def stability_gap(before: float, during: Sequence[float]) -> float | None:
    """R[k-1][i] - min_{n in task k} a_i(n): the transient drop a task-switch causes (positive = dip)."""
    return float(before) - min(during) if len(during) else None


def _windowed(curve: Sequence[float], w: int, sign: int) -> float:
    best = 0.0
    for start in range(max(1, len(curve) - w + 1)):
        window = curve[start : start + w]
        for m in range(len(window)):
            for m2 in range(m + 1, len(window)):
                best = max(best, sign * (window[m] - window[m2]))
    return best


def windowed_forgetting(curve: Sequence[float], w: int = 10) -> float:
    """WF^w of one task: the largest drop ``a(m) - a(m')`` (m < m') inside any ``w`` consecutive evaluations."""
    return _windowed(curve, w, +1)


def windowed_plasticity(curve: Sequence[float], w: int = 10) -> float:
    """WP^w of one task: the largest rise inside any ``w`` consecutive evaluations."""
    return _windowed(curve, w, -1)


def continual_summary(
    points: Sequence[Mapping[str, Any]], order: Sequence[str], w: int = 10
) -> dict[str, Any]:
    """Aggregate continual-evaluation points into §11.3's metrics.

    Args:
        points: in time order, each ``{"task": <task being trained>, "scores": {task: accuracy}}``;
            a point with ``"end": True`` is the end-of-task evaluation of ``task`` (``R[k][.]``).
        order: the tasks in training order.

    Returns:
        ``{"min_acc": {task: ...}, "wc_acc": [...], "stability_gap": {"<i> during <k>": ...},
        "WF": mean WF^w, "WP": mean WP^w}``.
    """
    finished_at: dict[str, int] = {}
    end_scores: dict[str, dict[str, float]] = {}
    for n, p in enumerate(points):
        if p.get("end"):
            finished_at.setdefault(p["task"], n)
            end_scores[p["task"]] = dict(p["scores"])
    out: dict[str, Any] = {"min_acc": {}, "wc_acc": [], "stability_gap": {}}
    for k, task in enumerate(order):
        during = [p for p in points if p["task"] == task and not p.get("end")]
        if not during:
            continue
        earlier = order[:k]
        # min over evaluations from the point each earlier task finished up to the end of task k
        last_n = max(n for n, p in enumerate(points) if p["task"] == task)
        curves = [
            [points[n]["scores"][i] for n in range(finished_at[i], last_n + 1) if i in points[n]["scores"]]
            for i in earlier
            if i in finished_at
        ]
        out["min_acc"][task] = min_acc(curves)
        for p in during:
            if task in p["scores"]:
                out["wc_acc"].append(round(wc_acc(p["scores"][task], out["min_acc"][task], k + 1), 4))
        if k and order[k - 1] in end_scores:
            before = end_scores[order[k - 1]]
            for i in earlier:
                dips = [p["scores"][i] for p in during if i in p["scores"]]
                if i in before and dips:
                    out["stability_gap"][f"{i} during {task}"] = stability_gap(before[i], dips)
    curves_all = {t: [p["scores"][t] for p in points if t in p["scores"]] for t in order}
    wf = [windowed_forgetting(c, w) for c in curves_all.values() if len(c) > 1]
    wp = [windowed_plasticity(c, w) for c in curves_all.values() if len(c) > 1]
    out["WF"] = sum(wf) / len(wf) if wf else None
    out["WP"] = sum(wp) / len(wp) if wp else None
    return out


# ------------------------------------------------------------------ forgetting tasks (§11.4)


def gslora_h(acc_f_before: float, acc_f_after: float, acc_r: float) -> float:
    """GS-LoRA's H = 2 * drop_f * Acc_r / (drop_f + Acc_r), with drop_f = Acc_f(before) - Acc_f(after)."""
    drop = acc_f_before - acc_f_after
    return 0.0 if drop + acc_r == 0 else 2 * drop * acc_r / (drop + acc_r)
