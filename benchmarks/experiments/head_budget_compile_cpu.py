"""Compile time of the head-budget price search, CPU proxy: 8 'layers' of block scores in one graph.

Compares one count for every head (no search), the 24-step bisection the search used before
commit 5e83240 (copied below), and the current ``head_blocks_per_row`` (4 rounds of 256
candidates). Run from the repository root: ``python benchmarks/experiments/head_budget_compile_cpu.py``.
"""

import time

import torch

from sa_compile.selection import blocks_per_row, grid_cost, head_blocks_per_row, rank_blocks


def bisection(sorted_BHQK, density, iterations=24):
    """The former search: a 24-step bisection over the price (linear, from 0 to the largest gain)."""
    B, H, nb, _ = sorted_BHQK.shape
    idx = torch.arange(nb, device=sorted_BHQK.device)
    scored = (idx[:, None] >= idx[None, :]) & (idx[None, :] >= 2)
    gains = torch.where(scored & torch.isfinite(sorted_BHQK), sorted_BHQK, 0.0)
    per_block = gains.sum(-2) / (nb - idx).clamp(min=1)
    per_block = torch.where(idx < 2, float("inf"), per_block).cummin(-1).values
    budget = H * grid_cost(blocks_per_row(nb, density, sorted_BHQK.device), nb)

    def allocation(price):
        return (per_block >= price[:, None, None]).sum(-1).clamp(min=2, max=nb)

    low = torch.zeros(B)
    high = per_block.masked_fill(torch.isinf(per_block), 0.0).amax((-2, -1)) + 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        fits = grid_cost(allocation(mid), nb).sum(-1) <= budget
        high, low = torch.where(fits, mid, high), torch.where(fits, low, mid)
    return allocation(high)


def equal_counts(sorted_BHQK, density):
    return blocks_per_row(sorted_BHQK.shape[-1], density, sorted_BHQK.device).expand(sorted_BHQK.shape[:2])


def layers(search, scores_LBHQK, density=0.1):
    return torch.stack([search(rank_blocks(scores)[1], density) for scores in scores_LBHQK])


if __name__ == "__main__":
    torch.manual_seed(0)
    L, H, nb = 8, 8, 64
    scores = torch.rand(L, 1, H, nb, nb) ** 4
    scores = scores / scores.sum(-1, keepdim=True)
    for name, search in [("equal counts", equal_counts), ("bisection (24 steps)", bisection),
                         ("price search (4 x 256)", head_blocks_per_row)]:
        torch._dynamo.reset()
        compiled = torch.compile(lambda s, search=search: layers(search, s), dynamic=True)
        start = time.perf_counter()
        out = compiled(scores)
        print(f"{name:>24}: compile + first call {time.perf_counter() - start:6.1f} s, "
              f"equals eager: {torch.equal(out, layers(search, scores))}")
    print("price search == bisection:", torch.equal(layers(bisection, scores), layers(head_blocks_per_row, scores)))
