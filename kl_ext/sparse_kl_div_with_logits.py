"""sparse_kl_div_with_logits: KL(teacher || student) from a sparse (top-k) teacher, the loss of offline
distillation from cached log-probs (vLLM / SGLang top-k logprobs, DistillKit, TRL top_k), fused: autograd
Function, functional, Module, and topk_target, the caching step.

The student is the full softmax(input / T) over V classes; the teacher is given on k entries per row
(target_indices, -1 for an empty slot) as log-probs, probs or logits of those entries. tail="bucket" keeps the
teacher's missing mass as one "ghost token" against the student's mass outside the support; tail="renorm"
renormalizes the teacher over its support (target_type="logits" always does). Exact formulas:
csrc/sparse_kl_div_with_logits.cpp and README "Sparse teacher".
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kl_ext import reference
from kl_ext._backends import resolve
from kl_ext._docs import with_args
from kl_ext._fused import (_contiguous_rows, _flat_mask, _fused_backward, _rows, _rows_forward, apply,
                           kernel_backward)
from kl_ext._validation import (acc_dtype, check_sparse, label_mask, needs_grad, validate_finite,
                                validate_sparse_indices)

__all__ = ["sparse_kl_div_with_logits", "SparseKLDivWithLogitsFunction", "SparseKLDivWithLogitsLoss",
           "topk_target"]


class SparseKLDivWithLogitsFunction(torch.autograd.Function):
    """KL from a sparse teacher; see sparse_kl_div_with_logits. target_values in the accumulation dtype,
    target_indices int64."""

    @staticmethod
    def forward(ctx, input, target_values, target_indices, mask, target_type, tail, temperature, reduction,
                backend, grad_input, grad_target):
        def make_args():
            return (_rows(input), _contiguous_rows(target_indices), _contiguous_rows(target_values), _flat_mask(mask),
                    target_type, tail, temperature)

        return _rows_forward(ctx, "sparse_kl_div_with_logits_fwd", backend, make_args,
                             (input, target_values, mask, target_indices), mask, reduction, grad_input, grad_target)

    @staticmethod
    @kernel_backward
    def backward(ctx, grad_out):
        return _fused_backward(ctx, grad_out)


@with_args("backend", "validate")
def sparse_kl_div_with_logits(input: torch.Tensor, target_indices: torch.Tensor, target_values: torch.Tensor, *,
                              target_type: str = "log_probs", tail: str = "bucket", temperature: float = 1.0,
                              reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
                              labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
                              backend: str = "auto", validate: bool = False) -> torch.Tensor:
    """KL(teacher || softmax(input / T)) with the teacher given on k entries per row.

    input (..., V): student logits. target_indices (..., k) int64 / int32 classes, -1 for an empty slot.
    target_values (..., k), any float dtype: the teacher's full-vocabulary log-probs of those classes
    ("log_probs"), their probs ("probs"), or raw logits of those k classes ("logits", softmax-ed over the
    support at temperature T). Log-probs and probs are taken as given (no temperature).
    tail "bucket": the teacher's missing mass p_tail = 1 - sum p is one more outcome, matched against the
    student's mass outside the support; "renorm": the teacher is renormalized over its support.
    reduction "batchmean" (per counted row) / "sum" / "mean" (per counted row and class) / "none"; bool row
    mask, and labels with ignore_index as one more mask source; float32 losses (float64 for float64 input);
    gradients w.r.t. input and target_values (never indices).
    A class repeated within a row is undefined (validate=True raises, and checks indices are in [-1, V)).
    {common_args}

    >>> import torch, kl_ext
    >>> teacher, student = torch.tensor([[2.0, 1.0, 0.0, -1.0]]), torch.zeros(1, 4)
    >>> idx, logp = kl_ext.topk_target(teacher, k=4)            # every class: the dense KL
    >>> bool(torch.isclose(kl_ext.sparse_kl_div_with_logits(student, idx, logp),
    ...                    kl_ext.kl_div_with_logits(student, teacher)))
    True
    >>> idx, logp = kl_ext.topk_target(teacher, k=2)            # the rest as one tail bucket
    >>> round(float(kl_ext.sparse_kl_div_with_logits(student, idx, logp)), 4)
    0.4255
    """
    check_sparse(input, target_indices, target_values, mask, target_type, tail, temperature, reduction)
    mask = label_mask(mask, labels, ignore_index, input)
    be = resolve(backend, input.device)
    if validate:
        validate_finite(input, "input", "the student's logits")
        validate_finite(target_values, "target_values", f"the teacher's {target_type.replace('_', '-')}")
        validate_sparse_indices(target_indices, input.shape[-1])
    if be == "torch":
        return reference.sparse_kl_div_with_logits(input, target_indices, target_values, target_type=target_type,
                                                   tail=tail, temperature=temperature, reduction=reduction,
                                                   mask=mask)
    # The kernels read int64 indices and values in the accumulation dtype: k per row, so the casts are cheap
    # (and no-ops for int64 indices and float32 values); autograd casts the values' gradient back.
    values = target_values.to(acc_dtype(input.dtype))
    return apply(SparseKLDivWithLogitsFunction, input, values, target_indices.to(torch.int64), mask, target_type,
                 tail, float(temperature), reduction, backend=be, grad_input=needs_grad(input),
                 grad_target=needs_grad(values))


class SparseKLDivWithLogitsLoss(nn.Module):
    """Module form of kl_ext.sparse_kl_div_with_logits: forward(input, target_indices, target_values, mask=None,
    labels=None).

    >>> import torch, kl_ext
    >>> idx, logp = kl_ext.topk_target(torch.randn(6, 50), k=8)
    >>> loss = kl_ext.SparseKLDivWithLogitsLoss(tail="bucket")
    >>> bool(loss(torch.randn(6, 50), idx, logp) > 0)
    True
    """

    def __init__(self, target_type: str = "log_probs", tail: str = "bucket", temperature: float = 1.0,
                 reduction: str = "batchmean", ignore_index: int = -100, backend: str = "auto",
                 validate: bool = False):
        super().__init__()
        self.target_type, self.tail, self.temperature = target_type, tail, temperature
        self.reduction, self.ignore_index, self.backend, self.validate = reduction, ignore_index, backend, validate

    def forward(self, input: torch.Tensor, target_indices: torch.Tensor, target_values: torch.Tensor,
                mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        return sparse_kl_div_with_logits(input, target_indices, target_values, target_type=self.target_type,
                                         tail=self.tail, temperature=self.temperature, reduction=self.reduction,
                                         mask=mask, labels=labels, ignore_index=self.ignore_index,
                                         backend=self.backend, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"target_type={self.target_type!r}, tail={self.tail!r}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


@torch.no_grad()
def topk_target(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """The caching step of offline distillation: (indices, log_probs) of the teacher's k most likely classes per
    row, log_probs from the full-vocabulary log_softmax(teacher_logits / T) (float32; float64 for float64
    logits). Feed them to sparse_kl_div_with_logits(..., target_type="log_probs") at the same temperature.

    >>> import torch, kl_ext
    >>> idx, logp = kl_ext.topk_target(torch.tensor([[0.0, 3.0, 1.0]]), k=2, temperature=2.0)
    >>> idx.tolist(), [round(v, 3) for v in logp.exp()[0].tolist()]
    ([[1, 2]], [0.629, 0.231])
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"kl_ext: k must be an int in [1, {teacher_logits.shape[-1]}] (the classes), got {k!r}")
    lp = torch.log_softmax(teacher_logits.to(acc_dtype(teacher_logits.dtype)) / temperature, dim=-1)
    values, indices = lp.topk(k, dim=-1)
    return indices, values
