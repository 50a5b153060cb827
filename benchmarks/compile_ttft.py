"""Time to first token of a Llama prefill: eager SDPA vs Inductor vs sa_compile.

TTFT here is one prefill of N tokens that fills a fresh KV cache and returns the logits
of the last position (the first generated token's distribution); the systems
``eager_generate``, ``generate`` (``model.compile(backend=...)``) and ``hf_attention``
(``attn_implementation="sa_compile"``) time ``generate()``'s first token instead, with a
tokenizer's all-ones attention_mask (see ``_systems.py``). Every system runs in this one
process on the same seeded token ids; compile time (first call minus a steady call) is
reported apart from the steady-state median.

    python benchmarks/compile_ttft.py                                   # tiny model, CPU ok (below)
    python benchmarks/compile_ttft.py --model llama-3.1-8b --lengths 16k,32k,64k,128k
    python benchmarks/compile_ttft.py --model llama-3.1-8b --lengths 32k,128k \
        --systems eager,eager_generate,sa_compile,generate,hf_attention     # generate() beside the prefill
    torchrun --nproc-per-node 2 benchmarks/compile_ttft.py --tp 2       # heads sharded over 2 devices
    python benchmarks/compile_ttft.py --calibrate 1k --block-size 16 --systems sa_compile,sa_compile+table

``--patterns FILE`` adds the system ``sa_compile+table``: the default config driven by a
calibrated pattern table. ``--calibrate N`` first calibrates one on this model (random token
ids, ``--calibrate-prompts`` prompts of N tokens, FLOP target ``--flop-budget``), reports the
time it took and its retained attention mass against uniform budgets on a held-out prompt,
then times it like ``--patterns``.

The tiny default (a 2-layer Llama with random weights, CPU, 256-1K tokens, 16-token blocks)
times sa_compile at two budgets that compute different fractions of the causal attention
(density 0.3, the default, and 0.5: 0.23-0.29 and 0.43-0.48 of the blocks), with the
computed fraction beside the speedup and ``vs inductor``, the speedup over plain Inductor:
what sparse attention adds to the compile's own.

With ``--tp``, every system runs on the model sharded by ``sa_compile.tensor_parallel``
(one process per device; nccl on CUDA, gloo on CPU); rank 0 prints and writes, and the
peak memory of every device is reported.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import _calibrated as calibrated
import _common as common
import _parallel as parallel
from _models import build_model
from _systems import System, make_systems

import sa_compile
from sa_compile.patterns import realized_density

TINY_LENGTHS = "256,512,1024"
TINY_EXTRA_DENSITY = 0.5  # beside the default 0.3, which sits at the sink + diagonal floor at 256
LLAMA_LENGTHS = "16k,32k,64k,128k"
EAGER_SYSTEMS = ("eager", "eager_generate")
GRADIENT_SPANS = tuple((n, 2 * n) for n in (64 * 1024, 128 * 1024, 256 * 1024))  # each doubling from 64K


def _counts() -> dict:
    return {"graphs": counters["stats"]["unique_graphs"], **counters["sa_compile"]}


def _delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def measure(first_token, ids_BN, args, device, say) -> dict:
    """One (system, length) row: first call (compiles if needed), warm-up, timed repeats."""
    say("first call (compiles if needed)")
    with torch.inference_mode():
        first_s, logits = common.wall_time(lambda: first_token(ids_BN), device)
        timing = common.time_fn(lambda: first_token(ids_BN), device, repeats=args.repeats,
                                warmup=args.warmup, on_step=say)
    return {
        "ttft_s": timing.median_s, "samples_s": timing.samples_s, "first_call_s": first_s,
        "peak_gib": timing.peak_bytes / 2**30 if timing.peak_bytes is not None else None,
        "logits": logits.float().cpu(),
    }


def measure_or_oom(first_token, ids_BN, args, device, say) -> dict:
    """:func:`measure`, with an out-of-memory recorded as ``"OOM"`` (and its memory freed).

    Any other failure is recorded as ``"FAILED"`` with its traceback on stderr, so one
    system that does not compile does not lose the others' hours of measurements.
    """
    try:
        return measure(first_token, ids_BN, args, device, say)
    except Exception as exc:
        oom = common.is_oom(exc)
        if not oom:
            traceback.print_exc()
        say(f"{'OOM' if oom else 'FAILED'}: {type(exc).__name__}")
        lines = [line for line in str(exc).splitlines() if line.strip()]
        row = {"ttft_s": "OOM" if oom else "FAILED", "error": f"{type(exc).__name__}: {(lines or [''])[0][:300]}"}
    # Out of the except block, so the exception's frames no longer pin the tensors.
    common.release_cached_memory(device)
    return row


def run_system(system: System, model, ids_by_len: dict, args, device, progress, on_row=lambda row: None) -> list[dict]:
    """All lengths of one system on one compiled model; frees it all afterwards."""
    # Rewrite counts of one prefill on the graph that serves this length (see System.serving).
    serving = None
    rows = []
    with system.prepared(model, args.dynamic) as first_token:
        for n, ids_BN in ids_by_len.items():
            say = progress.scoped(f"{system.name:>16} N={common.length_label(n)}")
            before = _counts()
            row = {"system": system.name, "seq_len": n, **measure_or_oom(first_token, ids_BN, args, device, say)}
            change = _delta(before, _counts())
            row["new_graphs"] = change.pop("graphs", 0)
            row["sa_compile_counters"] = change or None
            ok = isinstance(row["ttft_s"], float)
            row["compile_s"] = row["first_call_s"] - row["ttft_s"] if ok and row["new_graphs"] else None
            serving = system.serving(change, row["new_graphs"], 1 + args.warmup + args.repeats, serving)
            row["sdpa_rewritten"] = _rewrite_label(serving) if system.sparse is not None else None
            row["density"] = _density(system, n, serving) if ok else None
            rows.append(row)
            on_row(row)
    common.free_memory(device)
    return rows


def _rewrite_label(serving: dict | None) -> str | None:
    if serving is None:
        return None
    return f"{serving['rewritten']}/{serving['rewritten'] + serving['skipped']}"


def _density(system: System, n: int, serving: dict | None) -> float:
    """Fraction of the causal attention computed: 1.0 unless the serving graph runs sparse."""
    if system.sparse is None or not serving or serving["rewritten"] == 0:
        return 1.0
    # Layers whose SDPA was left dense compute all of their attention.
    rewritten, skipped = serving["rewritten"], serving["skipped"]
    return (rewritten * realized_density(n, system.sparse) + skipped) / (rewritten + skipped)


def add_comparisons(rows: list[dict]) -> None:
    """Speedup over eager and over plain Inductor (the compile's own share, apart from the
    sparsity's), and max |logits - eager logits|, at the same length; drop the logits."""
    timed = {(r["system"], r["seq_len"]): r for r in rows if isinstance(r["ttft_s"], float)}
    for row in rows:
        ok = isinstance(row["ttft_s"], float)
        for base in ("eager", "inductor"):
            ref = timed.get((base, row["seq_len"]))
            row[f"speedup_vs_{base}"] = ref["ttft_s"] / row["ttft_s"] if ok and ref else None
        ref = timed.get(("eager", row["seq_len"]))
        row["max_abs_logit_diff_vs_eager"] = (row["logits"] - ref["logits"]).abs().max().item() if ok and ref else None
    for row in rows:
        row.pop("logits", None)


def extrapolate_eager(rows: list[dict], lengths: list[int]) -> dict | None:
    """Eager's TTFT at lengths it did not run, from ``t = a*N + b*N^2`` (the layers' linear part
    and attention's quadratic one) through its two longest measured lengths, and each sparse
    system's speedup against that. ``None`` when fewer than two lengths were measured."""
    measured = sorted((r["seq_len"], r["ttft_s"]) for r in rows
                      if r["system"] == "eager" and isinstance(r["ttft_s"], float))
    if len(measured) < 2 or not lengths:
        return None
    (n1, t1), (n2, t2) = measured[-2:]
    b = (t2 / n2 - t1 / n1) / (n2 - n1)
    a = t1 / n1 - b * n1
    estimate = {n: a * n + b * n * n for n in lengths}
    speedups = {f"{r['system']}@{common.length_label(r['seq_len'])}": estimate[r["seq_len"]] / r["ttft_s"]
                for r in rows if r["seq_len"] in estimate and isinstance(r["ttft_s"], float)}
    return {"fit": f"t = a*N + b*N^2 through eager at {common.length_label(n1)} and {common.length_label(n2)}",
            "a_s_per_token": a, "b_s_per_token2": b,
            "ttft_s": {common.length_label(n): t for n, t in estimate.items()}, "speedup_vs_extrapolated_eager": speedups}


def compile_summary(rows: list[dict]) -> dict:
    """Per system: compile time at the first length it compiled, and graphs compiled in all."""
    summary = {}
    for row in rows:
        entry = summary.setdefault(row["system"], {"first_compile_len": None, "compile_s": None, "graphs": 0,
                                                   "lengths_compiled": []})
        if row["new_graphs"]:
            if entry["first_compile_len"] is None:
                entry.update(first_compile_len=row["seq_len"], compile_s=row["compile_s"])
            entry["lengths_compiled"].append(row["seq_len"])
        entry["graphs"] += row["new_graphs"]
    for entry in summary.values():
        # A length that compiles anything after the first is a recompile; graph breaks would
        # raise the graph count but not this.
        entry["recompiles"] = max(len(entry["lengths_compiled"]) - 1, 0)
    return summary


def growth_gradients(rows: list[dict]) -> dict:
    """TTFT growth over each doubling from 64K tokens that was measured (``"64k-128k"``, ...), in
    seconds per 1K tokens, and its ratio to eager's over the same span."""
    ttft = {(r["system"], r["seq_len"]): r["ttft_s"] for r in rows if isinstance(r["ttft_s"], float)}
    gradients = {}
    for lo_n, hi_n in GRADIENT_SPANS:
        span = f"{common.length_label(lo_n)}-{common.length_label(hi_n)}"
        for system in dict.fromkeys(r["system"] for r in rows):
            lo, hi = ttft.get((system, lo_n)), ttft.get((system, hi_n))
            if lo is not None and hi is not None:
                gradients.setdefault(span, {})[system] = {"s_per_1k_tokens": (hi - lo) / ((hi_n - lo_n) / 1024)}
        eager = gradients.get(span, {}).get("eager", {}).get("s_per_1k_tokens")
        for entry in gradients.get(span, {}).values():
            entry["ratio_to_eager"] = entry["s_per_1k_tokens"] / eager if eager else None
    return gradients


def _peak_cell(row: dict):
    per_device = row.get("peak_gib_per_device")
    if per_device is None or all(p is None for p in per_device):
        return row.get("peak_gib")
    return " / ".join(common.fmt(p) for p in per_device)


def table(rows: list[dict], summary: dict) -> str:
    per_device = any(r.get("peak_gib_per_device") for r in rows)
    headers = ["system", "N", "TTFT (s)", "speedup vs eager", "vs inductor", "computed fraction", "compile (s)",
               "graphs", "SDPA rewritten", "peak GiB per device" if per_device else "peak GiB", "max |Δlogit|"]
    body = []
    for r in rows:
        first = summary[r["system"]]["first_compile_len"] == r["seq_len"]
        compile_cell = r.get("compile_s") if first else (f"re: {r['compile_s']:.3g}" if r.get("compile_s") else None)
        body.append([r["system"], common.length_label(r["seq_len"]), r["ttft_s"], r["speedup_vs_eager"],
                     r["speedup_vs_inductor"], r["density"], compile_cell, r.get("new_graphs"), r["sdpa_rewritten"],
                     _peak_cell(r), r["max_abs_logit_diff_vs_eager"]])
    return common.markdown_table(headers, body)


def plot(path: Path, rows: list[dict], title: str) -> bool:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    lengths = sorted({r["seq_len"] for r in rows})

    def series(key):
        return common.series_by_length(rows, "system", key, systems)

    ticks = {n: common.length_label(n) for n in lengths}

    return common.plot_panels(path, [
        {"title": "TTFT", "xlabel": "prompt tokens", "ylabel": "seconds", "series": series("ttft_s"),
         "logx": True, "logy": True, "xticks": ticks},
        {"title": "speedup over eager SDPA", "xlabel": "prompt tokens", "ylabel": "eager TTFT / TTFT",
         "series": series("speedup_vs_eager"), "logx": True, "hline": 1.0, "xticks": ticks},
    ], title)


def _one_length(text: str) -> int:
    lengths = common.parse_lengths(text)
    if len(lengths) != 1:
        raise argparse.ArgumentTypeError(f"expected one length, got {text!r}")
    return lengths[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--model", choices=("tiny", "llama-3.1-8b"), default="tiny",
                   help="model shape, random weights: a tiny Llama for the CPU, or Llama-3.1-8B's")
    p.add_argument("--lengths", help=f"comma list, 4k style allowed (tiny: {TINY_LENGTHS}; 8B: {LLAMA_LENGTHS})")
    p.add_argument("--systems", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="subset of: eager, inductor, sa_compile, sa_compile@<density>, sa_compile+heads "
                        "(per-input head budgets), sa_compile+table, and through generate(): eager_generate, "
                        "generate (model.compile), hf_attention (attn_implementation) (default: all)")
    p.add_argument("--densities", type=common.parse_floats,
                   help="extra sa_compile densities, each run as sa_compile@<d> (tiny: 0.5; 8B: 0.05)")
    p.add_argument("--block-size", type=int, help="sa_compile block size (tiny on CPU: 16; else SparseConfig default)")
    p.add_argument("--min-seq-len", type=int, help="sa_compile min_seq_len (tiny: 0, 8B: SparseConfig default)")
    p.add_argument("--taper-from", type=lambda t: None if t.lower() == "none" else _one_length(t),
                   default=sa_compile.SparseConfig.taper_from,
                   help="sa_compile taper_from in tokens, or 'none' for a flat density (default: SparseConfig's)")
    p.add_argument("--dynamic", choices=("auto", "true", "false"), default="auto",
                   help="torch.compile(dynamic=...) for the compiled systems (auto: None, the default)")
    p.add_argument("--patterns", type=Path, help="a calibrated pattern table: adds the system sa_compile+table")
    p.add_argument("--calibrate", type=_one_length, metavar="N",
                   help="calibrate a pattern table on this model at N tokens first (4k style allowed), then "
                        "time it as sa_compile+table")
    p.add_argument("--calibrate-prompts", type=int, default=1, help="calibration prompts (default 1)")
    p.add_argument("--flop-budget", type=float, default=0.1,
                   help="--calibrate's target: kernel FLOPs as a fraction of dense causal attention (default 0.1)")
    common.add_run_arguments(p, repeats=3, warmup=1)
    parallel.add_arguments(p)
    p.add_argument("--eager-up-to", type=_one_length, metavar="N",
                   help="time the eager systems only up to N tokens (4k style allowed); longer lengths get eager's "
                        "TTFT extrapolated from its two longest measured ones (default: every length)")
    p.add_argument("--mlp-chunks", type=int, default=1,
                   help="run each MLP over this many pieces of prompts >= 16K tokens, in every system "
                        "(sa_compile.chunk_mlp: less prefill memory; default 1, off)")
    args = p.parse_args(argv)
    common.check_run_arguments(p, args)
    if args.mlp_chunks < 1:
        p.error("--mlp-chunks must be at least 1")
    parallel.check_arguments(p, args)
    if args.calibrate is not None and (args.patterns is not None or args.tp):
        p.error("--calibrate writes its own table and runs on one device: drop --patterns / --tp")
    if args.calibrate_prompts < 1:
        p.error("--calibrate-prompts must be at least 1")
    if args.model != "tiny" and not args.device.startswith("cuda"):
        p.error("llama-3.1-8b needs a CUDA device")
    args.dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
    args.lengths = common.parse_lengths(args.lengths or (TINY_LENGTHS if args.model == "tiny" else LLAMA_LENGTHS))
    if args.densities is None:
        args.densities = [TINY_EXTRA_DENSITY if args.model == "tiny" else 0.05]
    return args


def sparse_base_config(args) -> sa_compile.SparseConfig:
    """Default SparseConfig; the tiny model's short prompts need small blocks and no length floor.

    Small blocks only on CPU: CUDA's FlexAttention kernel needs the sparse block to be a
    multiple of its tile (128), and refuses 16. With 32-token blocks the tiny prompts' grids
    were so small that most budgets sat at the sink + diagonal floor.
    """
    tiny = args.model == "tiny"
    tiny_block = 16 if args.device == "cpu" else sa_compile.SparseConfig.block_size
    block = args.block_size if args.block_size is not None else (tiny_block if tiny else sa_compile.SparseConfig.block_size)
    floor = args.min_seq_len if args.min_seq_len is not None else (0 if tiny else sa_compile.SparseConfig.min_seq_len)
    return sa_compile.SparseConfig(block_size=block, min_seq_len=floor, taper_from=args.taper_from)


def make_record(args, model, dtype, build_s, systems, rows, device, extra=None) -> dict:
    """Everything a reader needs beside the numbers: model, versions, configs, timing method.

    ``extra``: entries only some runs have (``tensor_parallel``, ``memory_cap``), at the end.
    """
    return {
        "benchmark": "compile_ttft", "model": args.model, "dtype": str(dtype), "build_s": build_s,
        "model_config": {k: getattr(model.config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "rope_parameters", "max_position_embeddings")},
        "environment": common.environment(device), "grad_mode": "torch.inference_mode", "dynamic": args.dynamic,
        "timing": {"repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
                   "clock": "cuda events" if device.type == "cuda" else "perf_counter"},
        "sparse_configs": {s.name: s.sparse.describe() for s in systems if s.sparse is not None},
        "compile": compile_summary(rows), "ttft_growth": growth_gradients(rows), "rows": rows,
        **(extra or {}),
    }


def print_report(record: dict) -> None:
    rows, summary, gradients = record["rows"], record["compile"], record["ttft_growth"]
    if "tensor_parallel" in record:
        tp = record["tensor_parallel"]
        print(f"Tensor parallel over {tp['tp']} devices ({tp['backend']}): {', '.join(tp['devices'])}\n")
    print(table(rows, summary))
    print()
    if "calibration" in record:
        calibrated.print_report(record["calibration"])
    print(common.markdown_table(["system", "first compile at", "compile (s)", "recompiles", "compiled at", "graphs"], [
        [s, common.length_label(e["first_compile_len"]) if e["first_compile_len"] else None, e["compile_s"],
         e["recompiles"], " ".join(map(common.length_label, e["lengths_compiled"])) or None, e["graphs"]]
        for s, e in summary.items()]))
    for r in rows:
        if not isinstance(r["ttft_s"], float):
            print(f"\n{r['system']} at N={common.length_label(r['seq_len'])}: {r['ttft_s']} ({r['error']})")
    if record.get("eager_extrapolated"):
        fit = record["eager_extrapolated"]
        print(f"\neager extrapolated ({fit['fit']}): " + ", ".join(f"{n} {t:.3g} s" for n, t in fit["ttft_s"].items()))
        print("speedup over it: " + ", ".join(f"{k} {v:.3g}x" for k, v in fit["speedup_vs_extrapolated_eager"].items()))
    if gradients:
        print()
        print(common.markdown_table(["system", "span", "TTFT growth (s per 1K tokens)", "ratio to eager's"], [
            [s, span, g["s_per_1k_tokens"], g["ratio_to_eager"]] for span, by_system in gradients.items()
            for s, g in by_system.items()]))


def main(argv=None) -> None:
    args = parse_args(argv)
    device, group, extra = parallel.setup(args)
    lead = group is None or group.lead  # the one process that prints and writes
    if not args.warm_caches:
        common.fresh_compile_caches()
    progress = common.Progress(enabled=lead)
    systems = make_systems(args, sparse_base_config(args)) if args.calibrate is None else None
    progress(f"building {args.model} on {device}")
    start = time.perf_counter()
    model, dtype = build_model(args.model, device, max(args.lengths))
    if group is not None:
        model = sa_compile.tensor_parallel(model, group.mesh)
        extra["tensor_parallel"] = parallel.describe(group, device)
    if args.mlp_chunks > 1:
        sa_compile.chunk_mlp(model, chunks=args.mlp_chunks)
        extra["mlp_chunks"] = {"chunks": args.mlp_chunks, "from_tokens": 16384, "systems": "all, eager included"}
    build_s = time.perf_counter() - start
    progress(f"built in {build_s:.1f}s ({sum(p.numel() for p in model.parameters()) / 1e9:.3g}B params, {dtype})")
    # Seeded per length, so a prompt does not depend on which other lengths were asked for.
    ids_by_len = {n: torch.randint(0, model.config.vocab_size, (1, n),
                                   generator=torch.Generator().manual_seed(args.seed + n)).to(device)
                  for n in args.lengths}
    name = f"ttft_{args.model}" + (f"_tp{args.tp}" if args.tp else "") + (f"_{args.tag}" if args.tag else "")
    if args.calibrate is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        args.patterns = args.out / f"{name}_patterns.json"
        extra["calibration"] = calibrated.calibrate_table(model, args, sparse_base_config(args).block_size, device,
                                                          args.patterns, progress)
        systems = make_systems(args, sparse_base_config(args))
    finished = []

    def save_partial(row):
        if group is not None:
            parallel.annotate_row(row)  # every rank, in step
        if not lead:
            return
        # A run killed at a time limit still leaves every finished row behind.
        finished.append(row)
        record = make_record(args, model, dtype, build_s, systems, finished, device, extra)
        common.write_json(args.out / f"{name}.partial.json", record)

    rows = []
    for system in systems:
        lengths = ids_by_len
        if system.name in EAGER_SYSTEMS and args.eager_up_to is not None:
            lengths = {n: ids for n, ids in ids_by_len.items() if n <= args.eager_up_to}
        rows += run_system(system, model, lengths, args, device, progress, on_row=save_partial)
    add_comparisons(rows)
    if lead:
        if args.eager_up_to is not None:
            extra["eager_extrapolated"] = extrapolate_eager(rows, [n for n in args.lengths if n > args.eager_up_to])
        record = make_record(args, model, dtype, build_s, systems, rows, device, extra)
        common.write_json(args.out / f"{name}.json", record)
        (args.out / f"{name}.partial.json").unlink(missing_ok=True)
        where = record["environment"]["device"] + (f" x{args.tp}, tensor parallel" if args.tp else "")
        plotted = plot(args.out / f"{name}.png", rows, f"{args.model} prefill TTFT on {where}")
        print_report(record)
        progress(f"wrote {args.out / name}.json" + (" and .png" if plotted else ""))
    if group is not None:
        parallel.finish()


if __name__ == "__main__":
    main()
