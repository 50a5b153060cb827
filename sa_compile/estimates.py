"""The registry of pattern kinds: each kind's template, its search FLOPs, and whether calibration
may choose it. Nothing else lists the kinds.

A new template is its file in ``templates/`` and one :func:`register` call::

    register(Template("my_kind", my_scores, search_flops=lambda c: 2 * c.NUM_BLOCKS * c.N * c.D * c.H))
    SparseConfig(pattern="my_kind")          # the op, the cost model and calibration now know it

Every template maps ``(q_BHND, k_BGND, config, scale, kv_valid_BN)`` to row-normalized block
scores ``[B, H_q, nb, nb]``. ``search_flops`` takes :mod:`sa_compile.cost_model` (its sympy
symbols) and returns the search's FLOPs in them: the logits it computes, 2 FLOPs per
multiply-add. :class:`~sa_compile.config.PatternKind` names the built-in kinds, a spelling
for users; the registry is what the op, the cost model and calibration read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from sa_compile.templates._blocks import num_blocks
from sa_compile.templates.block_query import block_query_scores
from sa_compile.templates.block_sparse import pooled_block_scores
from sa_compile.templates.local import local_block_scores
from sa_compile.templates.strided_query import strided_query_scores
from sa_compile.templates.vertical_slash import last_q_attention, vertical_slash_block_scores

from .config import PatternKind, SparseConfig


@dataclass(frozen=True)
class Template:
    """One pattern kind.

    Args:
        kind: the name configs and pattern tables use (``SparseConfig(pattern=kind)``).
        scores: ``(q_BHND, k_BGND, config, scale, kv_valid_BN) -> scores_BHQK``; ``None`` for a
            kind combined from ``parts``.
        search_flops: ``cost_model -> sympy expression`` of the search's FLOPs (one layer, all
            heads); a combined kind's is the sum of its parts'.
        calibrate: whether calibration may give a head this kind. Calibration breaks ties in
            registration order, so register cheaper searches first.
        parts: a combined kind keeps, per block, the stronger of these kinds' row-normalized scores.
    """

    kind: str
    scores: Callable | None = None
    search_flops: Callable | None = None
    calibrate: bool = True
    parts: tuple[str, ...] = ()


TEMPLATES: dict[str, Template] = {}


def kind_name(kind) -> str:
    """The registry's key for ``kind``: a :class:`PatternKind` or a registered name."""
    return kind.value if isinstance(kind, PatternKind) else kind


def register(template: Template) -> Template:
    """Add ``template`` to the registry (a kind already registered raises ``ValueError``)."""
    if not isinstance(template.kind, str) or not template.kind.isidentifier():
        raise ValueError(f"a template's kind is a lowercase identifier, got {template.kind!r}")
    if template.kind in TEMPLATES:
        raise ValueError(f"pattern kind {template.kind!r} is already registered")
    if (template.scores is None) == (not template.parts):
        raise ValueError(f"template {template.kind!r}: give either scores or the parts it combines")
    unknown = [p for p in template.parts if p not in TEMPLATES or TEMPLATES[p].parts]
    if unknown:
        raise ValueError(f"template {template.kind!r} combines {unknown}, which are not registered templates")
    if template.search_flops is None and not template.parts:
        raise ValueError(f"template {template.kind!r}: give its search_flops (0 for none)")
    TEMPLATES[template.kind] = template
    return template


def unregister(kind: str) -> None:
    """Remove a kind (for tests that register a throwaway one)."""
    if any(kind in t.parts for t in TEMPLATES.values()):
        raise ValueError(f"pattern kind {kind!r} is a part of another kind")
    TEMPLATES.pop(kind)


def template(kind) -> Template:
    """The registry entry of ``kind`` (``ValueError`` naming the registered kinds if none)."""
    name = kind_name(kind)
    if name not in TEMPLATES:
        raise ValueError(f"pattern kind {name!r} is not registered; registered: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def calibration_kinds() -> tuple[str, ...]:
    """The kinds calibration chooses between, in registration order (its tie order)."""
    return tuple(kind for kind, t in TEMPLATES.items() if t.calibrate)


def search_flops(kind, cost_model):
    """``kind``'s search FLOPs as a sympy expression in ``cost_model``'s symbols."""
    entry = template(kind)
    if entry.parts:
        return sum((search_flops(p, cost_model) for p in entry.parts), 0)
    return entry.search_flops(cost_model)


def kind_scores(kinds, q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN=None) -> dict:
    """``{kind: scores_BHQK}`` for each of ``kinds``; a template that several kinds use runs once."""
    parts = {kind: template(kind).parts or (kind_name(kind),) for kind in kinds}
    base = {b: TEMPLATES[b].scores(q_BHND, k_BGND, config, scale, kv_valid_BN)
            for b in dict.fromkeys(b for kind_parts in parts.values() for b in kind_parts)}
    return {kind: functools.reduce(torch.maximum, (base[b] for b in kind_parts)) for kind, kind_parts in parts.items()}


def _local(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN):
    nb = num_blocks(q_BHND.shape[-2], config.block_size)
    return local_block_scores(nb, q_BHND.device).expand(*q_BHND.shape[:2], nb, nb)


def _vertical_slash(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN):
    attn_BHLN = last_q_attention(q_BHND, k_BGND, config.last_q, scale, kv_valid_BN)
    return vertical_slash_block_scores(attn_BHLN, config.block_size, q_BHND, k_BGND, scale)


# The built-in kinds, cheapest search first (calibration's tie order). Their FLOPs: local none;
# vertical-slash the last queries against all keys, then each block's mean query against nb
# candidate columns and nb block-mean keys; block-sparse pooled queries against pooled keys;
# strided-query every S-th query against the keys it sees (on average half of them); block-query
# each block's mean query against all keys. Softmaxes and sums are not counted.
register(Template(PatternKind.LOCAL.value, _local, lambda c: 0))
register(Template(PatternKind.VERTICAL_SLASH.value, _vertical_slash,
                  lambda c: 2 * c.L * c.N * c.D * c.H + 2 * c.NUM_BLOCKS * (2 * c.NUM_BLOCKS) * c.D * c.H))
register(Template(PatternKind.BLOCK_SPARSE.value,
                  lambda q, k, config, scale, kv_valid: pooled_block_scores(q, k, config.block_size, scale),
                  lambda c: 2 * c.NUM_BLOCKS**2 * c.D * c.H))
register(Template(PatternKind.AUTO.value, parts=(PatternKind.VERTICAL_SLASH.value, PatternKind.BLOCK_SPARSE.value)))
register(Template(PatternKind.STRIDED_QUERY.value,
                  lambda q, k, config, scale, kv_valid: strided_query_scores(
                      q, k, config.block_size, config.query_stride, scale, kv_valid),
                  lambda c: c.NUM_BLOCKS * (c.BS / c.S) * c.N * c.D * c.H))
register(Template(PatternKind.BLOCK_QUERY.value,
                  lambda q, k, config, scale, kv_valid: block_query_scores(q, k, config.block_size, scale),
                  lambda c: 2 * c.NUM_BLOCKS * c.N * c.D * c.H, calibrate=False))
