"""Fused LM-head distillation (linear_distillation_loss, teacher as hidden states + its LM head, forward KL,
'batchmean'): one training step's time and peak memory against

  * the same GEMMs alone, chunked the same way (student forward, input gradient, weight gradient, teacher
    forward): the floor for any fused head loss;
  * materialized logits + kl_ext's loss (kl_div_with_logits on the full (rows x V) logits);
  * torch's F.linear_cross_entropy (chunked, LinearCrossEntropyOptions) with the teacher's probabilities as
    soft targets (the same student gradient as the forward KL), which needs those probabilities materialized;
  * on a GPU, Liger-Kernel's LigerFusedLinearKLDivLoss / LigerFusedLinearJSDLoss when installed.

    python -m benchmarks.bench_linear_distillation_loss [--rows 2048 --hidden 1024 --vocab 32000 --dtype fp32]
CPU default 2048 x 1024 x 32000 fp32; GPU default 8192 x 4096 x 128256 bf16. Peak memory: beyond the inputs
and weights (torch.cuda.max_memory_allocated on a GPU; on a CPU the tensors the step's eager ops allocate,
benchmarks.common.peak_tensor_bytes).
"""
from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

import kl_ext
from kl_ext.linear_distillation_loss import default_chunk_size
from benchmarks.common import peak_tensor_bytes, time_ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(rows, hidden, vocab, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: (torch.randn(*s, device=device, generator=g) * s[-1] ** -0.5).to(dtype)  # noqa: E731
    return r(rows, hidden), r(vocab, hidden), r(rows, hidden), r(vocab, hidden)


def providers(x, w, tx, tw, device, chunk=None):
    rows, vocab = x.shape[0], w.shape[0]
    chunk = chunk or default_chunk_size(rows, x.shape[1], vocab, cuda=device.type == "cuda")
    dz = torch.randn(chunk, vocab, device=device, dtype=x.dtype) * 1e-3

    def gemms():
        gw = torch.zeros_like(w, dtype=torch.float32)
        gx = torch.empty_like(x)
        for s in range(0, rows, chunk):
            xc = x[s:s + chunk]
            z, t = xc @ w.t(), tx[s:s + chunk] @ tw.t()  # noqa: F841  (the forward GEMMs' outputs)
            d = dz[:xc.shape[0]]
            torch.mm(d, w, out=gx[s:s + chunk])
            if gw.dtype == xc.dtype:
                gw.addmm_(d.t(), xc)
            else:
                gw += d.t() @ xc

    def fused():
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        kl_ext.linear_distillation_loss(xs, ws, tx, target_linear_weight=tw, chunk_size=chunk).backward()

    def materialized():
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        with torch.no_grad():
            t = tx @ tw.t()
        kl_ext.kl_div_with_logits(xs @ ws.t(), t).backward()

    def torch_lce():
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        with torch.no_grad():
            p = torch.softmax((tx @ tw.t()).float(), -1).to(x.dtype)
        F.linear_cross_entropy(xs, ws, p, reduction="sum",
                               options=torch.nn.LinearCrossEntropyOptions()).div(rows).backward()

    out = {"GEMMs alone (same chunks)": gemms, "kl_ext fused": fused, "materialized logits + kl_ext": materialized}
    if hasattr(F, "linear_cross_entropy"):
        out["F.linear_cross_entropy (teacher probs)"] = torch_lce
    else:
        print(f"skipping F.linear_cross_entropy: torch {torch.__version__} has none (torch >= 2.13)")
    if device.type == "cuda":
        try:
            # beta = 0: KL(teacher || student), the forward KL above; no hard loss (the labels are unused).
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
            liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0)
            labels = torch.randint(0, w.shape[0], (rows,), device=device)

            def liger_fused():
                xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
                liger(xs, ws, tx, tw, labels).backward()
            out["Liger FusedLinearJSD beta=0"] = liger_fused
        except Exception as e:  # noqa: BLE001 (any import failure means: not available here)
            print(f"skipping Liger: {type(e).__name__}: {e}")
    return out, chunk


def peak_mib(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return peak_tensor_bytes(fn) / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--dtype", choices=DTYPES)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk", type=int, help="rows per chunk (default: kl_ext's rule)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    rows, hidden, vocab = args.rows or (8192 if gpu else 2048), args.hidden or (4096 if gpu else 1024), \
        args.vocab or (128256 if gpu else 32000)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    x, w, tx, tw = make(rows, hidden, vocab, dtype, device)
    provs, chunk = providers(x, w, tx, tw, device, args.chunk)
    name = torch.cuda.get_device_name() if gpu else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {rows} x {hidden} x {vocab} {str(dtype)[6:]}, "
          f"fwd+bwd, chunk {chunk} rows; median of {args.reps}")
    base = None
    print(f"{'provider':<42}{'ms':>10}{'x GEMMs':>9}{'peak MiB':>10}")
    for pname, fn in provs.items():
        try:
            ms = time_ms(fn, device, args.reps)
            mib = peak_mib(fn, device)
        except Exception as e:  # noqa: BLE001 (a failing provider is reported, not fatal)
            print(f"{pname:<42} failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        base = base or ms
        print(f"{pname:<42}{ms:10.1f}{ms / base:9.2f}{mib:10.1f}")


if __name__ == "__main__":
    main()
