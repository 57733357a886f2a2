"""The admission gate: a new version becomes ``active`` only if it keeps what the registry knows.

The policy lives in the registry (``policy.json``, key ``"gate"``; every change is audited):

* ``max_drop`` (points): no earlier task may lose more than this against its latest recorded
  score (the newest non-rejected row with comparable data and rule), i.e. the damage *this*
  version does. Tasks without a comparable earlier score are reported, not failed;
* ``max_ppl_rise`` (%): general perplexity may rise at most this much over the *base model's*
  (a cumulative budget, so many small steps cannot drift without bound); needs ``ppl_data``;
* ``min_score`` (%): the new version's score on its own task.

A version that fails is still committed, as ``rejected``, with the reasons in its manifest
(``metrics["gate"]``) and in the audit log, so the decision can be inspected and overridden
(``cladapt promote``, :mod:`cladapt.registry.lifecycle`). :func:`admit` turns an evaluation row into
the version's :class:`Admission`; ``cladapt.train.evaluation_hooks`` wires it into a run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cladapt.errors import ConfigError, Issue
from cladapt.evaluation.accuracy_matrix import latest_score, recorded_rows, score_key

if TYPE_CHECKING:
    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)

POLICY_KEY = "gate"


def parse_percent(value: Any) -> float | None:
    """``"5%"``, ``"5"``, ``5`` -> 5.0 (percent); None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.strip().removesuffix("%").strip()
    return float(value)


class GatePolicy(BaseModel):
    """Thresholds a new version must meet to be committed as ``active``."""

    model_config = ConfigDict(extra="forbid")

    max_drop: float | None = Field(None, ge=0, description="largest drop (points) allowed on any earlier task")
    max_ppl_rise: float | None = Field(None, ge=0, description="largest general-perplexity rise over the base model, in %")
    min_score: float | None = Field(None, ge=0, le=100, description="lowest score (%) allowed on the new task")
    ppl_data: list[str] | None = Field(None, description="general texts (JSON Lines, 'text') for max_ppl_rise")

    @field_validator("max_ppl_rise", mode="before")
    @classmethod
    def _percent(cls, value: Any) -> float | None:
        return parse_percent(value)

    @model_validator(mode="after")
    def _ppl_needs_data(self) -> GatePolicy:
        if self.max_ppl_rise is not None and not self.ppl_data:
            raise ValueError("max_ppl_rise needs ppl_data (general texts to measure perplexity on)")
        return self

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_drop, self.max_ppl_rise, self.min_score))


def load_policy(store: Store) -> GatePolicy | None:
    """The registry's gate policy, or None when none is set."""
    raw = (store.get_policy() or {}).get(POLICY_KEY)
    if not raw:
        return None
    try:
        policy = GatePolicy.model_validate(raw)
    except ValidationError as exc:
        issues = [Issue(f"policy.json: gate.{'.'.join(map(str, e['loc']))}", e["msg"]) for e in exc.errors()]
        raise ConfigError(issues, hint="set it again with `cladapt gate set`") from exc
    return policy if policy.active else None


def save_policy(store: Store, policy: GatePolicy | None, *, actor: str = "cladapt") -> None:
    """Replace the gate section of ``policy.json`` (None clears it); audited by the store."""
    whole = dict(store.get_policy() or {})
    if policy is None or not policy.active:
        whole.pop(POLICY_KEY, None)
    else:
        whole[POLICY_KEY] = policy.model_dump(mode="json", exclude_none=True)
    store.set_policy(whole, actor=actor, reason="gate policy")


# ------------------------------------------------------------------ decision


@dataclass
class Check:
    name: str  # "min_score:amazon", "max_drop:dbpedia", "max_ppl_rise"
    passed: bool | None  # None: could not be checked (reported, not failed)
    value: float | None
    threshold: float
    detail: str


@dataclass
class GateDecision:
    admitted: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if c.passed is False]

    def to_json(self) -> dict[str, Any]:
        return {"admitted": self.admitted, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def decide(
    policy: GatePolicy,
    *,
    task: str,
    new_score: float | None,
    earlier: dict[str, tuple[float | None, float | None, str | None]],
    ppl: float | None = None,
    ppl_base: float | None = None,
) -> GateDecision:
    """Apply ``policy`` to measured numbers.

    Args:
        earlier: per earlier task ``(reference score, new score, ref the reference came from)``.
    """
    checks: list[Check] = []
    if policy.min_score is not None:
        ok = new_score is not None and new_score >= policy.min_score
        shown = "not measured" if new_score is None else f"{new_score:.2f}"
        checks.append(Check(f"min_score:{task}", ok, new_score, policy.min_score,
                            f"{task}: score {shown} {'>=' if ok else '<'} min_score {policy.min_score:g}"))
    if policy.max_drop is not None:
        for t, (ref_score, now, src) in earlier.items():
            if ref_score is None or now is None:
                checks.append(Check(f"max_drop:{t}", None, None, policy.max_drop, f"{t}: no comparable earlier score"))
                continue
            drop = ref_score - now
            ok = drop <= policy.max_drop
            checks.append(Check(f"max_drop:{t}", ok, round(drop, 4), policy.max_drop,
                                f"{t}: {ref_score:.2f} ({src}) -> {now:.2f}, drop {drop:.2f} "
                                f"{'<=' if ok else '>'} max_drop {policy.max_drop:g}"))
    if policy.max_ppl_rise is not None:
        if ppl is None or not ppl_base:
            checks.append(Check("max_ppl_rise", False, None, policy.max_ppl_rise, "general perplexity not measured"))
        else:
            rise = 100.0 * (ppl - ppl_base) / ppl_base
            ok = rise <= policy.max_ppl_rise
            checks.append(Check("max_ppl_rise", ok, round(rise, 4), policy.max_ppl_rise,
                                f"general perplexity {ppl_base:.3f} -> {ppl:.3f} (+{rise:.2f}%) "
                                f"{'<=' if ok else '>'} max_ppl_rise {policy.max_ppl_rise:g}%"))
    return GateDecision(all(c.passed is not False for c in checks), checks)


# ------------------------------------------------------------------ admission


@dataclass(frozen=True)
class Admission:
    """What evaluation and the gate decide about a trained version: its commit status, the reason
    (audited with the commit) and the manifest metrics (score, ppl, the evaluation row, the gate)."""

    status: str = "active"
    reason: str = "trained"
    metrics: dict[str, Any] = field(default_factory=dict)


def admit(
    payload: dict[str, Any], policy: GatePolicy | None, store: Store, *, task: str, base_fingerprint: str
) -> Admission:
    """The manifest metrics of an evaluation row and, under ``policy``, the gate's decision on it.

    Each earlier task is compared with its latest comparable recorded score on the same base.
    """
    metrics: dict[str, Any] = {}
    own = payload["scores"].get(task)
    if own is not None:
        metrics["score"] = own["score"]
    if payload.get("ppl"):
        metrics["ppl"] = payload["ppl"]["value"]
    metrics["eval"] = payload
    if policy is None:
        return Admission(metrics=metrics)
    rows = recorded_rows(store, base_fingerprint=base_fingerprint)
    earlier: dict[str, tuple[float | None, float | None, str | None]] = {}
    for t, entry in payload["scores"].items():
        if t == task:
            continue
        found = latest_score(rows, t, score_key(entry, payload["rule"], payload["mode"]))
        earlier[t] = (found[0] if found else None, entry.get("score"), found[1] if found else None)
    ppl = payload.get("ppl") or {}
    decision = decide(policy, task=task, new_score=own["score"] if own else None, earlier=earlier,
                      ppl=ppl.get("value"), ppl_base=ppl.get("base"))
    metrics["gate"] = {**decision.to_json(), "policy": policy.model_dump(mode="json", exclude_none=True)}
    if decision.admitted:
        logger.info("gate: admitted (%d checks)", len(decision.checks))
        return Admission("active", "trained; gate passed", metrics)
    logger.warning("gate: REJECTED: %s", "; ".join(decision.reasons))
    return Admission("rejected", "gate: " + "; ".join(decision.reasons), metrics)
