"""Launch choices of the strided-query kernel (CUDA): which tile shape, warps and stages pay.

One attention layer of the Llama-3.1-8B shape (32 query heads, 8 KV heads, dim 128, bf16;
``benchmarks/attention.py``'s inputs). Per length and query stride: cuDNN SDPA, then the
fused estimate (``strided_block_mass_cuda``) under each launch choice. Device events, 3
warm-ups, median of 10. Each variant's output is checked against the default launch's
(largest absolute difference of the block mass, which lies in [0, 16]).

    python benchmarks/experiments/strided_kernel_launch.py --out DIR [--lengths 32k,128k]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as common  # noqa: E402
from attention import CUDA_SHAPE, dense_sdpa, make_inputs  # noqa: E402

from sa_compile.templates._strided_triton import strided_block_mass_cuda  # noqa: E402

# rows per program, warps, stages; the default is 64, 4, 3. The run in docs/results.md also
# timed a kernel that masked every key tile (commit 0d61510, its `split=False`), since removed.
VARIANTS = {
    "default": {},
    "r128_w8_s2": {"target_rows": 128, "num_warps": 8, "num_stages": 2},
    "r128_w8_s3": {"target_rows": 128, "num_warps": 8, "num_stages": 3},
    "r128_w4_s2": {"target_rows": 128, "num_warps": 4, "num_stages": 2},
    "r256_w8_s2": {"target_rows": 256, "num_warps": 8, "num_stages": 2},
    "r256_w8_s3": {"target_rows": 256, "num_warps": 8, "num_stages": 3},
    "r64_w4_s2": {"target_rows": 64, "num_warps": 4, "num_stages": 2},
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="32k,128k")
    p.add_argument("--strides", default="16,8")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()

    def say(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    for n in common.parse_lengths(args.lengths):
        q, k, v = make_inputs(n, CUDA_SHAPE, device, seed=0)
        label, dense = dense_sdpa(q, k, v, device, say)
        dense_s = common.time_fn(dense, device, repeats=10, warmup=3).median_s
        say(f"N={n}: {label} {dense_s * 1e3:.2f} ms")
        for stride in (int(s) for s in args.strides.split(",")):
            reference = strided_block_mass_cuda(q, k, None, 128, stride, 128**-0.5)
            for name, launch in VARIANTS.items():
                fn = lambda launch=launch: strided_block_mass_cuda(q, k, None, 128, stride, 128**-0.5, **launch)
                try:
                    err = (fn() - reference).abs().max().item()
                    ms = common.time_fn(fn, device, repeats=10, warmup=3).median_s * 1e3
                except Exception as exc:  # a launch that does not fit (shared memory, registers)
                    say(f"N={n} stride {stride} {name}: failed: {str(exc).splitlines()[0][:160]}")
                    rows.append({"n": n, "stride": stride, "variant": name, "error": str(exc)[:400]})
                    continue
                say(f"N={n} stride {stride} {name:12s} {ms:7.3f} ms  {ms / (dense_s * 1e3):.3f} of cuDNN  "
                    f"max |diff| {err:.2e}")
                rows.append({"n": n, "stride": stride, "variant": name, "launch": launch, "ms": ms,
                             "dense_ms": dense_s * 1e3, "share_of_dense": ms / (dense_s * 1e3), "max_abs_diff": err})
        del q, k, v
        torch.cuda.empty_cache()
    record = {"environment": common.environment(device), "variants": VARIANTS, "rows": rows}
    (args.out / "strided_kernel_launch.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
