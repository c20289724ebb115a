"""Times kl_ext's losses against the PyTorch code they replace, on whatever this machine has.

On a GPU: kl_ext's CUDA and Triton kernels against eager PyTorch, torch.compile and Liger-Kernel (when installed),
over vocabulary sizes V from 4096 to 262144. On a CPU-only machine: kl_ext's C++ kernels against eager PyTorch and
torch.compile, at LLM-sized rows (V = 32000) and, for the Bernoulli KL, many short rows. Each op is also timed on a
small batch (8 x 1000), where the cost of a call matters more than the arithmetic.

Prints a table (time; for the large losses the speed as a share of a plain memory copy), writes results.csv and
plots (PNG) to --out, then how many times faster each kl_ext row is than the code users write by hand and than the
fastest PyTorch alternative (eager or compiled). --quick is what `make run` runs (about a minute on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys

import torch
from tqdm import tqdm

from benchmarks import bench_bernoulli_kl_div_with_logits as bern
from benchmarks import bench_divergences
from benchmarks import bench_jsd_with_logits as jsd
from benchmarks import bench_kl_div_with_logits as kl
from benchmarks import bench_sparse_kl_div_with_logits as sparse
from benchmarks.common import copy_bandwidth_gbps, plot, print_table, run_op, write_csv

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_NV = 1 << 29
GPU_VS = [4096, 32000, 65536, 128256, 262144]
GPU_BERNOULLI = [(1 << 20, 512), (1 << 17, 4096), (1 << 15, 16384)]
# Small losses, where dispatch and launches dominate: fwd+bwd, wall time per step (and on a GPU the
# kernels' own time, from CUDA-graph replay over 32 input sets).
SMALL = [(8, 1000), (64, 4096)]
# `make run`'s quick CPU run: the headline losses, without the reference formula's eager run (nn.KLDivLoss is the
# eager code users write); `make bench` times them all.
QUICK_CPU_OPS = ("kl", "jsd", "bernoulli")
QUICK_SKIP = {"reference eager"}
# op -> its benchmark (OP, providers, make_inputs, reference_fn, BYTES_PER_ELEM, BASELINE: the eager call users
# write, the speedups' first reference); the Bernoulli losses take their own shapes, the rest the KL's.
OPS = {"kl": kl, "bernoulli": bern, "jsd": jsd, "sparse": sparse, **bench_divergences.OPS}


def plan(device, quick):
    if device.type == "cuda":
        vs = GPU_VS[:2] if quick else GPU_VS
        return [(GPU_NV // v, v) for v in vs], GPU_BERNOULLI[:1] if quick else GPU_BERNOULLI
    # CPU: LLM-sized rows (the sweep is for GPUs); quick: a quarter of the rows, so the eager peers (seconds a call
    # at 4096 x 32000) finish within `make run`'s minute.
    if quick:
        return [(512, 32000)], [(16384, 1000)]
    return [(32768, 4096), (4096, 32000), (1024, 128256)], [(65536, 1000), (8192, 8192)]  # N*V ~ 2^27


def main(argv=None):
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=Help)
    ap.add_argument("--quick", action="store_true",
                    help="one shape per op, forward + backward only, float32 on a CPU / bfloat16 on a GPU")
    ap.add_argument("--out", default="bench_out", help="folder for results.csv and the plots")
    ap.add_argument("--dtypes", default=None,
                    help="comma list of fp32,bf16,fp16 (default: fp32 on a CPU; bf16,fp16,fp32 on a GPU, bf16 with "
                         "--quick)")
    ap.add_argument("--modes", default=None,
                    help="comma list of fwd (loss only), fwd+bwd (loss and gradient: a training step), bwd "
                         "(backward alone) (default: all three; fwd+bwd with --quick)")
    ap.add_argument("--ops", default=None,
                    help=f"comma list of the losses to time, of {','.join(OPS)} (default: all; "
                         f"{','.join(QUICK_CPU_OPS)} with --quick on a CPU)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per row on a CPU (default: 5, 3 with --quick; a GPU times with "
                         "triton.testing.do_bench)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the GPU when there is one; cpu times the CPU kernels on a machine with a GPU")
    args = ap.parse_args(argv)

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    default_dtypes = ("bf16" if args.quick else "bf16,fp16,fp32") if gpu else "fp32"
    default_modes = "fwd+bwd" if args.quick else "fwd,fwd+bwd,bwd"
    dtypes = [DTYPES[d] for d in (args.dtypes or default_dtypes).split(",")]
    modes = (args.modes or default_modes).split(",")
    kl_shapes, bern_shapes = plan(device, args.quick)
    reps = args.reps or (3 if args.quick else 5)
    name = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    cuda = f"; CUDA {torch.version.cuda}" if gpu else ""
    print(f"device: {name}; torch {torch.__version__}{cuda}; python {sys.version.split()[0]}")
    os.makedirs(args.out, exist_ok=True)

    # torch's own log lines (e.g. cpp_extension's "No CUDA runtime is found" when Inductor compiles on a CPU-only
    # box) would land inside the progress bar.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    copy = copy_bandwidth_gbps(device)
    wanted = (args.ops or ",".join(QUICK_CPU_OPS if args.quick and not gpu else OPS)).split(",")
    unknown = set(wanted) - set(OPS)
    if unknown:
        ap.error(f"unknown --ops {sorted(unknown)}; choose from {','.join(OPS)}")
    jobs = [(OPS[o], bern_shapes if o == "bernoulli" else kl_shapes) for o in OPS if o in wanted]
    if "sparse" in wanted:
        for N, V in kl_shapes:
            print(f"sparse {N}x{V}: {sparse.bytes_saved(N, V, sparse.K, dtypes[0])}")
    provs = {mod.OP: {k: v for k, v in mod.providers(device).items() if not (args.quick and k in QUICK_SKIP)}
             for mod, _ in jobs}
    n_small = (1 if args.quick else len(SMALL)) * (2 if gpu else 1)
    total = sum(sum(not isinstance(p, str) for p in provs[mod.OP].values()) * (len(shapes) * len(dtypes) * len(modes)
                                                                                + n_small) for mod, shapes in jobs)
    rows = []
    with tqdm(total=total, desc="benchmarks", file=sys.stderr) as bar:
        for mod, shapes in jobs:
            rows += run_op(mod.OP, provs[mod.OP], mod.make_inputs, mod.reference_fn, mod.BYTES_PER_ELEM, device,
                           shapes, dtypes, modes, reps, bar)
        for mod, _ in jobs:
            for timing in ("wall", "graph") if gpu else ("wall",):
                rows += run_op(mod.OP, provs[mod.OP], mod.make_inputs, mod.reference_fn, mod.BYTES_PER_ELEM, device,
                               SMALL[:1] if args.quick else SMALL, dtypes[:1], ["fwd+bwd"], reps, bar,
                               timing=timing)
    for r in rows:
        r.pct_copy = 100 * r.gbps / copy
    print_table(rows, copy)
    write_csv(rows, os.path.join(args.out, "results.csv"))
    pngs = plot(rows, copy, args.out, name)
    print(f"\nwrote {os.path.join(args.out, 'results.csv')} and {len(pngs)} plot(s) to {args.out}/")
    _speedups(rows)


def _speedups(rows):
    """The headline: each kl_ext provider against the eager baseline users write, then against the fastest torch
    peer of its row (eager or compiled, Liger where installed), per shape, forward and forward+backward (backward
    alone is not comparable: kl_ext does that work in the forward)."""
    base_name = {"bce": "BCEWithLogitsLoss eager", **{o: m.BASELINE for o, m in OPS.items()}}
    ours = [r for r in rows if r.provider.startswith("kl_ext") and r.ms == r.ms and r.mode != "bwd"]

    def peers(r):
        key = (r.op, r.mode, r.timing, r.dtype, r.shape)
        # The BCE drop-in's peers are the BCE calls; the Bernoulli KL's are the KL formulas.
        bce = "BCE" in r.provider
        return [b for b in rows if (b.op, b.mode, b.timing, b.dtype, b.shape) == key and b.ms == b.ms
                and not b.provider.startswith("kl_ext")
                and (r.op != "bernoulli" or ("BCEWithLogits" in b.provider) == bce)]

    def line(r, base):
        ratio = base.ms / r.ms
        verdict = f"{ratio:5.2f}x faster than" if ratio >= 1 else f"{1 / ratio:5.2f}x slower than"
        print(f"{r.op:<10}{r.mode:<9}{r.timing:<7}{r.dtype:<9}{r.shape:<14}{r.provider:<{width}} {verdict} "
              f"{base.provider}")

    width = max([len(r.provider) for r in ours] + [8])

    print("\nkl_ext against the eager call users write (nn.KLDivLoss, BCEWithLogitsLoss, the plain formulas):")
    for r in ours:
        base = next((b for b in peers(r) if b.provider == base_name["bce" if "BCE" in r.provider else r.op]), None)
        if base is not None:
            line(r, base)
    print("\nkl_ext against the fastest torch peer of each row (eager or compiled):")
    for r in ours:
        found = peers(r) if "dense" not in r.provider else []  # the sparse op's dense-teacher yardstick: no peer
        if found:
            line(r, min(found, key=lambda b: b.ms))


if __name__ == "__main__":
    main()
