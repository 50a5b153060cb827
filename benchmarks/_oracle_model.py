"""A model whose attention keeps the oracle's blocks: the best any block selection can do.

In every layer, every query-block row keeps the blocks that hold the most true dense
attention mass of that layer's own q and k, at the per-row counts the search would use
for the config (``min(K, qb + 1)``, ``K`` from ``config.density_at``), and attends
exactly within them. Its next-token fidelity bounds what a better search could give at
that cost: if the oracle misses a target at a density, no choice of blocks meets it there.

Eager and slow (dense attention plus an ``N x N`` mask per layer); a measurement, not a
fast path. Runs through transformers' attention interface, so the model code is untouched::

    with oracle_attention(model, SparseConfig(density=0.1, block_size=16, min_seq_len=0)):
        logits = model(ids).logits
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from _recall import oracle_keep, true_block_mass

from sa_compile import SparseConfig
from sa_compile.selection import blocks_per_row, row_counts

_NAME = "sa_compile_oracle"


def search_counts(config: SparseConfig, seq_len: int, device) -> torch.Tensor:
    """Blocks per query-block row of the uniform split at ``seq_len`` (``[nb]`` int64), by
    :func:`~sa_compile.selection.row_counts`. The search keeps exactly these; with
    ``search_head_budgets`` it spends the same total, shared between heads."""
    if config.patterns:
        raise ValueError("the oracle model follows one budget for every head: use a config without patterns")
    nb = -(-seq_len // config.block_size)
    return row_counts(blocks_per_row(nb, config.density_at(nb), device), nb, device)


def oracle_block_attention(q_BHND, k_BGND, v_BGND, config: SparseConfig, scale: float) -> torch.Tensor:
    """Causal attention restricted to the oracle's blocks, ``[B, H, N, D]``."""
    B, H, N, _ = q_BHND.shape
    bs = config.block_size
    mass_BHQK = true_block_mass(q_BHND, k_BGND, bs, scale)
    keep_BHQK = oracle_keep(mass_BHQK, search_counts(config, N, q_BHND.device).expand(B, H, -1))
    keep_BHNN = keep_BHQK.repeat_interleave(bs, -2)[..., :N, :].repeat_interleave(bs, -1)[..., :N]
    causal_NN = torch.ones(N, N, dtype=torch.bool, device=q_BHND.device).tril()
    return F.scaled_dot_product_attention(q_BHND, k_BGND, v_BGND, attn_mask=keep_BHNN & causal_NN, scale=scale,
                                          enable_gqa=True)


@contextlib.contextmanager
def oracle_attention(model, config: SparseConfig):
    """Within the block, ``model`` (a transformers Llama) attends through the oracle's blocks.

    Prefill only: the sequence is the prompt, with no cache before it and no padding.
    """
    from transformers import AttentionInterface

    def attend(module, q_BHND, k_BGND, v_BGND, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if q_BHND.shape[-2] != k_BGND.shape[-2]:
            raise ValueError("the oracle model runs prefills only (query length equals key length)")
        out_BHND = oracle_block_attention(q_BHND, k_BGND, v_BGND, config, scaling)
        return out_BHND.transpose(1, 2).contiguous(), None

    AttentionInterface.register(_NAME, attend)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
