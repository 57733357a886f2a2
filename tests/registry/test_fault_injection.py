"""The registry's standing fault-injection test: kills, bit flips and planted links.

* **Kills** (20 points): a worker process SIGKILLs itself at every crash point of commit, promote,
  rollback and remove (``CLADAPT_TEST_CRASH_AT``). Afterwards ``verify`` is clean, the listing is
  exactly the state before or after the change (a commit killed right after its rename: a
  ``candidate``), a change that landed has its audit event exactly once, no journal is left, the
  lock is free, and nothing outside the registry was touched.
* **Bit flips** (11 stored file kinds x 3 seeds): one random bit of one file. Afterwards every read
  either returns the truth or raises a cladapt error (never a traceback, never a wrong answer), and
  ``verify`` names the file, except for flips the registry repairs by itself (the index).
* **Links** (11 places): a symbolic link planted where the registry reads or writes. Afterwards
  nothing outside the registry changed, reads return the truth or a cladapt error, and every link
  still there is named by ``verify``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cladapt.errors import CladaptError
from cladapt.registry.fsio import find_symlinks
from cladapt.registry.status import load_task_status
from cladapt.registry.store import Store

from .conftest import WORKER, manifest_fields

pytestmark = pytest.mark.multiprocess


# ------------------------------------------------------------------------------------------ fixtures


def _commit(store: Store, task: str, status: str = "active", parents: tuple[str, ...] = ()) -> None:
    staging = store.stage(task)
    (staging.adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "task": task}))
    (staging.adapter_dir / "adapter_model.safetensors").write_bytes(os.urandom(256))
    staging.write_json("router.json", {"task": task, "keys": [1, 2, 3]})
    staging.manifest_fields = manifest_fields(parents=list(parents))
    store.commit(staging, status=status)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """amazon@1 archived, @2 active, @3 candidate; yelp@1 active (parent amazon@2); an evaluation,
    a policy and one shared-state folder."""
    root = tmp_path_factory.mktemp("template") / "reg"
    store = Store.init(root)
    _commit(store, "amazon")
    _commit(store, "amazon")
    _commit(store, "amazon", status="candidate")
    _commit(store, "yelp", parents=("amazon@2",))
    store.add_evaluation("amazon@2", "eval-amazon", {"acc": 0.75})
    store.set_policy({"gate": {"max_drop": 2.0}})
    src = root.parent / "stats.json"
    src.write_text(json.dumps({"mean": [0.25, 0.5]}))
    store.write_shared("gere", "fp-base", {"stats.json": src})
    assert store.verify() == []
    return root


@pytest.fixture
def reg(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "reg"
    shutil.copytree(template, root, symlinks=True)
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim.txt").write_text("precious\n")
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def truth(root: Path) -> dict[str, Any]:
    """What reads must return (taken from the untouched template)."""
    store = Store.open(root)
    return {
        "list": {str(r.ref): (r.status, r.manifest) for r in store.list()},
        "get": {t: str(store.get(t).ref) for t in ("amazon", "yelp")},
        "evals": store.evaluations("amazon@2"),
        "policy": store.get_policy(),
        "shared": digest(store.read_shared("gere", "fp-base")),  # type: ignore[arg-type]
    }


def reads(root: Path) -> dict[str, Any]:
    """Every read, each either its value or the cladapt error it raised (anything else fails)."""
    out: dict[str, Any] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            out[name] = fn()
        except CladaptError as exc:
            out[name] = exc

    try:
        store = Store.open(root)
    except CladaptError as exc:
        return {"open": exc}
    attempt("list", lambda: {str(r.ref): (r.status, r.manifest) for r in store.list()})
    attempt("get", lambda: {t: str(store.get(t).ref) for t in ("amazon", "yelp")})
    attempt("adapter", lambda: store.adapter_dir("amazon"))
    attempt("evals", lambda: store.evaluations("amazon@2"))
    attempt("policy", store.get_policy)
    attempt("shared", lambda: digest(store.read_shared("gere", "fp-base")))  # type: ignore[arg-type]
    return out


def assert_never_wrong(found: dict[str, Any], expected: dict[str, Any]) -> None:
    for name, value in found.items():
        if not isinstance(value, CladaptError) and name in expected:
            assert value == expected[name], f"{name} silently differs"


# ------------------------------------------------------------------------------------------ kills

# (operation, worker arguments, statuses after the change landed)
OPS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "commit": (("{root}", "amazon", "1"),
               {"amazon@1": "archived", "amazon@2": "archived", "amazon@3": "candidate", "amazon@4": "active"}),
    "promote": (("--promote", "{root}", "amazon@3"), {"amazon@1": "archived", "amazon@2": "archived", "amazon@3": "active"}),
    "rollback": (("--rollback", "{root}", "amazon"), {"amazon@1": "active", "amazon@2": "archived", "amazon@3": "candidate"}),
    "rm": (("--rm", "{root}", "amazon@1"), {"amazon@2": "active", "amazon@3": "candidate"}),
}
TAIL = ["after_status", "in_index", "after_index", "after_audit"]
KILLS = (
    [("commit", p) for p in ["after_manifest", "before_rename", "after_rename", *TAIL]]
    + [("promote", f"status:{p}") for p in TAIL]
    + [("rollback", f"status:{p}") for p in TAIL]
    + [("rm", f"remove:{p}") for p in ["after_rename", *TAIL]]
)


def test_kill_point_count() -> None:
    assert len(KILLS) == 20


@pytest.mark.parametrize(("op", "point"), KILLS, ids=[f"{o}-{p}" for o, p in KILLS])
def test_kill(reg: Path, outside: Path, tmp_path: Path, op: str, point: str) -> None:
    before = {k: v[0] for k, v in truth(reg)["list"].items()}
    logged_before = len(Store.open(reg).audit_log())
    args, landed = OPS[op]
    after = {**{k: v for k, v in before.items() if not k.startswith("amazon")}, **landed}
    if op == "commit" and point == "after_rename":
        after["amazon@4"], after["amazon@2"] = "candidate", "active"  # never silently active
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    outside_before = digest(outside)
    env = {**os.environ, "CLADAPT_TEST_CRASH_AT": point}
    proc = subprocess.run([sys.executable, str(WORKER), *(a.format(root=reg) for a in args)],
                          env=env, cwd=cwd, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    store = Store.open(reg)
    assert store.verify() == []
    listed = {str(r.ref): r.status for r in store.list()}
    assert listed in (before, after)
    for task in ("amazon", "yelp"):
        status = load_task_status(reg / "tasks" / task / "status.json")
        for rec in store.list(task):  # the listing is what the source of truth says
            assert rec.status == status.versions[rec.version]
            assert rec.manifest.model_dump() == Store.open(reg).get(str(rec.ref)).manifest.model_dump()
    if listed == after and point.endswith("after_rename"):  # before status.json: recovered, and audited so
        assert any(e["action"] == "recover" and e["ref"] in ("amazon@4", "amazon@1") for e in store.audit_log())
    elif listed == after:
        action, ref, to = {"commit": ("commit", "amazon@4", "active"), "promote": ("status", "amazon@3", "active"),
                           "rollback": ("status", "amazon@1", "active"), "rm": ("remove", "amazon@1", None)}[op]
        new_events = store.audit_log()[logged_before:]
        assert [(e["action"], e["ref"], e["to"]) for e in new_events].count((action, ref, to)) == 1, new_events
    assert not (reg / "index.sqlite-journal").exists()
    assert digest(outside) == outside_before and list(cwd.iterdir()) == []
    _commit(store, "amazon")  # the lock died with the process
    assert store.verify() == []


# ------------------------------------------------------------------------------------------ bit flips

FLIP_KINDS: dict[str, str] = {
    "adapter": "tasks/amazon/v2/adapter/adapter_model.safetensors",
    "sidecar": "tasks/amazon/v2/sidecars/router.json",
    "manifest": "tasks/amazon/v2/manifest.json",
    "status": "tasks/amazon/status.json",
    "evaluation": "tasks/amazon/v2/evals/eval-amazon.json",
    "policy": "policy.json",
    "shared file": "shared/gere/fp-base/stats.json",
    "shared manifest": "shared/gere/fp-base/manifest.json",
    "audit log": "audit.jsonl",
    "index": "index.sqlite",
    "marker": "cladapt-registry.json",
}
FLIPS = [(kind, seed) for kind in FLIP_KINDS for seed in range(3)]


def test_flip_count() -> None:
    assert len(FLIPS) == 33


@pytest.mark.parametrize(("kind", "seed"), FLIPS, ids=[f"{k}-{s}" for k, s in FLIPS])
def test_bit_flip(reg: Path, kind: str, seed: int) -> None:
    expected = truth(reg)
    path = reg / FLIP_KINDS[kind]
    data = bytearray(path.read_bytes())
    rng = random.Random(f"{kind}-{seed}")
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    found = reads(reg)
    assert_never_wrong(found, expected)
    if "open" in found:
        assert kind == "marker" and "cladapt-registry.json" in str(found["open"])
        return
    store = Store.open(reg)
    problems = store.verify()
    if kind == "status":  # rebuilt from the index by the first read, and audited as a repair
        recovered = [e for e in store.audit_log() if e["action"] == "recover" and e["ref"] == "amazon"]
        assert recovered or any(p.where == "amazon/status.json" for p in problems), problems
    elif kind != "index":  # the index is disposable: a damaged one is rebuilt, not reported
        where = {"evaluation": "amazon@2", "adapter": "amazon@2", "sidecar": "amazon@2", "manifest": "amazon@2",
                 "policy": "policy.json", "shared file": "shared/gere/fp-base", "shared manifest": "shared/gere/fp-base",
                 "audit log": "audit.jsonl", "marker": "?"}[kind]
        assert any(p.where == where for p in problems), problems
    assert_never_wrong(reads(reg), expected)


# ------------------------------------------------------------------------------------------ links


def _copy_and_link(root: Path, rel: str, outside: Path) -> None:
    src = root / rel
    dst = outside / rel.replace("/", "_")
    if src.is_dir():
        shutil.copytree(src, dst)
        shutil.rmtree(src)
    elif src.exists():
        shutil.copy(src, dst)
        src.unlink()
    else:
        dst.write_text("precious\n")
    src.symlink_to(dst)


LINKS = [".work/lock", "audit.jsonl", "tasks/yelp", "tasks/amazon/v2/adapter", "tasks/amazon/v2/evals",
         "tasks/amazon/status.json", "policy.json", "shared/gere", ".work/staging", "index.sqlite",
         "index.sqlite-journal"]


def test_link_count() -> None:
    assert len(LINKS) == 11


@pytest.mark.parametrize("rel", LINKS)
def test_planted_link(reg: Path, outside: Path, rel: str) -> None:
    expected = truth(reg)
    _copy_and_link(reg, rel, outside)
    outside_before = digest(outside)
    store = Store.open(reg)
    if rel == "tasks/yelp":  # a linked task is never adopted, and the listing says so
        assert [p.where for p in store.unlisted()] == ["tasks/yelp"]
        expected["list"] = {k: v for k, v in expected["list"].items() if not k.startswith("yelp")}
        expected.pop("get")
    assert_never_wrong(reads(reg), expected)
    for change in (lambda: _commit(store, "amazon"), lambda: store.add_evaluation("amazon@2", "e2", {"acc": 1.0}),
                   lambda: store.set_policy({"gate": {"max_drop": 1.0}}), lambda: store.set_status("amazon@3", "rejected", "x"),
                   lambda: store.write_shared("gere", "fp-base", {"stats.json": outside / "victim.txt"})):
        try:
            change()
        except CladaptError:
            pass
    assert digest(outside) == outside_before  # nothing written through the link
    try:
        problems = store.verify()
    except CladaptError as exc:  # the lock itself is the link: refused, naming it
        assert "symbolic link" in str(exc) and rel == ".work/lock"
        return
    remaining = find_symlinks(reg)
    assert all(any(p.where == link and "symbolic link" in p.message for p in problems) for link in remaining), problems
