"""The sparse attention op that replaces causal SDPA: search, BlockMask, FlexAttention.

Data path for one call, all inside the compiled graph::

    q, k ──> templates (estimates.py; by default sampled queries against every key)
         ──> block scores [B, H, nb, nb] ──> ranked blocks and a budgeted count per row (selection.py)
         ──> BlockMask.from_kv_blocks (diagonal partial, the rest full) ──> FlexAttention
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from .config import PatternKind, SparseConfig
from .estimates import kind_scores
from .flex import causal_mask_mod, causal_valid_mask_mod, flex_attention_traced
from .selection import diagonal_only, keep_mask, select_block_lists, select_head_block_lists, tapered_density


def estimate_block_scores(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN=None):
    """Row-normalized block scores ``[B, H_q, nb, nb]`` from the configured template(s)
    (:data:`sa_compile.estimates.TEMPLATES`)."""
    return kind_scores([config.pattern], q_BHND, k_BGND, config, scale, kv_valid_BN)[config.pattern]


def head_kind_scores(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN, head_kinds) -> torch.Tensor:
    """Block scores ``[B, H, nb, nb]`` where head ``h`` is scored by the template ``head_kinds[h]``.

    Only the templates some head needs are computed, each once (``auto`` reuses the other
    two); a ``[H]`` kind index picks each head's scores with ``torch.where``, one select per
    kind present, never a loop over heads."""
    present = list(dict.fromkeys(PatternKind(kind) for kind in head_kinds))
    scores = kind_scores(present, q_BHND, k_BGND, config, scale, kv_valid_BN)
    kind_H11 = torch.tensor([present.index(PatternKind(kind)) for kind in head_kinds],
                            device=q_BHND.device)[:, None, None]
    scores_BHQK = scores[present[-1]]
    for index in range(len(present) - 2, -1, -1):
        scores_BHQK = torch.where(kind_H11 == index, scores[present[index]], scores_BHQK)
    return scores_BHQK


def search_blocks(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN=None, head_pattern=None):
    """The per-head pattern search: each row's kept blocks, as ``order_BHQK[..., :count_BHQ]``
    (diagonal first, then the sink, then by score; see :func:`select_block_lists`).

    ``head_pattern`` is one layer of a pattern table (:meth:`PatternTable.layer_fields`):
    per-head kinds and budgets replace ``config.pattern`` and ``config.density``."""
    if head_pattern is not None:
        return _search_with_table(q_BHND, k_BGND, config, scale, kv_valid_BN, **head_pattern)
    scores_BHQK = estimate_block_scores(q_BHND, k_BGND, config, scale, kv_valid_BN)
    taper_blocks = None if config.taper_from is None else config.taper_from / config.block_size
    density = tapered_density(config.density, taper_blocks, scores_BHQK.shape[-1], scores_BHQK.device)
    return select_block_lists(scores_BHQK, density, config.search_head_budgets)


def _search_with_table(q_BHND, k_BGND, config, scale, kv_valid_BN, head_kinds, head_densities,
                       reference_blocks: int, taper: bool):
    if len(head_kinds) != q_BHND.shape[1]:
        raise ValueError(f"pattern table row has {len(head_kinds)} heads, the attention has {q_BHND.shape[1]}")
    scores_BHQK = head_kind_scores(q_BHND, k_BGND, config, scale, kv_valid_BN, head_kinds)
    density_H = torch.tensor(head_densities, dtype=torch.float64, device=q_BHND.device)
    if taper:
        density_H = density_H * tapered_density(1.0, reference_blocks, scores_BHQK.shape[-1], q_BHND.device)
    return select_head_block_lists(scores_BHQK, density_H)


def select_kept_blocks(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN=None, head_pattern=None):
    """:func:`search_blocks` as a boolean grid ``keep_BHQK`` (for tests and inspection)."""
    return keep_mask(*search_blocks(q_BHND, k_BGND, config, scale, kv_valid_BN, head_pattern))


def diagonal_last(order_BHQK: torch.Tensor, count_BHQ: torch.Tensor) -> torch.Tensor:
    """The ranked lists with each row's diagonal moved from the front to its last kept slot.

    The CUDA FlexAttention kernel stops a row after ``ceil(N / BLOCK_N)`` kernel tiles, which
    is right only when a block reaching past ``N`` comes last in the list. The one such block
    is the last row's diagonal, so a list that keeps it must end with it.
    """
    slot_K = torch.arange(order_BHQK.shape[-1], device=order_BHQK.device, dtype=count_BHQ.dtype)
    last_BHQ1 = count_BHQ[..., None] - 1
    # Slots before the last kept one take their successor, the last kept one the diagonal
    # (slot 0); the unkept tail stays put, so each row is still a permutation.
    source_BHQK = torch.where(slot_K < last_BHQ1, slot_K + 1, torch.where(slot_K == last_BHQ1, 0, slot_K))
    return order_BHQK.gather(-1, source_BHQK.long())


def build_block_mask(order_BHQK, count_BHQ, block_size: int, seq_len, kv_valid_BN=None):
    """BlockMask over the kept blocks, straight from the ranked block lists.

    The diagonal block is partial (the causal mask_mod runs in it); the other kept blocks
    are full. The lists need no compaction: the diagonal ranks first, so a row's full
    blocks are ``order_BHQK[..., 1:count_BHQ]``. With key padding every kept block is
    partial, which the mask_mod makes exact; the diagonal then goes last in its row's list
    (see :func:`diagonal_last`). Returns the mask and the tensors its mask_mod reads.
    """
    B, H, nb, _ = order_BHQK.shape
    order_BHQK = order_BHQK.to(torch.int32)
    count_BHQ = count_BHQ.to(torch.int32)
    if kv_valid_BN is None:
        partial = diagonal_only(B, H, nb, order_BHQK.device)
        # Each list rotated left by one (its diagonal leaves the front). Row width stays nb: the
        # wrapped-around last column lies past every row's count. A gather, not a cat: a cat's
        # index wrapper met an index Max in torch 2.11's loop merging and failed to compile.
        rotate_K = (torch.arange(nb, device=order_BHQK.device) + 1) % nb
        full = (count_BHQ - 1, order_BHQK[..., rotate_K])
        mask_mod, buffers = causal_mask_mod, ()
    else:
        partial = (count_BHQ, diagonal_last(order_BHQK, count_BHQ))
        # A distinct index buffer: Inductor's CPU FlexAttention template fails to compile
        # when one tensor is passed as two of its index inputs.
        full = (torch.zeros_like(count_BHQ), torch.zeros_like(order_BHQK))
        mask_mod, buffers = causal_valid_mask_mod, (kv_valid_BN,)
    block_mask = BlockMask.from_kv_blocks(
        *partial, *full, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(seq_len, seq_len),
        compute_q_blocks=False,  # the backward-only transpose; it also trips Inductor under dynamic shapes
    )
    return block_mask, buffers


def sparse_attention(q_BHND, k_BGND, v_BGND, config: SparseConfig, scale=None, kv_valid_BN=None, return_keep=False,
                     head_pattern=None):
    """Causal attention over a per-head, per-input block pattern chosen toward ``config.density``.

    ``k``/``v`` may carry fewer heads than ``q`` (GQA). ``kv_valid_BN`` (nonzero = real
    token) marks key padding. Must run under ``torch.compile``. With ``return_keep`` it also
    returns the kept blocks as a boolean grid ``keep_BHQK``. ``head_pattern``: see
    :func:`search_blocks`. Example::

        attn = torch.compile(sparse_attention)
        out = attn(q, k, v, SparseConfig(density=0.1, block_size=64))
    """
    N, D = q_BHND.shape[-2:]
    scale = D**-0.5 if scale is None else scale
    order_BHQK, count_BHQ = search_blocks(q_BHND, k_BGND, config, scale, kv_valid_BN, head_pattern)
    block_mask, buffers = build_block_mask(order_BHQK, count_BHQ, config.block_size, N, kv_valid_BN)
    out = flex_attention_traced(q_BHND, k_BGND, v_BGND, block_mask, scale, buffers)
    return (out, keep_mask(order_BHQK, count_BHQ)) if return_keep else out


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


def rewritten_sdpa(q_BHND, k_BGND, v_BGND, kv_valid_BN, scale, head_pattern=None, **config_fields):
    """What the graph pass puts in place of a causal self-attention SDPA node.

    ``config_fields`` are ``SparseConfig.describe()`` and ``head_pattern`` the layer's row
    of a pattern table (or ``None``): plain literals, so the rewritten graph prints as valid
    code and caches by value (a changed table changes the graph). Prompts shorter than
    ``min_seq_len`` take dense SDPA. The graph pass already keeps SDPA for them (with
    dynamic shapes, behind a guard on the sequence length), so that they count as skipped,
    not rewritten; the test here serves direct callers.
    """
    config = SparseConfig.from_fields(config_fields)
    N, D = q_BHND.shape[-2:]
    if N < config.min_seq_len:
        return dense_causal_attention(q_BHND, k_BGND, v_BGND, scale, kv_valid_BN)
    if scale is not None and not isinstance(scale, (int, float)):
        # A scale only known at run time (a traced module attribute): fold it into q so
        # the kernel keeps a constant scale; multiplying by exactly 1.0 changes nothing.
        q_BHND = q_BHND * (scale * math.sqrt(D))
        scale = None
    return sparse_attention(q_BHND, k_BGND, v_BGND, config, scale, kv_valid_BN, head_pattern=head_pattern)
