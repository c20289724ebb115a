"""Vocab-parallel losses (kl_ext.distributed), forward + backward, teacher logits, fp32, 'batchmean':

1. world: WORLD gloo processes, each with its (rows, V / WORLD) shard and 1 / WORLD of the threads, against one
   process with all the threads on the gathered (rows, V); median wall time per step, and the bytes each rank
   sends into all-reduces per step (counted) against the bytes a gather of the logits would move.
   The LM-head-fused loss the same way: vocab_parallel_linear_distillation_loss with each rank's (V / WORLD, H)
   shard of the student's and the teacher's heads, against linear_distillation_loss on the whole heads (the
   logits never made whole in either; here they are not even gathered).
2. passes: on this device, one process, the per-rank kernel work of the vocab-parallel protocol (statistics pass
   + finishing pass, as kl_ext.distributed runs them, without communication) against the fused single-process op
   on the same rows: what splitting the vocabulary costs a rank besides the all-reduces.

    python -m benchmarks.bench_distributed [--rows 4096] [--vocab 32000] [--hidden 256] [--world 2] [--reps 5]
                                           [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import sync, time_ms


def _median_ms(fn, reps, barrier=None):
    times = []
    for _ in range(reps + 1):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def _inputs(rows, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 2, torch.randn(rows, V, generator=g) * 2


def _heads(rows, V, H, seed=1):
    """Student hidden states and head, teacher hidden states (2H) and head, as an LM-head loss takes them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, H, generator=g), torch.randn(V, H, generator=g) * H ** -0.5,
            torch.randn(rows, 2 * H, generator=g), torch.randn(V, 2 * H, generator=g) * (2 * H) ** -0.5)


def _rank_main(rank, world, store, out, rows, V, H, reps, threads):
    import torch.distributed as dist
    from kl_ext.distributed import (vocab_parallel_jsd_with_logits, vocab_parallel_kl_div_with_logits,
                                    vocab_parallel_linear_distillation_loss)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, t = _inputs(rows, V)
    cols = torch.arange(V).chunk(world)[rank]
    xs = x[:, int(cols[0]):int(cols[-1]) + 1].contiguous().requires_grad_()
    ts = t[:, int(cols[0]):int(cols[-1]) + 1].contiguous()
    sent = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    result = {}
    for name, fn in (("kl", vocab_parallel_kl_div_with_logits), ("jsd", vocab_parallel_jsd_with_logits)):
        def step():
            xs.grad = None
            fn(xs, ts, check_ranks=False).backward()
        ms = _median_ms(step, reps, dist.barrier)
        sent.clear()
        dist.all_reduce = counting
        step()
        dist.all_reduce = real
        result[name] = {"ms": ms, "allreduce_bytes": sum(sent), "allreduces": len(sent)}
    hx, hw, tx, tw = _heads(rows, V, H)
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    hx.requires_grad_()
    hw = hw[lo:hi].contiguous().requires_grad_()
    tw = tw[lo:hi].contiguous()

    def step():
        hx.grad = hw.grad = None
        vocab_parallel_linear_distillation_loss(hx, hw, tx, target_linear_weight=tw, check_ranks=False).backward()
    ms = _median_ms(step, reps, dist.barrier)
    sent.clear()
    dist.all_reduce = counting
    step()
    dist.all_reduce = real
    result["linear"] = {"ms": ms, "allreduce_bytes": sum(sent), "allreduces": len(sent)}
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(result, f)


def world_rows(rows, V, H, world, reps):
    import kl_ext
    cores = torch.get_num_threads()
    x, t = _inputs(rows, V)
    x.requires_grad_()
    single = {}
    for name, fn in (("kl", kl_ext.kl_div_with_logits), ("jsd", kl_ext.jsd_with_logits)):
        def step():
            x.grad = None
            fn(x, t).backward()
        single[name] = _median_ms(step, reps)
    hx, hw, tx, tw = _heads(rows, V, H)
    hx.requires_grad_()
    hw.requires_grad_()

    def step():
        hx.grad = hw.grad = None
        kl_ext.linear_distillation_loss(hx, hw, tx, target_linear_weight=tw).backward()
    single["linear"] = _median_ms(step, reps)
    d = tempfile.mkdtemp()
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_distributed", "--rank", str(r), "--world",
                               str(world), "--store", os.path.join(d, "store"), "--out", os.path.join(d, f"{r}.json"),
                               "--rows", str(rows), "--vocab", str(V), "--hidden", str(H), "--reps", str(reps),
                               "--threads", str(max(1, cores // world))]) for r in range(world)]
    for p in procs:
        assert p.wait() == 0, "a rank failed"
    ranks = [json.load(open(os.path.join(d, f"{r}.json"))) for r in range(world)]
    print(f"\n{world} gloo ranks x {max(1, cores // world)} threads vs 1 process x {cores} threads; "
          f"({rows}, {V}) fp32, fwd+bwd, median of {reps}; linear: the LM-head loss from ({rows}, {H}) hidden "
          f"states and ({V}, {H}) heads (teacher: {2 * H}), KL")
    print("| loss | 1 process ms | slowest rank ms | ratio | all-reduces | bytes per rank | gather of the logits |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gather = 2 * rows * V * 4 * (world - 1) // world  # student + teacher shards a rank would receive
    for name in ("kl", "jsd", "linear"):
        ms = max(r[name]["ms"] for r in ranks)
        print(f"| {name} | {single[name]:.1f} | {ms:.1f} | {ms / single[name]:.2f}x | {ranks[0][name]['allreduces']} | "
              f"{ranks[0][name]['allreduce_bytes']:,} | {gather:,} |")


def passes_rows(rows, V, world, reps, device):
    """Per-rank kernel work: statistics + finishing pass on a (rows, V / world) shard vs the fused op on it."""
    from kl_ext._backends import op, resolve
    be = resolve("auto", device)
    x, t = (a[:, : V // world].contiguous().to(device) for a in _inputs(rows, V))
    acc = torch.float32
    gs = torch.tensor(1.0 / rows, device=device)
    given = torch.stack([torch.logsumexp(x, -1) + 0.5, torch.logsumexp(t, -1) + 0.5,
                         torch.zeros(rows, device=device), torch.zeros(rows, device=device)], 1)
    print(f"\nper-rank kernel passes on a ({rows}, {V // world}) fp32 shard, backend {be!r}, {device.type}, "
          f"median ms of {reps}")
    print("| loss | fused op (fwd+grad) | statistics pass | finishing pass(es) | vocab-parallel total | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, opts in (("kl_div_with_logits_fwd", ("forward",)), ("divergence_with_logits_fwd", ("jsd", 0.5))):
        f = op(be, name)
        fused = time_ms(lambda: f(x, t, None, "logits", 1.0, *opts, True, False, gs), device, reps)
        stats = time_ms(lambda: f(x, t, None, "logits", 1.0, *opts, False, False, None, x.new_empty((rows, 0))),
                        device, reps)
        finish = time_ms(lambda: f(x, t, None, "logits", 1.0, *opts, True, False, gs, given), device, reps)
        if name.startswith("divergence"):  # the JSD's loss pass (its sums) before the gradient pass
            finish += time_ms(lambda: f(x, t, None, "logits", 1.0, *opts, False, False, None, given), device,
                              reps)
        sync(device)
        total = stats + finish
        print(f"| {name.split('_')[0]} | {fused:.2f} | {stats:.2f} | {finish:.2f} | {total:.2f} | "
              f"{total / fused:.2f}x |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rank is not None:
        return _rank_main(a.rank, a.world, a.store, a.out, a.rows, a.vocab, a.hidden, a.reps, a.threads)
    device = torch.device(a.device)
    if device.type == "cpu":
        world_rows(a.rows, a.vocab, a.hidden, a.world, a.reps)
    passes_rows(a.rows, a.vocab, a.world, a.reps, device)


if __name__ == "__main__":
    main()
