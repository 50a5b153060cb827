"""Strided-query template: the exact attention of every ``stride``-th query, summed per block.

The other templates blur what a block's queries do: pooled means stand for a block's
queries or keys, and the last queries see only their own rows. Here a sample of real
queries, ``block_size / stride`` per query block at the offsets ``stride - 1, 2 * stride - 1,
..., block_size - 1`` (so each block's last row, which sees every key the block sees, is one
of them), attends exactly: a causal softmax over every key, summed per key block and over the
block's samples. That is the true block mass of the sampled rows, so the estimate approaches
the oracle's as ``stride`` falls. Cost: ``1 / stride`` of dense ``Q K^T``, so ``1 / (2 stride)``
of dense attention's FLOPs.

Never ``N x N`` nor ``(N / stride) x N``: ``sa_compile::strided_block_mass`` is a custom op
that walks the query blocks in chunks (plain torch, any device), or on CUDA runs one fused
Triton kernel (:mod:`~sa_compile.templates._strided_triton`) that keeps the logits on chip.

Run ``python -m sa_compile.templates.strided_query`` to draw the pattern on a planted input.
"""

from __future__ import annotations

import torch

from ._blocks import normalize_causal_rows, num_blocks
from ._fallback import kernel_or_reference

_CHUNK_BYTES = 1 << 28  # float32 logits per chunk of the torch path


def sample_positions(num_blocks_, block_size: int, stride: int, device) -> torch.Tensor:
    """Token positions ``[nb, R]`` of the sampled queries, ``R = block_size // stride`` per block."""
    offsets_R = torch.arange(stride - 1, block_size, stride, device=device)
    return torch.arange(num_blocks_, device=device)[:, None] * block_size + offsets_R


def _chunk_mass(q_BHND, k_BGND, kv_valid_BN, blocks: range, block_size: int, stride: int,
                scale: float) -> torch.Tensor:
    """Block mass ``[B, H, C, nbk]`` of query blocks ``blocks`` (their samples' probabilities
    summed per key block; keys past the chunk's last query are never visible)."""
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    pos_CR = sample_positions(blocks.stop, block_size, stride, q_BHND.device)[blocks.start:]
    C, R = pos_CR.shape
    sampled_CR = pos_CR < N  # the short last block has fewer samples
    end = min(blocks.stop * block_size, N)
    q_BHXD = q_BHND[:, :, pos_CR.clamp(max=N - 1).flatten()].float() * scale
    logits = torch.matmul(q_BHXD.reshape(B, G, (H // G) * C * R, D), k_BGND[:, :, :end].float().transpose(-1, -2))
    logits_BHXM = logits.view(B, H, C * R, end)
    visible_XM = torch.arange(end, device=q_BHND.device)[None, :] <= pos_CR.flatten()[:, None]
    if kv_valid_BN is not None:
        visible_XM = visible_XM & (kv_valid_BN[:, None, None, :end] != 0)
    probs = torch.softmax(logits_BHXM.masked_fill(~visible_XM, float("-inf")), dim=-1).nan_to_num(0.0)
    nbk = num_blocks(end, block_size)
    probs = torch.nn.functional.pad(probs, (0, nbk * block_size - end))
    per_block_BHCRK = probs.unflatten(-1, (nbk, block_size)).sum(-1).view(B, H, C, R, nbk)
    return (per_block_BHCRK * sampled_CR[:, :, None]).sum(-2)


def strided_block_mass_reference(q_BHND, k_BGND, kv_valid_BN, block_size: int, stride: int, scale: float,
                                 chunk_bytes: int = _CHUNK_BYTES) -> torch.Tensor:
    """The sampled queries' causal attention mass per block, ``[B, H, nb, nb]`` float32, one
    chunk of query blocks at a time (each chunk's float32 logits within ``chunk_bytes``)."""
    B, H, N, _ = q_BHND.shape
    nb = num_blocks(N, block_size)
    mass_BHQK = q_BHND.new_zeros(B, H, nb, nb, dtype=torch.float32)
    per_block = B * H * (block_size // stride) * N * 4
    step = max(1, chunk_bytes // per_block)
    for start in range(0, nb, step):
        blocks = range(start, min(start + step, nb))
        chunk_BHCK = _chunk_mass(q_BHND, k_BGND, kv_valid_BN, blocks, block_size, stride, scale)
        mass_BHQK[:, :, blocks.start:blocks.stop, :chunk_BHCK.shape[-1]] = chunk_BHCK
    return mass_BHQK


@torch.library.custom_op("sa_compile::strided_block_mass", mutates_args=())
def strided_block_mass(q_BHND: torch.Tensor, k_BGND: torch.Tensor, kv_valid_BN: torch.Tensor | None,
                       block_size: int, stride: int, scale: float) -> torch.Tensor:
    """Block mass of the sampled queries, ``[B, H_q, nb, nb]`` float32 (one op in the graph:
    its chunks or its kernel never show the compiler an ``N``-wide tensor)."""
    args = (q_BHND, k_BGND, kv_valid_BN, block_size, stride, scale)
    if not q_BHND.is_cuda:
        return strided_block_mass_reference(*args)
    from ._strided_triton import strided_block_mass_cuda

    return kernel_or_reference("strided_block_mass", launch_key(q_BHND, k_BGND, block_size, stride),
                               lambda: strided_block_mass_cuda(*args), lambda: strided_block_mass_reference(*args))


def launch_key(q_BHND, k_BGND, block_size: int, stride: int) -> tuple[str, ...]:
    """What decides whether a sampled-query kernel's launch fits a device: its rows and widths."""
    H, D = q_BHND.shape[1], q_BHND.shape[-1]
    return (f"head dim {D}", f"{H // k_BGND.shape[1]} heads per group", f"{block_size // stride} samples per block",
            str(q_BHND.dtype))


@strided_block_mass.register_fake
def _(q_BHND, k_BGND, kv_valid_BN, block_size, stride, scale):
    B, H, N, _ = q_BHND.shape
    nb = num_blocks(N, block_size)
    return q_BHND.new_empty(B, H, nb, nb, dtype=torch.float32)


def strided_query_scores(q_BHND: torch.Tensor, k_BGND: torch.Tensor, block_size: int, stride: int, scale: float,
                         kv_valid_BN: torch.Tensor | None = None) -> torch.Tensor:
    """Block scores ``[B, H_q, nb, nb]``: the sampled queries' mass per block, rows summing to one."""
    mass_BHQK = strided_block_mass(q_BHND, k_BGND, kv_valid_BN, block_size, stride, float(scale))
    return normalize_causal_rows(mass_BHQK.nan_to_num(0.0))


def _demo() -> None:
    from ._blocks import draw, planted_retrieval

    D, bs = 32, 32
    q, k = planted_retrieval(slice(150, 154), 2.0)
    scores = strided_query_scores(q, k, bs, 8, D**-0.5)[0, 0]
    print(f"strided-query scores (stride 8), N=512, block={bs} (queries from 384 retrieve keys 150-153):")
    print(draw(scores))


if __name__ == "__main__":
    _demo()
