"""Scratch: what does the best block selection achieve on SmolLM2? Oracle vs search, fixed vs shared budgets."""
import json, sys, os, math
import torch, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from transformers import AttentionInterface
from sa_compile import SparseConfig
from sa_compile.config import PatternKind
from sa_compile.calibrate import _prompts, _smollm2_model
from sa_compile.selection import rank_blocks, blocks_per_row, keep_mask, grid_cost
from sa_compile.sparse_op import estimate_block_scores, select_kept_blocks
from calibration import metrics
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
L, BS = int(os.environ.get("L", "2048")), int(os.environ.get("BS", "16"))
model, tok = _smollm2_model()
ids = _prompts(tok, None, 1, L, int(os.environ.get("WIN", "4")), 0)
with torch.inference_mode():
    dense = model(ids).logits[0, :-1].double()
MODE = {"sel": "search", "d": 0.1, "alloc": "row"}
STATS = []

def top_global(value_BHQK, total):
    B = value_BHQK.shape[0]
    flat = value_BHQK.reshape(B, -1)
    idx = flat.topk(int(total), dim=-1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True).view_as(value_BHQK)

def choose(scores_BHQK, nb, d, alloc):
    i = torch.arange(nb)
    off = i[:, None] - i[None, :]
    causal = off >= 0
    if alloc == "row":
        order, _ = rank_blocks(scores_BHQK)
        k = blocks_per_row(nb, d, "cpu")
        return keep_mask(order, torch.minimum(k, i + 1).expand(scores_BHQK.shape[:3]))
    if alloc == "layer":
        H = scores_BHQK.shape[1]
        total = H * grid_cost(blocks_per_row(nb, d, "cpu"), nb)
        v = scores_BHQK.float().masked_fill(~causal, float("-inf")).masked_fill(off == 0, float("inf"))
        return top_global(v, total)
    if alloc.startswith("cov"):
        g = float(alloc[3:])
        order, sorted_ = rank_blocks(scores_BHQK)
        vals = scores_BHQK.float().gather(-1, order).masked_fill(~torch.isfinite(sorted_) & (sorted_ < 0), 0)
        vals = vals / vals.sum(-1, keepdim=True)
        excl = vals.cumsum(-1) - vals
        count = (excl < g).sum(-1).clamp(min=1)
        count = torch.minimum(count, i + 1)
        return keep_mask(order, count)
    raise ValueError(alloc)

def fine_scores(q, k, bs, g, scale, qside):
    """Pooled attention at granularity g (keys; queries too if qside), summed into bs blocks."""
    B, H, N, D = q.shape
    G = k.shape[1]
    kr = k.repeat_interleave(H // G, 1)
    qg = q.unflatten(2, (N // (g if qside else bs), -1)).mean(3)
    kg = kr.unflatten(2, (N // g, g)).mean(3)
    logits = (qg @ kg.transpose(-1, -2)) * scale + math.log(g)
    nq, nk = qg.shape[2], kg.shape[2]
    qpos = (torch.arange(nq) + 1) * (N // nq) - 1  # last token of the query unit
    kpos = torch.arange(nk) * g  # first token of key unit
    logits = logits.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    p = torch.softmax(logits, -1)
    nb = N // bs
    p = p.view(B, H, nq, nb, bs // g).sum(-1)
    p = p.view(B, H, nb, nq // nb, nb).mean(3)
    return p

def attn_fn(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
    B, H, N, D = q.shape
    G = k.shape[1]
    kr = k.repeat_interleave(H // G, 1); vr = v.repeat_interleave(H // G, 1)
    nb = N // BS
    s = (q @ kr.transpose(-1, -2)) * scaling
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, float("-inf"))
    if MODE["sel"] == "dense":
        out = torch.softmax(s, -1) @ vr
        return out.transpose(1, 2).contiguous(), None
    p = torch.softmax(s, -1)
    mass = p.view(B, H, nb, BS, nb, BS).sum((3, 5)) / BS
    if MODE["sel"] == "oracle":
        scores = mass
    elif MODE["sel"].startswith("fine") or MODE["sel"].startswith("afine"):
        name = MODE["sel"]
        g = int(name.split("_")[1]); qside = "q" in name.split("_")[0]
        scores = fine_scores(q, k, BS, g, scaling, qside)
        if name.startswith("afine"):
            cfg = SparseConfig(density=MODE["d"], block_size=BS, min_seq_len=0, taper_from=None, pattern=PatternKind.VERTICAL_SLASH)
            scores = torch.maximum(scores, estimate_block_scores(q, k, cfg, scaling))
    elif MODE["sel"].startswith("samp"):
        m = int(MODE["sel"].split("_")[1])
        idx = torch.arange(nb)[:, None] * BS + (BS - 1 - torch.arange(m) * (BS // m))[None, :]  # m queries per block
        ps = p[:, :, idx.flatten()].view(B, H, nb, m, nb, BS).sum(-1).mean(3)
        scores = ps
    elif "pvar" in MODE["sel"]:
        name = MODE["sel"]
        qb_ = q.float().unflatten(2, (nb, BS)); kb_ = kr.float().unflatten(2, (nb, BS))
        qm, km = qb_.mean(3), kb_.mean(3)
        qv, kv = qb_.var(3, unbiased=False), kb_.var(3, unbiased=False)
        lg = (qm @ km.transpose(-1, -2)) * scaling
        w = float(os.environ.get("VARW", "0.5"))
        lg = lg + w * scaling**2 * ((qm * qm) @ kv.transpose(-1, -2))
        if "qk" in name:
            lg = lg + w * scaling**2 * (qv @ (km * km).transpose(-1, -2))
        cb = torch.ones(nb, nb, dtype=torch.bool).tril()
        scores = torch.softmax(lg.masked_fill(~cb, float("-inf")), -1)
        if name.startswith("a"):
            cfg = SparseConfig(density=MODE["d"], block_size=BS, min_seq_len=0, taper_from=None, pattern=PatternKind.VERTICAL_SLASH)
            scores = torch.maximum(scores, estimate_block_scores(q, k, cfg, scaling))
    elif MODE["sel"] in ("vs", "pooled"):
        cfg = SparseConfig(density=MODE["d"], block_size=BS, min_seq_len=0, taper_from=None,
                           pattern=PatternKind.VERTICAL_SLASH if MODE["sel"] == "vs" else PatternKind.BLOCK_SPARSE)
        scores = estimate_block_scores(q, k, cfg, scaling)
    else:  # "search": the default template when the logs were made
        cfg = SparseConfig(density=MODE["d"], block_size=BS, min_seq_len=0, taper_from=None, pattern=PatternKind.AUTO)
        scores = estimate_block_scores(q, k, cfg, scaling)
    if MODE["alloc"] == "hb":
        from sa_compile.selection import select_block_lists
        keep = keep_mask(*select_block_lists(scores, MODE["d"], True))
    else:
        keep = choose(scores, nb, MODE["d"], MODE["alloc"])
    keep = keep & torch.ones(nb, nb, dtype=torch.bool).tril()
    STATS.append((float(keep.sum()) / (B * H * nb * (nb + 1) / 2), float((mass * keep).sum() / (B * H * nb))))
    keep_tok = keep.repeat_interleave(BS, -2).repeat_interleave(BS, -1) & causal
    out = torch.softmax(s.masked_fill(~keep_tok, float("-inf")), -1) @ vr
    return out.transpose(1, 2).contiguous(), None

AttentionInterface.register("scratch", attn_fn)
model.set_attn_implementation("scratch")
for spec in os.environ.get("RUNS", "search:row:0.1").split(","):
    sel, alloc, d = spec.split(":")
    MODE.update(sel=sel, alloc=alloc, d=float(d))
    STATS.clear()
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].double()
    m = metrics(logits, dense, ids[0, 1:])
    STATS.append((1.0, 1.0)) if not STATS else None
    dens = sum(a for a, _ in STATS) / len(STATS); rec = sum(b for _, b in STATS) / len(STATS)
    worst = min(b for _, b in STATS)
    m.update(density=dens, recall=rec, worst_layer_recall=worst, ppl_change=m["ppl"] / m["dense_ppl"] - 1)
    print(spec, json.dumps({k: round(v, 4) for k, v in m.items()}), flush=True)
