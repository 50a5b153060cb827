"""One-off: what bounds the screened search's candidate kernel, timed by variants (CUDA).

The shipped kernel (``templates/_screened_triton.py``) against copies of its tile loop that
each change one thing, on the same candidate lists (the screen's, on ``attention.make_inputs``
q/k, Llama-3.1-8B attention shape), timed with CUDA events, median of ``--repeats``:

- ``magic``: the int32 dot converted to float by adding 0x4B400000 and reinterpreting the
  bits (exact below 2^22: a dot of 128 int8 pairs stays below 2.1e6) instead of ``I2FP``;
- ``tile scale``: one key scale per 128-key tile instead of one per key, so the row max is an
  integer max of the raw dot and the logit is one FMA (5 instructions per logit instead of 7);
- ``f16x2 exp``: the exponentials two at a time (``ex2.approx.f16x2``, half the MUFU issues);
- ``no exp``: the exponential left out (not a valid output: the time without MUFU);
- ``two candidates per step`` (with ``--launches``): one ``[M, 256]`` dot over two candidates'
  key tiles per loop step, each half's log-sum-exp stored, so a program has twice the work in
  flight per step.

Each variant's mass is compared with the shipped per-key int8 kernel's (max abs difference) and
its kept blocks with the bf16-logit kernel's. ``--launches`` times the shipped kernel's launch
shapes instead. Not part of the package or the tests: a one-off,
removed once its numbers are in docs/experiments.md.

    python benchmarks/experiments/candidate_kernel_variants.py --lengths 32k,128k,256k
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _common as common  # noqa: E402
import attention  # noqa: E402

from sa_compile import SparseConfig  # noqa: E402
from sa_compile.templates._blocks import INT8_LIMIT, quantize_int8  # noqa: E402
from sa_compile.templates._screened_triton import candidate_block_mass_cuda  # noqa: E402
from sa_compile.templates._strided_triton import _SCRATCH_BYTES, _row_lse, launch_shape  # noqa: E402
from sa_compile.templates.screened_query import (  # noqa: E402
    key_block_stats, screen_queries, screen_ranking_keys, top_candidates,
)

# (num_warps, num_stages) of the shipped kernel beside its default (4, 3).
LAUNCHES = [(4, 2), (4, 4), (4, 5), (8, 2), (8, 3)]
MAGIC_I = tl.constexpr(0x4B400000)  # the bits of 1.5 * 2**23
MAGIC_F = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def _exp2_f16x2(x):
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=True,
                                     pack=2)


@triton.jit
def _magic_float(x):
    """``x + 1.5 * 2**23`` as a float, exactly, for int32 ``|x| < 2**22``: an integer add and a
    reinterpretation instead of a conversion."""
    return (x + MAGIC_I).to(tl.float32, bitcast=True)


@triton.jit
def _variant_tile_lse(ptr, q8, q_scale, k_base, skn, ks_base, tile_scale_ptr, keys, pos, N, D: tl.constexpr,
                      CAUSAL: tl.constexpr, MAGIC: tl.constexpr, TILE_SCALE: tl.constexpr, EXP: tl.constexpr):
    d = tl.arange(0, D)
    if CAUSAL:
        k = tl.load(k_base + keys[:, None] * skn + d[None, :], mask=keys[:, None] < N, other=0)
        visible = (keys[None, :] <= pos[:, None]) & (keys[None, :] < N)
    else:
        k = tl.load(k_base + keys[:, None] * skn + d[None, :])
    x = tl.dot(q8, tl.trans(k))  # int32
    if TILE_SCALE:  # logit = x * c, c per row: the max is the integer max, the exponent one FMA
        c = q_scale * tl.load(tile_scale_ptr)
        if CAUSAL:
            x = tl.where(visible, x, -(1 << 30))
        top = tl.max(x, 1)
        peak = top.to(tl.float32) * c
        if MAGIC:
            a = _magic_float(x) * c[:, None] - ((top.to(tl.float32) + MAGIC_F) * c)[:, None]
        else:
            a = x.to(tl.float32) * c[:, None] - peak[:, None]
        if CAUSAL:
            a = tl.where(visible, a, float("-inf"))
            peak = tl.where(tl.max(visible.to(tl.int32), 1) > 0, peak, 0.0)
    else:  # logit = x * q_scale * k_scale
        if CAUSAL:
            k_scale = tl.load(ks_base + keys, mask=keys < N, other=0.0)
        else:
            k_scale = tl.load(ks_base + keys)
        if MAGIC:
            t = _magic_float(x) * q_scale[:, None] - q_scale[:, None] * MAGIC_F
        else:
            t = x.to(tl.float32) * q_scale[:, None]
        s = t * k_scale[None, :]
        if CAUSAL:
            s = tl.where(visible, s, float("-inf"))
        peak = tl.max(s, 1)
        peak = tl.where(peak == float("-inf"), 0.0, peak)
        a = s - peak[:, None]
    if EXP == 0:
        e = tl.exp2(a)
    elif EXP == 1:
        e = _exp2_f16x2(a.to(tl.float16)).to(tl.float32)
    else:
        e = a * 1e-3 + 1.0  # not an exponential: the time without one
    tl.store(ptr, peak + tl.log2(tl.sum(e, 1)))


@triton.jit
def _pair_tile_lse(scratch, w, m, has2, q8, q_scale, k_base, skn, ks_base, blk0, blk1, M: tl.constexpr,
                   BLOCK: tl.constexpr, D: tl.constexpr):
    """Two candidates' key tiles in one ``[M, 2 * BLOCK]`` int8 dot (per-key scales); each
    half's log-sum-exp to slots ``w`` and ``w + 1`` (the second only where ``has2``)."""
    d = tl.arange(0, D)
    j = tl.arange(0, 2 * BLOCK)
    keys = tl.where(j >= BLOCK, blk1 * BLOCK + j - BLOCK, blk0 * BLOCK + j)
    k = tl.load(k_base + keys[:, None] * skn + d[None, :])
    k_scale = tl.load(ks_base + keys)
    s = tl.dot(q8, tl.trans(k)).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
    s3 = tl.reshape(s, (M, 2, BLOCK))
    peak = tl.max(s3, 2)
    lse = peak + tl.log2(tl.sum(tl.exp2(s3 - peak[:, :, None]), 2))
    half = tl.arange(0, 2)
    tl.store(scratch + (w + half)[None, :] * M + m[:, None], lse, mask=((half == 0) | has2)[None, :])


@triton.jit
def _variant_kernel(Q, K, KS, TS, CAND, SCRATCH, OUT, sqh, sqn, skh, skn, sksh, sth, scg, scq, soh, soq, N, G,
                    qb_first, scale2, HG: tl.constexpr, HGP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                    W: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, KBT: tl.constexpr,
                    MAGIC: tl.constexpr, TILE_SCALE: tl.constexpr, EXP: tl.constexpr, PAIR: tl.constexpr):
    M: tl.constexpr = HGP * RP
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    qb = qb_first + tile
    g = tl.program_id(1)
    m = tl.arange(0, M)
    hh = m // RP
    r = m % RP
    pos = qb * BLOCK + (r + 1) * STRIDE - 1
    row_ok = (hh < HG) & (r < R) & (pos < N)
    d = tl.arange(0, D)
    q = tl.load(Q + (g * HG + hh)[:, None] * sqh + pos[:, None] * sqn + d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32) * scale2
    q_scale = tl.max(tl.abs(q), 1) / 127
    steps = tl.where(q_scale[:, None] > 0, q / q_scale[:, None], 0.0)
    q8 = tl.clamp(tl.floor(steps + 0.5), -127, 127).to(tl.int8)
    keys0 = tl.arange(0, BLOCK)
    cand = CAND + g * scg + qb.to(tl.int64) * scq
    scratch = SCRATCH + (g * tl.num_programs(0) + tile).to(tl.int64) * W * M
    live = tl.minimum(qb + 1, W)
    k_base, ks_base, ts_base = K + g * skh, KS + g * sksh, TS + g * sth
    blk = tl.load(cand)
    _variant_tile_lse(scratch + m, q8, q_scale, k_base, skn, ks_base, ts_base + blk, blk * BLOCK + keys0, pos, N, D,
                      True, MAGIC, TILE_SCALE, EXP)
    if PAIR:  # two candidates per step (int8 per key, exp2 only)
        for w in range(1, live, 2):
            has2 = w + 1 < live
            _pair_tile_lse(scratch, w, m, has2, q8, q_scale, k_base, skn, ks_base, tl.load(cand + w),
                           tl.load(cand + w + 1, mask=has2, other=0), M, BLOCK, D)
    else:
        for w in range(1, live):
            blk = tl.load(cand + w)
            _variant_tile_lse(scratch + w * M + m, q8, q_scale, k_base, skn, ks_base, ts_base + blk,
                              blk * BLOCK + keys0, pos, N, D, False, MAGIC, TILE_SCALE, EXP)
    row_lse = _row_lse(scratch, m, live, M, KBT)
    counted = row_ok & (row_lse > float("-inf"))
    j = tl.arange(0, HGP)
    slot = tl.arange(0, KBT)
    out_row = OUT + (g * HG + j)[:, None] * soh + qb.to(tl.int64) * soq
    for w0 in range(0, W, KBT):
        blse = tl.load(scratch + (w0 + slot)[None, :] * M + m[:, None], mask=(w0 + slot < live)[None, :],
                       other=float("-inf"))
        p = tl.where(counted[:, None], tl.exp2(blse - row_lse[:, None]), 0.0)
        mass = tl.sum(tl.reshape(p, (HGP, RP, KBT)), 1)
        tl.store(out_row + (w0 + slot)[None, :], mass, mask=(j < HG)[:, None] & (w0 + slot < W)[None, :])


def variant_mass(q, k8, k_scale, tile_scale, cand, block, stride, scale, *, magic, tile_scale_on, exp, pair=False,
                 num_warps=4, num_stages=3):
    """The variant kernel's ``[1, H, nb, W]`` mass (batch 1, no key padding, N a multiple of ``block``)."""
    _, H, N, D = q.shape
    G = k8.shape[1]
    nb, W = cand.shape[-2:]
    HG, R = H // G, block // stride
    HGP, RP, _, _ = launch_shape(HG, R)
    out = torch.empty(1, H, nb, W, device=q.device, dtype=torch.float32)
    programs = max(1, min(nb, _SCRATCH_BYTES // (G * W * HGP * RP * 4)))
    scratch = torch.empty(G * programs * W * HGP * RP, device=q.device, dtype=torch.float32)
    cand = cand.to(torch.int32).contiguous()
    for first in range(0, nb, programs):
        _variant_kernel[(min(programs, nb - first), G)](
            q, k8, k_scale, tile_scale, cand, scratch, out, q.stride(1), q.stride(2), k8.stride(1), k8.stride(2),
            k_scale.stride(1), tile_scale.stride(1), cand.stride(1), cand.stride(2), out.stride(1), out.stride(2),
            N, G, first, scale * math.log2(math.e), HG=HG, HGP=HGP, R=R, RP=RP, W=W, BLOCK=block, D=D,
            STRIDE=stride, KBT=32, MAGIC=magic, TILE_SCALE=tile_scale_on, EXP=exp, PAIR=pair, num_warps=num_warps,
            num_stages=num_stages)
    return out


def quantize_int8_tiles(k, block):
    """Keys as int8 with one scale per ``block``-key tile (N a multiple of ``block``): ``(k8, scale_BGK)``
    (the package's form of it at commit 746d8b4)."""
    tiles = k.float().unflatten(2, (k.shape[2] // block, block))
    scale = tiles.abs().amax((-1, -2)) / INT8_LIMIT
    k8 = torch.floor(tiles / scale[..., None, None].clamp(min=1e-30) + 0.5).clamp(-INT8_LIMIT, INT8_LIMIT)
    return k8.to(torch.int8).flatten(2, 3).contiguous(), scale.contiguous()


def kept_agreement(mass_a, mass_b, cand, keep: int):
    """Share of the top-``keep`` candidates by ``mass_a`` that are also top-``keep`` by ``mass_b``."""
    top_a = mass_a.topk(keep, -1).indices
    top_b = mass_b.topk(keep, -1).indices
    same = (top_a[..., :, None] == top_b[..., None, :]).any(-1)
    return same.float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="32k,128k,256k")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--launches", action="store_true",
                        help="time the shipped kernel's launch shapes (LAUNCHES) instead of the variants")
    args = parser.parse_args()
    device = torch.device("cuda")
    shape = {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}
    config = SparseConfig()
    block, stride, width = config.block_size, config.query_stride, config.candidate_width()
    rows = []
    for n in common.parse_lengths(args.lengths):
        q, k, _ = attention.make_inputs(n, shape, device, seed=0)
        scale = q.shape[-1] ** -0.5
        stats = key_block_stats(k, block)
        cand = top_candidates(screen_ranking_keys(screen_queries(q, k.shape[1], block, scale), *stats, width), width)
        k8, k_scale = quantize_int8(k)
        kt8, tile_scale = quantize_int8_tiles(k, block)
        shipped = {
            "shipped: int8 per key": lambda: candidate_block_mass_cuda(q, k8, k_scale, None, cand, block, stride, scale),
            "shipped: bf16 logits": lambda: candidate_block_mass_cuda(q, k, None, None, cand, block, stride, scale),
        }
        for warps, stages in LAUNCHES if args.launches else []:
            shipped[f"shipped: int8 per key, {warps} warps, {stages} stages"] = (
                lambda warps=warps, stages=stages: candidate_block_mass_cuda(
                    q, k8, k_scale, None, cand, block, stride, scale, num_warps=warps, num_stages=stages))
        variants = {
            "int8 per key, two candidates per step, 4 warps": (k8, dict(magic=False, tile_scale_on=False, exp=0,
                                                                      pair=True)),
            "int8 per key, two candidates per step, 8 warps, 2 stages": (
                k8, dict(magic=False, tile_scale_on=False, exp=0, pair=True, num_warps=8, num_stages=2)),
        } if args.launches else {
            "int8 per key, copy of shipped": (k8, dict(magic=False, tile_scale_on=False, exp=0)),
            "int8 per key, magic conversion": (k8, dict(magic=True, tile_scale_on=False, exp=0)),
            "int8 per key, f16x2 exp": (k8, dict(magic=False, tile_scale_on=False, exp=1)),
            "int8 per key, no exp (timing only)": (k8, dict(magic=False, tile_scale_on=False, exp=2)),
            "int8 per tile": (kt8, dict(magic=False, tile_scale_on=True, exp=0)),
            "int8 per tile, magic conversion": (kt8, dict(magic=True, tile_scale_on=True, exp=0)),
        }
        fns = dict(shipped)
        for name, (keys, kw) in variants.items():
            fns[name] = (lambda keys=keys, kw=kw: variant_mass(q, keys, k_scale, tile_scale, cand, block, stride,
                                                                 scale, **kw))
        outs = {name: fn() for name, fn in fns.items()}
        torch.cuda.synchronize()
        reference, bf16 = outs["shipped: int8 per key"], outs["shipped: bf16 logits"]
        keep = max(1, int(width / config.candidates))  # a row's kept blocks past the taper
        for name, fn in fns.items():
            t = common.time_fn(fn, device, repeats=args.repeats, warmup=2)
            row = {"seq_len": n, "variant": name, "ms": t.median_s * 1e3,
                   "max_abs_diff_vs_int8_per_key": (outs[name] - reference).abs().max().item(),
                   "kept_agreement_vs_bf16_logits": kept_agreement(outs[name], bf16, cand, keep)}
            rows.append(row)
            print(f"N={common.length_label(n)} {name:40s} {row['ms']:8.3f} ms  diff {row['max_abs_diff_vs_int8_per_key']:.2e}"
                  f"  kept vs bf16 {row['kept_agreement_vs_bf16_logits']:.4f}", flush=True)
        del q, k, k8, kt8, outs
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": common.environment(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
