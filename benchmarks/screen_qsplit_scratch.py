"""Scratch (2026-12-06): loads qk_miss.pt, which screen_miss_scratch.py writes (layers 8/18/20/23 at 32K); run both from the same folder."""
import sys, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from sa_compile import SparseConfig
from sa_compile.sparse_op import search_density
from sa_compile.selection import select_block_lists, keep_mask
from sa_compile.templates import screened_query as sq
from sa_compile.templates._blocks import block_offsets_QK
from sa_compile.templates.strided_query import strided_block_mass_reference
torch.set_num_threads(2)
qk = torch.load("qk_miss.pt")
cfg = SparseConfig(); bs = 128; N = 32768; nb = N // bs; W = 123


def q_split_screen(q, k, G, scale, split, terms=("mean", "bound")):
    """Screen with query statistics over block/split sub-blocks (each sub-block's mean query), softmaxes summed per block."""
    B, H, n, D = q.shape
    HG = H // G
    qs = q.float().view(B, H, nb * split, bs // split, D).mean(-2) * scale  # [B,H,nb*split,D]
    qs = qs.view(B, G, HG, nb * split, D)
    mean, mx, mn = sq.key_block_stats(k, bs)  # [B,G,nb,D]
    causal = block_offsets_QK(nb, q.device) >= 0
    causal = causal.repeat_interleave(split, 0)  # [nb*split, nb]
    out = 0
    for t in terms:
        if t == "mean":
            lg = torch.einsum("bghxd,bgkd->bghxk", qs, mean)
        else:
            lg = torch.einsum("bghxd,bgkd->bghxk", qs.clamp(min=0), mx) + torch.einsum("bghxd,bgkd->bghxk", qs.clamp(max=0), mn)
        p = torch.softmax(lg.masked_fill(~causal, float("-inf")), -1)  # [B,G,HG,nb*split,nb]
        out = out + p.view(B, G, HG, nb, split, nb).sum((2, 4))
    return out


for layer, (q, k) in qk.items():
    D, G, H = q.shape[-1], k.shape[1], q.shape[1]; scale = D ** -0.5
    massU = strided_block_mass_reference(q, k, None, bs, 8, scale)
    keepU = keep_mask(*select_block_lists(massU, search_density(cfg, nb, "cpu")))
    base = keepU[..., W:, :].sum().item()
    res = []
    for split, terms in ((1, ("mean", "bound")), (4, ("mean", "bound")), (16, ("mean", "bound")), (1, ("mean",)), (1, ("bound",))):
        scr = q_split_screen(q, k, G, scale, split, terms)
        cand = sq.candidate_blocks(scr, W).repeat_interleave(H // G, 1)
        inC = torch.zeros(*cand.shape[:-1], nb + 1, dtype=torch.bool).scatter_(-1, torch.where(cand >= 0, cand, nb), True)[..., :nb]
        res.append(f"q/{split} {'+'.join(terms)}: {(keepU & inC)[..., W:, :].sum().item() / base:.4f}")
    print("layer", layer, "; ".join(res), flush=True)
