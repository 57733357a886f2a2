"""The huggingface_hub client as push and pull use it: one ``HfApi``, errors turned into cladapt's.

Tokens come from where huggingface_hub looks (``HF_TOKEN``, then the login cache written by
``hf auth login``) unless one is passed. The endpoint is ``HF_ENDPOINT``, read at call time as well
as at import, so a mirror or a private Hub set after start-up is still honoured.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cladapt.errors import CladaptError, Conflict, IntegrityError, NotFound, RegistryError, UsageError

if TYPE_CHECKING:
    from huggingface_hub import HfApi


def make_api(token: str | None = None, endpoint: str | None = None) -> HfApi:
    """An ``HfApi`` for ``endpoint`` (default ``$HF_ENDPOINT``, else huggingface.co)."""
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise UsageError(
            "HF_HUB_OFFLINE is set, so the Hub cannot be reached",
            hint="unset HF_HUB_OFFLINE (or set it to 0) to push or pull",
        )
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    return HfApi(endpoint=endpoint.rstrip("/") if endpoint else None, token=token)


@contextmanager
def hub_errors(api: HfApi, repo_id: str, action: str) -> Iterator[None]:
    """Translate huggingface_hub / HTTP errors raised while doing ``action`` on ``repo_id``."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id} on {api.endpoint}"
    try:
        yield
    except CladaptError:
        raise
    except RevisionNotFoundError as exc:
        raise NotFound(f"{action}: {where} has no such revision ({_first_line(exc)})",
                       hint="give a branch, a tag or a full commit sha that exists") from exc
    except RemoteEntryNotFoundError as exc:
        raise IntegrityError(f"{action}: a file listed by {where} is missing ({_first_line(exc)})",
                             hint="the repo is incomplete or was edited; nothing was imported") from exc
    except RepositoryNotFoundError as exc:
        raise NotFound(f"{action}: repo {where} was not found (or it is private and no valid token was sent)",
                       hint="check the name; set HF_TOKEN or run `hf auth login` for a private repo") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 412:
            raise Conflict(f"{action}: {where} changed while pushing (someone else committed); nothing was written",
                           hint="run the push again: it compares with the new head and uploads only what differs") from exc
        if status in (401, 403):
            raise RegistryError(f"{action}: {where} refused the credentials (HTTP {status})",
                                hint="set HF_TOKEN to a token with write access, or run `hf auth login`") from exc
        if status == 409:
            raise Conflict(f"{action}: {where}: {_first_line(exc)}", hint="use another tag or branch name") from exc
        raise RegistryError(f"{action}: {where} answered HTTP {status}: {_first_line(exc)}") from exc
    except _transport_errors() as exc:
        raise RegistryError(f"{action}: cannot reach {api.endpoint} ({exc})",
                            hint="check the network, or HF_ENDPOINT if you use a mirror") from exc


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP library huggingface_hub uses (httpx2 in 2.x, httpx or requests before)."""
    errors: list[type[BaseException]] = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors) or (OSError,)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def remote_tree(api: HfApi, repo_id: str, revision: str) -> dict[str, tuple[str, str | None, int]]:
    """path -> (git blob id, LFS sha256 or None, size) of every file at ``revision``."""
    from huggingface_hub.hf_api import RepoFile

    tree: dict[str, tuple[str, str | None, int]] = {}
    for item in api.list_repo_tree(repo_id, revision=revision, recursive=True):
        if isinstance(item, RepoFile):
            tree[item.path] = (item.blob_id, item.lfs.sha256 if item.lfs else None, item.size)
    return tree


def download(api: HfApi, repo_id: str, revision: str, paths: list[str], into: Path) -> Path:
    """Fetch exactly ``paths`` of commit ``revision`` into ``into`` (inside the registry's ``.work``)."""
    from huggingface_hub import snapshot_download

    into.mkdir(parents=True, exist_ok=True)
    if not paths:
        return into
    snapshot_download(
        repo_id, revision=revision, allow_patterns=paths, local_dir=into, endpoint=api.endpoint,
        token=api.token, max_workers=4,
    )
    return into
