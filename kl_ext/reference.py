"""The pure-PyTorch reference: the "torch" backend, and the one oracle for tests and benchmarks.

Written for clarity and for the edge-case conventions of the contract (README, "Semantics"), not for speed.
It computes in float32, or float64 when the input is float64, and differentiates through torch autograd
(so it supports double backward). Inputs are assumed validated (kl_ext._validation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from kl_ext._validation import acc_dtype

__all__ = ["kl_div_with_logits", "jsd_with_logits", "tvd_with_logits", "skew_kl_div_with_logits",
           "sparse_kl_div_with_logits", "linear_distillation_loss",
           "bernoulli_kl_div_with_logits",
           "binary_cross_entropy_with_logits", "safe_log_softmax"]


def safe_log_softmax(z: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, except that a row that is entirely -inf gives -inf log-probs (probs 0)
    instead of NaN, with zero gradient."""
    dead = torch.isneginf(z).all(dim=-1, keepdim=True)
    ls = F.log_softmax(torch.where(dead, torch.zeros_like(z), z), dim=-1)
    return torch.where(dead, torch.full_like(ls, float("-inf")), ls)


class _XLogX(torch.autograd.Function):
    """x log x, 0 at x = 0, with the one-sided derivative log x + 1 (-inf at x = 0: a probability target's
    gradient there, as every kernel backend gives it; README "Semantics"). A zero upstream gradient gives 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        live = x > 0
        return torch.where(live, x * torch.log(torch.where(live, x, torch.ones_like(x))), torch.zeros_like(x))

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return torch.where(g == 0, torch.zeros_like(g), g * (torch.log(x) + 1))


class _LogProb(torch.autograd.Function):
    """log p of a probability target, -inf at p = 0, with derivative 1 / p, where a zero upstream gradient (a
    masked-out 0 log 0 term) gives 0 rather than 0 / 0."""

    @staticmethod
    def forward(ctx, p):
        ctx.save_for_backward(p)
        return torch.log(p)

    @staticmethod
    def backward(ctx, g):
        p, = ctx.saved_tensors
        return torch.where(g == 0, torch.zeros_like(g), g / p)


def _p_log_ratio(p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """p (log p - b) for a probability target p, 0 log 0 = 0, d/dp = log p + 1 - b (-inf at p = 0)."""
    live = p > 0
    return _XLogX.apply(p) - torch.where(live, p * torch.where(live, b, torch.zeros_like(b)), torch.zeros_like(p))


def _weighted_log_ratio(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w * (a - b) where w > 0, exactly 0 where w == 0 (0 log 0 = 0), with NaN-free gradients there."""
    live = w > 0
    zero = torch.zeros_like(a)
    return torch.where(live, w * (torch.where(live, a, zero) - torch.where(live, b, zero)), zero)


def _reduce(per_row: torch.Tensor, reduction: str, counted, per_row_elems: int) -> torch.Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    denom = counted * per_row_elems if reduction == "mean" else counted
    # Nothing counted (empty batch, all rows masked): the loss is 0, never 0/0.
    return total / torch.clamp(torch.as_tensor(denom, device=total.device, dtype=total.dtype), min=1)


def _log_probs(input, target, target_type, temperature, mask):
    """(ls, lt, p): the student's log-probs, the teacher's log-probs and probs, per the contract."""
    acc = acc_dtype(input.dtype)
    z = input.to(acc) / temperature
    t = target.to(acc)
    if mask is not None:
        # Masked rows may hold anything (padding); keep their arithmetic finite so their zero gradient is exact.
        keep = mask.unsqueeze(-1)
        z = torch.where(keep, z, torch.zeros_like(z))
        t = torch.where(keep, t, torch.zeros_like(t) if target_type == "probs" else torch.full_like(t, -1.0))
    ls = safe_log_softmax(z)
    if target_type == "logits":
        lt = safe_log_softmax(t / temperature)
        p = lt.exp()
    elif target_type == "log_probs":
        lt, p = t, t.exp()
    else:
        p = t
        lt = _LogProb.apply(p)
    return ls, lt, p


def _finish_rows(row, reduction, mask, V):
    if mask is not None:
        row = torch.where(mask, row, torch.zeros_like(row))
    counted = mask.sum() if mask is not None else row.numel()
    return _reduce(row, reduction, counted, V)


def kl_div_with_logits(input: torch.Tensor, target: torch.Tensor, *, target_type: str = "logits",
                       temperature: float = 1.0, direction: str = "forward", reduction: str = "batchmean",
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    ls, lt, p = _log_probs(input, target, target_type, temperature, mask)
    if direction == "forward":
        row = (_p_log_ratio(p, ls) if target_type == "probs" else _weighted_log_ratio(p, lt, ls)).sum(-1)
    else:
        row = _weighted_log_ratio(ls.exp(), ls, lt).sum(-1)
    return _finish_rows(row, reduction, mask, input.shape[-1])


def jsd_with_logits(input: torch.Tensor, target: torch.Tensor, *, beta: float = 0.5, target_type: str = "logits",
                    temperature: float = 1.0, reduction: str = "batchmean",
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Generalized JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; beta = 0 and 1 are
    the forward and reverse KL."""
    if beta in (0, 1):
        return kl_div_with_logits(input, target, target_type=target_type, temperature=temperature,
                                  direction="forward" if beta == 0 else "reverse", reduction=reduction, mask=mask)
    ls, lt, p = _log_probs(input, target, target_type, temperature, mask)
    q = ls.exp()
    lm = _log_mixture(ls, lt, q, p, beta, target_type)
    kl_pm = _p_log_ratio(p, lm) if target_type == "probs" else _weighted_log_ratio(p, lt, lm)
    row = (beta * kl_pm + (1 - beta) * _weighted_log_ratio(q, ls, lm)).sum(-1)
    return _finish_rows(row, reduction, mask, input.shape[-1])


def _log_mixture(ls, lt, q, p, w, target_type):
    """log(w p + (1 - w) q) = logaddexp(log w + lt, log(1 - w) + ls), taken only where p or q > 0: where both
    are 0 the entry contributes 0 and no gradient (logaddexp(-inf, -inf) would give NaN gradients). A teacher given
    as probabilities is mixed as they are: the gradient w.r.t. p is then w / m where p = 0 too (the one-sided
    derivative; through log p it would be 0 * inf)."""
    live = (p > 0) | (q > 0)
    zero = torch.zeros_like(ls)
    if target_type == "probs":
        m = w * p + (1 - w) * q
        return torch.log(torch.where(live, m, torch.ones_like(m)))
    return torch.logaddexp(torch.where(live, lt, zero) + math.log(w), torch.where(live, ls, zero) + math.log1p(-w))


def tvd_with_logits(input: torch.Tensor, target: torch.Tensor, *, target_type: str = "logits",
                    temperature: float = 1.0, reduction: str = "batchmean",
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Total variation distance 1/2 sum |p - q| (|.|'s gradient: sign, 0 at ties)."""
    ls, _, p = _log_probs(input, target, target_type, temperature, mask)
    row = 0.5 * (p - ls.exp()).abs().sum(-1)
    return _finish_rows(row, reduction, mask, input.shape[-1])


def skew_kl_div_with_logits(input: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.1,
                            direction: str = "forward", target_type: str = "logits", temperature: float = 1.0,
                            reduction: str = "batchmean", mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Skew KL: forward KL(p || alpha p + (1 - alpha) q), reverse KL(q || alpha q + (1 - alpha) p); alpha = 0 is
    kl_div_with_logits in that direction."""
    if alpha == 0:
        return kl_div_with_logits(input, target, target_type=target_type, temperature=temperature,
                                  direction=direction, reduction=reduction, mask=mask)
    ls, lt, p = _log_probs(input, target, target_type, temperature, mask)
    q = ls.exp()
    if direction == "forward":
        lm = _log_mixture(ls, lt, q, p, alpha, target_type)
        row = _p_log_ratio(p, lm) if target_type == "probs" else _weighted_log_ratio(p, lt, lm)
    else:
        row = _weighted_log_ratio(q, ls, _log_mixture(ls, lt, q, p, 1 - alpha, target_type))
    return _finish_rows(row.sum(-1), reduction, mask, input.shape[-1])


def _masked_logsumexp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of the kept entries: -inf (and a zero gradient) where none has mass."""
    x = torch.where(keep, x, torch.full_like(x, float("-inf")))
    live = ~torch.isneginf(x).all(-1, keepdim=True)
    out = torch.logsumexp(torch.where(live, x, torch.zeros_like(x)), -1, keepdim=True)
    return torch.where(live, out, torch.full_like(out, float("-inf"))).squeeze(-1)


def sparse_kl_div_with_logits(input: torch.Tensor, target_indices: torch.Tensor, target_values: torch.Tensor, *,
                              target_type: str = "log_probs", tail: str = "bucket", temperature: float = 1.0,
                              reduction: str = "batchmean", mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher || student) with the teacher on k entries per row (index -1: an empty slot). Normalized teacher
    (target_type "logits" or tail "renorm"): p = softmax of its log-weights over the support. "bucket": the given
    probs, plus the tail bucket p_tail = max(1 - sum p, 0) against the student's mass outside the support."""
    acc = acc_dtype(input.dtype)
    V = input.shape[-1]
    z = input.to(acc) / temperature
    v = target_values.to(acc)
    valid = target_indices >= 0
    if mask is not None:
        keep = mask.unsqueeze(-1)
        z = torch.where(keep, z, torch.zeros_like(z))
        valid = valid & keep
    idx = torch.where(valid, target_indices, torch.zeros_like(target_indices)).long()
    ls = safe_log_softmax(z)
    ls_s = ls.gather(-1, idx)
    # The teacher's log-weights in float64: the tail bucket 1 - sum p is a difference near 1 - 1 (k per row).
    v64 = target_values.double()
    if target_type == "logits":
        w = v64 / temperature
    elif target_type == "log_probs":
        w = v64
    else:
        w = _LogProb.apply(torch.where(valid, v64, torch.ones_like(v64)))
    lse_w = _masked_logsumexp(w, valid)
    ninf = torch.full_like(w, float("-inf"))
    if target_type == "logits" or tail == "renorm":
        has = torch.isfinite(lse_w).unsqueeze(-1)
        lp = torch.where(valid & has, (w - torch.where(has, lse_w.unsqueeze(-1), torch.zeros_like(w))).to(acc), ninf)
        p = lp.exp()
        p_tail = torch.zeros_like(lse_w, dtype=acc)
    else:
        lp = torch.where(valid, w.to(acc), ninf)
        p = torch.where(valid, v if target_type == "probs" else v.exp(), torch.zeros_like(v))
        full = valid.sum(-1) == V
        p_tail = torch.where(full, torch.zeros_like(lse_w), torch.clamp(-torch.expm1(lse_w), min=0)).to(acc)
    if target_type == "probs":  # through p log p, so that a zero probability's gradient is -inf (README)
        if tail == "renorm":  # sum p^ (log p^ - ls) with p^ = p / P is (sum p (log p - ls)) / P - log P
            raw = torch.where(valid, v, torch.zeros_like(v))
            head, mass = _p_log_ratio(raw, ls_s).sum(-1), raw.sum(-1)
            live = mass > 0
            safe = torch.where(live, mass, torch.ones_like(mass))
            head = torch.where(live, head / safe - torch.log(safe), torch.zeros_like(head))
        else:
            head = _p_log_ratio(p, ls_s).sum(-1)
    else:
        head = _weighted_log_ratio(p, lp, ls_s).sum(-1)
    member = torch.zeros_like(ls).scatter_add(-1, idx, valid.to(ls.dtype)) > 0  # (empty slots add 0 at 0)
    log_qt = _masked_logsumexp(ls, ~member)
    row = head + _weighted_log_ratio(p_tail, torch.log(torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail))),
                                     log_qt)
    return _finish_rows(row, reduction, mask, V)


def linear_distillation_loss(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                             linear_bias=None, target_linear_weight=None, target_linear_bias=None,
                             target_indices=None, target_type: str = "logits", divergence: str = "kl",
                             alpha: Optional[float] = None, beta: Optional[float] = None, tail: str = "bucket",
                             temperature: float = 1.0,
                             logit_scale: float = 1.0, softcap=None, labels=None, ignore_index: int = -100,
                             hard_weight: float = 0.0, soft_weight: float = 1.0, mask=None,
                             reduction: str = "batchmean") -> torch.Tensor:
    """The unfused definition of kl_ext.linear_distillation_loss: every row's logits materialized, then the
    losses above (float32 / float64) and autograd."""
    acc = acc_dtype(input.dtype)

    def logits(x, w, b):
        raw = (x @ w.t() + (b if b is not None else 0)).to(acc) * logit_scale
        return raw if softcap is None else softcap * torch.tanh(raw / softcap)

    live = mask
    if labels is not None:
        keep = labels != ignore_index
        live = keep if live is None else live & keep
    z = logits(input, linear_weight, linear_bias)
    row = torch.zeros(z.shape[:-1], dtype=acc, device=z.device)
    if soft_weight != 0:
        kw = dict(temperature=temperature, reduction="none", mask=live)
        if target_indices is not None:
            soft = sparse_kl_div_with_logits(z, target_indices, target, target_type=target_type, tail=tail, **kw)
        else:
            hidden = target_linear_weight is not None
            t = logits(target, target_linear_weight, target_linear_bias) if hidden else target.to(acc)
            from kl_ext._registry import bind  # (the registry names this module's functions)
            soft = bind(divergence, alpha=alpha, beta=beta).reference()(
                z, t, target_type="logits" if hidden else target_type, **kw)
        row = row + soft_weight * soft
    if labels is not None and hard_weight != 0:
        hard = -torch.log_softmax(z, -1).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
        row = row + hard_weight * torch.where(keep, hard, torch.zeros_like(hard))
    return _finish_rows(row, reduction, live, z.shape[-1])


def bernoulli_kl_div_with_logits(input: torch.Tensor, target: torch.Tensor, *, target_type: str = "probs",
                                 temperature: float = 1.0, weight: Optional[torch.Tensor] = None,
                                 reduction: str = "batchmean") -> torch.Tensor:
    acc = acc_dtype(input.dtype)
    z = input.to(acc) / temperature
    if target_type == "logits":
        u = target.to(acc) / temperature
        p = torch.sigmoid(u)
        elem = (1 - p) * (z - u) + F.softplus(-z) - F.softplus(-u)
    else:
        p = target.to(acc)
        elem = (1 - p) * z + F.softplus(-z) + _XLogX.apply(p) + _XLogX.apply(1 - p)
    if weight is not None:
        elem = elem * weight.to(acc)
    if reduction == "none":
        return elem
    C = input.shape[-1] if input.dim() > 0 else 1
    rows = input.numel() // C if C > 0 else 0
    if reduction == "sum":
        return elem.sum()
    if reduction == "mean":
        return _reduce(elem.reshape(-1), "mean", input.numel(), 1)
    return _reduce(elem.reshape(-1), "batchmean", rows, 1)


def binary_cross_entropy_with_logits(input: torch.Tensor, target: torch.Tensor, weight=None,
                                     reduction: str = "mean", pos_weight=None) -> torch.Tensor:
    """torch's own op: the definition the BCE drop-in must reproduce."""
    return F.binary_cross_entropy_with_logits(input, target, weight=weight, reduction=reduction,
                                              pos_weight=pos_weight)
