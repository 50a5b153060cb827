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


def band_screen(q, k, G, scale, low_D, extra_high_softmax, high_gain=1.0):
    qx = sq.screen_queries(q, G, bs, scale)  # [B,G,X,D]
    mean, mx, mn = sq.key_block_stats(k, bs)
    B, _, X, D = qx.shape
    HG = X // nb
    causal = block_offsets_QK(nb, q.device) >= 0
    def sm(lg):
        return torch.softmax(lg.view(B, G, HG, nb, nb).masked_fill(~causal, float("-inf")), -1).sum(2)
    bound = qx.clamp(min=0) @ mx.transpose(-1, -2) + qx.clamp(max=0) @ mn.transpose(-1, -2)
    lo, hi = low_D, ~low_D
    out = sm(bound)
    if extra_high_softmax:
        out = out + sm(qx[..., lo] @ mean[..., lo].transpose(-1, -2)) + sm(high_gain * (qx[..., hi] @ mean[..., hi].transpose(-1, -2)))
    else:
        out = out + sm(qx @ mean.transpose(-1, -2))
    return out


for layer, (q, k) in qk.items():
    D, G, H = q.shape[-1], k.shape[1], q.shape[1]; scale = D ** -0.5
    kb = k.float().view(1, G, nb, bs, D)
    r = (kb.mean(3).abs().mean((0, 1, 2)) / kb.abs().mean((0, 1, 2, 3)))  # per dim: how much survives pooling
    low = r >= 0.5
    massU = strided_block_mass_reference(q, k, None, bs, 8, scale)
    keepU = keep_mask(*select_block_lists(massU, search_density(cfg, nb, "cpu")))
    base = keepU[..., W:, :].sum().item()
    res = [f"low dims {int(low.sum())}/{D}"]
    for name, kw in (("default", dict(extra_high_softmax=False)), ("bands", dict(extra_high_softmax=True)),
                     ("bands, high x4", dict(extra_high_softmax=True, high_gain=4.0))):
        scr = band_screen(q, k, G, scale, low, **kw)
        cand = sq.candidate_blocks(scr, W).repeat_interleave(H // G, 1)
        inC = torch.zeros(*cand.shape[:-1], nb + 1, dtype=torch.bool).scatter_(-1, torch.where(cand >= 0, cand, nb), True)[..., :nb]
        res.append(f"{name}: {(keepU & inC)[..., W:, :].sum().item() / base:.4f}")
    print("layer", layer, "; ".join(res), flush=True)
