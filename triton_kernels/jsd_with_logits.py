"""jsd_with_logits: Triton kernels, registered as torch.ops.kl_ext_triton.jsd_with_logits_fwd. Same contract and
formulas as csrc/jsd_with_logits.cpp (0 < beta < 1; beta 0 and 1 go to the KL op).

One program per row, on the KL kernel's row machinery (triton_kernels/kl_div_with_logits.py: loading,
configs, online statistics): a row that fits one block is read once and its gradients come from registers;
a longer row is streamed for the log-sum-exps, again for the loss and the gradient sums, and (gradients only)
once more for the gradients.
"""
import torch
import triton
import triton.language as tl

from kl_ext.triton_kernels._config import row_config, row_layout, rows_of
from kl_ext.triton_kernels.kl_div_with_logits import (FP_FUSION, LOGITS, LOG_PROBS, _TARGET, _given_stats,
                                                      _load_chunk, _log1p, _lse, _online_lse, _put_shard_stats,
                                                      _row_start, _zero_grads, row_outputs)


# One block holds rows up to 8192: q, p, g and h per element spill 144 - 464 bytes at 16384 (sm_90, checked by
# tests/test_jsd_with_logits.py).
ONE_BLOCK_MAX = 8192


@triton.jit
def _terms(zs, lt, p, lse_s, lse_t, beta, TARGET: tl.constexpr):
    """Per element: q, p, g = (1 - beta)(ls - lm), h = beta (lt - lm) and the weighted terms q g, p h (0 where
    the weight is 0). log m from the larger of ls, lt, as csrc/jsd_with_logits.cpp's log_mixture: exactly ls
    for identical rows, never the log of an underflowing sum; where p = q = 0 it is never used."""
    ls = zs - lse_s
    q = tl.exp(ls)
    if TARGET == LOGITS:
        lt = lt - lse_t
        p = tl.exp(lt)
    d = lt - ls
    c = tl.where(d > 0, 1.0 - beta, beta)
    lm = tl.maximum(ls, lt) + _log1p(c * (tl.exp(-tl.abs(d)) - 1.0))
    g = (1.0 - beta) * (ls - lm)
    h = beta * (lt - lm)
    return q, p, g, h, tl.where(q > 0, q * g, 0.0), tl.where(p > 0, p * h, 0.0)


@triton.jit
def _store_grads(q, p, g, h, sq, sp, offs, inb, gx_ptr, gt_ptr, inv_t, gs, TARGET: tl.constexpr,
                 GRAD_X: tl.constexpr, GRAD_T: tl.constexpr):
    if GRAD_X:
        gv = tl.where(q > 0, q * (g - sq), 0.0) * (inv_t * gs)
        tl.store(gx_ptr + offs, gv.to(gx_ptr.dtype.element_ty), mask=inb)
    if GRAD_T:
        if TARGET == LOGITS:
            gv = tl.where(p > 0, p * (h - sp), 0.0) * (inv_t * gs)
        elif TARGET == LOG_PROBS:
            gv = tl.where(p > 0, p * h, 0.0) * gs
        else:
            gv = tl.where(p + q > 0, h, 0.0) * gs
        tl.store(gt_ptr + offs, gv.to(gt_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _row_lse(given_ptr, row, m_s, d_s, m_t, d_t, TARGET: tl.constexpr, VP: tl.constexpr):
    """The row's lse_s, lse_t: from its statistics, or given (the vocab-parallel finishing pass)."""
    if VP == 2:
        _, lse_s, lse_t, _, _ = _given_stats(given_ptr, row, TARGET)
    else:
        lse_s = _lse(m_s, d_s)
        lse_t = 0.0
        if TARGET == LOGITS:
            lse_t = _lse(m_t, d_t)
    return lse_s, lse_t


@triton.jit
def _put_sums(loss_ptr, shard_ptr, given_ptr, row, sq, sp, VP: tl.constexpr):
    """Store the row's loss (sq + sp), or in the finishing pass this shard's sums; returns the sums the gradients
    take (the whole row's, given, in the finishing pass)."""
    if VP == 2:
        tl.store(shard_ptr + row * 2, sq)
        tl.store(shard_ptr + row * 2 + 1, sp)
        sq = tl.load(given_ptr + row * 4 + 2)
        sp = tl.load(given_ptr + row * 4 + 3)
    else:
        tl.store(loss_ptr + row, sq + sp)
    return sq, sp


@triton.jit
def _jsd_fwd_kernel(x_ptr, t_ptr, mask_ptr, loss_ptr, gx_ptr, gt_ptr, gs_ptr, shard_ptr, given_ptr, V, xi, xs0, xs1,
                    ti, ts0, ts1, inv_t, beta,
                    TARGET: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GS: tl.constexpr, GRAD_X: tl.constexpr,
                    GRAD_T: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK: tl.constexpr, VP: tl.constexpr):
    # VP as the KL kernel's; d_t holds the teacher's mass for targets that are not logits (statistics pass).
    row, x_ptr, t_ptr, gx_ptr, gt_ptr, live, gs = _row_start(x_ptr, t_ptr, gx_ptr, gt_ptr, mask_ptr, gs_ptr, V,
                                                            xi, xs0, xs1, ti, ts0, ts1, HAS_MASK, HAS_GS)
    cols = tl.arange(0, BLOCK)
    if live:
        if ONE_CHUNK:
            inb = cols < V
            zs, lt, p = _load_chunk(x_ptr, t_ptr, cols, inb, inv_t, TARGET)
            m_s = float("-inf")
            d_s = 0.0
            m_t = float("-inf")
            d_t = 0.0
            if VP != 2:
                m_s, d_s = _online_lse(m_s, d_s, zs)
                if TARGET == LOGITS:
                    m_t, d_t = _online_lse(m_t, d_t, lt)
                else:
                    d_t = tl.sum(p, 0)
            lse_s, lse_t = _row_lse(given_ptr, row, m_s, d_s, m_t, d_t, TARGET, VP)
            if VP == 1:
                _put_shard_stats(shard_ptr, row, 0.0, lse_s, lse_t, d_t, d_s, TARGET)
            else:
                q, p, g, h, qg, ph = _terms(zs, lt, p, lse_s, lse_t, beta, TARGET)
                sq = tl.sum(qg, 0)
                sp = tl.sum(ph, 0)
                sq, sp = _put_sums(loss_ptr, shard_ptr, given_ptr, row, sq, sp, VP)
                if GRAD_X or GRAD_T:
                    _store_grads(q, p, g, h, sq, sp, cols, inb, gx_ptr, gt_ptr, inv_t, gs, TARGET, GRAD_X, GRAD_T)
        else:
            m_s = float("-inf")
            d_s = 0.0
            m_t = float("-inf")
            d_t = 0.0
            if VP != 2:
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    zs, lt, p = _load_chunk(x_ptr, t_ptr, offs, offs < V, inv_t, TARGET)
                    m_s, d_s = _online_lse(m_s, d_s, zs)
                    if TARGET == LOGITS:
                        m_t, d_t = _online_lse(m_t, d_t, lt)
                    else:
                        d_t += tl.sum(p, 0)
            lse_s, lse_t = _row_lse(given_ptr, row, m_s, d_s, m_t, d_t, TARGET, VP)
            if VP == 1:
                _put_shard_stats(shard_ptr, row, 0.0, lse_s, lse_t, d_t, d_s, TARGET)
            else:
                acc_q = tl.zeros([BLOCK], dtype=tl.float32)
                acc_p = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    zs, lt, p = _load_chunk(x_ptr, t_ptr, offs, offs < V, inv_t, TARGET)
                    q, p, g, h, qg, ph = _terms(zs, lt, p, lse_s, lse_t, beta, TARGET)
                    acc_q += qg
                    acc_p += ph
                sq, sp = _put_sums(loss_ptr, shard_ptr, given_ptr, row, tl.sum(acc_q, 0), tl.sum(acc_p, 0), VP)
                if GRAD_X or GRAD_T:
                    for start in range(0, V, BLOCK):
                        offs = start + cols
                        inb = offs < V
                        zs, lt, p = _load_chunk(x_ptr, t_ptr, offs, inb, inv_t, TARGET)
                        q, p, g, h, qg, ph = _terms(zs, lt, p, lse_s, lse_t, beta, TARGET)
                        _store_grads(q, p, g, h, sq, sp, offs, inb, gx_ptr, gt_ptr, inv_t, gs, TARGET, GRAD_X,
                                     GRAD_T)
    else:
        tl.store(loss_ptr + row, 0.0)
        _zero_grads(gx_ptr, gt_ptr, V, BLOCK, GRAD_X, GRAD_T)


@torch.library.custom_op("kl_ext_triton::jsd_with_logits_fwd", mutates_args=())
def jsd_with_logits_fwd(input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, target_type: str,
                        temperature: float, beta: float, grad_input: bool, grad_target: bool,
                        grad_scale: torch.Tensor | None = None, row_stats: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(0 < beta < 1, lambda: "kl_ext: jsd_with_logits_fwd takes 0 < beta < 1")
    loss, shard, vp, gx, gt = row_outputs(input, target, grad_input, grad_target, row_stats)
    N, V = rows_of(input), input.shape[-1]
    if N > 0:
        block, warps, one_chunk = row_config(V, input.element_size(), ONE_BLOCK_MAX)
        _jsd_fwd_kernel[(N,)](
            input, target, mask if mask is not None else input, loss, gx, gt,
            grad_scale if grad_scale is not None else loss, shard, row_stats if vp == 2 else loss, V,
            *row_layout(input), *row_layout(target), 1.0 / temperature, beta, TARGET=_TARGET[target_type], HAS_MASK=mask is not None,
            HAS_GS=grad_scale is not None, GRAD_X=grad_input, GRAD_T=grad_target, ONE_CHUNK=one_chunk, BLOCK=block,
            VP=vp, num_warps=warps, enable_fp_fusion=FP_FUSION)
    return shard if vp else loss, gx, gt
