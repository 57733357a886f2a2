"""The append-only audit log, ``<root>/audit.jsonl``: who changed what, when, and why.

One JSON object per line with the keys ``time, actor, action, ref, from, to, reason`` plus ``pid``,
``id`` (unique per event, so a recovered event is never written twice) and ``chain``. Appends
happen under the registry lock and are fsynced; the file is opened with ``O_NOFOLLOW``, so a link
planted at its name is refused rather than written through.

**Hash chain.** ``chain`` is ``sha256(previous line's chain + "\\n" + the event's canonical JSON
without chain)`` (previous chain: empty for the first line, or after a line without one). Any byte
changed in a line breaks its own chain, and a line removed or edited in the middle breaks the next
one, so ``registry verify`` covers every byte of the log. Lines written before the chain existed
have no ``chain`` and are reported as not covered.

A writer killed mid-append leaves a torn last line; the next append cuts it off (the store
re-appends events it still owes, see :mod:`cladapt.registry.store`), and readers skip (and log) a
malformed line rather than failing, because a damaged log line must never make the registry
unusable.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cladapt.registry.fsio import append_line, last_line, open_append, read_nofollow, sha256_bytes

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
CHAIN_KEY = "chain"


def utc_now() -> str:
    """ISO-8601 UTC timestamp with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(
    *,
    action: str,
    ref: str | None,
    actor: str = "cladapt",
    from_: Any = None,
    to: Any = None,
    reason: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """One event as plain JSON values (what will be written), with a fresh ``id``; not yet appended."""
    event: dict[str, Any] = {
        "time": utc_now(),
        "actor": actor,
        "action": action,
        "ref": ref,
        "from": from_,
        "to": to,
        "reason": reason,
        "pid": os.getpid(),
        "id": uuid.uuid4().hex,
        **extra,
    }
    # Round-trip through JSON so the chain is computed over exactly what a reader will parse.
    return json.loads(json.dumps(event, default=str))  # type: ignore[no-any-return]


def chain_hash(previous: str, event: dict[str, Any]) -> str:
    """The chain value of ``event`` following a line whose chain is ``previous``."""
    body = {k: v for k, v in event.items() if k != CHAIN_KEY}
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return sha256_bytes(f"{previous}\n{canonical}".encode())


def _chain_of(line: bytes | None) -> str:
    try:
        event = json.loads(line) if line else None
    except ValueError:
        return ""
    chain = event.get(CHAIN_KEY) if isinstance(event, dict) else None
    return chain if isinstance(chain, str) else ""


def append_prepared(path: Path, event: dict[str, Any]) -> dict[str, Any]:
    """Append an event made by :func:`make_event`, chained to the last line. Caller holds the lock."""
    fd = open_append(path)
    try:
        line, _ = last_line(fd)
        event = {**event, CHAIN_KEY: chain_hash(_chain_of(line), event)}
        append_line(path, json.dumps(event, sort_keys=False, ensure_ascii=False), fd=fd)
    finally:
        os.close(fd)
    logger.debug("audit: %s %s %s -> %s (%s)", event["action"], event["ref"], event["from"], event["to"], event["reason"])
    return event


def append_event(path: Path, *, action: str, ref: str | None, **fields: Any) -> dict[str, Any]:
    """Append one event and return it. The caller must hold the registry lock."""
    return append_prepared(path, make_event(action=action, ref=ref, **fields))


def _lines(path: Path) -> list[str]:
    try:
        return read_nofollow(path).decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


def read_events(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """All events, oldest first, plus the 1-based numbers of lines that are not valid JSON objects."""
    events: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict):
            events.append(event)
        else:
            bad.append(number)
    if bad:
        logger.warning("%s: skipped %d malformed line(s): %s", path, len(bad), bad[:10])
    return events, bad


def check_chain(path: Path) -> tuple[list[str], int]:
    """Problems of the log (malformed lines, broken chain links) and the number of lines written
    before the hash chain existed (not covered by it)."""
    problems: list[str] = []
    legacy = 0
    previous = ""
    chained = False
    for number, line in enumerate(_lines(path), start=1):
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            problems.append(f"line {number} is not a JSON object (damaged)")
            previous = ""
            continue
        chain = event.get(CHAIN_KEY)
        if chain is None:
            if chained:  # lines without a chain can only come before the first chained one
                problems.append(f"line {number} has no hash chain after chained lines (damaged or inserted)")
            else:
                legacy += 1
            previous = ""
            continue
        chained = True
        if chain != chain_hash(previous, event):
            problems.append(f"line {number} does not match its hash chain (the line, or the one before it, was altered)")
        previous = chain if isinstance(chain, str) else ""
    return problems, legacy


def logged_ids(path: Path) -> set[str]:
    """The ``id`` of every event in the log (to tell which owed events were already written)."""
    return {str(e["id"]) for e in read_events(path)[0] if "id" in e}
