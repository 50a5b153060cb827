"""Scratch: does spending the budget on the first layers buy fidelity? SmolLM2-135M, 2K, block 16.

Hand-made pattern tables (every head ``auto``): the first ``L`` layers at density 1.0 (dense),
the rest at ``d``; beside uniform ``d``. Next-token metrics against dense on fidelity.py's
text (its first 2,048 tokens, the same slice fidelity.py measures).

    python benchmarks/experiments/layer_density_cpu.py > docs/results/layer_density_cpu.log
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _smollm2 as smollm2  # noqa: E402
import fidelity  # noqa: E402

import sa_compile  # noqa: E402
from sa_compile import SparseConfig  # noqa: E402
from sa_compile.patterns import ModelShape, PatternTable  # noqa: E402

N, BS = 2048, 16
RUNS = [(0, 0.1), (1, 0.1), (2, 0.1), (4, 0.1), (2, 0.3), (2, 0.5)]

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
model, tokenizer = smollm2.load_model(), smollm2.load_tokenizer()
ids = tokenizer(smollm2.default_text(), return_tensors="pt").input_ids[:, :N].clone()
with torch.inference_mode():
    dense = model(ids).logits[0, :-1]
c = model.config
shape = ModelShape("smollm2-135m", c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                   c.hidden_size // c.num_attention_heads)
tmp = Path(tempfile.mkdtemp())
for dense_layers, d in RUNS:
    dens = tuple((1.0 if i < dense_layers else d,) * shape.num_heads for i in range(shape.num_layers))
    table = PatternTable(shape, BS, d, N, False, (("auto",) * shape.num_heads,) * shape.num_layers, dens)
    path = tmp / f"t{dense_layers}_{d}.json"
    table.save(path)
    cfg = SparseConfig(block_size=BS, min_seq_len=0, patterns=str(path))
    torch._dynamo.reset()
    counters.clear()
    start = time.perf_counter()
    compiled = torch.compile(model, backend=sa_compile.make_backend(cfg))
    with torch.inference_mode():
        logits = compiled(ids.clone()).logits[0, :-1]
    row = {"dense_layers": dense_layers, "density": d, "computed_fraction": table.computed_fraction(N),
           **fidelity.token_metrics(logits, dense, ids[0, 1:]), "s": round(time.perf_counter() - start, 1),
           "counters": dict(counters["sa_compile"])}
    print(json.dumps(row), flush=True)
