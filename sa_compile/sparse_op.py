"""The sparse attention op that replaces causal SDPA: search, BlockMask, FlexAttention.

Data path for one call, all inside the compiled graph::

    q, k ──> templates (vertical-slash from the last queries, pooled block scores)
         ──> block scores [B, H, nb, nb] ──> budgeted top blocks per row (selection.py)
         ──> BlockMask.from_kv_blocks (diagonal partial, the rest full) ──> FlexAttention
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx.experimental.symbolic_shapes
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from sa_compile.templates.block_sparse import pooled_block_scores
from sa_compile.templates.vertical_slash import last_q_attention, vertical_slash_block_scores

from ._log import log_once
from .config import PatternKind, SparseConfig
from .flex import causal_mask_mod, causal_valid_mask_mod, flex_attention_traced
from .selection import compact, diagonal_only, select_blocks


# Devices where the sparse path is specialized to each sequence length (see rewritten_sdpa).
STATIC_LENGTH_DEVICES = {"cuda"}


def estimate_block_scores(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN=None):
    """Row-normalized block scores ``[B, H_q, nb, nb]`` from the configured template(s)."""
    scores = []
    if config.pattern in (PatternKind.VERTICAL_SLASH, PatternKind.AUTO):
        attn_BHLN = last_q_attention(q_BHND, k_BGND, config.last_q, scale, kv_valid_BN)
        scores.append(vertical_slash_block_scores(attn_BHLN, config.block_size))
    if config.pattern in (PatternKind.BLOCK_SPARSE, PatternKind.AUTO):
        scores.append(pooled_block_scores(q_BHND, k_BGND, config.block_size, scale))
    return scores[0] if len(scores) == 1 else torch.maximum(scores[0], scores[1])


def select_kept_blocks(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN=None):
    """The per-head pattern search: which blocks of the causal grid get computed."""
    scores_BHQK = estimate_block_scores(q_BHND, k_BGND, config, scale, kv_valid_BN)
    return select_blocks(scores_BHQK, config.density, config.search_head_budgets)


def build_block_mask(keep_BHQK, block_size: int, seq_len, kv_valid_BN=None):
    """BlockMask over the kept blocks, built from indices (never an N x N evaluation).

    Off-diagonal kept blocks are full (no mask_mod); the diagonal block, and with key
    padding any block holding a padded key, is partial and gets the causal mask_mod.
    Returns the mask and the tensors its mask_mod reads.
    """
    B, H, nb, _ = keep_BHQK.shape
    idx = torch.arange(nb, device=keep_BHQK.device)
    off_diagonal_QK = idx[:, None] != idx[None, :]
    full_BHQK = keep_BHQK & off_diagonal_QK
    if kv_valid_BN is None:
        partial = diagonal_only(B, H, nb, keep_BHQK.device)
        mask_mod, buffers = causal_mask_mod, ()
    else:
        valid_BN = F.pad((kv_valid_BN != 0).to(torch.int8), (0, nb * block_size - seq_len), value=1)
        block_valid_BK = valid_BN.unflatten(-1, (nb, block_size)).amin(-1).bool()
        full_BHQK = full_BHQK & block_valid_BK[:, None, None, :]
        partial = compact(keep_BHQK & ~full_BHQK)
        mask_mod, buffers = causal_valid_mask_mod, (kv_valid_BN,)
    block_mask = BlockMask.from_kv_blocks(
        *partial, *compact(full_BHQK), BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(seq_len, seq_len),
        compute_q_blocks=False,  # the backward-only transpose; it also trips Inductor under dynamic shapes
    )
    return block_mask, buffers


def sparse_attention(q_BHND, k_BGND, v_BGND, config: SparseConfig, scale=None, kv_valid_BN=None, return_keep=False):
    """Causal attention over a per-head, per-input block pattern chosen toward ``config.density``.

    ``k``/``v`` may carry fewer heads than ``q`` (GQA). ``kv_valid_BN`` (nonzero = real
    token) marks key padding. Must run under ``torch.compile``. Example::

        attn = torch.compile(sparse_attention)
        out = attn(q, k, v, SparseConfig(density=0.1, block_size=64))
    """
    N, D = q_BHND.shape[-2:]
    scale = D**-0.5 if scale is None else scale
    keep_BHQK = select_kept_blocks(q_BHND, k_BGND, config, scale, kv_valid_BN)
    block_mask, buffers = build_block_mask(keep_BHQK, config.block_size, N, kv_valid_BN)
    out = flex_attention_traced(q_BHND, k_BGND, v_BGND, block_mask, scale, buffers)
    return (out, keep_BHQK) if return_keep else out


def dense_causal_attention(q_BHND, k_BGND, v_BGND, scale=None, kv_valid_BN=None):
    """Dense SDPA with the same semantics: causal, optional key padding, GQA."""
    if kv_valid_BN is None:
        return F.scaled_dot_product_attention(q_BHND, k_BGND, v_BGND, is_causal=True, scale=scale,
                                              enable_gqa=True)
    N = q_BHND.shape[-2]
    causal_NN = torch.ones(N, N, dtype=torch.bool, device=q_BHND.device).tril()
    mask_B1NN = causal_NN & (kv_valid_BN != 0)[:, None, None, :]
    return F.scaled_dot_product_attention(q_BHND, k_BGND, v_BGND, attn_mask=mask_B1NN, scale=scale,
                                          enable_gqa=True)


def rewritten_sdpa(q_BHND, k_BGND, v_BGND, kv_valid_BN, scale, **config_fields):
    """What the graph pass puts in place of a causal self-attention SDPA node.

    ``config_fields`` are ``SparseConfig.describe()``: plain literals, so the rewritten
    graph prints as valid code and caches by value. Prompts shorter than ``min_seq_len``
    take dense SDPA; with dynamic shapes that test becomes a guard on the sequence length.
    """
    config = SparseConfig.from_fields(config_fields)
    N, D = q_BHND.shape[-2:]
    if N < config.min_seq_len:
        return dense_causal_attention(q_BHND, k_BGND, v_BGND, scale, kv_valid_BN)
    if q_BHND.device.type in STATIC_LENGTH_DEVICES and not isinstance(N, int):
        # Inductor's Triton codegen fails on the sparse path with a symbolic length
        # (CantSplit on ((N + 127)//128)**2 // ((N + 127)//128), torch 2.11, H100), so pin the
        # length: each new long prompt length compiles once instead of failing.
        log_once(logging.INFO, "sparse path compiled for one sequence length at a time on %s", q_BHND.device.type)
        torch.fx.experimental.symbolic_shapes.guard_int(N)
    if scale is not None and not isinstance(scale, (int, float)):
        # A scale only known at run time (a traced module attribute): fold it into q so
        # the kernel keeps a constant scale; multiplying by exactly 1.0 changes nothing.
        q_BHND = q_BHND * (scale * math.sqrt(D))
        scale = None
    return sparse_attention(q_BHND, k_BGND, v_BGND, config, scale, kv_valid_BN)
