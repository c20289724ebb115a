"""Compile the Triton kernels for an H100 (sm_90) without a GPU, with the launch configurations the launchers
choose, and print each kernel's registers and spill (stack) bytes as JSON lines.

The interpreter (how CI runs the kernels) accepts code that compiled Triton rejects, e.g. a global that is
not a tl.constexpr; and only ptxas tells whether a row held in registers spills. Run in a fresh process:
TRITON_INTERPRET must not be set when triton is imported.  Usage: python tests/triton_gpu_compile.py kl|divergence|sparse|bernoulli|scale
"""
import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kl_ext.triton_kernels import _config  # noqa: E402
from kl_ext.triton_kernels import bernoulli_kl_div_with_logits as bern  # noqa: E402
from kl_ext.triton_kernels import divergences as div  # noqa: E402
from kl_ext.triton_kernels import kl_div_with_logits as kl  # noqa: E402
from kl_ext.triton_kernels import scale_grad as sg  # noqa: E402
from kl_ext.triton_kernels import sparse_kl_div_with_logits as sparse  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ELEM = {"bf16": 2, "fp32": 4}
# Row layouts (csrc/common.h, RowLayout) of strided (A, B, V) rows, the general case: inner not 1, int64 strides.
X_ROWS = {"xi": "i32", "xs0": "i64", "xs1": "i64"}
ROWS = dict(X_ROWS, ti="i32", ts0="i64", ts1="i64")


def compile_one(fn, signature, constexprs, num_warps, fp_fusion=True, **label):
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    kernel = triton.compile(ASTSource(fn, sig, constexprs), target=TARGET,
                            options={"num_warps": num_warps, "enable_fp_fusion": fp_fusion})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    print(json.dumps(dict(label, num_warps=num_warps, regs=regs, stack=stack)), flush=True)


def kl_configs():
    # Every target type x direction where the one-block and the streamed paths are largest; the logits /
    # forward kernel for the other sizes.
    for dtype in ("bf16", "fp32"):
        for V in (1000, 16384, 32000, 262144):
            block, warps, one_chunk = _config.row_config(V, ELEM[dtype])
            full = dtype == "bf16" and V in (16384, 262144)
            for tt in (0, 1, 2) if full else (0,):
                for fwd in (True, False) if full else (True,):
                    # The vocab-parallel modes (VP 1: statistics pass, no gradients; 2: finishing pass) where
                    # every target type is compiled.
                    for vp in (0, 1, 2) if full else (0,):
                        sig = {"x_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "mask_ptr": "*i1", "loss_ptr": "*fp32",
                               "gx_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", "gs_ptr": "*fp32", "shard_ptr": "*fp32",
                               "given_ptr": "*fp32", "V": "i32", **ROWS, "inv_t": "fp32"}
                        consts = {"TARGET": tt, "FORWARD": fwd, "HAS_MASK": True, "HAS_GS": True,
                                  "GRAD_X": vp != 1, "GRAD_T": vp != 1, "ONE_CHUNK": one_chunk, "BLOCK": block,
                                  "VP": vp}
                        compile_one(kl._kl_fwd_kernel, sig, consts, warps, kl.FP_FUSION, op="kl", dtype=dtype, V=V,
                                    target=tt, forward=fwd, one_chunk=one_chunk, vp=vp)


def divergence_configs():
    # The one-block and streamed paths at their largest: the JSD for every target type and vocab-parallel mode,
    # the other divergences (their own terms over the same kernel) for teacher logits and probs.
    for dtype in ("bf16", "fp32"):
        for V in (div.ONE_BLOCK_MAX, 262144):
            block, warps, one_chunk = _config.row_config(V, ELEM[dtype], div.ONE_BLOCK_MAX)
            for d in div._DIVERGENCE.values():
                for tt in (0, 1, 2) if d == div.JSD else (0, 2):
                    for vp in (0, 1, 2) if dtype == "bf16" and d == div.JSD else (0,):
                        sig = {"x_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "mask_ptr": "*i1", "loss_ptr": "*fp32",
                               "gx_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", "gs_ptr": "*fp32", "shard_ptr": "*fp32",
                               "given_ptr": "*fp32", "V": "i32", **ROWS, "inv_t": "fp32", "param": "fp32"}
                        consts = {"TARGET": tt, "DIVERGENCE": d, "HAS_MASK": True, "HAS_GS": True,
                                  "GRAD_X": vp != 1, "GRAD_T": vp != 1, "ONE_CHUNK": one_chunk, "BLOCK": block,
                                  "VP": vp}
                        compile_one(div._divergence_fwd_kernel, sig, consts, warps, kl.FP_FUSION, op="divergence",
                                    dtype=dtype, V=V, target=tt, divergence=d, one_chunk=one_chunk, vp=vp)


def sparse_configs():
    # Both tails' kernels (NORMALIZE) at the largest chunk, every target type for bf16.
    for dtype in ("bf16", "fp32"):
        block, warps, _ = _config.row_config(262144, ELEM[dtype], 8192)
        for tt in (0, 1, 2) if dtype == "bf16" else (1,):
            for normalize in (True, False) if tt else (True,):
                sig = {"x_ptr": f"*{dtype}", "idx_ptr": "*i64", "val_ptr": "*fp32", "mask_ptr": "*i1",
                       "loss_ptr": "*fp32", "gx_ptr": f"*{dtype}", "gv_ptr": "*fp32", "gs_ptr": "*fp32",
                       "bits_ptr": "*i32", "V": "i32", **X_ROWS, "K": "i32", "W": "i32", "inv_t": "fp32"}
                consts = {"TARGET": tt, "NORMALIZE": normalize, "HAS_MASK": True, "HAS_GS": True, "GRAD_X": True,
                          "GRAD_V": True, "BLOCK": block, "BLOCK_K": 1024}
                compile_one(sparse._sparse_kl_fwd_kernel, sig, consts, warps, kl.FP_FUSION, op="sparse", dtype=dtype,
                            target=tt, normalize=normalize)


def bernoulli_configs():
    for dtype in ("bf16", "fp32"):
        for C in (5, 1000):
            block_r, block_c, warps = _config.tile_config(C)
            for logits, entropy in ((False, True), (True, True), (False, False)):
                sig = {"x_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "w_ptr": "*fp32", "pw_ptr": "*fp32",
                       "loss_ptr": "*fp32", "gx_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", "gs_ptr": "*fp32",
                       "N": "i32", "C": "i32", **ROWS, "inv_t": "fp32", "W_NUMEL": "i32", "PW_NUMEL": "i32"}
                consts = {"HAS_GS": True, "TARGET_LOGITS": logits, "ENTROPY": entropy, "HAS_W": True,
                          "HAS_PW": not entropy, "ELEMENTWISE": False, "GRAD_X": True, "GRAD_T": True,
                          "BLOCK_R": block_r, "BLOCK_C": block_c}
                compile_one(bern._bernoulli_fwd_kernel, sig, consts, warps, op="bernoulli", dtype=dtype, C=C,
                            logits=logits, entropy=entropy)


def scale_configs():
    block, warps = _config.flat_config(1 << 20)
    for dtype in ("bf16", "fp32"):
        for skip in (True, False):
            sig = {"g_ptr": f"*{dtype}", "s_ptr": "*fp32", "o_ptr": f"*{dtype}", "n": "i64", "V": "i32",
                   "SN": "i64", "ROWS": "i64"}
            compile_one(sg._scale_grad_kernel, sig, {"SKIP_UNIT": skip, "BLOCK": block}, warps, op="scale_grad",
                        dtype=dtype, skip=skip)


if __name__ == "__main__":
    {"kl": kl_configs, "divergence": divergence_configs, "sparse": sparse_configs, "bernoulli": bernoulli_configs,
     "scale": scale_configs}[sys.argv[1]]()
