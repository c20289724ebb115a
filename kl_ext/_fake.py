"""Fake (meta) kernels, so torch.compile and opcheck can trace the ops without running them: the C++ ops'
(kl_ext::, registered when the extension loads) and the Triton backend's twins (kl_ext_triton::, registered by it)."""
import math

import torch


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x):
    """Rows of a (rows, V) or (A, B, V) row tensor."""
    return math.prod(x.shape[:-1])


def _grads(input, target, grad_input, grad_target):
    """Contiguous (rows, V) gradients of the row tensors (csrc/common.h, grad_like)."""
    gi = input.new_empty((_rows(input), input.shape[-1])) if grad_input else input.new_empty((0,))
    gt = target.new_empty((_rows(target), target.shape[-1])) if grad_target else target.new_empty((0,))
    return gi, gt


def _softmax_rows_loss(input, row_stats):
    """Per-row loss, or the vocab-parallel modes' (rows, 3) / (rows, 2) (csrc/common.h, KLCall)."""
    rows = _rows(input)
    shape = (rows,) if row_stats is None else (rows, 3 if row_stats.shape[1] == 0 else 2)
    return input.new_empty(shape, dtype=_acc(input.dtype))


def _kl_fwd(input, target, mask, target_type, temperature, direction, grad_input, grad_target,
            grad_scale=None, row_stats=None):
    return _softmax_rows_loss(input, row_stats), *_grads(input, target, grad_input, grad_target)


def _jsd_fwd(input, target, mask, target_type, temperature, beta, grad_input, grad_target, grad_scale=None,
             row_stats=None):
    return _softmax_rows_loss(input, row_stats), *_grads(input, target, grad_input, grad_target)


def _sparse_fwd(input, target_indices, target_values, mask, target_type, tail, temperature, grad_input, grad_target,
                grad_scale=None):
    gv = torch.empty_like(target_values) if grad_target else target_values.new_empty((0,))
    return input.new_empty((_rows(input),), dtype=_acc(input.dtype)), _grads(input, input, grad_input, False)[0], gv


def _bernoulli_fwd(input, target, weight, pos_weight, target_type, temperature, subtract_entropy, elementwise,
                   grad_input, grad_target, grad_scale=None):
    shape = (_rows(input), input.shape[-1]) if elementwise else (_rows(input),)
    return (input.new_empty(shape, dtype=_acc(input.dtype)), *_grads(input, target, grad_input, grad_target))


def _scale_grad(grad, scale):
    return torch.empty_like(grad)


def _scale_grad_(grad, scale):
    return None


_FAKES = {"kl_div_with_logits_fwd": _kl_fwd, "jsd_with_logits_fwd": _jsd_fwd,
          "sparse_kl_div_with_logits_fwd": _sparse_fwd, "bernoulli_kl_div_with_logits_fwd": _bernoulli_fwd,
          "scale_grad": _scale_grad, "scale_grad_": _scale_grad_}


def register(namespace):
    for name, fn in _FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fn)
