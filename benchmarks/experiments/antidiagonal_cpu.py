"""Strided queries or antidiagonals? Two block scorings of equal cost on SmolLM2's real attention (CPU).

Both compute ``N^2 D / S`` logits' worth of dot products (stride ``S = 8``) and rank every causal
block; the table gives the true attention mass the blocks they rank highest keep, at the search's
per-row counts, beside the oracle's (the blocks of most true mass at the same counts):

- *strided*: every ``S``-th query of a block against every key it sees, its causal softmax summed
  per key block (``STRIDED_QUERY``, the default's sample);
- *antidiagonal*: every query and every key, in ``S x S`` tiles: each tile's antidiagonal sum
  ``sum_t q[aS + S-1-t] . k[bS + t]`` is one logit, and the causal softmax of those
  ``(N/S)^2`` logits is summed per block: each tile sees all of its queries, each through
  ``1/S`` of the keys. The sum is scaled as one logit (*sum*, XAttention's choice) or as the
  mean of its ``S`` terms (*mean*);
- *strided + antidiagonal*: the strided and the *sum* scores, each row-normalized, added
  (twice the cost).

    python benchmarks/experiments/antidiagonal_cpu.py --length 16384 --block-size 128
    python benchmarks/experiments/antidiagonal_cpu.py --length 16384 --block-size 32 --taper-from 4096
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
from sa_compile.reference import oracle_keep, search_counts  # noqa: E402
from sa_compile.templates.strided_query import strided_block_mass_reference  # noqa: E402

STRIDE = 8


def antidiagonal_block_mass(q, k, block, scale, stride=STRIDE, mean=False):
    """Antidiagonal tile logits' causal softmax, summed per (query block, key block): ``[B, H, nb, nb]``."""
    B, H, N, D = q.shape
    G, T = k.shape[1], N // stride
    assert N % block == 0 and block % stride == 0
    q_t = q[:, :, : T * stride].reshape(B, H, T, stride, D).flip(3).reshape(B, H, T, stride * D)
    k_t = k[:, :, : T * stride].reshape(B, G, T, stride * D).repeat_interleave(H // G, 1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    logits = (q_t @ k_t.transpose(-1, -2)) * (scale / stride if mean else scale)
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    per = block // stride
    nb = N // block
    return probs.view(B, H, nb, per, nb, per).sum((3, 5))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384, help="prompt tokens, a multiple of the block (default: 16384)")
    p.add_argument("--block-size", type=int, default=128, help="block side (default: 128)")
    p.add_argument("--taper-from", type=int, default=32768, help="SparseConfig.taper_from (default: 32768)")
    p.add_argument("--layers", default="2,10,20", help="layers whose q/k are read (default: 2,10,20)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    start = time.time()
    tokenizer = _smollm2.load_tokenizer()
    ids = tokenizer(_smollm2.default_text(), return_tensors="pt").input_ids[:, :args.length]
    model = _smollm2.load_model(yarn_factor=_smollm2.default_yarn_factor(args.length))
    model.model.layers = model.model.layers[:max(layers) + 1]
    with torch.inference_mode():
        _, captured = capture_qk(model, ids, layers)
    print(f"captured {time.time() - start:.0f}s", flush=True)
    scale = model.model.layers[0].self_attn.scaling
    bs = args.block_size
    config = SparseConfig(block_size=bs, min_seq_len=0, taper_from=args.taper_from)
    for layer, (q, k) in captured.items():
        q, k = q.float(), k.float()
        B, H, N, _ = q.shape
        nb = N // bs
        counts = search_counts(config, N, "cpu").expand(B, H, nb)
        mass = true_block_mass(q, k, bs, scale)
        total = mass.sum((-2, -1))

        def kept(scores):
            keep = oracle_keep(scores, counts)
            return float(((mass * keep).sum((-2, -1)) / total).mean())

        def rows_to_one(scores):
            return scores / scores.sum(-1, keepdim=True).clamp(min=1e-30)

        strided = strided_block_mass_reference(q, k, None, bs, STRIDE, scale)
        antidiagonal = antidiagonal_block_mass(q, k, bs, scale)
        antidiagonal_mean = antidiagonal_block_mass(q, k, bs, scale, mean=True)
        print(f"layer {layer}: N={N} nb={nb} K={int(counts.max())} kept mass: oracle {kept(mass):.4f}, "
              f"strided {kept(strided):.4f}, antidiagonal sum {kept(antidiagonal):.4f}, "
              f"antidiagonal mean {kept(antidiagonal_mean):.4f}, "
              f"strided + antidiagonal {kept(rows_to_one(strided) + rows_to_one(antidiagonal)):.4f}", flush=True)
    print(f"done {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
