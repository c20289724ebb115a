"""scale_grad: Triton kernel, registered as torch.ops.kl_ext_triton.scale_grad (contract: csrc/scale_grad.cpp)."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kl_ext.triton_kernels._config import flat_config


@triton.jit
def _scale_grad_kernel(g_ptr, s_ptr, o_ptr, n, V, SN, ROWS, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    sidx = tl.where(SN == 1, 0 * offs, tl.where(SN == ROWS, offs // V, offs))
    s = tl.load(s_ptr + sidx, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, (g * s).to(o_ptr.dtype.element_ty), mask=ok)


@triton_op("kl_ext_triton::scale_grad", mutates_args=())
def scale_grad(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(grad)
    n = grad.numel()
    if n > 0:
        block, warps = flat_config(n)
        wrap_triton(_scale_grad_kernel)[(triton.cdiv(n, block),)](
            grad, scale, out, n, grad.shape[1], scale.numel(), grad.shape[0], BLOCK=block, num_warps=warps)
    return out
