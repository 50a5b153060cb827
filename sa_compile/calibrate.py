"""Calibration: per-head pattern kinds and budgets toward a FLOP target, from real prompts.

For every layer and head, on calibration prompts of one length:

1. the true block mass (dense causal softmax of the layer's real, rotated q and k);
2. for each kind calibration may choose (:func:`sa_compile.estimates.calibration_kinds`: ``local``,
   ``vertical_slash``, ``block_sparse``, ``auto``, ``strided_query``) and every budget K
   (blocks per row), the true mass kept when the op ranks the blocks by that kind's
   scores, as it will at run time (the input still picks the blocks);
3. budgets: every head starts at the sink + diagonal floor (K = 2); then, greedily, the step
   (one head, K -> K') with the most retained mass per block of kernel work (cost from
   :func:`sa_compile.selection.grid_cost`) is taken while the layer total fits the target.
   Looking ahead to every K' (not only K + 1) keeps the greedy from stalling on flat
   stretches of a curve;
4. kinds: each head takes the kind that keeps most mass at its budget (a tie goes to the
   kind registered first, the cheaper search).

    table = calibrate(model, prompts_BN, target=0.1, block_size=64)
    table.save("patterns.json")

    python -m sa_compile.calibrate --model tiny --out patterns.json
    python -m sa_compile.calibrate --model smollm2 --out patterns.json --flop-budget 0.1 --length 2048
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from sa_compile.templates._blocks import num_blocks

from .block_mass import retained_by_budget, true_block_mass
from .config import SparseConfig
from .estimates import calibration_kinds
from .patterns import ModelShape, PatternTable
from .selection import blocks_per_row, causal_block_count, grid_cost

_TIE = 1e-6  # retained-fraction difference below which kinds count as tied
_MASS_CHUNK_BYTES = 2**28  # float32 logits per query chunk of the true block mass


@dataclass
class Curves:
    """Per layer: true mass kept, ``retained[layer]`` ``[kinds, H, nb]`` float64 (index
    ``K - 1``; rows in ``kinds`` order, :func:`~sa_compile.estimates.calibration_kinds`), and
    the total mass ``total[layer]`` ``[H]``, both summed over the prompts."""

    num_blocks: int
    retained: dict
    total: dict
    kinds: tuple[str, ...]

    def fractions(self, layer: int) -> torch.Tensor:
        return self.retained[layer] / self.total[layer][:, None]


def measure_layer(q_BHND, k_BGND, block_size: int, scale: float, last_q: int = 64, kinds=None):
    """``(retained [kinds, H, nb], total [H])`` for one layer's q and k (see :class:`Curves`;
    ``kinds`` defaults to :func:`~sa_compile.estimates.calibration_kinds`)."""
    from .sparse_op import estimate_block_scores

    config = SparseConfig(block_size=block_size, last_q=last_q, min_seq_len=0)
    mass_BHQK = true_block_mass(q_BHND, k_BGND, block_size, scale, _MASS_CHUNK_BYTES)
    kept = [retained_by_budget(mass_BHQK, estimate_block_scores(
        q_BHND, k_BGND, replace(config, pattern=kind), scale)) for kind in kinds or calibration_kinds()]
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


def choose_kinds(fraction_THK: torch.Tensor, k_H: torch.Tensor, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """Per head, the one of ``kinds`` (the rows of ``fraction_THK``) keeping most mass at ``k_H``
    (ties: the earlier kind)."""
    at_budget_TH = fraction_THK.gather(2, (k_H - 1)[None, :, None].expand(len(kinds), -1, 1))[..., 0]
    best_H = at_budget_TH.max(0).values
    kind_H = (at_budget_TH >= best_H - _TIE).double().argmax(0)  # argmax returns the first maximum
    return tuple(kinds[int(c)] for c in kind_H)


def table_from_curves(curves: Curves, model: ModelShape, block_size: int, target: float, reference_len: int,
                      taper: bool = True, calibration: dict | None = None) -> PatternTable:
    """The pattern table the curves call for: budgets by :func:`allocate_head_budgets`, kinds
    by :func:`choose_kinds`."""
    nb = curves.num_blocks
    kinds, densities = [], []
    for layer in range(model.num_layers):
        fraction_THK = curves.fractions(layer)
        k_H = allocate_head_budgets(fraction_THK.amax(0), target)
        kinds.append(choose_kinds(fraction_THK, k_H, curves.kinds))
        densities.append(tuple(float(grid_cost(k, nb)) / causal_block_count(nb) for k in k_H.tolist()))
    return PatternTable(model=model, block_size=block_size, target=target, reference_len=reference_len,
                        taper=taper, kinds=tuple(kinds), densities=tuple(densities),
                        calibration=tuple(sorted((calibration or {}).items())))


def compare_with_uniform(curves: Curves, table: PatternTable) -> dict:
    """Retained mass (mean and min over heads and layers) and computed fraction of the causal
    grid, for the table's kinds and budgets and for uniform budgets (every head the same K,
    the default kind, ``SparseConfig().pattern``): ``uniform`` at the target's K, ``uniform_next`` at K + 1,
    and ``uniform_at_table_flops``, between the two in proportion to the FLOPs the table
    spends (as if that share of the heads took the extra block). Curves from held-out
    prompts make this an honest test of the table."""
    from .estimates import kind_name

    baseline = kind_name(SparseConfig().pattern)
    if baseline not in curves.kinds:
        raise ValueError(f"the curves hold no {baseline!r} (the default kind) to compare with; measured: {curves.kinds}")
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
                c = curves.kinds.index(kind if name == "table" else baseline)
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
    kinds = calibration_kinds()

    def hook(attn, args, kwargs):
        q, k = attention_qk(attn, args, kwargs)
        kept, mass = measure_layer(q, k, block_size, attn.scaling, last_q, kinds)
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
    return Curves(num_blocks=num_blocks(prompts_BN.shape[1], block_size), retained=retained, total=total, kinds=kinds)


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


if __name__ == "__main__":  # the command line lives in sa_compile.calibrate_cli
    from .calibrate_cli import main

    main()
