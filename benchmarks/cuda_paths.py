"""The CUDA row engine's limits swept on this GPU (KL_EXT_CUDA_ROWS, read at each launch: one build measures every
configuration), against the Triton backend in the same run. KL (teacher logits, fwd+bwd and forward only), JSD
(beta = 0.5, fwd+bwd) and the sparse teacher (top-64 log-probs, fwd+bwd), bf16 and fp32, N * V = 2^29; % of the
floor's bytes over the device copy bandwidth (fwd+bwd: read both inputs, write the gradient; forward: read both;
sparse: read the student, write its gradient, the k-sized teacher left out).

    python -m benchmarks.cuda_paths [--quick] [--out results.jsonl]

Each configuration is a KL_EXT_CUDA_ROWS value (csrc/cuda/kl_div_with_logits.cuh, RowTune); "" is the default.
The best per row decides the defaults.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import kl_ext
from benchmarks.bench_kl_div_with_logits import make_inputs
from benchmarks.common import copy_bandwidth_gbps, time_ms

# "" the defaults; min_threads trades packs per thread for threads per row; cluster=1 is a GPU without clusters
# (rows up to 512 x 8 packs in one block, else streamed); the last three stream every row (two reads).
STREAM = "items=1,threads=32,cluster=1"
TUNES = ["", "min_threads=32", "min_threads=64", "min_threads=256", "threads=128", "items=4", "cluster=16",
         "cluster=4", "cluster=2", "cluster=1", STREAM, STREAM + ",stream_waves=2", STREAM + ",stream_waves=4"]
QUICK_TUNES = ["", "min_threads=64", "cluster=16", "cluster=1", STREAM]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations and shapes")
    ap.add_argument("--out", default=None, help="also write one JSON line per measurement here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    copy = copy_bandwidth_gbps(dev)
    print(f"{torch.cuda.get_device_name()}; copy {copy:.0f} GB/s; torch {torch.__version__}", flush=True)
    out = open(args.out, "w") if args.out else None
    tunes = QUICK_TUNES if args.quick else TUNES
    shapes = (4096, 32000, 128256) if args.quick else (4096, 16384, 32000, 65536, 128256, 262144)
    saved = os.environ.pop("KL_EXT_CUDA_ROWS", None)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for V in shapes:
                N = (1 << 29) // V
                s, t = make_inputs(N, V, dtype, dev)
                x = s.detach().requires_grad_()
                nbytes = s.numel() * s.element_size()
                idx, lp = kl_ext.topk_target(t, 64)
                kl = lambda a, **k: kl_ext.kl_div_with_logits(a, t, **k)  # noqa: E731
                # (op, mode, loss of the student, elements moved per student element at the floor)
                cases = [("kl", "fwd+bwd", kl, 3), ("kl", "fwd", kl, 2),
                         ("jsd", "fwd+bwd", lambda a, **k: kl_ext.jsd_with_logits(a, t, beta=0.5, **k), 3),
                         ("sparse", "fwd+bwd", lambda a, **k: kl_ext.sparse_kl_div_with_logits(a, idx, lp, **k), 2)]
                for op, mode, fn, moved in cases:
                    floor = moved * nbytes
                    line = f"{op:<7}{mode:<8}{str(dtype)[6:]:<9}{N}x{V:<8}"
                    for backend, tune in [("triton", "")] + [("cuda", tu) for tu in tunes]:
                        if backend not in kl_ext.available_backends():
                            continue
                        os.environ["KL_EXT_CUDA_ROWS"] = tune
                        if not tune:
                            os.environ.pop("KL_EXT_CUDA_ROWS")

                        def run():
                            if mode == "fwd":
                                with torch.no_grad():
                                    fn(s, backend=backend)
                            else:
                                fn(x, backend=backend).backward()
                                x.grad = None
                        try:
                            ms = time_ms(run, dev, reps=20)
                        except RuntimeError as e:  # e.g. a cluster of 16 this GPU cannot schedule
                            line += f" | {backend}[{tune}] error: {str(e).splitlines()[0][:60]}"
                            continue
                        pct = 100 * floor / (ms * 1e-3) / 1e9 / copy
                        line += f" | {backend}[{tune}] {ms:.3f} ms {pct:.0f}%"
                        if out:
                            out.write(json.dumps({"op": op, "mode": mode, "dtype": str(dtype)[6:], "N": N, "V": V,
                                                  "backend": backend, "tune": tune, "ms": ms, "pct_floor": pct,
                                                  "copy_gbps": copy}) + "\n")
                    print(line, flush=True)
                del s, t, x, idx, lp
                torch.cuda.empty_cache()
    finally:
        os.environ.pop("KL_EXT_CUDA_ROWS", None)
        if saved is not None:
            os.environ["KL_EXT_CUDA_ROWS"] = saved
        if out:
            out.close()


if __name__ == "__main__":
    main()
