"""One-off: two launches of the screened search timed on its own candidate lists (CUDA).

- The candidate kernel with its registers capped at 128 per thread (``maxnreg``): at the
  compiler's 167 an H100 multiprocessor holds three of its programs, at 128 four (its 49.7 KB
  of shared memory fits four), with no spills (``tools/kernel_sass.py``). Beside the default
  (5 stages) and with 4 stages; each output against the default's, which it should equal bit for bit.
- The candidates' order: the in-register sort (``order_candidates_cuda``, a bitonic sort per
  row; 1 warp, the default, and 4) against the stable sort and gather it replaces
  (``order_candidates_reference``, eager), which it must equal exactly. Search + BlockMask as
  compiled is ``profile_search.py``'s to time.

Inputs: ``attention.make_inputs`` q/k at the Llama-3.1-8B attention shape, the screen's
candidates at the default config; CUDA events, median of ``--repeats`` after 2 warm-ups. Not part
of the package or the tests: a one-off, removed once its numbers are in the docs.

    python benchmarks/experiments/search_launches.py --lengths 32k,128k,256k --out launches.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _common as common  # noqa: E402
import attention  # noqa: E402

from sa_compile import SparseConfig  # noqa: E402
from sa_compile.selection import _KEY_LIMIT, order_candidates_reference  # noqa: E402
from sa_compile.templates._blocks import quantize_int8  # noqa: E402
from sa_compile.templates._screened_triton import candidate_block_mass_cuda, order_candidates_cuda  # noqa: E402
from sa_compile.templates.screened_query import (  # noqa: E402
    key_block_stats, screen_queries, screen_ranking_keys, top_candidates,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="32k,128k,256k")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda")
    shape = {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}
    config = SparseConfig()
    block, stride, width = config.block_size, config.query_stride, config.candidate_width()
    rows = []
    for n in common.parse_lengths(args.lengths):
        q, k, _ = attention.make_inputs(n, shape, device, seed=0)
        H, G = q.shape[1], k.shape[1]
        scale = q.shape[-1] ** -0.5
        cand = top_candidates(screen_ranking_keys(screen_queries(q, G, block, scale), *key_block_stats(k, block),
                                                  width), width)
        k8, k_scale = quantize_int8(k)

        def mass(**launch):
            return candidate_block_mass_cuda(q, k8, k_scale, None, cand, block, stride, scale, **launch)

        default_mass = mass()
        scores = default_mass / default_mass.sum(-1, keepdim=True).clamp(min=1e-30)
        blocks = cand.repeat_interleave(H // G, 1)
        fns = {
            "candidate kernel: default (5 stages)": (mass, default_mass),
            "candidate kernel: maxnreg 128, 5 stages": (lambda: mass(maxnreg=128), default_mass),
            "candidate kernel: maxnreg 128, 4 stages": (lambda: mass(maxnreg=128, num_stages=4), default_mass),
        }
        order = order_candidates_reference(scores, blocks)
        fns["order: stable sort + gather (eager)"] = (lambda: order_candidates_reference(scores, blocks), order)
        for warps in (1, 4):
            fns[f"order: in-register sort, {warps} warps"] = (
                lambda warps=warps: order_candidates_cuda(scores, blocks, _KEY_LIMIT, num_warps=warps), order)
        for name, (fn, expected) in fns.items():
            out = fn()
            same = bool(torch.equal(out, expected))
            diff = (out.double() - expected.double()).abs().max().item()
            t = common.time_fn(fn, device, repeats=args.repeats, warmup=2)
            row = {"seq_len": n, "launch": name, "ms": t.median_s * 1e3, "identical": same,
                   "max_abs_diff": diff}
            rows.append(row)
            print(f"N={common.length_label(n)} {name:45s} {row['ms']:8.3f} ms  identical {same}  diff {diff:.2e}",
                  flush=True)
        del q, k, k8, default_mass, scores, blocks, order
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": common.environment(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
