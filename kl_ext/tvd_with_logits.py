"""tvd_with_logits: the total variation distance between the teacher and the student's softmax, fused (the op:
kl_ext/_divergence.py; its per-element math: csrc/divergences.h, triton_kernels/divergences.py)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kl_ext._divergence import divergence_with_logits
from kl_ext._docs import with_args
from kl_ext._registry import bind

__all__ = ["tvd_with_logits", "TVDWithLogitsLoss"]


@with_args()
def tvd_with_logits(input: torch.Tensor, target: torch.Tensor, *, target_type: str = "logits",
                    temperature: float = 1.0, reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
                    labels: Optional[torch.Tensor] = None, ignore_index: int = -100, backend: str = "auto",
                    validate: bool = False) -> torch.Tensor:
    """Total variation distance between a teacher p and the student q = softmax(input / T), over the last dim.

    Row loss 1/2 sum_v |p_v - q_v|, in [0, 1]. Its gradient takes sign(0) = 0 where p_v = q_v (as torch.sign
    and the reference's |.| do), so identical rows get exactly zero gradients. Unlike the KL it is bounded and
    never infinite where the teacher has zeros.

    Args:
        {common_args}

    >>> import math, torch, kl_ext
    >>> student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    >>> round(float(kl_ext.tvd_with_logits(student, teacher)), 6)   # 1/2 (|0.5 - 0.25| + |0.5 - 0.75|)
    0.25
    """
    return divergence_with_logits(input, target, bind("tvd"), target_type=target_type, temperature=temperature,
                                  reduction=reduction, mask=mask, labels=labels, ignore_index=ignore_index,
                                  backend=backend, validate=validate)


class TVDWithLogitsLoss(nn.Module):
    """Module form of kl_ext.tvd_with_logits (the settings; forward(input, target, mask=None, labels=None)).

    >>> import torch, kl_ext
    >>> loss = kl_ext.TVDWithLogitsLoss(temperature=2.0)
    >>> float(loss(torch.ones(4, 10), torch.ones(4, 10)))   # identical rows: exactly 0
    0.0
    """

    def __init__(self, target_type: str = "logits", temperature: float = 1.0, reduction: str = "batchmean",
                 ignore_index: int = -100, backend: str = "auto", validate: bool = False):
        super().__init__()
        self.target_type, self.temperature, self.reduction = target_type, temperature, reduction
        self.ignore_index, self.backend, self.validate = ignore_index, backend, validate

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        return tvd_with_logits(input, target, target_type=self.target_type, temperature=self.temperature,
                               reduction=self.reduction, mask=mask, labels=labels, ignore_index=self.ignore_index,
                               backend=self.backend, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"target_type={self.target_type!r}, temperature={self.temperature}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
