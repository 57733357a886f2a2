"""Shared fp32 math (adapters/linalg.py): bases, projections, basis growth, masks, group norms."""

from __future__ import annotations

import math

import pytest
import torch

from cladapt.adapters import linalg as L


def test_orth_is_orthonormal_and_spans_input() -> None:
    m = torch.randn(32, 5)
    q = L.orth(m)
    assert q.shape == (32, 5)
    assert torch.allclose(q.T @ q, torch.eye(5), atol=1e-5)
    assert (m - q @ (q.T @ m)).norm() < 1e-5 * m.norm()


def test_orth_drops_missing_directions() -> None:
    m = torch.randn(32, 3)
    rank_deficient = torch.cat([m, m[:, :1] * 2, torch.zeros(32, 2)], dim=1)
    assert L.orth(rank_deficient).shape[1] == 3
    assert L.orth(torch.zeros(16, 4)).shape == (16, 0)


def test_projections_remove_the_span() -> None:
    p = L.orth(torch.randn(20, 4))
    x = torch.randn(7, 20)
    assert (L.project_rows(x, p) @ p).norm() < 1e-5
    y = torch.randn(20, 6)
    assert (p.T @ L.project_cols(y, p)).norm() < 1e-5
    c = L.complement(p, 20)
    assert c.shape == (20, 16)
    assert (c.T @ p).norm() < 1e-5 and torch.allclose(c.T @ c, torch.eye(16), atol=1e-5)


def _spectrum_cov(d: int, energies: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    v, _ = torch.linalg.qr(torch.randn(d, d))
    lam = torch.zeros(d)
    lam[: len(energies)] = torch.tensor(energies)
    return v @ torch.diag(lam) @ v.T, v


def test_update_basis_picks_the_expected_k() -> None:
    torch.manual_seed(0)
    # energies 50, 30, 15, 4, 1 (%): eps 0.9 needs 3 directions, 0.96 needs 4
    c, v = _spectrum_cov(16, [50.0, 30.0, 15.0, 4.0, 1.0])
    u, info = L.update_basis(None, c, 0.9)
    assert u.shape[1] == 3 and info["k"] == 3
    assert torch.allclose(u.T @ u, torch.eye(3), atol=1e-5)
    assert math.isclose(info["captured"], 0.95, rel_tol=1e-4)
    # growing from that basis: already 0.95 captured, 0.96 adds exactly the 4th direction
    u2, info2 = L.update_basis(u, c, 0.96)
    assert u2.shape[1] == 4 and info2["added"] == 1
    assert torch.allclose(u2.T @ u2, torch.eye(4), atol=1e-5)
    assert (L.project_cols(v[:, :4], u2)).norm() < 1e-4
    # nothing to add when the energy is already captured
    u3, info3 = L.update_basis(u2, c, 0.9)
    assert u3.shape[1] == 4 and info3["added"] == 0


def test_pack_basis_switches_to_the_complement() -> None:
    small = L.orth(torch.randn(10, 3))
    stored, mode = L.pack_basis(small)
    assert mode == 0 and torch.equal(stored, small)
    big = L.orth(torch.randn(10, 7))
    stored, mode = L.pack_basis(big)
    assert mode == 1 and stored.shape == (10, 3)
    back = L.unpack_basis(stored, mode)
    assert torch.allclose(back @ back.T, big @ big.T, atol=1e-5)  # same projector


def test_packbits_round_trip_is_row_major() -> None:
    mask = torch.rand(7, 13) > 0.7
    packed = L.packbits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(7 * 13 / 8)
    assert torch.equal(L.unpackbits(packed, [7, 13]), mask)


def test_topk_mask_selects_floor_percent_of_the_largest() -> None:
    d = torch.rand(30, 17)
    mask, k = L.topk_mask(d, 2.0)
    assert k == math.floor(0.02 * d.numel()) and int(mask.sum()) == k
    assert d[mask].min() >= d[~mask].max()


@pytest.mark.parametrize("kind", ["abs", "sq"])
def test_overlap_penalty_matches_hand_computation(kind: str) -> None:
    a_prev, a = torch.randn(6, 11), torch.randn(3, 11)
    o = [[sum(a_prev[i, k] * a[j, k] for k in range(11)) for j in range(3)] for i in range(6)]
    hand = sum(abs(x) if kind == "abs" else x * x for row in o for x in row)
    assert math.isclose(float(L.overlap_penalty(a_prev, a, kind)), float(hand), rel_tol=1e-5)


def test_intra_orth_penalty_is_zero_for_orthonormal_factors() -> None:
    a = L.orth(torch.randn(12, 4)).T  # orthonormal rows
    b = L.orth(torch.randn(9, 4))  # orthonormal columns
    assert float(L.intra_orth_penalty(a, b)) < 1e-6
    assert float(L.intra_orth_penalty(2 * a, b)) > 0.1


def test_gathered_update_equals_dense() -> None:
    b, a = torch.randn(9, 3), torch.randn(3, 14)
    mask = torch.rand(9, 14) > 0.6
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.allclose(L.gathered_update(b, a, rows, cols), (b @ a)[mask], rtol=1e-6, atol=1e-6)


def test_group_norms_match_hand_computation() -> None:
    g = {"x": [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])], "y": [torch.zeros(3)]}
    norms = L.group_norms(g)
    assert math.isclose(float(norms["x"]), 5.0, rel_tol=1e-6)
    assert float(norms["y"]) == pytest.approx(1e-6, abs=1e-7)  # sqrt(1e-12): finite gradient at 0


def test_masked_update_dense_and_gather_forms_agree() -> None:
    torch.manual_seed(3)
    b, a = torch.randn(24, 4, requires_grad=True), torch.randn(4, 20, requires_grad=True)
    for share in (0.005, 0.3):  # below and above the coverage where the dense form takes over
        mask = torch.zeros(24 * 20, dtype=torch.bool)
        mask[torch.randperm(24 * 20)[: max(1, int(share * 24 * 20))]] = True
        mask = mask.view(24, 20)
        rows, cols = mask.nonzero(as_tuple=True)
        got = L.masked_update_abs_mean(b, a, mask, rows, cols)
        want = (b @ a)[mask].abs().mean()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        ga = torch.autograd.grad(got, (a, b))
        gw = torch.autograd.grad(want, (a, b))
        for x, y in zip(ga, gw, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
