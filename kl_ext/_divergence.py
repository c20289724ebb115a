"""Every divergence between two softmax rows (kl_ext/_registry.py) on one autograd Function and one functional
body: the KL (its own op and kernels, the fast paths) where the divergence is the KL, divergence_with_logits_fwd
otherwise. A loss's own module (kl_ext/jsd_with_logits.py, ...) gives its signature, docstring and nn.Module; its
per-element math lives in csrc/divergences.h (C++ CPU and CUDA) and triton_kernels/divergences.py."""
from __future__ import annotations

from typing import Optional

import torch

from kl_ext._backends import resolve
from kl_ext._fused import _fused_backward, _softmax_rows_forward, apply, kernel_backward
from kl_ext._registry import Bound, kernel_bound
from kl_ext._validation import check_kl, label_mask, needs_grad, validate_kl_values


class DivergenceWithLogitsFunction(torch.autograd.Function):
    """A divergence from logits over the last dim, by its kernels' name (divergence_with_logits_fwd's: "jsd",
    "tvd", "skew_forward", "skew_reverse") and parameter; the KL op's kernels where it is the KL."""

    @staticmethod
    def forward(ctx, input, target, mask, divergence, param, target_type, temperature, reduction, backend,
                grad_input, grad_target):
        name, options = kernel_bound(divergence, param).op(temperature)
        return _softmax_rows_forward(ctx, name, backend, input, target, mask, target_type, options, reduction,
                                     grad_input, grad_target)

    @staticmethod
    @kernel_backward
    def backward(ctx, grad_out):
        return _fused_backward(ctx, grad_out)


class KLDivWithLogitsFunction(DivergenceWithLogitsFunction):
    """The softmax KL from logits over the last dim (see kl_div_with_logits), with 0.1.0's arguments: the forward
    (direction "forward") or reverse KL of DivergenceWithLogitsFunction."""

    @staticmethod
    def forward(ctx, input, target, mask, target_type, temperature, direction, reduction, backend, grad_input,
                grad_target):
        return DivergenceWithLogitsFunction.forward(ctx, input, target, mask, "jsd", float(direction != "forward"),
                                                    target_type, temperature, reduction, backend, grad_input,
                                                    grad_target)


class JSDWithLogitsFunction(DivergenceWithLogitsFunction):
    """0.1.0's Function of jsd_with_logits (forward(ctx, input, target, mask, beta, target_type, temperature,
    reduction, backend, grad_input, grad_target)); kl_ext.JSDWithLogitsFunction warns that it is renamed."""

    @staticmethod
    def forward(ctx, input, target, mask, beta, target_type, temperature, reduction, backend, grad_input,
                grad_target):
        return DivergenceWithLogitsFunction.forward(ctx, input, target, mask, "jsd", float(beta), target_type,
                                                    temperature, reduction, backend, grad_input, grad_target)


# Public names that were renamed: {old name: (the object, what to use instead)}; kl_ext.__getattr__ warns.
RENAMED = {"JSDWithLogitsFunction": (JSDWithLogitsFunction, "kl_ext.DivergenceWithLogitsFunction with divergence "
                                     "'jsd' and param beta (or kl_ext.jsd_with_logits)")}


def divergence_with_logits(input: torch.Tensor, target: torch.Tensor, divergence: Bound, *, target_type: str,
                           temperature: float, reduction: str, mask: Optional[torch.Tensor],
                           labels: Optional[torch.Tensor], ignore_index: int, backend: str,
                           validate: bool) -> torch.Tensor:
    """The functional body of every divergence (its parameters already checked by _registry.bind): the shared
    checks, labels to a row mask, the backend, then the registry's float64-capable reference or the fused op."""
    check_kl(input, target, mask, target_type, temperature, "forward", reduction)
    mask = label_mask(mask, labels, ignore_index, input)
    be = resolve(backend, input.device)
    if validate:
        validate_kl_values(input, target, target_type)
    if be == "torch":
        return divergence.reference()(input, target, target_type=target_type, temperature=temperature,
                                      reduction=reduction, mask=mask)
    return apply(DivergenceWithLogitsFunction, input, target, mask, divergence.kernel, divergence.param,
                 target_type, float(temperature), reduction, backend=be, grad_input=needs_grad(input),
                 grad_target=needs_grad(target))
