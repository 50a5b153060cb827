"""One-off: the screened search's next launches, timed on its own candidate lists (CUDA).

- The candidate kernel with its registers capped at 128 per thread (``maxnreg``): at the
  compiler's 167 an H100 multiprocessor holds three of its programs, at 128 four (its 49.7 KB
  of shared memory fits four), with no spills (``tools/kernel_sass.py``). Beside the default
  (5 stages) and with 4 stages; each output against the default's, which it should equal bit for bit.
- The candidate kernel with each row's int8 scale folded into the exponent: the logits'
  peak is taken over ``dot * k_scale`` and each exponent is ``exp2(q_scale * t - q_scale * peak)``,
  one FMA, so a logit costs one multiply less (sm_90 SASS: 582 instructions per tile loop
  against 640, 144 registers against 167, 128 under ``maxnreg`` with no spills; with key
  padding 244 registers against 165). Its output differs from the
  default's by float rounding: the table gives the largest difference and the share of each
  row's 41 highest-mass candidates that both keep.
- The BlockMask build with key padding (``build_block_mask`` with an all-ones mask, compiled, as
  ``generate()`` runs it): the two lists' stable partition by running counts and a scatter
  (``sparse_op.stable_partition``, since commit `3f1ee06`) against the two stable sorts it
  replaced, and the build without a mask. The lists must be identical.
- The candidates' order: the in-register sort (``order_candidates_cuda``, a bitonic sort per
  row; 1 warp, the default, and 4) against the stable sort and gather it replaces
  (``order_candidates_reference``, eager), which it must equal exactly. Search + BlockMask as
  compiled is ``profile_search.py``'s to time.

Each candidate-kernel launch runs twice: without a key mask and with an all-ones one (the
padding path a compiled model takes in ``generate()``), each against the default launch
without a mask, which an all-ones mask must reproduce. Inputs: ``attention.make_inputs`` q/k at
the Llama-3.1-8B attention shape, the screen's candidates at the default config; CUDA events, median of ``--repeats`` after 2 warm-ups. Not part
of the package or the tests: a one-off, removed once its numbers are in the docs.

    python benchmarks/experiments/search_launches.py --lengths 32k,128k,256k --out launches.json

``--dry-run`` runs every launch once on a small float32 shape on the CPU, through Triton's
interpreter (``TRITON_INTERPRET=1``), to check the script before it spends device time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import types

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _common as common  # noqa: E402
import attention  # noqa: E402

from sa_compile import SparseConfig  # noqa: E402
from sa_compile import sparse_op  # noqa: E402
from sa_compile.selection import _KEY_LIMIT, order_candidates_reference, select_candidate_lists  # noqa: E402
from sa_compile.templates._blocks import quantize_int8  # noqa: E402
from sa_compile.templates import _screened_triton  # noqa: E402
from sa_compile.templates._screened_triton import (  # noqa: E402
    _load_int8_keys, candidate_block_mass_cuda, order_candidates_cuda,
)
from sa_compile.templates._strided_triton import _store_tile_lse, _visible_logits  # noqa: E402
from sa_compile.templates.screened_query import (  # noqa: E402
    key_block_stats, screen_queries, screen_ranking_keys, top_candidates,
)


@triton.jit
def _store_folded_lse(ptr, q, q_scale, k_base, skn, ks_base, valid_base, all_valid, keys, pos, N,
                      D: tl.constexpr, DP: tl.constexpr, HAS_VALID: tl.constexpr, INT8: tl.constexpr,
                      CAUSAL: tl.constexpr):
    """The shipped ``_store_candidate_lse`` with the row scale folded into the exponent (int8)."""
    if INT8:
        k, k_scale = _load_int8_keys(k_base, skn, ks_base, keys, N, D, DP, CAUSAL)
        t = tl.dot(q, tl.trans(k)).to(tl.float32) * k_scale[None, :]
        t = _visible_logits(t, keys, pos, N, valid_base, all_valid, HAS_VALID, CAUSAL)
        row_scale = tl.maximum(q_scale, 1e-30)  # a zero row: logits 0 at any scale, and no 0 * -inf
        peak = tl.max(t, 1)
        peak = tl.where(peak == float("-inf"), 0.0, peak) * row_scale
        tl.store(ptr, peak + tl.log2(tl.sum(tl.exp2(t * row_scale[:, None] - peak[:, None]), 1)))
    else:
        _store_tile_lse(ptr, q, k_base, skn, valid_base, all_valid, keys, pos, N, D, DP, HAS_VALID, CAUSAL)


def _folded_kernel():
    """The shipped candidate kernel, its tile helper swapped for :func:`_store_folded_lse`."""
    shipped = _screened_triton._candidate_mass_kernel.fn
    scope = dict(shipped.__globals__, _store_candidate_lse=_store_folded_lse)
    fn = types.FunctionType(shipped.__code__, scope, shipped.__name__, shipped.__defaults__)
    fn.__annotations__ = shipped.__annotations__  # Triton reads the constexpr parameters from these
    return triton.jit(fn)


def folded_mass(kernel, *args, **launch):
    """``candidate_block_mass_cuda`` launching ``kernel`` in place of the shipped one."""
    shipped = _screened_triton._candidate_mass_kernel
    _screened_triton._candidate_mass_kernel = kernel
    try:
        return candidate_block_mass_cuda(*args, **launch)
    finally:
        _screened_triton._candidate_mass_kernel = shipped


def kept_agreement(mass, reference, keep: int = 41) -> float:
    """The share of each row's ``keep`` highest-mass candidates (by ``reference``) that ``mass`` keeps too."""
    top = lambda m: torch.zeros_like(m, dtype=torch.bool).scatter_(-1, m.topk(keep, -1).indices, True)  # noqa: E731
    kept = top(reference)
    return ((top(mass) & kept).sum() / kept.sum()).item()


def sort_partition(values_BHQW, group_BHQW, groups: int):
    """The padded lists' partition as it was: a stable sort of the groups, then a gather."""
    return values_BHQW.gather(-1, torch.sort(group_BHQW, dim=-1, stable=True).indices)


def mask_builds(order, count, block: int, n: int, valid) -> dict:
    """Compiled BlockMask builds (every list of the mask out): with the key mask ``valid``, by the
    package's partition and by the sorts it replaced; and without a mask."""

    def build(order, count, valid):
        block_mask, _ = sparse_op.build_block_mask(order, count, block, n, valid)
        return tuple(getattr(block_mask, f) for f in attention._MASK_FIELDS if getattr(block_mask, f) is not None)

    compiled = torch.compile(build, dynamic=False)

    def with_partition(partition):
        def run():
            shipped, sparse_op.stable_partition = sparse_op.stable_partition, partition
            try:
                return compiled(order, count, valid)
            finally:
                sparse_op.stable_partition = shipped
        return run

    return {"BlockMask build, key padding: stable partition": with_partition(sparse_op.stable_partition),
            "BlockMask build, key padding: stable sorts (before)": with_partition(sort_partition),
            "BlockMask build, no key mask": lambda: compiled(order, count, None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="32k,128k,256k")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton's interpreter (set TRITON_INTERPRET=1), 8/2 heads of dim 64 in float32, one run")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    shape = {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}
    if args.dry_run:
        shape, args.repeats = {"heads": 8, "kv_heads": 2, "head_dim": 64, "dtype": "float32"}, 1
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

        # An all-ones key mask, as a compiled model gets from generate(): the kernel's padding path.
        ones = torch.ones(q.shape[0], n, dtype=torch.long, device=device)
        folded = _folded_kernel()
        fns = {}
        for valid, label in ((None, ""), (ones, ", key padding path")):
            def mass(kernel=None, valid=valid, **launch):
                args = (q, k8, k_scale, valid, cand, block, stride, scale)
                return (folded_mass(kernel, *args, **launch) if kernel is not None else
                        candidate_block_mass_cuda(*args, **launch))

            if valid is None:
                default_mass = mass()
            shipped = default_mass  # an all-ones mask must give the unmasked default's output
            fns.update({
                f"candidate kernel: default (5 stages){label}": (mass, shipped),
                f"candidate kernel: row scale folded{label}": (lambda mass=mass: mass(folded), shipped),
                f"candidate kernel: row scale folded, maxnreg 128{label}": (
                    lambda mass=mass: mass(folded, maxnreg=128), shipped),
                f"candidate kernel: maxnreg 128, 5 stages{label}": (lambda mass=mass: mass(maxnreg=128), shipped),
                f"candidate kernel: maxnreg 128, 4 stages{label}": (
                    lambda mass=mass: mass(maxnreg=128, num_stages=4), shipped),
            })
        scores = default_mass / default_mass.sum(-1, keepdim=True).clamp(min=1e-30)
        blocks = cand.repeat_interleave(H // G, 1)
        lists = select_candidate_lists(scores, blocks, cand.shape[-2],
                                       sparse_op.search_density(config, cand.shape[-2], device))
        builds = mask_builds(*lists, block, n, ones)
        expected_lists = builds["BlockMask build, key padding: stable sorts (before)"]()
        for name, fn in builds.items():
            fns[name] = (fn, expected_lists if "key padding" in name else fn())
        order = order_candidates_reference(scores, blocks)
        fns["order: stable sort + gather (eager)"] = (lambda: order_candidates_reference(scores, blocks), order)
        for warps in (1, 4):
            fns[f"order: in-register sort, {warps} warps"] = (
                lambda warps=warps: order_candidates_cuda(scores, blocks, _KEY_LIMIT, num_warps=warps), order)
        for name, (fn, expected) in fns.items():
            out = fn()
            if isinstance(out, tuple):  # a BlockMask's lists: the same lists or not
                same = len(out) == len(expected) and all(torch.equal(a, b) for a, b in zip(out, expected))
                out, expected = out[0], expected[0]
            else:
                same = bool(torch.equal(out, expected))
            diff = (out.double() - expected.double()).abs().max().item()
            t = common.time_fn(fn, device, repeats=args.repeats, warmup=0 if args.dry_run else 2)
            row = {"seq_len": n, "launch": name, "ms": t.median_s * 1e3, "identical": same,
                   "max_abs_diff": diff}
            if out.is_floating_point():
                row["kept_agreement"] = kept_agreement(out, expected)
            rows.append(row)
            print(f"N={common.length_label(n)} {name:62s} {row['ms']:8.3f} ms  identical {same}  diff {diff:.2e}"
                  f"  kept {row.get('kept_agreement', float('nan')):.4f}", flush=True)
        del q, k, k8, default_mass, scores, blocks, order, fns, lists, builds, expected_lists
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": common.environment(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
