"""The screened search's pooled screen: the fused CUDA kernel against the torch path it replaces.

The torch path (three float32 matmuls, two softmaxes, the head sum and the ranking rules)
and the fused kernel (TF32 dots, both softmaxes and the head sum in registers, ranking keys
written once) each produce a row's candidate blocks, both compiled by Inductor with the key
statistics and the top-k around them, as the search runs them. Per length it times both (one
call at a time and queued, as :mod:`profile_search` does), the kernel alone at a few launch
shapes (on inputs prepared once), and how far the kernel's candidates agree with the float32
path's: the share of the float32 path's candidates the kernel also proposes (recall), and
of rows whose candidate sets are identical.

    python benchmarks/screen_kernel.py                     # CUDA: 32/8 heads, dim 128, 32k-512k
"""

from __future__ import annotations

import argparse

import torch

import _common as common
import attention

from sa_compile import SparseConfig
from sa_compile.selection import keep_mask
from sa_compile.templates.screened_query import (
    key_block_stats, screen_queries, screen_ranking_keys, screen_ranking_keys_reference, top_candidates,
)

# (BQ, BK, num_warps, num_stages) of the kernel alone, beside the default launch.
LAUNCHES = [(16, 64, 8, 2), (8, 32, 4, 2), (8, 64, 4, 2), (16, 32, 4, 2), (16, 32, 8, 3)]


def candidates(q, k, block_size: int, width: int, fused: bool):
    """A row's candidates, the screen's ranking keys from the fused op or the torch path."""
    stats = key_block_stats(k, block_size)
    keys = (screen_ranking_keys if fused else screen_ranking_keys_reference)(
        screen_queries(q, k.shape[1], block_size, q.shape[-1] ** -0.5), *stats, width)
    return top_candidates(keys, width)


def agreement(expected_BGQW: torch.Tensor, got_BGQW: torch.Tensor) -> dict:
    """Recall of ``expected``'s candidates in ``got``, and the share of rows with the same set
    (a row's candidates lead its list, its empty slots trail: a kept-block list)."""
    expected, got = (keep_mask(c, (c >= 0).sum(-1)) for c in (expected_BGQW, got_BGQW))
    return {"recall": (expected & got).sum().item() / max(1, expected.sum().item()),
            "same_rows": (expected == got).all(-1).float().mean().item()}


def run_length(n: int, args, shape: dict, device, progress) -> list[dict]:
    label = common.length_label(n)
    say = progress.scoped(f"N={label}")
    q, k, _ = attention.make_inputs(n, shape, device, args.seed)
    width = SparseConfig(block_size=args.block_size).candidate_width()
    rows = []

    def timed(name, fn):
        say(f"{name}: first call")
        out = fn()
        timing = common.time_fn(fn, device, repeats=args.repeats, warmup=args.warmup)
        queued = common.time_queued(fn, device, calls=args.repeats)
        rows.append({"seq_len": n, "path": name, "ms": timing.median_s * 1e3, "queued_ms": queued * 1e3})
        return out

    torch_path = attention._compile(lambda q, k: candidates(q, k, args.block_size, width, False), device)
    fused_path = attention._compile(lambda q, k: candidates(q, k, args.block_size, width, True), device)
    expected = timed("torch screen + stats + top-k (float32)", lambda: torch_path(q, k))
    got = timed("fused screen + stats + top-k", lambda: fused_path(q, k))
    rows[-1] |= agreement(expected, got)

    from sa_compile.templates._screen_triton import screen_ranking_keys_cuda

    inputs = (screen_queries(q, k.shape[1], args.block_size, q.shape[-1] ** -0.5),
              *key_block_stats(k, args.block_size))
    timed("fused kernel alone (default launch)", lambda: screen_ranking_keys_cuda(*inputs, width))
    for launch in LAUNCHES:
        name = "fused kernel alone BQ=%d BK=%d warps=%d stages=%d" % launch
        try:
            timed(name, lambda: screen_ranking_keys_cuda(*inputs, width, **dict(
                zip(("BQ", "BK", "num_warps", "num_stages"), launch))))
        except Exception as exc:  # a launch shape the device cannot hold (shared memory): say so, go on
            say(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    del q, k, expected, got, inputs
    common.release_cached_memory(device)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--lengths", default="32k,128k,512k", help="comma list, 4k style allowed")
    p.add_argument("--block-size", type=int, default=128, help="sparse block size")
    common.add_run_arguments(p, repeats=5, warmup=2)
    args = p.parse_args(argv)
    common.check_run_arguments(p, args)
    args.lengths = common.parse_lengths(args.lengths)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("screen_kernel.py times a CUDA kernel: run it with --device cuda on a GPU")
    if not args.warm_caches:
        common.fresh_compile_caches()
    shape = attention.CUDA_SHAPE
    progress = common.Progress()
    rows = [r for n in args.lengths for r in run_length(n, args, shape, device, progress)]
    name = "screen_kernel" + (f"_{args.tag}" if args.tag else "")
    common.write_json(args.out / f"{name}.json", {
        "benchmark": "screen_kernel", "shape": {k: v for k, v in shape.items() if k != "lengths"} | {"batch": 1},
        "block_size": args.block_size, "environment": common.environment(device),
        "timing": {"repeats": args.repeats, "warmup": args.warmup, "statistic": "median"}, "rows": rows})
    print(common.markdown_table(
        ["N", "path", "ms", "queued ms", "recall", "same rows"],
        [[common.length_label(r["seq_len"]), r["path"], r["ms"], r["queued_ms"], r.get("recall"), r.get("same_rows")]
         for r in rows]))
    progress(f"wrote {args.out / name}.json")


if __name__ == "__main__":
    main()
