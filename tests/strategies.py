"""Hypothesis strategies shared by the property tests: shapes, dtypes and adversarial inputs.

Tensors are built from a drawn seed (cheap to shrink); the strategies draw only small
choices. The core properties run at least :data:`CORE_EXAMPLES` examples in every profile.
"""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st

# The CI profile's default is small (compile-heavy tests share it); the core properties
# (selection invariants, causality) take at least 25 there and the nightly count above it.
CORE_EXAMPLES = max(25, settings.default.max_examples)
core = settings(max_examples=CORE_EXAMPLES)

SPECIAL = (float("nan"), float("inf"), float("-inf"), 0.0)


@st.composite
def score_grids(draw, max_blocks: int = 24) -> torch.Tensor:
    """Block scores ``[B, H, nb, nb]`` with ties, zeros, huge values, NaN and +-inf sprinkled in."""
    batch, heads, nb = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, max_blocks))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = draw(st.sampled_from(["uniform", "ties", "zeros", "huge", "negative"]))
    scores = torch.rand(batch, heads, nb, nb, generator=gen)
    if base == "ties":
        scores = (scores * 3).floor()  # three levels: many ties per row
    elif base == "zeros":
        scores = torch.zeros_like(scores)
    elif base == "huge":
        scores = scores * 1e38
    elif base == "negative":
        scores = -scores
    special_fraction = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    where = torch.rand(scores.shape, generator=gen) < special_fraction
    picks = torch.tensor(SPECIAL)[torch.randint(len(SPECIAL), scores.shape, generator=gen)]
    return torch.where(where, picks, scores)


@st.composite
def attention_shapes(draw, block: int = 16, max_blocks: int = 5) -> dict:
    """Batch, query/KV heads, head dim and a length near a block boundary (odd ones too)."""
    kv_heads, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    blocks = draw(st.integers(1, max_blocks))
    offset = draw(st.sampled_from([-3, -1, 0, 1, 7]))
    return dict(batch=draw(st.integers(1, 2)), heads=kv_heads * group, kv_heads=kv_heads,
                head_dim=draw(st.sampled_from([16, 32, 64])), seq_len=max(1, blocks * block + offset))


def key_padding(pattern: str, batch: int, seq_len: int, seed: int) -> torch.Tensor | None:
    """A ``[B, N]`` key-validity mask (nonzero = real token, any nonzero value) or ``None``."""
    if pattern == "none":
        return None
    gen = torch.Generator().manual_seed(seed)
    valid = torch.randint(1, 5, (batch, seq_len), generator=gen)  # values other than 1 are valid too
    if pattern == "left":
        valid[:, : seq_len // 3] = 0
    elif pattern == "right":
        valid[:, seq_len - seq_len // 4:] = 0
    else:
        valid[torch.rand(batch, seq_len, generator=gen) < 0.3] = 0
    return valid
