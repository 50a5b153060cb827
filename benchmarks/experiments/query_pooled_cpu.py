"""Does a per-query pooled signal protect the queries the sample misses? (CPU, real attention)

The default search's excess loss over the oracle falls on the queries it does not sample
(docs/experiments.md). Here every query of a block scores the row's candidates by their
pooled keys (a softmax over the candidates of its logit against each block's mean key, and
one against the block's per-dimension bound, averaged), the maximum over the block's queries
is taken per candidate, and that signal (rows normalized to 1) is added with weight LAMBDA to
the sampled scores before the same selection. Reads the per-query mass lost, as
query_misses_cpu.py did, beside the oracle at the same per-row counts.

    python benchmarks/experiments/query_pooled_cpu.py --length 32768 --layers 10,20 --weights 0,0.5,2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _smollm2  # noqa: E402
from fidelity import capture_qk  # noqa: E402

from sa_compile import SparseConfig  # noqa: E402
from sa_compile.block_mass import true_block_mass  # noqa: E402
from sa_compile.reference import oracle_keep  # noqa: E402
from sa_compile.selection import keep_mask, select_candidate_lists  # noqa: E402
from sa_compile.sparse_op import search_density  # noqa: E402
from sa_compile.templates.screened_query import key_block_stats, screened_query_lists  # noqa: E402


def query_losses(q, k, keep_HQK, block, scale, chunk_blocks=8):
    """Per query, the true attention mass outside its row's kept blocks: ``[H, N]``."""
    _, H, N, _ = q.shape
    G, nb = k.shape[1], N // block
    out = torch.empty(H, N)
    keys = torch.arange(N)
    for h in range(H):
        kh = k[0, h // (H // G)]
        for qb0 in range(0, nb, chunk_blocks):
            rows = slice(qb0 * block, min(nb, qb0 + chunk_blocks) * block)
            pos = torch.arange(rows.start, rows.stop)
            probs = torch.softmax(((q[0, h, rows] @ kh.T) * scale).masked_fill(keys[None, :] > pos[:, None],
                                                                             float("-inf")), -1)
            kept = keep_HQK[h, pos // block].float()
            out[h, rows] = 1 - (probs.view(len(pos), nb, block).sum(-1) * kept).sum(-1)
    return out.clamp(min=0)


def per_query_pooled(q, k, blocks_BHQW, block, scale):
    """Per row and candidate, the maximum over the block's queries of their pooled probability
    of the candidate: ``[H, nb, W]``, rows normalized to 1 (0 for empty slots)."""
    _, H, N, D = q.shape
    G, nb = k.shape[1], N // block
    mean, kmax, kmin = (s[0] for s in key_block_stats(k, block))  # [G, nb, D]
    out = torch.zeros(H, nb, blocks_BHQW.shape[-1])
    for h in range(H):
        g = h // (H // G)
        cand = blocks_BHQW[0, h]  # [nb, W]
        live = cand >= 0
        c = cand.clamp(min=0)
        qh = (q[0, h] * scale).view(nb, block, D)
        mean_logits = qh @ mean[g][c].transpose(-1, -2)  # [nb, block, W]
        bound_logits = qh.clamp(min=0) @ kmax[g][c].transpose(-1, -2) + qh.clamp(max=0) @ kmin[g][c].transpose(-1, -2)
        p = 0
        for logits in (mean_logits, bound_logits):
            p = p + torch.softmax(logits.masked_fill(~live[:, None, :], float("-inf")), -1) / 2
        signal = p.amax(1)
        out[h] = signal / signal.sum(-1, keepdim=True).clamp(min=1e-30)
    return out


def summary(losses, sampled):
    flat = losses.flatten()
    qs = torch.quantile(flat[torch.randperm(flat.numel())[:2_000_000]], torch.tensor([0.99, 0.999]))
    return {"mean": float(flat.mean()), "sampled": float(losses[:, sampled].mean()),
            "unsampled": float(losses[:, ~sampled].mean()), "p99": float(qs[0]), "p99.9": float(qs[1]),
            "max": float(flat.max()), "over_0.2": float((flat > 0.2).float().mean())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--layers", default="10,20")
    p.add_argument("--weights", default="0,0.5,2", help="LAMBDA values (0: the default search)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    weights = [float(x) for x in args.weights.split(",")]
    start = time.time()
    tokenizer = _smollm2.load_tokenizer()
    ids = tokenizer(_smollm2.default_text(), return_tensors="pt").input_ids[:, :args.length]
    model = _smollm2.load_model(yarn_factor=_smollm2.default_yarn_factor(args.length))
    model.model.layers = model.model.layers[:max(layers) + 1]
    with torch.inference_mode():
        _, captured = capture_qk(model, ids, layers)
    print(f"captured {ids.shape[1]} tokens, layers {layers}: {time.time() - start:.0f}s", flush=True)
    scale = model.model.layers[0].self_attn.scaling
    config = SparseConfig()
    bs, stride = config.block_size, config.query_stride
    with torch.inference_mode():
        for layer, (q, k) in captured.items():
            q, k = q.float(), k.float()
            N = q.shape[2]
            nb = N // bs
            sampled = (torch.arange(N) % stride) == stride - 1
            scores, blocks = screened_query_lists(q, k, bs, stride, scale, config.candidate_width())
            pooled = per_query_pooled(q, k, blocks, bs, scale)[None]
            density = search_density(config, nb, q.device)
            keeps = {}
            for w in weights:
                keeps[f"lambda {w:g}"] = keep_mask(*select_candidate_lists(scores + w * pooled, blocks, nb, density))
            counts = keeps[f"lambda {weights[0]:g}"].sum(-1)
            keeps["oracle"] = oracle_keep(true_block_mass(q, k, bs, scale), counts)
            for name, keep in keeps.items():
                assert torch.equal(keep.sum(-1), counts), "equal per-row counts"
                s = summary(query_losses(q, k, keep[0], bs, scale), sampled)
                print(f"layer {layer} {name:10s} " + " ".join(f"{key} {v:.4f}" for key, v in s.items()), flush=True)
    print(f"done {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
