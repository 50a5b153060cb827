"""The screened strided-query mass as one fused Triton kernel (CUDA).

One program takes one query block of one key/value head group: the ``R`` sampled queries of
each of the group's query heads, ``M = heads_per_group * R`` rows that share the group's
candidate blocks, so each candidate's key tile is read once for all of them. It walks the
row's ``min(W, qb + 1)`` live candidate slots (the rest hold no block) and stores, per row
and slot, the log-sum-exp of its logits (``[M, W]`` floats of scratch, never the logits).
Only slot 0, the diagonal, needs the causal mask: the other candidates lie below it. A
second pass turns the log-sum-exps into probabilities over the candidates and sums each
head's rows: :func:`~sa_compile.templates.screened_query.candidate_block_mass_reference`.
Logits are in base 2 (queries prescaled by ``log2(e)``), as in the strided-query kernel.

With ``INT8`` the keys arrive as int8 with one scale per key (:func:`~._blocks.quantize_int8`)
and the program rounds its sampled queries to int8 the same way, one scale per row: each
candidate tile is then 16 KB instead of 32 (at 256K the bf16 kernel moves ~86 GB of tiles per
layer through L2), its dot an exact int32 one, and the logits that dot times the two scales.
On an H100 that made the kernel only 6% faster at 256K: the reads were not what bound it.

The candidates' order for the selection (:func:`~sa_compile.selection.order_candidates`) is a
second kernel here: one program per row sorts the row's keys in registers (a bitonic sort of
int64s that carry each key and its slot) and stores the blocks in that order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._blocks import INT8_LIMIT, all_valid_blocks
from ._strided_triton import (
    _SCRATCH_BYTES, _load_key_tile, _round_to_int8, _row_lse, _store_tile_lse, _visible_logits, launch_shape,
)


@triton.jit
def _load_int8_keys(k_base, skn, ks_base, keys, N, D: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr):
    """An int8 key tile (:func:`._strided_triton._load_key_tile`) and its keys' scales at ``ks_base``."""
    k = _load_key_tile(k_base, skn, keys, N, D, DP, CAUSAL)
    if CAUSAL:
        k_scale = tl.load(ks_base + keys, mask=keys < N, other=0.0)
    else:
        k_scale = tl.load(ks_base + keys)
    return k, k_scale


@triton.jit
def _store_candidate_lse(ptr, q, q_scale, k_base, skn, ks_base, valid_base, all_valid, keys, pos, N,
                         D: tl.constexpr, DP: tl.constexpr, HAS_VALID: tl.constexpr, INT8: tl.constexpr,
                         CAUSAL: tl.constexpr):
    """One candidate tile's :func:`._strided_triton._store_tile_lse`. With ``INT8``, ``q`` holds
    int8 rows (scales ``q_scale``, base 2 included) and the keys are int8 with per-key scales at
    ``ks_base``; otherwise ``q`` is in the inputs' dtype and ``q_scale``, ``ks_base`` are unread.

    With ``INT8`` the row's scale is folded into the exponent: the peak is taken over
    ``dot * k_scale`` and each exponent is ``exp2(q_scale * t - q_scale * peak)``, one FMA, a
    multiply less per logit than scaling the logits first. On an H100 (with the 128-register cap
    of :func:`candidate_block_mass_cuda`) the kernel ran 4-8% faster without a key mask and 1-12%
    with one, its output within 6e-6 (docs/results.md)."""
    if INT8:
        k, k_scale = _load_int8_keys(k_base, skn, ks_base, keys, N, D, DP, CAUSAL)
        t = tl.dot(q, tl.trans(k)).to(tl.float32) * k_scale[None, :]
        t = _visible_logits(t, keys, pos, N, valid_base, all_valid, HAS_VALID, CAUSAL)
        row_scale = tl.maximum(q_scale, 1e-30)  # a zero row: logits 0 at any scale, and no 0 * -inf
        peak = tl.max(t, 1)
        peak = tl.where(peak == float("-inf"), 0.0, peak) * row_scale  # -inf: no key visible
        tl.store(ptr, peak + tl.log2(tl.sum(tl.exp2(t * row_scale[:, None] - peak[:, None]), 1)))
    else:
        _store_tile_lse(ptr, q, k_base, skn, valid_base, all_valid, keys, pos, N, D, DP, HAS_VALID, CAUSAL)


@triton.jit
def _candidate_mass_kernel(Q, K, KS, VALID, FULL, CAND, SCRATCH, OUT, sqb, sqh, sqn, skb, skh, skn, sksb, sksh, svb,
                           sfb, scb, scg, scq, sob, soh, soq, N, G, qb_first, scale2,
                           HG: tl.constexpr, HGP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                           W: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                           STRIDE: tl.constexpr, KBT: tl.constexpr, HAS_VALID: tl.constexpr, INT8: tl.constexpr,
                           LIMIT: tl.constexpr):
    M: tl.constexpr = HGP * RP
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the rows with the most candidates start first
    qb = qb_first + tile
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
    keys0 = tl.arange(0, BLOCK)
    cand = CAND + b * scb + g * scg + qb.to(tl.int64) * scq
    scratch = SCRATCH + (pid_bg * tl.num_programs(0) + tile).to(tl.int64) * W * M
    live = tl.minimum(qb + 1, W)  # slots holding a block; the rest hold none
    k_base, valid_base, full_base = K + b * skb + g * skh, VALID + b * svb, FULL + b * sfb
    if INT8:  # the sampled rows rounded to int8, each with its own scale (as quantize_int8)
        q = q.to(tl.float32) * scale2
        q = tl.where(tl.abs(q) < float("inf"), q, 0.0)  # NaN and inf count as 0, as in quantize_int8
        q_scale = tl.max(tl.abs(q), 1) / LIMIT
        q = _round_to_int8(q, q_scale, LIMIT)
    else:
        q = (q.to(tl.float32) * scale2).to(Q.dtype.element_ty)
        q_scale = scale2  # unread
    ks_base = KS + b * sksb + g * sksh  # unread without INT8
    # Slot 0, the diagonal: the one candidate the causal mask and the prompt's end cut.
    _store_candidate_lse(scratch + m, q, q_scale, k_base, skn, ks_base, valid_base, 0,
                         tl.load(cand) * BLOCK + keys0, pos, N, D, DP, HAS_VALID, INT8, CAUSAL=True)
    for w in range(1, live):  # below the diagonal: every key visible to every row
        block = tl.load(cand + w)
        all_valid = 0
        if HAS_VALID:  # the block's keys all valid: no padding mask (FULL, one flag per key block)
            all_valid = tl.load(full_base + block)
        _store_candidate_lse(scratch + w * M + m, q, q_scale, k_base, skn, ks_base, valid_base, all_valid,
                             block * BLOCK + keys0, pos, N, D, DP, HAS_VALID, INT8, CAUSAL=False)
    row_lse = _row_lse(scratch, m, live, M, KBT)
    counted = row_ok & (row_lse > float("-inf"))
    j = tl.arange(0, HGP)
    slot = tl.arange(0, KBT)
    out_row = OUT + b * sob + (g * HG + j)[:, None] * soh + qb.to(tl.int64) * soq
    for w0 in range(0, W, KBT):  # probabilities, each head's rows summed; empty slots get 0
        blse = tl.load(scratch + (w0 + slot)[None, :] * M + m[:, None], mask=(w0 + slot < live)[None, :],
                       other=float("-inf"))
        p = tl.where(counted[:, None], tl.exp2(blse - row_lse[:, None]), 0.0)
        mass = tl.sum(tl.reshape(p, (HGP, RP, KBT)), 1)  # [HGP, KBT]
        tl.store(out_row + (w0 + slot)[None, :], mass, mask=(j < HG)[:, None] & (w0 + slot < W)[None, :])


def candidate_block_mass_cuda(q_BHND: torch.Tensor, k_BGND: torch.Tensor, k_scale_BGN: torch.Tensor | None,
                              kv_valid_BN: torch.Tensor | None, cand_BGQW: torch.Tensor, block_size: int, stride: int,
                              scale: float, *, num_warps: int = 4, num_stages: int | None = None,
                              maxnreg: int | None = None) -> torch.Tensor:
    """:func:`~sa_compile.templates.screened_query.candidate_block_mass_reference` on CUDA, fused
    (int8 keys and queries where ``k_scale_BGN`` is given).

    ``cand_BGQW`` as :func:`~sa_compile.templates.screened_query.candidate_blocks` makes it: slot 0
    the row's diagonal, slots ``1 .. min(W, qb + 1) - 1`` distinct blocks below it, the rest
    empty. The kernel relies on that order: it masks only slot 0 and reads no later slot.

    ``num_stages`` defaults to 5 with int8 keys (16 KB tiles): on an H100 that was 6-8% faster
    than 3 at 32K-256K, with the same output; 2 or 4 stages were no better and 8 warps slower
    (docs/experiments.md). bf16 keys keep 3 (their 32 KB tiles, five deep, would not fit
    every card's shared memory). ``maxnreg`` caps the registers per thread (Triton's option; 0:
    the compiler's choice). It defaults to 128 with int8 keys: an H100 multiprocessor then holds
    four programs instead of three (sm_90 SASS). On an H100 at 32K and 128K the cap made the
    int8 kernel 0-5% faster without a key mask and 4-22% with one; bf16 keys run uncapped (not
    measured capped)."""
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    nb, W = cand_BGQW.shape[-2:]
    HG, R = H // G, block_size // stride
    HGP, RP, _, _ = launch_shape(HG, R)
    q_BHND, k_BGND = q_BHND.contiguous(), k_BGND.contiguous()
    cand_BGQW = cand_BGQW.to(torch.int32).contiguous()
    out_BHQW = torch.empty(B, H, nb, W, device=q_BHND.device, dtype=torch.float32)
    # Each program's scratch holds W floats per row; at most _SCRATCH_BYTES at once.
    programs = max(1, min(nb, _SCRATCH_BYTES // (B * G * W * HGP * RP * 4)))
    scratch = torch.empty(B * G * programs * W * HGP * RP, device=q_BHND.device, dtype=torch.float32)
    valid = kv_valid_BN.contiguous() if kv_valid_BN is not None else q_BHND  # unread without HAS_VALID
    # One flag per key block: all its keys valid (tiles of an all-ones mask skip the padding mask).
    full = all_valid_blocks(kv_valid_BN, block_size).to(torch.int8) if kv_valid_BN is not None else valid
    int8 = k_scale_BGN is not None
    if num_stages is None:
        num_stages = 5 if int8 else 3
    k_scale = k_scale_BGN.float().contiguous() if int8 else q_BHND  # unread without INT8
    ks_strides = (k_scale.stride(0), k_scale.stride(1)) if int8 else (0, 0)
    if maxnreg is None:
        maxnreg = 128 if int8 else 0
    options = {"maxnreg": maxnreg} if maxnreg else {}
    for first in range(0, nb, programs):
        _candidate_mass_kernel[(min(programs, nb - first), B * G)](
            q_BHND, k_BGND, k_scale, valid, full, cand_BGQW, scratch, out_BHQW, q_BHND.stride(0), q_BHND.stride(1),
            q_BHND.stride(2), k_BGND.stride(0), k_BGND.stride(1), k_BGND.stride(2), *ks_strides, valid.stride(0),
            full.stride(0), cand_BGQW.stride(0), cand_BGQW.stride(1), cand_BGQW.stride(2),
            out_BHQW.stride(0), out_BHQW.stride(1), out_BHQW.stride(2), N, G, first, scale * math.log2(math.e),
            HG=HG, HGP=HGP, R=R, RP=RP, W=W, BLOCK=block_size, D=D, DP=triton.next_power_of_2(D),
            STRIDE=stride, KBT=32, HAS_VALID=kv_valid_BN is not None, INT8=int8, LIMIT=INT8_LIMIT,
            num_warps=num_warps, num_stages=num_stages, **options,
        )
    return out_BHQW


@triton.jit
def _candidate_keys(scores_row, blocks_row, slot, W, LIMIT: tl.constexpr):
    """The ranking keys of :func:`~sa_compile.selection.order_candidates_reference` at ``slot``:
    slots 0 and 1 ``inf``, slots with no block (and past ``W``) ``-inf``, the rest their score
    with NaN as ``-LIMIT`` and clamped to ``+-LIMIT``."""
    live = slot < W
    score = tl.load(scores_row + slot, mask=live, other=0.0)
    block = tl.load(blocks_row + slot, mask=live, other=-1)
    is_nan = (score.to(tl.int32, bitcast=True) & 0x7FFFFFFF) > 0x7F800000  # by its bits: no fast-math folds it
    key = tl.where(is_nan, -LIMIT, tl.clamp(score, -LIMIT, LIMIT))
    key = tl.where(slot < 2, float("inf"), key)
    return tl.where(block < 0, float("-inf"), key)


@triton.jit
def _order_candidates_kernel(SCORES, BLOCKS, OUT, W, LIMIT: tl.constexpr, WP: tl.constexpr):
    """One row: its slots in a stable descending order of their keys, by one bitonic sort of
    ``WP`` int64s, each the key's bits as an ordered integer (high half) and ``WP - 1 - slot``
    (low half: equal keys keep their slots' order), then each slot's block stored in that order."""
    row = tl.program_id(0).to(tl.int64) * W
    i = tl.arange(0, WP)
    key = _candidate_keys(SCORES + row, BLOCKS + row, i, W, LIMIT)
    bits = key.to(tl.int32, bitcast=True)
    bits = tl.where((bits & 0x7FFFFFFF) == 0, 0, bits)  # -0.0 ties with 0.0, as a float comparison has it
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # the floats' order as signed integers' (no NaN here)
    packed = tl.sort((ordered.to(tl.int64) << 32) | (WP - 1 - i).to(tl.int64), descending=True)
    slot = WP - 1 - (packed & (WP - 1)).to(tl.int32)
    block = tl.load(BLOCKS + row + slot, mask=slot < W, other=0)  # the row's slots past W rank last
    tl.store(OUT + row + i, tl.maximum(block, 0), mask=i < W)


def order_candidates_cuda(scores_BHQW: torch.Tensor, blocks_BHQW: torch.Tensor, key_limit: float, *,
                          num_warps: int | None = None) -> torch.Tensor:
    """:func:`~sa_compile.selection.order_candidates_reference` on CUDA: one program per row
    sorts its ``W`` slots (padded to a power of two) in registers and stores their blocks in
    that order: no separate sort, and no gather of the order. ``num_warps`` defaults to one
    warp per 256 slots (by the sm_90 SASS, 2.3K warp-instructions per 164-slot row at one
    warp against 3.3K at four)."""
    W = scores_BHQW.shape[-1]
    WP = triton.next_power_of_2(W)
    scores_BHQW, blocks_BHQW = scores_BHQW.float().contiguous(), blocks_BHQW.long().contiguous()
    out_BHQW = torch.empty(blocks_BHQW.shape, device=blocks_BHQW.device, dtype=torch.int64)
    rows = out_BHQW.numel() // max(W, 1)
    if rows:
        _order_candidates_kernel[(rows,)](scores_BHQW, blocks_BHQW, out_BHQW, W, LIMIT=key_limit, WP=WP,
                                          num_warps=num_warps or max(1, WP // 256))
    return out_BHQW
