"""Slow references: what the tests and the benchmarks measure the sparse path against.

Plain eager tensor code, never compiled and never on the hot path; correct first, then no
slower than a measurement needs.

- Attention: :func:`dense_reference` and :func:`masked_reference` (float64, one ``N x N``
  mask; tests at small ``N``), and :func:`kept_block_attention`, causal attention within the
  kept blocks at any length (an ``N x N`` mask while small, FlexAttention over a BlockMask of
  exactly the kept blocks past :data:`MASK_LIMIT`).
- True attention mass and recall: :func:`true_block_mass` (the dense causal softmax summed
  per block, from :mod:`sa_compile.block_mass`), :func:`block_recall`, :func:`recall_summary`.
- The oracle: in every query-block row, the blocks of most true mass at the same per-row
  counts as the search (:func:`search_counts`), which no choice of blocks of that cost beats:
  :func:`oracle_keep`, :func:`oracle_keep_blocks`, :func:`oracle_block_attention`.
- The eager block model: :func:`block_attention`, a transformers model whose attention keeps
  the oracle's blocks or the search's (:func:`search_block_attention`), attended exactly.

Example::

    mass_BHQK = true_block_mass(q_BHND, k_BGND, block_size=64, scale=64**-0.5)
    recall_BH = block_recall(mass_BHQK, keep_BHQK)
    best_BH = block_recall(mass_BHQK, oracle_keep(mass_BHQK, keep_BHQK.sum(-1)))
    with block_attention(model, SparseConfig(density=0.1, block_size=16, min_seq_len=0), "oracle"):
        logits = model(ids).logits
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from sa_compile.templates._blocks import num_blocks

from .block_mass import true_block_mass
from .config import SparseConfig
from .flex import causal_mask_mod
from .selection import blocks_per_row, causal_block_count, row_counts
from .sparse_op import select_kept_blocks

__all__ = [
    "CHOOSERS", "MASK_LIMIT", "block_attention", "block_recall", "dense_reference", "kept_block_attention",
    "masked_reference", "oracle_block_attention", "oracle_keep", "oracle_keep_blocks", "recall_summary",
    "search_block_attention", "search_counts", "selection_block_mask", "token_mask", "true_block_mass",
]

MASK_LIMIT = 1 << 28  # mask entries (B * H * N * N) up to which the exact N x N mask is used
CHOOSERS = ("oracle", "search")
_NAME = "sa_compile_blocks"


def token_mask(keep_BHQK: torch.Tensor, block_size: int, seq_len: int, kv_valid_BN=None) -> torch.Tensor:
    """The token-level mask ``[B, H, N, N]`` a block selection stands for: kept blocks, causal, valid keys."""
    mask = keep_BHQK.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=keep_BHQK.device).tril()
    mask = mask[..., :seq_len, :seq_len] & causal
    if kv_valid_BN is not None:
        mask = mask & (kv_valid_BN != 0)[:, None, None, :]
    return mask


def masked_reference(q_BHND, k_BGND, v_BGND, mask, scale=None) -> torch.Tensor:
    """Attention under ``mask`` (broadcast against ``[B, H, N, N]``) in float64; rows with no
    visible key give zeros. GQA: query head ``h`` reads key head ``h // (H // G)``."""
    group = q_BHND.shape[1] // k_BGND.shape[1]
    k64 = k_BGND.double().repeat_interleave(group, 1)
    v64 = v_BGND.double().repeat_interleave(group, 1)
    scale = q_BHND.shape[-1] ** -0.5 if scale is None else scale
    logits = (q_BHND.double() @ k64.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0) @ v64


def dense_reference(q_BHND, k_BGND, v_BGND, scale=None, kv_valid_BN=None) -> torch.Tensor:
    """Causal dense attention in float64, optionally with key padding (``kv_valid_BN`` nonzero = real)."""
    N = q_BHND.shape[-2]
    mask = torch.ones(N, N, dtype=torch.bool, device=q_BHND.device).tril()[None, None]
    if kv_valid_BN is not None:
        mask = mask & (kv_valid_BN != 0)[:, None, None, :]
    return masked_reference(q_BHND, k_BGND, v_BGND, mask, scale)


def _compact(mask_BHQK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept-block counts and indices (kept first, ascending), as ``from_kv_blocks`` takes them."""
    order = torch.argsort(mask_BHQK.to(torch.int8), dim=-1, descending=True, stable=True)
    return mask_BHQK.sum(-1, dtype=torch.int32), order.to(torch.int32)


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


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def kept_block_attention(q_BHND, k_BGND, v_BGND, keep_BHQK, block_size: int, scale: float,
                         mask_limit: int = MASK_LIMIT) -> torch.Tensor:
    """Causal attention restricted to the kept blocks, ``[B, H, N, D]``, at any length."""
    B, H, N, _ = q_BHND.shape
    if B * H * N * N > mask_limit:
        block_mask = selection_block_mask(keep_BHQK, block_size, N)
        return _compiled_flex()(q_BHND, k_BGND, v_BGND, block_mask=block_mask, scale=scale, enable_gqa=True)
    keep_BHNN = keep_BHQK.repeat_interleave(block_size, -2)[..., :N, :].repeat_interleave(block_size, -1)[..., :N]
    causal_NN = torch.ones(N, N, dtype=torch.bool, device=q_BHND.device).tril()
    return F.scaled_dot_product_attention(q_BHND, k_BGND, v_BGND, attn_mask=keep_BHNN & causal_NN, scale=scale,
                                          enable_gqa=True)


def block_recall(mass_BHQK: torch.Tensor, keep_BHQK: torch.Tensor) -> torch.Tensor:
    """Share of the total dense mass inside the kept blocks, per head: ``[B, H]`` float64.
    Every query carries mass 1, so it is the mean kept fraction over queries."""
    mass = mass_BHQK.double()
    return (mass * keep_BHQK).sum((-2, -1)) / mass.sum((-2, -1))


def recall_summary(recall_BH: torch.Tensor) -> dict:
    """Mean and min over every (batch, head) entry, as plain floats."""
    return {"mean": float(recall_BH.mean()), "min": float(recall_BH.min())}


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


def search_counts(config: SparseConfig, seq_len: int, device) -> torch.Tensor:
    """Blocks per query-block row of the uniform split at ``seq_len`` (``[nb]`` int64), by
    :func:`~sa_compile.selection.row_counts`. The search keeps exactly these; with
    ``search_head_budgets`` it spends the same total, shared between heads."""
    if config.patterns:
        raise ValueError("the oracle model follows one budget for every head: use a config without patterns")
    nb = num_blocks(seq_len, config.block_size)
    return row_counts(blocks_per_row(nb, config.density_at(nb), device), nb, device)


def oracle_keep_blocks(q_BHND, k_BGND, config: SparseConfig, scale: float) -> torch.Tensor:
    """The oracle's kept blocks, ``keep_BHQK``: per row, as many as the search keeps there,
    the ones of most true mass."""
    counts_BHQ = select_kept_blocks(q_BHND, k_BGND, config, scale).sum(-1)
    return oracle_keep(true_block_mass(q_BHND, k_BGND, config.block_size, scale), counts_BHQ)


def oracle_block_attention(q_BHND, k_BGND, v_BGND, config: SparseConfig, scale: float) -> torch.Tensor:
    """Causal attention restricted to the oracle's blocks, ``[B, H, N, D]``."""
    keep_BHQK = oracle_keep_blocks(q_BHND, k_BGND, config, scale)
    return kept_block_attention(q_BHND, k_BGND, v_BGND, keep_BHQK, config.block_size, scale)


def search_block_attention(q_BHND, k_BGND, v_BGND, config: SparseConfig, scale: float) -> torch.Tensor:
    """Causal attention restricted to the search's blocks (``select_kept_blocks``, the tensor
    code the compiled op runs), ``[B, H, N, D]``: the backend's answer without a compile."""
    keep_BHQK = select_kept_blocks(q_BHND, k_BGND, config, scale)
    return kept_block_attention(q_BHND, k_BGND, v_BGND, keep_BHQK, config.block_size, scale)


@contextlib.contextmanager
def block_attention(model, config: SparseConfig, blocks: str):
    """Within the block, ``model`` (a transformers Llama) attends through ``blocks``' choice.

    ``"oracle"``: in every layer, the blocks of most true mass of that layer's own q and k,
    at the search's per-row counts; its next-token fidelity bounds what a better search
    could give at that cost. ``"search"``: the backend's blocks, attended exactly, without a
    compile per config (for sweeps over many densities). Runs through transformers'
    attention interface, so the model code is untouched. Prefills start with no cache and
    no padding; a decode step (one query) is dense, as under the backend. Yields a dict
    counting the kept and causal blocks of every prefill (``kept_blocks / causal_blocks`` is
    the computed fraction, measured).
    """
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
