"""Shared benchmark machinery: timing, copy bandwidth, error vs the float64 reference, tables, CSV, plots.

Effective bandwidth = the minimal bytes a mode must move (written in each bench file) / median time; it is
reported as a share of a device-to-device copy measured in the same run (read + write of a large buffer).
"""
from __future__ import annotations

import csv
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Row:
    op: str
    mode: str
    dtype: str
    shape: str
    V: int
    provider: str
    ms: float = float("nan")
    gbps: float = float("nan")
    pct_copy: float = float("nan")
    peak_extra_mb: float = float("nan")
    rel_err: float = float("nan")
    timing: str = "median"  # "median" (do_bench / events, L2 flushed), "wall" or "graph" (small sizes)
    note: str = field(default="")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps: int, warmup: int = 1, setup=None) -> float:
    """Median wall time of fn() in ms; setup(), when given, runs untimed before each call (e.g. building the
    graph a backward consumes). On CUDA without setup: triton.testing.do_bench (L2 flushed between reps);
    with setup: CUDA events, the L2 flushed in the untimed part."""
    if device.type == "cuda" and setup is None:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    reps = max(reps, 20) if device.type == "cuda" else reps
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if device.type == "cuda" else None
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        if flush is not None:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def wall_ms(fn, device, calls: int = 200) -> float:
    """Mean wall time per call of back-to-back calls, synchronized once at the end: what a training loop
    sees when the loss is small and Python dispatch and kernel launches dominate."""
    for _ in range(10):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / calls


def graph_ms(runs, replays: int = 20) -> float:
    """GPU time per call with the launch overhead taken out: every run (each on its own inputs, so no call
    finds its inputs left in L2 by the one before) captured back to back in one CUDA graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compilation, allocator, autograd state
        for run in runs[:3]:
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for run in runs:
            run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * len(runs))


def copy_bandwidth_gbps(device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Device-to-device copy (bytes read + bytes written) in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def peak_extra_mb(fn, device, baseline_bytes: int, setup=None) -> float:
    """Peak device memory during fn() beyond what was allocated before plus `baseline_bytes` (the outputs a
    provider must produce, e.g. the gradient). CUDA only; NaN elsewhere."""
    if device.type != "cuda":
        return float("nan")
    if setup is not None:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return max(0.0, (torch.cuda.max_memory_allocated() - before - baseline_bytes) / 2**20)


def peak_tensor_bytes(fn):
    """Peak bytes of the tensors that fn's torch operations allocate and keep alive at once (storages of op
    outputs, counted until the last tensor seen on them is freed; tensors that existed before are not counted).
    The CPU has no allocator statistics: this is what torch.cuda.max_memory_allocated measures on a GPU, for
    eager code (a compiled graph's buffers are not seen)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs, self.size, self.cur, self.peak = {}, {}, 0, 0

        def _drop(self, key):
            self.refs[key] -= 1
            if self.refs[key] == 0:
                self.cur -= self.size.pop(key)
                del self.refs[key]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # Views and in-place results share an argument's storage: not an allocation.
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor) and t.device.type != "meta"}
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                    continue
                key = t.untyped_storage().data_ptr()
                if key in inputs and key not in self.size:
                    continue
                if key not in self.size:
                    self.size[key] = t.untyped_storage().nbytes()
                    self.refs[key] = 0
                    self.cur += self.size[key]
                    self.peak = max(self.peak, self.cur)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key)
            return out

    mode = Peak()
    with mode:
        fn()
    return mode.peak


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    value, ref = value.double().cpu(), ref.double().cpu()
    return float((value - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def fmt_ms(ms: float) -> str:
    """Milliseconds to three significant digits (0.0123, 1.23, 123), not a fixed number of decimals."""
    if ms != ms:
        return "-"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}" if ms >= 0.001 else f"{ms:.1e}"


# Each provider in plain words, for the legend printed with the table (the longest matching prefix wins).
EXPLAIN = {
    "kl_ext": "this package's fused kernel (loss and gradient in one pass over the inputs)",
    "kl_ext TRL drop-in": "kl_ext.integrations.trl.generalized_jsd_loss: TRL's signature and reductions over kl_ext",
    "nn.KLDivLoss": "nn.KLDivLoss(reduction='batchmean') on log_softmax(student) and softmax(teacher): the loss "
                    "as most distillation code writes it",
    "reference": "kl_ext.reference: the same loss in plain PyTorch ops (what the tests check kl_ext against)",
    "BCEWithLogitsLoss": "torch.nn.BCEWithLogitsLoss",
    "BCE - entropy": "BCEWithLogitsLoss minus the targets' entropy: the Bernoulli KL as written by hand",
    "TRL formula": "TRL's GKDTrainer.generalized_jsd_loss, as TRL computes it",
    "unfused torch": "the top-k teacher's KL written with torch ops (gather, logsumexp, the tail's sum)",
    "torch formula": "the loss written with torch ops on the two softmaxes",
    "DistiLLM formula": "DistiLLM's skew KL, written with torch ops",
    "liger": "Liger-Kernel's Triton loss (GPU only)",
}
SUFFIXES = {"eager": "run op by op, as written", "compiled": "the same code through torch.compile (compile time "
            "not counted)", "dense (V-wide teacher)": "the dense KL on the full teacher: what the top-k cache saves"}


def explain(provider: str) -> str:
    key = max((k for k in EXPLAIN if provider.startswith(k)), key=len, default=None)
    words = EXPLAIN[key] if key else provider
    extra = [v for k, v in SUFFIXES.items() if provider.endswith(k)]
    return "; ".join([words] + extra)


def print_table(rows: list[Row], copy_gbps: float) -> None:
    """Two tables: large rows (time, effective bandwidth against a copy, error) and small rows (time per training
    step only: bytes per second mean nothing where launches and Python dominate). Peak extra memory only where it
    is measured (CUDA), then a legend of the providers."""
    width = max([len(r.provider) for r in rows] + [8]) + 2
    large = [r for r in rows if r.timing == "median"]
    small = [r for r in rows if r.timing != "median"]
    memory = any(r.peak_extra_mb == r.peak_extra_mb for r in rows)
    if large:
        print(f"\nLarge losses (median time of repeated fresh calls). A plain copy of memory runs at {copy_gbps:.1f} "
              "GB/s here. GB/s: the bytes the loss cannot avoid moving (each input read once, the gradient written "
              "once) per second; %copy: that as a share of the copy (100% = as fast as this memory allows; higher is "
              "better)." + (" extraMB: peak memory beyond the inputs and the gradient." if memory else "")
              + " rel.err: largest error against a float64 computation.")
        hdr = (f"{'op':<10}{'mode':<9}{'dtype':<10}{'shape':<15}{'provider':<{width}}{'ms':>9}{'GB/s':>9}{'%copy':>7}"
               + (f"{'extraMB':>9}" if memory else "") + f"{'rel.err':>10}  note")
        print(hdr)
        print("-" * len(hdr))
        for r in large:
            peak = (f"{r.peak_extra_mb:>9.1f}" if r.peak_extra_mb == r.peak_extra_mb else f"{'-':>9}") if memory else ""
            gbps = f"{r.gbps:>9.1f}{r.pct_copy:>7.1f}" if r.gbps == r.gbps else f"{'-':>9}{'-':>7}"
            print(f"{r.op:<10}{r.mode:<9}{r.dtype:<10}{r.shape:<15}{r.provider:<{width}}{fmt_ms(r.ms):>9}{gbps}"
                  f"{peak}{r.rel_err:>10.2e}  {r.note}")
    if small:
        print("\nSmall losses (forward + backward of a classifier-sized batch, where Python and launches cost more "
              "than the arithmetic). wall: time per training step, back to back" +
              ("; graph: the kernels alone (CUDA-graph replay)" if any(r.timing == "graph" for r in small) else "")
              + ". Lower is better.")
        hdr = f"{'op':<10}{'timing':<8}{'dtype':<10}{'shape':<15}{'provider':<{width}}{'us/step':>9}{'rel.err':>10}  note"
        print(hdr)
        print("-" * len(hdr))
        for r in small:
            us = f"{r.ms * 1e3:>9.1f}" if r.ms == r.ms else f"{'-':>9}"
            print(f"{r.op:<10}{r.timing:<8}{r.dtype:<10}{r.shape:<15}{r.provider:<{width}}{us}{r.rel_err:>10.2e}  "
                  f"{r.note}")
    print("\nproviders:")
    for name in sorted({r.provider for r in rows}):
        print(f"  {name:<{width}}{explain(name)}")


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def _colors(rows: list[Row]) -> list[str]:
    """kl_ext's bars blue, its peers' gray."""
    return ["tab:blue" if r.provider.startswith("kl_ext") else "tab:gray" for r in rows]


def plot(rows: list[Row], copy_gbps: float, out_dir: str, title_device: str) -> list[str]:
    """One PNG per (op, mode, dtype) of the large rows: effective GB/s per provider (higher is better), against V
    when the run swept shapes, else a bar per provider, with the copy's line; and one PNG of the small rows: time
    per step per provider (lower is better)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11})
    paths = []
    large = [r for r in rows if r.timing == "median"]
    floor = "GB/s: the bytes the loss must move (inputs read once, gradient written once) / time"
    for op, mode, dtype in sorted({(r.op, r.mode, r.dtype) for r in large}):
        sel = [r for r in large if (r.op, r.mode, r.dtype) == (op, mode, dtype) and r.gbps == r.gbps]
        if not sel:
            continue
        if len({r.V for r in sel}) < 2:  # one shape (the quick run): a bar per provider, fastest first
            sel = sorted(sel, key=lambda r: -r.gbps)
            fig, ax = plt.subplots(figsize=(10, 1.6 + 0.55 * len(sel)), dpi=100)
            bars = ax.barh([r.provider for r in sel], [r.gbps for r in sel],
                           color=_colors(sel))
            ax.bar_label(bars, labels=[f"{fmt_ms(r.ms)} ms, {r.pct_copy:.0f}% of a copy" for r in sel], padding=3)
            ax.axvline(copy_gbps, color="k", linestyle="--", label=f"memory copy ({copy_gbps:.0f} GB/s)")
            ax.invert_yaxis()
            ax.set_xlim(0, max(copy_gbps, max(r.gbps for r in sel)) * 1.5)
            ax.set_xlabel(f"effective GB/s, higher is better ({floor})", fontsize=9)
            ax.set_title(f"{op} {mode} {dtype}, {sel[0].shape} on {title_device}")
        else:
            fig, ax = plt.subplots(figsize=(10, 5.5), dpi=100)
            for prov in sorted({r.provider for r in sel}):
                pts = sorted((r.V, r.gbps) for r in sel if r.provider == prov)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov,
                        linewidth=2.5 if prov.startswith("kl_ext") else 1.2)
            ax.axhline(copy_gbps, color="k", linestyle="--", label=f"memory copy ({copy_gbps:.0f} GB/s)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("classes V (rows x V about constant)")
            ax.set_ylabel("effective GB/s, higher is better")
            ax.set_title(f"{op} {mode} {dtype} on {title_device}\n{floor}", fontsize=10)
        ax.legend(fontsize=9, loc="lower right")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{mode}_{dtype}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    small = [r for r in rows if r.timing != "median" and r.ms == r.ms]
    for timing, shape in sorted({(r.timing, r.shape) for r in small}):
        sel = [r for r in small if (r.timing, r.shape) == (timing, shape)]
        fig, ax = plt.subplots(figsize=(10, 1.6 + 0.42 * len(sel)), dpi=100)
        labels = [f"{r.op}: {r.provider}" for r in sel]
        bars = ax.barh(labels, [r.ms * 1e3 for r in sel],
                       color=_colors(sel))
        ax.bar_label(bars, labels=[f"{r.ms * 1e3:.0f} us" for r in sel], padding=3, fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, max(r.ms for r in sel) * 1e3 * 1.25)
        ax.tick_params(axis="y", labelsize=9)
        what = "time per training step" if timing == "wall" else "GPU time per step (CUDA-graph replay)"
        ax.set_xlabel(f"microseconds, {what}; lower is better")
        ax.set_title(f"small losses, forward + backward, {shape} on {title_device}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"small_{timing}_{shape}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _closure(fn, a, b, mode):
    """(setup, run) for a mode: forward without grad, forward+backward, or backward alone (setup builds a
    fresh graph, untimed, so no provider is timed on a retained graph)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(a, b)
        return None, run
    x = a.detach().requires_grad_()
    if mode == "fwd+bwd":
        def run():
            fn(x, b).backward()
            x.grad = None
        return None, run
    graph = {}

    def setup():
        x.grad = None
        graph["loss"] = fn(x, b)

    def run():
        graph.pop("loss").backward()
    return setup, run


def run_op(op, providers, make_inputs, reference_fn, bytes_per_elem, device, shapes, dtypes, modes, reps,
           progress, timing="median") -> list[Row]:
    """Time every runnable provider on every (dtype, shape, mode); report skipped providers with their reason.
    timing: "median" (time_ms), or for small sizes "wall" (wall_ms) or "graph" (graph_ms over 32 input sets).

    providers: name -> loss_fn(a, b), (loss_fn, its own float64 reference), or a string (why it is skipped).
    bytes_per_elem: mode -> elements moved per input element at the floor (None: report time only). Errors are
    measured on the first 256 rows against the reference (reference_fn unless the provider names its own) in
    float64.
    """
    rows = []
    for name, fn in providers.items():
        if isinstance(fn, str) and timing == "median":  # above the progress bar, not through it
            (progress.write if progress is not None else print)(f"[{op}] not run: {name}: {fn}")
    runnable = {k: v for k, v in providers.items() if not isinstance(v, str)}
    for dtype in dtypes:
        for N, V in shapes:
            # Compiled providers specialize on shape and grad mode: a fresh cache per shape keeps them under
            # Dynamo's recompile limit (past it they silently ran eager).
            torch._dynamo.reset()
            a, b = make_inputs(N, V, dtype, device)
            n_err = min(N, 256)
            refs = {}
            for name, fn in runnable.items():
                fn, ref_fn = fn if isinstance(fn, tuple) else (fn, reference_fn)
                if ref_fn not in refs:
                    refs[ref_fn] = ref_fn(a[:n_err].double(), b[:n_err].double())
                ref = refs[ref_fn]
                for mode in modes:
                    progress.set_postfix_str(f"{op} {mode} {str(dtype)[6:]} {N}x{V} {name}")
                    row = Row(op, mode, str(dtype).replace("torch.", ""), f"{N}x{V}", V, name, timing=timing)
                    try:
                        with torch.no_grad():
                            row.rel_err = rel_err(fn(a[:n_err], b[:n_err]), ref)
                        setup, run = _closure(fn, a, b, mode)
                        if timing == "wall":
                            row.ms = wall_ms(run, device)
                        elif timing == "graph":
                            inputs = [make_inputs(N, V, dtype, device, seed=i) for i in range(32)]
                            row.ms = graph_ms([_closure(fn, x, y, mode)[1] for x, y in inputs])
                        else:
                            row.ms = time_ms(run, device, reps, setup=setup)
                        if bytes_per_elem[mode] is not None:
                            row.gbps = bytes_per_elem[mode] * a.numel() * a.element_size() / (row.ms * 1e-3) / 1e9
                        grad_bytes = 0 if mode == "fwd" else a.numel() * a.element_size()
                        row.peak_extra_mb = peak_extra_mb(run, device, grad_bytes, setup=setup)
                    except Exception as e:  # noqa: BLE001 (a failing provider is reported, not fatal)
                        row.note = f"failed: {type(e).__name__}: {str(e)[:80]}"
                    rows.append(row)
                    progress.update(1)
            del a, b
    return rows
