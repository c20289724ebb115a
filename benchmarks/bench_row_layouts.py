"""Rows read in place: the next-token call of causal-LM distillation, shifted logits `logits[:, :-1]` of a
(B, T + 1, V) tensor (batch stride not B * T * V) and the teacher's `[:, 1:]`, against the same rows already
contiguous, forward + backward (student gradient), teacher logits, 'batchmean'. Also the same shifted call
with the two copies kl_ext made before it read strided rows (`.contiguous()` first), and nn.KLDivLoss on the
shifted views as users write it. BCE the same way with a (B, T + 1, C) multi-label head.

    python -m benchmarks.bench_row_layouts [--batch 4] [--tokens 256] [--vocab 32000] [--classes 1000]
        [--dtype fp32] [--reps 7] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

import kl_ext
from benchmarks.common import time_ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _step(loss_fn, x, t):
    x = x.detach().requires_grad_()

    def run():
        loss_fn(x, t).backward()
        x.grad = None
    return run


def cases(B, T, V, C, dtype, device, backend):
    g = torch.Generator(device=device).manual_seed(0)
    big = (torch.randn(B, T + 1, V, device=device, generator=g) * 2).to(dtype)
    teacher = (torch.randn(B, T + 1, V, device=device, generator=g) * 2).to(dtype)
    xs, ts = big[:, :-1], teacher[:, 1:]
    xc, tc = xs.contiguous(), ts.contiguous()
    kl = lambda s, t: kl_ext.kl_div_with_logits(s, t, backend=backend)  # noqa: E731
    kldiv = torch.nn.KLDivLoss(reduction="batchmean")
    head = (torch.randn(B, T + 1, C, device=device, generator=g) * 2).to(dtype)
    probs = torch.rand(B, T + 1, C, device=device, generator=g).to(dtype)
    hs, ps = head[:, :-1], probs[:, 1:]
    bce = lambda s, p: kl_ext.binary_cross_entropy_with_logits(s, p, backend=backend)  # noqa: E731
    return {
        f"KL ({B}, {T}, {V}) contiguous": _step(kl, xc, tc),
        f"KL ({B}, {T}, {V}) shifted views": _step(kl, xs, ts),
        f"KL ({B}, {T}, {V}) shifted, copied first": _step(lambda s, t: kl(s.contiguous(), t.contiguous()), xs, ts),
        f"nn.KLDivLoss ({B}, {T}, {V}) shifted views": _step(
            lambda s, t: kldiv(F.log_softmax(s, -1).flatten(0, 1), F.softmax(t, -1).flatten(0, 1)), xs, ts),
        f"BCE ({B}, {T}, {C}) contiguous": _step(bce, hs.contiguous(), ps.contiguous()),
        f"BCE ({B}, {T}, {C}) shifted views": _step(bce, hs, ps),
        f"BCE ({B}, {T}, {C}) shifted, copied first": _step(lambda s, p: bce(s.contiguous(), p.contiguous()), hs, ps),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backend = "cuda" if device.type == "cuda" else "cpu"
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"# row layouts, fwd+bwd, {args.dtype}, {name}, kl_ext backend {backend}, median of {args.reps}")
    times = {}
    for label, run in cases(args.batch, args.tokens, args.vocab, args.classes, DTYPES[args.dtype], device,
                            backend).items():
        times[label] = time_ms(run, device, args.reps)
    print("| call | ms | vs contiguous |")
    print("|---|---:|---:|")
    base = None
    for label, ms in times.items():
        if label.endswith("contiguous"):
            base = ms
        print(f"| {label} | {ms:.2f} | {ms / base:.3f}× |")


if __name__ == "__main__":
    main()
