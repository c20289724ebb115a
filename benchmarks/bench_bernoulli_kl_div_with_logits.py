"""Sigmoid-Bernoulli KL and BCE-with-logits: kl_ext backends vs nn.BCEWithLogitsLoss (eager, compiled),
eager BCE minus the targets' entropy (how the KL is written by hand), and the compiled reference KL.
Student gradient only, probability targets.

Floor (elements moved per input element): forward = read logits + targets (2); forward+backward = those
reads + write the gradient (3); backward alone: time only (kl_ext computes the gradient in the forward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kl_ext
from kl_ext import reference
from kl_ext._backends import _usable

OP = "bernoulli"
BASELINE = "BCE - entropy eager"  # the eager call users write (benchmarks/run.py's first speedup)
BYTES_PER_ELEM = {"fwd": 2, "fwd+bwd": 3, "bwd": None}


def reference_fn(x, p):
    return reference.bernoulli_kl_div_with_logits(x, p)


def bce_minus_entropy(x, p):
    bce = F.binary_cross_entropy_with_logits(x, p, reduction="sum")
    return (bce + (torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)).sum()) / x.shape[0]


def providers(device: torch.device) -> dict:
    out = {}
    for b in ("cuda", "triton") if device.type == "cuda" else ("cpu",):
        ok, why = _usable(b, device)
        out[f"kl_ext KL {b}"] = (lambda x, p, b=b: kl_ext.bernoulli_kl_div_with_logits(x, p, backend=b)) if ok else why
        out[f"kl_ext BCE {b}"] = ((lambda x, p, b=b: kl_ext.binary_cross_entropy_with_logits(x, p, backend=b)),
                                  reference.binary_cross_entropy_with_logits) if ok else why
    bce = torch.nn.BCEWithLogitsLoss()
    out["BCEWithLogitsLoss eager"] = (bce, reference.binary_cross_entropy_with_logits)
    out["BCEWithLogitsLoss compiled"] = (torch.compile(lambda x, p: bce(x, p), dynamic=False),
                                         reference.binary_cross_entropy_with_logits)
    out["BCE - entropy eager"] = bce_minus_entropy
    out["reference KL compiled"] = torch.compile(reference_fn, dynamic=False)
    return out


def make_inputs(N, C, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(N, C, device=device, generator=g) * 2).to(dtype)
    p = torch.rand(N, C, device=device, generator=g).to(dtype)
    return x, p
