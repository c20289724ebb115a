"""Functional API and the autograd Functions over the registered ops.

Training-step design: when a gradient is wanted, the forward op computes it together with the loss (the
inputs are read once), already divided by the reduction's denominator (a device tensor: no host sync).
Backward only multiplies it by grad_output, in place (scale_grad_), which moves no bytes when grad_output
is 1 (loss.backward() on a reduced loss). A second backward through a retained graph recomputes the
gradients from the saved inputs. Under torch.compile the out-of-place scale_grad keeps the graph functional.
The backward is once_differentiable: use backend="torch" (the reference) for double backward.
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


def _fused_forward(ctx, name, backend, make_args, sources, reduction, counted, grad_input, grad_target):
    """Run forward op `name` on make_args() (its leading arguments), reduce its loss and keep its gradients
    for backward. sources: the user's tensors the arguments are made from (input and target first).
    counted: what the reduction divides by, an int or a device tensor."""
    input, target = sources[0], sources[1]
    acc = acc_dtype(input.dtype)
    denom = grad_scale = None
    if reduction in ("mean", "batchmean"):
        # Nothing counted (empty batch, all rows masked) gives loss 0, never 0/0.
        if isinstance(counted, torch.Tensor):
            denom = counted.clamp(min=1).to(acc)
            grad_scale = denom.reciprocal()
        else:
            denom = float(max(counted, 1))
            grad_scale = torch.full((), 1.0 / denom, dtype=acc, device=input.device)
    grad_args = (grad_input, grad_target, grad_scale if grad_input or grad_target else None)
    loss, gx, gt = op(backend, name)(*make_args(), *grad_args)
    out = loss if reduction == "none" else (loss.sum() if denom is None else loss.sum() / denom)
    ctx.backend, ctx.shapes, ctx.scaled_in_place = backend, (input.shape, target.shape), False
    ctx.save_for_backward(gx, gt)
    if not torch.compiler.is_compiling():
        # What a second backward through a retained graph needs to recompute the gradients: the user's
        # tensors (not copies made from them, which would stay alive with the graph).
        versions = [x._version for x in sources if x is not None]
        ctx.rerun = (lambda: op(backend, name)(*make_args(), *grad_args), sources, versions)
    return out


def _recompute(ctx):
    rerun, sources, versions = ctx.rerun
    if [x._version for x in sources if x is not None] != versions:
        raise RuntimeError("kl_ext: a second backward through this loss (retain_graph=True) needs its inputs, "
                           "but they were modified in place after the forward; compute the loss again")
    _, gx, gt = rerun()
    return gx, gt


def _fused_backward(ctx, grad_out):
    """(grad input, grad target): the saved gradients times grad_output."""
    scale = grad_out.to(acc_dtype(grad_out.dtype)).reshape(-1).contiguous()
    wanted = ctx.needs_input_grad[:2]
    if torch.compiler.is_compiling():
        gx, gt = ctx.saved_tensors
        grads = [op(ctx.backend, "scale_grad")(g, scale) if w else None for g, w in zip((gx, gt), wanted)]
    else:
        # The saved gradients are scaled in place once; a later backward (retained graph) recomputes them
        # (and must not unpack the saved tensors, which the first backward modified).
        gx, gt = _recompute(ctx) if ctx.scaled_in_place else ctx.saved_tensors
        ctx.scaled_in_place = True
        grads = []
        for g, w in zip((gx, gt), wanted):
            if w:
                op(ctx.backend, "scale_grad_")(g, scale)
            grads.append(g if w else None)
    return tuple(g.reshape(shape) if g is not None else None for g, shape in zip(grads, ctx.shapes))


class KLDivWithLogitsFunction(torch.autograd.Function):
    """Softmax KL from logits over the last dim; see kl_div_with_logits."""

    @staticmethod
    def forward(ctx, input, target, mask, target_type, temperature, direction, reduction, backend,
                grad_input, grad_target):
        def make_args():
            m = mask.reshape(-1).contiguous() if mask is not None else None
            return _rows(input), _rows(target), m, target_type, temperature, direction

        counted = mask.sum() if mask is not None else math.prod(input.shape[:-1])
        if reduction == "mean":
            counted = counted * input.shape[-1]
        out = _fused_forward(ctx, "kl_div_with_logits_fwd", backend, make_args, (input, target, mask), reduction,
                             counted, grad_input, grad_target)
        return out.reshape(input.shape[:-1]) if reduction == "none" else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return *_fused_backward(ctx, grad_out), None, None, None, None, None, None, None, None


def _bernoulli_forward(ctx, input, target, weight, pos_weight, target_type, temperature, reduction, backend,
                       subtract_entropy, grad_input, grad_target):
    def make_args():
        return (_rows(input), _rows(target), _factor(weight, input), _factor(pos_weight, input), target_type,
                temperature, subtract_entropy, reduction == "none")

    counted = input.numel() if reduction == "mean" else math.prod(input.shape[:-1])
    out = _fused_forward(ctx, "bernoulli_kl_div_with_logits_fwd", backend, make_args,
                         (input, target, weight, pos_weight), reduction, counted, grad_input, grad_target)
    return out.reshape(input.shape) if reduction == "none" else out


class BernoulliKLDivWithLogitsFunction(torch.autograd.Function):
    """Per-class KL(Bern(p) || Bern(sigmoid(input / T))); see bernoulli_kl_div_with_logits."""

    @staticmethod
    def forward(ctx, input, target, weight, target_type, temperature, reduction, backend, grad_input, grad_target):
        return _bernoulli_forward(ctx, input, target, weight, None, target_type, temperature, reduction, backend,
                                  True, grad_input, grad_target)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return *_fused_backward(ctx, grad_out), None, None, None, None, None, None, None


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
        return *_fused_backward(ctx, grad_out), None, None, None, None, None, None


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
