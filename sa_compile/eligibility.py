"""Whether an attention call can run sparse, and, if not, the reason a user reads.

Both entry points ask here: the FX pass (``sa_compile.passes.sparse_sdpa``) for each SDPA node
of a traced graph, and the attention implementation (``sa_compile.hf_attention``) for each call.
A reason is the key of its counter (``counters["sa_compile"]["skipped: <reason>"]``) and the
text of its log line. Expected dense calls (decode steps) are logged at DEBUG; every other
reason once per process at WARNING, with what to change. Example::

    reason = tensor_reason(SparseConfig(), q_BHND, k_BGND, v_BGND, on_cpu=True)   # None: it can run sparse
    count_dense(reason)                                                           # one call left dense
"""

from __future__ import annotations

import logging

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

log = logging.getLogger("sa_compile")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128, 256)
# Triton's FlexAttention kernel tiles queries by up to 128 and needs sparse blocks it divides
# (smaller blocks fail in the lowering: measured on an H100, torch 2.11).
MIN_GPU_BLOCK = 128

DECODE = "query length differs from key length (decode step or cross attention)"
SHORT = "prompt shorter than min_seq_len"
GRADIENTS = "gradients are enabled (the sparse op has no backward)"
NOT_CAUSAL = "attention is not causal"
DROPOUT = "dropout is not zero"
PADDING_ON_CPU = "key padding with dynamic shapes on CPU"
BOOL_PADDING_ON_CPU = "boolean key-padding mask on CPU"
FULL_MASK = "mask is not plain causal"
SLIDING_WINDOW = "sliding window shorter than the prompt"
SOFTCAP = "logit softcapping"
POSITION_BIAS = "position bias"
NESTED = "inside a higher-order op subgraph (activation checkpointing, cond, ...)"

# Dense by design: logged at DEBUG, still counted.
EXPECTED = frozenset({DECODE})

# What a user can change, by the reason's first words; the rest are not causal self-attention
# over the prompt, and run exactly as they would without sa_compile.
_ADVICE = (
    (SHORT, "SparseConfig(min_seq_len=...) at or below the prompt's length runs it sparse"),
    ("block_size", f"use SparseConfig(block_size={MIN_GPU_BLOCK}) or 256 on a GPU"),
    ("unsupported head dim", f"the sparse op serves head dims {', '.join(map(str, HEAD_DIMS))}"),
    ("unsupported dtype", "run the model in float16, bfloat16 or float32"),
    (GRADIENTS, "run under torch.no_grad() or torch.inference_mode()"),
    (DROPOUT, "call model.eval() before running it"),
    (PADDING_ON_CPU, "on the CPU, call an unpadded prompt without attention_mask, or compile with dynamic=False; "
                     "a GPU serves key padding"),
    (BOOL_PADDING_ON_CPU, "pass attention_mask as integers (what tokenizers return), or run on a GPU"),
    (SLIDING_WINDOW, "the sparse op serves causal attention without a window"),
    ("mask reads", "load the model with attn_implementation='sdpa' and pass only input_ids and attention_mask"),
    ("query is a contiguous view", "on the CPU this projection layout stays dense; a GPU serves it"),
    ("key is a contiguous view", "on the CPU this projection layout stays dense; a GPU serves it"),
)


def is_int(value) -> bool:
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def on_cpu(values) -> bool:
    """True when no tensor among ``values`` lives off the CPU (Inductor's CPU templates then apply)."""
    return not any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in values)


def sizes_equal(a, b) -> bool:
    """True only when two (possibly symbolic) sizes are provably equal."""
    return bool(statically_known_true(a == b))


def call_reason(dropout, is_causal) -> str | None:
    """Why an attention call's arguments rule out the sparse op, or None."""
    if not (isinstance(dropout, (int, float)) and dropout == 0):
        return DROPOUT
    if is_causal is not True:
        return NOT_CAUSAL
    return None


def shape_reason(q, k, v) -> str | None:
    """Why query, key and value of one attention call cannot take the sparse op, or None."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "inputs are not 4-D tensors"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return f"unsupported dtype {q.dtype}"
    if not sizes_equal(q.shape[-2], k.shape[-2]):
        return DECODE
    head_dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    if len(head_dims) != 1 or q.shape[-1] not in HEAD_DIMS:
        return f"unsupported head dim {sorted(map(str, head_dims))}"
    if not (sizes_equal(q.shape[1] % k.shape[1], 0) and sizes_equal(q.shape[0], k.shape[0])):
        return "query heads are not a multiple of key heads"
    return None


def tensor_reason(config, q, k, v, *, on_cpu: bool) -> str | None:
    """Why a causal self-attention call over ``q``, ``k``, ``v`` stays dense under ``config``, or None.

    A symbolic prompt length is not compared with ``min_seq_len`` here (that adds a guard):
    see :func:`length_reason`."""
    reason = shape_reason(q, k, v)
    if reason:
        return reason
    if any(t.requires_grad for t in (q, k, v)):
        # The BlockMask is built without the backward's transposed (q-block) indices.
        return GRADIENTS
    if not on_cpu and config.block_size < MIN_GPU_BLOCK:
        return f"block_size {config.block_size} is below the GPU FlexAttention tile ({MIN_GPU_BLOCK})"
    if is_int(q.shape[-2]):
        return length_reason(q.shape[-2], config)
    return None


def length_reason(seq_len, config) -> str | None:
    """SHORT when the prompt is below ``config.min_seq_len``. For a symbolic length this guards
    the graph to one side of ``min_seq_len``, as the op's own length test would."""
    return SHORT if seq_len < config.min_seq_len else None


def padding_reason(*, on_cpu: bool, dynamic: bool, boolean: bool) -> str | None:
    """Why key padding stays dense: Inductor's CPU FlexAttention template cannot read a mask
    buffer under dynamic shapes, nor a bool one (torch 2.11-2.13); a GPU's can."""
    if not on_cpu:
        return None
    if dynamic:
        return PADDING_ON_CPU
    return BOOL_PADDING_ON_CPU if boolean else None


def advice(reason: str) -> str:
    """What a user can change so that calls left dense for ``reason`` run sparse."""
    for prefix, text in _ADVICE:
        if reason.startswith(prefix):
            return text
    return "this call is not causal self-attention over the prompt; it runs exactly as without sa_compile"


_logged: set[str] = set()


def log_dense(reason: str) -> None:
    """Log ``reason`` for a call left dense: at DEBUG if expected, else once per process at WARNING."""
    if reason in EXPECTED:
        log.debug("sa_compile: attention left dense: %s", reason)
    elif reason not in _logged:
        _logged.add(reason)
        log.warning("sa_compile: attention left dense: %s. To run it sparse: %s.", reason, advice(reason))


def forget_logged() -> None:
    """Log every reason again the next time it comes up (tests use it)."""
    _logged.clear()


def tally_dense(tally, reason: str, count: int = 1) -> None:
    """Add ``count`` calls left dense for ``reason`` to a counter (``counters["sa_compile"]``, say)."""
    tally["skipped"] += count
    tally[f"skipped: {reason}"] += count


def count_dense(reason: str) -> None:
    """Count one attention call left dense in ``counters["sa_compile"]``, and log it."""
    from torch._dynamo.utils import counters

    tally_dense(counters["sa_compile"], reason)
    log_dense(reason)
