"""Rewrite causal self-attention SDPA nodes into sa_compile's dynamic sparse attention.

Signature ``(gm, example_inputs, *, config) -> gm``. Every SDPA node is either rewritten
or left exactly as it was; both outcomes are counted in
``torch._dynamo.utils.counters["sa_compile"]`` and each skip reason is logged once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters
from torch.fx import GraphModule, Node

from sa_compile._log import count_skip, log
from sa_compile.config import SparseConfig
from sa_compile.patterns import PatternTable, load_table
from sa_compile.sparse_op import rewritten_sdpa

from .causal_mask import CausalMask, prove_causal
from .matchers import example_value, is_sdpa, parse_sdpa, sizes_equal, surely_non_contiguous, unrepeat_kv

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


def shape_reason(q, k, v) -> str | None:
    """Why query, key and value of one attention call cannot take the sparse op, or None."""
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


def _cpu_buffer_reason(q, k) -> str | None:
    """Inductor's CPU FlexAttention template reads q's and k's sizes off their storage
    buffers (torch 2.13). The rewrite copies a non-contiguous q or k (GPT-2's, a transposed
    view of its 2-D c_attn matmul, failed the lowering); a contiguous view of a buffer of
    another rank has no copy to make and stays dense."""
    for name, t in (("query", q), ("key", k)):
        base = t._base
        if base is not None and base.dim() != 4 and not surely_non_contiguous(t):
            return f"{name} is a contiguous view of a {base.dim()}-D buffer (CPU FlexAttention cannot read it)"
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
    reason = shape_reason(q, k, v)
    if reason:
        return reason
    if any(t.requires_grad for t in (q, k, v)):
        # The BlockMask is built without the backward's transposed (q-block) indices.
        return "graph needs gradients (training)"
    seq_len = q.shape[-2]
    if not on_cpu and config.block_size < _MIN_GPU_BLOCK:
        return f"block_size {config.block_size} is below the GPU FlexAttention tile ({_MIN_GPU_BLOCK})"
    if isinstance(seq_len, int) and seq_len < config.min_seq_len:
        return "prompt shorter than min_seq_len"
    if on_cpu and (reason := _cpu_buffer_reason(q, example_value(unrepeat_kv(call.key)))):
        return reason
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
    if not isinstance(seq_len, int) and seq_len < config.min_seq_len:
        # A guard on the symbolic length, the one the op's own length test would add: this
        # graph serves only prompts below min_seq_len, so it keeps SDPA, counted as skipped.
        return "prompt shorter than min_seq_len"
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


def _contiguous(gm: GraphModule, node: Node) -> Node:
    copy = gm.graph.call_method("contiguous", (node,))
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        copy.meta["example_value"] = value.contiguous()  # a fake tensor: no data is copied
    return copy


def _rewrite(gm: GraphModule, node: Node, plan: _Plan, config: SparseConfig, head_pattern: dict | None,
             on_cpu: bool) -> None:
    old_inputs = node.all_input_nodes
    with gm.graph.inserting_before(node):
        query, key = plan.query, plan.key
        if on_cpu:
            # A 4-D buffer of their own for the CPU template (see _cpu_buffer_reason); a no-op
            # for tensors already contiguous.
            query, key = (_contiguous(gm, x) for x in (query, key))
        new = gm.graph.call_function(
            rewritten_sdpa, (query, key, plan.value, plan.padding, plan.scale),
            {**config.describe(), "head_pattern": head_pattern},
        )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    _erase_dead(gm.graph, old_inputs)


def _check_table(table: PatternTable, nodes: list[Node], config: SparseConfig) -> None:
    """The table must describe this graph: one row per SDPA node (layers in graph order), and
    per node the same query heads, key/value heads and head dim."""
    if table.block_size != config.block_size:
        raise ValueError(f"pattern table {config.patterns!r} was calibrated with block_size {table.block_size}, "
                         f"but SparseConfig.block_size is {config.block_size}")
    if len(nodes) != table.model.num_layers:
        raise ValueError(f"pattern table {config.patterns!r} has {table.model.num_layers} layers but the graph has "
                         f"{len(nodes)} attention (SDPA) calls; a table needs the whole model in one graph "
                         f"(no graph breaks) and a model with as many layers")
    for layer, node in enumerate(nodes):
        call = parse_sdpa(node)
        q, k = example_value(call.query), example_value(unrepeat_kv(call.key))
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == k.dim() == 4:
            try:
                table.check_model(table.model.num_layers, q.shape[1], k.shape[1], q.shape[-1])
            except ValueError as error:
                raise ValueError(f"{error} at layer {layer}") from None


def _nested_sdpa_nodes(gm: GraphModule) -> list[Node]:
    """SDPA calls inside higher-order-op subgraphs (activation checkpointing, ``cond``...):
    the rewrite does not reach into them, so they are counted as skipped, not missed."""
    return [n for name, sub in gm.named_modules() if name and isinstance(sub, GraphModule)
            for n in sub.graph.nodes if is_sdpa(n)]


def sparse_sdpa_pass(gm: GraphModule, example_inputs, *, config: SparseConfig) -> GraphModule:
    """Rewrite each provably causal self-attention SDPA into ``rewritten_sdpa``.

    With ``config.patterns``, the i-th SDPA node of the graph is layer i of the table and
    gets that layer's per-head kinds and budgets."""
    on_cpu = not any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in example_inputs)
    nodes = [n for n in gm.graph.nodes if is_sdpa(n)]
    table = None
    if config.patterns is not None and nodes:
        table = load_table(config.patterns)
        _check_table(table, nodes, config)
    rewritten = 0
    for layer, node in enumerate(nodes):
        plan = plan_rewrite(gm, node, config, on_cpu)
        if isinstance(plan, str):
            count_skip(plan)
            continue
        _rewrite(gm, node, plan, config, None if table is None else table.layer_fields(layer), on_cpu)
        rewritten += 1
        counters["sa_compile"]["rewritten"] += 1
    nested = _nested_sdpa_nodes(gm)
    for _ in nested:
        count_skip("inside a higher-order op subgraph (activation checkpointing, cond, ...)")
    gm.recompile()
    total = len(nodes) + len(nested)
    log.info("sa_compile: rewrote %d of %d SDPA nodes; skipped %d", rewritten, total, total - rewritten)
    return gm
