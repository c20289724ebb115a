"""kl_div_with_logits: Triton kernels, registered as torch.ops.kl_ext_triton.kl_div_with_logits_fwd.

One program per row. A row that fits one block (V <= 16384) is read once and kept in registers: statistics,
KL and gradients all come from that read. A longer row is streamed once with online statistics (running max and
sum-exp of student and teacher, and the KL accumulator rescaled as the max moves), so a forward without
gradients reads each input exactly once; when gradients are wanted, a second pass streams the row again and
writes the gradients of the row's KL. Same contract and edge cases as csrc/.
The row machinery shared with the other row-softmax kernels: triton_kernels/_rows.py.
"""
import torch
import triton
import triton.language as tl

from kl_ext import _ops
from kl_ext.triton_kernels._config import row_config, row_layout, rows_of
from kl_ext.triton_kernels._rows import (FP_FUSION, LOGITS, LOG_PROBS, _TARGET, _safe, _rescale, _log1p, _lse,
                                         _load_chunk, _put_shard_stats, _given_stats, _row_start, _zero_grads,
                                         row_outputs)


@triton.jit
def _delta(m_old, m_new):
    # How far a running max moved (0 while nothing finite has been seen: the accumulators are 0 or +inf).
    return tl.where(m_old == float("-inf"), 0.0, _safe(m_new) - m_old)


@triton.jit
def _log_ratio(a, b):
    """log(a / b) accurate when a ~ b: log1p((a - b) / b). The ratio of two rows' sums is ~1 for near-identical
    rows: a difference of two logs of ~log V each would add their rounding to a tiny KL."""
    return _log1p((a - b) / b)


@triton.jit
def _accumulate(zs, lt, p, m_s, d_s, m_t, d_t, acc, s_p, TARGET: tl.constexpr, FORWARD: tl.constexpr):
    """Fold one chunk into the online statistics. The KL accumulator is kept relative to the running maxima
    (shifted logits), so that when p == q it is exactly 0 and no large log-sum-exp terms cancel at the end;
    when a maximum moves, the old terms shift by the move (d * delta) and are rescaled (alpha)."""
    ms_new = tl.maximum(m_s, tl.max(zs, 0))
    a_s = _rescale(m_s, ms_new)
    dl_s = _delta(m_s, ms_new)
    e_s = tl.exp(zs - _safe(ms_new))
    zs_sh = zs - _safe(ms_new)
    if TARGET == LOGITS:
        mt_new = tl.maximum(m_t, tl.max(lt, 0))
        a_t = _rescale(m_t, mt_new)
        dl_t = _delta(m_t, mt_new)
        e_t = tl.exp(lt - _safe(mt_new))
        lt_sh = lt - _safe(mt_new)
        if FORWARD:
            acc = a_t * (acc + d_t * (dl_s - dl_t)) + tl.sum(tl.where(e_t > 0, e_t * (lt_sh - zs_sh), 0.0), 0)
        else:
            acc = a_s * (acc + d_s * (dl_t - dl_s)) + tl.sum(tl.where(e_s > 0, e_s * (zs_sh - lt_sh), 0.0), 0)
        d_t = d_t * a_t + tl.sum(e_t, 0)
        m_t = mt_new
    else:
        if FORWARD:
            acc = acc + s_p * dl_s + tl.sum(tl.where(p > 0, p * (lt - zs_sh), 0.0), 0)
        else:
            acc = a_s * (acc - d_s * dl_s) + tl.sum(tl.where(e_s > 0, e_s * (zs_sh - lt), 0.0), 0)
        s_p += tl.sum(p, 0)
    d_s = d_s * a_s + tl.sum(e_s, 0)
    return ms_new, d_s, m_t, d_t, acc, s_p


@triton.jit
def _finish(m_s, d_s, m_t, d_t, acc, s_p, TARGET: tl.constexpr, FORWARD: tl.constexpr):
    """Row KL and statistics (lse_s, lse_t, teacher mass, student mass). A row that is entirely -inf has mass 0,
    log-probs -inf (lse = +inf), probs 0; a side with no mass where the other has some gives KL = +inf."""
    lse_s = _lse(m_s, d_s)
    s_q = tl.where(d_s > 0, 1.0, 0.0)
    if TARGET == LOGITS:
        lse_t = _lse(m_t, d_t)
        s_p = tl.where(d_t > 0, 1.0, 0.0)
        if FORWARD:
            kl = tl.where(d_t > 0, tl.where(d_s > 0, acc / d_t + _log_ratio(d_s, d_t), float("inf")), 0.0)
        else:
            kl = tl.where(d_s > 0, tl.where(d_t > 0, acc / d_s - _log_ratio(d_s, d_t), float("inf")), 0.0)
    else:
        lse_t = 0.0
        if FORWARD:
            kl = tl.where(s_p > 0, tl.where(d_s > 0, acc + s_p * tl.log(d_s), float("inf")), 0.0)
        else:
            kl = tl.where(d_s > 0, acc / d_s - tl.log(d_s), 0.0)
    return kl, lse_s, lse_t, s_p, s_q


@triton.jit
def _store_row(loss_ptr, shard_ptr, row, kl, lse_s, lse_t, s_p, s_q, TARGET: tl.constexpr, VP: tl.constexpr):
    """The row's result: its KL, or in the statistics pass the shard's (the finishing pass stores none)."""
    if VP == 0:
        tl.store(loss_ptr + row, kl)
    elif VP == 1:
        _put_shard_stats(shard_ptr, row, kl, lse_s, lse_t, s_p, s_q, TARGET)


@triton.jit
def _store_grads(zs, lt, p, offs, inb, gx_ptr, gt_ptr, kl, lse_s, lse_t, s_p, s_q, inv_t, gs,
                 TARGET: tl.constexpr, FORWARD: tl.constexpr, GRAD_X: tl.constexpr, GRAD_T: tl.constexpr):
    """Gradients of the row KL (times gs, the reduction's 1 / denominator) for one chunk."""
    ls = zs - lse_s
    q = tl.exp(ls)
    if TARGET == LOGITS:
        lt = lt - lse_t
        p = tl.exp(lt)
    if GRAD_X:
        if FORWARD:
            g = q * s_p - p
        else:
            g = tl.where(q > 0, q * ((ls - lt) - kl), 0.0)
        tl.store(gx_ptr + offs, (g * (inv_t * gs)).to(gx_ptr.dtype.element_ty), mask=inb)
    if GRAD_T:
        if FORWARD:
            if TARGET == LOGITS:
                g = tl.where(p > 0, p * ((lt - ls) - kl), 0.0) * inv_t
            elif TARGET == LOG_PROBS:
                g = tl.where(p > 0, p * (lt - ls + 1.0), 0.0)
            else:
                g = lt - ls + 1.0
        else:
            if TARGET == LOGITS:
                g = (p * s_q - q) * inv_t
            elif TARGET == LOG_PROBS:
                g = -q
            else:
                g = tl.where(q > 0, -q / p, 0.0)
        tl.store(gt_ptr + offs, (g * gs).to(gt_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _kl_fwd_kernel(x_ptr, t_ptr, mask_ptr, loss_ptr, gx_ptr, gt_ptr, gs_ptr, shard_ptr, given_ptr, V, xi, xs0, xs1,
                   ti, ts0, ts1, inv_t, TARGET: tl.constexpr, FORWARD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GS: tl.constexpr,
                   GRAD_X: tl.constexpr, GRAD_T: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   VP: tl.constexpr):
    # VP: 0 a whole row, 1 the vocab-parallel statistics pass, 2 its finishing pass (csrc/common.h, KLCall).
    row, x_ptr, t_ptr, gx_ptr, gt_ptr, live, gs = _row_start(x_ptr, t_ptr, gx_ptr, gt_ptr, mask_ptr, gs_ptr, V,
                                                            xi, xs0, xs1, ti, ts0, ts1, HAS_MASK, HAS_GS)
    cols = tl.arange(0, BLOCK)
    if live:
        if ONE_CHUNK:
            # The whole row fits one block: read it once, keep it in registers for the gradients.
            inb = cols < V
            zs, lt, p = _load_chunk(x_ptr, t_ptr, cols, inb, inv_t, TARGET)
            if VP == 2:
                kl, lse_s, lse_t, s_p, s_q = _given_stats(given_ptr, row, TARGET)
            else:
                m_s, d_s, m_t, d_t, acc, s_p = _accumulate(zs, lt, p, float("-inf"), 0.0, float("-inf"), 0.0, 0.0,
                                                           0.0, TARGET, FORWARD)
                kl, lse_s, lse_t, s_p, s_q = _finish(m_s, d_s, m_t, d_t, acc, s_p, TARGET, FORWARD)
            _store_row(loss_ptr, shard_ptr, row, kl, lse_s, lse_t, s_p, s_q, TARGET, VP)
            if GRAD_X or GRAD_T:
                _store_grads(zs, lt, p, cols, inb, gx_ptr, gt_ptr, kl, lse_s, lse_t, s_p, s_q, inv_t, gs,
                             TARGET, FORWARD, GRAD_X, GRAD_T)
        else:
            # Pass 1 streams the row once with online statistics (given instead in the finishing pass); pass 2
            # (gradients only) streams it again.
            if VP == 2:
                kl, lse_s, lse_t, s_p, s_q = _given_stats(given_ptr, row, TARGET)
            else:
                m_s = float("-inf")
                d_s = 0.0
                m_t = float("-inf")
                d_t = 0.0
                acc = 0.0
                s_p = 0.0
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    zs, lt, p = _load_chunk(x_ptr, t_ptr, offs, offs < V, inv_t, TARGET)
                    m_s, d_s, m_t, d_t, acc, s_p = _accumulate(zs, lt, p, m_s, d_s, m_t, d_t, acc, s_p, TARGET,
                                                               FORWARD)
                kl, lse_s, lse_t, s_p, s_q = _finish(m_s, d_s, m_t, d_t, acc, s_p, TARGET, FORWARD)
            _store_row(loss_ptr, shard_ptr, row, kl, lse_s, lse_t, s_p, s_q, TARGET, VP)
            if GRAD_X or GRAD_T:
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    inb = offs < V
                    zs, lt, p = _load_chunk(x_ptr, t_ptr, offs, inb, inv_t, TARGET)
                    _store_grads(zs, lt, p, offs, inb, gx_ptr, gt_ptr, kl, lse_s, lse_t, s_p, s_q, inv_t, gs,
                                 TARGET, FORWARD, GRAD_X, GRAD_T)
    else:
        tl.store(loss_ptr + row, 0.0)
        _zero_grads(gx_ptr, gt_ptr, V, BLOCK, GRAD_X, GRAD_T)


@_ops.triton_op("kl_div_with_logits_fwd")
def kl_div_with_logits_fwd(input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, target_type: str,
                           temperature: float, direction: str, grad_input: bool,
                           grad_target: bool, grad_scale: torch.Tensor | None = None,
                           row_stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, shard, vp, gx, gt = row_outputs(input, target, grad_input, grad_target, row_stats)
    N, V = rows_of(input), input.shape[-1]
    if N > 0:
        block, warps, one_chunk = row_config(V, input.element_size())
        _kl_fwd_kernel[(N,)](
            input, target, mask if mask is not None else input, loss, gx, gt,
            grad_scale if grad_scale is not None else loss, shard, row_stats if vp == 2 else loss, V,
            *row_layout(input), *row_layout(target), 1.0 / temperature, TARGET=_TARGET[target_type], FORWARD=direction == "forward",
            HAS_MASK=mask is not None, HAS_GS=grad_scale is not None, GRAD_X=grad_input, GRAD_T=grad_target,
            ONE_CHUNK=one_chunk, BLOCK=block, VP=vp, num_warps=warps, enable_fp_fusion=FP_FUSION)
    return shard if vp else loss, gx, gt
