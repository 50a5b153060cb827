"""A calibrated pattern table against uniform budgets on SmolLM2-135M: next-token fidelity.

One held-out window of the license texts (window ``--window``, past the calibration and
evaluation windows of ``python -m sa_compile.calibrate``), dense vs the compiled model with
the table, and with uniform budgets of K and K + 1 blocks per row around the table's FLOPs.

    python -m sa_compile.calibrate --model smollm2 --out table.json --flop-budget 0.1 --length 2048 --block-size 16
    python benchmarks/calibration.py table.json --out calibration_e2e.json      # ~6 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
import transformers
from torch._dynamo.utils import counters

import sa_compile
from sa_compile import SparseConfig
from sa_compile.calibrate_cli import prompt_windows, smollm2_model
from sa_compile.patterns import PatternTable, realized_density
from sa_compile.selection import blocks_per_row, causal_block_count, grid_cost


def metrics(logits_NV, dense_NV, next_N) -> dict:
    logp, dense_logp = F.log_softmax(logits_NV, -1), F.log_softmax(dense_NV, -1)
    return {"top1_agreement": float((logits_NV.argmax(-1) == dense_NV.argmax(-1)).double().mean()),
            "kl": float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean()),
            "ppl": float((-logp.gather(-1, next_N[:, None]).mean()).exp()),
            "dense_ppl": float((-dense_logp.gather(-1, next_N[:, None]).mean()).exp())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("table", help="calibrated pattern table (JSON) to compare with uniform budgets")
    parser.add_argument("--window", type=int, default=4, help="index of the held-out text window compared (past the calibration and evaluation windows)")
    parser.add_argument("--out", default="calibration_e2e.json", help="JSON file the results are written to")
    args = parser.parse_args()
    table = PatternTable.load(args.table)
    model, tokenizer = smollm2_model()
    length, bs = table.reference_len, table.block_size
    nb = -(-length // bs)
    ids = prompt_windows(tokenizer, None, 1, length, args.window, model.config.vocab_size)
    with torch.inference_mode():
        dense = model(ids).logits[0, :-1].double()
    k = int(blocks_per_row(nb, table.target, "cpu"))
    configs = {"table": SparseConfig(block_size=bs, min_seq_len=0, patterns=args.table)}
    for kk in (k, k + 1):  # the density that is exactly K blocks per row
        configs[f"uniform_k{kk}"] = SparseConfig(block_size=bs, min_seq_len=0, taper_from=None,
                                                 density=grid_cost(kk, nb) / causal_block_count(nb) + 1e-12)
    rows = {}
    for name, config in configs.items():
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=sa_compile.make_backend(config), fullgraph=True)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = compiled(ids).logits[0, :-1].double()
        fraction = realized_density(length, config)  # with patterns: the table's exact total
        rows[name] = {**metrics(logits, dense, ids[0, 1:]), "computed_fraction": fraction,
                      "compile_and_run_s": round(time.perf_counter() - start, 1), "counters": dict(counters["sa_compile"])}
        print(name, json.dumps(rows[name]), flush=True)
    record = {"table": args.table, "length": length, "block_size": bs, "window": args.window, "results": rows,
              "torch": torch.__version__, "transformers": transformers.__version__, "cpu": platform.processor(),
              "python": platform.python_version()}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print("| config | computed fraction | top-1 agreement | KL(dense‖sparse) | ppl (dense) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['computed_fraction']:.4f} | {r['top1_agreement']:.3f} | {r['kl']:.3f} | "
              f"{r['ppl']:.2f} ({r['dense_ppl']:.2f}) |")


if __name__ == "__main__":
    main()
