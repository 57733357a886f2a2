"""Collectives every layer may use: rank, world size, barrier, sum over processes, JSON broadcast.

Why a module of its own at the bottom of the package: methods (``cladapt.adapters``) compute state
from the task's data (InfLoRA's input covariances) and must pool it across processes, but the
run orchestration (``cladapt.train.distributed``: launch detection, rank-0 commits) lives above
them. Everything here is a no-op in a single process, so callers never branch on the launch.

The backend is whatever ``torch.distributed`` was initialised with (gloo on CPU, nccl on CUDA);
tensors go through the backend's device and come back on the caller's device. Objects travel as
UTF-8 JSON in a byte tensor, never pickled.
"""

from __future__ import annotations

import json
from typing import Any

import torch


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of processes taking part in this run (1 without a process group)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if _initialized() else 0


def is_main() -> bool:
    """True in the one process that writes (the registry, reports, logs)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here."""
    if world_size() > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    """The device the backend reduces on: CUDA for nccl, CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over every process (a new tensor, same device and dtype).

    Summed in float64 for floating inputs, so pooling sums of squares over processes loses
    nothing against summing them in one process.
    """
    if world_size() == 1:
        return tensor.clone()
    work = tensor.detach().to(_comm_device(), torch.float64 if tensor.is_floating_point() else tensor.dtype)
    torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
    return work.to(tensor.device, tensor.dtype)


def broadcast_json(obj: Any, *, src: int = 0) -> Any:
    """``obj`` of process ``src`` (any JSON value) in every process; the others pass anything."""
    if world_size() == 1:
        return obj
    device = _comm_device()
    payload = json.dumps(obj).encode() if rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    torch.distributed.broadcast(size, src=src)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if rank() == src:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    torch.distributed.broadcast(data, src=src)
    return json.loads(bytes(data.cpu().tolist()).decode()) if rank() != src else obj


def share(n: int) -> range:
    """The items of ``0..n-1`` this process handles when ``n`` items are split over the processes.

    Strided (``rank, rank + world, ...``) so the shares differ by at most one item; with fewer
    items than processes every process takes all of them (callers then must not sum the results:
    see :func:`split_evenly`).
    """
    w = world_size()
    if w == 1 or n < w:
        return range(n)
    return range(rank(), n, w)


def split_evenly(n: int) -> bool:
    """True when :func:`share` splits ``n`` items (so per-process results must be summed)."""
    return world_size() > 1 and n >= world_size()
