"""Rewrite causal self-attention SDPA nodes into sa_compile's dynamic sparse attention.

Signature ``(gm, example_inputs, *, config) -> gm``. Every SDPA node is either rewritten
or left exactly as it was; both outcomes are counted in
``torch._dynamo.utils.counters["sa_compile"]`` and each skip reason is logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters
from torch.fx import GraphModule, Node

from sa_compile._log import log, log_once
from sa_compile.config import SparseConfig
from sa_compile.sparse_op import rewritten_sdpa

from .causal_mask import CausalMask, prove_causal
from .matchers import example_value, is_sdpa, parse_sdpa, sizes_equal, unrepeat_kv

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
# Triton's FlexAttention kernel tiles queries by up to 128 and needs sparse blocks it divides
# (smaller blocks fail in the lowering: measured on an H100, torch 2.11).
_MIN_GPU_BLOCK = 128


@dataclass
class _Plan:
    query: Node
    key: Node
    value: Node
    padding: Node | None
    scale: object


def _shape_reason(q, k, v) -> str | None:
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "inputs are not 4-D tensors"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _SUPPORTED_DTYPES:
        return f"unsupported dtype {q.dtype}"
    if not sizes_equal(q.shape[-2], k.shape[-2]):
        return "query length differs from key length (decode step or cross attention)"
    head_dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    if len(head_dims) != 1 or q.shape[-1] not in _SUPPORTED_HEAD_DIMS:
        return f"unsupported head dim {sorted(map(str, head_dims))}"
    if not (sizes_equal(q.shape[1] % k.shape[1], 0) and sizes_equal(q.shape[0], k.shape[0])):
        return "query heads are not a multiple of key heads"
    return None


def _causality(gm, call, seq_len) -> CausalMask | str:
    if call.attn_mask is None:
        return CausalMask(padding=None) if call.is_causal is True else "attention is not causal"
    if call.is_causal is not False:
        return "both a mask and is_causal are given"
    if not isinstance(call.attn_mask, Node):
        return "mask is not a graph value"
    return prove_causal(gm, call.attn_mask, seq_len)


def plan_rewrite(gm: GraphModule, node: Node, config: SparseConfig, on_cpu: bool) -> _Plan | str:
    """Decide whether one SDPA node can run sparse; return the plan or the reason it cannot."""
    call = parse_sdpa(node)
    if not (isinstance(call.dropout_p, (int, float)) and call.dropout_p == 0):
        return "dropout is not zero"
    q, k, v = (example_value(n) for n in (call.query, call.key, call.value))
    reason = _shape_reason(q, k, v)
    if reason:
        return reason
    seq_len = q.shape[-2]
    if not on_cpu and config.block_size < _MIN_GPU_BLOCK:
        return f"block_size {config.block_size} is below the GPU FlexAttention tile ({_MIN_GPU_BLOCK})"
    if isinstance(seq_len, int) and seq_len < config.min_seq_len:
        return "prompt shorter than min_seq_len"
    causal = _causality(gm, call, seq_len)
    if isinstance(causal, str):
        return causal
    if causal.padding is not None and on_cpu:
        # Inductor's CPU flex template cannot read a mask buffer under dynamic shapes, nor a
        # bool one; CUDA's can. Dense SDPA stays exact there.
        if not isinstance(seq_len, int):
            return "key padding with dynamic shapes on CPU"
        if example_value(causal.padding).dtype == torch.bool:
            return "boolean key-padding mask on CPU"
    return _Plan(call.query, unrepeat_kv(call.key), unrepeat_kv(call.value), causal.padding, call.scale)


def _erase_dead(graph, candidates: list[Node]) -> None:
    """Erase the now-unused nodes that only fed the replaced SDPA (its mask, repeat_kv)."""
    pending = list(candidates)
    while pending:
        node = pending.pop()
        if node.graph is not graph or node.users or node.op not in ("call_function", "call_method"):
            continue
        if node.op == "call_method" and node.target.endswith("_"):
            continue  # in-place methods have effects beyond their result
        inputs = node.all_input_nodes
        graph.erase_node(node)
        pending.extend(inputs)


def _rewrite(gm: GraphModule, node: Node, plan: _Plan, config: SparseConfig) -> None:
    old_inputs = node.all_input_nodes
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            rewritten_sdpa, (plan.query, plan.key, plan.value, plan.padding, plan.scale), config.describe()
        )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    _erase_dead(gm.graph, old_inputs)


def _count_skip(reason: str) -> None:
    counters["sa_compile"]["skipped"] += 1
    counters["sa_compile"][f"skipped: {reason}"] += 1
    log_once(logging.WARNING, "sa_compile: SDPA left dense: %s", reason)


def sparse_sdpa_pass(gm: GraphModule, example_inputs, *, config: SparseConfig) -> GraphModule:
    """Rewrite each provably causal self-attention SDPA into ``rewritten_sdpa``."""
    on_cpu = not any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in example_inputs)
    nodes = [n for n in gm.graph.nodes if is_sdpa(n)]
    rewritten = 0
    for node in nodes:
        plan = plan_rewrite(gm, node, config, on_cpu)
        if isinstance(plan, str):
            _count_skip(plan)
            continue
        _rewrite(gm, node, plan, config)
        rewritten += 1
        counters["sa_compile"]["rewritten"] += 1
    gm.recompile()
    log.info("sa_compile: rewrote %d of %d SDPA nodes; skipped %d", rewritten, len(nodes), len(nodes) - rewritten)
    return gm
