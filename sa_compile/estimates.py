"""One registry of pattern kinds: the template that scores each kind, and the kinds built from others.

A new template is its file in ``templates/``, a :class:`~sa_compile.config.PatternKind` member,
one line in :data:`TEMPLATES` and its FLOPs in :mod:`sa_compile.cost_model`. Every template
maps ``(q_BHND, k_BGND, config, scale, kv_valid_BN)`` to row-normalized block scores
``[B, H_q, nb, nb]``.
"""

from __future__ import annotations

import functools

import torch

from sa_compile.templates.block_query import block_query_scores
from sa_compile.templates.block_sparse import pooled_block_scores
from sa_compile.templates.local import local_block_scores
from sa_compile.templates.strided_query import strided_query_scores
from sa_compile.templates.vertical_slash import last_q_attention, vertical_slash_block_scores

from .config import PatternKind, SparseConfig


def _vertical_slash(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN):
    attn_BHLN = last_q_attention(q_BHND, k_BGND, config.last_q, scale, kv_valid_BN)
    return vertical_slash_block_scores(attn_BHLN, config.block_size, q_BHND, k_BGND, scale)


def _local(q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN):
    nb = -(-q_BHND.shape[-2] // config.block_size)
    return local_block_scores(nb, q_BHND.device).expand(*q_BHND.shape[:2], nb, nb)


TEMPLATES = {
    PatternKind.STRIDED_QUERY: lambda q, k, config, scale, kv_valid: strided_query_scores(
        q, k, config.block_size, config.query_stride, scale, kv_valid),
    PatternKind.VERTICAL_SLASH: _vertical_slash,
    PatternKind.BLOCK_SPARSE: lambda q, k, config, scale, kv_valid: pooled_block_scores(q, k, config.block_size, scale),
    PatternKind.BLOCK_QUERY: lambda q, k, config, scale, kv_valid: block_query_scores(q, k, config.block_size, scale),
    PatternKind.LOCAL: _local,
}
# Kinds that keep, per block, the stronger of other kinds' row-normalized scores.
COMBINED = {PatternKind.AUTO: (PatternKind.VERTICAL_SLASH, PatternKind.BLOCK_SPARSE)}


def kind_scores(kinds, q_BHND, k_BGND, config: SparseConfig, scale: float, kv_valid_BN=None) -> dict:
    """``{kind: scores_BHQK}`` for each of ``kinds``; a template that several kinds use runs once."""
    parts = {kind: COMBINED.get(kind, (kind,)) for kind in kinds}
    base = {b: TEMPLATES[b](q_BHND, k_BGND, config, scale, kv_valid_BN)
            for b in dict.fromkeys(b for kind_parts in parts.values() for b in kind_parts)}
    return {kind: functools.reduce(torch.maximum, (base[b] for b in kind_parts)) for kind, kind_parts in parts.items()}
