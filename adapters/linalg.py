"""Shared fp32 math of the continual-learning methods (methods.md §0.3, §2, §3, §4.2, §8, §9).

Pure functions on tensors: no PEFT, no registry. Every function computes in float32 whatever the
input dtype (bf16 covariances and overlaps are too noisy, methods.md §0.3) and returns float32.

* orthonormal bases: :func:`orth` (QR, with an SVD fallback when the input is rank-deficient),
  :func:`union_basis`, :func:`complement`, projections :func:`project_rows` / :func:`project_cols`;
* GPM/InfLoRA basis growth with an energy threshold: :func:`update_basis`, :func:`eps_schedule`,
  and the DualGPM storage switch :func:`pack_basis` / :func:`unpack_basis`;
* penalties: O-LoRA overlap, OWLoRA intra-orthogonality, RegLoRA gather form, GS-LoRA group norms;
* RegLoRA masks: :func:`topk_mask`, :func:`packbits` / :func:`unpackbits`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch

#: relative singular-value threshold below which a direction counts as numerically absent
RANK_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# orthonormal bases and projections


def orth(m: torch.Tensor, rtol: float = RANK_RTOL) -> torch.Tensor:
    """An orthonormal basis ``[d, k]`` of the column space of ``m: [d, n]`` (fp32).

    QR when ``m`` has full column rank (the common case: LoRA factors), otherwise an SVD that
    drops directions with singular value ``< rtol * max``, so a zero or rank-deficient input
    does not invent directions (which would waste capacity of later tasks).
    """
    m = m.detach().float()
    d, n = m.shape
    if n == 0 or not bool(m.abs().max() > 0):
        return m.new_zeros(d, 0)
    if n <= d:
        q, r = torch.linalg.qr(m)
        diag = r.diagonal().abs()
        if bool(diag.min() > rtol * max(1.0, float(diag.max())) * 10):
            return q
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    keep = s > rtol * s[0]
    return u[:, keep].contiguous()


def union_basis(bases: Iterable[torch.Tensor], d: int) -> torch.Tensor:
    """Orthonormal basis of the union of the spans of ``bases`` (each ``[d, k_j]``)."""
    parts = [b.detach().float() for b in bases if b.numel()]
    if not parts:
        return torch.zeros(d, 0)
    return orth(torch.cat(parts, dim=1))


def project_rows(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``x - (x P) P^T``: remove the span of ``P: [d, k]`` from every row of ``x: [n, d]``."""
    if p.shape[1] == 0:
        return x
    p = p.to(device=x.device, dtype=torch.float32)
    xf = x.float()
    return (xf - (xf @ p) @ p.T).to(x.dtype)


def project_cols(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``x - P (P^T x)``: remove the span of ``P: [d, k]`` from every column of ``x: [d, n]``."""
    if p.shape[1] == 0:
        return x
    p = p.to(device=x.device, dtype=torch.float32)
    xf = x.float()
    return (xf - p @ (p.T @ xf)).to(x.dtype)


def complement(u: torch.Tensor, d: int) -> torch.Tensor:
    """Orthonormal basis ``[d, d - k]`` of the orthogonal complement of ``span(U)``, ``U: [d, k]``."""
    if u.shape[1] == 0:
        return torch.eye(d)
    q, _ = torch.linalg.qr(u.detach().float(), mode="complete")
    return q[:, u.shape[1] :].contiguous()


# ---------------------------------------------------------------------------------------------
# GPM / InfLoRA bases (methods.md §9)


def _eigh_desc(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, v = torch.linalg.eigh((c + c.T) / 2)
    return lam.flip(0).clamp_min(0), v.flip(1)


def update_basis(u: torch.Tensor | None, c: torch.Tensor, eps: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Grow the basis ``U`` so that it captures a fraction ``eps`` of the energy of ``C``.

    Args:
        u: current orthonormal basis ``[d, k]`` (or None / ``k = 0``).
        c: uncentered input covariance ``X X^T / N`` ``[d, d]``.
        eps: energy threshold in (0, 1].

    Returns:
        (the new basis ``[d, k']``, info with ``k``, ``added``, ``already`` and ``captured`` energy).
    """
    c = c.detach().float()
    d = c.shape[0]
    u = torch.zeros(d, 0) if u is None else u.detach().float()
    total = float(c.trace())
    if total <= 0:
        return u, {"k": u.shape[1], "added": 0, "already": 1.0, "captured": 1.0}
    if u.shape[1]:
        free = torch.eye(d) - u @ u.T
        resid = free @ c @ free
    else:
        free, resid = None, c
    already = max(0.0, (total - float(resid.trace())) / total)
    if already >= eps:
        return u, {"k": u.shape[1], "added": 0, "already": already, "captured": already}
    lam, v = _eigh_desc(resid)
    cum = already + torch.cumsum(lam, 0) / total
    k = int((cum < eps).sum()) + 1
    k = min(k, d - u.shape[1])
    v = v[:, :k]
    if free is not None:
        v = free @ v  # re-project: eigenvectors of the residual may carry round-off along U
    new = orth(torch.cat([u, v], dim=1))
    captured = float(already + lam[:k].sum() / total)
    return new, {"k": new.shape[1], "added": new.shape[1] - u.shape[1], "already": already, "captured": captured}


def eps_schedule(t: int, start: float = 0.95, step: float = 0.005, maximum: float = 0.99) -> float:
    """cladapt's energy threshold for the t-th task (1-based): ``min(max, start + step (t-1))``."""
    return min(maximum, start + step * (t - 1))


def pack_basis(u: torch.Tensor) -> tuple[torch.Tensor, int]:
    """DualGPM storage: ``(U, 0)`` ("remove") while ``k <= d/2``, else ``(M, 1)`` ("retain"),
    ``M`` the orthonormal complement, which is then the smaller matrix."""
    d, k = u.shape
    if k > d // 2:
        return complement(u, d), 1
    return u.contiguous(), 0


def unpack_basis(stored: torch.Tensor, mode: int) -> torch.Tensor:
    """Inverse of :func:`pack_basis`: the basis ``U`` of the protected subspace."""
    stored = stored.float()
    return complement(stored, stored.shape[0]) if int(mode) == 1 else stored


# ---------------------------------------------------------------------------------------------
# penalties


def overlap_penalty(a_prev: torch.Tensor, a: torch.Tensor, kind: Literal["abs", "sq"] = "abs") -> torch.Tensor:
    """O-LoRA: ``sum |A_prev A^T|`` (official code) or ``sum (A_prev A^T)^2`` (paper)."""
    o = a_prev.to(device=a.device, dtype=torch.float32) @ a.float().T
    return o.abs().sum() if kind == "abs" else o.pow(2).sum()


def normalized_overlap(a_prev: torch.Tensor, a: torch.Tensor) -> float:
    """``||rownorm(A_prev) rownorm(A)^T||_F``: scale-free overlap for monitoring (methods.md §2)."""

    def rownorm(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    if a_prev.numel() == 0:
        return 0.0
    return float((rownorm(a_prev).to(a.device) @ rownorm(a).T).norm())


def intra_orth_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """OWLoRA: ``(||A A^T - I||_F^2 + ||B^T B - I||_F^2) / r^2`` for ``A: [r, d_in]``, ``B: [d_out, r]``."""
    r = a.shape[0]
    eye = torch.eye(r, device=a.device)
    af, bf = a.float(), b.float()
    return ((af @ af.T - eye).pow(2).sum() + (bf.T @ bf - eye).pow(2).sum()) / (r * r)


def gathered_update(b: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``(B @ A)[rows, cols]`` without forming ``B @ A``: ``O(n r)`` instead of ``O(d_out d_in r)``."""
    return (b.float().index_select(0, rows) * a.float().t().index_select(0, cols)).sum(dim=1)


#: above this share of a module's entries the dense masked form is used. Measured on the default
#: model (q_proj/v_proj, r=8, 2 CPU cores; bench/train_overhead.py): at 2 % coverage (task 2) the
#: gather costs 1.075x plain LoRA and the dense form 1.11x; at 14 % (task 8) the gather costs
#: 1.15x and the dense form 1.06x. The crossover lies between; 6 % is about three tasks' masks.
GATHER_MAX_COVERAGE = 0.06


def masked_update_abs_mean(
    b: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """``mean |(B @ A)[mask]|`` (unscaled, fp32), by whichever form is cheaper for the mask's coverage.

    The gather form costs ``O(n r)`` and grows with every task's union mask; the dense form costs
    ``O(d_out d_in r)`` whatever the mask holds, so it keeps the step time flat as tasks accumulate.
    Both give the same value (tested).
    """
    n = rows.numel()
    if n <= GATHER_MAX_COVERAGE * mask.numel():
        return gathered_update(b, a, rows, cols).abs().mean()
    dense = (b.float() @ a.float()).abs()
    return dense.masked_fill(~mask, 0.0).sum() / n


def group_norms(groups: dict[str, Sequence[torch.Tensor]], eps: float = 1e-12) -> dict[str, torch.Tensor]:
    """GS-LoRA: ``sqrt(sum_{P in g} ||P||_F^2 + eps)`` per group (``eps`` keeps the gradient finite at 0)."""
    return {g: torch.sqrt(torch.stack([p.float().pow(2).sum() for p in ps]).sum() + eps) for g, ps in groups.items()}


# ---------------------------------------------------------------------------------------------
# RegLoRA masks


def topk_mask(d: torch.Tensor, percent: float) -> tuple[torch.Tensor, int]:
    """Boolean mask of the ``floor(percent/100 * numel)`` largest entries of ``d`` (ties: arbitrary)."""
    k = int(math.floor(percent / 100.0 * d.numel()))
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    if k > 0:
        idx = torch.topk(d.detach().float().reshape(-1).cpu(), k).indices
        mask[idx] = True
    return mask.reshape(d.shape), k


def packbits(mask: torch.Tensor) -> torch.Tensor:
    """Row-major boolean ``[d_out, d_in]`` -> uint8 ``[ceil(numel/8)]`` (``numpy.packbits``)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().astype(bool).reshape(-1)))


def unpackbits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.detach().cpu().numpy().astype(np.uint8), count=n)
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(int(s) for s in shape))
