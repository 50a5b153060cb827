"""transformers' KV cache keyword, on either side of its rename.

transformers 5.24 renamed the ``past_key_values`` argument and output field of its models to
``cache`` (the old name warns, and goes in 5.40); 5.17 knows only ``past_key_values``, where a
``cache=`` argument would vanish into ``**kwargs`` unread. These two functions use the name the
installed version's model takes. Example::

    cache = DynamicCache(config=model.config)
    logits = model(ids_BN, use_cache=True, **cache_argument(model, cache)).logits
    cache = output_cache(model(ids_BN, use_cache=True))    # the cache a forward filled
"""

from __future__ import annotations

import inspect


def cache_argument(model, cache) -> dict:
    """``{"cache": cache}`` where ``model``'s forward takes ``cache``, else ``{"past_key_values": cache}``.
    A ``torch.compile`` wrapper is looked through to the model it wraps."""
    forward = getattr(model, "_orig_mod", model).forward
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: cache}


def output_cache(output):
    """The KV cache a model's forward returned (``None`` without ``use_cache``)."""
    for name in ("cache", "past_key_values"):
        if name in output:
            return output[name]
    return None
