"""scale_grad / scale_grad_: Triton kernels, registered as torch.ops.kl_ext_triton.scale_grad(_)
(contract: csrc/scale_grad.cpp). In place with a single scale of exactly 1, every program returns after one
scalar load: loss.backward() on a reduced loss then moves no gradient bytes, with no host sync."""
import torch
import triton
import triton.language as tl

from kl_ext import _ops
from kl_ext.triton_kernels._config import flat_config


@triton.jit
def _scale_block(g_ptr, s_ptr, o_ptr, n, V, SN, ROWS, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    sidx = tl.where(SN == 1, 0 * offs, tl.where(SN == ROWS, offs // V, offs))
    s = tl.load(s_ptr + sidx, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, (g * s).to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale_grad_kernel(g_ptr, s_ptr, o_ptr, n, V, SN, ROWS, SKIP_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    if SKIP_UNIT:
        if tl.load(s_ptr).to(tl.float32) != 1.0:
            _scale_block(g_ptr, s_ptr, o_ptr, n, V, SN, ROWS, BLOCK)
    else:
        _scale_block(g_ptr, s_ptr, o_ptr, n, V, SN, ROWS, BLOCK)


def _launch(grad, scale, out):
    n = grad.numel()
    if n > 0:
        block, warps = flat_config(n)
        _scale_grad_kernel[(triton.cdiv(n, block),)](
            grad, scale, out, n, grad.shape[1], scale.numel(), grad.shape[0],
            SKIP_UNIT=out is grad and scale.numel() == 1, BLOCK=block, num_warps=warps)


@_ops.triton_op("scale_grad")
def scale_grad(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(grad)
    _launch(grad, scale, out)
    return out


@_ops.triton_op("scale_grad_")
def scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    _launch(grad, scale, grad)
