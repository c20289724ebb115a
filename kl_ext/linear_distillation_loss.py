"""linear_distillation_loss: the distillation loss fused with the LM head, never holding the (rows x vocab)
logits: autograd Function, functional, Module.

Rows are processed in chunks: per chunk, the student's logits z = softcap(logit_scale * (x @ W.T + b)) (and the
teacher's, from its hidden states, when given that way) are made by torch GEMMs; the fused kernel ops of
kl_div_with_logits / jsd_with_logits / sparse_kl_div_with_logits give the chunk's loss and the gradient w.r.t. z
in one read; the gradient goes back through softcap and scale, and the GEMMs give the chunk's input gradient
and its share of the weight and bias gradients (accumulated in float32, chunk after chunk: the same result on
every run). Peak extra memory: a few (chunk x V) tensors. The hard loss (labels) is the cross-entropy of z,
computed by the sparse-teacher op as a one-hot teacher (k = 1, log-prob 0).

For reduction "batchmean" / "sum" the forward computes the gradients too (the inputs are not kept); backward
scales them by grad_output. For "none" the forward keeps its inputs and backward runs the chunks again with
each row's grad_output.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from kl_ext import reference
from kl_ext._backends import op, resolve
from kl_ext._fused import kernel_backward
from kl_ext._registry import Bound, bind
from kl_ext._validation import acc_dtype, check_linear_distillation

__all__ = ["linear_distillation_loss", "LinearDistillationFunction", "LinearDistillationLoss", "default_chunk_size"]


def default_chunk_size(rows: int, hidden: int, vocab: int, cuda: bool = False) -> int:
    """Rows per chunk when chunk_size is None, at most all rows.

    CPU: a chunk's logits about as large as the input's hidden states, rows / ceil(V / H) rounded down to a power
    of two (Liger's rule), but at least 256 rows (shorter chunks are slower: per-chunk overheads). CUDA: chunks of
    about 2^28 logits (512 MiB in bf16; 2048 rows at V = 128256), rounded down to a power of two, at least 256 rows:
    each chunk reads and writes the fp32 weight-gradient accumulator (8·V·H bytes) and runs GEMMs of 8·rows·V·H
    flops, so on an H100 (~700 TFLOP/s, ~3 TB/s) short chunks are bound by the accumulator's traffic (the
    measurements: BENCHMARKS.md).
    """
    if cuda:
        want = (1 << 28) // max(vocab, 1)
    else:
        want = math.ceil(rows / max(1, math.ceil(vocab / max(hidden, 1))))
    return max(1, min(rows, max(256, 1 << max(0, want.bit_length() - 1))))


# aten's out_dtype overloads (16-bit GEMMs written in fp32 by cuBLAS): CUDA only.
_OUT_DTYPE_MM = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype_out")


def _accumulate_mm(acc, a, b, dtype):
    """acc + a @ b in `dtype` (acc None: a @ b). 16-bit products into fp32 straight from cuBLAS where it can (no
    16-bit (V x H) temporary per chunk, no separate add)."""
    if a.dtype == dtype:
        return a @ b if acc is None else acc.addmm_(a, b)
    if a.is_cuda and _OUT_DTYPE_MM:
        return torch.ops.aten.mm.dtype(a, b, dtype) if acc is None else \
            torch.ops.aten.addmm.dtype_out(acc, a, b, dtype, out=acc)
    return (a @ b).to(dtype) if acc is None else acc.add_(a @ b)


@dataclasses.dataclass(frozen=True)
class _Spec:
    backend: str
    form: str  # "hidden" (teacher hidden states + weight), "dense" (teacher rows over V), "sparse" (top-k)
    target_type: str
    divergence: Bound
    tail: str
    temperature: float
    logit_scale: float
    softcap: Optional[float]
    hard_weight: float
    soft_weight: float
    has_labels: bool
    reduction: str
    chunk: int
    group: object = None  # vocab-parallel (kl_ext.distributed): the weight, teacher and labels are this rank's shard


def _logits(x, w, b, spec):
    """softcap(logit_scale * (x @ w.T + b)) in x's dtype, and d z / d raw (None when it is the constant scale)."""
    raw = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
    if spec.softcap is None:
        return (raw * spec.logit_scale if spec.logit_scale != 1.0 else raw), None
    t = torch.tanh(raw.to(acc_dtype(x.dtype)) * (spec.logit_scale / spec.softcap))
    return (t * spec.softcap).to(x.dtype), (1 - t * t) * spec.logit_scale


def _soft_op(spec, z, teacher, idx, live, grad, gs):
    """The chunk's soft loss per row and its gradient w.r.t. z (times gs), from the fused kernels."""
    be = spec.backend
    if spec.form == "sparse":
        return op(be, "sparse_kl_div_with_logits_fwd")(z, idx, teacher, live, spec.target_type, spec.tail,
                                                        spec.temperature, grad, False, gs)[:2]
    name, options = spec.divergence.op(spec.temperature)
    tt = "logits" if spec.form == "hidden" else spec.target_type
    if spec.group is not None:  # the whole rows' loss from this rank's shard (O(chunk) all-reduces)
        from kl_ext.distributed import shard_rows_loss
        return shard_rows_loss(op(be, name), z, teacher, live, tt, options, spec.divergence, spec.group, grad, gs)
    return op(be, name)(z, teacher, live, tt, *options, grad, False, gs)[:2]


def _hard_op(spec, z, labels, live, grad, gs):
    """The chunk's cross-entropy per row and its gradient w.r.t. z (times gs): the sparse-teacher op with a
    one-hot teacher (labels -1: none), or over vocabulary shards (labels relative to this rank's first class)."""
    if spec.group is not None:
        from kl_ext.distributed import shard_cross_entropy
        return shard_cross_entropy(z, labels, live, spec.group, grad, gs)
    one_hot = labels.unsqueeze(-1)
    return op(spec.backend, "sparse_kl_div_with_logits_fwd")(
        z, one_hot, torch.zeros(one_hot.shape, dtype=gs.dtype, device=z.device), live, "log_probs", "bucket", 1.0,
        grad, False, gs)[:2]


def _run_chunks(spec, x, w, b, teacher, t_w, t_b, idx, labels, live, grad_scale, row_scale, want_grads):
    """Loss per row (acc dtype) and, when want_grads, the gradients w.r.t. x, w, b. grad_scale: a device scalar
    multiplying every gradient (the reduction's 1 / denominator); row_scale: per-row factors (reduction "none")."""
    N = x.shape[0]
    acc = acc_dtype(x.dtype)
    loss = torch.zeros(N, dtype=acc, device=x.device)
    gx = torch.empty_like(x) if want_grads else None
    # The weight gradient: one chunk's GEMM in the weight's dtype (fp32 inside cuBLAS / MKL); over several
    # chunks, accumulated in fp32 from the first chunk's GEMM on.
    gw, gw_dtype = None, (w.dtype if spec.chunk >= N else acc)
    gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if want_grads and b is not None else None
    scales = {}
    for name, weight in (("soft", spec.soft_weight), ("hard", spec.hard_weight)):
        if grad_scale is None:
            scales[name] = torch.full((), weight, dtype=acc, device=x.device)
        else:
            scales[name] = grad_scale * weight
    for s in range(0, N, spec.chunk):
        e = min(N, s + spec.chunk)
        xc = x[s:e]
        z, dz_draw = _logits(xc, w, b, spec)
        lc = live[s:e] if live is not None else None
        dz = None
        if spec.soft_weight != 0:
            if spec.form == "hidden":
                t, _ = _logits(teacher[s:e], t_w, t_b, spec)
            else:
                t = teacher[s:e]
            ls, dz = _soft_op(spec, z, t, idx[s:e] if idx is not None else None, lc, want_grads, scales["soft"])
            loss[s:e] += spec.soft_weight * ls
        if spec.has_labels and spec.hard_weight != 0:
            lh, dh = _hard_op(spec, z, labels[s:e], lc, want_grads, scales["hard"])
            loss[s:e] += spec.hard_weight * lh
            dz = dh if dz is None else dz + dh
        if not want_grads:
            continue
        if dz is None:
            dz = torch.zeros_like(z)
        g = dz.to(acc) if dz_draw is not None or row_scale is not None or spec.logit_scale != 1.0 else dz
        if row_scale is not None:
            g = g * row_scale[s:e].unsqueeze(-1)
        if dz_draw is not None:
            g = g * dz_draw
        elif spec.logit_scale != 1.0:
            g = g * spec.logit_scale
        g = g.to(x.dtype)
        if spec.group is None:
            torch.mm(g, w, out=gx[s:e])
        elif gx.dtype == acc:  # each rank's shard of the vocabulary gives a part of the input gradient
            dist.all_reduce(torch.mm(g, w, out=gx[s:e]), group=spec.group)
        else:  # 16-bit: the parts summed in fp32, rounded once
            part = _accumulate_mm(None, g, w, acc)
            dist.all_reduce(part, group=spec.group)
            gx[s:e] = part
        gw = _accumulate_mm(gw, g.t(), xc, gw_dtype)
        if gb is not None:
            gb += g.sum(0, dtype=acc)
    if want_grads and gw is None:  # no rows
        gw = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
    return loss, gx, gw, gb


class LinearDistillationFunction(torch.autograd.Function):
    """The chunked, fused LM-head distillation loss; see linear_distillation_loss. Tensors: input rows (N, H),
    weight (V, H), bias, teacher rows, teacher weight and bias, indices, labels (-1: none), live rows."""

    @staticmethod
    def forward(ctx, x, w, b, teacher, t_w, t_b, idx, labels, live, spec):
        want = spec.reduction != "none" and any(ctx.needs_input_grad[:3])
        grad_scale = None
        if spec.reduction == "batchmean":
            counted = live.sum() if live is not None else torch.tensor(x.shape[0], device=x.device)
            grad_scale = counted.clamp(min=1).to(acc_dtype(x.dtype)).reciprocal()
        loss, gx, gw, gb = _run_chunks(spec, x, w, b, teacher, t_w, t_b, idx, labels, live, grad_scale, None, want)
        ctx.spec, ctx.dtypes = spec, (w.dtype, b.dtype if b is not None else None)
        if spec.reduction == "none":
            ctx.save_for_backward(x, w, b, teacher, t_w, t_b, idx, labels, live)
            return loss
        # Kept in fp32 until backward: scaling by grad_output and rounding to the weights' dtype are one pass.
        ctx.save_for_backward(gx, gw, gb)
        return loss.sum() if grad_scale is None else loss.sum() * grad_scale

    @staticmethod
    @kernel_backward
    def backward(ctx, grad_out):
        spec = ctx.spec
        if spec.reduction == "none":
            x, w, b, teacher, t_w, t_b, idx, labels, live = ctx.saved_tensors
            _, gx, gw, gb = _run_chunks(spec, x, w, b, teacher, t_w, t_b, idx, labels, live, None,
                                        grad_out.to(acc_dtype(x.dtype)), True)
            gw = gw.to(w.dtype)
            gb = gb.to(b.dtype) if gb is not None else None
        else:
            gx, gw, gb = ctx.saved_tensors
            gx, gw, gb = (None if g is None else torch.mul(g, grad_out.to(g.dtype), out=torch.empty_like(g, dtype=d))
                          for g, d in zip((gx, gw, gb), (gx.dtype, *ctx.dtypes)))
        wanted = ctx.needs_input_grad
        return (gx if wanted[0] else None, gw if wanted[1] else None, gb if wanted[2] else None,
                None, None, None, None, None, None, None)


def linear_distillation_loss(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                             linear_bias: Optional[torch.Tensor] = None,
                             target_linear_weight: Optional[torch.Tensor] = None,
                             target_linear_bias: Optional[torch.Tensor] = None,
                             target_indices: Optional[torch.Tensor] = None, target_type: str = "logits",
                             divergence: str = "kl", alpha: Optional[float] = None,
                             beta: Optional[float] = None, tail: str = "bucket",
                             temperature: float = 1.0, logit_scale: float = 1.0, softcap: Optional[float] = None,
                             labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
                             hard_weight: float = 0.0, soft_weight: float = 1.0, mask: Optional[torch.Tensor] = None,
                             reduction: str = "batchmean", chunk_size: Optional[int] = None,
                             backend: str = "auto") -> torch.Tensor:
    """Distillation loss from the student's last hidden states and LM head, never materializing all logits.

    Student logits z = softcap(logit_scale * (input @ linear_weight.T + linear_bias)), softcap(x) = c tanh(x / c)
    when softcap=c. Teacher, one of: hidden states `target` (..., H_t) with `target_linear_weight` (V, H_t)
    (+ bias; same logit_scale and softcap); dense `target` (..., V) of target_type "logits" / "log_probs" /
    "probs"; or sparse: `target_indices` (..., k) with their values in `target` (see sparse_kl_div_with_logits).
    Soft loss at temperature T: any divergence of the row losses by name, with its parameter: "kl" =
    KL(teacher || student), "reverse_kl", "jsd" (beta, default 0.5), "tvd", "skew_kl" and "skew_reverse_kl" (alpha,
    default 0.1), as kl_div_with_logits / jsd_with_logits / tvd_with_logits / skew_kl_div_with_logits define them;
    a sparse teacher: "kl" (or a parameter where the divergence is the KL, e.g. jsd at beta 0) only. Hard loss
    (labels (...) int64): cross-entropy of z at T = 1; rows whose label is ignore_index, or whose mask is False,
    count for nothing. Row loss = soft_weight * soft + hard_weight * hard; reduction "batchmean" (sum / rows
    counted), "sum" or "none". Gradients w.r.t. input, linear_weight and linear_bias; the teacher is constant.
    chunk_size: rows per chunk (None: default_chunk_size). backend: the loss kernels' ("torch": the unfused
    reference with materialized logits); the GEMMs are torch's.

    >>> import torch, kl_ext
    >>> g = torch.Generator().manual_seed(0)
    >>> hidden, head = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(100, 8, generator=g)
    >>> t_hidden, t_head = torch.randn(4, 16, generator=g), torch.randn(100, 16, generator=g)
    >>> loss = kl_ext.linear_distillation_loss(hidden, head, t_hidden, target_linear_weight=t_head,
    ...                                        temperature=2.0, chunk_size=2)
    >>> dense = kl_ext.kl_div_with_logits(hidden @ head.T, t_hidden @ t_head.T, temperature=2.0)
    >>> bool(torch.isclose(loss, dense, rtol=1e-5))
    True
    >>> loss.backward(); hidden.grad.shape
    torch.Size([4, 8])
    """
    form = "hidden" if target_linear_weight is not None else "sparse" if target_indices is not None else "dense"
    div = bind(divergence, alpha=alpha, beta=beta)
    check_linear_distillation(input, linear_weight, target, linear_bias, target_linear_weight, target_linear_bias,
                              target_indices, form, target_type, div, tail, temperature, logit_scale,
                              softcap, labels, hard_weight, soft_weight, mask, reduction, chunk_size)
    be = resolve(backend, input.device)
    if be == "torch":
        return reference.linear_distillation_loss(
            input, linear_weight, target, linear_bias=linear_bias, target_linear_weight=target_linear_weight,
            target_linear_bias=target_linear_bias, target_indices=target_indices, target_type=target_type,
            divergence=divergence, alpha=alpha, beta=beta, tail=tail, temperature=temperature,
            logit_scale=logit_scale, softcap=softcap, labels=labels, ignore_index=ignore_index,
            hard_weight=hard_weight, soft_weight=soft_weight, mask=mask, reduction=reduction)
    return _fused(input, linear_weight, target, linear_bias, target_linear_weight, target_linear_bias, target_indices,
                  form, target_type, div, tail, temperature, logit_scale, softcap, labels, ignore_index,
                  hard_weight, soft_weight, mask, reduction, chunk_size, be)


def _fused(input, linear_weight, target, linear_bias, target_linear_weight, target_linear_bias, target_indices, form,
           target_type, divergence, tail, temperature, logit_scale, softcap, labels, ignore_index, hard_weight,
           soft_weight, mask, reduction, chunk_size, be, group=None, label_offset=None):
    """The kernel backends' loss, on validated arguments (divergence: a _registry.Bound). group: vocab-parallel
    (kl_ext.distributed), the weights
    and a dense teacher this rank's shard, its classes starting at label_offset (a device scalar)."""
    lead = input.shape[:-1]
    rows = math.prod(lead)
    V = linear_weight.shape[0]
    chunk = chunk_size or default_chunk_size(rows, input.shape[-1], V, cuda=input.is_cuda)
    live = mask.reshape(-1) if mask is not None else None
    lab = None
    if labels is not None:
        lab = labels.reshape(-1)
        keep = lab != ignore_index
        live = keep if live is None else live & keep
        lab = torch.where(keep, lab, torch.full_like(lab, -1))
        if label_offset is not None:
            lab = lab - label_offset  # this rank's classes: [0, V_r); ignored rows stay negative
    spec = _Spec(be, form, target_type, divergence, tail,
                 float(temperature), float(logit_scale), None if softcap is None else float(softcap),
                 float(hard_weight), float(soft_weight), labels is not None, reduction, int(chunk), group)
    x = input.reshape(rows, input.shape[-1])
    t = target.reshape(rows, target.shape[-1])
    idx = target_indices.reshape(rows, target_indices.shape[-1]) if target_indices is not None else None
    if form == "sparse":
        t, idx = t.to(acc_dtype(input.dtype)).contiguous(), idx.to(torch.int64).contiguous()
    elif form == "dense":
        t = t.to(input.dtype).contiguous()
    # The teacher is constant: detached, so a tensor passed both as the student's and the teacher's (a shared
    # bias) is two inputs of the Function, which torch.compile requires.
    t_w, t_b = (None if v is None else v.detach() for v in (target_linear_weight, target_linear_bias))
    out = LinearDistillationFunction.apply(x, linear_weight, linear_bias, t.detach(), t_w, t_b, idx, lab, live, spec)
    return out.reshape(lead) if reduction == "none" else out


class LinearDistillationLoss(nn.Module):
    """Module form of kl_ext.linear_distillation_loss: settings in __init__, tensors in forward.

    >>> import torch, kl_ext
    >>> loss = kl_ext.LinearDistillationLoss(divergence="jsd", beta=0.5)
    >>> x, w = torch.randn(4, 8), torch.randn(30, 8)
    >>> float(loss(x, w, x @ w.T))    # the teacher's logits equal the student's
    0.0
    """

    def __init__(self, *, target_type: str = "logits", divergence: str = "kl", alpha: Optional[float] = None,
                 beta: Optional[float] = None, tail: str = "bucket", temperature: float = 1.0, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, ignore_index: int = -100, hard_weight: float = 0.0,
                 soft_weight: float = 1.0, reduction: str = "batchmean", chunk_size: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        self.settings = dict(target_type=target_type, divergence=divergence, alpha=alpha, beta=beta, tail=tail,
                             temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                             ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                             reduction=reduction, chunk_size=chunk_size, backend=backend)

    def forward(self, input, linear_weight, target, linear_bias=None, target_linear_weight=None,
                target_linear_bias=None, target_indices=None, labels=None, mask=None):
        return linear_distillation_loss(input, linear_weight, target, linear_bias=linear_bias,
                                        target_linear_weight=target_linear_weight,
                                        target_linear_bias=target_linear_bias, target_indices=target_indices,
                                        labels=labels, mask=mask, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
