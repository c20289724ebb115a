"""nn.Module wrappers: they only store settings and call the functional API."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kl_ext import functional as F

__all__ = ["KLDivWithLogitsLoss", "BernoulliKLDivWithLogitsLoss", "BCEWithLogitsLoss"]


class KLDivWithLogitsLoss(nn.Module):
    """Module form of kl_ext.kl_div_with_logits (the settings; forward(input, target, mask=None, labels=None)).

    >>> import torch, kl_ext
    >>> loss = kl_ext.KLDivWithLogitsLoss(temperature=2.0)
    >>> student, teacher = torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)
    >>> labels = torch.tensor([[1, 2, -100], [4, -100, -100]])   # -100: padding, left out
    >>> float(loss(student, teacher, labels=labels))
    0.0
    """

    def __init__(self, target_type: str = "logits", temperature: float = 1.0, direction: str = "forward",
                 reduction: str = "batchmean", ignore_index: int = -100, backend: str = "auto",
                 validate: bool = False):
        super().__init__()
        self.target_type, self.temperature, self.direction = target_type, temperature, direction
        self.reduction, self.ignore_index, self.backend, self.validate = reduction, ignore_index, backend, validate

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        return F.kl_div_with_logits(input, target, target_type=self.target_type, temperature=self.temperature,
                                    direction=self.direction, reduction=self.reduction, mask=mask, labels=labels,
                                    ignore_index=self.ignore_index, backend=self.backend, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"target_type={self.target_type!r}, temperature={self.temperature}, direction={self.direction!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class BernoulliKLDivWithLogitsLoss(nn.Module):
    """Module form of kl_ext.bernoulli_kl_div_with_logits (the settings and a weight buffer; forward(input,
    target)).

    >>> import torch, kl_ext
    >>> loss = kl_ext.BernoulliKLDivWithLogitsLoss(weight=torch.tensor([1.0, 2.0]))
    >>> round(float(loss(torch.zeros(3, 2), torch.full((3, 2), 0.5))), 4)   # p = q = 1/2
    0.0
    """

    def __init__(self, target_type: str = "probs", temperature: float = 1.0, weight: Optional[torch.Tensor] = None,
                 reduction: str = "batchmean", backend: str = "auto", validate: bool = False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.target_type, self.temperature, self.reduction = target_type, temperature, reduction
        self.backend, self.validate = backend, validate

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return F.bernoulli_kl_div_with_logits(input, target, target_type=self.target_type,
                                              temperature=self.temperature, weight=self.weight,
                                              reduction=self.reduction, backend=self.backend,
                                              validate=self.validate)

    def extra_repr(self) -> str:
        return f"target_type={self.target_type!r}, temperature={self.temperature}, reduction={self.reduction!r}"


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """Drop-in for torch.nn.BCEWithLogitsLoss, and a subclass of it (isinstance checks and configs that build the
    loss by class keep working): the same arguments in the same order (size_average / reduce deprecated, with
    torch's warning), weight and pos_weight buffers, the same results; the loss runs kl_ext's kernels.

    >>> import torch, kl_ext
    >>> loss = kl_ext.BCEWithLogitsLoss(pos_weight=torch.full((5,), 2.0))
    >>> loss(torch.zeros(3, 5), torch.ones(3, 5))
    tensor(1.3863)
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, reduce=None,
                 reduction: str = "mean", pos_weight: Optional[torch.Tensor] = None, backend: str = "auto"):
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return F.binary_cross_entropy_with_logits(input, target, weight=self.weight, reduction=self.reduction,
                                                  pos_weight=self.pos_weight, backend=self.backend)
