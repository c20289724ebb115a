"""divergence_with_logits_fwd: Triton kernels, registered as torch.ops.kl_ext_triton.divergence_with_logits_fwd. Same
contract and formulas as csrc/divergences.cpp / csrc/divergences.h: one row kernel; a divergence is its per-element
term f and derivatives gq = dL/dq, gp = dL/dp (`_jsd`, `_tvd`, `_skew`), chosen at compile time (DIVERGENCE).

One program per row, on the row machinery the KL kernel shares (triton_kernels/_rows.py: loading, online
statistics, vocab-parallel statistics; triton_kernels/_config.py: launch configs): a row that fits one block is read once and its gradients come from registers;
a longer row is streamed for the log-sum-exps, again for the loss and the gradient sums, and (gradients only)
once more for the gradients.
"""
import torch
import triton
import triton.language as tl

from kl_ext import _ops
from kl_ext.triton_kernels._config import row_config, row_layout, rows_of
from kl_ext.triton_kernels._rows import (FP_FUSION, LOGITS, LOG_PROBS, _TARGET, _given_stats,
                                                      _load_chunk, _log1p, _lse, _online_lse, _put_shard_stats,
                                                      _row_start, _zero_grads, row_outputs)


# One block holds rows up to 8192: q, p, gq and gp per element spill 144 - 464 bytes at 16384 (sm_90, checked by
# tests/test_jsd_with_logits.py).
ONE_BLOCK_MAX = 8192
JSD, TVD, SKEW_FORWARD, SKEW_REVERSE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
_DIVERGENCE = {"jsd": 0, "tvd": 1, "skew_forward": 2, "skew_reverse": 3}


@triton.jit
def _log_mixture(ls, lt, w):
    """log(w e^lt + (1 - w) e^ls) from the larger of ls, lt (csrc/divergences.h): exactly ls for identical rows,
    never the log of an underflowing sum; where p = q = 0 it is never used."""
    d = lt - ls
    c = tl.where(d > 0, 1.0 - w, w)
    return tl.maximum(ls, lt) + _log1p(c * (tl.exp(-tl.abs(d)) - 1.0))


@triton.jit
def _log_mixture_exact(ls, lt, w):
    """_log_mixture accurate for any weight (csrc/divergences.h, log_mixture_exact): where the larger side's
    weight is small, w' + c e^-|d| is summed directly rather than as 1 + c expm1(-|d|)."""
    d = lt - ls
    c = tl.where(d > 0, 1.0 - w, w)
    big = tl.where(d > 0, w, 1.0 - w)
    u = c * (tl.exp(-tl.abs(d)) - 1.0)
    far = tl.log(big + c * tl.exp(-tl.abs(d)))
    return tl.maximum(ls, lt) + tl.where(u > -0.5, _log1p(u), far)


@triton.jit
def _jsd(ls, lt, q, p, beta):
    lm = _log_mixture(ls, lt, beta)
    g = (1.0 - beta) * (ls - lm)
    h = beta * (lt - lm)
    return tl.where(q > 0, q * g, 0.0) + tl.where(p > 0, p * h, 0.0), g, h


@triton.jit
def _tvd(ls, lt, q, p, param):
    d = q - p
    s = tl.where(d > 0, 0.5, 0.0) - tl.where(d < 0, 0.5, 0.0)
    return 0.5 * tl.abs(d), s, -s


@triton.jit
def _skew(ls, lt, q, p, alpha, FORWARD: tl.constexpr):
    if FORWARD:
        lm = _log_mixture_exact(ls, lt, alpha)
        l = lt - lm  # noqa: E741
        w = p
    else:
        lm = _log_mixture_exact(ls, lt, 1.0 - alpha)
        l = ls - lm  # noqa: E741
        w = q
    r = tl.exp(l)
    own = l + 1.0 - alpha * r
    other = -(1.0 - alpha) * r
    if FORWARD:
        return tl.where(w > 0, w * l, 0.0), other, own
    return tl.where(w > 0, w * l, 0.0), own, other


@triton.jit
def _terms(zs, lt, p, lse_s, lse_t, param, TARGET: tl.constexpr, DIVERGENCE: tl.constexpr):
    """Per element: q, p, gq, gp and the terms f, q gq, p gp (0 where the weight is 0)."""
    ls = zs - lse_s
    q = tl.exp(ls)
    if TARGET == LOGITS:
        lt = lt - lse_t
        p = tl.exp(lt)
    if DIVERGENCE == JSD:
        f, gq, gp = _jsd(ls, lt, q, p, param)
    elif DIVERGENCE == TVD:
        f, gq, gp = _tvd(ls, lt, q, p, param)
    else:
        f, gq, gp = _skew(ls, lt, q, p, param, DIVERGENCE == SKEW_FORWARD)
    return q, p, gq, gp, f, tl.where(q > 0, q * gq, 0.0), tl.where(p > 0, p * gp, 0.0)


@triton.jit
def _store_grads(q, p, gq, gp, sq, sp, offs, inb, gx_ptr, gt_ptr, inv_t, gs, TARGET: tl.constexpr,
                 GRAD_X: tl.constexpr, GRAD_T: tl.constexpr):
    if GRAD_X:
        gv = tl.where(q > 0, q * (gq - sq), 0.0) * (inv_t * gs)
        tl.store(gx_ptr + offs, gv.to(gx_ptr.dtype.element_ty), mask=inb)
    if GRAD_T:
        if TARGET == LOGITS:
            gv = tl.where(p > 0, p * (gp - sp), 0.0) * (inv_t * gs)
        elif TARGET == LOG_PROBS:
            gv = tl.where(p > 0, p * gp, 0.0) * gs
        else:
            gv = tl.where(p + q > 0, gp, 0.0) * gs
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
def _put_sums(loss_ptr, shard_ptr, given_ptr, row, sf, sq, sp, VP: tl.constexpr):
    """Store the row's loss (sf), or in the finishing pass this shard's sums sq, sp; returns the sums the
    gradients take (the whole row's, given, in the finishing pass)."""
    if VP == 2:
        tl.store(shard_ptr + row * 2, sq)
        tl.store(shard_ptr + row * 2 + 1, sp)
        sq = tl.load(given_ptr + row * 4 + 2)
        sp = tl.load(given_ptr + row * 4 + 3)
    else:
        tl.store(loss_ptr + row, sf)
    return sq, sp


@triton.jit
def _divergence_fwd_kernel(x_ptr, t_ptr, mask_ptr, loss_ptr, gx_ptr, gt_ptr, gs_ptr, shard_ptr, given_ptr, V, xi, xs0,
                           xs1, ti, ts0, ts1, inv_t, param,
                           TARGET: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr,
                           HAS_GS: tl.constexpr, GRAD_X: tl.constexpr, GRAD_T: tl.constexpr, ONE_CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr, VP: tl.constexpr):
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
                q, p, gq, gp, f, qg, ph = _terms(zs, lt, p, lse_s, lse_t, param, TARGET, DIVERGENCE)
                sq, sp = _put_sums(loss_ptr, shard_ptr, given_ptr, row, tl.sum(f, 0), tl.sum(qg, 0), tl.sum(ph, 0),
                                   VP)
                if GRAD_X or GRAD_T:
                    _store_grads(q, p, gq, gp, sq, sp, cols, inb, gx_ptr, gt_ptr, inv_t, gs, TARGET, GRAD_X, GRAD_T)
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
                acc_f = tl.zeros([BLOCK], dtype=tl.float32)
                acc_q = tl.zeros([BLOCK], dtype=tl.float32)
                acc_p = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    zs, lt, p = _load_chunk(x_ptr, t_ptr, offs, offs < V, inv_t, TARGET)
                    q, p, gq, gp, f, qg, ph = _terms(zs, lt, p, lse_s, lse_t, param, TARGET, DIVERGENCE)
                    acc_f += f
                    acc_q += qg
                    acc_p += ph
                sq, sp = _put_sums(loss_ptr, shard_ptr, given_ptr, row, tl.sum(acc_f, 0), tl.sum(acc_q, 0),
                                   tl.sum(acc_p, 0), VP)
                if GRAD_X or GRAD_T:
                    for start in range(0, V, BLOCK):
                        offs = start + cols
                        inb = offs < V
                        zs, lt, p = _load_chunk(x_ptr, t_ptr, offs, inb, inv_t, TARGET)
                        q, p, gq, gp, _, _, _ = _terms(zs, lt, p, lse_s, lse_t, param, TARGET, DIVERGENCE)
                        _store_grads(q, p, gq, gp, sq, sp, offs, inb, gx_ptr, gt_ptr, inv_t, gs, TARGET, GRAD_X,
                                     GRAD_T)
    else:
        tl.store(loss_ptr + row, 0.0)
        _zero_grads(gx_ptr, gt_ptr, V, BLOCK, GRAD_X, GRAD_T)


@_ops.triton_op("divergence_with_logits_fwd")
def divergence_with_logits_fwd(input, target, mask, target_type, temperature, divergence, param, grad_input,
                               grad_target, grad_scale=None, row_stats=None):
    torch._check(divergence in _DIVERGENCE, lambda: f"kl_ext: divergence must be one of {list(_DIVERGENCE)}")
    torch._check(divergence == "tvd" or 0 < param < 1, lambda: "kl_ext: divergence_with_logits_fwd takes "
                 "0 < param < 1 (0 and 1 are kl_div_with_logits_fwd's directions)")
    loss, shard, vp, gx, gt = row_outputs(input, target, grad_input, grad_target, row_stats)
    N, V = rows_of(input), input.shape[-1]
    if N > 0:
        block, warps, one_chunk = row_config(V, input.element_size(), ONE_BLOCK_MAX)
        _divergence_fwd_kernel[(N,)](
            input, target, mask if mask is not None else input, loss, gx, gt,
            grad_scale if grad_scale is not None else loss, shard, row_stats if vp == 2 else loss, V,
            *row_layout(input), *row_layout(target), 1.0 / temperature, param, TARGET=_TARGET[target_type],
            DIVERGENCE=_DIVERGENCE[divergence], HAS_MASK=mask is not None, HAS_GS=grad_scale is not None,
            GRAD_X=grad_input, GRAD_T=grad_target, ONE_CHUNK=one_chunk, BLOCK=block, VP=vp, num_warps=warps,
            enable_fp_fusion=FP_FUSION)
    return shard if vp else loss, gx, gt
