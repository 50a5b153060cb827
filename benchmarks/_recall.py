"""Attention recall: how much of dense attention's mass a block selection keeps, and the oracle.

The true mass of a block is the causal softmax attention of its queries summed over its keys
(float32, from the real q and k). Recall of a selection is the kept share of all that mass;
every query carries mass 1, so recall is the mean kept fraction over queries. The oracle keeps,
in every query-block row, the blocks holding the most true mass at the same per-row counts as
the selection it is compared with: no selection of those counts keeps more.

    mass_BHQK = true_block_mass(q_BHND, k_BGND, block_size=64, scale=64**-0.5)
    recall_BH = block_recall(mass_BHQK, keep_BHQK)
    best_BH = block_recall(mass_BHQK, oracle_keep(mass_BHQK, keep_BHQK.sum(-1)))

Never N x N: the mass is built one chunk of query blocks at a time, and only ``[B, H, nb, nb]``
tensors are kept.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from sa_compile import block_mass
from sa_compile.flex import causal_mask_mod


def _compact(mask_BHQK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept-block counts and indices (kept first, ascending), as ``from_kv_blocks`` takes them."""
    order = torch.argsort(mask_BHQK.to(torch.int8), dim=-1, descending=True, stable=True)
    return mask_BHQK.sum(-1, dtype=torch.int32), order.to(torch.int32)


def true_block_mass(q_BHND: torch.Tensor, k_BGND: torch.Tensor, block_size: int, scale: float,
                    chunk_bytes: int = 2**30) -> torch.Tensor:
    """:func:`sa_compile.block_mass.true_block_mass` with larger chunks by default (fewer
    launches at 64K on a GPU): ``[B, H_q, nb, nb]`` float32, each row summing to its number of
    queries."""
    return block_mass.true_block_mass(q_BHND, k_BGND, block_size, scale, chunk_bytes)


def block_recall(mass_BHQK: torch.Tensor, keep_BHQK: torch.Tensor) -> torch.Tensor:
    """Share of the total dense mass inside the kept blocks, per head: ``[B, H]`` float64."""
    mass = mass_BHQK.double()
    return (mass * keep_BHQK).sum((-2, -1)) / mass.sum((-2, -1))


def oracle_keep(mass_BHQK: torch.Tensor, counts_BHQ: torch.Tensor) -> torch.Tensor:
    """Per row, the ``counts_BHQ`` causal blocks holding the most true mass (bool ``[B, H, nb, nb]``).

    No selection with the same per-row counts keeps more mass. Counts above a row's number
    of causal blocks keep the whole row.
    """
    nb = mass_BHQK.shape[-1]
    idx = torch.arange(nb, device=mass_BHQK.device)
    above_QK = idx[None, :] > idx[:, None]
    ranked = mass_BHQK.masked_fill(above_QK, float("-inf"))
    order_BHQK = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    rank_BHQK = torch.empty_like(order_BHQK).scatter_(-1, order_BHQK, idx.expand_as(order_BHQK))
    return (rank_BHQK < counts_BHQ[..., None]) & ~above_QK


def selection_block_mask(keep_BHQK: torch.Tensor, block_size: int, seq_len: int) -> BlockMask:
    """A causal BlockMask over exactly the kept blocks (diagonal blocks partial, the rest full).

    Unlike the op's own builder, it does not add the diagonal block to rows that do not
    keep it, so an oracle that drops a diagonal block computes exactly what it chose. Every
    row keeps at least one block, so no query is left without keys.
    """
    nb = keep_BHQK.shape[-1]
    idx = torch.arange(nb, device=keep_BHQK.device)
    diagonal_QK = idx[:, None] == idx[None, :]
    partial, full = _compact(keep_BHQK & diagonal_QK), _compact(keep_BHQK & ~diagonal_QK)
    return BlockMask.from_kv_blocks(*partial, *full, BLOCK_SIZE=block_size, mask_mod=causal_mask_mod,
                                    seq_lengths=(seq_len, seq_len))


def recall_summary(recall_BH: torch.Tensor) -> dict:
    """Mean and min over every (batch, head) entry, as plain floats."""
    return {"mean": float(recall_BH.mean()), "min": float(recall_BH.min())}
