"""Scratch: FlexAttention kernel options on the GPU, for the sparse op's kernel.

One attention layer (32 query heads, 8 KV heads, dim 128, bf16; ``benchmarks/attention.py``'s
inputs). Per length: cuDNN SDPA, then the compiled flex_attention kernel under each option set
over three BlockMasks: dense causal, and the search's at density 0.1 and 0.8 (no taper).
Device events, 3 warm-ups, median of 10. Error is relative to the default options' output.

    python benchmarks/experiments/flex_options.py --out DIR [--lengths 32k,128k]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as common  # noqa: E402
from attention import CPU_SHAPE, CUDA_SHAPE, as_block_mask, causal_block_mask, dense_sdpa, make_inputs, \
    rel_error, sparse_search  # noqa: E402

from sa_compile import PatternKind, SparseConfig  # noqa: E402

OPTIONS = {
    "default": {},
    "rows_safe": {"ROWS_GUARANTEED_SAFE": True},
    "prescale": {"PRESCALE_QK": True},
    "tma": {"USE_TMA": True},
    "m128_n128_w8_s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "m128_n64_w8_s4": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
    "m128_n64_w4_s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "safe_prescale_tma": {"ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True, "USE_TMA": True},
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--options", default=",".join(OPTIONS))
    args = p.parse_args()
    # One lambda code object serves every option set: each set and mask is its own guard entry.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 256
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = CUDA_SHAPE if device.type == "cuda" else CPU_SHAPE
    lengths = common.parse_lengths(args.lengths or shape["lengths"])
    bs = shape["block_size"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()

    def say(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    kernels = {name: torch.compile(lambda q, k, v, bm, o=opts: flex_attention(q, k, v, block_mask=bm, enable_gqa=True,
                                                                               kernel_options=o or None),
                                   fullgraph=True, dynamic=True)
               for name, opts in OPTIONS.items() if name in args.options.split(",")}
    for n in lengths:
        q, k, v = make_inputs(n, shape, device, seed=0)
        label, sdpa = dense_sdpa(q, k, v, device, say)
        t = common.time_fn(sdpa, device, repeats=10, warmup=3).median_s
        rows.append({"n": n, "kernel": label, "mask": "causal", "ms": t * 1e3})
        say(f"N={n} {label}: {t * 1e3:.2f} ms")
        masks = {"causal": causal_block_mask(n, bs, device)}
        for d in (0.1, 0.8):
            cfg = SparseConfig(density=d, block_size=bs, min_seq_len=0, taper_from=None,
                               pattern=PatternKind.AUTO)  # the default when it ran
            masks[f"search d={d}"] = as_block_mask(sparse_search(cfg, device)(q, k), n, bs)
        for mask_name, bm in masks.items():
            ref = None
            for name, fn in kernels.items():
                try:
                    out = fn(q, k, v, bm)
                    ref = out if ref is None else ref
                    t = common.time_fn(lambda: fn(q, k, v, bm), device, repeats=10, warmup=3).median_s
                    row = {"n": n, "kernel": name, "mask": mask_name, "ms": t * 1e3, "rel_err": rel_error(out, ref)}
                except Exception as exc:  # an option set the kernel refuses is a result too
                    row = {"n": n, "kernel": name, "mask": mask_name, "error": str(exc).splitlines()[0][:200]}
                rows.append(row)
                say(json.dumps(row))
                common.write_json(args.out / "flex_options.json", {"environment": common.environment(device),
                                                                   "options": OPTIONS, "rows": rows})


if __name__ == "__main__":
    main()
