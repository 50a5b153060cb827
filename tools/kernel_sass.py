"""The search's Triton kernels compiled for sm_90 (H100/H200) on a machine without a GPU.

Triton's wheel carries LLVM, ptxas and nvdisasm, so a kernel compiles to SASS here. This
prints, for each specialization the package launches at the Llama-3.1-8B shape (32/8 heads,
dim 128, 128-token blocks, stride 8, 164 candidates), its registers, shared memory, instruction
count and a digest of the SASS. A refactor whose digests match compiles to the same machine
code; `--compare` says which differ. It needs `triton` (3.6, as on the device machine) beside
the package: `python -m venv /tmp/tv --system-site-packages && /tmp/tv/bin/pip install triton==3.6.0`.

    /tmp/tv/bin/python tools/kernel_sass.py --out before.json
    /tmp/tv/bin/python tools/kernel_sass.py --compare before.json
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sa_compile.templates import _screen_triton, _screened_triton, _strided_triton

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
N, NB, W = 32768, 256, 164
# Integer arguments as the launch passes them (strides of contiguous tensors): those divisible by
# 16 get Triton's divisibility hint, as its JIT would give them.
INTS = dict(N=N, NB=NB, G=8, qb_first=0, sqb=32 * N * 128, sqh=N * 128, sqn=128, skb=8 * N * 128, skh=N * 128,
            skn=128, sksb=8 * N, sksh=N, svb=N, sfb=NB, scb=8 * NB * W, scg=NB * W, scq=W, sob=32 * NB * W, soh=NB * W,
            soq=W)
SHAPE = dict(HG=4, HGP=4, R=16, RP=16, BLOCK=128, D=128, DP=128, STRIDE=8, KBT=32)


def specializations():
    """``(name, kernel, pointer dtypes, constexprs, num_warps, num_stages, maxnreg)`` as the wrappers
    launch them (``maxnreg`` 0: no register cap)."""
    for int8 in (True, False):
        for valid in (True, False):
            keys = "*i8" if int8 else "*bf16"
            yield (f"candidate_mass int8={int8} padding={valid}", _screened_triton._candidate_mass_kernel,
                   {"Q": "*bf16", "K": keys, "KS": "*fp32" if int8 else "*bf16", "VALID": "*i64", "FULL": "*i8", "CAND": "*i32",
                    "SCRATCH": "*fp32", "OUT": "*fp32"},
                   dict(SHAPE, W=W, HAS_VALID=valid, INT8=int8, LIMIT=127), 4, 5 if int8 else 3, 128 if int8 else 0)
    for valid in (True, False):
        yield (f"strided_mass padding={valid}", _strided_triton._strided_mass_kernel,
               {"Q": "*bf16", "K": "*bf16", "VALID": "*i64", "SCRATCH": "*fp32", "OUT": "*fp32"},
               dict(SHAPE, QBT=1, HAS_VALID=valid), 4, 3, 0)
    for valid in (True, False):
        yield (f"key_stats int8=True padding={valid}", _screen_triton._key_stats_kernel,
               {"K": "*bf16", "VALID": "*i64", "MEAN": "*fp32", "MAX": "*fp32", "MIN": "*fp32", "K8": "*i8",
                "KS": "*fp32"},
               dict(BLOCK=128, D=128, DP=128, HAS_VALID=valid, INT8=True, LIMIT=127), 8, 3, 0)
    yield ("order_candidates", _screened_triton._order_candidates_kernel,
           {"SCORES": "*fp32", "BLOCKS": "*i64", "OUT": "*i64"}, dict(LIMIT=2.0**100, WP=256), 1, 3, 0)


def compile_sass(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int) -> dict:
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = pointers[name]
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name == "scale2" else "i32"
        if name in pointers or INTS.get(name, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages,
                                         **({"maxnreg": maxnreg} if maxnreg else {})))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    ops = collections.Counter(m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)",
                                                               sass))
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "shared_bytes": kernel.metadata.shared,
            "instructions": sum(ops.values()), "local_memory_ops": ops["LDL"] + ops["STL"], "sass_sha1": hashlib.sha1(sass.encode()).hexdigest(),
            "top_ops": dict(ops.most_common(8))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the records as JSON here")
    parser.add_argument("--compare", help="a JSON of an earlier run: say which kernels' SASS differ")
    args = parser.parse_args()
    records = {}
    for name, fn, pointers, constexprs, warps, stages, maxnreg in specializations():
        records[name] = compile_sass(fn, pointers, constexprs, warps, stages, maxnreg)
        r = records[name]
        print(f"{name:40s} {r['registers']:4d} regs {r['shared_bytes']:6d} B shared {r['instructions']:5d} instr "
              f"{r['local_memory_ops']:3d} spill ops sha1 {r['sass_sha1'][:12]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            earlier = json.load(f)
        for name, r in records.items():
            before = earlier.get(name)
            verdict = "new" if before is None else ("same SASS" if before["sass_sha1"] == r["sass_sha1"] else
                                                    f"differs ({before['instructions']} -> {r['instructions']} instr)")
            print(f"{name:40s} {verdict}")


if __name__ == "__main__":
    main()
