"""Scratch: which blocks does the screen miss (kept by the unscreened search, not proposed)?"""
import sys, time, os
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import torch
import _smollm2, fidelity
from sa_compile import SparseConfig
from sa_compile.sparse_op import search_density
from sa_compile.selection import select_block_lists, keep_mask
from sa_compile.templates import screened_query as sq
from sa_compile.templates.strided_query import strided_block_mass_reference

N = 32768
torch.set_num_threads(2)
tok = _smollm2.load_tokenizer()
ids = tok(_smollm2.default_text(), return_tensors="pt").input_ids[:, :N]
model = _smollm2.load_model("cpu", torch.float32, 4)
layers = [8, 18, 20, 23]
with torch.no_grad():
    _, captured = fidelity.capture_qk(model, ids, layers)
torch.save({l: (q.to(torch.bfloat16), k.to(torch.bfloat16)) for l, (q, k) in captured.items()}, "qk_miss.pt")
cfg = SparseConfig()
bs, width, stride = cfg.block_size, cfg.candidate_width(), cfg.query_stride
for layer, (q, k) in captured.items():
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    D, G, H = q.shape[-1], k.shape[1], q.shape[1]
    scale = D ** -0.5
    nb = N // bs
    massU = strided_block_mass_reference(q, k, None, bs, stride, scale)
    keepU = keep_mask(*select_block_lists(massU, search_density(cfg, nb, "cpu")))
    keys = sq.screen_ranking_keys_reference(sq.screen_queries(q, G, bs, scale), *sq.key_block_stats(k, bs), width)
    cand = sq.top_candidates(keys, width).repeat_interleave(H // G, 1)
    inC = torch.zeros(*cand.shape[:-1], nb + 1, dtype=torch.bool).scatter_(-1, torch.where(cand >= 0, cand, nb), True)[..., :nb]
    miss = keepU & ~inC
    miss[..., :width, :] = False
    b, h, qb, kb = miss.nonzero(as_tuple=True)
    off = qb - kb
    print(f"layer {layer}: missed {len(off)} of {keepU[..., width:, :].sum().item()} kept; per head", torch.bincount(h, minlength=H).tolist())
    print("  offset quantiles", torch.quantile(off.float(), torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])).tolist())
    print("  offsets <= 4:", (off <= 4).float().mean().item(), " kb < 4:", (kb < 4).float().mean().item())
    # screen rank of missed blocks within the key head's row
    keysH = keys.repeat_interleave(H // G, 1)[..., :nb]
    rank = (keysH[b, h, qb] > keysH[b, h, qb, kb][:, None]).sum(-1)
    print("  screen rank quantiles", torch.quantile(rank.float(), torch.tensor([0.1, 0.5, 0.9])).tolist())
    # the unscreened score share of missed blocks in their rows, and rank among the unscreened
    rU = (massU[b, h, qb] > massU[b, h, qb, kb][:, None]).sum(-1)
    print("  unscreened rank quantiles", torch.quantile(rU.float(), torch.tensor([0.1, 0.5, 0.9])).tolist())
    # how many distinct key blocks are missed (columns?)
    print("  distinct kb:", len(torch.unique(kb)), " top kb:", torch.bincount(kb).topk(5).indices.tolist(), torch.bincount(kb).topk(5).values.tolist())
