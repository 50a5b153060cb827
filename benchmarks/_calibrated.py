"""``compile_ttft.py --calibrate``: calibrate a pattern table on the benchmark's own model,
and report how long it took and how much attention mass it keeps against uniform budgets."""

from __future__ import annotations

import time
from pathlib import Path

import _common as common
import torch


def calibrate_table(model, args, block: int, device, path: Path, progress) -> dict:
    """Calibrate a pattern table on ``model`` (``--calibrate``), save it to ``path``, and
    return how it went: seconds, and retained mass against uniform budgets in sample and on
    one held-out prompt (token ids drawn like the timed prompts, other seeds)."""
    from sa_compile.calibrate import calibrate, compare_with_uniform, measure_model

    n, count = args.calibrate, args.calibrate_prompts

    def prompts(first_seed, k):
        return torch.stack([torch.randint(0, model.config.vocab_size, (n,),
                                          generator=torch.Generator().manual_seed(10_000 + first_seed + i))
                            for i in range(k)]).to(device)

    progress(f"calibrating a pattern table at N={common.length_label(n)} ({count} prompt(s), "
             f"FLOP target {args.flop_budget}, block {block})")
    common.synchronize(device)
    start = time.perf_counter()
    table = calibrate(model, prompts(0, count), target=args.flop_budget, block_size=block,
                      model_id=f"{args.model} (random weights)")
    common.synchronize(device)
    seconds = time.perf_counter() - start
    held_out = compare_with_uniform(measure_model(model, prompts(count, 1), block), table)
    table.save(path)
    progress(f"calibrated in {seconds:.1f}s; held-out retained mass: table "
             f"{held_out['table']['retained_mean']:.4f}, uniform at equal FLOPs "
             f"{held_out['uniform_at_table_flops']['retained_mean']:.4f}; wrote {path}")
    return {"table": str(path), "seq_len": n, "prompts": count, "flop_budget": args.flop_budget,
            "block_size": block, "seconds": seconds, "in_sample": dict(table.calibration)["in_sample"],
            "held_out": held_out}


def print_report(c: dict) -> None:
    """The calibration's time and its retained mass, as a markdown table."""
    print(f"Pattern table calibrated at N={common.length_label(c['seq_len'])} in {c['seconds']:.1f} s "
          f"({c['prompts']} prompt(s), FLOP target {c['flop_budget']}); retained attention mass, mean / min "
          "over heads, and computed fraction of the causal grid:\n")
    print(common.markdown_table(["prompts", "selection", "retained mean", "retained min", "computed fraction"], [
        [where, sel, c[where][sel].get("retained_mean"), c[where][sel].get("retained_min"),
         c[where][sel]["computed_fraction"]]
        for where in ("in_sample", "held_out") for sel in ("table", "uniform", "uniform_next",
                                                            "uniform_at_table_flops")]))
    print()
