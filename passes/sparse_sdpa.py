"""Rewrite causal self-attention SDPA nodes into sa_compile's dynamic sparse attention.

Signature ``(gm, example_inputs, *, config) -> gm``. Every SDPA node is either rewritten
or left exactly as it was; both outcomes are counted in
``torch._dynamo.utils.counters["sa_compile"]``, per call of the compiled graph, and each
skip reason is logged (:mod:`sa_compile.eligibility` decides and words it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from sa_compile import eligibility
from sa_compile.config import SparseConfig
from sa_compile.patterns import PatternTable, load_table
from sa_compile.sparse_op import rewritten_sdpa

from .causal_mask import CausalMask, prove_causal
from .matchers import example_value, is_sdpa, parse_sdpa, surely_non_contiguous, unrepeat_kv

@dataclass
class _Plan:
    query: Node
    key: Node
    value: Node
    padding: Node | None
    scale: object


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
        return CausalMask(padding=None) if call.is_causal is True else eligibility.NOT_CAUSAL
    if call.is_causal is not False:
        return "both a mask and is_causal are given"
    if not isinstance(call.attn_mask, Node):
        return "mask is not a graph value"
    return prove_causal(gm, call.attn_mask, seq_len)


def plan_rewrite(gm: GraphModule, node: Node, config: SparseConfig, on_cpu: bool) -> _Plan | str:
    """Decide whether one SDPA node can run sparse; return the plan or the reason it cannot."""
    call = parse_sdpa(node)
    q, k, v = (example_value(n) for n in (call.query, call.key, call.value))
    reason = (eligibility.call_reason(call.dropout_p, True)
              or eligibility.tensor_reason(config, q, k, v, on_cpu=on_cpu)
              or (on_cpu and _cpu_buffer_reason(q, example_value(unrepeat_kv(call.key)))))
    if reason:
        return reason
    seq_len = q.shape[-2]
    causal = _causality(gm, call, seq_len)
    if isinstance(causal, str):
        return causal
    if causal.padding is not None:
        reason = eligibility.padding_reason(on_cpu=on_cpu, dynamic=not isinstance(seq_len, int),
                                            boolean=example_value(causal.padding).dtype == torch.bool)
        if reason:
            return reason
    if not isinstance(seq_len, int) and eligibility.length_reason(seq_len, config):
        # A guard on the symbolic length, the one the op's own length test would add: this
        # graph serves only prompts below min_seq_len, so it keeps SDPA, counted as skipped.
        return eligibility.SHORT
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


def _prompt_padding(gm: GraphModule, plan: _Plan) -> Node | None:
    """The key padding of the prompt's keys: a dynamic graph may hold an ``attention_mask``
    whose length is a symbol of its own, proven to be read only up to the prompt's length."""
    q, padding = example_value(plan.query), example_value(plan.padding)
    if plan.padding is None or eligibility.sizes_equal(padding.shape[1], q.shape[-2]):
        return plan.padding
    length = gm.graph.call_method("size", (plan.query, 2))
    length.meta["example_value"] = q.shape[-2]
    prompt = gm.graph.call_method("narrow", (plan.padding, 1, 0, length))
    prompt.meta["example_value"] = padding.narrow(1, 0, q.shape[-2])
    return prompt


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
            rewritten_sdpa, (query, key, plan.value, _prompt_padding(gm, plan), plan.scale),
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
    gets that layer's per-head kinds and budgets. What each call of the graph will run
    (``rewritten``, ``skipped: <reason>``) is left in ``gm.meta["sa_compile"]``, a Counter
    the backend adds to ``counters["sa_compile"]`` at every call of the compiled graph."""
    on_cpu = eligibility.on_cpu(example_inputs)
    nodes = [n for n in gm.graph.nodes if is_sdpa(n)]
    table = None
    if config.patterns is not None and nodes:
        table = load_table(config.patterns)
        _check_table(table, nodes, config)
    tally = Counter()
    for layer, node in enumerate(nodes):
        plan = plan_rewrite(gm, node, config, on_cpu)
        if isinstance(plan, str):
            eligibility.tally_dense(tally, plan)
            eligibility.log_dense(plan)
            continue
        _rewrite(gm, node, plan, config, None if table is None else table.layer_fields(layer), on_cpu)
        tally["rewritten"] += 1
    for _ in _nested_sdpa_nodes(gm):
        eligibility.tally_dense(tally, eligibility.NESTED)
        eligibility.log_dense(eligibility.NESTED)
    gm.recompile()
    gm.meta["sa_compile"] = tally
    eligibility.log.info("sa_compile: rewrote %d of %d SDPA nodes; skipped %d", tally["rewritten"],
                         tally["rewritten"] + tally["skipped"], tally["skipped"])
    return gm
