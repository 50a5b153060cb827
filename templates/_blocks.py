"""Block-grid helpers shared by the templates."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def num_blocks(seq_len, block_size: int):
    """Blocks needed to cover ``seq_len`` tokens (works on SymInts)."""
    return (seq_len + block_size - 1) // block_size


def pad_to_blocks(x: torch.Tensor, block_size: int, dim: int = -1) -> torch.Tensor:
    """Zero-pad ``dim`` up to a multiple of ``block_size``."""
    length = x.shape[dim]
    extra = num_blocks(length, block_size) * block_size - length
    dim = dim % x.dim()
    pad = [0, 0] * (x.dim() - dim - 1) + [0, extra]
    return F.pad(x, pad)


def all_valid_blocks(kv_valid_BN: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per key block, whether every key of it is valid (``kv_valid_BN`` nonzero): ``[B, nb]`` bool.
    The positions past the prompt's end in the last block count as not valid."""
    return pad_to_blocks(kv_valid_BN != 0, block_size).view(kv_valid_BN.shape[0], -1, block_size).all(-1)


def block_means(x_BHND: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block of ``block_size`` rows (dim -2) in float32; the last block may be short."""
    N = x_BHND.shape[-2]
    nb = num_blocks(N, block_size)
    sums_BHKD = pad_to_blocks(x_BHND.float(), block_size, dim=-2).unflatten(-2, (nb, block_size)).sum(-2)
    counts_K = (N - torch.arange(nb, device=x_BHND.device) * block_size).clamp(max=block_size)
    return sums_BHKD / counts_K[:, None]


def logits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a template's estimate logits are computed in: float32 for float16 inputs.

    A float16 matmul overflows to inf once ``q.k`` passes 65504 (large-norm activations do),
    and a softmax over inf is NaN; bfloat16 and float32 share float32's range.
    """
    return torch.float32 if dtype == torch.float16 else dtype


INT8_LIMIT = 127  # int8 values run from -127 to 127: symmetric, so a sign flip stays exact


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` (its last dimension) as int8 and one float32 scale per row, ``x ~=
    x8 * scale``: the row's largest magnitude maps to 127, the others round to the nearest
    step (halves up, as the CUDA kernels round). A row of zeros gets scale 0; non-finite
    values count as 0, so the result is always finite."""
    xf = x.float().nan_to_num(0.0, 0.0, 0.0)
    scale = xf.abs().amax(-1) / INT8_LIMIT
    steps = torch.floor(torch.where(scale[..., None] > 0, xf / scale[..., None], 0.0) + 0.5)
    return steps.clamp(-INT8_LIMIT, INT8_LIMIT).to(torch.int8), scale


def dequantize_int8(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`quantize_int8`'s rows back in float32."""
    return x8.float() * scale[..., None]


def block_offsets_QK(num_blocks_, device) -> torch.Tensor:
    """``qb - kb`` for every (query block, key block) pair; negative above the diagonal."""
    idx = torch.arange(num_blocks_, device=device)
    return idx[:, None] - idx[None, :]


def normalize_causal_rows(scores_BHQK: torch.Tensor) -> torch.Tensor:
    """Zero the blocks above the diagonal and scale each row to sum to one."""
    causal_QK = block_offsets_QK(scores_BHQK.shape[-1], scores_BHQK.device) >= 0
    scores_BHQK = torch.where(causal_QK, scores_BHQK.clamp(min=0), 0.0)
    return scores_BHQK / scores_BHQK.sum(-1, keepdim=True).clamp(min=1e-30)


def planted_retrieval(keys: slice, strength: float, num_tokens: int = 512, head_dim: int = 32):
    """A demo input ``q, k`` (``[1, 1, N, D]``): small random vectors, where the last quarter of
    the queries shares a topic with the keys ``keys`` (added ``strength`` times), which they retrieve."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, num_tokens, head_dim) * 0.3
    k = torch.randn(1, 1, num_tokens, head_dim) * 0.3
    topic = torch.randn(head_dim)
    q[..., 3 * num_tokens // 4:, :] += topic
    k[..., keys, :] += strength * topic
    return q, k


def draw(scores_QK: torch.Tensor) -> str:
    """Render one head's block scores as text, each row scaled to its own peak."""
    shades = " .:-=+*#%@"
    lines = []
    for qb in range(scores_QK.shape[0]):
        peak = scores_QK[qb].max().clamp(min=1e-30)
        row = []
        for kb in range(scores_QK.shape[1]):
            if kb > qb:
                row.append(" ")
            else:
                level = float(scores_QK[qb, kb] / peak)
                row.append(shades[min(int(level * (len(shades) - 1) + 0.5), len(shades) - 1)])
        lines.append("".join(row))
    return "\n".join(lines)
