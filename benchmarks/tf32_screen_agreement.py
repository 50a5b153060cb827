"""Real attention (SmolLM2 + YaRN, the fidelity harness's text, N tokens): does TF32 in the
screen's dots change the candidates or the kept blocks? The float32 screen against TF32 emulated
(operands rounded, or truncated, to 10 mantissa bits), every layer, on the CPU.

    python benchmarks/tf32_screen_agreement.py 32768
"""
import sys, json, time
sys.path.insert(0, __import__("os").path.dirname(__file__))
import torch
import _smollm2, fidelity
from sa_compile import SparseConfig
from sa_compile.sparse_op import search_density
from sa_compile.selection import select_candidate_lists, keep_mask
from sa_compile.templates import screened_query as sq

N = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
torch.set_num_threads(2)
t0 = time.time()
tok = _smollm2.load_tokenizer()
ids = tok(_smollm2.default_text() if len(sys.argv) < 3 else open(sys.argv[2]).read(), return_tensors="pt").input_ids[:, :N]
model = _smollm2.load_model("cpu", torch.float32, _smollm2.default_yarn_factor(N) if N > 8192 * 4 else 4)
layers = list(range(model.config.num_hidden_layers))
with torch.no_grad():
    _, captured = fidelity.capture_qk(model, ids, layers)
print(f"captured {len(captured)} layers in {time.time()-t0:.0f}s", flush=True)

def tf32(x, mode):
    i = x.float().contiguous().view(torch.int32)
    if mode == "round":
        i = (i + 0x1000) & ~0x1FFF
    else:
        i = i & ~0x1FFF
    return i.view(torch.float32)

cfg = SparseConfig()
bs, width = cfg.block_size, cfg.candidate_width()
out = []
for layer, (q, k) in captured.items():
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    D = q.shape[-1]
    G = k.shape[1]
    qx = sq._screen_queries(q, G, bs, D ** -0.5)
    stats = sq.key_block_stats(k, bs)
    ref_keys = sq.screen_ranking_keys_reference(qx, *stats, width)
    nb = stats[0].shape[2]
    density = search_density(cfg, nb, "cpu")
    def kept(keys):
        cand = sq.top_candidates(keys, width)
        mass = sq.candidate_block_mass_reference(q, k, None, cand, bs, cfg.query_stride, D ** -0.5).nan_to_num(0.0)
        scores = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
        order, count = select_candidate_lists(scores, cand.repeat_interleave(q.shape[1] // G, 1), nb, density)
        return cand, keep_mask(order, count)
    cand_ref, keep_ref = kept(ref_keys)
    row = {"layer": layer}
    for mode in ("round", "truncate"):
        l2e = 1.4426950408889634
        keys = sq.screen_ranking_keys_reference(tf32(qx * l2e, mode) / l2e, *[tf32(t, mode) for t in stats], width)
        cand, keep = kept(keys)
        sets = [torch.zeros(*c.shape[:-1], nb + 1, dtype=torch.bool).scatter_(-1, torch.where(c >= 0, c, nb), True)[..., :nb]
                for c in (cand, cand_ref)]
        row[mode] = {"candidate_recall": ((sets[0] & sets[1]).sum() / sets[1].sum()).item(),
                     "kept_recall": ((keep & keep_ref).sum() / keep_ref.sum()).item(),
                     "kept_same_rows": (keep == keep_ref).all(-1).float().mean().item()}
    out.append(row)
    print(row, flush=True)
for mode in ("round", "truncate"):
    for key in ("candidate_recall", "kept_recall", "kept_same_rows"):
        vals = [r[mode][key] for r in out]
        print(mode, key, "mean", sum(vals) / len(vals), "min", min(vals))
json.dump({"seq_len": N, "rows": out, "seconds": time.time() - t0}, open(f"tf32_screen_agreement_{N}.json", "w"), indent=1)
