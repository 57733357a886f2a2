"""Registry lifecycle: moving a task's active version by hand (``cladapt promote`` / ``cladapt rollback``).

The admission gate (:mod:`cladapt.evaluation.gate`) decides a version's status at commit; these
operator actions change it afterwards. Both go through :meth:`Store.set_status`, so every change
is audited and the task never stays without an active version in between.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cladapt.errors import NotFound

if TYPE_CHECKING:
    from cladapt.registry.manifest import VersionRecord
    from cladapt.registry.store import Store


def promote(store: Store, ref: str, *, actor: str = "cladapt", reason: str = "") -> VersionRecord:
    """Make ``ref`` the active version of its task (an operator override of the gate); audited."""
    rec = store.get(ref)
    return store.set_status(str(rec.ref), "active", reason or f"promoted (was {rec.status})", actor=actor)


def rollback(store: Store, task: str, *, actor: str = "cladapt", reason: str = "") -> VersionRecord:
    """Re-activate the newest non-rejected version older than the active one; the active one is rejected.

    The previous version is activated first (so the task is never left without an active version),
    then the rolled-back one is marked ``rejected``: it no longer serves as the gate's reference,
    and a second rollback goes one version further back. Both changes are audited.

    Raises:
        NotFound: the task has no active version, or no earlier non-rejected one.
    """
    current = store.active(task)
    if current is None:
        raise NotFound(f"task {task!r} has no active version to roll back", hint=f"`cladapt promote {task}@N` activates one")
    earlier = [r for r in store.list(task) if r.version < current.version and r.status != "rejected"]
    if not earlier:
        raise NotFound(
            f"no earlier non-rejected version of {task!r} than {current.ref}",
            hint=f"`cladapt log` shows its history; `cladapt promote {task}@N` activates a specific version",
        )
    prev = max(earlier, key=lambda r: r.version)
    why = f": {reason}" if reason else ""
    store.set_status(str(prev.ref), "active", f"rollback from {current.ref}{why}", actor=actor)
    store.set_status(str(current.ref), "rejected", f"rolled back to {prev.ref}{why}", actor=actor)
    return store.get(str(prev.ref))
