"""Functional API and the autograd Functions over the registered ops.

Training-step design: when a gradient is wanted, the forward op computes it together with the loss (the
inputs are read once), unscaled; backward only multiplies it by grad_output / denominator with the
`scale_grad` op, the scale living on the device (no host sync). The backward is once_differentiable: use
backend="torch" (the reference) for double backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from kl_ext import reference
from kl_ext._backends import op, resolve
from kl_ext._validation import (acc_dtype, check_bce, check_bernoulli, check_kl, needs_grad,
                                validate_bernoulli_values, validate_kl_values)

__all__ = ["kl_div_with_logits", "bernoulli_kl_div_with_logits", "binary_cross_entropy_with_logits",
           "KLDivWithLogitsFunction", "BernoulliKLDivWithLogitsFunction", "BCEWithLogitsFunction"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> contiguous (rows, V); works for V == 0 and empty leading dims."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def _factor(f: Optional[torch.Tensor], input: torch.Tensor) -> Optional[torch.Tensor]:
    """A weight broadcast against input -> per-class (C,) or per-element (rows*C,) tensor in acc dtype."""
    if f is None:
        return None
    C = input.shape[-1]
    f = f.detach().to(acc_dtype(input.dtype))
    if all(s == 1 for s in f.shape[:-1]) and (f.dim() == 0 or f.shape[-1] in (1, C)):
        return f.reshape(-1).expand(C).contiguous()
    return f.expand(input.shape).reshape(-1).contiguous()


def _scale(grad_out: torch.Tensor, denom, acc: torch.dtype) -> torch.Tensor:
    """grad_output / denominator as the contiguous scale tensor scale_grad takes."""
    s = grad_out.to(acc)
    if denom is not None:
        s = s / denom
    return s.reshape(-1).contiguous()


def _reduce(total: torch.Tensor, reduction: str, counted) -> tuple[torch.Tensor, object]:
    """Reduce a loss sum; returns it and the denominator backward divides by (None for 'sum')."""
    if reduction == "sum":
        return total, None
    # Nothing counted (empty batch, all rows masked) gives loss 0, never 0/0.
    denom = counted.clamp(min=1).to(total.dtype) if isinstance(counted, torch.Tensor) else float(max(counted, 1))
    return total / denom, denom


class KLDivWithLogitsFunction(torch.autograd.Function):
    """Softmax KL from logits over the last dim; see kl_div_with_logits."""

    @staticmethod
    def forward(ctx, input, target, mask, target_type, temperature, direction, reduction, backend,
                grad_input, grad_target):
        x, t = _rows(input), _rows(target)
        m = mask.reshape(-1).contiguous() if mask is not None else None
        row, gx, gt = op(backend, "kl_div_with_logits_fwd")(x, t, m, target_type, temperature, direction, grad_input, grad_target)
        denom = None
        if reduction == "none":
            out = row.reshape(input.shape[:-1])
        else:
            counted = m.sum() if m is not None else x.shape[0]
            if reduction == "mean":
                counted = counted * x.shape[1]
            out, denom = _reduce(row.sum(), reduction, counted)
        ctx.backend, ctx.shapes, ctx.denom = backend, (input.shape, target.shape), denom
        ctx.save_for_backward(gx, gt)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gx, gt = ctx.saved_tensors
        scale = _scale(grad_out, ctx.denom, acc_dtype(gx.dtype))
        scale_grad = op(ctx.backend, "scale_grad")
        gi = scale_grad(gx, scale).reshape(ctx.shapes[0]) if ctx.needs_input_grad[0] else None
        gtt = scale_grad(gt, scale).reshape(ctx.shapes[1]) if ctx.needs_input_grad[1] else None
        return gi, gtt, None, None, None, None, None, None, None, None


def _bernoulli_forward(ctx, input, target, weight, pos_weight, target_type, temperature, reduction, backend,
                       subtract_entropy, grad_input, grad_target):
    x, t = _rows(input), _rows(target)
    loss, gx, gt = op(backend, "bernoulli_kl_div_with_logits_fwd")(
        x, t, _factor(weight, input), _factor(pos_weight, input), target_type, temperature, subtract_entropy,
        reduction == "none", grad_input, grad_target)
    denom = None
    if reduction == "none":
        out = loss.reshape(input.shape)
    else:
        counted = input.numel() if reduction == "mean" else x.shape[0]
        out, denom = _reduce(loss.sum(), reduction, counted)
    ctx.backend, ctx.shapes, ctx.denom = backend, (input.shape, target.shape), denom
    ctx.save_for_backward(gx, gt)
    return out


def _bernoulli_backward(ctx, grad_out):
    gx, gt = ctx.saved_tensors
    scale = _scale(grad_out, ctx.denom, acc_dtype(gx.dtype))
    scale_grad = op(ctx.backend, "scale_grad")
    gi = scale_grad(gx, scale).reshape(ctx.shapes[0]) if ctx.needs_input_grad[0] else None
    gtt = scale_grad(gt, scale).reshape(ctx.shapes[1]) if ctx.needs_input_grad[1] else None
    return gi, gtt


class BernoulliKLDivWithLogitsFunction(torch.autograd.Function):
    """Per-class KL(Bern(p) || Bern(sigmoid(input / T))); see bernoulli_kl_div_with_logits."""

    @staticmethod
    def forward(ctx, input, target, weight, target_type, temperature, reduction, backend, grad_input, grad_target):
        return _bernoulli_forward(ctx, input, target, weight, None, target_type, temperature, reduction, backend,
                                  True, grad_input, grad_target)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return *_bernoulli_backward(ctx, grad_out), None, None, None, None, None, None, None


class BCEWithLogitsFunction(torch.autograd.Function):
    """torch.nn.functional.binary_cross_entropy_with_logits through kl_ext's kernels."""

    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, reduction, backend, grad_input, grad_target):
        out = _bernoulli_forward(ctx, input, target, weight, pos_weight, "probs", 1.0, reduction, backend, False,
                                 grad_input, grad_target)
        return out.to(input.dtype)  # torch's BCE returns the input's dtype

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return *_bernoulli_backward(ctx, grad_out), None, None, None, None, None, None


def kl_div_with_logits(input: torch.Tensor, target: torch.Tensor, *, target_type: str = "logits",
                       temperature: float = 1.0, direction: str = "forward", reduction: str = "batchmean",
                       mask: Optional[torch.Tensor] = None, backend: str = "auto",
                       validate: bool = False) -> torch.Tensor:
    """KL divergence between a teacher and the student softmax(input / T), over the last dim.

    input: student logits (..., V). target: teacher logits, log-probs or probs (target_type), same shape.
    direction: "forward" = KL(teacher || student) (distillation), "reverse" = KL(student || teacher).
    reduction: "batchmean" (sum / rows counted: per token for (B, T, V)), "sum", "mean" (sum / (rows * V)),
    "none" (per-row loss of the leading shape). mask: bool of the leading shape; False rows give 0 loss and
    0 gradient and are not counted. Losses are float32 (float64 for float64 inputs). validate=True checks the
    values for the classic pitfalls (it syncs). See README "Semantics" for the edge cases.
    """
    check_kl(input, target, mask, target_type, temperature, direction, reduction)
    be = resolve(backend, input.device)
    if validate:
        validate_kl_values(input, target, target_type)
    if be == "torch":
        return reference.kl_div_with_logits(input, target, target_type=target_type, temperature=temperature,
                                            direction=direction, reduction=reduction, mask=mask)
    return KLDivWithLogitsFunction.apply(input, target, mask, target_type, float(temperature), direction,
                                         reduction, be, needs_grad(input), needs_grad(target))


def bernoulli_kl_div_with_logits(input: torch.Tensor, target: torch.Tensor, *, target_type: str = "probs",
                                 temperature: float = 1.0, weight: Optional[torch.Tensor] = None,
                                 reduction: str = "batchmean", backend: str = "auto",
                                 validate: bool = False) -> torch.Tensor:
    """Per-class KL(Bern(p) || Bern(sigmoid(input / T))) for multi-label soft targets.

    target: probabilities p in [0, 1] (target_type="probs") or teacher logits (p = sigmoid(target / T)).
    Equals BCE-with-logits minus the entropy of p: the same input gradient, but 0 when the distributions
    match. weight broadcasts against input. reduction: "batchmean" (sum / rows: per-sample KL summed over
    classes), "sum", "mean" (over all elements), "none" (elementwise, float32).
    """
    check_bernoulli(input, target, weight, target_type, temperature, reduction)
    be = resolve(backend, input.device)
    if validate:
        validate_bernoulli_values(target, target_type)
    if be == "torch":
        return reference.bernoulli_kl_div_with_logits(input, target, target_type=target_type,
                                                      temperature=temperature, weight=weight, reduction=reduction)
    return BernoulliKLDivWithLogitsFunction.apply(input, target, weight, target_type, float(temperature), reduction,
                                                  be, needs_grad(input), needs_grad(target))


def binary_cross_entropy_with_logits(input: torch.Tensor, target: torch.Tensor,
                                     weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                                     pos_weight: Optional[torch.Tensor] = None,
                                     backend: str = "auto") -> torch.Tensor:
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits (same arguments and results)."""
    check_bce(input, target, weight, pos_weight, reduction)
    be = resolve(backend, input.device)
    if be == "torch":
        return reference.binary_cross_entropy_with_logits(input, target, weight=weight, reduction=reduction,
                                                          pos_weight=pos_weight)
    return BCEWithLogitsFunction.apply(input, target, weight, pos_weight, reduction, be, needs_grad(input),
                                       needs_grad(target))
