"""Local (A-shape) template: the sink column and the blocks nearest the diagonal.

A head that mostly reads its own neighbourhood needs no estimate at all: with the sink
and diagonal blocks kept first (see ``sa_compile.selection.rank_blocks``), ranking the
remaining blocks by closeness to the diagonal gives the sink + sliding-window "A" shape.
It reads neither q nor k, so its search costs nothing.

Run ``python -m sa_compile.templates.local`` to draw the pattern.
"""

from __future__ import annotations

import torch

from ._blocks import block_offsets_QK, normalize_causal_rows


def local_block_scores(num_blocks_, device) -> torch.Tensor:
    """Scores ``[1, 1, nb, nb]`` falling with the distance to the diagonal, rows summing to one."""
    offsets_QK = block_offsets_QK(num_blocks_, device).to(torch.float32)
    return normalize_causal_rows((1.0 / (1.0 + offsets_QK.clamp(min=0)))[None, None])


def _demo() -> None:
    from sa_compile.selection import select_blocks

    from ._blocks import draw

    nb = 16
    keep = select_blocks(local_block_scores(nb, "cpu"), density=0.5)[0, 0]
    print(f"local (A-shape) kept blocks, nb={nb}, density 0.5:")
    print(draw(keep.float()))


if __name__ == "__main__":
    _demo()
