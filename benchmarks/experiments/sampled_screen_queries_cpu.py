"""One-off: the screen's query-block means from the sampled queries only (CPU, real attention).

The screen scores key blocks against each query block's mean query (``screen_queries``), which
reads every query: at 128K on an H100 that mean is the search's second-largest kernel (0.39 ms
of 8.2, 2026-12-07). The candidate kernel reads only every 8th query of a block. If the screen's
mean came from those same sampled queries (16 of 128 per block), the search would read q once at
1/8 of its size. This measures what that does to the blocks kept: the true attention mass the
default's blocks keep (screened, 4 candidates per kept block, int8 estimate), with the screen's
means from every query (the default) and from the stride-8 samples
(``SparseConfig.sampled_screen_means``), beside the oracle at the same per-row counts.
SmolLM2-135M-Instruct + YaRN, the fidelity harness's default text, float32. (The version at
commit 8313433 patched the package and also tried every 32nd query.)

    python benchmarks/experiments/sampled_screen_queries_cpu.py --length 131072 --layers 2
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _smollm2  # noqa: E402
from fidelity import capture_qk  # noqa: E402

from sa_compile import SparseConfig  # noqa: E402
from sa_compile.block_mass import true_block_mass  # noqa: E402
from sa_compile.reference import oracle_keep  # noqa: E402
from sa_compile.sparse_op import select_kept_blocks  # noqa: E402



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--layers", default="2,10,20")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    start = time.time()
    tokenizer = _smollm2.load_tokenizer()
    ids = tokenizer(_smollm2.default_text(), return_tensors="pt").input_ids[:, :args.length]
    model = _smollm2.load_model(yarn_factor=_smollm2.default_yarn_factor(args.length))
    model.model.layers = model.model.layers[:max(layers) + 1]
    model.lm_head = torch.nn.Identity()  # no 128K x vocab logits: only q and k are needed
    with torch.inference_mode():
        _, captured = capture_qk(model, ids, layers)
    print(f"captured {ids.shape[1]} tokens, layers {layers}: {time.time() - start:.0f}s", flush=True)
    scale = model.model.layers[0].self_attn.scaling
    config = SparseConfig()
    variants = {"every query (the default)": config,
                "the stride-8 samples": replace(config, sampled_screen_means=True)}
    with torch.inference_mode():
        for layer in layers:
            q, k = (t.float() for t in captured[layer])
            mass = true_block_mass(q, k, config.block_size, scale)
            total = mass.sum()
            kept = {}
            for name, cfg in variants.items():
                kept[name] = select_kept_blocks(q, k, cfg, scale)
            counts = kept["every query (the default)"].sum(-1)
            assert all(torch.equal(v.sum(-1), counts) for v in kept.values()), "equal per-row counts"
            kept["oracle"] = oracle_keep(mass, counts)
            base = kept["every query (the default)"]
            for name, keep in kept.items():
                changed = float((keep != base).sum() / (2 * base.sum()))
                print(f"layer {layer} {name:28s} kept mass {float((mass * keep).sum() / total):.5f}"
                      f"  blocks changed {changed:.4f}", flush=True)
    print(f"done {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
