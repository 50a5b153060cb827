"""The strided-query block mass as one fused Triton kernel (CUDA).

One program takes one query block of one key/value head group: the ``R`` sampled queries of
each of the group's query heads, ``M = heads_per_group * R`` rows that share every key tile
(GQA), so each key tile is read once for all of them. Pass 1 walks the block's causal key
blocks and stores, per row and key block, the log-sum-exp of its logits (``[M, nb]`` floats,
never the logits). Pass 2 turns those into probabilities with the row's total and sums each
head's rows: the block mass of :func:`~sa_compile.templates.strided_query.strided_block_mass_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SCRATCH_BYTES = 1 << 28


@triton.jit
def _strided_mass_kernel(Q, K, VALID, SCRATCH, OUT, sqb, sqh, sqn, skb, skh, skn, svb, sob, soh, soq,
                         N, NB, G, qb_first, scale,
                         HG: tl.constexpr, HGP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                         BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, STRIDE: tl.constexpr,
                         KBT: tl.constexpr, HAS_VALID: tl.constexpr):
    M: tl.constexpr = HGP * RP
    local_q = tl.program_id(0)
    qb = qb_first + local_q
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    m = tl.arange(0, M)
    hh = m // RP
    r = m % RP
    pos = qb * BLOCK + (r + 1) * STRIDE - 1
    row_ok = (hh < HG) & (r < R) & (pos < N)
    d = tl.arange(0, DP)
    q_ptr = Q + b * sqb + (g * HG + hh)[:, None] * sqh + pos[:, None] * sqn + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    q = (q.to(tl.float32) * scale).to(Q.dtype.element_ty)  # scaled first: fp16 logits stay finite
    scratch = SCRATCH + (pid_bg * tl.num_programs(0) + local_q).to(tl.int64) * NB * M
    keys0 = tl.arange(0, BLOCK)
    for kb in range(0, qb + 1):  # pass 1: each key block's log-sum-exp, per row
        keys = kb * BLOCK + keys0
        k = tl.load(K + b * skb + g * skh + keys[:, None] * skn + d[None, :],
                    mask=(keys[:, None] < N) & (d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k))
        visible = (keys[None, :] <= pos[:, None]) & (keys[None, :] < N)
        if HAS_VALID:
            visible = visible & (tl.load(VALID + b * svb + keys, mask=keys < N, other=0) != 0)[None, :]
        s = tl.where(visible, s, float("-inf"))
        peak = tl.max(s, 1)
        peak = tl.where(peak == float("-inf"), 0.0, peak)
        total = tl.sum(tl.exp(s - peak[:, None]), 1)
        tl.store(scratch + kb * M + m, peak + tl.log(total))
    row_max = tl.full([M], float("-inf"), tl.float32)
    kbt = tl.arange(0, KBT)
    for kb0 in range(0, qb + 1, KBT):  # each row's overall peak ...
        blse = tl.load(scratch + (kb0 + kbt)[None, :] * M + m[:, None], mask=(kb0 + kbt <= qb)[None, :],
                       other=float("-inf"))
        row_max = tl.maximum(row_max, tl.max(blse, 1))
    # Each loop result is used once: Triton 3.6's thread-locality pass asserts that of a loop
    # that accumulates a reduction. The floor keeps a row with no visible key finite.
    row_peak = tl.maximum(row_max, -1e30)
    row_total = tl.zeros([M], tl.float32)
    for kb0 in range(0, qb + 1, KBT):  # ... and total, the row's log-sum-exp
        blse = tl.load(scratch + (kb0 + kbt)[None, :] * M + m[:, None], mask=(kb0 + kbt <= qb)[None, :],
                       other=float("-inf"))
        row_total += tl.sum(tl.exp(blse - row_peak[:, None]), 1)
    row_lse = row_peak + tl.log(row_total)
    counted = row_ok & (row_lse > float("-inf"))
    for kb0 in range(0, qb + 1, KBT):  # pass 2: probabilities, summed over each head's rows
        in_row = kb0 + kbt <= qb
        blse = tl.load(scratch + (kb0 + kbt)[None, :] * M + m[:, None], mask=in_row[None, :], other=float("-inf"))
        p = tl.where(counted[:, None], tl.exp(blse - row_lse[:, None]), 0.0)
        mass = tl.sum(tl.reshape(p, (HGP, RP, KBT)), 1)
        heads = tl.arange(0, HGP)
        out_ptr = OUT + b * sob + (g * HG + heads)[:, None] * soh + qb * soq + (kb0 + kbt)[None, :]
        tl.store(out_ptr, mass, mask=(heads < HG)[:, None] & in_row[None, :])


def strided_block_mass_cuda(q_BHND: torch.Tensor, k_BGND: torch.Tensor, kv_valid_BN: torch.Tensor | None,
                            block_size: int, stride: int, scale: float) -> torch.Tensor:
    """:func:`~sa_compile.templates.strided_query.strided_block_mass_reference` on CUDA, fused."""
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    HG, R = H // G, block_size // stride
    HGP = triton.next_power_of_2(HG)
    RP = max(triton.next_power_of_2(R), 16 // HGP)  # tl.dot wants at least 16 rows
    nb = triton.cdiv(N, block_size)
    q_BHND, k_BGND = q_BHND.contiguous(), k_BGND.contiguous()
    out_BHQK = torch.zeros(B, H, nb, nb, device=q_BHND.device, dtype=torch.float32)
    chunk = max(1, min(nb, _SCRATCH_BYTES // (B * G * nb * HGP * RP * 4)))
    scratch = torch.empty(B * G * chunk * nb * HGP * RP, device=q_BHND.device, dtype=torch.float32)
    valid = kv_valid_BN.contiguous() if kv_valid_BN is not None else q_BHND  # unread without HAS_VALID
    for first in range(0, nb, chunk):
        blocks = min(chunk, nb - first)
        _strided_mass_kernel[(blocks, B * G)](
            q_BHND, k_BGND, valid, scratch, out_BHQK, q_BHND.stride(0), q_BHND.stride(1), q_BHND.stride(2),
            k_BGND.stride(0), k_BGND.stride(1), k_BGND.stride(2), valid.stride(0),
            out_BHQK.stride(0), out_BHQK.stride(1), out_BHQK.stride(2), N, nb, G, first, scale,
            HG=HG, HGP=HGP, R=R, RP=RP, BLOCK=block_size, D=D, DP=triton.next_power_of_2(D), STRIDE=stride,
            KBT=32, HAS_VALID=kv_valid_BN is not None, num_warps=4, num_stages=2,
        )
    return out_BHQK
