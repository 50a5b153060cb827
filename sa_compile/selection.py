"""Budgeted block selection: from block scores to the kept blocks of every row.

All shapes stay fixed by the block grid and every count lives in a tensor, so nothing
here syncs with the host or recompiles when the budget changes with the length.
"""

from __future__ import annotations

import torch


def causal_block_count(num_blocks_) -> int:
    """Blocks on or below the diagonal of an ``nb x nb`` grid."""
    return num_blocks_ * (num_blocks_ + 1) // 2


def blocks_per_row(num_blocks_, density: float, device) -> torch.Tensor:
    """Largest per-row block count K whose causal grid cost stays within the budget.

    Row ``qb`` keeps ``min(K, qb + 1)`` blocks, costing ``K*nb - K*(K-1)/2`` blocks in all;
    the budget is ``density`` of the ``nb*(nb+1)/2`` causal blocks. Never below the two
    blocks (sink and diagonal) every row keeps anyway. Returns a 0-d int64 tensor.
    """
    nb = torch.full((), num_blocks_, dtype=torch.float64, device=device)
    budget = density * nb * (nb + 1) / 2
    root = torch.sqrt(((2 * nb + 1) ** 2 - 8 * budget).clamp(min=0))
    k = torch.floor((2 * nb + 1 - root) / 2 + 1e-9)
    return k.clamp(min=torch.clamp(nb, max=2.0), max=nb).to(torch.int64)


def select_blocks(scores_BHQK: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``min(K, qb+1)`` causal blocks of each row, sink and diagonal first.

    Returns ``keep_BHQK`` (bool). Every row is non-empty and causal.
    """
    nb = scores_BHQK.shape[-1]
    device = scores_BHQK.device
    idx = torch.arange(nb, device=device)
    offsets_QK = idx[:, None] - idx[None, :]
    forced_QK = (offsets_QK == 0) | ((idx[None, :] == 0) & (offsets_QK >= 0))
    ranked = scores_BHQK.float().masked_fill(offsets_QK < 0, float("-inf"))
    ranked = ranked.masked_fill(forced_QK, float("inf"))
    order_BHQK = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    rank_BHQK = torch.empty_like(order_BHQK).scatter_(-1, order_BHQK, idx.expand_as(order_BHQK))
    k_row_Q = torch.minimum(blocks_per_row(nb, density, device), idx + 1)
    return rank_BHQK < k_row_Q[:, None]


def compact(mask_BHQK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept-block counts and indices (kept first, ascending), as FlexAttention wants them."""
    order = torch.argsort(mask_BHQK.to(torch.int8), dim=-1, descending=True, stable=True)
    return mask_BHQK.sum(-1, dtype=torch.int32), order.to(torch.int32)


def diagonal_only(batch: int, heads: int, num_blocks_, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and indices of a grid that keeps only the diagonal block of each row."""
    idx = torch.arange(num_blocks_, device=device, dtype=torch.int32)
    indices_QK = torch.where(idx[None, :] == 0, idx[:, None], 0)
    counts = torch.ones(batch, heads, num_blocks_, device=device, dtype=torch.int32)
    return counts, indices_QK.expand(batch, heads, num_blocks_, num_blocks_).contiguous()


def realized_density(seq_len: int, config) -> float:
    """Fraction of the causal block grid the sparse path computes at ``seq_len`` tokens.

    Exact, not an estimate: every row keeps ``min(K, qb + 1)`` blocks whatever the input.
    Returns 1.0 below ``config.min_seq_len``, where attention stays dense.
    """
    if seq_len < config.min_seq_len:
        return 1.0
    nb = -(-seq_len // config.block_size)
    k = int(blocks_per_row(nb, config.density, "cpu"))
    kept = sum(min(k, row + 1) for row in range(nb))
    return kept / causal_block_count(nb)
