"""Scratch (2026-12-06): loads qk_miss.pt, which screen_miss_scratch.py writes (layers 8/18/20/23 at 32K); run both from the same folder."""
import sys, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from sa_compile import SparseConfig
from sa_compile.sparse_op import search_density
from sa_compile.selection import select_block_lists, keep_mask
from sa_compile.templates import screened_query as sq
from sa_compile.templates.strided_query import strided_block_mass_reference
torch.set_num_threads(2)
qk = torch.load("qk_miss.pt")
cfg = SparseConfig(); bs = 128; N = 32768; nb = N // bs; W = 123


def sub_screen(q, k, G, scale, split):
    """Screen with key statistics over block/split sub-blocks; softmax over sub-blocks, summed back per block."""
    sb = bs // split
    qx = sq.screen_queries(q, G, bs, scale)  # [B,G,HG*nb,D]
    mean, mx, mn = sq.key_block_stats(k, sb)  # [B,G,nb*split,D]
    B, _, X, D = qx.shape
    HG = X // nb
    ml = qx @ mean.transpose(-1, -2)
    bl = qx.clamp(min=0) @ mx.transpose(-1, -2) + qx.clamp(max=0) @ mn.transpose(-1, -2)
    qb = torch.arange(nb)[:, None]
    kb = torch.arange(nb * split)[None, :] // split
    causal = kb <= qb
    out = 0
    for lg in (ml, bl):
        lg = lg.view(B, G, HG, nb, nb * split).masked_fill(~causal, float("-inf"))
        p = torch.softmax(lg, -1).view(B, G, HG, nb, nb, split).sum(-1)
        out = out + p.sum(2)
    return out


for layer, (q, k) in qk.items():
    D, G, H = q.shape[-1], k.shape[1], q.shape[1]; scale = D ** -0.5
    massU = strided_block_mass_reference(q, k, None, bs, 8, scale)
    keepU = keep_mask(*select_block_lists(massU, search_density(cfg, nb, "cpu")))
    base = keepU[..., W:, :].sum().item()
    res = []
    for split in (1, 2, 4):
        scr = sub_screen(q, k, G, scale, split)
        cand = sq.candidate_blocks(scr, W).repeat_interleave(H // G, 1)
        inC = torch.zeros(*cand.shape[:-1], nb + 1, dtype=torch.bool).scatter_(-1, torch.where(cand >= 0, cand, nb), True)[..., :nb]
        res.append(f"split {split}: {(keepU & inC)[..., W:, :].sum().item() / base:.4f}")
    print("layer", layer, "; ".join(res), flush=True)
