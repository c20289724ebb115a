"""Sparse (top-k) teacher KL, the offline-distillation loss from cached teacher log-probs (k = 64 by default,
'batchmean', tail "bucket"): kl_ext backends vs the unfused torch users write (log_softmax, gather, logsumexp,
tail as 1 - sum), eager and compiled, and kl_ext's dense KL on the full teacher logits (what caching k saves:
the dense loss reads a V-wide teacher row, the sparse one k values). Student gradient only.

Floor (elements moved per student element, the k-sized teacher left out): forward = read the student (1);
forward+backward = read it + write its gradient (2), 2/3 of the dense KL's.
"""
from __future__ import annotations

import torch

import kl_ext
from kl_ext import reference
from kl_ext._backends import _usable

OP = "sparse"
BASELINE = "unfused torch eager"  # the eager call users write (benchmarks/run.py's first speedup)
K = 64
BYTES_PER_ELEM = {"fwd": 1, "fwd+bwd": 2, "bwd": None}


class Teacher:
    """The cached teacher of a batch (top-k indices and log-probs), with its full logits for the dense baseline.
    Rows slice and .double() converts, as the benchmark harness does to tensors."""

    def __init__(self, idx, lp, logits):
        self.idx, self.lp, self.logits = idx, lp, logits

    def __getitem__(self, rows):
        return Teacher(self.idx[rows], self.lp[rows], self.logits[rows])

    def double(self):
        return Teacher(self.idx, self.lp.double(), self.logits.double())


def reference_fn(s, t):
    return reference.sparse_kl_div_with_logits(s, t.idx, t.lp)


def unfused(s, t):
    """Sparse-teacher KL as distillation code writes it in torch: gather the student's log-probs at the cached
    classes, the teacher's tail mass 1 - sum p, the student's as 1 - sum q (which cancels near convergence)."""
    ls = torch.log_softmax(s.float(), -1)
    ls_s = ls.gather(-1, t.idx)
    p = t.lp.exp()
    head = (p * (t.lp - ls_s)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp(min=0)
    q_tail = (1 - ls_s.exp().sum(-1)).clamp(min=1e-30)
    tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp(min=1e-30)) - torch.log(q_tail)), 0.0)
    return (head + tail).sum() / s.shape[0]


def providers(device: torch.device) -> dict:
    out = {}
    for b in ("cuda", "triton") if device.type == "cuda" else ("cpu",):
        ok, why = _usable(b, device)
        out[f"kl_ext {b}"] = ((lambda s, t, b=b: kl_ext.sparse_kl_div_with_logits(s, t.idx, t.lp, backend=b))
                              if ok else why)
    out["unfused torch eager"] = unfused
    out["unfused torch compiled"] = torch.compile(unfused, dynamic=False)
    dense = "cuda" if device.type == "cuda" else "cpu"
    ok, why = _usable(dense, device)
    out[f"kl_ext {dense} dense (V-wide teacher)"] = (
        (lambda s, t: kl_ext.kl_div_with_logits(s, t.logits, backend=dense),
         lambda s, t: reference.kl_div_with_logits(s, t.logits)) if ok else why)
    return out


def make_inputs(N, V, dtype, device, seed=0, k=None):
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(N, V, device=device, generator=g) * 2).to(dtype)
    logits = (torch.randn(N, V, device=device, generator=g) * 2).to(dtype)
    idx, lp = kl_ext.topk_target(logits, min(k or K, V))
    return s, Teacher(idx, lp, logits)


def bytes_saved(N, V, k, dtype) -> str:
    """What caching k log-probs (+ int64 indices) instead of the V-wide teacher logits saves per batch."""
    dense = N * V * torch.finfo(dtype).bits // 8
    sparse = N * k * (4 + 8)
    return f"teacher {dense / 2**20:.0f} MiB dense vs {sparse / 2**20:.1f} MiB top-{k} ({dense / sparse:.0f}x less)"

