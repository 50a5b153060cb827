"""Does the candidate estimate survive 8-bit keys? Block recall on real attention (CPU).

The screened search's candidate kernel reads each candidate's 128x128 key tile for the 64
sampled rows of a key-head group; on the H100 at 256K it moves ~86 GB of key tiles per layer
and its time matches L2 bandwidth, not its MMAs or exponentials. Keys stored in 8 bits per
value would halve that traffic. This measures what 8-bit keys (and queries) cost the search
on SmolLM2's real attention: the true mass of the kept blocks (recall; 1 minus the mean
per-query loss), beside bf16 (the GPU op's inputs) and the oracle at the same per-row counts,
and how many kept blocks change.

Quantization is per token (each key's, or query's, largest magnitude maps to the format's
largest value), applied only to the candidate estimate's inputs; the screen sees bf16. The
variants round the inputs of the exact estimate (``int8_estimate=False``); "int8 (the op)" is
the shipped ``SparseConfig()`` default, which should match "q,k int8".

    python benchmarks/experiments/estimate_precision_cpu.py --length 32768 --layers 2,10,20
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


def fp8_per_token(x):
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 448
    return (x / s).to(torch.float8_e4m3fn).float() * s


VARIANTS = {
    "bf16": (None, None),
    "k int8": (None, int8_per_token),
    "k fp8": (None, fp8_per_token),
    "q,k int8": (int8_per_token, int8_per_token),
    "q,k fp8": (fp8_per_token, fp8_per_token),
    "int8 (the op)": None,
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
                if rounding is None:
                    keep = select_kept_blocks(q, k, SparseConfig(), scale)
                else:
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
                print(f"layer {layer} {name:13s} recall {recall:.5f} loss {1 - recall:.5f} "
                      f"blocks changed vs bf16 {changed:.4f}", flush=True)
            o = float((mass * oracle).sum()) / total
            totals["oracle"][0] += o
            print(f"layer {layer} oracle        recall {o:.5f} loss {1 - o:.5f}", flush=True)
    n = len(captured)
    for name, (r, _) in totals.items():
        print(f"mean over layers: {name:13s} loss {1 - r / n:.5f}")
    print(f"done {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
