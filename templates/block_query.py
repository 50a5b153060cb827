"""Block-query template: each query block's mean query against every key.

The pooled template (:mod:`~sa_compile.templates.block_sparse`) also scores every query
block, but against one mean key per key block, which averages a short peaked span (a few
retrieved tokens, a heavy column) away. Here the block's mean query meets every key
exactly; the softmax over keys, summed per key block, is the score. In log space that is a
logsumexp per key block, so no probability tensor is kept. Cost: ``(N / block) * N * D``
per head, ``1 / block`` of dense attention's FLOPs, and ``(N / block) * N`` logits.

Run ``python -m sa_compile.templates.block_query`` to draw the pattern on a planted input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._blocks import block_means, block_offsets_QK, logits_dtype


def block_query_scores(q_BHND: torch.Tensor, k_BGND: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Causal softmax of block-mean queries against every key, summed per key block, ``[B, H_q, nb, nb]``."""
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    dtype = logits_dtype(k_BGND.dtype)
    q_BHQD = block_means(q_BHND, block_size).to(dtype)
    nb = q_BHQD.shape[-2]
    logits = torch.matmul(q_BHQD.reshape(B, G, (H // G) * nb, D), k_BGND.to(dtype).transpose(-1, -2))
    # Keys past N (the short last block) pad with -inf: they hold no mass.
    logits_BHQN = F.pad(logits.view(B, H, nb, N).float() * scale, (0, nb * block_size - N), value=float("-inf"))
    lse_BHQK = torch.logsumexp(logits_BHQN.unflatten(-1, (nb, block_size)), dim=-1)
    causal_QK = block_offsets_QK(nb, q_BHND.device) >= 0
    return torch.softmax(lse_BHQK.masked_fill(~causal_QK, float("-inf")), dim=-1)


def _demo() -> None:
    from ._blocks import draw, planted_retrieval

    D, bs = 32, 32
    q, k = planted_retrieval(slice(150, 154), 2.0)
    scores = block_query_scores(q, k, bs, D**-0.5)[0, 0]
    print(f"block-query scores, N=512, block={bs} (queries from 384 retrieve keys 150-153):")
    print(draw(scores))


if __name__ == "__main__":
    _demo()
