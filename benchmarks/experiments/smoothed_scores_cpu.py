"""One-off: strided-query scores smoothed with the previous query block's samples (CPU, 16K).

Each row's row-normalized sampled mass gets ``W`` times the previous query block's added
before the selection (twice the samples behind each score, no extra FLOPs), then
``benchmarks/fidelity.py`` runs as usual with its arguments. Measured, not landed: see
"Scores smoothed over the previous query block" in docs/experiments.md.

    W=0.5 python benchmarks/experiments/smoothed_scores_cpu.py --eager --text .text/text.txt --lengths 16k \\
        --configs strided_query:0.3 --passkeys 0 --recall-layers 0,15 --out DIR
"""

import os
import runpy
import sys
from pathlib import Path

import torch

import sa_compile.estimates as estimates
from sa_compile.config import PatternKind
from sa_compile.templates._blocks import normalize_causal_rows
from sa_compile.templates.strided_query import strided_block_mass

W = float(os.environ["W"])


def smoothed(q, k, config, scale, kv_valid):
    mass_BHQK = normalize_causal_rows(strided_block_mass(q, k, kv_valid, config.block_size, config.query_stride,
                                                         float(scale)).nan_to_num(0.0))
    previous_BHQK = torch.nn.functional.pad(mass_BHQK[..., :-1, :], (0, 0, 1, 0))
    return normalize_causal_rows(mass_BHQK + W * previous_BHQK)


estimates.TEMPLATES[PatternKind.STRIDED_QUERY] = smoothed
sys.argv = ["fidelity.py"] + sys.argv[1:]
runpy.run_path(str(Path(__file__).resolve().parents[1] / "fidelity.py"), run_name="__main__")
