"""Scratch (2026-12-06): compile the search kernels for sm_90a on a CPU (Triton 3.6 wheel on PYTHONPATH=/tmp/tri) and read shared memory, registers and spills from ptxas.

    PYTHONPATH=/tmp/tri python benchmarks/kernel_smem_scratch.py screen 4,16,64,128   # or: cand 1,4,8,16,32 | cand256 | strided
"""
import sys, subprocess, inspect, re
sys.path.insert(0, "/tmp/tri")
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
from templates import _screen_triton as S, _screened_triton as C

def compile_kernel(jitfn, ptr_args, int_args, const, tag, num_warps, num_stages):
    names = jitfn.arg_names
    sig = {}
    for n in names:
        if n in const: sig[n] = "constexpr"
        elif n in ptr_args: sig[n] = ptr_args[n]
        elif n in int_args: sig[n] = int_args[n]
        else: sig[n] = "i32"
    src = ASTSource(jitfn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:
        print(tag, "COMPILE FAIL", type(e).__name__, str(e)[:200]); return
    ptx = k.asm["ptx"]
    open("k.ptx", "w").write(ptx)
    out = subprocess.run(["/tmp/tri/triton/backends/nvidia/bin/ptxas", "-arch=sm_90a", "-v", "k.ptx", "-o", "k.o"], capture_output=True, text=True)
    info = " ".join(l.strip() for l in out.stderr.splitlines() if "registers" in l or "spill" in l)
    print(tag, "shared", k.metadata.shared, "|", info[:300])

which = sys.argv[1]
for HG in ([int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else []):
    HGP = triton.next_power_of_2(HG)
    if which == "screen":
        BQ = max(1, 64 // HGP)
        for nw in (4, 8):
            compile_kernel(S._screen_keys_kernel, {"Q": "*fp32", "KMEAN": "*fp32", "KBOUND": "*fp32", "OUT": "*fp32"}, {},
                           dict(HG=HG, HGP=HGP, BQ=BQ, BK=32, D=128, DP=128), f"screen HG={HG} BQ={BQ} warps={nw}", nw, 2)
    else:
        from templates._strided_triton import launch_shape
        R = 16
        _, RP, _, _ = launch_shape(HG, R)
        compile_kernel(C._candidate_mass_kernel, {"Q": "*bf16", "K": "*bf16", "VALID": "*bf16", "CAND": "*i32", "SCRATCH": "*fp32", "OUT": "*fp32"},
                       {"scale2": "fp32"},
                       dict(HG=HG, HGP=HGP, R=R, RP=RP, W=123, BLOCK=128, D=128, DP=128, STRIDE=8, KBT=32, HAS_VALID=False),
                       f"cand HG={HG} M={HGP*RP}", 4, 3)

if which == "cand256":
    from templates._strided_triton import launch_shape
    for HG in (4, 8):
        HGP = triton.next_power_of_2(HG); _, RP, _, _ = launch_shape(HG, 16)
        compile_kernel(C._candidate_mass_kernel, {"Q": "*bf16", "K": "*bf16", "VALID": "*bf16", "CAND": "*i32", "SCRATCH": "*fp32", "OUT": "*fp32"},
                       {"scale2": "fp32"},
                       dict(HG=HG, HGP=HGP, R=16, RP=RP, W=123, BLOCK=128, D=256, DP=256, STRIDE=8, KBT=32, HAS_VALID=False),
                       f"cand D=256 HG={HG}", 4, 3)
if which == "strided":
    from templates import _strided_triton as T
    for HG, D in ((4, 128), (4, 256), (32, 128)):
        HGP, RP, QBT, nw = T.launch_shape(HG, 16)
        compile_kernel(T._strided_mass_kernel, {"Q": "*bf16", "K": "*bf16", "VALID": "*bf16", "SCRATCH": "*fp32", "OUT": "*fp32"},
                       {"scale2": "fp32"},
                       dict(HG=HG, HGP=HGP, R=16, RP=RP, QBT=QBT, BLOCK=128, D=D, DP=D, STRIDE=8, KBT=32, HAS_VALID=False),
                       f"strided D={D} HG={HG} rows={QBT*HGP*RP}", nw, 3)
