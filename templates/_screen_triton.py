"""The screened search's pooled screen as one fused Triton kernel (CUDA): ranking keys out.

The torch path (:func:`~sa_compile.templates.screened_query.screen_ranking_keys_reference`)
writes two ``[B, H, nb, nb]`` float32 logit grids (three float32 matmuls), two softmaxes, a
head sum and the ranking rules, each a pass over a quadratic tensor. Here one program takes
``BQ`` query blocks of one key/value head group, the rows of all the group's query heads at
once (``M = heads_per_group * BQ`` rows, so each key-block tile is read once for all of
them). Pass 1 walks the causal key blocks and keeps each row's running peak and total of
both softmaxes (mean logits and bound logits); pass 2 recomputes the logits, turns them into
probabilities, sums the heads and writes the row's ranking keys: the only quadratic tensor
that reaches memory. The dots run on the tensor cores in TF32 (float32 range, a 10-bit
mantissa); the screen only proposes candidates, which the exact strided sample then ranks.
Logits are in base 2 (queries prescaled by ``log2(e)``): ``exp2`` is the hardware's exponential.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._blocks import INT8_LIMIT
from ._strided_triton import _round_to_int8

# Rows per program (heads per group x query blocks), key blocks per tile, warps, stages. 64 rows
# of float32 queries and their bound operand fill ~200 KB of shared memory with two stages; 128
# rows do not fit (H100: 311 KB asked, 227 KB there). benchmarks/screen_kernel.py times other
# shapes (docs/results.md, "The fused screen"): 8 warps were faster at 32K (256 blocks), 4 warps
# faster from 64K (512 blocks: 0.14 against 0.19 ms queued) to 512K (H100), so grids of
# ``four_warps_from`` blocks and more take 4.
LAUNCH = {"rows": 64, "BK": 32, "num_warps": 8, "num_stages": 2, "four_warps_from": 512}


@triton.jit
def _screen_logits(q, qc, kmean_base, skk, kbound_base, sbk, kb, qb, nb, D: tl.constexpr, DP: tl.constexpr):
    """Mean and bound logits of the rows (``q``; ``qc`` = ``[relu(q) | min(q, 0)]``) against the
    key blocks ``kb``; ``-inf`` above each row's diagonal and past the last block."""
    d = tl.arange(0, DP)
    j = tl.arange(0, 2 * DP)
    in_range = kb < nb
    kmean = tl.load(kmean_base + kb[:, None] * skk + d[None, :], mask=in_range[:, None] & (d < D)[None, :],
                    other=0.0)
    # The bound's keys: [max | min] per dimension, D apart in memory, DP apart in the tile.
    kbound = tl.load(kbound_base + kb[:, None] * sbk + ((j // DP) * D + j % DP)[None, :],
                     mask=in_range[:, None] & ((j % DP) < D)[None, :], other=0.0)
    s_mean = tl.dot(q, tl.trans(kmean), input_precision="tf32")
    s_bound = tl.dot(qc, tl.trans(kbound), input_precision="tf32")
    causal = (kb[None, :] <= qb[:, None]) & in_range[None, :]
    return tl.where(causal, s_mean, float("-inf")), tl.where(causal, s_bound, float("-inf"))


@triton.jit
def _online_total(peak, total, s):
    """One tile's step of a running softmax peak and total per row (base 2)."""
    new_peak = tl.maximum(peak, tl.max(s, 1))
    total = total * tl.exp2(peak - new_peak) + tl.sum(tl.exp2(s - new_peak[:, None]), 1)
    return new_peak, total


@triton.jit
def _screen_keys_kernel(Q, KMEAN, KBOUND, OUT, sqb, sqg, sqx, skb, skg, skk, sbb, sbg, sbk, sob, sog, soq,
                        nb, n_cols, n_tiles, G, HG: tl.constexpr, HGP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                        D: tl.constexpr, DP: tl.constexpr):
    M: tl.constexpr = HGP * BQ
    tile = n_tiles - 1 - tl.program_id(0)  # the longest rows start first
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    m = tl.arange(0, M)
    hh = m // BQ
    qb = tile * BQ + m % BQ
    row_ok = (hh < HG) & (qb < nb)
    # Rows are (head, query block); the queries are the blocks' scaled means, [B, G, HG * nb, D].
    q_rows = Q + b * sqb + g * sqg + (hh * nb + qb).to(tl.int64)[:, None] * sqx
    d = tl.arange(0, DP)
    q = tl.load(q_rows + d[None, :], mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
    j = tl.arange(0, 2 * DP)
    q2 = tl.load(q_rows + (j % DP)[None, :], mask=row_ok[:, None] & ((j % DP) < D)[None, :], other=0.0)
    qc = tl.where((j < DP)[None, :], tl.maximum(q2, 0.0), tl.minimum(q2, 0.0))
    kmean_base = KMEAN + b * skb + g * skg
    kbound_base = KBOUND + b * sbb + g * sbg
    last = tl.minimum(tile * BQ + BQ, nb)  # key blocks any row of the tile sees

    peak1 = tl.full([M], -1e30, tl.float32)  # finite floors: exp2(-inf - floor) is 0, never NaN
    peak2 = tl.full([M], -1e30, tl.float32)
    total1 = tl.zeros([M], tl.float32)
    total2 = tl.zeros([M], tl.float32)
    for kb0 in range(0, last, BK):
        s_mean, s_bound = _screen_logits(q, qc, kmean_base, skk, kbound_base, sbk, kb0 + tl.arange(0, BK), qb,
                                         nb, D, DP)
        peak1, total1 = _online_total(peak1, total1, s_mean)
        peak2, total2 = _online_total(peak2, total2, s_bound)
    # Each loop result is used once (Triton 3.6's thread-locality pass asserts otherwise).
    lse1 = peak1 + tl.log2(total1)
    lse2 = peak2 + tl.log2(total2)

    qbs = tile * BQ + tl.arange(0, BQ)
    out_rows = OUT + b * sob + g * sog + qbs.to(tl.int64)[:, None] * soq
    for kb0 in range(0, last, BK):
        kb = kb0 + tl.arange(0, BK)
        s_mean, s_bound = _screen_logits(q, qc, kmean_base, skk, kbound_base, sbk, kb, qb, nb, D, DP)
        p = tl.exp2(s_mean - lse1[:, None]) + tl.exp2(s_bound - lse2[:, None])
        p = tl.where(row_ok[:, None], p, 0.0)
        screen = tl.sum(tl.reshape(p, (HGP, BQ, BK)), 0)  # the group's heads summed: [BQ, BK]
        screen = tl.where(screen == screen, screen, 0.0)  # NaN (a NaN query) ranks last
        screen = tl.minimum(screen, 1e30)
        offset = qbs[:, None] - kb[None, :]
        key = tl.where(offset > 0, screen, float("-inf"))
        key = tl.where((offset > 0) & (kb == 0)[None, :], 3e38, key)  # the sink, after the diagonal
        key = tl.where(offset == 0, float("inf"), key)  # the diagonal, first
        tl.store(out_rows + kb[None, :], key, mask=(qbs < nb)[:, None] & (kb < n_cols)[None, :])
    for kb0 in range(tl.cdiv(last, BK) * BK, n_cols, BK):  # above every row's diagonal, and the padding
        kb = kb0 + tl.arange(0, BK)
        tl.store(out_rows + kb[None, :], tl.full([BQ, BK], float("-inf"), tl.float32),
                 mask=(qbs < nb)[:, None] & (kb < n_cols)[None, :])


def launch_rows(heads_per_group: int) -> int:
    """Head rows per query block, padded to a power of two (``tl.arange``)."""
    return triton.next_power_of_2(heads_per_group)


def launch_warps(num_blocks_: int) -> int:
    """Warps per program for an ``nb``-block grid (:data:`LAUNCH`)."""
    return 4 if num_blocks_ >= LAUNCH["four_warps_from"] else LAUNCH["num_warps"]


def query_blocks_per_program(heads_per_group: int) -> int:
    """Query blocks per program: :data:`LAUNCH`'s rows over the padded heads (at least one)."""
    return max(1, LAUNCH["rows"] // launch_rows(heads_per_group))


def screen_ranking_keys_cuda(q_BGXD: torch.Tensor, mean_BGKD: torch.Tensor, max_BGKD: torch.Tensor,
                             min_BGKD: torch.Tensor, width: int, *, BQ: int | None = None, BK: int | None = None,
                             num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """:func:`~sa_compile.templates.screened_query.screen_ranking_keys_reference` on CUDA, fused
    (TF32 dots). ``q_BGXD``: the query blocks' scaled means, rows ordered (head, block)."""
    B, G, X, D = q_BGXD.shape
    nb = mean_BGKD.shape[2]
    HG = X // nb
    bq, bk = BQ or query_blocks_per_program(HG), BK or LAUNCH["BK"]
    q_BGXD = (q_BGXD.float() * math.log2(math.e)).contiguous()
    mean_BGKD = mean_BGKD.float().contiguous()
    bound_BGKE = torch.cat([max_BGKD.float(), min_BGKD.float()], dim=-1).contiguous()
    n_cols = nb + width
    out = torch.empty(B, G, nb, n_cols, device=q_BGXD.device, dtype=torch.float32)
    grid = (triton.cdiv(nb, bq), B * G)
    _screen_keys_kernel[grid](
        q_BGXD, mean_BGKD, bound_BGKE, out, q_BGXD.stride(0), q_BGXD.stride(1), q_BGXD.stride(2),
        mean_BGKD.stride(0), mean_BGKD.stride(1), mean_BGKD.stride(2),
        bound_BGKE.stride(0), bound_BGKE.stride(1), bound_BGKE.stride(2),
        out.stride(0), out.stride(1), out.stride(2), nb, n_cols, grid[0], G,
        HG=HG, HGP=launch_rows(HG), BQ=bq, BK=bk, D=D, DP=triton.next_power_of_2(D),
        num_warps=num_warps or launch_warps(nb), num_stages=num_stages or LAUNCH["num_stages"],
    )
    return out


@triton.jit
def _key_stats_kernel(K, VALID, MEAN, MAX, MIN, K8, KS, skb, skh, skn, svb, N, G, NB,
                      BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HAS_VALID: tl.constexpr,
                      INT8: tl.constexpr, LIMIT: tl.constexpr):
    """One key block of one head: the mean, max and min of its valid keys (as
    :func:`~sa_compile.templates.screened_query.key_block_stats`) and, with ``INT8``, its keys
    rounded to int8 with one scale per key (as :func:`~._blocks.quantize_int8`), from one read."""
    kb = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    t = kb * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, DP)
    in_range = t < N
    k_rows = K + b * skb + g * skh + t.to(tl.int64)[:, None] * skn + d[None, :]
    k = tl.load(k_rows, mask=in_range[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    valid = in_range
    if HAS_VALID:
        valid = valid & (tl.load(VALID + b * svb + t, mask=in_range, other=0) != 0)
    count = tl.maximum(tl.sum(valid.to(tl.float32), 0), 1.0)
    stats = (pid_bg * NB + kb).to(tl.int64) * D + d
    tl.store(MEAN + stats, tl.sum(tl.where(valid[:, None], k, 0.0), 0) / count, mask=d < D)
    tl.store(MAX + stats, tl.max(tl.where(valid[:, None], k, -1e4), 0), mask=d < D)
    tl.store(MIN + stats, tl.min(tl.where(valid[:, None], k, 1e4), 0), mask=d < D)
    if INT8:
        x = tl.where(tl.abs(k) < float("inf"), k, 0.0)  # NaN and inf count as 0
        # Rounded as torch divides (Triton's `/` is approximate): the same scales as the reference.
        scale = tl.div_rn(tl.max(tl.abs(x), 1), tl.full([BLOCK], LIMIT, tl.float32))
        k8 = _round_to_int8(x, scale, LIMIT)
        rows = pid_bg.to(tl.int64) * N + t
        tl.store(K8 + rows[:, None] * D + d[None, :], k8, mask=in_range[:, None] & (d < D)[None, :])
        tl.store(KS + rows, scale, mask=in_range)


def key_stats_cuda(k_BGND: torch.Tensor, kv_valid_BN: torch.Tensor | None, block_size: int, int8: bool, *,
                   num_warps: int = 8):
    """:func:`~sa_compile.templates.screened_query.key_stats` on CUDA: one program per key block
    and head reads the block once for its statistics and (``int8``) its int8 keys and scales.
    Returns ``(mean, max, min, k8, k_scale)``; without ``int8`` the last two are empty."""
    B, G, N, D = k_BGND.shape
    nb = triton.cdiv(N, block_size)
    stats = [torch.empty(B, G, nb, D, device=k_BGND.device, dtype=torch.float32) for _ in range(3)]
    if int8:
        k8 = torch.empty(B, G, N, D, device=k_BGND.device, dtype=torch.int8)
        k_scale = torch.empty(B, G, N, device=k_BGND.device, dtype=torch.float32)
    else:
        k8 = torch.empty(0, device=k_BGND.device, dtype=torch.int8)
        k_scale = torch.empty(0, device=k_BGND.device, dtype=torch.float32)
    k = k_BGND if k_BGND.stride(-1) == 1 else k_BGND.contiguous()
    valid = kv_valid_BN.contiguous() if kv_valid_BN is not None else k  # unread without HAS_VALID
    _key_stats_kernel[(nb, B * G)](
        k, valid, *stats, k8, k_scale, k.stride(0), k.stride(1), k.stride(2), valid.stride(0), N, G, nb,
        BLOCK=block_size, D=D, DP=triton.next_power_of_2(D), HAS_VALID=kv_valid_BN is not None, INT8=int8,
        LIMIT=INT8_LIMIT, num_warps=num_warps,
    )
    return (*stats, k8, k_scale)
