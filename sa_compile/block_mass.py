"""True attention mass per block, and the mass a template's ranking retains at every budget.

Used by calibration (``sa_compile.calibrate``), which runs once per model, offline, and by
the slow references (:mod:`sa_compile.reference`): a measurement with Python loops over query
chunks, never the compiled hot path.
"""

from __future__ import annotations

import torch

from sa_compile.templates.strided_query import strided_block_mass_reference

from .selection import rank_blocks


def true_block_mass(q_BHND: torch.Tensor, k_BGND: torch.Tensor, block_size: int, scale: float,
                    chunk_bytes: int = 2**30) -> torch.Tensor:
    """Dense causal softmax mass per block, ``[B, H, nb, nb]`` float32, summed over each block's
    queries (a row sums to its number of queries). Never N x N: one chunk of query blocks at a
    time, each chunk's float32 logits within ``chunk_bytes`` (1 GiB by default: few launches
    at 64K on a GPU). GQA: query head ``h`` reads key
    head ``h // (H // G)``. It is the strided-query template's mass with every query sampled
    (stride 1). Example::

        mass = true_block_mass(q, k, block_size=64, scale=q.shape[-1] ** -0.5)
    """
    return strided_block_mass_reference(q_BHND, k_BGND, None, block_size, 1, scale, chunk_bytes)


def retained_by_budget(mass_BHQK: torch.Tensor, scores_BHQK: torch.Tensor) -> torch.Tensor:
    """True mass kept when every row keeps its first ``min(K, qb + 1)`` blocks in the order
    the op ranks ``scores_BHQK`` (diagonal, sink, then by score), for every ``K`` in 1..nb.

    Returns ``[H, nb]`` float64 summed over the batch: entry ``[h, K - 1]``. Blocks above the
    diagonal carry no mass and rank last, so a row's running sum past its last causal block
    stays flat, and the sum over rows of column ``K - 1`` is exactly the kept mass.
    """
    order_BHQK, _ = rank_blocks(scores_BHQK.expand_as(mass_BHQK))
    ranked_BHQK = mass_BHQK.double().gather(-1, order_BHQK)
    return ranked_BHQK.cumsum(-1).sum(-2).sum(0)
