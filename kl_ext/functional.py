"""Functional API of the KL (one more divergence: kl_ext/_divergence.py) and the autograd Functions of the
Bernoulli KL and BCE ops (kl_ext/_fused.py holds the shared fused forward / backward; newer ops have their own
module, e.g. kl_ext/jsd_with_logits.py)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn._reduction import legacy_get_string

from kl_ext import reference
from kl_ext._backends import _compile_constant, resolve
from kl_ext._docs import with_args
from kl_ext._divergence import KLDivWithLogitsFunction, divergence_with_logits
from kl_ext._fused import _factor, _fused_backward, _fused_forward, _rows, _target, apply, kernel_backward
from kl_ext._registry import bind
from kl_ext._validation import (DIRECTIONS, _option, check_bce, check_bernoulli, needs_grad,
                                validate_bernoulli_values)

__all__ = ["kl_div_with_logits", "bernoulli_kl_div_with_logits", "binary_cross_entropy_with_logits",
           "KLDivWithLogitsFunction", "BernoulliKLDivWithLogitsFunction", "BCEWithLogitsFunction"]


def _bernoulli_forward(ctx, input, target, weight, pos_weight, target_type, temperature, reduction, backend,
                       subtract_entropy, grad_input, grad_target):
    def make_args():
        return (_rows(input), _rows(_target(target, input)), _factor(weight, input), _factor(pos_weight, input),
                target_type, temperature, subtract_entropy, reduction == "none")

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
    @kernel_backward
    def backward(ctx, grad_out):
        return _fused_backward(ctx, grad_out)


class BCEWithLogitsFunction(torch.autograd.Function):
    """torch.nn.functional.binary_cross_entropy_with_logits through kl_ext's kernels."""

    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, reduction, backend, grad_input, grad_target):
        out = _bernoulli_forward(ctx, input, target, weight, pos_weight, "probs", 1.0, reduction, backend, False,
                                 grad_input, grad_target)
        dtype = _bce_dtype(input.device.type, input.dtype, target.dtype, None if weight is None else weight.dtype,
                           None if pos_weight is None else pos_weight.dtype)
        return out if out.dtype == dtype else out.to(dtype)

    @staticmethod
    @kernel_backward
    def backward(ctx, grad_out):
        return _fused_backward(ctx, grad_out)


_BCE_DTYPES: dict = {}


@_compile_constant
def _bce_dtype(device_type, *dtypes):
    """The dtype torch's binary_cross_entropy_with_logits returns for (input, target, weight, pos_weight) dtypes
    (None: not given), asked of torch itself once per combination, on one-element tensors of the input's device
    type (not meta tensors: on torch 2.11 meta promotes float32 x bfloat16 to float32, the CPU to bfloat16)."""
    key = (device_type, *dtypes)
    if key not in _BCE_DTYPES:
        x, t, w, pw = (None if d is None else torch.zeros(1, dtype=d, device=device_type) for d in dtypes)
        _BCE_DTYPES[key] = F.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw).dtype
    return _BCE_DTYPES[key]


@with_args()
def kl_div_with_logits(input: torch.Tensor, target: torch.Tensor, *, target_type: str = "logits",
                       temperature: float = 1.0, direction: str = "forward", reduction: str = "batchmean",
                       mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                       ignore_index: int = -100, backend: str = "auto", validate: bool = False) -> torch.Tensor:
    """KL divergence between a teacher and the student q = softmax(input / T), over the last dim.

    Args:
        direction: "forward" = KL(teacher || student), the distillation loss; "reverse" = KL(student || teacher).
        {common_args}

    Returns float32 losses (float64 for float64 input); gradients flow to input and target. Edge cases (-inf
    logits, zero probabilities): README "Semantics".

    >>> import math, torch, kl_ext
    >>> student = torch.tensor([[0.0, 0.0]])                  # q = [1/2, 1/2]
    >>> teacher = torch.tensor([[0.0, math.log(3.0)]])        # p = [1/4, 3/4]
    >>> round(float(kl_ext.kl_div_with_logits(student, teacher)), 4)   # 1/4 log(1/2) + 3/4 log(3/2)
    0.1308
    >>> round(float(kl_ext.kl_div_with_logits(student, teacher, direction="reverse")), 4)
    0.1438
    >>> kl_ext.kl_div_with_logits(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), reduction="none").shape
    torch.Size([2, 3])
    """
    _option("direction", direction, DIRECTIONS)
    return divergence_with_logits(input, target, bind("kl" if direction == "forward" else "reverse_kl"),
                                  target_type=target_type, temperature=temperature, reduction=reduction, mask=mask,
                                  labels=labels, ignore_index=ignore_index, backend=backend, validate=validate)


@with_args("backend", "validate")
def bernoulli_kl_div_with_logits(input: torch.Tensor, target: torch.Tensor, *, target_type: str = "probs",
                                 temperature: float = 1.0, weight: Optional[torch.Tensor] = None,
                                 reduction: str = "batchmean", backend: str = "auto",
                                 validate: bool = False) -> torch.Tensor:
    """Per-class KL(Bern(p) || Bern(sigmoid(input / T))) for multi-label soft targets.

    Args:
        input: logits (..., C), one independent Bernoulli per class.
        target: probabilities p in [0, 1] (target_type="probs"; rows need not sum to 1) or teacher logits
            ("logits": p = sigmoid(target / T)).
        temperature: T > 0, dividing the logits (and the teacher's, for "logits").
        weight: broadcasts against input (no gradient w.r.t. it).
        reduction: "batchmean" (sum / rows: the per-sample KL summed over classes), "sum", "mean" (over all
            elements), "none" (elementwise, float32).
        {common_args}

    Equals BCE-with-logits minus the entropy of p: the same input gradient, but 0 when the distributions match.

    >>> import torch, kl_ext
    >>> logits = torch.tensor([[2.0, -1.0, 0.0]])
    >>> float(kl_ext.bernoulli_kl_div_with_logits(logits, logits, target_type="logits"))   # a perfect fit
    0.0
    >>> round(float(kl_ext.bernoulli_kl_div_with_logits(logits, torch.tensor([[0.9, 0.1, 0.5]]))), 4)
    0.09
    """
    check_bernoulli(input, target, weight, target_type, temperature, reduction)
    be = resolve(backend, input.device)
    if validate:
        validate_bernoulli_values(input, target, target_type)
    if be == "torch":
        return reference.bernoulli_kl_div_with_logits(input, target, target_type=target_type,
                                                      temperature=temperature, weight=weight, reduction=reduction)
    return apply(BernoulliKLDivWithLogitsFunction, input, target, weight, target_type, float(temperature),
                 reduction, backend=be, grad_input=needs_grad(input), grad_target=needs_grad(target))


def binary_cross_entropy_with_logits(input: torch.Tensor, target: torch.Tensor,
                                     weight: Optional[torch.Tensor] = None, size_average: Optional[bool] = None,
                                     reduce: Optional[bool] = None, reduction: str = "mean",
                                     pos_weight: Optional[torch.Tensor] = None,
                                     backend: str = "auto") -> torch.Tensor:
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits: the same arguments in the same order
    (size_average and reduce deprecated there and here, with torch's warning) and the same results, through
    kl_ext's kernels; backend as for every kl_ext loss.

    >>> import torch, torch.nn.functional as F, kl_ext
    >>> x, t = torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, 0.0]])
    >>> bool(torch.isclose(kl_ext.binary_cross_entropy_with_logits(x, t), F.binary_cross_entropy_with_logits(x, t)))
    True
    """
    if size_average is not None or reduce is not None:
        reduction = legacy_get_string(size_average, reduce)
    if isinstance(input, torch.Tensor) and input.dim() == 0 and isinstance(target, torch.Tensor) and \
            target.dim() == 0 and all(f is None or (isinstance(f, torch.Tensor) and f.dim() == 0)
                                      for f in (weight, pos_weight)):
        # One logit as a 0-d tensor, as torch accepts it: one row of one class for the kernels.
        one = [None if f is None else f.reshape(1) for f in (weight, pos_weight)]
        out = binary_cross_entropy_with_logits(input.reshape(1), target.reshape(1), weight=one[0],
                                               reduction=reduction, pos_weight=one[1], backend=backend)
        return out.reshape(())
    check_bce(input, target, weight, pos_weight, reduction)
    be = resolve(backend, input.device)
    if be == "torch":
        return reference.binary_cross_entropy_with_logits(input, target, weight=weight, reduction=reduction,
                                                          pos_weight=pos_weight)
    return apply(BCEWithLogitsFunction, input, target, weight, pos_weight, reduction, backend=be,
                 grad_input=needs_grad(input), grad_target=needs_grad(target))
