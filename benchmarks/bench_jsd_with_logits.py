"""Generalized JSD from logits (beta = 0.5, teacher logits, 'batchmean'): kl_ext backends and its TRL drop-in
(kl_ext.integrations.trl) vs the generalized JSD as TRL writes it (log-softmax both, logsumexp mixture, two kl_div
calls) in eager torch and compiled, and Liger-Kernel's LigerJSD on log-probs (GPU). Student gradient only.

Floor (elements moved per input element): forward = read student + teacher (2); forward+backward = those
reads + write the gradient (3); backward alone: time only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kl_ext
from kl_ext import reference
from kl_ext._backends import _usable
from kl_ext.integrations import trl as kl_trl
from benchmarks.bench_kl_div_with_logits import make_inputs  # noqa: F401  (the same student / teacher logits)

OP = "jsd"
BASELINE = "TRL formula eager"  # the eager call users write (benchmarks/run.py's first speedup)
BETA = 0.5
BYTES_PER_ELEM = {"fwd": 2, "fwd+bwd": 3, "bwd": None}


def reference_fn(s, t):
    return reference.jsd_with_logits(s, t, beta=BETA)


def trl_formula(s, t, beta=BETA):
    """The generalized JSD as on-policy distillation code computes it in eager torch (TRL's GKD trainer)."""
    ls, lt = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
    mixture = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, lt, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, ls, reduction="none", log_target=True)
    return (beta * kl_teacher + (1 - beta) * kl_student).sum() / s.shape[0]


def providers(device: torch.device) -> dict:
    out = {}
    for b in ("cuda", "triton") if device.type == "cuda" else ("cpu",):
        ok, why = _usable(b, device)
        out[f"kl_ext {b}"] = (lambda s, t, b=b: kl_ext.jsd_with_logits(s, t, beta=BETA, backend=b)) if ok else why
    # The drop-in for TRL's trainers (kl_ext.integrations.trl): TRL's signature and reduction over the fused op.
    out["kl_ext TRL drop-in"] = lambda s, t: kl_trl.generalized_jsd_loss(s, t, beta=BETA)
    out["TRL formula eager"] = trl_formula
    out["TRL formula compiled"] = torch.compile(trl_formula, dynamic=False)
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerJSD
            liger = LigerJSD(beta=BETA)  # beta = 0.5: the symmetric JSD under either side's convention
            out["liger JSD"] = lambda s, t: liger(F.log_softmax(s, -1), F.log_softmax(t, -1))
        except Exception as e:  # noqa: BLE001 (any import failure means: not available here)
            out["liger JSD"] = f"Liger-Kernel not importable ({type(e).__name__}: {e})"
    return out

