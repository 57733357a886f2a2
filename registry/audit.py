"""The append-only audit log, ``<root>/audit.jsonl``: who changed what, when, and why.

One JSON object per line with the keys ``time, actor, action, ref, from, to, reason`` (plus
``pid``). Appends happen under the registry lock and are fsynced. A writer killed mid-append can
leave a torn last line; the next append starts a fresh line and readers skip (and log) the torn one
rather than failing, because a damaged log line must never make the registry unusable.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cladapt.registry.fsio import append_line

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"


def utc_now() -> str:
    """ISO-8601 UTC timestamp with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def append_event(
    path: Path,
    *,
    action: str,
    ref: str | None,
    actor: str = "cladapt",
    from_: Any = None,
    to: Any = None,
    reason: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """Append one event and return it. The caller must hold the registry lock."""
    event: dict[str, Any] = {
        "time": utc_now(),
        "actor": actor,
        "action": action,
        "ref": ref,
        "from": from_,
        "to": to,
        "reason": reason,
        "pid": os.getpid(),
        **extra,
    }
    append_line(path, json.dumps(event, sort_keys=False, ensure_ascii=False, default=str))
    logger.debug("audit: %s %s %s -> %s (%s)", action, ref, from_, to, reason)
    return event


def read_events(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """All events, oldest first, plus the 1-based numbers of lines that are not valid JSON objects."""
    events: list[dict[str, Any]] = []
    bad: list[int] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return events, bad
    for number, line in enumerate(text.splitlines(), start=1):
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
