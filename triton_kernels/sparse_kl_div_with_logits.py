"""sparse_kl_div_with_logits: the Triton kernel, registered as torch.ops.kl_ext_triton.sparse_kl_div_with_logits_fwd.

One program per row, streaming the student row in chunks with the KL module's online statistics. The tail sum
Q_tail must cover exactly the classes outside the teacher's support, so the program first marks the support
in a per-row bitmap (global scratch, V / 8 bytes per row, atomic OR; indices outside [0, V) are skipped and
never dereferenced), and the statistics pass sums the exponentials of all classes and of the unmarked ones.
The teacher's slot sums are in float64 (the tail bucket 1 - sum p is a difference near 1 - 1). Gradients: one
pass writes every class's non-support gradient, then (after a barrier) the support's entries are overwritten.
Formulas and edge cases: csrc/sparse_kl_div_with_logits.cpp.
"""
import torch
import triton
import triton.language as tl

from kl_ext import _ops
from kl_ext.triton_kernels._config import interpreting, row_config, row_layout, rows_of
from kl_ext.triton_kernels._rows import (_TARGET, FP_FUSION, LOG_PROBS, LOGITS, PROBS, _rescale,
                                                      _row_start, _safe, _zero_grads)


@triton.jit
def _slots(idx_ptr, val_ptr, ko, K, V, inv_t, TARGET: tl.constexpr):
    """A chunk of slots: (ok, class, value, log-weight in float64); ok is False for empty or out-of-range slots."""
    kin = ko < K
    i = tl.load(idx_ptr + ko, mask=kin, other=-1)
    ok = kin & (i >= 0) & (i < V)
    ic = tl.where(ok, i, 0)
    v = tl.load(val_ptr + ko, mask=ok, other=1.0)
    v64 = v.to(tl.float64)
    if TARGET == LOGITS:
        w = v64 * inv_t
    elif TARGET == LOG_PROBS:
        w = v64
    else:
        w = tl.log(v64)
    return ok, ic, v.to(tl.float32), tl.where(ok, w, float("-inf"))


@triton.jit
def _slot_terms(x_ptr, ok, ic, v, w, m, log_d, lse_w, has_w, inv_t, TARGET: tl.constexpr, NORMALIZE: tl.constexpr):
    """Per slot: the student's log-prob ls, the teacher's prob p and d = lp - ls. ls = (z - max) - log(sum): no
    large log-sum-exp (logits of 25 would cost 1e-6 absolute) to cancel."""
    ls = (tl.load(x_ptr + ic, mask=ok, other=0.0).to(tl.float32) * inv_t - _safe(m)) - log_d
    if NORMALIZE:
        lp = tl.where(has_w, (w - lse_w).to(tl.float32), float("-inf"))
        p = tl.exp(lp)
    elif TARGET == LOG_PROBS:
        lp = v
        p = tl.exp(v)
    else:
        lp = tl.log(v)
        p = v
    return ls, p, lp - ls


@triton.jit
def _sparse_kl_fwd_kernel(x_ptr, idx_ptr, val_ptr, mask_ptr, loss_ptr, gx_ptr, gv_ptr, gs_ptr, bits_ptr, V, xi, xs0,
                          xs1, K, W, inv_t, TARGET: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
                          HAS_GS: tl.constexpr, GRAD_X: tl.constexpr, GRAD_V: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    row, x_ptr, _, gx_ptr, _, live, gs = _row_start(x_ptr, x_ptr, gx_ptr, gx_ptr, mask_ptr, gs_ptr, V, xi, xs0, xs1,
                                                    xi, xs0, xs1, HAS_MASK, HAS_GS)
    idx_ptr += row * K
    val_ptr += row * K
    gv_ptr += row * K
    bits_ptr += row * W
    cols = tl.arange(0, BLOCK)
    kcols = tl.arange(0, BLOCK_K)
    if live:
        # The support's bitmap; then the teacher's maximum log-weight.
        mw = tl.full([], float("-inf"), tl.float64)
        for ks in range(0, K, BLOCK_K):
            ok, ic, v, w = _slots(idx_ptr, val_ptr, ks + kcols, K, V, inv_t, TARGET)
            tl.atomic_or(bits_ptr + (ic >> 5), (1 << (ic & 31)).to(tl.int32), mask=ok)
            mw = tl.maximum(mw, tl.max(w, 0))
        tl.debug_barrier()  # every mark is made before any thread reads the bitmap
        # The student's statistics over all classes (d_all) and those outside the support (d_tail).
        m = float("-inf")
        d_all = 0.0
        d_tail = 0.0
        for start in range(0, V, BLOCK):
            offs = start + cols
            inb = offs < V
            z = tl.load(x_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
            # .cg: from L2, where the atomics were made (never a stale L1 line)
            word = tl.load(bits_ptr + (offs >> 5), mask=inb, other=0, cache_modifier=".cg")
            member = ((word >> (offs & 31)) & 1) != 0
            m_new = tl.maximum(m, tl.max(z, 0))
            sc = _rescale(m, m_new)
            e = tl.exp(z - _safe(m_new))
            d_all = d_all * sc + tl.sum(e, 0)
            d_tail = d_tail * sc + tl.sum(tl.where(member, 0.0, e), 0)
            m = m_new
        sw = tl.zeros([], tl.float64)
        nvalid = 0
        for ks in range(0, K, BLOCK_K):
            ok, ic, v, w = _slots(idx_ptr, val_ptr, ks + kcols, K, V, inv_t, TARGET)
            sw += tl.sum(tl.where(ok, tl.exp(w - tl.where(mw == float("-inf"), 0.0, mw)), 0.0), 0)
            nvalid += tl.sum(ok.to(tl.int32), 0)
        has_w = sw > 0
        lse_w = tl.where(has_w, tl.where(mw == float("-inf"), 0.0, mw) + tl.log(tl.where(has_w, sw, 1.0)),
                         float("-inf"))
        log_d = tl.where(d_all > 0, tl.log(d_all), float("inf"))
        if NORMALIZE:
            P = tl.where(has_w, 1.0, 0.0)
            p_tail = 0.0
        else:
            P = tl.exp(lse_w).to(tl.float32)
            p_tail = tl.where(nvalid == V, 0.0, tl.maximum(1.0 - tl.exp(lse_w), 0.0)).to(tl.float32)
        log_qt = tl.where(d_tail > 0, tl.log(d_tail) - tl.log(d_all), float("-inf"))
        head = 0.0
        for ks in range(0, K, BLOCK_K):
            ok, ic, v, w = _slots(idx_ptr, val_ptr, ks + kcols, K, V, inv_t, TARGET)
            ls, p, d = _slot_terms(x_ptr, ok, ic, v, w, m, log_d, lse_w, has_w, inv_t, TARGET, NORMALIZE)
            head += tl.sum(tl.where(ok & (p > 0), p * d, 0.0), 0)
        tail = tl.where(p_tail > 0, p_tail * (tl.log(tl.where(p_tail > 0, p_tail, 1.0)) - log_qt), 0.0)
        tl.store(loss_ptr + row, head + tail)
        c = P + p_tail
        f = inv_t * gs
        if GRAD_X:
            an = (c / d_all - tl.where(p_tail > 0, p_tail / d_tail, 0.0)) * f
            for start in range(0, V, BLOCK):
                offs = start + cols
                inb = offs < V
                z = tl.load(x_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
                tl.store(gx_ptr + offs, (tl.exp(z - _safe(m)) * an).to(gx_ptr.dtype.element_ty), mask=inb)
            tl.debug_barrier()  # the support's entries are overwritten after the full-row write
        if GRAD_X or GRAD_V:
            # One pass over the slots: the support's input gradients and the values' gradients.
            t = tl.where(p_tail > 0, tl.log(tl.where(p_tail > 0, p_tail, 1.0)) - log_qt + 1.0, 0.0)
            for ks in range(0, K, BLOCK_K):
                ko = ks + kcols
                ok, ic, v, w = _slots(idx_ptr, val_ptr, ko, K, V, inv_t, TARGET)
                ls, p, d = _slot_terms(x_ptr, ok, ic, v, w, m, log_d, lse_w, has_w, inv_t, TARGET, NORMALIZE)
                if GRAD_X:
                    tl.store(gx_ptr + ic, ((c * tl.exp(ls) - p) * f).to(gx_ptr.dtype.element_ty), mask=ok)
                if GRAD_V:
                    if NORMALIZE:
                        if TARGET == PROBS:
                            g = (d - head) * tl.exp(-lse_w).to(tl.float32)  # -inf at v = 0, as the math says
                        elif TARGET == LOGITS:
                            g = tl.where(p > 0, p * (d - head), 0.0) * inv_t
                        else:
                            g = tl.where(p > 0, p * (d - head), 0.0)
                    elif TARGET == PROBS:
                        g = d + 1.0 - t
                    else:
                        g = tl.where(p > 0, p * (d + 1.0 - t), 0.0)
                    tl.store(gv_ptr + ko, tl.where(ok, g, 0.0) * gs, mask=ko < K)
    else:
        tl.store(loss_ptr + row, 0.0)
        _zero_grads(gx_ptr, gx_ptr, V, BLOCK, GRAD_X, False)
        _zero_grads(gv_ptr, gv_ptr, K, BLOCK_K, GRAD_V, False)


@_ops.triton_op("sparse_kl_div_with_logits_fwd")
def sparse_kl_div_with_logits_fwd(input: torch.Tensor, target_indices: torch.Tensor, target_values: torch.Tensor,
                                  mask: torch.Tensor | None, target_type: str, tail: str, temperature: float,
                                  grad_input: bool, grad_target: bool, grad_scale: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, V = rows_of(input), input.shape[-1]
    K = target_indices.shape[1]
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss = torch.empty((N,), device=input.device, dtype=acc)
    gx = input.new_empty((N, V)) if grad_input else input.new_empty((0,))
    gv = torch.empty_like(target_values) if grad_target else target_values.new_empty((0,))
    if N > 0:
        block, warps, _ = row_config(V, input.element_size(), one_block_max=8192)
        block_k = min(triton.next_power_of_2(max(K, 1)), 256 if interpreting() else 1024)
        # Rows of whole 128-byte lines: no two rows' bitmaps share a cache line.
        words = triton.cdiv(triton.cdiv(max(V, 1), 32), 32) * 32
        bits = torch.zeros((N, words), device=input.device, dtype=torch.int32)
        _sparse_kl_fwd_kernel[(N,)](
            input, target_indices, target_values, mask if mask is not None else input, loss, gx, gv,
            grad_scale if grad_scale is not None else loss, bits, V, *row_layout(input), K, words,
            1.0 / temperature,
            TARGET=_TARGET[target_type], NORMALIZE=target_type == "logits" or tail == "renorm",
            HAS_MASK=mask is not None, HAS_GS=grad_scale is not None, GRAD_X=grad_input, GRAD_V=grad_target,
            BLOCK=block, BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=FP_FUSION)
    return loss, gx, gv
