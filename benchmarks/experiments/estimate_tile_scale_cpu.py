"""One-off: does the candidate estimate survive one int8 scale per 128-key tile? (CPU, real attention)

The candidate kernel's int8 path spends 7 instructions per sampled logit; with one key scale
per tile instead of one per key, the row max is an integer max of the raw dot and the logit one
FMA (5). This measures what the coarser key scale costs the search on SmolLM2's real attention:
the true mass of the kept blocks (recall; 1 minus the mean per-query loss), beside bf16 logits,
the shipped per-token int8, and the oracle at the same per-row counts, and how many kept blocks
change. Queries are int8 per row in both int8 variants (as the kernel rounds them).

    python benchmarks/experiments/estimate_tile_scale_cpu.py --length 32768 --layers 2,10,20
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

import sa_compile.templates.screened_query as screened  # noqa: E402
from sa_compile import SparseConfig  # noqa: E402
from sa_compile.block_mass import true_block_mass  # noqa: E402
from sa_compile.reference import oracle_keep  # noqa: E402
from sa_compile.sparse_op import select_kept_blocks  # noqa: E402


def int8_per_token(x):
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return (x / s).round().clamp(-127, 127) * s


def int8_per_tile(x, block=128):
    """Keys ``[B, G, N, D]`` rounded to int8 with one scale per ``block`` keys (N padded)."""
    n = x.shape[-2]
    pad = (-n) % block
    tiles = torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(-2, (-1, block))
    s = tiles.abs().amax((-1, -2), keepdim=True).clamp(min=1e-30) / 127
    return ((tiles / s).round().clamp(-127, 127) * s).flatten(-3, -2)[..., :n, :]


VARIANTS = {
    "bf16": (None, None),
    "q,k int8 per token": (int8_per_token, int8_per_token),
    "q int8, k per tile": (int8_per_token, int8_per_tile),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--layers", default="2,10,20")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    start = time.time()
    tokenizer = _smollm2.load_tokenizer()
    ids = tokenizer(_smollm2.default_text(), return_tensors="pt").input_ids[:, :args.length]
    model = _smollm2.load_model(yarn_factor=_smollm2.default_yarn_factor(args.length))
    model.model.layers = model.model.layers[:max(layers) + 1]
    with torch.inference_mode():
        _, captured = capture_qk(model, ids, layers)
    print(f"captured {ids.shape[1]} tokens, layers {layers}: {time.time() - start:.0f}s", flush=True)
    scale = model.model.layers[0].self_attn.scaling
    config = SparseConfig(int8_estimate=False)
    exact_mass = screened.candidate_block_mass
    totals = {name: [0.0, 0.0] for name in [*VARIANTS, "oracle"]}
    with torch.inference_mode():
        for layer, (q, k) in captured.items():
            q, k = q.bfloat16().float(), k.bfloat16().float()  # the GPU op's inputs
            mass = true_block_mass(q, k, config.block_size, scale)
            total = float(mass.sum())
            base = None
            for name, rounding in VARIANTS.items():
                def rounded(q_, k_, k_scale, *rest, fq=rounding[0], fk=rounding[1]):
                    return exact_mass(fq(q_) if fq else q_, fk(k_) if fk else k_, k_scale, *rest)
                screened.candidate_block_mass = rounded
                try:
                    keep = select_kept_blocks(q, k, config, scale)
                finally:
                    screened.candidate_block_mass = exact_mass
                recall = float((mass * keep).sum()) / total
                if base is None:
                    base = keep
                    oracle = oracle_keep(mass, keep.sum(-1))
                changed = float((keep & ~base).sum()) / float(base.sum())
                totals[name][0] += recall
                print(f"layer {layer} {name:20s} recall {recall:.5f} loss {1 - recall:.5f} "
                      f"blocks changed vs bf16 {changed:.4f}", flush=True)
            o = float((mass * oracle).sum()) / total
            totals["oracle"][0] += o
            print(f"layer {layer} oracle        recall {o:.5f} loss {1 - o:.5f}", flush=True)
    n = len(captured)
    for name, (r, _) in totals.items():
        print(f"mean over layers: {name:20s} loss {1 - r / n:.5f}")
    print(f"done {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
