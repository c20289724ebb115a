"""Softmax KL from logits: kl_ext backends vs nn.KLDivLoss (as users write it), the eager and compiled
reference, and Liger-Kernel. Student gradient only, teacher logits, reduction='batchmean'.

Floor (elements moved per input element): forward = read student + teacher (2); forward+backward = those
reads + write the student gradient (3). Backward alone has no common floor (it depends on what the forward
saved; kl_ext computes the gradient in the forward and its backward moves no bytes when grad_output is 1),
so that mode reports time only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kl_ext
from kl_ext import reference
from kl_ext._backends import _usable

OP = "kl"
BASELINE = "nn.KLDivLoss eager"  # the eager call users write (benchmarks/run.py's first speedup)
BYTES_PER_ELEM = {"fwd": 2, "fwd+bwd": 3, "bwd": None}


def reference_fn(s, t):
    return reference.kl_div_with_logits(s, t)


def providers(device: torch.device) -> dict:
    """name -> loss_fn(student, teacher_logits), or a string saying why it is skipped."""
    out = {}
    for b in ("cuda", "triton") if device.type == "cuda" else ("cpu",):
        ok, why = _usable(b, device)
        out[f"kl_ext {b}"] = (lambda s, t, b=b: kl_ext.kl_div_with_logits(s, t, backend=b)) if ok else why
    kldiv = torch.nn.KLDivLoss(reduction="batchmean")
    out["nn.KLDivLoss eager"] = lambda s, t: kldiv(F.log_softmax(s, -1), F.softmax(t, -1))
    out["reference eager"] = reference_fn
    out["reference compiled"] = torch.compile(reference_fn, dynamic=False)
    if device.type == "cuda":  # Liger-Kernel is Triton on GPUs only
        try:
            from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
            liger_kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
            liger_jsd = LigerJSD(beta=0.0)
            out["liger KLDIV (+torch lsm)"] = lambda s, t: liger_kl(F.log_softmax(s, -1), F.log_softmax(t, -1))
            out["liger JSD beta=0"] = lambda s, t: liger_jsd(F.log_softmax(s, -1), F.log_softmax(t, -1))
        except Exception as e:  # noqa: BLE001 (any import failure means: not available here)
            out["liger"] = f"Liger-Kernel not importable ({type(e).__name__}: {e})"
    return out


def make_inputs(N, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(N, V, device=device, generator=g) * 2).to(dtype)
    t = (torch.randn(N, V, device=device, generator=g) * 2).to(dtype)
    return s, t
