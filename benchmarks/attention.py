"""One causal attention layer: cuDNN SDPA vs dense FlexAttention vs sa_compile's sparse path.

Densities are swept as given (``taper_from=None``: no taper with length). The sparse
path is timed in three pieces on the same inputs: the pattern search with the
BlockMask build (one compiled function), the FlexAttention kernel over that precomputed
BlockMask, and the whole compiled ``sparse_attention`` end to end.

    python benchmarks/attention.py                       # CUDA: 32/8 heads, dim 128, bf16, 16k-128k
    python benchmarks/attention.py --lengths 4k,8k --densities 0.05,0.1
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

import _common as common

from sa_compile import SparseConfig, sparse_attention
from sa_compile.flex import causal_mask_mod, kernel_options_for
from sa_compile.patterns import realized_density
from sa_compile.sparse_op import build_block_mask, search_blocks

CUDA_SHAPE = {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "lengths": "16k,32k,64k,128k",
              "block_size": 128}
CPU_SHAPE = {"heads": 4, "kv_heads": 2, "head_dim": 32, "dtype": "float32", "lengths": "512,1024", "block_size": 32}


def make_inputs(n: int, shape: dict, device, seed: int):
    """Random q/k/v with the structure real attention has: locality and a sink.

    A shared sinusoidal position code (periods of 1 to 1000 tokens) lifts the logits of
    nearby query-key pairs, so each row's mass sits in a band near the diagonal; every
    query also leans toward one direction that key 0 points along (an attention sink). The
    code's amplitude grows as the head dim shrinks, so the band's logit lift is the same.
    """
    gen = torch.Generator(device=device).manual_seed(seed + n)
    H, G, D = shape["heads"], shape["kv_heads"], shape["head_dim"]
    freqs_D = torch.logspace(-3, 0, D, device=device)
    pos_ND = 1.5 * (128 / D) ** 0.25 * torch.cos(torch.arange(n, device=device, dtype=torch.float32)[:, None] * freqs_D)
    sink_D = torch.randn(D, device=device, generator=gen)
    sink_D = sink_D * D**0.5 / sink_D.norm()
    q_BHND = torch.randn(1, H, n, D, device=device, generator=gen) + pos_ND + 0.5 * sink_D
    k_BGND = torch.randn(1, G, n, D, device=device, generator=gen) + pos_ND
    k_BGND[:, :, 0] = sink_D
    v_BGND = torch.randn(1, G, n, D, device=device, generator=gen)
    dtype = getattr(torch, shape["dtype"])
    return q_BHND.to(dtype), k_BGND.to(dtype), v_BGND.to(dtype)


def _sdpa_candidates(device):
    """(label, backend, use enable_gqa) in order of preference."""
    if device.type != "cuda":
        return [("sdpa (cpu)", None, True)]
    return [("cuDNN SDPA", SDPBackend.CUDNN_ATTENTION, True), ("cuDNN SDPA, kv repeated", SDPBackend.CUDNN_ATTENTION, False),
            ("flash SDPA (no cuDNN)", SDPBackend.FLASH_ATTENTION, True),
            ("flash SDPA (no cuDNN), kv repeated", SDPBackend.FLASH_ATTENTION, False)]


def dense_sdpa(q_BHND, k_BGND, v_BGND, device, say):
    """The reference: fused causal SDPA on cuDNN (flash if cuDNN refuses); label and callable."""
    for label, backend, gqa in _sdpa_candidates(device):
        if gqa:
            k, v = k_BGND, v_BGND
        else:  # repeated outside the timed call: the kernel is what is measured
            repeat = q_BHND.shape[1] // k_BGND.shape[1]
            k, v = k_BGND.repeat_interleave(repeat, 1), v_BGND.repeat_interleave(repeat, 1)

        def run(k=k, v=v, backend=backend, gqa=gqa):
            ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
            with ctx:
                return F.scaled_dot_product_attention(q_BHND, k, v, is_causal=True, enable_gqa=gqa)

        try:
            run()
            return label, run
        except RuntimeError as exc:
            say(f"{label} unavailable ({str(exc).splitlines()[0][:120]}); trying the next backend")
    raise RuntimeError("no fused SDPA backend ran")


def _compile(fn, device):
    # Dynamic shapes: one compile serves every length (cold static compiles per length took
    # minutes on an H100), as in the model, where the second length turns shapes dynamic.
    # Inductor's CPU FlexAttention template rejects epilogue fusion (as sa_compile's backend notes).
    options = {"epilogue_fusion": False} if device.type == "cpu" else None
    return torch.compile(fn, fullgraph=True, dynamic=True, options=options)


def causal_block_mask(n: int, block_size: int, device) -> BlockMask:
    """Dense causal BlockMask from block indices: every block below the diagonal full, the
    diagonal partial (causal mask_mod); the blocks ``create_block_mask`` keeps (it also marks
    a ragged last row partial, which changes no output).

    Built from indices because an eager ``create_block_mask`` materializes N x N, and a
    compiled one took minutes to compile at 16k on an H100 (torch 2.11, cold caches).
    ``check_causal_block_mask`` compares the two at a small length.
    """
    nb = -(-n // block_size)
    idx_Q = torch.arange(nb, device=device, dtype=torch.int32)
    diagonal = (torch.ones(1, 1, nb, device=device, dtype=torch.int32), idx_Q.view(1, 1, nb, 1).expand(1, 1, nb, nb))
    below = (idx_Q.view(1, 1, nb), idx_Q.view(1, 1, 1, nb).expand(1, 1, nb, nb))
    # Contiguous: the CUDA kernel walks kv_indices with a dense row stride (a stride-0
    # expanded view gave wrong outputs there, and right ones on CPU).
    return BlockMask.from_kv_blocks(*(t.contiguous() for t in diagonal + below), BLOCK_SIZE=block_size,
                                    mask_mod=causal_mask_mod, seq_lengths=(n, n))


def check_causal_block_mask(block_size: int, device, n: int = 1000) -> None:
    """The hand-built causal mask must equal create_block_mask's (eager is fine at small n)."""
    ours = causal_block_mask(n, block_size, device).to_dense()
    theirs = create_block_mask(causal_mask_mod, 1, 1, n, n, device=device, BLOCK_SIZE=block_size).to_dense()
    if not torch.equal(ours, theirs):
        raise RuntimeError("hand-built causal BlockMask differs from create_block_mask's")


def flex_kernel(device, kernel_options: dict | None = None):
    """Compiled public flex_attention with the BlockMask as an input: the same callable times
    dense flex (causal mask) and the sparse kernel (the search's mask), so only the mask differs.
    ``kernel_options`` as FlexAttention takes them (sa_compile's: ``flex.kernel_options_for``)."""
    return _compile(lambda q, k, v, bm: flex_attention(q, k, v, block_mask=bm, enable_gqa=True,
                                                       kernel_options=kernel_options), device)


_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def sparse_search(config: SparseConfig, device):
    """Compiled search + BlockMask build; returns every tensor of the BlockMask."""

    def search(q_BHND, k_BGND):
        scale = q_BHND.shape[-1] ** -0.5
        order_BHQK, count_BHQ = search_blocks(q_BHND, k_BGND, config, scale)
        block_mask, _ = build_block_mask(order_BHQK, count_BHQ, config.block_size, q_BHND.shape[-2])
        return tuple(getattr(block_mask, f) for f in _MASK_FIELDS)

    return _compile(search, device)


def as_block_mask(tensors, n: int, block_size: int) -> BlockMask:
    """Wrap the search's tensors back into a BlockMask (no compute: the fields are stored as is)."""
    return BlockMask((n, n), *tensors, BLOCK_SIZE=(block_size, block_size), mask_mod=causal_mask_mod)


def sparse_end_to_end(config: SparseConfig, device):
    return _compile(lambda q, k, v: sparse_attention(q, k, v, config), device)


def rel_error(out, ref) -> float:
    diff = (out.float() - ref.float()).norm()
    return (diff / ref.float().norm()).item()


def timed(row: dict, fn, args, device, say) -> tuple[dict, object]:
    """Fill ``row`` with the first call (compile included) and the median of timed calls."""
    graphs_before = counters["stats"]["unique_graphs"]
    try:
        first_s, out = common.wall_time(fn, device)
        timing = common.time_fn(fn, device, repeats=args.repeats, warmup=args.warmup, on_step=say)
    except Exception as exc:
        if not common.is_oom(exc):
            raise
        say("OOM")
        row.update(ms="OOM")
        return row, None
    compiled = counters["stats"]["unique_graphs"] > graphs_before
    row.update(ms=timing.median_s * 1e3, samples_ms=[t * 1e3 for t in timing.samples_s], first_call_s=first_s,
               compile_s=first_s - timing.median_s if compiled else None,
               peak_gib=timing.peak_bytes / 2**30 if timing.peak_bytes is not None else None)
    return row, out


def run_length(n: int, args, shape: dict, device, progress) -> list[dict]:
    """Every method at one length, on one set of inputs."""
    label = common.length_label(n)
    q, k, v = make_inputs(n, shape, device, args.seed)
    bs = args.block_size
    rows = []

    def run(method, fn, density=None, output=True, baseline=False):
        say = progress.scoped(f"N={label} {method}")
        say("first call (compiles if needed)")
        row = {"seq_len": n, "method": method, "is_baseline": baseline, "target_density": density,
               "realized_density": realized_density(n, layer_config(args, density)) if density is not None else 1.0}
        row, out = timed(row, fn, args, device, say)
        if output and out is not None and ref is not None:
            row["rel_err_vs_sdpa"] = rel_error(out, ref)
        rows.append(row)
        return out

    ref = None
    base_label, base_fn = dense_sdpa(q, k, v, device, progress.scoped(f"N={label}"))
    ref = run(base_label, base_fn, baseline=True)
    kernel = flex_kernel(device, kernel_options_for(q))  # the options sa_compile's op passes
    dense_mask = causal_block_mask(n, bs, device)
    run("flex dense", lambda: kernel(q, k, v, dense_mask))
    for d in args.densities:
        config = layer_config(args, d)
        search = sparse_search(config, device)
        tensors = run(f"sparse search d={d:g}", lambda: search(q, k), d, output=False)
        if tensors is not None:
            mask = as_block_mask(tensors, n, bs)
            run(f"sparse kernel d={d:g}", lambda: kernel(q, k, v, mask), d)
            del mask, tensors
        e2e = sparse_end_to_end(config, device)
        run(f"sparse e2e d={d:g}", lambda: e2e(q, k, v), d)
    del q, k, v, ref
    common.release_cached_memory(device)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Time over the fused-SDPA time at the same length; search time over that dense time."""
    base = {r["seq_len"]: r["ms"] for r in rows if r.get("is_baseline") and isinstance(r["ms"], float)}
    search = {(r["seq_len"], r["target_density"]): r["ms"] for r in rows
              if r["method"].startswith("sparse search") and isinstance(r["ms"], float)}
    for r in rows:
        b = base.get(r["seq_len"])
        r["ratio_to_sdpa"] = r["ms"] / b if b and isinstance(r["ms"], float) else None
        s = search.get((r["seq_len"], r["target_density"]))
        r["search_share_of_dense"] = s / b if b and s is not None else None


def table(rows: list[dict]) -> str:
    headers = ["N", "method", "realized density", "ms", "t / SDPA", "search / SDPA", "compile (s)", "rel err vs SDPA",
               "peak GiB"]
    return common.markdown_table(headers, [
        [common.length_label(r["seq_len"]), r["method"], r["realized_density"], r["ms"], r["ratio_to_sdpa"],
         r["search_share_of_dense"], r.get("compile_s"), r.get("rel_err_vs_sdpa"),
         r.get("peak_gib")] for r in rows])


def plot(path: Path, rows: list[dict], title: str) -> bool:
    methods = list(dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("sparse kernel")))
    lengths = sorted({r["seq_len"] for r in rows})

    def series(key):
        return common.series_by_length(rows, "method", key, methods, style=lambda m: {
            "linestyle": ":" if m.startswith("sparse search") else "-"})

    ticks = {n: common.length_label(n) for n in lengths}

    return common.plot_panels(path, [
        {"title": "attention layer time", "xlabel": "sequence length", "ylabel": "ms", "series": series("ms"),
         "logx": True, "logy": True, "xticks": ticks},
        {"title": "time relative to fused SDPA", "xlabel": "sequence length", "ylabel": "t / t_SDPA",
         "series": series("ratio_to_sdpa"), "logx": True, "logy": True, "hline": 1.0, "xticks": ticks},
    ], title)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--lengths", help=f"comma list, 4k style allowed (CUDA: {CUDA_SHAPE['lengths']}; "
                                     f"CPU: {CPU_SHAPE['lengths']})")
    p.add_argument("--densities", type=common.parse_floats, default=[0.02, 0.05, 0.1, 0.2],
                   help="comma list of SparseConfig.density values to time")
    p.add_argument("--block-size", type=int, help="sparse block size (CUDA: 128, CPU: 32)")
    p.add_argument("--query-stride", type=int, default=SparseConfig.query_stride,
                   help="strided-query template's stride (SparseConfig.query_stride)")
    common.add_run_arguments(p, repeats=5, warmup=2)
    args = p.parse_args(argv)
    common.check_run_arguments(p, args)
    return args, resolve_shape(args)


def layer_config(args, density: float) -> SparseConfig:
    """The swept config at ``density``: sparse at every length, no taper."""
    return SparseConfig(density=density, block_size=args.block_size, min_seq_len=0, taper_from=None,
                        query_stride=args.query_stride)


def resolve_shape(args) -> dict:
    """The layer shape for ``args.device``; fills in ``args.lengths`` and ``args.block_size``
    where they were not given."""
    shape = CUDA_SHAPE if args.device.startswith("cuda") else CPU_SHAPE
    args.lengths = common.parse_lengths(args.lengths or shape["lengths"])
    args.block_size = args.block_size or shape["block_size"]
    return shape


def main(argv=None) -> None:
    args, shape = parse_args(argv)
    device = torch.device(args.device)
    if not args.warm_caches:
        common.fresh_compile_caches()
    progress = common.Progress()
    progress(f"attention layer: {shape['heads']} q heads, {shape['kv_heads']} kv heads, dim {shape['head_dim']}, "
             f"{shape['dtype']}, block {args.block_size}, on {device}")
    check_causal_block_mask(args.block_size, device)
    rows = []
    # Each density's search and end-to-end closures share one code object, so every density
    # adds a cache entry; past the default limit Dynamo would silently run them eagerly.
    with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(args.densities) * len(args.lengths) + 4)):
        for n in args.lengths:
            rows += run_length(n, args, shape, device, progress)
    add_ratios(rows)
    name = "attention" + (f"_{args.tag}" if args.tag else "")
    env = common.environment(device)
    record = {
        "benchmark": "attention", "shape": {k: v for k, v in shape.items() if k != "lengths"} | {"batch": 1},
        "block_size": args.block_size, "environment": env,
        "baseline": next((r["method"] for r in rows if r["is_baseline"]), None),
        "timing": {"repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
                   "clock": "cuda events" if device.type == "cuda" else "perf_counter",
                   "compile": "torch.compile(fullgraph=True, dynamic=True); compile_s where a length compiled"},
        "sparse_configs": {f"{d:g}": layer_config(args, d).describe()
                           for d in args.densities},
        "rows": rows,
    }
    common.write_json(args.out / f"{name}.json", record)
    plotted = plot(args.out / f"{name}.png", rows, f"attention layer on {env['device']} ({shape['dtype']})")
    print(table(rows))
    progress(f"wrote {args.out / name}.json" + (" and .png" if plotted else ""))


if __name__ == "__main__":
    main()
