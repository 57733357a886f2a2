"""Length-grouped batches: rows of similar length share a batch, so less of every batch is padding.

The collator right-pads each micro-batch to its longest row, so a batch that mixes a 40-token row
with a 300-token one spends most of its compute on pad tokens. :class:`LengthGroupedSampler`
keeps training stochastic while grouping lengths (the "megabatch" scheme of fairseq and
``transformers``' ``group_by_length``, here seeded by the run's seed):

1. shuffle all rows with ``random.Random(f"length-groups:{seed}:{epoch}")``;
2. cut the shuffled order into windows of ``window`` batches and sort each window by length
   (longest first; ties keep their shuffled order);
3. cut each window into batches of ``batch_size`` and shuffle the order of the *full* batches, so
   training does not walk from long to short rows; the one partial batch (the last window's
   remainder) goes last, which keeps every batch boundary aligned with the data loader's.

Every row is yielded exactly once per epoch, and the same seed and epoch give the same order
(``--resume`` replays it). ``window=1`` sorts nothing (plain shuffled batches); a window as large
as the data sorts globally (least padding, batch contents barely random). The batch *order* stays
random at every window size.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from cladapt.errors import CladaptError


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Seeded, length-grouped order of row indices (see the module docstring)."""

    def __init__(self, lengths: Sequence[int], *, batch_size: int, window: int, seed: int) -> None:
        if batch_size < 1 or window < 1:
            raise CladaptError(f"length grouping needs batch_size >= 1 and window >= 1 (got {batch_size}, {window})")
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.window, self.seed, self.epoch = batch_size, window, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before every epoch (a different, still seeded, order each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The epoch's batches of row indices, in training order."""
        rng = random.Random(f"length-groups:{self.seed}:{self.epoch if epoch is None else epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.window
        full: list[list[int]] = []
        partial: list[list[int]] = []
        for start in range(0, len(order), span):
            group = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            for b in range(0, len(group), self.batch_size):
                batch = group[b : b + self.batch_size]
                (full if len(batch) == self.batch_size else partial).append(batch)
        rng.shuffle(full)
        return full + partial

    def __iter__(self) -> Iterator[int]:
        batches = self.batches()
        self.epoch += 1  # a different order next time unless the trainer sets the epoch itself
        for batch in batches:
            yield from batch


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Share of the padded token grid that is padding when ``order`` is cut into batches.

    Each batch is right-padded to its longest row (what :class:`~cladapt.train.loop.Collator`
    does): ``sum(max_len * rows - sum(len)) / sum(max_len * rows)`` over all batches.
    """
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return (padded - real) / padded if padded else 0.0
