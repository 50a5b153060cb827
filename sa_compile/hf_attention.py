"""A Hugging Face attention implementation: causal prefill through the sparse op, the rest dense.

    sa_compile.register(SparseConfig(density=0.1))          # once, before loading
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sa_compile")
    model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=32)

No whole-model compile: each causal prefill attention call runs a compiled wrapper of
:func:`sa_compile.sparse_op.sparse_attention` (Dynamo with dynamic shapes, so one compile
serves every prompt length of a shape family; FlexAttention emits its fused kernel only under
compile). Decode steps, masks the op cannot serve exactly and anything else it does not cover
run transformers' own SDPA attention. Every call is counted in
``torch._dynamo.utils.counters["sa_compile"]``: ``rewritten``, or ``skipped`` and
``skipped: <reason>`` (the backend's reasons where they are the same).

The mask function registered under the same name hands a plain causal prefill its key
padding as a ``[B, N]`` bool mask (``None`` without padding), as transformers' flash-attention
masks do, instead of a ``[B, 1, N, N]`` one; every other case gets transformers' SDPA mask.
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from . import eligibility
from .config import SparseConfig


def _is_plain_prefill(arguments: dict) -> bool:
    """A causal mask over as many keys as queries, from position 0 (an empty cache)."""
    from transformers.masking_utils import causal_mask_function

    # transformers 5.24 passes q_length and q_offset; 5.0 passed cache_position instead.
    positions = arguments.get("cache_position")
    q_length = arguments["q_length"] if "q_length" in arguments else positions.shape[0]
    q_offset = arguments.get("q_offset", 0)
    kv_length, valid_BN = arguments["kv_length"], arguments.get("attention_mask")
    return (arguments.get("mask_function", causal_mask_function) is causal_mask_function
            and q_length == kv_length and arguments.get("kv_offset", 0) == 0
            and isinstance(q_offset, int) and q_offset == 0
            and (valid_BN is None or (valid_BN.dim() == 2 and valid_BN.shape[-1] == kv_length)))


def prefill_mask(**arguments):
    """transformers' mask interface for ``attn_implementation="sa_compile"``.

    A plain causal prefill gets ``None`` or its ``[B, N]`` bool key padding; every other
    case gets transformers' ``sdpa_mask`` (a ``[B, 1, Q, K]`` mask, or ``None`` where SDPA's
    ``is_causal`` serves). transformers calls it with keywords. Example::

        prefill_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=valid_BN)   # valid_BN, or None if all valid
    """
    from transformers.masking_utils import sdpa_mask

    if not _is_plain_prefill(arguments):
        return sdpa_mask(**arguments)
    valid_BN = arguments.get("attention_mask")
    if valid_BN is None:
        return None
    valid_BN = valid_BN.to(torch.bool)
    # Eagerly the values decide (a tokenizer's all-ones mask needs none); under a trace the mask stays.
    if not torch.compiler.is_compiling() and bool(valid_BN.all()):
        return None
    return valid_BN


def compiled_prefill(config: SparseConfig):
    """The sparse op under ``config``, compiled once per shape family (dynamic shapes) on first call.

    Example::

        out_BHND = compiled_prefill(SparseConfig(min_seq_len=0))(q_BHND, k_BGND, v_BGND, 0.125, None)
    """
    from .compile_backend import inductor
    from .sparse_op import sparse_attention

    def sparse_prefill(q_BHND, k_BGND, v_BGND, scale, kv_valid_BN):
        return sparse_attention(q_BHND, k_BGND, v_BGND, config, scale, kv_valid_BN)

    return torch.compile(sparse_prefill, backend=inductor, dynamic=True, fullgraph=True)


def _keys_for_prefill(query, key, value, attention_mask):
    """Keys and values a causal prefill attends to: an empty static cache holds more slots than
    the prompt, and with no mask (transformers' sign that the rest is future) only the prompt's count."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if attention_mask is None and 1 < q_len < kv_len:
        return key[:, :, :q_len], value[:, :, :q_len]
    return key, value


def _argument_reason(module, dropout, is_causal, kwargs) -> str | None:
    if kwargs.get("softcap") is not None:
        return eligibility.SOFTCAP
    if kwargs.get("position_bias") is not None:
        return eligibility.POSITION_BIAS
    return eligibility.call_reason(dropout, is_causal if is_causal is not None else getattr(module, "is_causal", True))


def _mask_reason(config: SparseConfig, query, attention_mask, kwargs) -> str | None:
    window = kwargs.get("sliding_window")
    if window is not None and query.shape[-2] > window:
        return eligibility.SLIDING_WINDOW
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return eligibility.FULL_MASK  # transformers built a full mask: packing, a custom pattern
    # The compiled prefill has dynamic shapes.
    return eligibility.padding_reason(on_cpu=eligibility.on_cpu((query,)), dynamic=True, boolean=True)


def plan_call(config: SparseConfig, module, query, key, value, attention_mask, dropout=0.0, is_causal=None,
              **kwargs) -> str | tuple:
    """Why this attention call stays dense, or ``(key, value, kv_valid_BN)`` for the sparse op.

    Example::

        plan_call(SparseConfig(), module, q_BHND[:, :, -1:], k_BGND, v_BGND, None)   # 'query length differs ...'
    """
    key, value = _keys_for_prefill(query, key, value, attention_mask)
    reason = (_argument_reason(module, dropout, is_causal, kwargs)
              or eligibility.tensor_reason(config, query, key, value, on_cpu=eligibility.on_cpu((query,)))
              or _mask_reason(config, query, attention_mask, kwargs))
    return reason if reason else (key, value, attention_mask)


def _full_mask(attention_mask, q_len: int, kv_len: int, device):
    """The ``[B, 1, Q, K]`` bool mask a ``[B, N]`` key padding from :func:`prefill_mask` stands for."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    causal_QK = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    return causal_QK & attention_mask[:, None, None, :]


def _softcapped(module, query, key, value, mask, scaling, softcap, is_causal):
    """Dense attention with tanh logit capping, as transformers' eager Gemma attention computes it."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    logits_BHQK = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    logits_BHQK = torch.tanh(logits_BHQK / softcap) * softcap
    if mask is not None:
        logits_BHQK = logits_BHQK.masked_fill(~mask, torch.finfo(logits_BHQK.dtype).min)
    probs_BHQK = torch.softmax(logits_BHQK, dim=-1, dtype=torch.float32).to(query.dtype)
    return (probs_BHQK @ value).transpose(1, 2).contiguous(), None


def dense_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention (its eager math where SDPA has no softcap), on this module's masks."""
    mask = _full_mask(attention_mask, query.shape[-2], key.shape[-2], query.device)
    if kwargs.get("softcap") is not None:
        return _softcapped(module, query, key, value, mask, scaling, kwargs["softcap"], is_causal)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def make_attention(config: SparseConfig | None = None):
    """An attention function for transformers' ``AttentionInterface`` under ``config``.

    Example::

        AttentionInterface.register("sa_compile", make_attention(SparseConfig(density=0.05)))
    """
    config = SparseConfig() if config is None else config
    sparse_prefill = compiled_prefill(config)

    def sa_compile_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
        plan = plan_call(config, module, query, key, value, attention_mask, dropout, is_causal, **kwargs)
        if isinstance(plan, str):
            eligibility.count_dense(plan)
            return dense_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
        key, value, kv_valid_BN = plan
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        counters["sa_compile"]["rewritten"] += 1
        out_BHND = sparse_prefill(query, key, value, scale, kv_valid_BN)
        return out_BHND.transpose(1, 2).contiguous(), None

    sa_compile_attention.config = config
    return sa_compile_attention


def register(config: SparseConfig | None = None, name: str = "sa_compile") -> str:
    """Register ``name`` as a transformers attention implementation running prefill sparse.

    Returns ``name``. Example::

        sa_compile.register(SparseConfig(density=0.05))
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sa_compile")
        model.set_attn_implementation("sa_compile")    # or switch a loaded model
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = SparseConfig() if config is None else config
    if not isinstance(config, SparseConfig):
        raise ValueError(f"register expects a SparseConfig, got {type(config).__name__}")
    if config.patterns is not None:
        raise ValueError(f"SparseConfig.patterns={config.patterns!r} is not supported by the attention "
                         "implementation: a pattern table needs the whole model in one graph (use the backend)")
    # transformers gives names holding these words dispatch rules of their own.
    if not isinstance(name, str) or not name or any(word in name for word in ("eager", "sdpa", "flash", "flex", "|")):
        raise ValueError(f"register: name={name!r} must be a name of its own, such as 'sa_compile'")
    AttentionInterface.register(name, make_attention(config))
    AttentionMaskInterface.register(name, prefill_mask)
    return name
