"""Vertical-slash template: column mass and diagonal mass seen by the last queries.

Attention in long-context LLMs concentrates on a few key columns (attention sinks, heavy
tokens) and a few diagonals (the local window, periodic structure). Both show up in the
attention of the last ``last_q`` queries, which is cheap to compute exactly: vertical mass
is the column sum, slash mass the sum along each diagonal ``q - k = d``. Spread over the
block grid, they score every causal block.

Run ``python -m sa_compile.templates.vertical_slash`` to draw the pattern on a planted input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._blocks import block_means, block_offsets_QK, logits_dtype, normalize_causal_rows, num_blocks, pad_to_blocks


def last_q_attention(q_BHND: torch.Tensor, k_BGND: torch.Tensor, last_q: int, scale: float,
                     kv_valid_BN: torch.Tensor | None = None) -> torch.Tensor:
    """Exact causal softmax attention of the last ``last_q`` queries, in float32 (float16
    logits too, see :func:`~sa_compile.templates._blocks.logits_dtype`).

    ``k`` may have fewer heads than ``q`` (grouped-query attention); query head ``h``
    reads key head ``h // (H_q // H_kv)``. Keys where ``kv_valid_BN`` is zero are masked.
    Returns ``attn_BHLN``; a query that sees no valid key gets an all-zero row.
    """
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    q_BHLD = q_BHND[:, :, -last_q:, :]
    L = q_BHLD.shape[2]
    dtype = logits_dtype(q_BHND.dtype)
    q_BGXD = q_BHLD.reshape(B, G, (H // G) * L, D).to(dtype)
    logits_BHLN = torch.matmul(q_BGXD, k_BGND.to(dtype).transpose(-1, -2)).view(B, H, L, N).float() * scale
    q_pos_L = torch.arange(L, device=q_BHND.device) + (N - L)
    visible_LN = torch.arange(N, device=q_BHND.device)[None, :] <= q_pos_L[:, None]
    visible = visible_LN if kv_valid_BN is None else visible_LN & (kv_valid_BN != 0)[:, None, None, :]
    attn_BHLN = torch.softmax(logits_BHLN.masked_fill(~visible, float("-inf")), dim=-1)
    return attn_BHLN if kv_valid_BN is None else attn_BHLN.nan_to_num(0.0)


def vertical_slash_scores(attn_BHLN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mass ``vertical_BHN[k]`` and diagonal mass ``slash_BHN[d]`` (d = q - k).

    Query ``i`` sits at position ``N - L + i``, so its diagonal ``d`` is key ``N - L + i - d``:
    a gather whose index is plain arithmetic, which the compiler folds into the reduction
    (no skewed copy of the attention is made).
    """
    L, N = attn_BHLN.shape[-2:]
    vertical_BHN = attn_BHLN.sum(-2)
    key_LN = (torch.arange(L, device=attn_BHLN.device) + (N - L))[:, None] - torch.arange(N, device=attn_BHLN.device)
    on_diagonal_BHLN = attn_BHLN.gather(-1, key_LN.clamp(min=0).expand_as(attn_BHLN))
    slash_BHN = torch.where(key_LN >= 0, on_diagonal_BHLN, 0.0).sum(-2)
    return vertical_BHN, slash_BHN


def row_vertical_mass(q_BHND: torch.Tensor, k_BGND: torch.Tensor, vertical_BHN: torch.Tensor, block_size: int,
                      scale: float) -> torch.Tensor:
    """Per query block, the share of attention its mean query gives each key block, ``[B, H, nb, nb]``.

    The last queries' column mass is the same for every row: a span only they look up would
    be kept in every row. Here each query block's mean query scores the keys itself, exactly
    on the ``nb`` heaviest columns by ``vertical_BHN`` (where sinks and heavy tokens show up)
    and through each key block's mean key, standing for its tokens, everywhere. Per head that
    is ``nb x 2nb`` logits; the candidates' keys are gathered, never expanded to every head.
    Key padding is not masked here: it can only move the ranking, and the kernel's mask_mod
    excludes padded keys whatever is kept.
    """
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    q_BHQD = block_means(q_BHND, block_size)
    nb = q_BHQD.shape[-2]
    idx_K = torch.arange(nb, device=q_BHND.device)
    # Block-mean keys, each standing for block_size tokens (a short last block is only ever
    # a diagonal, which the selection keeps anyway).
    pooled = torch.matmul(q_BHQD.reshape(B, G, (H // G) * nb, D), block_means(k_BGND, block_size).transpose(-1, -2))
    pooled_BHQK = (pooled.view(B, H, nb, nb) * scale + math.log(block_size)).masked_fill(
        idx_K[None, :] > idx_K[:, None], float("-inf"))
    column_BHJ = vertical_BHN.topk(nb, dim=-1).indices
    row_of_head_H1 = (torch.arange(H, device=q_BHND.device) // (H // G) * N)[:, None]
    flat_BX = (column_BHJ + row_of_head_H1).reshape(B, H * nb, 1).expand(B, H * nb, D)
    k_BHJD = k_BGND.reshape(B, G * N, D).gather(1, flat_BX).view(B, H, nb, D).float()
    exact_BHQJ = (torch.matmul(q_BHQD, k_BHJD.transpose(-1, -2)) * scale).masked_fill(
        column_BHJ[:, :, None, :] // block_size > idx_K[:, None], float("-inf"))
    probs = torch.softmax(torch.cat([pooled_BHQK, exact_BHQJ], -1), dim=-1)
    into_block_BHQJ = (column_BHJ // block_size)[:, :, None, :].expand(B, H, nb, nb)
    return probs[..., :nb].scatter_add(-1, into_block_BHQJ, probs[..., nb:])


def vertical_slash_block_scores(attn_BHLN: torch.Tensor, block_size: int, q_BHND=None, k_BGND=None,
                                scale: float | None = None) -> torch.Tensor:
    """Score every causal block as its column mass plus the diagonal mass crossing it.

    With ``q`` and ``k`` (and ``scale``) the column mass is row-aware
    (:func:`row_vertical_mass`, scaled to the last queries' total); without, every row
    shares the last queries' column mass.
    """
    vertical_BHN, slash_BHN = vertical_slash_scores(attn_BHLN)
    nb = num_blocks(attn_BHLN.shape[-1], block_size)
    if q_BHND is None:
        vertical_BHK = pad_to_blocks(vertical_BHN, block_size).unflatten(-1, (nb, block_size)).sum(-1)[..., None, :]
    else:
        rows = attn_BHLN.shape[-2]
        vertical_BHK = row_vertical_mass(q_BHND, k_BGND, vertical_BHN, block_size, scale) * rows
    # A diagonal at offset d crosses the block pair at block offset o (= qb - kb) when
    # |d - o*bs| < bs, covering a fraction (bs - |d - o*bs|) / bs of that block's rows: a
    # triangular filter.
    pieces_BHOR = pad_to_blocks(slash_BHN, block_size).unflatten(-1, (nb, block_size))
    ramp_R = torch.arange(block_size, device=attn_BHLN.device, dtype=attn_BHLN.dtype) / block_size
    falling_BHO = (pieces_BHOR * (1.0 - ramp_R)).sum(-1)
    rising_BHO = (pieces_BHOR * ramp_R).sum(-1)
    slash_BHO = falling_BHO + F.pad(rising_BHO, (1, 0))[..., :nb]
    offsets_QK = block_offsets_QK(nb, attn_BHLN.device)
    scores_BHQK = vertical_BHK + slash_BHO[..., offsets_QK.clamp(min=0)]
    return normalize_causal_rows(scores_BHQK)


def _demo() -> None:
    from ._blocks import draw

    torch.manual_seed(0)
    N, D, bs = 512, 32, 32
    q = torch.randn(1, 1, N, D) * 0.3
    k = torch.randn(1, 1, N, D) * 0.3
    shared = torch.randn(D)
    q += shared  # every query shares a direction ...
    k[..., 0, :] = shared * 0.6  # ... that an attention sink
    k[..., 300, :] = shared * 0.5  # ... and a heavy column answer
    attn = last_q_attention(q, k, last_q=64, scale=D**-0.5)
    scores = vertical_slash_block_scores(attn, bs)[0, 0]
    print(f"vertical-slash block scores, N={N}, block={bs} (sink at 0, heavy column at 300):")
    print(draw(scores))


if __name__ == "__main__":
    _demo()
