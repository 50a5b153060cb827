"""Sparse pattern templates: pure tensor functions from q/k estimates to block scores.

Every template returns scores shaped ``[B, H_q, num_blocks, num_blocks]``, zero above the
block diagonal, each causal row summing to one, so templates can be compared and combined.
"""

from .block_sparse import pooled_block_scores
from .vertical_slash import last_q_attention, vertical_slash_block_scores, vertical_slash_scores

__all__ = [
    "last_q_attention",
    "pooled_block_scores",
    "vertical_slash_block_scores",
    "vertical_slash_scores",
]
