"""Scratch: which block scores close the search's gap to the oracle on structured inputs?

Eager, on the CPU: ``benchmarks/structured.py``'s inputs (8 query heads, 2 KV heads, head dim
128, float32, seed 0), density 0.1, no taper. Each candidate score goes through the backend's
own selection (``select_block_lists``: diagonal, sink, then by score, the same per-row counts);
the output is exact attention within the kept blocks. Error is relative to dense attention,
and the ratio is to the oracle's error (the blocks of most true mass at those counts).

Candidates: the backend's templates (``auto`` = max of vertical-slash and pooled block
scores), more last queries, and one not in the backend, "meanq-fullkey": each query block's
mean query against every key (exact per key, not per pooled block), softmax, summed per key
block. "true mass" runs the true block mass through the same selection (the floor here).

    python benchmarks/experiments/structured_estimators_cpu.py N BLOCK   # e.g. 8192 64, 16384 128
"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _structured_inputs import structured_inputs
from sa_compile import SparseConfig
from sa_compile.reference import block_recall, kept_block_attention, oracle_keep, search_counts, true_block_mass
from sa_compile.selection import select_block_lists, tapered_density, keep_mask
from sa_compile.templates._blocks import block_means, normalize_causal_rows
from sa_compile.templates.block_sparse import pooled_block_scores
from sa_compile.templates.vertical_slash import last_q_attention, vertical_slash_block_scores

N, H, G, D, BS = int(sys.argv[1]), 8, 2, 128, int(sys.argv[2])
q, k, v, plan = structured_inputs(N, H, G, D, seed=0, dtype=torch.float32, device="cpu")
scale = D ** -0.5
mass = true_block_mass(q, k, BS, scale)
dense = kept_block_attention(q, k, v, torch.ones_like(mass, dtype=torch.bool), BS, scale)
cfg = SparseConfig(density=0.1, block_size=BS, min_seq_len=0, taper_from=None)
counts = search_counts(cfg, N, "cpu").expand(1, H, -1)
def err(keep):
    out = kept_block_attention(q, k, v, keep, BS, scale)
    return float((out - dense).norm() / dense.norm())
best = oracle_keep(mass, counts)
oe = err(best)
print(f"oracle err {oe:.4f} recall {float(block_recall(mass, best).mean()):.3f}")
def run(name, scores):
    order, count = select_block_lists(scores, tapered_density(0.1, None, scores.shape[-1], "cpu"), False)
    keep = keep_mask(order, count)
    e = err(keep)
    print(f"{name:30s} err {e:.4f} ratio {e/oe:.3f} recall {float(block_recall(mass, keep).mean()):.3f}", flush=True)
attn = last_q_attention(q, k, 64, scale)
vs = vertical_slash_block_scores(attn, BS, q, k, scale)
bsp = pooled_block_scores(q, k, BS, scale)
run("auto (max)", torch.maximum(vs, bsp))
run("vertical_slash", vs)
run("block_sparse", bsp)
run("sum", vs + bsp)
attn256 = last_q_attention(q, k, 256, scale)
vs256 = vertical_slash_block_scores(attn256, BS, q, k, scale)
run("auto last_q=256", torch.maximum(vs256, bsp))
run("true mass (sanity = oracle)", mass / mass.sum(-1, keepdim=True))

def meanq_fullkey(q, k, bs, scale):
    B, H, n, D = q.shape
    nb = n // bs
    qb = block_means(q, bs)  # [B,H,nb,D]
    kh = k.repeat_interleave(H // k.shape[1], 1)
    logits = qb @ kh.transpose(-1, -2) * scale  # [B,H,nb,N]
    key_block = torch.arange(n) // bs
    logits = logits.masked_fill(key_block[None, :] > torch.arange(nb)[:, None], float("-inf"))
    p = torch.softmax(logits, -1)
    return normalize_causal_rows(p.unflatten(-1, (nb, bs)).sum(-1))
mf = meanq_fullkey(q, k, BS, scale)
run("meanq-fullkey alone", mf)
run("max(vs, meanq-fullkey)", torch.maximum(vs, mf))
run("max(vs256, meanq-fullkey)", torch.maximum(vs256, mf))
run("max(vs, bsp, meanq-fullkey)", torch.maximum(torch.maximum(vs, bsp), mf))
