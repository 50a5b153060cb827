"""Budgeted block selection: from block scores to the kept blocks of every row.

All shapes stay fixed by the block grid and every count lives in a tensor, so nothing
here syncs with the host or recompiles when the budget changes with the length.
"""

from __future__ import annotations

import torch


def causal_block_count(num_blocks_) -> int:
    """Blocks on or below the diagonal of an ``nb x nb`` grid."""
    return num_blocks_ * (num_blocks_ + 1) // 2


def blocks_per_row(num_blocks_, density: float, device) -> torch.Tensor:
    """Largest per-row block count K whose causal grid cost stays within the budget.

    Row ``qb`` keeps ``min(K, qb + 1)`` blocks, costing ``K*nb - K*(K-1)/2`` blocks in all;
    the budget is ``density`` of the ``nb*(nb+1)/2`` causal blocks. Never below the two
    blocks (sink and diagonal) every row keeps anyway. Returns a 0-d int64 tensor.
    """
    nb = torch.full((), num_blocks_, dtype=torch.float64, device=device)
    budget = density * nb * (nb + 1) / 2  # density may also be a tensor: one count per entry
    root = torch.sqrt(((2 * nb + 1) ** 2 - 8 * budget).clamp(min=0))
    k = torch.floor((2 * nb + 1 - root) / 2 + 1e-9)
    return k.clamp(min=torch.clamp(nb, max=2.0), max=nb).to(torch.int64)


def row_counts(k: torch.Tensor, num_blocks_, device) -> torch.Tensor:
    """Blocks row ``qb`` keeps under a per-row count ``k``: ``min(k, qb + 1)``, along a new
    last dimension of ``num_blocks_`` rows (``k`` broadcasts against it)."""
    return torch.minimum(k, torch.arange(num_blocks_, device=device) + 1)


def tapered_density(density: float, taper_blocks: float | None, num_blocks_, device) -> torch.Tensor | float:
    """``density`` scaled by ``min(1, taper_blocks / nb)``, as a 0-d tensor (``density`` itself
    when ``taper_blocks`` is None): the in-graph form of :meth:`SparseConfig.density_at`,
    where a symbolic ``nb`` adds no shape guard."""
    if taper_blocks is None:
        return density
    nb = torch.full((), num_blocks_, dtype=torch.float64, device=device)
    return density * torch.clamp(taper_blocks / nb, max=1.0)


# Scores past this magnitude are not estimates; clamping keeps every key finite and a sum
# of a whole column of keys (the head-budget search's gains) below float32's range.
_KEY_LIMIT = 2.0**100


def _finite_keys(scores: torch.Tensor) -> torch.Tensor:
    """Scores as float32 ranking keys: NaN lowest, infinities clamped to +-_KEY_LIMIT."""
    return scores.float().nan_to_num(-_KEY_LIMIT, _KEY_LIMIT, -_KEY_LIMIT).clamp(-_KEY_LIMIT, _KEY_LIMIT)


def rank_blocks(scores_BHQK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's blocks in the order they are kept: diagonal, sink, then by score.

    Blocks above the diagonal come last, in index order. The diagonal and the sink are put
    in slots 0 and 1 by construction, not by their sort rank, so no score (NaN, +-inf,
    ties) can move them: :func:`~sa_compile.sparse_op.build_block_mask` runs slot 0 as the
    partial (causally masked) block. Only the blocks strictly between sink and diagonal are
    sorted, on finite keys (NaN ranks lowest, infinities are clamped). Returns
    ``order_BHQK`` (block indices, int64) and the row's ranking keys in that order (``+inf``
    and the largest float for the two forced blocks, ``-inf`` above the diagonal).
    """
    nb = scores_BHQK.shape[-1]
    idx = torch.arange(nb, device=scores_BHQK.device)
    free_QK = (idx[:, None] > idx[None, :]) & (idx[None, :] > 0)
    keys = _finite_keys(scores_BHQK)
    # Finite free keys against -inf elsewhere: row qb's qb - 1 free blocks sort first.
    free_keys_BHQK, free_order_BHQK = torch.sort(keys.masked_fill(~free_QK, float("-inf")), dim=-1,
                                                 descending=True, stable=True)
    slot_K, row_Q1 = idx, idx[:, None]
    from_free_QK = (slot_K >= 2) & (slot_K <= row_Q1)  # slot s holds the (s - 2)-th free block
    # where, not clamp: Inductor turns a clamp of an index into a sympy Max, which torch 2.11
    # cannot simplify once the BlockMask's rotation of these lists is fused in (InductorError
    # "argument '-1 + ((0))' is not comparable" on CUDA under dynamic shapes).
    source_BHQK = torch.where(slot_K >= 2, slot_K - 2, 0).expand_as(free_order_BHQK)
    forced_QK = torch.where(slot_K == 0, row_Q1, torch.where((slot_K == 1) & (row_Q1 > 0), 0, slot_K))
    order_BHQK = torch.where(from_free_QK, free_order_BHQK.gather(-1, source_BHQK), forced_QK)
    forced_keys_QK = torch.where(slot_K == 0, float("inf"), torch.where(
        slot_K <= row_Q1, torch.finfo(torch.float32).max, float("-inf")))
    sorted_BHQK = torch.where(from_free_QK, free_keys_BHQK.gather(-1, source_BHQK), forced_keys_QK)
    return order_BHQK, sorted_BHQK


def select_block_lists(scores_BHQK: torch.Tensor, density,
                       search_head_budgets: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept blocks of each row as a list: ``order_BHQK[..., :count_BHQ]``.

    Row ``qb`` keeps its top ``min(K, qb + 1)`` causal blocks, diagonal and sink first.
    ``K`` is one count for every head, or with ``search_head_budgets`` a count per head from
    :func:`head_blocks_per_row`, spending the same layer budget where it buys most mass.
    ``density`` is a number or a 0-d tensor. Returns the ranked block indices (int64) and
    the per-row counts (int64, >= 1).
    """
    nb = scores_BHQK.shape[-1]
    order_BHQK, sorted_BHQK = rank_blocks(scores_BHQK)
    if search_head_budgets:
        k_BH1 = head_blocks_per_row(sorted_BHQK, density)[..., None]
    else:
        k_BH1 = blocks_per_row(nb, density, scores_BHQK.device).expand(*scores_BHQK.shape[:2], 1)
    return order_BHQK, row_counts(k_BH1, nb, scores_BHQK.device)


def order_candidates_reference(scores_BHQW: torch.Tensor, blocks_BHQW: torch.Tensor) -> torch.Tensor:
    """Each row's candidate blocks in the order they are kept, ``[B, H, nb, W]`` int64: slot 0
    (the diagonal) and slot 1 (the sink) first, then the other candidates by score, highest
    first, ties in slot order (a stable sort on :func:`_finite_keys`); slots with no block
    (a negative index) last, as block 0."""
    slot_W = torch.arange(blocks_BHQW.shape[-1], device=blocks_BHQW.device)
    keys = _finite_keys(scores_BHQW)
    keys = torch.where(slot_W < 2, float("inf"), keys)  # diagonal then sink, by construction
    keys = torch.where(blocks_BHQW < 0, float("-inf"), keys)
    _, order_BHQW = torch.sort(keys, dim=-1, descending=True, stable=True)
    return blocks_BHQW.gather(-1, order_BHQW).clamp(min=0)


# Rows up to this wide are ordered by the CUDA kernel (one program sorts a row in registers).
_ORDER_KERNEL_WIDTH = 1024


@torch.library.custom_op("sa_compile::order_candidates", mutates_args=())
def order_candidates(scores_BHQW: torch.Tensor, blocks_BHQW: torch.Tensor) -> torch.Tensor:
    """:func:`order_candidates_reference`; on CUDA, for rows at most 1024 wide, one Triton
    kernel that sorts each row in registers and stores its blocks in order (no separate sort
    and no gather of the order)."""

    def reference():
        return order_candidates_reference(scores_BHQW, blocks_BHQW.long())

    if not scores_BHQW.is_cuda:
        return reference()
    from sa_compile.templates._fallback import kernel_or_reference
    from sa_compile.templates._screened_triton import order_candidates_cuda

    W = scores_BHQW.shape[-1]
    kernel = (f"rows wider than {_ORDER_KERNEL_WIDTH}" if W > _ORDER_KERNEL_WIDTH else
              lambda: order_candidates_cuda(scores_BHQW, blocks_BHQW, _KEY_LIMIT))
    return kernel_or_reference("order_candidates", (f"{W} candidates",), kernel, reference)


@order_candidates.register_fake
def _(scores_BHQW, blocks_BHQW):
    return blocks_BHQW.new_empty(blocks_BHQW.shape, dtype=torch.int64)


def select_candidate_lists(scores_BHQW: torch.Tensor, blocks_BHQW: torch.Tensor, num_blocks_,
                           density) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_block_lists` over each row's candidates (a screened search): the kept
    blocks are ``order_BHQW[..., :count_BHQ]``, the diagonal (slot 0 of the candidates) and
    the sink (slot 1) first, then the other candidates by score (:func:`order_candidates`).

    ``blocks_BHQW`` holds block indices, or a negative index for a slot with no block.
    Row ``qb`` keeps ``min(K, qb + 1)`` blocks, as the unscreened search does, and never
    more than its candidates. Returns int64 block indices (``W`` wide, not ``nb``) and counts.
    """
    k = blocks_per_row(num_blocks_, density, blocks_BHQW.device)
    count_BHQ = torch.minimum(row_counts(k, num_blocks_, blocks_BHQW.device), (blocks_BHQW >= 0).sum(-1))
    return order_candidates(scores_BHQW, blocks_BHQW), count_BHQ


def select_head_block_lists(scores_BHQK: torch.Tensor, density_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_block_lists` with a fixed budget per head (a calibrated pattern table):
    head ``h`` keeps ``min(K_h, qb + 1)`` blocks of row ``qb``, ``K_h`` from ``density_H[h]``."""
    nb = scores_BHQK.shape[-1]
    order_BHQK, _ = rank_blocks(scores_BHQK)
    k_H1 = blocks_per_row(nb, density_H, scores_BHQK.device)[:, None]
    return order_BHQK, row_counts(k_H1, nb, scores_BHQK.device).expand(scores_BHQK.shape[:3])


def keep_mask(order_BHQK: torch.Tensor, count_BHQ: torch.Tensor) -> torch.Tensor:
    """The kept blocks of :func:`select_block_lists` (or of :func:`select_candidate_lists`,
    whose lists are narrower than the grid) as a boolean grid ``keep_BHQK``."""
    nb = order_BHQK.shape[-2]
    kept_BHQW = torch.arange(order_BHQK.shape[-1], device=order_BHQK.device) < count_BHQ[..., None]
    # Unkept slots scatter into a spare last column, dropped after.
    target_BHQW = torch.where(kept_BHQW, order_BHQK, nb)
    grid = torch.zeros(*order_BHQK.shape[:-1], nb + 1, dtype=torch.bool, device=order_BHQK.device)
    return grid.scatter_(-1, target_BHQW, kept_BHQW)[..., :nb]


def select_blocks(scores_BHQK: torch.Tensor, density: float, search_head_budgets: bool = False) -> torch.Tensor:
    """:func:`select_block_lists` as a boolean grid ``keep_BHQK``: every row non-empty and causal."""
    return keep_mask(*select_block_lists(scores_BHQK, density, search_head_budgets))


def grid_cost(k: torch.Tensor, num_blocks_) -> torch.Tensor:
    """Blocks computed when every row keeps ``min(k, qb + 1)``: ``k*nb - k*(k-1)/2``."""
    return k * num_blocks_ - k * (k - 1) // 2


def head_blocks_per_row(sorted_BHQK: torch.Tensor, density, rounds: int = 4,
                        candidates: int = 256) -> torch.Tensor:
    """Per-head block counts that maximize the estimated mass kept within the layer budget.

    Raising head h's count from K to K+1 adds the (K+1)-th best block of every row that has
    one: mass ``gain_h(K)`` for ``nb - K`` blocks of kernel work. With the gain per block made
    non-increasing, the best allocation for a budget keeps, in every head, all steps whose
    gain per block is at least one shared price. The cheapest price whose allocation fits the
    budget (what the uniform split of ``density`` computes, :func:`blocks_per_row` in every
    head, so searching moves blocks between heads and never adds any) is bracketed by rounds
    that each try ``candidates`` prices at once. Prices are searched as the bit patterns of
    float32 (for non-negative floats, ordered as the values), so the defaults' 2**32 steps
    separate any two distinct gains, tiny ones too, in four rounds of tensor ops: a small
    compiled graph and no host sync. Returns ``k_BH`` (int64, >= 2).
    """
    B, H, nb, _ = sorted_BHQK.shape
    device = sorted_BHQK.device
    idx = torch.arange(nb, device=device)
    rows_with_step_QK = idx[:, None] >= idx[None, :]  # row qb has a (K+1)-th block when K <= qb
    # Steps 0 and 1 (diagonal, sink) are always taken; later steps in non-increasing value.
    scored_step_QK = rows_with_step_QK & (idx[None, :] >= 2)
    gains = torch.where(scored_step_QK & torch.isfinite(sorted_BHQK), sorted_BHQK.float(), 0.0)
    per_block_BHK = (gains.sum(-2) / (nb - idx).clamp(min=1)).clamp(min=0.0) + 0.0  # no -0.0
    per_block_BHK = torch.where(idx < 2, float("inf"), per_block_BHK).cummin(-1).values
    price_BHK = per_block_BHK.view(torch.int32).to(torch.int64)  # ordered as the values
    budget_B = H * grid_cost(blocks_per_row(nb, density, device), nb)

    def allocation(price_PB):  # a price per batch entry -> steps taken per head
        taken = (price_BHK >= price_PB[..., None, None]).sum(-1)
        return taken.clamp(min=2, max=nb)  # clamp gives nb when nb < 2

    low_B = torch.full((B,), -1, dtype=torch.int64, device=device)  # below every gain: may not fit
    finite_BHK = torch.where(torch.isinf(per_block_BHK), 0, price_BHK)
    high_B = finite_BHK.amax((-2, -1)) + 1  # above every gain: only the floor, which fits
    step_P = torch.arange(1, candidates, device=device)
    for _ in range(rounds):
        price_PB = torch.cat([low_B + (high_B - low_B) * step_P[:, None] // candidates, high_B[None]])
        fits_PB = grid_cost(allocation(price_PB), nb).sum(-1) <= budget_B
        first_B = fits_PB.to(torch.int32).argmax(0)  # the last candidate, high_B, always fits
        high_B = price_PB.gather(0, first_B[None])[0]
        low_B = torch.where(first_B > 0, price_PB.gather(0, (first_B - 1).clamp(min=0)[None])[0], low_B)
    return allocation(high_B)


def diagonal_only(batch: int, heads: int, num_blocks_, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and indices of a grid that keeps only the diagonal block of each row."""
    idx = torch.arange(num_blocks_, device=device, dtype=torch.int32)
    indices_QK = torch.where(idx[None, :] == 0, idx[:, None], 0)
    counts = torch.ones(batch, heads, num_blocks_, device=device, dtype=torch.int32)
    return counts, indices_QK.expand(batch, heads, num_blocks_, num_blocks_).contiguous()
