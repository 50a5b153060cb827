"""Attention cost model in sympy: FLOPs of the sparse kernel, of dense causal attention, and of
the pattern search, as functions of the sequence length and the pattern's parameters.

One multiply-add counts as 2 FLOPs. Per query head, a kept ``bs x bs`` block costs
``4 * bs**2 * D`` (``Q K^T`` and ``P V``). A row keeps ``min(K, qb + 1)`` blocks, so a
head computes ``K*nb - K*(K-1)/2`` blocks. Example::

    >>> cost = attention_cost(32768, SparseConfig(density=0.1, candidates=None), heads=32, head_dim=128)
    >>> round(cost["kernel_fraction"], 3), round(cost["search_fraction"], 4)
    (0.099, 0.0623)
"""

from __future__ import annotations

import math
import sys

import sympy

from .config import SparseConfig

N, BS, D, H, K, L, S, W = sympy.symbols("N block_size head_dim heads blocks_per_row last_q query_stride candidates",
                                        positive=True, integer=True)
NUM_BLOCKS = sympy.ceiling(N / BS)
KEPT_BLOCKS = K * NUM_BLOCKS - K * (K - 1) / 2  # per head, for K <= nb
KERNEL_FLOPS = 4 * BS**2 * D * H * KEPT_BLOCKS
DENSE_FLOPS = KERNEL_FLOPS.subs(K, NUM_BLOCKS)  # every causal block
# Each kind's search FLOPs come from its registry entry (:func:`sa_compile.estimates.search_flops`).
_BLOCK_SPARSE = 2 * NUM_BLOCKS**2 * D * H  # pooled queries against pooled keys
# The screened strided-query search (``SparseConfig.candidates``): the screen's three pooled
# matmuls (mean keys, and the bound's max and min keys), then the S-th queries of row qb
# against the keys of its min(W, qb + 1) candidate blocks, the blocks a row of the kernel's
# grid attends when it keeps W.
SCREENED_SEARCH_FLOPS = 3 * _BLOCK_SPARSE + 2 * (BS / S) * BS * D * H * KEPT_BLOCKS.subs(K, sympy.Min(W, NUM_BLOCKS))


def _values(seq_len: int, config: SparseConfig, heads: int, head_dim: int) -> dict:
    from .selection import blocks_per_row

    nb = math.ceil(seq_len / config.block_size)
    k = int(blocks_per_row(nb, config.density_at(nb), "cpu"))  # tapered past config.taper_from
    return {N: seq_len, BS: config.block_size, D: head_dim, H: heads, K: k, L: min(config.last_q, seq_len),
            S: config.query_stride, W: config.candidate_width() or nb}


def attention_cost(seq_len: int, config: SparseConfig, heads: int, head_dim: int) -> dict:
    """FLOPs of one attention layer at ``seq_len`` under ``config`` (uniform head budgets,
    tapered as the op tapers them; the search of ``config.pattern``)."""
    from .estimates import search_flops as kind_search_flops

    values = _values(seq_len, config, heads, head_dim)
    search_flops = (kind_search_flops(config.pattern, sys.modules[__name__]) if config.candidate_width() is None
                    else SCREENED_SEARCH_FLOPS)
    kernel, dense, search = (float(sympy.sympify(e).subs(values)) for e in (KERNEL_FLOPS, DENSE_FLOPS, search_flops))
    return {"kernel_flops": kernel, "dense_flops": dense, "search_flops": search,
            "kernel_fraction": kernel / dense, "search_fraction": search / dense}


def density_for_flop_budget(flop_budget: float, seq_len: int, config: SparseConfig, heads: int,
                            head_dim: int) -> float:
    """The ``density`` whose kernel plus search FLOPs fit ``flop_budget`` of dense attention.

    Raises ``ValueError`` when the search alone costs more than the budget.
    """
    cost = attention_cost(seq_len, config, heads, head_dim)
    density = flop_budget - cost["search_fraction"]
    if density <= 0:
        raise ValueError(
            f"flop_budget={flop_budget} is below the search's own cost at {seq_len} tokens "
            f"({cost['search_fraction']:.4f} of dense attention)"
        )
    return min(density, 1.0)
