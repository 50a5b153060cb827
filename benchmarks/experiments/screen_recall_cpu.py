"""Which cheap screen keeps the oracle's blocks? Candidate screens on SmolLM2's real attention (CPU).

For each screen and candidate count (a multiple of the blocks a row keeps), on the rotated q/k
of a few layers of SmolLM2-135M-Instruct (YaRN) at one length:

- *recall of oracle mass*: the share of the oracle's kept mass (per row, the blocks of most
  true mass at the search's counts) that lies inside the screen's candidates;
- *two-stage kept mass*: the true mass kept when the strided sample (every 8th query) ranks
  only the candidates, its softmax taken over them; beside it the unscreened strided sample's
  and the oracle's, at the same per-row counts.

The screens: block-mean queries (per head, ``pooled``) or the strided samples (``sampled``)
against block-mean keys (``mean``) or against a per-dimension bound of each key block's
logits, ``relu(q)·max(k) + min(q,0)·min(k)`` (``bound``); each a causal softmax over key
blocks, summed per block over a block's queries; ``max`` takes the largest logit instead;
``group`` sums over a key head's query heads, so the group shares candidates.
``group pooled mean+bound`` is what ``SparseConfig.candidates`` runs.

    python benchmarks/experiments/screen_recall_cpu.py --length 16384 --block-size 128
    python benchmarks/experiments/screen_recall_cpu.py --length 16384 --block-size 32 --taper-from 4096
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _smollm2  # noqa: E402
from fidelity import capture_qk  # noqa: E402

from sa_compile import SparseConfig  # noqa: E402
from sa_compile.block_mass import true_block_mass  # noqa: E402
from sa_compile.reference import oracle_keep, search_counts  # noqa: E402
from sa_compile.templates.strided_query import sample_positions  # noqa: E402

STRIDE = 8


def block_lse(q, k, pos, nb, block, scale):
    """Each sampled query's log-sum-exp of its causal logits per key block, ``[B, H, X, nb]``."""
    B, H, N, D = q.shape
    kk = k.repeat_interleave(H // k.shape[1], 1)
    out = []
    for c in range(0, pos.shape[0], 512):
        p = pos[c:c + 512]
        s = (q[:, :, p] @ kk.transpose(-1, -2)) * scale
        s = s.masked_fill(torch.arange(N)[None, :] > p[:, None], float("-inf"))
        s = torch.nn.functional.pad(s, (0, nb * block - N), value=float("-inf"))
        out.append(torch.logsumexp(s.unflatten(-1, (nb, block)), -1))
    return torch.cat(out, 2)


def mass_over(lse_BHXK, cand_BHQK, nb, rows):
    """The sampled queries' mass per block, their softmax taken over the candidates only."""
    B, H = lse_BHXK.shape[:2]
    probs = torch.softmax(lse_BHXK.masked_fill(~cand_BHQK.repeat_interleave(rows, 2), float("-inf")), -1)
    return probs.nan_to_num(0).view(B, H, nb, rows, nb).sum(3)


def screens(q, k, pos, nb, block, scale):
    B, H, N, D = q.shape
    G, R = k.shape[1], block // STRIDE
    pad = nb * block - N
    kr = k.repeat_interleave(H // G, 1)
    kbar = torch.nn.functional.pad(kr, (0, 0, 0, pad)).unflatten(2, (nb, block)).mean(3)
    kmax = torch.nn.functional.pad(kr, (0, 0, 0, pad), value=-1e4).unflatten(2, (nb, block)).amax(3)
    kmin = torch.nn.functional.pad(kr, (0, 0, 0, pad), value=1e4).unflatten(2, (nb, block)).amin(3)
    qbar = torch.nn.functional.pad(q, (0, 0, 0, pad)).unflatten(2, (nb, block)).mean(3)
    qs = q[:, :, pos]
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()

    def soft_sum(logits, rows):
        return torch.softmax(logits.masked_fill(~causal.repeat_interleave(rows, 0), float("-inf")), -1).view(
            B, H, nb, rows, nb).sum(3)

    def group(x):
        return x.view(B, G, H // G, nb, nb).sum(2).repeat_interleave(H // G, 1)

    def bound(x):
        return (x.clamp(min=0) @ kmax.transpose(-1, -2) + x.clamp(max=0) @ kmin.transpose(-1, -2)) * scale

    pooled_mean = soft_sum((qbar @ kbar.transpose(-1, -2)) * scale, 1)
    pooled_bound = soft_sum(bound(qbar), 1)
    sampled_mean_logits = (qs @ kbar.transpose(-1, -2)) * scale
    sampled_bound = soft_sum(bound(qs), R)
    return {
        "pooled mean": pooled_mean,
        "sampled mean": soft_sum(sampled_mean_logits, R),
        "sampled mean max": sampled_mean_logits.masked_fill(~causal.repeat_interleave(R, 0), float("-inf")).view(
            B, H, nb, R, nb).amax(3),
        "pooled bound": pooled_bound,
        "sampled bound": sampled_bound,
        "group pooled mean": group(pooled_mean),
        "group sampled mean": group(soft_sum(sampled_mean_logits, R)),
        "group pooled bound": group(pooled_bound),
        "group sampled bound": group(sampled_bound),
        "group pooled max(mean,bound)": torch.maximum(group(pooled_mean), group(pooled_bound)),
        "group pooled mean+bound": group(pooled_mean) + group(pooled_bound),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384, help="prompt tokens (default: 16384)")
    p.add_argument("--block-size", type=int, default=128, help="block side (default: 128)")
    p.add_argument("--taper-from", type=int, default=32768, help="SparseConfig.taper_from (default: 32768)")
    p.add_argument("--layers", default="2,10,20", help="layers whose q/k are read (default: 2,10,20)")
    p.add_argument("--factors", default="1.5,2,3,4", help="candidates per kept block (default: 1.5,2,3,4)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    start = time.time()
    tokenizer = _smollm2.load_tokenizer()
    ids = tokenizer(_smollm2.default_text(), return_tensors="pt").input_ids[:, :args.length]
    model = _smollm2.load_model(yarn_factor=_smollm2.default_yarn_factor(args.length))
    model.model.layers = model.model.layers[:max(layers) + 1]
    with torch.inference_mode():
        _, captured = capture_qk(model, ids, layers)
    print(f"captured {time.time() - start:.0f}s", flush=True)
    scale = model.model.layers[0].self_attn.scaling
    bs = args.block_size
    for layer, (q, k) in captured.items():
        q, k = q.float(), k.float()
        B, H, N, _ = q.shape
        nb = -(-N // bs)
        counts = search_counts(SparseConfig(block_size=bs, min_seq_len=0, taper_from=args.taper_from), N,
                               "cpu").expand(B, H, nb)
        mass = true_block_mass(q, k, bs, scale)
        total = mass.sum((-2, -1))
        oracle = oracle_keep(mass, counts)
        pos = sample_positions(nb, bs, STRIDE, "cpu").flatten().clamp(max=N - 1)
        lse = block_lse(q, k, pos, nb, bs, scale)
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        strided = oracle_keep(mass_over(lse, causal.expand(B, H, nb, nb), nb, bs // STRIDE), counts)

        def kept(keep):
            return float(((mass * keep).sum((-2, -1)) / total).mean())

        print(f"layer {layer}: N={N} nb={nb} K={int(counts.max())} oracle recall {kept(oracle):.4f} "
              f"strided {kept(strided):.4f}")
        idx = torch.arange(nb)
        offset = idx[:, None] - idx[None, :]
        forced_diag_sink = (offset >= 0) & ((offset < 2) | (idx[None, :] == 0))
        for name, screen in screens(q, k, pos, nb, bs, scale).items():
            for factor in (float(f) for f in args.factors.split(",")):
                cand = oracle_keep(torch.where(forced_diag_sink, float("inf"), screen), (counts.float() * factor).long())
                recall = float(((mass * (cand & oracle)).sum((-2, -1)) / (mass * oracle).sum((-2, -1))).mean())
                refined = mass_over(lse, cand, nb, bs // STRIDE)
                keep = oracle_keep(torch.where(cand, refined, -1.0), counts)
                print(f"  {name:28s} x{factor:g}: recall of oracle mass {recall:.4f}  two-stage kept mass "
                      f"{kept(keep):.4f}", flush=True)
    print(f"done {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
