"""Real attention (SmolLM2 + YaRN 4, the fidelity harness's text, N tokens, every layer, CPU): where
the screened search keeps other blocks than the unscreened one, is it the screen missing them
or each sample's softmax being normalized over its candidates only? And does a pooled estimate
of the non-candidate mass (each other causal block at its mean key) close the gap?

    python benchmarks/screen_normalization.py 32768
"""
import sys, json, time, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import _smollm2, fidelity
from sa_compile import SparseConfig
from sa_compile.sparse_op import search_density
from sa_compile.selection import select_candidate_lists, select_block_lists, keep_mask
from sa_compile.templates import screened_query as sq
from sa_compile.templates.strided_query import strided_block_mass_reference, sample_positions

N = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
torch.set_num_threads(2)
t0 = time.time()
tok = _smollm2.load_tokenizer()
ids = tok(_smollm2.default_text(), return_tensors="pt").input_ids[:, :N]
model = _smollm2.load_model("cpu", torch.float32, 4)
with torch.no_grad():
    _, captured = fidelity.capture_qk(model, ids, list(range(model.config.num_hidden_layers)))
print(f"captured {len(captured)} layers in {time.time()-t0:.0f}s", flush=True)
cfg = SparseConfig()
bs, width, stride = cfg.block_size, cfg.candidate_width(), cfg.query_stride


def pooled_norm_mass(q, k, cand, scale):
    """Candidate mass with each sample's softmax normalized over its candidates' keys exactly
    plus every other causal block at its mean key (x block size)."""
    B, H, n, D = q.shape
    G, (nb, W) = k.shape[1], cand.shape[-2:]
    HG = H // G
    mean_k = sq.key_block_stats(k, bs)[0]  # [B,G,nb,D]
    out = torch.zeros(B, H, nb, W)
    pos_QR = sample_positions(nb, bs, stride, q.device)  # [nb, R]
    for qb in range(nb):
        c = cand[:, :, qb]  # [B,G,W]
        live = c >= 0
        keys = c.clamp(min=0)[..., None] * bs + torch.arange(bs)  # [B,G,W,bs]
        pos = pos_QR[qb]  # [R]
        ok = pos < n
        kk = k.gather(2, keys.clamp(max=n - 1).reshape(B, G, -1, 1).expand(-1, -1, -1, D)).float()  # [B,G,W*bs,D]
        qs = q[:, :, pos.clamp(max=n - 1)].float().view(B, G, HG, -1, D)  # [B,G,HG,R,D]
        logit = torch.einsum("bghrd,bgxd->bghrx", qs, kk) * scale
        vis = (keys.reshape(B, G, 1, 1, -1) <= pos[None, None, None, :, None]) & live.repeat_interleave(bs, -1)[:, :, None, None, :] & (keys.reshape(B, G, 1, 1, -1) < n)
        logit = logit.masked_fill(~vis, float("-inf"))
        lse_c = torch.logsumexp(logit, -1)  # [B,G,HG,R]
        # pooled non-candidates: causal blocks strictly below the diagonal, not in c
        incand = torch.zeros(B, G, nb + 1, dtype=torch.bool).scatter_(-1, torch.where(live, c, nb), True)[..., :nb]
        other = (~incand) & (torch.arange(nb) < qb)  # [B,G,nb]
        pl = torch.einsum("bghrd,bgkd->bghrk", qs, mean_k) * scale + torch.log(torch.tensor(float(bs)))
        pl = pl.masked_fill(~other[:, :, None, None, :], float("-inf"))
        lse = torch.logaddexp(lse_c, torch.logsumexp(pl, -1))
        p = torch.exp(logit - lse[..., None]).nan_to_num(0.0) * ok[None, None, None, :, None]
        out[:, :, qb] = p.view(B, G, HG, -1, W, bs).sum((-1, -3)).reshape(B, H, W)
    return out


rows_out = []
for layer, (q, k) in captured.items():
    t = time.time()
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    D, G, H = q.shape[-1], k.shape[1], q.shape[1]
    scale = D ** -0.5
    nb = -(-q.shape[2] // bs)
    density = search_density(cfg, nb, "cpu")
    massU = strided_block_mass_reference(q, k, None, bs, stride, scale)
    keepU = keep_mask(*select_block_lists(massU, density))
    keys = sq.screen_ranking_keys_reference(sq.screen_queries(q, G, bs, scale), *sq.key_block_stats(k, bs), width)
    cand = sq.top_candidates(keys, width)
    candH = cand.repeat_interleave(H // G, 1)
    def keep_of(mass):
        mass = mass.nan_to_num(0.0) * (candH >= 0)
        scores = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
        return keep_mask(*select_candidate_lists(scores, candH, nb, density))
    keepS = keep_of(sq.candidate_block_mass_reference(q, k, None, cand, bs, stride, scale))
    keepX = keep_of(massU.gather(-1, candH.clamp(min=0)))
    keepP = keep_of(pooled_norm_mass(q, k, cand, scale))
    sub = slice(int(os.environ.get("FIRST_ROW", width)), nb)  # rows whose candidates are a subset of their causal blocks
    row = {"layer": layer}
    for name, keep in (("screened", keepS), ("exact_norm", keepX), ("pooled_norm", keepP)):
        a, b = keep[..., sub, :], keepU[..., sub, :]
        row[name] = {"kept_recall_vs_unscreened": ((a & b).sum() / b.sum()).item(),
                     "same_rows": (a == b).all(-1).float().mean().item()}
    # unscreened kept blocks outside the candidates
    inC = torch.zeros(*candH.shape[:-1], nb + 1, dtype=torch.bool).scatter_(-1, torch.where(candH >= 0, candH, nb), True)[..., :nb]
    row["unscreened_kept_in_candidates"] = ((keepU & inC)[..., sub, :].sum() / keepU[..., sub, :].sum()).item()
    row["s"] = round(time.time() - t, 1)
    rows_out.append(row)
    print(row, flush=True)
for name in ("screened", "exact_norm", "pooled_norm"):
    for key in ("kept_recall_vs_unscreened", "same_rows"):
        v = [r[name][key] for r in rows_out]
        print(name, key, "mean %.5f min %.5f" % (sum(v) / len(v), min(v)))
v = [r["unscreened_kept_in_candidates"] for r in rows_out]
print("unscreened kept in candidates mean %.5f min %.5f" % (sum(v) / len(v), min(v)))
json.dump({"seq_len": N, "rows": rows_out, "seconds": time.time() - t0}, open(f"screen_normalization_{N}.json", "w"), indent=1)
