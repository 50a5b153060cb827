"""Where the sparse path's time goes, stage by stage, against cuDNN SDPA on one layer.

Each stage of ``sparse_attention`` is compiled on its own (dynamic shapes, like the model)
and timed on the previous stage's output, so the stages add up to roughly the fused op:

    last-q attention -> vertical-slash scores (row-aware columns) ─┐
    pooled block scores ──────────────────────────────────────────┴> block selection -> BlockMask build -> kernel
    screen -> candidates' strided mass (--candidates) ─────────────┘

Each stage is timed two ways: one call at a time between device events (``ms``: host launch
gaps included, where a small stage waits on the host), and ``repeats`` calls launched back to
back (``queued ms``: the host runs ahead, as between a prefill's layers). A ``torch.profiler``
pass over the fused op lists its heaviest kernels.

    python benchmarks/profile_search.py                          # CUDA: 32/8 heads, dim 128, 16k-128k
    python benchmarks/profile_search.py --lengths 1024 --device cpu
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import _common as common
import attention

from sa_compile import PatternKind, SparseConfig
from sa_compile.flex import kernel_options_for
from sa_compile.selection import select_block_lists, select_candidate_lists
from sa_compile.sparse_op import build_block_mask, estimate_block_scores, search_density
from sa_compile.templates.screened_query import screened_query_lists
from sa_compile.templates.block_sparse import pooled_block_scores
from sa_compile.templates.vertical_slash import last_q_attention, vertical_slash_block_scores


def stages(config: SparseConfig, device):
    """Compiled stage functions, each taking what the one before returns."""
    compile_ = attention._compile
    bs = config.block_size

    def mask_tensors(lists, n):
        block_mask, _ = build_block_mask(*lists, bs, n)
        return tuple(getattr(block_mask, f) for f in attention._MASK_FIELDS)

    width = config.candidate_width()
    if width is None:
        estimate = lambda q, k: estimate_block_scores(q, k, config, q.shape[-1] ** -0.5)  # noqa: E731
        select = lambda scores: select_block_lists(  # noqa: E731
            scores, search_density(config, scores.shape[-1], scores.device), config.search_head_budgets)
    else:  # the screened search: candidates and their scores, then a selection among them
        estimate = lambda q, k: screened_query_lists(  # noqa: E731
            q, k, bs, config.query_stride, q.shape[-1] ** -0.5, width, int8_estimate=config.int8_estimate,
            sampled_screen_means=config.sampled_screen_means)
        select = lambda scored: select_candidate_lists(  # noqa: E731
            *scored, scored[1].shape[-2], search_density(config, scored[1].shape[-2], scored[1].device))

    return {
        "last-q attention": compile_(lambda q, k: last_q_attention(q, k, config.last_q, q.shape[-1] ** -0.5), device),
        "vertical-slash scores": compile_(
            lambda attn, q, k: vertical_slash_block_scores(attn, bs, q, k, q.shape[-1] ** -0.5), device),
        "pooled block scores": compile_(lambda q, k: pooled_block_scores(q, k, bs, q.shape[-1] ** -0.5), device),
        "estimate (all templates)": compile_(estimate, device),
        "block selection": compile_(select, device),
        "BlockMask build": compile_(mask_tensors, device),
        "search + BlockMask (fused)": attention.sparse_search(config, device),
    }


def top_kernels(fn, device, count: int) -> list[dict]:
    """The ``count`` kernels with the most device time in one call of ``fn``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        common.synchronize(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    return [{"name": e.key[:120], "ms": getattr(e, key) / 1e3, "calls": e.count} for e in events[:count]]


def profiled_config(args) -> SparseConfig:
    return SparseConfig(density=args.density, block_size=args.block_size, min_seq_len=0, pattern=args.pattern,
                        taper_from=args.taper_from, query_stride=args.query_stride, candidates=args.candidates,
                        int8_estimate=args.int8_estimate, sampled_screen_means=args.sampled_screen_means,
                        search_head_budgets=args.search_head_budgets)


def profile_length(n: int, args, shape: dict, device, progress) -> tuple[list[dict], list[dict]]:
    label = common.length_label(n)
    q, k, v = attention.make_inputs(n, shape, device, args.seed)
    config = profiled_config(args)
    fns = stages(config, device)
    base_label, dense = attention.dense_sdpa(q, k, v, device, progress.scoped(f"N={label}"))
    rows = []

    def timed(name, fn):
        say = progress.scoped(f"N={label} {name}")
        say("first call (compiles if needed)")
        out = fn()
        timing = common.time_fn(fn, device, repeats=args.repeats, warmup=args.warmup)
        queued = common.time_queued(fn, device, calls=args.repeats)
        rows.append({"seq_len": n, "stage": name, "ms": timing.median_s * 1e3, "queued_ms": queued * 1e3})
        return out

    timed(base_label, dense)
    if config.pattern in (PatternKind.AUTO, PatternKind.VERTICAL_SLASH, PatternKind.BLOCK_SPARSE):
        attn = timed("last-q attention", lambda: fns["last-q attention"](q, k))
        timed("vertical-slash scores", lambda: fns["vertical-slash scores"](attn, q, k))
        del attn
        timed("pooled block scores", lambda: fns["pooled block scores"](q, k))
    scores = timed("estimate (all templates)", lambda: fns["estimate (all templates)"](q, k))
    lists = timed("block selection", lambda: fns["block selection"](scores))
    tensors = timed("BlockMask build", lambda: fns["BlockMask build"](lists, n))
    timed("search + BlockMask (fused)", lambda: fns["search + BlockMask (fused)"](q, k))
    for spelling, overrides in args.beside:  # another config's search, on the same inputs
        other = stages(replace(config, **overrides), device)
        timed(f"estimate, {spelling}", lambda: other["estimate (all templates)"](q, k))
        timed(f"search + BlockMask (fused), {spelling}", lambda: other["search + BlockMask (fused)"](q, k))
        del other
    mask = attention.as_block_mask(tensors, n, args.block_size)
    options = kernel_options_for(q)
    kernel = attention.flex_kernel(device, options)
    out = timed("FlexAttention kernel", lambda: kernel(q, k, v, mask))
    kernel_row = rows[-1]
    if options:  # the same mask with FlexAttention's default options, for comparison
        plain = attention.flex_kernel(device)
        out_plain = timed("FlexAttention kernel, default options", lambda: plain(q, k, v, mask))
        kernel_row["max_abs_diff_vs_default_options"] = (out.float() - out_plain.float()).abs().max().item()
        del out_plain
    del out
    e2e = attention.sparse_end_to_end(config, device)
    timed("sparse_attention (fused)", lambda: e2e(q, k, v))
    dense_ms, dense_queued_ms = rows[0]["ms"], rows[0]["queued_ms"]
    for r in rows:
        r["share_of_dense"] = r["ms"] / dense_ms
        r["queued_share_of_dense"] = r["queued_ms"] / dense_queued_ms
    progress(f"N={label}: profiling the fused op")
    kernels = [{"seq_len": n} | k_ for k_ in top_kernels(lambda: e2e(q, k, v), device, args.top)]
    del q, k, v, scores, lists, tensors, mask
    common.release_cached_memory(device)
    return rows, kernels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--lengths", help=f"comma list, 4k style allowed (CUDA: {attention.CUDA_SHAPE['lengths']}; "
                                     f"CPU: {attention.CPU_SHAPE['lengths']})")
    p.add_argument("--density", type=float, default=SparseConfig.density, help="SparseConfig.density (tapered past --taper-from)")
    common.add_pattern_argument(p)
    p.add_argument("--query-stride", type=int, default=SparseConfig.query_stride, help="strided_query's sample stride")
    p.add_argument("--taper-from", type=common.int_or_none, default=SparseConfig.taper_from,
                   help="SparseConfig.taper_from ('none': untapered, density at every length)")
    p.add_argument("--candidates", type=common.float_or_none, default=SparseConfig.candidates,
                   help="SparseConfig.candidates ('none': the strided sample scores every block)")
    p.add_argument("--int8-estimate", type=common.parse_bool, default=SparseConfig.int8_estimate,
                   help="SparseConfig.int8_estimate")
    p.add_argument("--sampled-screen-means", type=common.parse_bool, default=SparseConfig.sampled_screen_means,
                   help="SparseConfig.sampled_screen_means")
    p.add_argument("--beside", action="append", default=[], metavar="FIELD=VALUE[:FIELD=VALUE...]",
                   help="also time the estimate and the fused search of the config with these fields changed "
                        "(e.g. int8_estimate=false), on the same inputs; repeatable")
    p.add_argument("--block-size", type=int, help="sparse block size (CUDA: 128, CPU: 32)")
    p.add_argument("--search-head-budgets", action="store_true", help="profile SparseConfig.search_head_budgets")
    p.add_argument("--top", type=int, default=12, help="kernels listed per length")
    common.add_run_arguments(p, repeats=5, warmup=2)
    args = p.parse_args(argv)
    common.check_run_arguments(p, args)
    try:  # each as (its spelling, the fields it changes)
        args.beside = [(spelling, common.parse_overrides(spelling.split(":"))) for spelling in args.beside]
    except ValueError as exc:
        p.error(f"--beside: {exc}")
    return args, attention.resolve_shape(args)


def main(argv=None) -> None:
    args, shape = parse_args(argv)
    device = torch.device(args.device)
    if not args.warm_caches:
        common.fresh_compile_caches()
    progress = common.Progress()
    rows, kernels = [], []
    for n in args.lengths:
        r, k = profile_length(n, args, shape, device, progress)
        rows += r
        kernels += k
    name = "profile_search" + (f"_{args.tag}" if args.tag else "")
    env = common.environment(device)
    common.write_json(args.out / f"{name}.json", {
        "benchmark": "profile_search", "shape": {k: v for k, v in shape.items() if k != "lengths"} | {"batch": 1},
        "config": profiled_config(args).describe(),
        "environment": env, "timing": {"repeats": args.repeats, "warmup": args.warmup, "statistic": "median"},
        "stages": rows, "top_kernels": kernels})
    print(common.markdown_table(["N", "stage", "ms", "share of dense SDPA", "queued ms", "queued share"],
                                [[common.length_label(r["seq_len"]), r["stage"], r["ms"], r["share_of_dense"],
                                  r["queued_ms"], r["queued_share_of_dense"]] for r in rows]))
    print()
    print(common.markdown_table(["N", "kernel", "ms", "calls"],
                                [[common.length_label(k["seq_len"]), k["name"], k["ms"], k["calls"]] for k in kernels]))
    progress(f"wrote {args.out / name}.json")


if __name__ == "__main__":
    main()
