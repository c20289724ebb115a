"""The divergences of divergence_with_logits_fwd beyond the JSD (benchmarks/bench_jsd_with_logits.py): each an op of
its own here (OPS, run by benchmarks/run.py), kl_ext backends against the loss as users write it in eager torch,
compiled, and Liger where it has one. Teacher logits, 'batchmean', student gradient only; the inputs of the KL.

Floor (elements moved per input element): forward = read student + teacher (2); forward+backward = those
reads + write the gradient (3); backward alone: time only.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from kl_ext._backends import _usable
from kl_ext._registry import bind
from benchmarks.bench_kl_div_with_logits import make_inputs

BYTES_PER_ELEM = {"fwd": 2, "fwd+bwd": 3, "bwd": None}
ALPHA = 0.1
# The registry's divergences benchmarked here, with their parameters: kl_ext's functional and reference of each.
TVD, SKEW = bind("tvd"), bind("skew_kl", alpha=ALPHA)


def _ours(device, fn):
    out = {}
    for b in ("cuda", "triton") if device.type == "cuda" else ("cpu",):
        ok, why = _usable(b, device)
        out[f"kl_ext {b}"] = (lambda s, t, b=b: fn(s, t, backend=b)) if ok else why
    return out


def tvd_formula(s, t):
    """1/2 sum |p - q| on softmaxes, as written in eager torch."""
    return 0.5 * (F.softmax(t.float(), -1) - F.softmax(s.float(), -1)).abs().sum() / s.shape[0]


def tvd_providers(device: torch.device) -> dict:
    out = _ours(device, TVD.functional())
    out["torch formula eager"] = tvd_formula
    out["torch formula compiled"] = torch.compile(tvd_formula, dynamic=False)
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerTVDLoss
            liger = LigerTVDLoss(reduction="batchmean")  # on probabilities: the softmaxes are torch's
            out["liger TVD (+torch softmax)"] = lambda s, t: liger(F.softmax(s, -1), F.softmax(t, -1))
        except Exception as e:  # noqa: BLE001 (any import failure means: not available here)
            out["liger TVD"] = f"Liger-Kernel not importable ({type(e).__name__}: {e})"
    return out


def skew_formula(s, t, alpha=ALPHA):
    """DistiLLM's skew KL as its training code computes it: mix the probabilities, take the log, a KL."""
    q, p = F.softmax(s.float(), -1), F.softmax(t.float(), -1)
    log_m = torch.log(alpha * p + (1 - alpha) * q)
    return (p * (F.log_softmax(t.float(), -1) - log_m)).sum() / s.shape[0]


def skew_providers(device: torch.device) -> dict:
    out = _ours(device, SKEW.functional())
    out["DistiLLM formula eager"] = skew_formula
    out["DistiLLM formula compiled"] = torch.compile(skew_formula, dynamic=False)
    return out


OPS = {
    "tvd": types.SimpleNamespace(OP="tvd", providers=tvd_providers, make_inputs=make_inputs,
                                 reference_fn=lambda s, t: TVD.reference()(s, t),
                                 BYTES_PER_ELEM=BYTES_PER_ELEM, BASELINE="torch formula eager"),
    "skew": types.SimpleNamespace(OP="skew", providers=skew_providers, make_inputs=make_inputs,
                                  reference_fn=lambda s, t: SKEW.reference()(s, t),
                                  BYTES_PER_ELEM=BYTES_PER_ELEM, BASELINE="DistiLLM formula eager"),
}
