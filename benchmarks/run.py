"""The benchmark entry point: runs on whatever is here. On a GPU: every GPU provider over the V sweep;
on a CPU-only machine: the cpu backend against eager and compiled torch at the foundation issue's sizes.

    python -m benchmarks.run [--quick] [--out bench_out] [--dtypes bf16,fp32] [--modes fwd,fwd+bwd,bwd]
                             [--device cpu]
Writes a table to stdout, results.csv and one PNG per (op, mode, dtype) to --out, then each kl_ext row against
the eager call users write and against the fastest torch peer of the row (eager or compiled).
--device cpu runs the CPU rows on a machine that has a GPU too (another machine for the CPU comparison).
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
# op -> its benchmark (OP, providers, make_inputs, reference_fn, BYTES_PER_ELEM, BASELINE: the eager call users
# write, the speedups' first reference); the Bernoulli losses take their own shapes, the rest the KL's.
OPS = {"kl": kl, "bernoulli": bern, "jsd": jsd, "sparse": sparse, **bench_divergences.OPS}


def plan(device, quick):
    if device.type == "cuda":
        vs = GPU_VS[:2] if quick else GPU_VS
        return [(GPU_NV // v, v) for v in vs], GPU_BERNOULLI[:1] if quick else GPU_BERNOULLI
    # CPU: the foundation issue's speed-target sizes; the sweep is for GPUs.
    if quick:
        return [(4096, 32000)], [(65536, 1000)]
    return [(32768, 4096), (4096, 32000), (1024, 128256)], [(65536, 1000), (8192, 8192)]  # N*V ~ 2^27


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes, fwd+bwd only, fp32 (CPU) / bf16 (GPU)")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    ap.add_argument("--modes", default=None, help="comma list of fwd,fwd+bwd,bwd")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {','.join(OPS)}")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (GPU uses do_bench)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the GPU when there is one")
    args = ap.parse_args(argv)

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    default_dtypes = ("bf16" if args.quick else "bf16,fp16,fp32") if gpu else "fp32"
    default_modes = "fwd+bwd" if args.quick else "fwd,fwd+bwd,bwd"
    dtypes = [DTYPES[d] for d in (args.dtypes or default_dtypes).split(",")]
    modes = (args.modes or default_modes).split(",")
    kl_shapes, bern_shapes = plan(device, args.quick)
    name = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}; python {sys.version.split()[0]}")
    os.makedirs(args.out, exist_ok=True)

    # torch's own log lines (e.g. cpp_extension's "No CUDA runtime is found" when Inductor compiles on a CPU-only
    # box) would land inside the progress bar.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    copy = copy_bandwidth_gbps(device)
    wanted = args.ops.split(",")
    unknown = set(wanted) - set(OPS)
    if unknown:
        ap.error(f"unknown --ops {sorted(unknown)}; choose from {','.join(OPS)}")
    jobs = [(OPS[o], bern_shapes if o == "bernoulli" else kl_shapes) for o in OPS if o in wanted]
    if "sparse" in wanted:
        for N, V in kl_shapes:
            print(f"sparse {N}x{V}: {sparse.bytes_saved(N, V, sparse.K, dtypes[0])}")
    provs = {mod.OP: mod.providers(device) for mod, _ in jobs}
    n_small = (1 if args.quick else len(SMALL)) * (2 if gpu else 1)
    total = sum(sum(not isinstance(p, str) for p in provs[mod.OP].values()) * (len(shapes) * len(dtypes) * len(modes)
                                                                                + n_small) for mod, shapes in jobs)
    rows = []
    with tqdm(total=total, desc="benchmarks", file=sys.stderr) as bar:
        for mod, shapes in jobs:
            rows += run_op(mod.OP, provs[mod.OP], mod.make_inputs, mod.reference_fn, mod.BYTES_PER_ELEM, device,
                           shapes, dtypes, modes, args.reps, bar)
        for mod, _ in jobs:
            for timing in ("wall", "graph") if gpu else ("wall",):
                rows += run_op(mod.OP, provs[mod.OP], mod.make_inputs, mod.reference_fn, mod.BYTES_PER_ELEM, device,
                               SMALL[:1] if args.quick else SMALL, dtypes[:1], ["fwd+bwd"], args.reps, bar,
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
