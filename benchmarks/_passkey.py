"""Passkey retrieval for the fidelity benchmark: a number hidden in filler, asked for at the end.

Each prompt is exactly ``N`` tokens, so one compiled graph serves every prompt of a length.
One prefill (sparse or dense), then greedy decode steps on its cache, which stay dense.
"""

from __future__ import annotations

import random

import torch

from sa_compile.hf_cache import cache_argument, output_cache


FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"
DECODE_STEPS = 8  # the key's five digits and a leading space are six tokens


def passkey_prompt(tokenizer, num_tokens: int, depth: float, key: int) -> torch.Tensor:
    """Exactly ``num_tokens`` ids: filler, ``The pass key is KEY.`` at ``depth`` of it, the question.

    Pieces are tokenized apart and joined as ids, so every prompt of a length has that
    length (one compiled graph serves them all); the needle goes in at a filler boundary.
    """
    unit = tokenizer(FILLER).input_ids
    needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key.").input_ids
    question = tokenizer(QUESTION).input_ids
    budget = num_tokens - len(needle) - len(question)
    if budget < len(unit):
        raise ValueError(f"{num_tokens} tokens leave no room for filler around the pass key")
    filler = (unit * (budget // len(unit) + 1))[:budget]
    at = round(depth * (budget // len(unit))) * len(unit)
    return torch.tensor([filler[:at] + needle + filler[at:] + question])


def passkey_cases(num_tokens: int, cases: int) -> list[tuple[float, int]]:
    """(depth, key) pairs: depths evenly from 0% to 100%, keys from a generator seeded by the length."""
    rng = random.Random(num_tokens)
    return [(case / max(cases - 1, 1), rng.randint(10000, 99999)) for case in range(cases)]


def prefill(model, ids):
    """The one forward call used for every prompt: all logits and the KV cache.

    The ids are copied to fresh row-major strides: a slice of the long text keeps the text's
    row stride (``contiguous()`` leaves a one-row view as it is), and a compiled model would
    recompile for a built prompt's stride.
    """
    with torch.inference_mode():
        return model(ids.clone(memory_format=torch.contiguous_format), use_cache=True)


def greedy_continuation(prefill_model, decode_model, ids, steps: int) -> torch.Tensor:
    """Prefill with ``prefill_model`` (sparse or dense), then ``steps - 1`` greedy decode steps
    with ``decode_model`` on the prefill's cache; returns the ``steps`` new token ids.

    Decode steps (one query against the cache) are dense SDPA under sa_compile too: the pass
    leaves attention whose query length differs from the key length alone. Running them on
    the plain model computes the same thing without compiling a decode graph.
    """
    out = prefill(prefill_model, ids)
    token = out.logits[:, -1:].argmax(-1)
    tokens, cache = [token], output_cache(out)
    with torch.inference_mode():
        for _ in range(steps - 1):
            out = decode_model(token, use_cache=True, **cache_argument(decode_model, cache))
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    return torch.cat(tokens, dim=-1)[0]


def passkey_run(prefill_model, decode_model, tokenizer, num_tokens: int, cases: int, device, say) -> dict:
    """Accuracy over ``cases`` prompts of exactly ``num_tokens`` tokens, and each case's answer."""
    results = []
    for depth, key in passkey_cases(num_tokens, cases):
        ids = passkey_prompt(tokenizer, num_tokens, depth, key).to(device)
        answer = tokenizer.decode(greedy_continuation(prefill_model, decode_model, ids, DECODE_STEPS))
        results.append({"depth": depth, "key": key, "answer": answer, "right": str(key) in answer})
        say(f"passkey {len(results)}/{cases}: {sum(r['right'] for r in results)} right")
    return {"accuracy": sum(r["right"] for r in results) / cases, "cases": results}
