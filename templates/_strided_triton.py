"""The strided-query block mass as one fused Triton kernel (CUDA).

One program takes ``QBT`` adjacent query blocks of one key/value head group: the ``R`` sampled
queries of each of the group's query heads in each block, ``M = QBT * heads_per_group * R``
rows that share every key tile (GQA, and neighbouring blocks read the same keys), so each key
tile is read once for all of them and the matmul is tall enough for the tensor cores
(``M`` near 64: wgmma on sm_90). Pass 1 walks the causal key blocks and stores, per row and
key block, the log-sum-exp of its logits (``[M, nb]`` floats, never the logits); only the
diagonal key blocks need the causal mask. Pass 2 turns those into
probabilities with the row's total and sums each head's rows per query block: the block mass
of :func:`~sa_compile.templates.strided_query.strided_block_mass_reference`.

Logits are kept in base 2 (the queries are prescaled by ``log2(e)``): ``exp2`` is the
hardware's exponential, and the mass, a ratio of exponentials, is the same in either base.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_SCRATCH_BYTES = 1 << 28
# Rows per program. On the H200 (Llama-3.1-8B shape, 32K and 128K, strides 16 and 8) 64 rows
# with 4 warps and 3 stages ran 29-33% faster than 128 rows with 8 warps and 2 stages, and
# within 4% of the fastest launch measured everywhere (docs/results.md, "Search cost").
_TARGET_ROWS = 64


@triton.jit
def _store_row_lse(ptr, s):
    """Store each row's log-sum-exp of the logits ``s`` (base 2); ``-inf`` where none is visible."""
    peak = tl.max(s, 1)
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    tl.store(ptr, peak + tl.log2(tl.sum(tl.exp2(s - peak[:, None]), 1)))


@triton.jit
def _round_to_int8(x, scale, LIMIT: tl.constexpr):
    """The rows of ``x`` (finite) as int8 steps of their ``scale``, halves up, as
    :func:`~._blocks.quantize_int8` rounds (a row of scale 0 is all zeros)."""
    steps = tl.where(scale[:, None] > 0, x / scale[:, None], 0.0)
    return tl.clamp(tl.floor(steps + 0.5), -LIMIT, LIMIT).to(tl.int8)


@triton.jit
def _load_key_tile(k_base, skn, keys, N, D: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr):
    """The ``[len(keys), DP]`` key tile at ``keys`` (zeros past ``D``; with ``CAUSAL``, a diagonal
    tile, also past the prompt's end ``N``)."""
    d = tl.arange(0, DP)
    if CAUSAL:
        return tl.load(k_base + keys[:, None] * skn + d[None, :], mask=(keys[:, None] < N) & (d[None, :] < D), other=0)
    else:
        return tl.load(k_base + keys[:, None] * skn + d[None, :], mask=d[None, :] < D, other=0)


@triton.jit
def _visible_logits(s, keys, pos, N, valid_base, all_valid, HAS_VALID: tl.constexpr, CAUSAL: tl.constexpr):
    """The logits ``s`` against the key tile ``keys``, ``-inf`` where a row does not see the key:
    a diagonal tile (``CAUSAL``) masks keys after the row's position ``pos`` and past the
    prompt's end; a tile below it is visible to every row. ``HAS_VALID`` also masks the keys
    ``valid_base`` marks 0 (padding), except in a tile below the diagonal whose keys
    ``all_valid`` (nonzero) says are all valid: every tile of an all-ones mask, which a compiled
    model's ``generate()`` passes, then costs no masking."""
    if CAUSAL:
        visible = (keys[None, :] <= pos[:, None]) & (keys[None, :] < N)
        if HAS_VALID:
            visible = visible & (tl.load(valid_base + keys, mask=keys < N, other=0) != 0)[None, :]
        s = tl.where(visible, s, float("-inf"))
    elif HAS_VALID:
        if all_valid == 0:
            s = tl.where((tl.load(valid_base + keys) != 0)[None, :], s, float("-inf"))
    return s


@triton.jit
def _store_tile_lse(ptr, q, k_base, skn, valid_base, all_valid, keys, pos, N, D: tl.constexpr, DP: tl.constexpr,
                    HAS_VALID: tl.constexpr, CAUSAL: tl.constexpr):
    """The rows' logits against one key tile (``keys``; ``k_base`` and ``valid_base`` at the
    batch and head), each row's log-sum-exp of them stored at ``ptr``
    (over the keys it sees: :func:`_visible_logits`)."""
    k = _load_key_tile(k_base, skn, keys, N, D, DP, CAUSAL)
    s = _visible_logits(tl.dot(q, tl.trans(k)), keys, pos, N, valid_base, all_valid, HAS_VALID, CAUSAL)
    _store_row_lse(ptr, s)


@triton.jit
def _row_lse(scratch, m, count, M: tl.constexpr, KBT: tl.constexpr):
    """Each row's log-sum-exp over the first ``count`` tile log-sum-exps of its scratch (row
    ``m`` of tile ``t`` at ``scratch + t * M + m``); ``-inf`` for a row with no visible key."""
    slot = tl.arange(0, KBT)
    row_max = tl.full([M], float("-inf"), tl.float32)
    for t0 in range(0, count, KBT):  # each row's peak ...
        blse = tl.load(scratch + (t0 + slot)[None, :] * M + m[:, None], mask=(t0 + slot < count)[None, :],
                       other=float("-inf"))
        row_max = tl.maximum(row_max, tl.max(blse, 1))
    # Each loop result is used once: Triton 3.6's thread-locality pass asserts that of a loop
    # that accumulates a reduction. The floor keeps a row with no visible key finite.
    row_peak = tl.maximum(row_max, -1e30)
    row_total = tl.zeros([M], tl.float32)
    for t0 in range(0, count, KBT):  # ... and total
        blse = tl.load(scratch + (t0 + slot)[None, :] * M + m[:, None], mask=(t0 + slot < count)[None, :],
                       other=float("-inf"))
        row_total += tl.sum(tl.exp2(blse - row_peak[:, None]), 1)
    return row_peak + tl.log2(row_total)


@triton.jit
def _strided_mass_kernel(Q, K, VALID, SCRATCH, OUT, sqb, sqh, sqn, skb, skh, skn, svb, sob, soh, soq,
                         N, NB, G, qb_first, scale2,
                         HG: tl.constexpr, HGP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                         QBT: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                         STRIDE: tl.constexpr, KBT: tl.constexpr, HAS_VALID: tl.constexpr):
    ROWS: tl.constexpr = HGP * RP  # rows of one query block
    M: tl.constexpr = QBT * ROWS
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows start first
    qb0 = qb_first + tile * QBT
    qb_last = tl.minimum(qb0 + QBT, NB) - 1
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    m = tl.arange(0, M)
    qb_m = qb0 + m // ROWS
    hh = (m // RP) % HGP
    r = m % RP
    pos = qb_m * BLOCK + (r + 1) * STRIDE - 1
    row_ok = (hh < HG) & (r < R) & (pos < N)
    d = tl.arange(0, DP)
    q_ptr = Q + b * sqb + (g * HG + hh)[:, None] * sqh + pos[:, None] * sqn + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    q = (q.to(tl.float32) * scale2).to(Q.dtype.element_ty)  # scaled first: fp16 logits stay finite
    scratch = SCRATCH + (pid_bg * tl.num_programs(0) + tile).to(tl.int64) * NB * M
    keys0 = tl.arange(0, BLOCK)
    # Pass 1: each key block's log-sum-exp, per row. Key blocks before the program's first
    # query block are visible to every row (no causal mask, no bound check); only its QBT
    # diagonal blocks are masked (11-22% faster than masking every tile, on the H200).
    k_base, valid_base = K + b * skb + g * skh, VALID + b * svb
    for kb in range(0, qb0):  # (every tile masked for padding: all_valid 0)
        _store_tile_lse(scratch + kb * M + m, q, k_base, skn, valid_base, 0, kb * BLOCK + keys0, pos, N, D, DP,
                        HAS_VALID, CAUSAL=False)
    for kb in range(qb0, qb_last + 1):
        _store_tile_lse(scratch + kb * M + m, q, k_base, skn, valid_base, 0, kb * BLOCK + keys0, pos, N, D, DP,
                        HAS_VALID, CAUSAL=True)
    row_lse = _row_lse(scratch, m, qb_last + 1, M, KBT)
    counted = row_ok & (row_lse > float("-inf"))
    j = tl.arange(0, QBT * HGP)  # one output row per (query block, head)
    qb_j = qb0 + j // HGP
    head_j = j % HGP
    kbt = tl.arange(0, KBT)
    for kb0 in range(0, qb_last + 1, KBT):  # pass 2: probabilities, summed over each head's rows
        blse = tl.load(scratch + (kb0 + kbt)[None, :] * M + m[:, None], mask=(kb0 + kbt <= qb_last)[None, :],
                       other=float("-inf"))
        p = tl.where(counted[:, None], tl.exp2(blse - row_lse[:, None]), 0.0)
        mass = tl.sum(tl.reshape(p, (QBT * HGP, RP, KBT)), 1)
        out_ptr = OUT + b * sob + (g * HG + head_j)[:, None] * soh + qb_j[:, None] * soq + (kb0 + kbt)[None, :]
        keep = (head_j < HG)[:, None] & (qb_j < NB)[:, None] & ((kb0 + kbt)[None, :] <= qb_j[:, None])
        tl.store(out_ptr, mass, mask=keep)


def launch_shape(heads_per_group: int, samples: int, target_rows: int = _TARGET_ROWS) -> tuple[int, int, int, int]:
    """``(HGP, RP, QBT, num_warps)``: padded heads and samples per block, query blocks per program."""
    HGP = triton.next_power_of_2(heads_per_group)
    RP = max(triton.next_power_of_2(samples), 16 // HGP)  # tl.dot wants at least 16 rows
    QBT = max(1, target_rows // (HGP * RP))
    return HGP, RP, QBT, 8 if QBT * HGP * RP >= 128 else 4


def strided_block_mass_cuda(q_BHND: torch.Tensor, k_BGND: torch.Tensor, kv_valid_BN: torch.Tensor | None,
                            block_size: int, stride: int, scale: float, *, target_rows: int = _TARGET_ROWS,
                            num_warps: int | None = None, num_stages: int = 3) -> torch.Tensor:
    """:func:`~sa_compile.templates.strided_query.strided_block_mass_reference` on CUDA, fused.

    The keywords are launch choices; the defaults are the fastest a one-off timing of them
    measured on the H200 (docs/results.md, "Search cost")."""
    B, H, N, D = q_BHND.shape
    G = k_BGND.shape[1]
    HG, R = H // G, block_size // stride
    HGP, RP, QBT, default_warps = launch_shape(HG, R, target_rows)
    nb = triton.cdiv(N, block_size)
    q_BHND, k_BGND = q_BHND.contiguous(), k_BGND.contiguous()
    out_BHQK = torch.zeros(B, H, nb, nb, device=q_BHND.device, dtype=torch.float32)
    rows = QBT * HGP * RP  # per program; each program's scratch holds nb floats per row
    programs = max(1, min(triton.cdiv(nb, QBT), _SCRATCH_BYTES // (B * G * nb * rows * 4)))
    scratch = torch.empty(B * G * programs * nb * rows, device=q_BHND.device, dtype=torch.float32)
    valid = kv_valid_BN.contiguous() if kv_valid_BN is not None else q_BHND  # unread without HAS_VALID
    for first in range(0, nb, programs * QBT):
        launched = min(programs, triton.cdiv(nb - first, QBT))
        _strided_mass_kernel[(launched, B * G)](
            q_BHND, k_BGND, valid, scratch, out_BHQK, q_BHND.stride(0), q_BHND.stride(1), q_BHND.stride(2),
            k_BGND.stride(0), k_BGND.stride(1), k_BGND.stride(2), valid.stride(0),
            out_BHQK.stride(0), out_BHQK.stride(1), out_BHQK.stride(2), N, nb, G, first, scale * math.log2(math.e),
            HG=HG, HGP=HGP, R=R, RP=RP, QBT=QBT, BLOCK=block_size, D=D, DP=triton.next_power_of_2(D),
            STRIDE=stride, KBT=32, HAS_VALID=kv_valid_BN is not None,
            num_warps=num_warps or default_warps, num_stages=num_stages,
        )
    return out_BHQK
