"""The systems the TTFT benchmark times, and how each produces the first token's logits.

A forward prefill (``eager``, ``inductor``, ``sa_compile``, ``sa_compile@<d>``, ...) fills a
fresh KV cache and returns the last position's logits. The ``generate()`` systems time what a
user runs: ``model.generate(input_ids, attention_mask, max_new_tokens=1)`` with a tokenizer's
all-ones mask, through

- ``eager_generate``: the plain model (SDPA);
- ``generate``: ``model.compile(backend=sa_compile.make_backend(config))`` (nn.Module.compile, so
  generate() calls the compiled forward);
- ``hf_attention``: ``attn_implementation="sa_compile"`` (``sa_compile.register(config)``), no
  whole-model compile.

Nothing here runs at import time.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

import sa_compile
from _common import SELECTION_HELP, parse_selection, selection_label
from sa_compile.hf_cache import cache_argument

BASE_SYSTEMS = ("eager", "inductor", "sa_compile")
GENERATE_SYSTEMS = ("eager_generate", "generate", "hf_attention")


def prefill(model, ids_BN: torch.Tensor) -> torch.Tensor:
    """One TTFT: fill a fresh KV cache with the prompt, return the last position's logits ``[B, 1, V]``."""
    from transformers import DynamicCache

    out = model(input_ids=ids_BN, **cache_argument(model, DynamicCache(config=model.config)), use_cache=True,
                logits_to_keep=1)
    return out.logits


def generate_first_token(model, ids_BN: torch.Tensor) -> torch.Tensor:
    """One TTFT through ``generate()``: greedy, one new token, with a tokenizer's all-ones mask.

    Returns the first token's logits ``[B, 1, V]``, as :func:`prefill` does. Example::

        logits_B1V = generate_first_token(model, tokenizer(text, return_tensors="pt").input_ids)
    """
    out = model.generate(input_ids=ids_BN, attention_mask=torch.ones_like(ids_BN), max_new_tokens=1,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=model.config.eos_token_id)
    return out.logits[0][:, None, :]


@dataclass(frozen=True)
class System:
    """One timed system: ``sparse`` is None for eager or plain Inductor."""

    name: str
    sparse: sa_compile.SparseConfig | None = None

    @contextmanager
    def prepared(self, model, dynamic: bool | None = None):
        """Yields ``first_token(ids_BN) -> logits_B1V`` on ``model``, compiled as this system compiles."""
        if self.name == "eager":
            compiled = model
        elif self.sparse is None:
            compiled = torch.compile(model, dynamic=dynamic)
        else:
            compiled = torch.compile(model, backend=sa_compile.make_backend(self.sparse), dynamic=dynamic)
        yield lambda ids_BN: prefill(compiled, ids_BN)

    def serving(self, change: dict, new_graphs: int, calls: int, previous: dict | None) -> dict | None:
        """Rewritten and skipped attention calls of one prefill, from the counters' ``change``.

        The backend counts once per compiled graph: the latest compile serves until the next.
        """
        if not (new_graphs and self.sparse is not None):
            return previous
        return {"rewritten": change.get("rewritten", 0), "skipped": change.get("skipped", 0)}


@dataclass(frozen=True)
class GenerateSystem(System):
    """A system timed through ``generate()`` (see the module docstring)."""

    @contextmanager
    def prepared(self, model, dynamic: bool | None = None):
        if self.name == "hf_attention":
            model.set_attn_implementation(sa_compile.register(self.sparse))
            try:
                yield lambda ids_BN: generate_first_token(model, ids_BN)
            finally:
                model.set_attn_implementation("sdpa")
            return
        runner = model
        if self.sparse is not None:
            # nn.Module.compile marks the module it is called on; a shallow copy (shared weights
            # and submodules) takes the mark, so the other systems keep the plain model.
            runner = copy.copy(model)
            runner.compile(backend=sa_compile.make_backend(self.sparse), dynamic=dynamic)
        yield lambda ids_BN: generate_first_token(runner, ids_BN)

    def serving(self, change: dict, new_graphs: int, calls: int, previous: dict | None) -> dict | None:
        if self.name != "hf_attention":
            return super().serving(change, new_graphs, calls, previous)
        # The attention implementation counts every call: per prefill is the total over calls.
        return {key: change.get(key, 0) // calls for key in ("rewritten", "skipped")}


def make_systems(args, base: sa_compile.SparseConfig) -> list[System]:
    """The systems to run, in order; ``sa_compile@d`` is the base config at density d."""
    wanted = args.systems or (list(BASE_SYSTEMS) + [f"sa_compile@{d:g}" for d in args.densities]
                              + (["sa_compile+table"] if args.patterns is not None else [])
                              + ([] if args.tp else list(GENERATE_SYSTEMS)))
    return [_system(name, args, base) for name in wanted]


def _system(name: str, args, base: sa_compile.SparseConfig) -> System:
    if name in GENERATE_SYSTEMS:
        if args.tp:
            raise SystemExit(f"system {name} runs on one device: drop --tp")
        return GenerateSystem(name, None if name == "eager_generate" else base)
    if name in ("eager", "inductor"):
        return System(name)
    if name == "sa_compile":
        return System(name, base)
    if name == "sa_compile+heads":
        return System(name, replace(base, search_head_budgets=True))
    if name == "sa_compile+table":
        if args.patterns is None:
            raise SystemExit("system sa_compile+table needs --patterns FILE or --calibrate N")
        return System(name, replace(base, patterns=str(args.patterns)))
    if name.startswith("sa_compile@"):  # sa_compile@SELECTION: sa_compile@0.3, sa_compile@0.3:query_stride=8
        try:
            density, fields = parse_selection(name.split("@", 1)[1])
            return System(f"sa_compile@{selection_label(density, fields)}", replace(base, density=density, **fields))
        except ValueError as e:  # a bad spelling, or a field value SparseConfig refuses
            raise SystemExit(f"system {name!r}: {e}") from None
    raise SystemExit(f"unknown system {name!r}: use eager, inductor, sa_compile, sa_compile@SELECTION "
                     f"({SELECTION_HELP}), sa_compile+heads, sa_compile+table, {', '.join(GENERATE_SYSTEMS)}")
