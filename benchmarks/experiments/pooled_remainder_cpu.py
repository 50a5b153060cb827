"""Scratch: skipped blocks approximated by their pooled key and value, not dropped.

Eager model through transformers' attention interface (like ``sa_compile.reference.block_attention``). Each query
attends exactly to its kept blocks (the search's, or the oracle's) and, for every causal
block it skips, to one pooled token: the block's mean key with a logit offset ``log(block)``
(it stands for ``block`` keys) and the block's mean value. One softmax over both. At
``pool=False`` it is the plain block-sparse attention the backend computes.

    python benchmarks/experiments/pooled_remainder_cpu.py [threads]
"""

import contextlib
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _smollm2 as smollm2  # noqa: E402
import fidelity  # noqa: E402

from sa_compile import PatternKind, SparseConfig  # noqa: E402
from sa_compile.reference import oracle_keep, search_counts, true_block_mass  # noqa: E402
from sa_compile.sparse_op import select_kept_blocks  # noqa: E402

N, BS = 2048, 16


def attend(q, k, v, cfg, scale, selection, pool):
    B, H, n, D = q.shape
    G = k.shape[1]
    nb = n // BS
    if selection == "oracle":
        keep = oracle_keep(true_block_mass(q, k, BS, scale), search_counts(cfg, n, q.device).expand(B, H, -1))
    else:
        keep = select_kept_blocks(q, k, cfg, scale)
    kh, vh = k.repeat_interleave(H // G, 1).float(), v.repeat_interleave(H // G, 1).float()
    qf = q.float()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    keep_nn = keep.repeat_interleave(BS, -2).repeat_interleave(BS, -1)
    logits = (qf @ kh.transpose(-1, -2) * scale).masked_fill(~(keep_nn & causal), float("-inf"))
    values = vh
    if pool:
        kbar, vbar = kh.unflatten(2, (nb, BS)).mean(3), vh.unflatten(2, (nb, BS)).mean(3)
        before = torch.ones(nb, nb, dtype=torch.bool).tril(-1)  # blocks wholly before the row's diagonal
        skipped = (before & ~keep).repeat_interleave(BS, -2)  # [B, H, n, nb]
        plog = (qf @ kbar.transpose(-1, -2) * scale + math.log(BS)).masked_fill(~skipped, float("-inf"))
        logits = torch.cat([logits, plog], -1)
        values = torch.cat([vh, vbar], -2)
    return (torch.softmax(logits, -1) @ values).to(q.dtype)


@contextlib.contextmanager
def patched(model, cfg, selection, pool):
    def fn(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        return attend(q, k, v, cfg, scaling, selection, pool).transpose(1, 2).contiguous(), None

    AttentionInterface.register("scratch_pool", fn)
    prev = model.config._attn_implementation
    model.set_attn_implementation("scratch_pool")
    try:
        yield
    finally:
        model.set_attn_implementation(prev)


torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
model, tokenizer = smollm2.load_model(), smollm2.load_tokenizer()
ids = tokenizer(smollm2.default_text(), return_tensors="pt").input_ids[:, :N].clone()
with torch.inference_mode():
    dense = model(ids).logits[0, :-1]
for density in (0.1, 0.2, 0.3):
    cfg = SparseConfig(density=density, block_size=BS, min_seq_len=0, pattern=PatternKind.AUTO)  # the default then
    for selection in ("search", "oracle"):
        for pool in (False, True):
            with patched(model, cfg, selection, pool), torch.inference_mode():
                logits = model(ids).logits[0, :-1]
            m = fidelity.token_metrics(logits, dense, ids[0, 1:])
            print(json.dumps({"density": density, "selection": selection, "pool": pool, **m}), flush=True)
