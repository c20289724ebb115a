"""bernoulli_kl_div_with_logits (and BCE with logits): Triton kernels, registered as
torch.ops.kl_ext_triton.bernoulli_kl_div_with_logits_fwd. Same formulas as csrc/bernoulli_kl_div_with_logits.cpp:
with z = input / T, p the target probability and lw = 1 + (pos_weight - 1) p,
  BCE = (1 - p) z + lw softplus(-z); KL(p given) = BCE + p log p + (1 - p) log(1 - p);
  KL(p = sigmoid(u)) = (1 - p)(z - u) + softplus(-z) - softplus(-u); dL/dz = lw sigmoid(z) - pos_weight p.
Each program handles BLOCK_R rows, looping over the classes, so per-row sums need no atomics.
"""
import torch
import triton
import triton.language as tl

from kl_ext import _ops
from kl_ext.triton_kernels._config import row_layout, rows_of, tile_config
from kl_ext.triton_kernels._rows import _row_ptr


@triton.jit
def _softplus_neg(z, e_abs):
    # softplus(-z) = max(-z, 0) + log(1 + exp(-|z|)); log1p is unavailable in the interpreter.
    return tl.maximum(-z, 0.0) + tl.log(1.0 + e_abs)


@triton.jit
def _xlogx(p):
    return tl.where(p > 0, p * tl.log(p), 0.0)


@triton.jit
def _bernoulli_fwd_kernel(x_ptr, t_ptr, w_ptr, pw_ptr, loss_ptr, gx_ptr, gt_ptr, gs_ptr, N, C, xi, xs0, xs1, ti, ts0,
                          ts1, inv_t, W_NUMEL,
                          PW_NUMEL, HAS_GS: tl.constexpr, TARGET_LOGITS: tl.constexpr, ENTROPY: tl.constexpr, HAS_W: tl.constexpr,
                          HAS_PW: tl.constexpr, ELEMENTWISE: tl.constexpr, GRAD_X: tl.constexpr,
                          GRAD_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < N
    x_rows = _row_ptr(x_ptr, rows, xi, xs0, xs1)[:, None]  # read in place; losses and gradients contiguous
    t_rows = _row_ptr(t_ptr, rows, ti, ts0, ts1)[:, None]
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    gs = 1.0
    if HAS_GS:
        gs = tl.load(gs_ptr).to(tl.float32)  # the reduction's 1 / denominator
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        idx = rows[:, None] * C + cols[None, :]
        z = tl.load(x_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv_t
        t = tl.load(t_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            widx = tl.where(W_NUMEL == C, cols[None, :] + 0 * idx, idx)
            w = tl.load(w_ptr + widx, mask=ok, other=0.0).to(tl.float32)
        else:
            w = 1.0
        if HAS_PW:
            pidx = tl.where(PW_NUMEL == C, cols[None, :] + 0 * idx, idx)
            pw = tl.load(pw_ptr + pidx, mask=ok, other=1.0).to(tl.float32)
        else:
            pw = 1.0
        ez = tl.exp(-tl.abs(z))
        spz = _softplus_neg(z, ez)
        if TARGET_LOGITS:
            u = t * inv_t
            eu = tl.exp(-tl.abs(u))
            p = tl.where(u >= 0, 1.0 / (1.0 + eu), eu / (1.0 + eu))
            loss = (1.0 - p) * (z - u) + spz - _softplus_neg(u, eu)
        else:
            p = t
            lw = 1.0 + (pw - 1.0) * p
            loss = (1.0 - p) * z + lw * spz
            if ENTROPY:
                loss = loss + _xlogx(p) + _xlogx(1.0 - p)
        loss = tl.where(ok, loss * w, 0.0)
        if ELEMENTWISE:
            tl.store(loss_ptr + idx, loss, mask=ok)
        else:
            total += tl.sum(loss, 1)
        if GRAD_X:
            sig = tl.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez))
            lw = 1.0 + (pw - 1.0) * p
            tl.store(gx_ptr + idx, (w * (lw * sig - pw * p) * (inv_t * gs)).to(gx_ptr.dtype.element_ty), mask=ok)
        if GRAD_T:
            if TARGET_LOGITS:
                g = -p * (1.0 - p) * (z - u) * inv_t
            elif ENTROPY:
                g = tl.log(p) - tl.log(1.0 - p) - z
            else:
                g = (pw - 1.0) * spz - z
            tl.store(gt_ptr + idx, (w * g * gs).to(gt_ptr.dtype.element_ty), mask=ok)
    if not ELEMENTWISE:
        tl.store(loss_ptr + rows, total, mask=row_ok)


@_ops.triton_op("bernoulli_kl_div_with_logits_fwd")
def bernoulli_kl_div_with_logits_fwd(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                                     pos_weight: torch.Tensor | None, target_type: str, temperature: float,
                                     subtract_entropy: bool, elementwise: bool, grad_input: bool,
                                     grad_target: bool, grad_scale: torch.Tensor | None = None
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, C = rows_of(input), input.shape[-1]
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss = torch.empty((N, C) if elementwise else (N,), device=input.device, dtype=acc)
    gx = input.new_empty((N, C)) if grad_input else input.new_empty((0,))
    gt = target.new_empty((N, C)) if grad_target else target.new_empty((0,))
    if N > 0:
        block_r, block_c, warps = tile_config(C)
        _bernoulli_fwd_kernel[(triton.cdiv(N, block_r),)](
            input, target, weight if weight is not None else input, pos_weight if pos_weight is not None else input,
            loss, gx, gt, grad_scale if grad_scale is not None else loss, N, C, *row_layout(input),
            *row_layout(target), 1.0 / temperature,
            weight.numel() if weight is not None else 0, pos_weight.numel() if pos_weight is not None else 0,
            HAS_GS=grad_scale is not None,
            TARGET_LOGITS=target_type == "logits", ENTROPY=subtract_entropy, HAS_W=weight is not None,
            HAS_PW=pos_weight is not None, ELEMENTWISE=elementwise, GRAD_X=grad_input, GRAD_T=grad_target,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return loss, gx, gt
