"""cladapt.registry: the adapter store, the single source of truth between training and serving.

The public surface is small: :class:`Store` (open / list / get / stage / commit / ...),
:class:`AdapterRef` (``amazon@3``), :class:`VersionRecord` and :class:`Manifest`. Importing this
package does not import torch; tensors are only touched when a sidecar is written or read.
"""

from __future__ import annotations

from cladapt.registry.manifest import STATUSES, FileEntry, Manifest, Problem, VersionRecord
from cladapt.registry.refs import TASK_NAME_RE, AdapterRef, validate_task_name
from cladapt.registry.staging import Staging
from cladapt.registry.store import Store

__all__ = [
    "STATUSES",
    "TASK_NAME_RE",
    "AdapterRef",
    "FileEntry",
    "Manifest",
    "Problem",
    "Staging",
    "Store",
    "VersionRecord",
    "validate_task_name",
]
