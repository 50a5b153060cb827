"""Node matchers for Dynamo graphs: is this SDPA, what are its arguments, undo repeat_kv."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from sa_compile.eligibility import sizes_equal

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class SdpaCall:
    """The bound arguments of one SDPA node."""

    query: Node
    key: Node
    value: Node
    attn_mask: Any
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any


def is_sdpa(node: Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def parse_sdpa(node: Node) -> SdpaCall:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, node.args))
    bound.update(node.kwargs)
    return SdpaCall(**{name: bound[name] for name in _SDPA_PARAMS})


def example_value(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (or the constant itself)."""
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def surely_non_contiguous(t: torch.Tensor) -> bool:
    """True only when ``t.contiguous()`` certainly copies (symbolic sizes included)."""
    expected = 1
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        if statically_known_true(size > 1) and statically_known_true(stride != expected):
            return True
        expected = expected * size
    return False


def _is_method(node: Any, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def _inserts_axis_2(node: Any) -> bool:
    """``x[:, :, None, :, :]`` or ``x.unsqueeze(2)``: a new group axis before the sequence."""
    if _is_method(node, "unsqueeze"):
        return node.args[1:] == (2,) or node.kwargs.get("dim") == 2
    if not (isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem):
        return False
    index = node.args[1]
    full = slice(None, None, None)
    return isinstance(index, tuple) and len(index) >= 3 and index[:3] == (full, full, None) and all(
        i == full or i is Ellipsis for i in index[3:]
    )


def unrepeat_kv(node: Node) -> Node:
    """Undo HF's ``repeat_kv`` (axis insert, expand, reshape); return the original k or v.

    The match is confirmed on shapes: the source has ``H_kv`` heads dividing the repeated
    count, and batch, length and head dim unchanged. Anything else is returned as is.
    """
    reshape = node
    if not (_is_method(reshape, "reshape", "view") or (
        reshape.op == "call_function" and reshape.target in (torch.reshape,)
    )):
        return node
    expand = reshape.args[0]
    if not _is_method(expand, "expand") or not _inserts_axis_2(expand.args[0]):
        return node
    source = expand.args[0].args[0]
    src, out = example_value(source), example_value(node)
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)) or src.dim() != 4 or out.dim() != 4:
        return node
    same = [sizes_equal(src.shape[d], out.shape[d]) for d in (0, 2, 3)]
    divides = sizes_equal(out.shape[1] % src.shape[1], 0)
    return source if all(same) and divides else node
