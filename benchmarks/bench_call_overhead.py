"""Per-call overhead: fwd+bwd wall time per step of small losses, where Python, dispatch and autograd cost as much
as the kernels. Each kl_ext loss against the eager torch call a user would write instead (the functional, and for
BCE also the nn.Module the main benchmark uses), interleaved round by round so drifts of a noisy machine hit
every provider alike; the median of the rounds is reported, with kl_ext's time over eager's.

    python -m benchmarks.bench_call_overhead [--shapes 1x1,8x1000] [--rounds 9] [--calls 1000] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import kl_ext
from benchmarks.bench_bernoulli_kl_div_with_logits import bce_minus_entropy


def providers():
    """loss -> [(name, fn(x, t, p)), ...], kl_ext first: x student logits, t teacher logits, p probabilities."""
    kldiv, bce = torch.nn.KLDivLoss(reduction="batchmean"), torch.nn.BCEWithLogitsLoss()
    return {
        "KL": [("kl_ext", lambda x, t, p: kl_ext.kl_div_with_logits(x, t)),
               ("nn.KLDivLoss eager", lambda x, t, p: kldiv(F.log_softmax(x, -1), F.softmax(t, -1)))],
        "Bernoulli KL": [("kl_ext", lambda x, t, p: kl_ext.bernoulli_kl_div_with_logits(x, p)),
                         ("BCE - entropy eager", lambda x, t, p: bce_minus_entropy(x, p))],
        "BCE": [("kl_ext", lambda x, t, p: kl_ext.binary_cross_entropy_with_logits(x, p)),
                ("F.binary_cross_entropy_with_logits", lambda x, t, p: F.binary_cross_entropy_with_logits(x, p)),
                ("nn.BCEWithLogitsLoss", lambda x, t, p: bce(x, p))],
        "JSD": [("kl_ext", lambda x, t, p: kl_ext.jsd_with_logits(x, t, beta=0.5))],
    }


def measure(shape, rounds, calls):
    """loss -> {provider: median µs per fwd+bwd step}."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).requires_grad_()
    t, p = torch.randn(*shape, generator=g), torch.rand(*shape, generator=g)
    steps = {}
    for loss, provs in providers().items():
        for name, fn in provs:
            def step(fn=fn):
                fn(x, t, p).backward()
                x.grad = None
            for _ in range(50):
                step()
            steps[(loss, name)] = step
    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            times[key].append((time.perf_counter() - t0) / calls * 1e6)
    out = {}
    for (loss, name), ts in times.items():
        out.setdefault(loss, {})[name] = statistics.median(ts)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x1,8x1000")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); torch "
          f"{torch.__version__}; median of {args.rounds} rounds x {args.calls} fwd+bwd steps, µs per step")
    print(f"{'shape':<10}{'loss':<14}{'provider':<38}{'µs':>8}{'kl_ext / it':>13}")
    for s in args.shapes.split(","):
        shape = tuple(int(d) for d in s.split("x"))
        for loss, res in measure(shape, args.rounds, args.calls).items():
            ours = res["kl_ext"]
            for name, us in res.items():
                ratio = "" if name == "kl_ext" else f"{ours / us:.3f}"
                print(f"{s:<10}{loss:<14}{name:<38}{us:8.1f}{ratio:>13}")


if __name__ == "__main__":
    main()
