"""The row-softmax kernels' shared row machinery (kl_div_with_logits, divergences, the sparse teacher): target
types, loading a chunk of a student / teacher row pair, online log-sum-exp statistics, the vocab-parallel modes'
statistics, row pointers, masked rows and the ops' outputs. Under TRITON_INTERPRET=1 everything runs on CPU
tensors (CI): no libdevice, loads are upcast at once."""
import torch
import triton
import triton.language as tl

from kl_ext.triton_kernels._config import rows_of

# constexpr: compiled kernels may only read constexpr globals (the interpreter does not check this).
LOGITS, LOG_PROBS, PROBS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_TARGET = {"logits": 0, "log_probs": 1, "probs": 2}
# No FMA contraction: fused, x / T - max(x / T) keeps the unrounded product and is not exactly 0 at the row
# maximum (V = 1, identical rows would get nonzero gradients; seen on an H100). The kernel is memory-bound.
FP_FUSION = False


@triton.jit
def _safe(m):
    # A running max of -inf (nothing finite seen yet) shifts by 0 instead, so exp(x - m) never sees -inf - -inf.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rescale(m_old, m_new):
    return tl.where(m_old == float("-inf"), 0.0, tl.exp(m_old - _safe(m_new)))


@triton.jit
def _online_lse(m, d, z):
    """Online log-sum-exp statistics (running max, sum of exp relative to it) after one more chunk z."""
    m_new = tl.maximum(m, tl.max(z, 0))
    return m_new, d * _rescale(m, m_new) + tl.sum(tl.exp(z - _safe(m_new)), 0)


@triton.jit
def _log1p(u):
    """log1p written so the interpreter runs it (no tl.log1p, no libdevice): u * log(w) / (w - 1) with w = 1 + u
    (exact u where w rounds to 1)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))


@triton.jit
def _lse(m, d):
    """log-sum-exp from online statistics; +inf for a row with no mass (its log-probs are -inf)."""
    return tl.where(d > 0, _safe(m) + tl.log(d), float("inf"))


@triton.jit
def _load_chunk(x_ptr, t_ptr, offs, inb, inv_t, TARGET: tl.constexpr):
    """Student logits / T; teacher log-probs (logits / T for LOGITS) and probs (only for LOG_PROBS / PROBS).
    Lanes past the row hold -inf logits / zero probability, which every formula below treats as absent."""
    zs = tl.load(x_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
    if TARGET == LOGITS:
        lt = tl.load(t_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        p = lt  # unused: teacher probs come from the row statistics
    elif TARGET == LOG_PROBS:
        lt = tl.load(t_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32)
        p = tl.exp(lt)
    else:
        p = tl.load(t_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        lt = tl.log(p)
    return zs, lt, p


@triton.jit
def _put_shard_stats(shard_ptr, row, loss, lse_s, lse_t, s_p, s_q, TARGET: tl.constexpr):
    """Vocab-parallel statistics pass (csrc/common.h, KLCall): the row's loss on this shard alone and the
    natural log-masses of student and teacher (-inf where none)."""
    o = shard_ptr + row * 3
    tl.store(o, loss)
    tl.store(o + 1, tl.where(s_q > 0, lse_s, float("-inf")))
    if TARGET == LOGITS:
        tl.store(o + 2, tl.where(s_p > 0, lse_t, float("-inf")))
    else:
        tl.store(o + 2, tl.log(s_p))


@triton.jit
def _given_stats(given_ptr, row, TARGET: tl.constexpr):
    """Finishing pass: the whole row's (kl, lse_s, lse_t, teacher mass, student mass), as _finish gives them,
    from its log-masses and loss; targets that are not logits are used as given, with their mass."""
    g = given_ptr + row * 4
    l_s = tl.load(g)
    l_t = tl.load(g + 1)
    lse_s = tl.where(l_s > float("-inf"), l_s, float("inf"))
    s_q = tl.where(l_s > float("-inf"), 1.0, 0.0)
    if TARGET == LOGITS:
        lse_t = tl.where(l_t > float("-inf"), l_t, float("inf"))
        s_p = tl.where(l_t > float("-inf"), 1.0, 0.0)
    else:
        lse_t = 0.0
        s_p = tl.exp(l_t)
    return tl.load(g + 2), lse_s, lse_t, s_p, s_q


@triton.jit
def _row_ptr(ptr, row, inner, s0, s1):
    """Where row `row` of a row tensor starts: rows are read in place through int64 strides (csrc/common.h,
    RowLayout)."""
    return ptr + ((row // inner) * s0 + (row % inner) * s1)


@triton.jit
def _row_start(x_ptr, t_ptr, gx_ptr, gt_ptr, mask_ptr, gs_ptr, V, xi, xs0, xs1, ti, ts0, ts1,
               HAS_MASK: tl.constexpr, HAS_GS: tl.constexpr):
    """This program's row: its pointers (int64 offsets; gradients contiguous), whether it counts (mask), and
    grad_scale."""
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    live = True
    if HAS_MASK:
        live = tl.load(mask_ptr + row) != 0
    gs = 1.0
    if HAS_GS:
        gs = tl.load(gs_ptr).to(tl.float32)  # the reduction's 1 / denominator
    return (row, _row_ptr(x_ptr, row, xi, xs0, xs1), _row_ptr(t_ptr, row, ti, ts0, ts1), gx_ptr + base,
            gt_ptr + base, live, gs)


@triton.jit
def _zero_grads(gx_ptr, gt_ptr, V, BLOCK: tl.constexpr, GRAD_X: tl.constexpr, GRAD_T: tl.constexpr):
    """A masked row's gradients: 0."""
    if GRAD_X or GRAD_T:
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            offs = start + cols
            inb = offs < V
            if GRAD_X:
                tl.store(gx_ptr + offs, tl.zeros([BLOCK], dtype=gx_ptr.dtype.element_ty), mask=inb)
            if GRAD_T:
                tl.store(gt_ptr + offs, tl.zeros([BLOCK], dtype=gt_ptr.dtype.element_ty), mask=inb)


def row_outputs(input, target, grad_input, grad_target, row_stats):
    """The row-softmax ops' outputs: (per-row loss, vocab-parallel output, mode, gradients); the mode is 0 without
    row_stats, 1 for its statistics pass and 2 for its finishing pass (csrc/common.h, KLCall)."""
    N = rows_of(input)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss = torch.empty((N,), device=input.device, dtype=acc)
    vp = 0 if row_stats is None else 1 if row_stats.shape[1] == 0 else 2
    torch._check(vp != 1 or not (grad_input or grad_target),
                 lambda: "kl_ext: the statistics pass (row_stats of 0 columns) computes no gradients")
    shard = torch.zeros((N, 3 if vp == 1 else 2), device=input.device, dtype=acc) if vp else loss
    gx = input.new_empty((N, input.shape[-1])) if grad_input else input.new_empty((0,))
    gt = target.new_empty((N, target.shape[-1])) if grad_target else target.new_empty((0,))
    return loss, shard, vp, gx, gt
