"""Sparse attention against dense on long structured inputs, beside the best blocks one could keep.

Inputs: the Llama-3.1-8B attention shape (32 q heads, 8 KV heads, head dim 128; bf16 on a
GPU) with planted sinks, heavy columns, a RoPE local band and two lookups
(``_structured_inputs.py``). Per length and density:

- the real op (``torch.compile(sparse_attention)``): its output's relative error against
  dense SDPA, ``||o - o_dense|| / ||o_dense||``, and its recall (share of the true dense
  attention mass inside the blocks it kept);
- the oracle: per query block, the blocks holding the most true mass, at the per-row counts the
  density gives every head (the search's own counts, so the same cost; with
  ``--search-head-budgets`` the search shares that total between heads per input instead),
  run through FlexAttention;
- their ratio ``err / oracle_err`` (target: at most 1.25).

The true block mass is computed in float32 one chunk of query rows at a time (never N x N).

    python benchmarks/structured.py --out results/   # GPU: 32K, 64K, 128K, bf16, block 128 (minutes, compiles included)
    python benchmarks/structured.py                  # CPU: 2K and 4K, float32, block 64 (about a minute)
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import flex_attention

import _common as common
from _structured_inputs import structured_inputs
from attention import dense_sdpa  # cuDNN SDPA where it runs, as the attention benchmark

from sa_compile import SparseConfig, sparse_attention
from sa_compile.reference import (
    block_recall, oracle_keep, recall_summary, search_counts, selection_block_mask, true_block_mass,
)
from sa_compile.selection import causal_block_count

GPU_DEFAULTS = {"lengths": "32k,64k,128k", "block_size": 128, "dtype": "bfloat16"}
CPU_DEFAULTS = {"lengths": "2k,4k", "block_size": 64, "dtype": "float32"}
ERR_RATIO_TARGET = 1.25


def compile_for(fn, device):
    """One dynamic compile serves every length (as in benchmarks/attention.py); Inductor's CPU
    FlexAttention template rejects epilogue fusion."""
    options = {"epilogue_fusion": False} if device.type == "cpu" else None
    return torch.compile(fn, fullgraph=True, dynamic=True, options=options)


class Ops:
    """The compiled sparse op and a compiled FlexAttention over a given BlockMask."""

    def __init__(self, device):
        self.sparse = compile_for(sparse_attention, device)
        self.flex = compile_for(lambda q, k, v, bm: flex_attention(q, k, v, block_mask=bm, enable_gqa=True), device)


def rel_error_per_head(out_BHND, ref_BHND) -> torch.Tensor:
    """``||o - o_ref|| / ||o_ref||`` per head, and (last entry) over all heads; float64, on the host."""
    diff2_H = (out_BHND.float() - ref_BHND.float()).pow(2).sum((0, 2, 3)).double()
    ref2_H = ref_BHND.float().pow(2).sum((0, 2, 3)).double()
    per_head = (diff2_H / ref2_H).sqrt()
    return torch.cat([per_head, (diff2_H.sum() / ref2_H.sum()).sqrt()[None]]).cpu()


def timed_call(fn, device, say, what: str):
    """Run ``fn`` once; report its wall time and whether it compiled a new graph."""
    graphs = counters["stats"]["unique_graphs"]
    seconds, result = common.wall_time(fn, device)
    compiled = counters["stats"]["unique_graphs"] > graphs
    say(f"{what}: {seconds:.2f}s" + (" (compiled)" if compiled else ""))
    return result, seconds if compiled else 0.0


def _side(err_H1: torch.Tensor, recall_BH: torch.Tensor) -> dict:
    return {"rel_err": float(err_H1[-1]), "rel_err_worst_head": float(err_H1[:-1].max()),
            "recall": recall_summary(recall_BH), "rel_err_H": err_H1[:-1].tolist(),
            "recall_H": recall_BH[0].tolist()}


def sparse_config(density: float, args) -> SparseConfig:
    return SparseConfig(density=density, block_size=args.block_size, min_seq_len=0, taper_from=None,
                        search_head_budgets=args.search_head_budgets, pattern=args.pattern)


def measure_density(density, q, k, v, mass, dense, args, ops, say) -> tuple[dict, float]:
    """The search and the oracle at one density; returns the row and seconds spent compiling."""
    n, bs = q.shape[-2], args.block_size
    cfg = sparse_config(density, args)
    (out, keep), compile_s = timed_call(partial(ops.sparse, q, k, v, cfg, return_keep=True), q.device, say,
                                        "sparse op")
    search = _side(rel_error_per_head(out, dense), block_recall(mass, keep))
    del out
    # The oracle keeps the uniform per-row counts of the density; with search_head_budgets the
    # search shares the same total between heads, and both must fit the same budget.
    counts_BHQ = search_counts(cfg, n, q.device).expand(keep.shape[:3])
    if not cfg.search_head_budgets and not torch.equal(keep.sum(-1), counts_BHQ):
        raise RuntimeError("the search kept other per-row counts than the density gives")
    best = oracle_keep(mass, counts_BHQ)
    mask = selection_block_mask(best, bs, n)
    oracle_out, more = timed_call(partial(ops.flex, q, k, v, mask), q.device, say, "oracle flex")
    oracle = _side(rel_error_per_head(oracle_out, dense), block_recall(mass, best))
    err_ratio_H = torch.tensor(search["rel_err_H"]) / torch.tensor(oracle["rel_err_H"]).clamp(min=1e-12)
    causal_blocks = keep.shape[0] * keep.shape[1] * causal_block_count(keep.shape[2])
    row = {"seq_len": n, "density": density, "realized_density": float(keep.sum()) / causal_blocks,
           "oracle_realized_density": float(best.sum()) / causal_blocks, "search": search,
           "oracle": oracle, "err_ratio": search["rel_err"] / max(oracle["rel_err"], 1e-12),
           "err_ratio_worst_head": float(err_ratio_H.max())}
    row["meets_target"] = row["err_ratio"] <= ERR_RATIO_TARGET
    say(f"err {search['rel_err']:.4f} vs oracle {oracle['rel_err']:.4f} (x{row['err_ratio']:.2f}); recall "
        f"{search['recall']['mean']:.3f} vs oracle {oracle['recall']['mean']:.3f}")
    return row, compile_s + more


def measure_length(n: int, args, ops, device, progress) -> tuple[list[dict], dict]:
    """Every density at one length, on one input; returns the rows and this length's record."""
    label = common.length_label(n)
    say = progress.scoped(f"N={label}")
    start = time.perf_counter()
    q, k, v, plan = structured_inputs(n, args.heads, args.kv_heads, args.head_dim, seed=args.seed,
                                      dtype=getattr(torch, args.dtype), device=device)
    say(f"inputs built ({time.perf_counter() - start:.1f}s)")
    sdpa_label, sdpa = dense_sdpa(q, k, v, device, say)
    dense, _ = timed_call(sdpa, device, say, sdpa_label)
    scale = args.head_dim**-0.5
    mass, _ = timed_call(partial(true_block_mass, q, k, args.block_size, scale, int(args.chunk_gib * 2**30)),
                         device, say, "true block mass (chunked, float32)")
    full_mask = selection_block_mask(torch.ones_like(mass, dtype=torch.bool).tril(), args.block_size, n)
    floor_out, compile_s = timed_call(partial(ops.flex, q, k, v, full_mask), device, say, "dense flex (error floor)")
    floor = float(rel_error_per_head(floor_out, dense)[-1])
    del floor_out, full_mask
    rows = []
    for density in args.densities:
        row, more = measure_density(density, q, k, v, mass, dense, args, ops, progress.scoped(f"N={label} d={density}"))
        row["floor_rel_err"] = floor
        rows.append(row)
        compile_s += more
    seconds = time.perf_counter() - start
    record = {"seq_len": n, "seconds": seconds, "compile_seconds": compile_s, "dense_reference": sdpa_label,
              "floor_rel_err": floor, "plan": plan.describe()}
    del q, k, v, dense, mass
    common.release_cached_memory(device)
    return rows, record


def table(rows: list[dict]) -> str:
    headers = ["N", "density", "realized (search / oracle)", "search err", "oracle err", "err ratio", "worst-head ratio",
               "search recall mean / min", "oracle recall mean / min", "dense flex err"]
    return common.markdown_table(headers, [
        [common.length_label(r["seq_len"]), r["density"], f"{r['realized_density']:.4f} / {r['oracle_realized_density']:.4f}",
         r["search"]["rel_err"],
         r["oracle"]["rel_err"], r["err_ratio"], r["err_ratio_worst_head"],
         f"{r['search']['recall']['mean']:.3f} / {r['search']['recall']['min']:.3f}",
         f"{r['oracle']['recall']['mean']:.3f} / {r['oracle']['recall']['min']:.3f}", r["floor_rel_err"]]
        for r in rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--lengths", help=f"comma list, 4k style allowed (GPU: {GPU_DEFAULTS['lengths']}; "
                                     f"CPU: {CPU_DEFAULTS['lengths']})")
    p.add_argument("--densities", type=common.parse_floats, default=[0.02, 0.05, 0.1, 0.2],
                   help="comma list of SparseConfig.density values")
    p.add_argument("--block-size", type=int, help="sparse block size (GPU: 128, CPU: 64)")
    p.add_argument("--heads", type=int, default=32, help="query heads (fewer only to save time)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads of the attention inputs")
    p.add_argument("--head-dim", type=int, default=128, help="head dim of the attention inputs")
    p.add_argument("--dtype", help="GPU: bfloat16, CPU: float32")
    common.add_pattern_argument(p)
    p.add_argument("--search-head-budgets", action="store_true",
                   help="share each density's block budget between heads per input (SparseConfig.search_head_budgets)")
    p.add_argument("--chunk-gib", type=float, default=1.0, help="float32 logits per chunk of the true-mass loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device to run on")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder the JSON results are written to")
    p.add_argument("--tag", default="", help="suffix added to the result files' names")
    args = p.parse_args(argv)
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    args.lengths = common.parse_lengths(args.lengths or defaults["lengths"])
    args.block_size = args.block_size or defaults["block_size"]
    args.dtype = args.dtype or defaults["dtype"]
    return args


def projected_seconds(done: list[dict], remaining: list[int]) -> float:
    """Time still needed, scaling the last length's time (compiles excluded) by N^2."""
    last = done[-1]
    per_n2 = (last["seconds"] - last["compile_seconds"]) / last["seq_len"] ** 2
    return sum(per_n2 * n**2 for n in remaining)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    progress = common.Progress()
    progress(f"structured inputs: {args.heads} q heads, {args.kv_heads} kv heads, dim {args.head_dim}, {args.dtype}, "
             f"block {args.block_size}, lengths {[common.length_label(n) for n in args.lengths]}, on {device}")
    ops = Ops(device)
    rows, lengths = [], []
    with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(args.densities) * len(args.lengths) + 4)):
        for i, n in enumerate(args.lengths):
            new_rows, record = measure_length(n, args, ops, device, progress)
            rows += new_rows
            lengths.append(record)
            progress(f"N={common.length_label(n)} done in {record['seconds']:.1f}s "
                     f"({record['compile_seconds']:.1f}s compiling); projected for the rest: "
                     f"{projected_seconds(lengths, args.lengths[i + 1:]):.0f}s")
    name = "structured" + (f"_{args.tag}" if args.tag else "")
    record = {"benchmark": "structured", "environment": common.environment(device),
              "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                        "dtype": args.dtype, "batch": 1},
              "block_size": args.block_size, "seed": args.seed, "err_ratio_target": ERR_RATIO_TARGET,
              "sparse_configs": {f"{d:g}": sparse_config(d, args).describe() for d in args.densities},
              "lengths": lengths, "rows": rows}
    common.write_json(args.out / f"{name}.json", record)
    text = table(rows)
    (args.out / f"{name}.md").write_text(text + "\n")
    print(text)
    progress(f"wrote {args.out / name}.json and .md")


if __name__ == "__main__":
    main()
