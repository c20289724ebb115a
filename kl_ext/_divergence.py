"""The divergences between two softmax rows on divergence_with_logits_fwd (jsd, tvd, skew KL): one autograd
Function and one functional body for all of them. A loss's own module (kl_ext/jsd_with_logits.py, ...) gives its
signature, docstring, option checks and nn.Module; its per-element math lives in csrc/divergences.h (C++ CPU and
CUDA) and triton_kernels/divergences.py, its float64 reference in kl_ext/reference.py."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from kl_ext._backends import resolve
from kl_ext._fused import _fused_backward, _softmax_rows_forward, apply, divergence_op, kernel_backward
from kl_ext._validation import check_kl, label_mask, needs_grad, validate_kl_values


class DivergenceWithLogitsFunction(torch.autograd.Function):
    """A divergence of divergence_with_logits_fwd from logits over the last dim (or the KL op at its endpoints)."""

    @staticmethod
    def forward(ctx, input, target, mask, divergence, param, target_type, temperature, reduction, backend,
                grad_input, grad_target):
        name, options = divergence_op(divergence, param, temperature)
        return _softmax_rows_forward(ctx, name, backend, input, target, mask, target_type, options, reduction,
                                     grad_input, grad_target)

    @staticmethod
    @kernel_backward
    def backward(ctx, grad_out):
        return _fused_backward(ctx, grad_out)


def divergence_with_logits(input: torch.Tensor, target: torch.Tensor, divergence: str, param: float, *,
                           target_type: str, temperature: float, reduction: str, mask: Optional[torch.Tensor],
                           labels: Optional[torch.Tensor], ignore_index: int, backend: str, validate: bool,
                           reference: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The functional body of every divergence: the shared checks (the loss checked its own param), labels to a
    row mask, the backend, then `reference(input, target, target_type=, temperature=, reduction=, mask=)` (the
    loss's float64-capable reference, param bound) or the fused op."""
    check_kl(input, target, mask, target_type, temperature, "forward", reduction)
    mask = label_mask(mask, labels, ignore_index, input)
    be = resolve(backend, input.device)
    if validate:
        validate_kl_values(input, target, target_type)
    if be == "torch":
        return reference(input, target, target_type=target_type, temperature=temperature, reduction=reduction,
                         mask=mask)
    return apply(DivergenceWithLogitsFunction, input, target, mask, divergence, float(param), target_type,
                 float(temperature), reduction, backend=be, grad_input=needs_grad(input),
                 grad_target=needs_grad(target))
