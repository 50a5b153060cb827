"""The screened strided-query mass as one fused Triton kernel (CUDA).

One program takes one query block of one key/value head group: the ``R`` sampled queries of
each of the group's query heads, ``M = heads_per_group * R`` rows that share the group's
candidate blocks, so each candidate's key tile is read once for all of them. It walks the
``W`` candidate slots, keeps each row's log-sum-exp per slot in registers (``[M, W]``, never
the logits), then turns them into probabilities over the candidates and sums each head's
rows: :func:`~sa_compile.templates.screened_query.candidate_block_mass_reference`. Logits are
in base 2 (queries prescaled by ``log2(e)``), as in the strided-query kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._strided_triton import launch_shape


@triton.jit
def _candidate_mass_kernel(Q, K, VALID, CAND, OUT, sqb, sqh, sqn, skb, skh, skn, svb, scb, scg, scq,
                           sob, soh, soq, N, G, scale2,
                           HG: tl.constexpr, HGP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                           W: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                           STRIDE: tl.constexpr, HAS_VALID: tl.constexpr):
    M: tl.constexpr = HGP * RP
    qb = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    m = tl.arange(0, M)
    hh = m // RP
    r = m % RP
    pos = qb * BLOCK + (r + 1) * STRIDE - 1
    row_ok = (hh < HG) & (r < R) & (pos < N)
    d = tl.arange(0, DP)
    q = tl.load(Q + b * sqb + (g * HG + hh)[:, None] * sqh + pos[:, None] * sqn + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    q = (q.to(tl.float32) * scale2).to(Q.dtype.element_ty)
    keys0 = tl.arange(0, BLOCK)
    slot = tl.arange(0, WP)
    lse = tl.full([M, WP], float("-inf"), tl.float32)
    cand = CAND + b * scb + g * scg + qb.to(tl.int64) * scq
    for w in range(0, W):
        if w <= qb:  # a row has at most qb + 1 candidates; its empty slots come last
            kb = tl.load(cand + w)
            live = (kb >= 0) & (kb <= qb)
            keys = tl.maximum(kb, 0) * BLOCK + keys0
            k = tl.load(K + b * skb + g * skh + keys[:, None] * skn + d[None, :],
                        mask=live & (keys[:, None] < N) & (d[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k))
            visible = live & (keys[None, :] <= pos[:, None]) & (keys[None, :] < N)
            if HAS_VALID:
                visible = visible & (tl.load(VALID + b * svb + keys, mask=keys < N, other=0) != 0)[None, :]
            s = tl.where(visible, s, float("-inf"))
            peak = tl.max(s, 1)
            peak = tl.where(peak == float("-inf"), 0.0, peak)
            block_lse = peak + tl.log2(tl.sum(tl.exp2(s - peak[:, None]), 1))
            lse = tl.where(slot[None, :] == w, block_lse[:, None], lse)
    row_peak = tl.maximum(tl.max(lse, 1), -1e30)  # finite for a row with no visible key
    row_lse = row_peak + tl.log2(tl.sum(tl.exp2(lse - row_peak[:, None]), 1))
    counted = row_ok & (row_lse > float("-inf"))
    p = tl.where(counted[:, None], tl.exp2(lse - row_lse[:, None]), 0.0)
    mass = tl.sum(tl.reshape(p, (HGP, RP, WP)), 1)  # [HGP, WP]: each head's rows summed
    j = tl.arange(0, HGP)
    out_ptr = OUT + b * sob + (g * HG + j)[:, None] * soh + qb.to(tl.int64) * soq + slot[None, :]
    tl.store(out_ptr, mass, mask=(j < HG)[:, None] & (slot < W)[None, :])


def candidate_block_mass_cuda(q_BHND: torch.Tensor, k_BGND: torch.Tensor, kv_valid_BN: torch.Tensor | None,
                              cand_BGQW: torch.Tensor, block_size: int, stride: int, scale: float,
                              *, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """:func:`~sa_compile.templates.screened_query.candidate_block_mass_reference` on CUDA, fused."""
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    nb, W = cand_BGQW.shape[-2:]
    HG, R = H // G, block_size // stride
    HGP, RP, _, _ = launch_shape(HG, R)
    q_BHND, k_BGND = q_BHND.contiguous(), k_BGND.contiguous()
    cand_BGQW = cand_BGQW.to(torch.int32).contiguous()
    out_BHQW = torch.empty(B, H, nb, W, device=q_BHND.device, dtype=torch.float32)
    valid = kv_valid_BN.contiguous() if kv_valid_BN is not None else q_BHND  # unread without HAS_VALID
    _candidate_mass_kernel[(nb, B * G)](
        q_BHND, k_BGND, valid, cand_BGQW, out_BHQW, q_BHND.stride(0), q_BHND.stride(1), q_BHND.stride(2),
        k_BGND.stride(0), k_BGND.stride(1), k_BGND.stride(2), valid.stride(0),
        cand_BGQW.stride(0), cand_BGQW.stride(1), cand_BGQW.stride(2),
        out_BHQW.stride(0), out_BHQW.stride(1), out_BHQW.stride(2), N, G, scale * math.log2(math.e),
        HG=HG, HGP=HGP, R=R, RP=RP, W=W, WP=triton.next_power_of_2(W), BLOCK=block_size, D=D,
        DP=triton.next_power_of_2(D), STRIDE=stride, HAS_VALID=kv_valid_BN is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out_BHQW
