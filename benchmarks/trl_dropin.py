"""TRL's generalized JSD (its formula as TRL's GKD trainer writes it, eager and compiled) against kl_ext's drop-in
(kl_ext.integrations.trl.generalized_jsd_loss): one fwd+bwd step's time and peak memory, each provider in a fresh
process so that its peak is its own.

    python -m benchmarks.trl_dropin [--shape 4096x32000] [--dtype fp32] [--device cpu] [--reps 3]

Peak: on a GPU torch.cuda.max_memory_allocated beyond the inputs; on a CPU the process's peak resident set
(VmHWM) beyond what it held after making the inputs (compiled code's buffers included, which no tensor hook sees).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

PROVIDERS = ["kl_ext TRL drop-in", "TRL formula eager", "TRL formula compiled"]


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, N: int, V: int, dtype: torch.dtype, device: torch.device, reps: int) -> dict:
    from benchmarks.bench_jsd_with_logits import BETA, make_inputs, trl_formula
    from benchmarks.common import peak_extra_mb, time_ms
    from kl_ext.integrations import trl as kl_trl
    fn = {"kl_ext TRL drop-in": lambda s, t: kl_trl.generalized_jsd_loss(s, t, beta=BETA),
          "TRL formula eager": trl_formula,
          "TRL formula compiled": torch.compile(trl_formula, dynamic=False)}[name]
    s, t = make_inputs(N, V, dtype, device)
    x = s.detach().requires_grad_()

    def step():
        fn(x, t).backward()
        x.grad = None
    step()  # compiles and warms up
    if device.type == "cuda":
        peak = peak_extra_mb(step, device, 0)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux): compilation's peak is not the step's
        before = _rss_mib("VmRSS")
        step()
        peak = _rss_mib("VmHWM") - before
    return {"provider": name, "ms": time_ms(step, device, reps=reps), "peak_mib": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4096x32000")
    ap.add_argument("--dtype", default=None, help="fp32 (CPU default) or bf16 (GPU default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    N, V = map(int, args.shape.lower().split("x"))
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if args.child:
        print(json.dumps(child(args.child, N, V, dtype, device, args.reps)))
        return
    print(f"TRL generalized JSD (beta 0.5, batchmean) fwd+bwd, {N} x {V} {dtype_name} on {args.device}: "
          f"torch {torch.__version__}")
    print(f"{'provider':<24}{'ms':>10}{'peak MiB':>10}")
    for name in PROVIDERS:
        cmd = [sys.executable, "-m", "benchmarks.trl_dropin", "--child", name, "--shape", args.shape, "--dtype",
               dtype_name, "--device", args.device, "--reps", str(args.reps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name:<24} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<24}{r['ms']:>10.1f}{r['peak_mib']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
