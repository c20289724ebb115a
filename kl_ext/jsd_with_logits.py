"""jsd_with_logits: the generalized Jensen-Shannon divergence of on-policy distillation (GKD; TRL's
generalized_jsd_loss, Liger's LigerJSD): functional and Module (the fused op: kl_ext/_divergence.py).

With q = softmax(input / T) (student) and p the teacher (softmax(target / T), or the given log-probs / probs),
m = beta p + (1 - beta) q and row loss = beta KL(p || m) + (1 - beta) KL(q || m) for 0 < beta < 1; beta = 0 is
KL(p || q) and beta = 1 is KL(q || p), exactly kl_div_with_logits' forward and reverse directions (the
convention of TRL and Liger). log m is a logaddexp, so entries where both distributions underflow contribute
0 and no gradient, never NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kl_ext._divergence import divergence_with_logits
from kl_ext._docs import with_args
from kl_ext._registry import bind

__all__ = ["jsd_with_logits", "JSDWithLogitsLoss"]


@with_args()
def jsd_with_logits(input: torch.Tensor, target: torch.Tensor, *, beta: float = 0.5, target_type: str = "logits",
                    temperature: float = 1.0, reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
                    labels: Optional[torch.Tensor] = None, ignore_index: int = -100, backend: str = "auto",
                    validate: bool = False) -> torch.Tensor:
    """Generalized JSD between a teacher and the student q = softmax(input / T), over the last dim.

    Row loss beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (log m as a logaddexp: entries
    where both underflow add 0). beta in [0, 1]: 0 = KL(teacher || student), 1 = KL(student || teacher), exactly
    kl_div_with_logits' two directions (TRL's and Liger's convention); 0.5 the symmetric JSD.

    Args:
        beta: in [0, 1], the teacher's weight in the mixture m (0: forward KL, 1: reverse KL, 0.5: symmetric).
        {common_args}

    >>> import math, torch, kl_ext
    >>> student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    >>> round(float(kl_ext.jsd_with_logits(student, teacher, beta=0.5)), 4)
    0.0338
    >>> bool(kl_ext.jsd_with_logits(student, teacher, beta=0.0) == kl_ext.kl_div_with_logits(student, teacher))
    True
    """
    return divergence_with_logits(input, target, bind("jsd", beta=beta), target_type=target_type,
                                  temperature=temperature, reduction=reduction, mask=mask, labels=labels,
                                  ignore_index=ignore_index, backend=backend, validate=validate)


class JSDWithLogitsLoss(nn.Module):
    """Module form of kl_ext.jsd_with_logits (the settings; forward(input, target, mask=None, labels=None)).

    >>> import torch, kl_ext
    >>> loss = kl_ext.JSDWithLogitsLoss(beta=0.5, temperature=2.0)
    >>> float(loss(torch.ones(4, 10), torch.ones(4, 10)))   # identical rows: exactly 0
    0.0
    """

    def __init__(self, beta: float = 0.5, target_type: str = "logits", temperature: float = 1.0,
                 reduction: str = "batchmean", ignore_index: int = -100, backend: str = "auto",
                 validate: bool = False):
        super().__init__()
        self.beta, self.target_type, self.temperature = beta, target_type, temperature
        self.reduction, self.ignore_index, self.backend, self.validate = reduction, ignore_index, backend, validate

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        return jsd_with_logits(input, target, beta=self.beta, target_type=self.target_type,
                               temperature=self.temperature, reduction=self.reduction, mask=mask, labels=labels,
                               ignore_index=self.ignore_index, backend=self.backend, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, target_type={self.target_type!r}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
