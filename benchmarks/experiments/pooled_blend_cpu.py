"""One-off: blend the candidates' sampled mass with a per-head pooled score (mean query of the
block against mean key of each block: sees every query). Kept mass at equal per-row counts."""
import sys, time, argparse
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
import _smollm2
from fidelity import capture_qk
from sa_compile import SparseConfig
from sa_compile.block_mass import true_block_mass
from sa_compile.reference import oracle_keep
from sa_compile.selection import select_candidate_lists, keep_mask
from sa_compile.sparse_op import search_density
from sa_compile.templates.screened_query import screened_query_lists, key_block_stats, screen_queries
from sa_compile.templates._blocks import num_blocks, block_means, block_offsets_QK

p = argparse.ArgumentParser(); p.add_argument("--length", type=int, default=16384); p.add_argument("--layers", default="2,10,20")
args = p.parse_args()
torch.set_num_threads(2); start = time.time()
layers = [int(x) for x in args.layers.split(",")]
tok = _smollm2.load_tokenizer()
ids = tok(_smollm2.default_text(), return_tensors="pt").input_ids[:, :args.length]
model = _smollm2.load_model(yarn_factor=_smollm2.default_yarn_factor(args.length))
model.model.layers = model.model.layers[:max(layers) + 1]
with torch.inference_mode():
    _, captured = capture_qk(model, ids, layers)
print(f"captured {ids.shape[1]} tokens: {time.time()-start:.0f}s", flush=True)
scale = model.model.layers[0].self_attn.scaling
config = SparseConfig()
bs = config.block_size
with torch.inference_mode():
    for layer in layers:
        q, k = (t.float() for t in captured[layer])
        B, H, N, D = q.shape; G = k.shape[1]
        nb = num_blocks(N, bs)
        mass = true_block_mass(q, k, bs, scale); total = mass.sum()
        scores, blocks = screened_query_lists(q, k, bs, config.query_stride, scale, config.candidate_width(), None, True)
        density = search_density(config, nb, q.device)
        # per-head pooled scores
        qm = block_means(q, bs) * scale  # B H nb D
        km = key_block_stats(k, bs)[0]  # B G nb D
        kmh = km.repeat_interleave(H // G, 1)
        logits = qm @ kmh.transpose(-1, -2)
        causal = block_offsets_QK(nb, q.device) >= 0
        pooled = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        mx, mn = key_block_stats(k, bs)[1:]
        mxh, mnh = mx.repeat_interleave(H // G, 1), mn.repeat_interleave(H // G, 1)
        bound = qm.clamp(min=0) @ mxh.transpose(-1, -2) + qm.clamp(max=0) @ mnh.transpose(-1, -2)
        pbound = torch.softmax(bound.masked_fill(~causal, float("-inf")), -1)
        def gathered(grid):
            g = grid.gather(-1, blocks.clamp(min=0)) * (blocks >= 0)
            return g / g.sum(-1, keepdim=True).clamp(min=1e-30)
        gp, gb = gathered(pooled), gathered(pbound)
        variants = {"default": scores}
        for lam in (0.05, 0.15, 0.3):
            variants[f"mean-pooled {lam}"] = (1 - lam) * scores + lam * gp
        for lam in (0.05, 0.15):
            variants[f"mean+bound {lam}"] = (1 - lam) * scores + lam * 0.5 * (gp + gb)
        base = None
        for name, s in variants.items():
            order, count = select_candidate_lists(s, blocks, nb, density)
            keep = keep_mask(order, count)
            if base is None:
                base = keep; counts = keep.sum(-1)
                okeep = oracle_keep(mass, counts)
            assert torch.equal(keep.sum(-1), counts)
            print(f"layer {layer} {name:20s} kept mass {float((mass*keep).sum()/total):.5f}", flush=True)
        print(f"layer {layer} {'oracle':20s} kept mass {float((mass*okeep).sum()/total):.5f}", flush=True)
print(f"done {time.time()-start:.0f}s")
