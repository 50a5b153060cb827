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
cfg = SparseConfig(); bs = 128; N = 32768; nb = N // bs
for layer, (q, k) in qk.items():
    D, G, H = q.shape[-1], k.shape[1], q.shape[1]; scale = D ** -0.5
    massU = strided_block_mass_reference(q, k, None, bs, 8, scale)
    keepU = keep_mask(*select_block_lists(massU, search_density(cfg, nb, "cpu")))
    base = keepU[..., 123:, :].sum().item()
    out = []
    for width in (82, 123, 164, 205):
        keys = sq.screen_ranking_keys_reference(sq.screen_queries(q, G, bs, scale), *sq.key_block_stats(k, bs), width)
        cand = sq.top_candidates(keys, width).repeat_interleave(H // G, 1)
        inC = torch.zeros(*cand.shape[:-1], nb + 1, dtype=torch.bool).scatter_(-1, torch.where(cand >= 0, cand, nb), True)[..., :nb]
        out.append(f"W={width}: {(keepU & inC)[..., 123:, :].sum().item() / base:.4f}")
    print("layer", layer, "; ".join(out), flush=True)
