"""One-off: can one strided estimate serve several heads, or the next layer? (CPU, real attention)

Issue 24 lists two ways to cut the search's cost that no run has measured:

- *one estimate per GQA group*: the heads that share a key head share one selection. At equal
  cost the group's heads split the sample between them (head ``i`` of a group of ``G`` samples
  the stride-8 positions of every ``G``-th 8-query group, offset ``i``), their row-normalized
  scores are summed, and every head keeps the group's top blocks at its own per-row count: the
  search's work falls by ``G`` (4 in Llama-3.1-8B, 3 in SmolLM2). Against it, each head alone at
  stride ``8 G`` (the same cost, its own blocks) and the group's full stride-8 scores summed
  (the default's cost: what sharing alone loses).
- *one estimate shared by adjacent layers*: layer ``L`` keeps the blocks layer ``L - 1``'s
  search chose for the same head (no search in layer ``L``).

Every variant keeps the default's per-row counts (the op's own search at 32K fixes them: the
taper starts there), and is scored by the true attention mass its blocks keep (summed over each
row's queries, over rows and heads: 1 is everything), beside the oracle's at the same counts and
the default search's. Every block is scored (no screen): the screen changes kept mass by at most
0.003 at x4 (results.md, "Which screen"). SmolLM2-135M-Instruct + YaRN, the fidelity harness's
default text, float32.

    python benchmarks/experiments/shared_estimate_cpu.py --length 32768 --layers 2,10,20
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
from sa_compile.selection import keep_mask, rank_blocks  # noqa: E402
from sa_compile.sparse_op import select_kept_blocks  # noqa: E402


def sampled_scores(q_HND, k_GND, positions_HP, block, scale):
    """Per head and query-block row, the causal softmax mass that head's sampled queries
    (``positions_HP``, one sorted list per head, equal lengths) give each key block, the row
    normalized to sum 1: ``[H, nb, nb]`` float32."""
    H, N, _ = q_HND.shape
    G, nb = k_GND.shape[0], N // block
    keys = torch.arange(N)
    out = torch.zeros(H, nb, nb)
    for h in range(H):
        pos = positions_HP[h]
        logits = (q_HND[h, pos] @ k_GND[h // (H // G)].T) * scale
        probs = torch.softmax(logits.masked_fill(keys[None, :] > pos[:, None], float("-inf")), -1)
        per_block = probs.view(len(pos), nb, block).sum(-1)
        out[h].index_add_(0, pos // block, per_block)
    return out / out.sum(-1, keepdim=True).clamp(min=1e-30)


def keep_by_scores(scores_HQK, counts_HQ):
    order, _ = rank_blocks(scores_HQK[None])
    return keep_mask(order, counts_HQ[None])[0]


def kept_mass(mass_HQK, keep_HQK):
    return float((mass_HQK * keep_HQK).sum() / mass_HQK.sum())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--layers", default="2,10,20", help="each layer and the one before it are captured")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    targets = [int(x) for x in args.layers.split(",")]
    layers = sorted({x for t in targets for x in (t - 1, t)})
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
    N = ids.shape[1]
    default_keep = {}
    with torch.inference_mode():
        for layer in layers:
            q, k = captured[layer]
            default_keep[layer] = select_kept_blocks(q.float(), k.float(), config, scale)[0]
        for layer in targets:
            q, k = (t.float()[0] for t in captured[layer])
            H, G = q.shape[0], k.shape[0]
            per_group = H // G
            counts = default_keep[layer].sum(-1)
            mass = true_block_mass(q[None], k[None], bs, scale)[0]
            sampled = torch.arange(stride - 1, N, stride)  # the search's sampled positions
            every = sampled_scores(q, k, sampled.expand(H, -1), bs, scale)
            # Head i of its group takes every per_group-th 8-query group, from offset i.
            split = torch.stack([sampled[(h % per_group)::per_group][: len(sampled) // per_group]
                                 for h in range(H)])
            split_scores = sampled_scores(q, k, split, bs, scale)
            # Alone at the same cost: stride 8 * per_group from the head's own first offset.
            alone = keep_by_scores(split_scores, counts)

            def group_sum(s):
                return s.view(G, per_group, *s.shape[1:]).sum(1).repeat_interleave(per_group, 0)

            rows = {
                "oracle": oracle_keep(mass[None], counts[None])[0],
                "default search (op, screened)": default_keep[layer],
                "per head, stride 8, every block": keep_by_scores(every, counts),
                f"group shares stride 8 (default's cost)": keep_by_scores(group_sum(every), counts),
                f"group splits the sample (1/{per_group} the cost)": keep_by_scores(group_sum(split_scores), counts),
                f"per head, stride {stride * per_group} (1/{per_group} the cost)": alone,
                "the previous layer's blocks (no search)": default_keep[layer - 1],
            }
            for name, keep in rows.items():
                print(f"layer {layer} {name:46s} kept mass {kept_mass(mass, keep):.4f}", flush=True)
    print(f"done {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
