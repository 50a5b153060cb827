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

from .config import SparseConfig
from .estimates import kind_name, kind_scores
from .flex import causal_mask_mod, causal_valid_mask_mod, flex_attention_traced
from .selection import (
    diagonal_only, keep_mask, select_block_lists, select_candidate_lists, select_head_block_lists, tapered_density,
)
from sa_compile.templates._blocks import all_valid_blocks, num_blocks
from sa_compile.templates.screened_query import screened_query_lists


def estimate_block_scores(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN=None):
    """Row-normalized block scores ``[B, H_q, nb, nb]`` from the configured template(s)
    (the registry, :mod:`sa_compile.estimates`)."""
    return kind_scores([config.pattern], q_BHND, k_BGND, config, scale, kv_valid_BN)[config.pattern]


def head_kind_scores(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN, head_kinds) -> torch.Tensor:
    """Block scores ``[B, H, nb, nb]`` where head ``h`` is scored by the template ``head_kinds[h]``.

    Only the templates some head needs are computed, each once (``auto`` reuses the other
    two); a ``[H]`` kind index picks each head's scores with ``torch.where``, one select per
    kind present, never a loop over heads."""
    present = list(dict.fromkeys(kind_name(kind) for kind in head_kinds))
    scores = kind_scores(present, q_BHND, k_BGND, config, scale, kv_valid_BN)
    kind_H11 = torch.tensor([present.index(kind_name(kind)) for kind in head_kinds],
                            device=q_BHND.device)[:, None, None]
    scores_BHQK = scores[present[-1]]
    for index in range(len(present) - 2, -1, -1):
        scores_BHQK = torch.where(kind_H11 == index, scores[present[index]], scores_BHQK)
    return scores_BHQK


def search_density(config: SparseConfig, num_blocks_, device):
    """The density the search spends at ``num_blocks_`` blocks per side: ``config.density``,
    tapered past ``taper_from`` (an in-graph 0-d tensor, see :func:`tapered_density`)."""
    taper_blocks = None if config.taper_from is None else config.taper_from / config.block_size
    return tapered_density(config.density, taper_blocks, num_blocks_, device)


def search_blocks(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN=None, head_pattern=None):
    """The per-head pattern search: each row's kept blocks, as ``order_BHQK[..., :count_BHQ]``
    (diagonal first, then the sink, then by score; see :func:`select_block_lists`). With a
    screened search (:meth:`SparseConfig.candidate_width`) the lists are as wide as the
    candidates, not the grid (:func:`select_candidate_lists`).

    ``head_pattern`` is one layer of a pattern table (:meth:`PatternTable.layer_fields`):
    per-head kinds and budgets replace ``config.pattern`` and ``config.density``."""
    if head_pattern is not None:
        return _search_with_table(q_BHND, k_BGND, config, scale, kv_valid_BN, **head_pattern)
    nb = num_blocks(q_BHND.shape[-2], config.block_size)
    density = search_density(config, nb, q_BHND.device)
    width = config.candidate_width()
    if width is not None:
        scores_BHQW, blocks_BHQW = screened_query_lists(q_BHND, k_BGND, config.block_size, config.query_stride,
                                                        scale, width, kv_valid_BN, config.int8_estimate,
                                                        config.sampled_screen_means)
        return select_candidate_lists(scores_BHQW, blocks_BHQW, nb, density)
    scores_BHQK = estimate_block_scores(q_BHND, k_BGND, config, scale, kv_valid_BN)
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


def build_block_mask(order_BHQW, count_BHQ, block_size: int, seq_len, kv_valid_BN=None):
    """BlockMask over the kept blocks, straight from the ranked block lists.

    The diagonal block is partial (the causal mask_mod runs in it); the other kept blocks
    are full. The lists need no compaction: the diagonal ranks first, so a row's full
    blocks are ``order_BHQW[..., 1:count_BHQ]``. With key padding the kept blocks split
    into full ones (every key valid) and partial ones (see :func:`split_by_valid_keys`).
    The lists may be narrower or wider than the grid (a screened search's candidates);
    both of the mask's index lists are made ``nb`` wide, one shape for both: torch 2.11's
    CUDA kernel reads the full list at the partial list's offsets (2.13 reads each at its
    own), and an illegal address or wrong rows follow from any other shape. Returns the mask
    and the tensors its mask_mod reads.
    """
    B, H, nb, W = order_BHQW.shape
    order_BHQW = order_BHQW.to(torch.int32)
    count_BHQ = count_BHQ.to(torch.int32)
    slot_K = torch.arange(nb, device=order_BHQW.device)
    if kv_valid_BN is None:
        partial = diagonal_only(B, H, nb, order_BHQW.device)
        # Each list rotated left by one (its diagonal leaves the front) and made nb wide: slot
        # s takes list slot s + 1, and slots past the list take slot 0, past every row's count.
        # A gather, not a cat: a cat's index wrapper met an index Max in torch 2.11's loop
        # merging and failed to compile.
        full = (count_BHQ - 1, order_BHQW[..., torch.where(slot_K + 1 < W, slot_K + 1, 0)])
        mask_mod, buffers = causal_mask_mod, ()
    else:
        partial, full = split_by_valid_keys(order_BHQW, count_BHQ, block_size, kv_valid_BN)
        mask_mod, buffers = causal_valid_mask_mod, (kv_valid_BN,)
    block_mask = BlockMask.from_kv_blocks(
        *partial, *full, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(seq_len, seq_len),
        compute_q_blocks=False,  # the backward-only transpose; it also trips Inductor under dynamic shapes
    )
    return block_mask, buffers


def stable_partition(values_BHQW: torch.Tensor, group_BHQW: torch.Tensor, groups: int) -> torch.Tensor:
    """``values_BHQW`` rearranged along its last dim by ``group_BHQW`` (integers in
    ``[0, groups)``): group 0 first, each group in its original order. A stable sort by group,
    done without one: an entry's place is the size of the groups before its own plus the count
    of its group's entries up to it (a running sum), and one scatter puts it there."""
    place = torch.zeros(group_BHQW.shape, dtype=torch.int64, device=group_BHQW.device)
    before = torch.zeros(*group_BHQW.shape[:-1], 1, dtype=torch.int64, device=group_BHQW.device)
    for g in range(groups):
        member = group_BHQW == g
        place = torch.where(member, before + member.cumsum(-1) - 1, place)
        before = before + member.sum(-1, keepdim=True)
    return torch.zeros_like(values_BHQW).scatter_(-1, place, values_BHQW)


def split_by_valid_keys(order_BHQW, count_BHQ, block_size: int, kv_valid_BN):
    """The kept blocks split, with key padding, into ``(partial, full)`` (count, indices) pairs,
    each list ``nb`` wide.

    A kept block below the diagonal whose keys are all valid runs full (no mask_mod), as
    without padding: a tokenizer's all-ones mask costs nothing. The diagonal and blocks with
    padded keys run partial, where the mask_mod makes them exact. Each list keeps the
    search's order (:func:`stable_partition`); the diagonal goes last in its partial list, because
    the CUDA FlexAttention kernel stops a row after ``ceil(N / BLOCK_N)`` tiles, which is
    right only when the one block reaching past ``N`` (the last row's diagonal) comes last.
    """
    nb, W = order_BHQW.shape[-2:]
    valid_BK = all_valid_blocks(kv_valid_BN, block_size)
    kept_BHQW = torch.arange(W, device=order_BHQW.device) < count_BHQ[..., None]
    diagonal_BHQW = order_BHQW == torch.arange(nb, device=order_BHQW.device, dtype=order_BHQW.dtype)[:, None]
    all_valid_BHQW = valid_BK[:, None, None, :].expand(-1, *order_BHQW.shape[1:3], -1).gather(-1, order_BHQW.long())
    full_BHQW = kept_BHQW & all_valid_BHQW & ~diagonal_BHQW
    # Groups, each list's entries in its search order: full blocks first (0) for the full list;
    # for the partial list the off-diagonal partial blocks (0), then the diagonal (1), then the rest (2).
    full_group = torch.where(full_BHQW, 0, 1)
    partial_group = torch.where(kept_BHQW & ~full_BHQW, torch.where(diagonal_BHQW, 1, 0), 2)
    # Both lists nb wide (see build_block_mask); no row keeps more than nb blocks.
    slot_K = torch.arange(nb, device=order_BHQW.device)
    to_grid_K = torch.where(slot_K < W, slot_K, 0)
    full_order = stable_partition(order_BHQW, full_group, 2)[..., to_grid_K]
    partial_order = stable_partition(order_BHQW, partial_group, 3)[..., to_grid_K]
    full_count = full_BHQW.sum(-1, dtype=torch.int32)
    return (count_BHQ - full_count, partial_order), (full_count, full_order)


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
