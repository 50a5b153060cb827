"""True attention mass per block, and the mass a template's ranking retains at every budget.

Used by calibration (``sa_compile.calibrate``), which runs once per model, offline: this
is a measurement with Python loops over query chunks, never the compiled hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .selection import rank_blocks


def true_block_mass(q_BHND: torch.Tensor, k_BGND: torch.Tensor, block_size: int, scale: float,
                    chunk_bytes: int = 2**28) -> torch.Tensor:
    """Dense causal softmax mass per block, ``[B, H, nb, nb]`` float32, summed over each block's
    queries (a row sums to its number of queries). Never N x N: one chunk of query rows at a
    time, each chunk's float32 logits within ``chunk_bytes``. GQA: query head ``h`` reads key
    head ``h // (H // G)``. Example::

        mass = true_block_mass(q, k, block_size=64, scale=q.shape[-1] ** -0.5)
    """
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    nb = -(-N // block_size)
    rows = max(block_size, chunk_bytes // (4 * B * H * N) // block_size * block_size)
    mass_BHQK = torch.zeros(B, H, nb, nb, dtype=torch.float32, device=q_BHND.device)
    for start in range(0, N, rows):
        end = min(start + rows, N)
        q_BHCD = q_BHND[:, :, start:end].float()
        C = end - start
        logits = torch.matmul(q_BHCD.reshape(B, G, (H // G) * C, D), k_BGND[:, :, :end].float().transpose(-1, -2))
        hidden_CM = torch.arange(end, device=q_BHND.device)[None, :] > torch.arange(start, end, device=q_BHND.device)[:, None]
        probs_BHCM = torch.softmax((logits.view(B, H, C, end) * scale).masked_fill(hidden_CM, float("-inf")), -1)
        nbk, nbq = -(-end // block_size), -(-C // block_size)
        per_key_BHCK = F.pad(probs_BHCM, (0, nbk * block_size - end)).unflatten(-1, (nbk, block_size)).sum(-1)
        per_key_BHCK = F.pad(per_key_BHCK, (0, 0, 0, nbq * block_size - C))
        qb = start // block_size
        mass_BHQK[:, :, qb : qb + nbq, :nbk] = per_key_BHCK.unflatten(-2, (nbq, block_size)).sum(-2)
    return mass_BHQK


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
