"""A model whose attention keeps chosen blocks, eagerly: the oracle's, or the search's.

``blocks="oracle"``: in every layer, every query-block row keeps the blocks that hold the
most true dense attention mass of that layer's own q and k, at the per-row counts the search
would use for the config (``min(K, qb + 1)``, ``K`` from ``config.density_at``), and attends
exactly within them. Its next-token fidelity bounds what a better search could give at that
cost: if the oracle misses a target at a density, no choice of blocks meets it there.

``blocks="search"``: the blocks the backend's search keeps (``select_kept_blocks``, the
same tensor code the compiled op runs), attended exactly: the backend's answer without a
compile per config, for sweeps over many densities. ``tests/test_block_model.py`` checks that
it gives the compiled backend's logits.

Eager: the blocks are chosen by plain tensor code, then attended exactly, with an ``N x N``
mask while that is small and through FlexAttention over a BlockMask of exactly the kept
blocks past that (``MASK_LIMIT``), so 64K and 128K fit. A measurement, not a fast path.
Runs through transformers' attention interface, so the model code is untouched::

    with block_attention(model, SparseConfig(density=0.1, block_size=16, min_seq_len=0), "oracle"):
        logits = model(ids).logits

Decode steps (one query against the cache) stay dense, as under the backend.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from _recall import oracle_keep, selection_block_mask, true_block_mass
from torch.nn.attention.flex_attention import flex_attention

from sa_compile import SparseConfig
from sa_compile.selection import blocks_per_row, causal_block_count, row_counts
from sa_compile.sparse_op import select_kept_blocks

_NAME = "sa_compile_blocks"
CHOOSERS = ("oracle", "search")


def search_counts(config: SparseConfig, seq_len: int, device) -> torch.Tensor:
    """Blocks per query-block row of the uniform split at ``seq_len`` (``[nb]`` int64), by
    :func:`~sa_compile.selection.row_counts`. The search keeps exactly these; with
    ``search_head_budgets`` it spends the same total, shared between heads."""
    if config.patterns:
        raise ValueError("the oracle model follows one budget for every head: use a config without patterns")
    nb = -(-seq_len // config.block_size)
    return row_counts(blocks_per_row(nb, config.density_at(nb), device), nb, device)


MASK_LIMIT = 1 << 28  # mask entries (B * H * N * N) up to which the exact N x N mask is used


def oracle_keep_blocks(q_BHND, k_BGND, config: SparseConfig, scale: float) -> torch.Tensor:
    """The oracle's kept blocks, ``keep_BHQK``: per row, as many as the search keeps there,
    the ones of most true mass."""
    counts_BHQ = select_kept_blocks(q_BHND, k_BGND, config, scale).sum(-1)
    return oracle_keep(true_block_mass(q_BHND, k_BGND, config.block_size, scale), counts_BHQ)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def kept_block_attention(q_BHND, k_BGND, v_BGND, keep_BHQK, block_size: int, scale: float,
                         mask_limit: int = MASK_LIMIT) -> torch.Tensor:
    """Causal attention restricted to the kept blocks, ``[B, H, N, D]``."""
    B, H, N, _ = q_BHND.shape
    if B * H * N * N > mask_limit:
        block_mask = selection_block_mask(keep_BHQK, block_size, N)
        return _compiled_flex()(q_BHND, k_BGND, v_BGND, block_mask=block_mask, scale=scale, enable_gqa=True)
    keep_BHNN = keep_BHQK.repeat_interleave(block_size, -2)[..., :N, :].repeat_interleave(block_size, -1)[..., :N]
    causal_NN = torch.ones(N, N, dtype=torch.bool, device=q_BHND.device).tril()
    return F.scaled_dot_product_attention(q_BHND, k_BGND, v_BGND, attn_mask=keep_BHNN & causal_NN, scale=scale,
                                          enable_gqa=True)


def oracle_block_attention(q_BHND, k_BGND, v_BGND, config: SparseConfig, scale: float) -> torch.Tensor:
    """Causal attention restricted to the oracle's blocks, ``[B, H, N, D]``."""
    keep_BHQK = oracle_keep_blocks(q_BHND, k_BGND, config, scale)
    return kept_block_attention(q_BHND, k_BGND, v_BGND, keep_BHQK, config.block_size, scale)


def search_block_attention(q_BHND, k_BGND, v_BGND, config: SparseConfig, scale: float) -> torch.Tensor:
    """Causal attention restricted to the search's blocks, ``[B, H, N, D]``."""
    keep_BHQK = select_kept_blocks(q_BHND, k_BGND, config, scale)
    return kept_block_attention(q_BHND, k_BGND, v_BGND, keep_BHQK, config.block_size, scale)


@contextlib.contextmanager
def block_attention(model, config: SparseConfig, blocks: str):
    """Within the block, ``model`` (a transformers Llama) attends through ``blocks``' choice
    (``"oracle"`` or ``"search"``). Prefills start with no cache and no padding; a decode
    step (one query) is dense. Yields a dict counting the kept and causal blocks of every
    prefill (``kept_blocks / causal_blocks`` is the computed fraction, measured)."""
    if blocks not in CHOOSERS:
        raise ValueError(f"blocks={blocks!r}: expected one of {CHOOSERS}")
    from transformers import AttentionInterface

    choose = oracle_keep_blocks if blocks == "oracle" else select_kept_blocks
    stats = {"kept_blocks": 0, "causal_blocks": 0}

    def attend(module, q_BHND, k_BGND, v_BGND, attention_mask, scaling=None, dropout=0.0, **kwargs):
        n_q, n_k = q_BHND.shape[-2], k_BGND.shape[-2]
        if n_q == n_k:
            keep_BHQK = choose(q_BHND, k_BGND, config, scaling)
            stats["kept_blocks"] += keep_BHQK.sum()
            stats["causal_blocks"] += keep_BHQK.shape[0] * keep_BHQK.shape[1] * causal_block_count(keep_BHQK.shape[-1])
            out_BHND = kept_block_attention(q_BHND, k_BGND, v_BGND, keep_BHQK, config.block_size, scaling)
        elif n_q == 1:
            out_BHND = F.scaled_dot_product_attention(q_BHND, k_BGND, v_BGND, scale=scaling, enable_gqa=True)
        else:
            raise ValueError("the block model runs prefills from an empty cache and one-token decode steps")
        return out_BHND.transpose(1, 2).contiguous(), None

    AttentionInterface.register(_NAME, attend)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_NAME)
    try:
        yield stats
    finally:
        model.set_attn_implementation(previous)
