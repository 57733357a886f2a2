"""``registry verify`` checks every stored byte, or says exactly what it did not cover.

It used to skip ``shared/`` (GeRe records), ``policy.json``, the content of ``evals/*.json`` and the
audit log, yet print "every blob matches its sha256".
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cladapt.cli import cli
from cladapt.registry.store import Store


def populated(store: Store, commit, tmp_path: Path) -> None:
    commit("amazon")
    store.add_evaluation("amazon@1", "eval-amazon", {"acc": 0.5, "rows": 10})
    store.set_policy({"gate": {"max_drop": 2.0}})
    src = tmp_path / "stats.json"
    src.write_text(json.dumps({"mean": [0.1, 0.2]}))
    store.write_shared("gere", "fp-base", {"stats.json": src})
    assert store.verify() == []


def test_changed_shared_state_is_reported(store: Store, commit, tmp_path: Path) -> None:
    populated(store, commit, tmp_path)
    path = store.root / "shared/gere/fp-base/stats.json"
    path.write_text(path.read_text().replace("0.1", "0.3"))
    assert [p.where for p in store.verify()] == ["shared/gere/fp-base"]


def test_changed_policy_is_reported(store: Store, commit, tmp_path: Path) -> None:
    populated(store, commit, tmp_path)
    path = store.root / "policy.json"
    path.write_text(path.read_text().replace("2.0", "9.0"))  # valid JSON, different gate
    assert [p.where for p in store.verify()] == ["policy.json"]


def test_changed_evaluation_is_reported(store: Store, commit, tmp_path: Path) -> None:
    populated(store, commit, tmp_path)
    path = store.root / "tasks/amazon/v1/evals/eval-amazon.json"
    path.write_text(path.read_text().replace("0.5", "0.9"))
    problems = store.verify()
    assert [p.where for p in problems] == ["amazon@1"] and "checksum" in problems[0].message


def test_changed_audit_line_is_reported(store: Store, commit, tmp_path: Path) -> None:
    populated(store, commit, tmp_path)
    path = store.root / "audit.jsonl"
    path.write_text(path.read_text().replace('"reason": "trained"', '"reason": "trainee"'))
    assert [p.where for p in store.verify()] == ["audit.jsonl"]


def test_cli_says_what_was_checked_and_what_was_not(store: Store, commit, tmp_path: Path) -> None:
    populated(store, commit, tmp_path)
    runner = CliRunner()
    out = runner.invoke(cli, ["registry", "verify", str(store.root)])
    assert out.exit_code == 0, out.output
    assert "every blob" not in out.output and "not covered" not in out.output
    assert "1 version(s)" in out.output and "1 shared folder(s)" in out.output and "1 evaluation(s)" in out.output
    # an evaluation written by an older cladapt (plain JSON, no checksum) is named, not called verified
    (store.root / "tasks/amazon/v1/evals/old.json").write_text(json.dumps({"acc": 1.0}))
    out = runner.invoke(cli, ["registry", "verify", str(store.root)])
    assert out.exit_code == 0 and "not covered: 1 evaluation file(s) written without a checksum" in out.output
    (store.root / "policy.json").write_text("{broken")
    out = runner.invoke(cli, ["registry", "verify", str(store.root)])
    assert out.exit_code == 1 and "policy.json" in out.output


def test_a_stored_evaluation_copied_as_is_is_unsealed_not_nested(store: Store, commit) -> None:
    """What a pull does: the stored (sealed) file's JSON handed back to add_evaluation."""
    commit("amazon")
    store.add_evaluation("amazon@1", "e", {"acc": 0.5})
    raw = json.loads((store.root / "tasks/amazon/v1/evals/e.json").read_text())
    store.add_evaluation("amazon@1", "copy", raw)
    assert store.evaluations("amazon@1") == {"e": {"acc": 0.5}, "copy": {"acc": 0.5}}
    raw["payload"]["acc"] = 0.9  # a damaged copy is refused, not stored as new truth
    import pytest

    from cladapt.errors import IntegrityError

    with pytest.raises(IntegrityError):
        store.add_evaluation("amazon@1", "bad", raw)
