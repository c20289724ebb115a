"""TRL's on-policy distillation loss, fused: `generalized_jsd_loss` with the signature and results of TRL's
`GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd in TRL 1.16), computed by kl_ext.jsd_with_logits in one
pass over the logits instead of TRL's unfused formula (log-softmaxes, a stacked logsumexp and two kl_div terms, each
a (tokens x vocab) temporary). Importing this module does not import TRL.

Make a TRL trainer use it, one line (or subclass with FusedGeneralizedJSD first):

    >>> from kl_ext.integrations import trl as kl_trl
    >>> class Trainer(kl_trl.FusedGeneralizedJSD):          # e.g. (kl_trl.FusedGeneralizedJSD, GKDTrainer)
    ...     pass
    >>> Trainer.generalized_jsd_loss is kl_trl.generalized_jsd_loss
    True

or `kl_trl.patch(GKDTrainer)`, which sets the static method on the class (and so on its subclasses).
"""
from __future__ import annotations

import torch

from kl_ext.jsd_with_logits import jsd_with_logits

__all__ = ["generalized_jsd_loss", "FusedGeneralizedJSD", "patch"]


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels=None, beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean", num_items_in_batch=None, *,
                         backend: str = "auto") -> torch.Tensor:
    """TRL's generalized JSD loss, same arguments and results, fused (kl_ext.jsd_with_logits).

    beta = 0: KL(teacher || student); 1: KL(student || teacher); in between the generalized JSD with mixture
    beta p_teacher + (1 - beta) p_student. Both logits are divided by temperature. labels == -100 leave a position
    out. Where TRL's formula has an edge, this follows TRL, not kl_ext's own conventions:

    * reduction "batchmean" divides by the number of labelled positions (at least 1) when labels are given, and
      otherwise by student_logits.size(0), the batch size of (batch, seq, vocab) logits (not the token count, as
      kl_ext's batchmean would).
    * "mean" divides by positions x vocab (NaN when no position is labelled, as torch's mean of nothing); "sum" sums.
    * num_items_in_batch (TRL's gradient-accumulation normalizer) replaces the reduction: the sum divided by it.
    * Any other reduction returns TRL's elementwise terms (positions x vocab, the labelled positions only when labels
      are given): those come from the unfused formula, as a row-fused kernel never forms them.
    * The result has the logits' dtype (TRL computes in it; kl_ext accumulates in float32 and rounds at the end).

    backend: kl_ext's (see kl_div_with_logits).

    >>> import torch
    >>> s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    >>> labels = torch.tensor([[5, 7, -100], [1, -100, -100]])
    >>> bool(generalized_jsd_loss(s, t, labels=labels, beta=0.5) >= 0)
    True
    """
    if reduction not in ("batchmean", "sum", "mean") and num_items_in_batch is None:
        return _elementwise(student_logits, teacher_logits, labels, beta, temperature)
    rows = jsd_with_logits(student_logits, teacher_logits, beta=float(beta), temperature=temperature, labels=labels,
                           reduction="none", backend=backend)
    total = rows.sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        out = total / num_items_in_batch
    elif reduction == "sum":
        out = total
    elif reduction == "batchmean":
        out = total / ((labels != -100).sum().clamp_min(1) if labels is not None else max(student_logits.size(0), 1))
    else:
        counted = (labels != -100).sum() if labels is not None else rows.numel()
        out = total / (counted * student_logits.shape[-1])
    return out.to(student_logits.dtype)


def _elementwise(student_logits, teacher_logits, labels, beta, temperature):
    """The per-(position, class) terms TRL returns for a reduction it does not know, by its formula."""
    ls = torch.log_softmax(student_logits / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        terms = torch.nn.functional.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        terms = torch.nn.functional.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=ls.dtype, device=ls.device)
        lm = torch.logaddexp(ls + torch.log1p(-b), lt + torch.log(b))
        terms = b * torch.nn.functional.kl_div(lm, lt, reduction="none", log_target=True) + \
            (1 - b) * torch.nn.functional.kl_div(lm, ls, reduction="none", log_target=True)
    return terms[labels != -100] if labels is not None else terms


class FusedGeneralizedJSD:
    """A mixin: listed before a TRL trainer class, its generalized_jsd_loss is kl_ext's."""

    generalized_jsd_loss = staticmethod(generalized_jsd_loss)


def patch(trainer_cls):
    """Set trainer_cls.generalized_jsd_loss (a static method in TRL) to kl_ext's; returns the class."""
    trainer_cls.generalized_jsd_loss = staticmethod(generalized_jsd_loss)
    return trainer_cls
