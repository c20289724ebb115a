"""skew_kl_div_with_logits: the skew KL divergences of DistiLLM (Ko et al., ICML 2024), fused (the op:
kl_ext/_divergence.py; its per-element math: csrc/divergences.h, triton_kernels/divergences.py)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kl_ext._divergence import divergence_with_logits
from kl_ext._docs import with_args
from kl_ext._registry import bind
from kl_ext._validation import DIRECTIONS, _option

__all__ = ["skew_kl_div_with_logits", "SkewKLDivWithLogitsLoss"]


@with_args()
def skew_kl_div_with_logits(input: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.1,
                            direction: str = "forward", target_type: str = "logits", temperature: float = 1.0,
                            reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
                            labels: Optional[torch.Tensor] = None, ignore_index: int = -100, backend: str = "auto",
                            validate: bool = False) -> torch.Tensor:
    """Skew KL between a teacher p and the student q = softmax(input / T), over the last dim.

    direction "forward": KL(p || alpha p + (1 - alpha) q) (skew KL); "reverse": KL(q || alpha q + (1 - alpha) p)
    (skew reverse KL). The mixture keeps the loss finite where the teacher or the student has zeros and bounds
    its gradients (DistiLLM). alpha in [0, 1): alpha = 0 is kl_div_with_logits in the same direction (its
    kernels, exactly). log m from the larger side (csrc/divergences.h): exactly the KL's log-ratio 0 for identical
    rows, never the log of an underflowing sum.

    Args:
        alpha: the mixture's weight on the loss's own side (the teacher for "forward").
        direction: "forward" (KL(p || m), m = alpha p + (1 - alpha) q) or "reverse" (KL(q || m), m = alpha q +
            (1 - alpha) p).
        {common_args}

    >>> import math, torch, kl_ext
    >>> student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    >>> round(float(kl_ext.skew_kl_div_with_logits(student, teacher, alpha=0.1)), 4)
    0.107
    >>> bool(torch.allclose(kl_ext.skew_kl_div_with_logits(student, teacher, alpha=0.0),
    ...                     kl_ext.kl_div_with_logits(student, teacher)))   # alpha = 0: the KL
    True
    """
    _option("direction", direction, DIRECTIONS)
    name = "skew_kl" if direction == "forward" else "skew_reverse_kl"
    return divergence_with_logits(input, target, bind(name, alpha=alpha), target_type=target_type,
                                  temperature=temperature, reduction=reduction, mask=mask, labels=labels,
                                  ignore_index=ignore_index, backend=backend, validate=validate)


class SkewKLDivWithLogitsLoss(nn.Module):
    """Module form of kl_ext.skew_kl_div_with_logits (the settings; forward(input, target, mask=None, labels=None)).

    >>> import torch, kl_ext
    >>> loss = kl_ext.SkewKLDivWithLogitsLoss(alpha=0.1, direction="reverse")
    >>> float(loss(torch.ones(4, 10), torch.ones(4, 10)))   # identical rows: exactly 0
    0.0
    """

    def __init__(self, alpha: float = 0.1, direction: str = "forward", target_type: str = "logits",
                 temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100,
                 backend: str = "auto", validate: bool = False):
        super().__init__()
        self.alpha, self.direction, self.target_type, self.temperature = alpha, direction, target_type, temperature
        self.reduction, self.ignore_index, self.backend, self.validate = reduction, ignore_index, backend, validate

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        return skew_kl_div_with_logits(input, target, alpha=self.alpha, direction=self.direction,
                                       target_type=self.target_type, temperature=self.temperature,
                                       reduction=self.reduction, mask=mask, labels=labels,
                                       ignore_index=self.ignore_index, backend=self.backend, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, direction={self.direction!r}, target_type={self.target_type!r}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}")
