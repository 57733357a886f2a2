"""Forgetting requests (forget set + retain set) -> one committed version.

Forgetting methods (``CLMethod.forgetting``, e.g. ``gslora``, methods.md §8) train on the *retain*
set as the task data -- the trainer's task CE is ``CE(R)`` -- and draw their own paired batch from
the forget set in ``extra_losses``. ``train_from_config(..., forget_data=...)`` and
:func:`forget_task` reuse :func:`cladapt.train.run.train_task` whole: a run extension encodes
the forget set with the run's tokenizer and hands the plugins, through ``TaskSpec.extra``:

* ``forget_loader``: a seeded, shuffled DataLoader over the encoded forget rows (same collation
  as the task batches, with ``row_index``);
* ``forget_classes`` / ``retain_classes``: a class name per row (its ``label`` field, else its
  answer text), for prototype losses.

The forget set's files, sha256 and row count are stored in the ``forget_data.json`` sidecar (the
manifest's ``data`` field describes the retain set).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cladapt.data.rows import Example, load_examples
from cladapt.train.chat import encode_all
from cladapt.train.extensions import build_extensions
from cladapt.train.run import RunContext, RunExtension, train_task
from cladapt.train.vision_encode import collator_for

if TYPE_CHECKING:
    from cladapt.base_model import BaseModelInfo
    from cladapt.config import RunConfig
    from cladapt.registry.store import Store, VersionRecord
    from cladapt.train.evaluation_hooks import AfterTrain


def class_name(ex: Example) -> str:
    """The class of a row for prototypes: its ``label`` metadata, else its answer text."""
    return str(ex.meta.get("label", ex.answer)).strip()


def forget_extension(forget: list[Example], info: dict[str, Any]) -> RunExtension:
    """A run extension that encodes ``forget`` and passes it to the plugins (see module doc)."""

    def extend(ctx: RunContext) -> None:
        t = ctx.config.train
        encoded, stats = encode_all(ctx.tokenizer, forget, max_length=t.max_length, overlong=t.overlong)
        rows = [
            {"input_ids": e.input_ids, "labels": e.labels, "sample_kind": 0, "row_index": i, **e.extra}
            for i, e in enumerate(encoded)
        ]
        gen = torch.Generator().manual_seed(t.seed)
        loader: torch.utils.data.DataLoader[dict[str, Any]] = torch.utils.data.DataLoader(
            rows,  # type: ignore[arg-type]  # a list is a map-style dataset
            batch_size=t.batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=collator_for(ctx.tokenizer),
        )
        ctx.task_extra.update(
            forget_loader=loader,
            forget_classes=[class_name(ex) for ex in forget],
            retain_classes=[class_name(ex) for ex in ctx.examples],
        )
        ctx.sidecars.json["forget_data"] = {**info, **stats, "seed": t.seed}

    return extend


def forget_set_extension(forget_files: list[str]) -> RunExtension:
    """Load and validate the forget set now (before any model is loaded); the extension passing it on.

    Raises:
        DataError: a bad row in the forget set.
    """
    forget = load_examples(forget_files)
    info = {"files": [str(Path(f).resolve()) for f in forget.files], "sha256": forget.sha256}
    return forget_extension(list(forget.examples), info)


def forget_task(
    store: Store,
    task: str,
    forget_files: list[str],
    retain_files: list[str],
    cfg: RunConfig,
    *,
    resume: bool = False,
    loaded: tuple[Any, Any, BaseModelInfo] | None = None,
    after_train: AfterTrain | None = None,
) -> VersionRecord:
    """Train a forgetting adapter that removes ``forget_files``' knowledge while keeping ``retain_files``'.

    The core of ``train_from_config(..., forget_data=...)`` (what ``cladapt forget`` calls, which
    also wires evaluation and the gate); this one takes an arbitrary ``after_train`` hook.

    Args:
        after_train: as for :func:`train_task` (evaluation hooks), called before staging.

    Raises:
        DataError: a bad row in either set (both are validated before any model is loaded).
        CladaptError: ``cfg.method`` is not a forgetting method.
    """
    forget = forget_set_extension(forget_files)
    load_examples(retain_files)  # validate now: a bad retain row should not cost a model load
    extensions = [*build_extensions(cfg, store), forget]
    return train_task(
        store,
        task,
        retain_files,
        cfg,
        resume=resume,
        extensions=extensions,
        loaded=loaded,
        after_train=after_train,
        forgetting=True,
    )
