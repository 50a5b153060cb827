"""Block-sparse template: block-pooled queries against block-pooled keys.

Mean-pooling the queries and keys of each block and taking their softmax attention gives a
cheap estimate of every block's mass, for every query block rather than only the last ones.
It sees structure that is neither a column nor a diagonal, such as a span that one region
of the prompt retrieves. Cost: ``(N / block)^2 * D`` per head.

Run ``python -m sa_compile.templates.block_sparse`` to draw the pattern on a planted input.
"""

from __future__ import annotations

import torch

from ._blocks import block_means, block_offsets_QK


def pooled_block_scores(q_BHND: torch.Tensor, k_BGND: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Causal softmax of pooled-query x pooled-key logits, ``[B, H_q, nb, nb]``."""
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    q_BHQD = block_means(q_BHND, block_size)
    k_BGKD = block_means(k_BGND, block_size)
    nb = q_BHQD.shape[-2]
    logits = torch.matmul(q_BHQD.reshape(B, G, (H // G) * nb, D), k_BGKD.transpose(-1, -2))
    logits_BHQK = logits.view(B, H, nb, nb) * scale
    causal_QK = block_offsets_QK(nb, q_BHND.device) >= 0
    return torch.softmax(logits_BHQK.masked_fill(~causal_QK, float("-inf")), dim=-1)


def _demo() -> None:
    from ._blocks import draw, planted_retrieval

    D, bs = 32, 32
    q, k = planted_retrieval(slice(128, 192), 1.0)
    scores = pooled_block_scores(q, k, bs, D**-0.5)[0, 0]
    print(f"block-sparse (pooled) scores, N=512, block={bs} (queries from 384 retrieve keys 128-191):")
    print(draw(scores))


if __name__ == "__main__":
    _demo()
