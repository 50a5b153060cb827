"""Prove that an SDPA mask built inside the graph is plain causal (optionally with key padding).

HF transformers does not pass ``is_causal=True`` under tracing: it materializes a
``[B, 1, N, N]`` bool mask from positions, sizes and the ``attention_mask`` input. We copy
the subgraph that computes the mask, run it at small probe sizes, and accept it only if it
equals ``k <= q`` (and ``attention_mask[b, k] != 0`` when it reads that input) on every
probe. Anything else (a sliding window, a tensor input of unknown content, a constant we
cannot probe past, a `[B, N]` input that is more than key padding, such as packed-sequence ids)
is rejected and the SDPA stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_map

from .matchers import example_value, sizes_equal

# Probe sizes lie past every constant of the mask subgraph (a window size, say), so a
# constant that changes the mask at the real length also changes it at the probes.
_MAX_PROBE = 4096
_FILL = 1e30  # floats this large are additive-mask fills, not sizes
_MAX_TENSOR_CONSTANT = 64


@dataclass(frozen=True)
class CausalMask:
    """A proven causal mask; ``padding`` is the ``[B, N]`` input it also reads, if any."""

    padding: Node | None


def _is_size(value) -> bool:
    """A size, or a tuple of sizes: what ``x.size()``, ``x.shape[1]`` and arithmetic on them give."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return True
    return isinstance(value, tuple) and len(value) > 0 and all(_is_size(v) for v in value)


def _ancestors(node: Node) -> list[Node]:
    """The nodes ``node`` is computed from. A size read off a tensor (``inputs_embeds.shape[1]``)
    is a leaf: the mask depends on the size, not on the tensor's data (the embedding weight, say)."""
    seen, stack = {node}, [node]
    while stack:
        current = stack.pop()
        if current is not node and current.op != "placeholder" and _is_size(example_value(current)):
            continue
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return [n for n in node.graph.nodes if n in seen]


def _constants(gm: GraphModule, nodes: list[Node]) -> set[int] | str:
    """Magnitudes (rounded up) of the numbers the mask subgraph holds: int and float literals
    and the values of small tensor attributes, since a window may hide in any of them. Float
    fills of additive masks (-inf, finfo.min) are not windows and are left out. Returns the
    reason instead when a tensor attribute is too large to read as constants."""
    found: set[int] = set()

    def visit(x):
        if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and abs(x) < _FILL:
            found.add(math.ceil(abs(x)))
        return x

    for n in nodes:
        if n.op == "get_attr":
            value = _attribute(gm, n.target)
            if isinstance(value, torch.Tensor):
                if value.numel() > _MAX_TENSOR_CONSTANT:
                    return f"mask reads a tensor constant of {value.numel()} elements"
                for x in value.detach().cpu().double().flatten().tolist():
                    visit(x)
        elif n.op != "placeholder":
            tree_map(visit, (n.args, n.kwargs))
    return found


def _attribute(gm: GraphModule, target: str):
    value = gm
    for name in target.split("."):
        value = getattr(value, name, None)
    return value


class _Probe:
    """The mask subgraph as a standalone function of its inputs, at any sequence length."""

    def __init__(self, gm: GraphModule, mask: Node, seq_len):
        self.gm, self.mask, self.seq_len = gm, mask, seq_len
        self.nodes = _ancestors(mask)
        self.static_len = seq_len if isinstance(seq_len, int) else None
        self.inputs = [n for n in self.nodes if n.op == "placeholder" or self._is_leaf(n)]
        constants = _constants(gm, [n for n in self.nodes if n not in self.inputs])
        self.reason = constants if isinstance(constants, str) else None
        self.constants = set() if self.reason else constants - {self.static_len}

    def _is_leaf(self, node: Node) -> bool:
        return node is not self.mask and _is_size(example_value(node)) and any(
            parent not in self.nodes for parent in node.all_input_nodes)

    def _resize(self, x, n: int):
        """A static graph's literal sequence length becomes ``n``."""
        return n if self.static_len is not None and type(x) is int and x == self.static_len else x

    def _module_at(self, n: int) -> GraphModule:
        """Copy the subgraph with its leaves as inputs; literal sequence lengths become ``n``."""
        graph, env = Graph(), {}
        for node in self.nodes:
            if node in self.inputs:
                env[node] = graph.placeholder(node.name)
                continue
            env[node] = graph.node_copy(node, lambda a: env[a])
            env[node].args, env[node].kwargs = tree_map(lambda x: self._resize(x, n),
                                                        (env[node].args, env[node].kwargs))
        graph.output(env[self.mask])
        return GraphModule(self.gm, graph)

    def _value(self, value, n: int, symbols: dict):
        if isinstance(value, torch.SymInt):
            return int(value.node.expr.xreplace(symbols))
        if isinstance(value, tuple):
            return type(value)(self._value(v, n, symbols) for v in value)
        return self._resize(value, n)

    def run(self, n: int, padding_BN: torch.Tensor | None, padding_node: Node | None, symbols: dict):
        args = []
        for ph in self.inputs:
            value = example_value(ph)
            args.append(padding_BN if ph is padding_node else self._value(value, n, symbols))
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            return self._module_at(n)(*args)


def _probe_lengths(constants: set[int]) -> list[int]:
    base = max([c for c in constants if c <= _MAX_PROBE] + [8])
    return [base + 5, base + 22]


def _allowed(mask: torch.Tensor) -> torch.Tensor | None:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        blocked = mask != 0
        if bool((mask[blocked] <= torch.finfo(mask.dtype).min / 2).all()):
            return ~blocked
    return None


def _padding_patterns(batch: int, n: int, dtype, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    ones = torch.ones(batch, n, dtype=torch.int64)
    left, right = ones.clone(), ones.clone()
    left[:, : n // 3] = 0
    right[:, -(n // 4):] = 0
    rand = (torch.rand(batch, n, generator=gen) > 0.3).long()
    # The op reads any nonzero as a real token: a mask that tests `== 1` must fail here.
    values = torch.tensor([1, 2, -1, 7])[torch.randint(4, (batch, n), generator=gen)]
    patterns = (ones, left, right, rand, rand * values, left * values)
    return [p.to(dtype=dtype, device=device) for p in patterns]


def _padding_length(value, seq_len):
    """The length symbol of a ``[B, M]`` integer input that may be key padding: None when
    ``M`` is the sequence length, its own symbol when a dynamic graph left the two apart
    (HF reads ``attention_mask[:, :N]``; the probes try ``M = N`` and ``M > N``), else False."""
    if not (isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point()):
        return False
    length = value.shape[1]
    if sizes_equal(length, seq_len):
        return None
    if isinstance(length, torch.SymInt) and not isinstance(seq_len, int) and length.node.expr.is_Symbol:
        return length.node.expr
    return False


def prove_causal(gm: GraphModule, mask: Node, seq_len) -> CausalMask | str:
    """Return :class:`CausalMask` if ``mask`` is provably causal, else the reason it is not."""
    probe = _Probe(gm, mask, seq_len)
    padding, padding_len = None, None
    for ph in probe.inputs:
        value = example_value(ph)
        if _is_size(value):
            continue
        length = _padding_length(value, seq_len)
        if length is False or padding is not None:
            return f"mask reads tensor input {ph.target!r}"
        padding, padding_len = ph, length
    if probe.reason:
        return probe.reason
    if any(c > _MAX_PROBE for c in probe.constants):
        return f"mask subgraph holds a constant past the probe limit ({max(probe.constants)})"
    if not isinstance(seq_len, int):
        if not seq_len.node.expr.is_Symbol:
            return "sequence length is not a plain symbol"
        symbols_in = set().union(*(_free_symbols(example_value(p)) for p in probe.inputs))
        if symbols_in - {seq_len.node.expr, padding_len}:
            return "mask depends on sizes other than the sequence length"
    for n in _probe_lengths(probe.constants):
        for extra in (0, 3) if padding_len is not None else (0,):
            symbols = {} if isinstance(seq_len, int) else {seq_len.node.expr: n}
            if padding_len is not None:
                symbols[padding_len] = n + extra
            reason = _check_at(probe, n, padding, symbols, extra)
            if reason:
                return reason
    return CausalMask(padding=padding)


def _free_symbols(value) -> set:
    if isinstance(value, torch.SymInt):
        return set(value.node.expr.free_symbols)
    if isinstance(value, tuple):
        return set().union(*(_free_symbols(v) for v in value)) if value else set()
    if isinstance(value, torch.Tensor):
        return set().union(*(_free_symbols(s) for s in value.shape)) if value.dim() else set()
    return set()


def _check_at(probe: _Probe, n: int, padding: Node | None, symbols: dict, extra: int = 0) -> str | None:
    """Does the mask equal causal (and key padding) at length ``n``, the padding input
    ``extra`` columns longer than the prompt?"""
    causal_NN = torch.ones(n, n, dtype=torch.bool).tril()
    if padding is None:
        cases = [None]
    else:
        value = example_value(padding)
        batch = value.shape[0] if isinstance(value.shape[0], int) else 2
        cases = _padding_patterns(batch, n + extra, value.dtype, value.device)
    for padding_BN in cases:
        try:
            mask = probe.run(n, padding_BN, padding, symbols)
        except Exception as exc:  # the subgraph does not run at other sizes: not provable
            return f"mask subgraph failed at probe length {n}: {type(exc).__name__}"
        allowed = _allowed(mask.cpu()) if isinstance(mask, torch.Tensor) else None
        if allowed is None or not 2 <= allowed.dim() <= 4 or tuple(allowed.shape[-2:]) != (n, n):
            return "mask is not a boolean or additive [..., N, N] mask"
        allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
        expected = causal_NN[None, None]
        if padding_BN is not None:
            expected = expected & (padding_BN[:, :n].cpu() != 0)[:, None, None, :]
        # Rows with no visible key (padded queries) give zeros in SDPA and FlexAttention alike.
        live_rows = expected.any(-1, keepdim=True)
        try:
            same = torch.broadcast_tensors(allowed, expected)
        except RuntimeError:
            return "mask shape does not broadcast against [B, 1, N, N]"
        if not bool(((same[0] == same[1]) | ~live_rows).all()):
            if padding_BN is not None and bool((padding_BN[:, :n] != 0).all()):
                # Not causal even with no padding: the input is not a padding mask.
                return f"mask reads {padding.target!r} as more than key padding (packed sequences, say)"
            return "mask is not plain causal" + (" with key padding" if padding_BN is not None else "")
    return None
