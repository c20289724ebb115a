#!/usr/bin/env bash
# On the GPU box (torch preinstalled, no network): build, GPU tests, sanitizer, benchmark; logs under $OUT.
# Run from the repo root:  OUT=/tmp/out bash scripts/gpu_check.sh [stage ...]
# Stages: build test sanitize bench (the full sweep) bench-quick bench-lm bench-cpu sweep ncu; default: build test
# sanitize bench. sweep: the CUDA row engine's limits (benchmarks/cuda_paths.py) against Triton. bench-cpu: the CPU rows (issue 15's bar: ahead of the fastest torch peer) on the box's CPU.
# DEADLINE=s (seconds from the start): each stage is cut off there (SIGINT: pytest still prints its summary), so
# a device call returns its logs before its own limit. A later call on the same warm box can skip the build.
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
stages="${*:-build test sanitize bench}"
has() { [[ " $stages " == *" $1 "* ]]; }
limited() {
    local left=$(( ${DEADLINE:-86400} - SECONDS ))
    (( left > 15 )) || { echo "skipped (deadline): $*"; return 124; }
    timeout --signal=INT --kill-after=10 "$left" "$@"
}

if has build; then
    { nvidia-smi; which python; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
        > "$OUT/env.txt" 2>&1
    # The box's own GPU only (sm_90): a third of the default build's compile time. CPU kernels: the portable
    # module and the one this CPU runs (setup.py builds them one after another; exported, so the tests know).
    cpu_cap=$(python -c "import torch; c = torch.backends.cpu.get_cpu_capability().lower(); print(c if c in ('avx2', 'avx512') else 'default')")
    export KL_EXT_CPU_CAPABILITIES="${KL_EXT_CPU_CAPABILITIES:-default,$cpu_cap}"
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
        python -m pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1 \
        || { tail -50 "$OUT/build.log"; exit 1; }
    # Benchmark baselines fetched beforehand (`make gpu-wheels`, then carry wheels/): the box has no network.
    if ls wheels/*.whl > /dev/null 2>&1; then
        python -m pip install --no-deps --no-index wheels/*.whl >> "$OUT/build.log" 2>&1 && echo "installed wheels/"
    fi
    echo "build ok (${SECONDS}s)"
fi

if has test; then
    # GPU tests first (the emulator and interpreter tests are CI's, on CPU).
    limited python -m pytest -q tests/test_gpu.py -p no:cacheprovider -rfEs --durations=15 > "$OUT/tests.log" 2>&1
    echo "tests rc=$?" >> "$OUT/tests.log"
    # Exact-zero teachers on the real kernels (the cpu and emulator cases are CI's).
    limited python -m pytest -q tests/test_zero_targets.py -k "cuda or triton" -p no:cacheprovider -rfEs \
        >> "$OUT/tests.log" 2>&1
    echo "zero-target tests rc=$?" >> "$OUT/tests.log"
    # Every test named for a GPU in the other files (the divergences' test_gpu_backends_*).
    limited python -m pytest -q tests -k "gpu_backends" --ignore=tests/test_gpu.py -p no:cacheprovider -rfEs \
        >> "$OUT/tests.log" 2>&1
    echo "other GPU tests rc=$?" >> "$OUT/tests.log"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
    tail -3 "$OUT/tests.log"
fi

if has sanitize; then
    # Every launch path on a small grid: held rows (one block, 1 - 8 packs per thread; clusters of 2 - 16 blocks),
    # streamed rows (16-byte and 1-element packs, with and without gradients), Bernoulli /
    # BCE with weights, scale_grad with grad_output != 1, the sparse teacher, the LM-head loss's chunk views;
    # both GPU backends.
    cat > "$OUT/sanitize.py" <<'PY'
import os, torch, kl_ext
# cuda: the row engine's defaults, clusters of up to 16 blocks (opted into), streamed rows only.
for be, tune in [("cuda", ""), ("cuda", "cluster=16,threads=128"), ("cuda", "cluster=1,items=1"), ("triton", "")]:
    if be not in kl_ext.available_backends():
        continue
    os.environ["KL_EXT_CUDA_ROWS"] = tune
    for N, V, dtype in [(37, 4099, torch.float32), (8, 4096, torch.bfloat16), (4, 40000, torch.bfloat16),
                        (2, 70000, torch.float32), (2, 140000, torch.float32)]:
        x = torch.randn(N, V, device="cuda", dtype=dtype, requires_grad=True)
        t = torch.randn(N, V, device="cuda", dtype=dtype, requires_grad=True)
        (2 * kl_ext.kl_div_with_logits(x, t, backend=be, mask=torch.rand(N, device="cuda") > .3)).backward()
        with torch.no_grad():
            kl_ext.kl_div_with_logits(x, t, backend=be, direction="reverse")
        kl_ext.jsd_with_logits(x, t, beta=0.3, backend=be, mask=torch.rand(N, device="cuda") > .3).backward()
        idx, lp = kl_ext.topk_target(t.detach(), min(V, 300))
        idx[0, :3] = torch.tensor([-1, V, -5])  # empty and out-of-range slots: never dereferenced
        lp = lp.requires_grad_()
        for tail in ("bucket", "renorm"):
            kl_ext.sparse_kl_div_with_logits(x, idx, lp, tail=tail, backend=be,
                                             mask=torch.rand(N, device="cuda") > .3).backward()
        if os.environ.get("SANITIZE_GEMMS", "1") == "1":
            h = torch.randn(N, 64, device="cuda", dtype=dtype)
            kl_ext.linear_distillation_loss(h.requires_grad_(), torch.randn(V, 64, device="cuda", dtype=dtype) / 8,
                                            t.detach(), softcap=20.0, labels=torch.randint(0, V, (N,), device="cuda"),
                                            hard_weight=0.5, chunk_size=3, backend=be).backward()
        kl_ext.bernoulli_kl_div_with_logits(x, t.detach().float().sigmoid().to(dtype), backend=be).backward()
        w = torch.rand(V, device="cuda", dtype=dtype)
        kl_ext.binary_cross_entropy_with_logits(x, t.detach().float().sigmoid().to(dtype), weight=w, pos_weight=w,
                                                reduction="none", backend=be).sum().backward()
torch.cuda.synchronize()
print("sanitizer workload done")
PY
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
        # racecheck reports cuBLAS's own split-K GEMMs (nvjet_*_splitK, 12-124 hazards; not our kernels): it
        # runs the workload without the LM-head loss's GEMMs (its loss kernels are the ones above).
        [[ $tool == racecheck ]] && export SANITIZE_GEMMS=0 || export SANITIZE_GEMMS=1
        limited compute-sanitizer --tool "$tool" --error-exitcode 1 python "$OUT/sanitize.py" > "$OUT/sanitizer_$tool.log" 2>&1
        echo "$tool rc=$?"
        tail -2 "$OUT/sanitizer_$tool.log"
    done
fi

if has bench; then
    # BENCH_ARGS narrows the sweep to fit a 10-minute call, e.g. "--dtypes bf16 --modes fwd,fwd+bwd".
    # One run per op (BENCH_OPS), each with its own table and CSV: a deadline cuts off the rest, not the lot.
    for op in ${BENCH_OPS:-kl bernoulli jsd sparse tvd skew}; do
        limited python -m benchmarks.run --ops "$op" --out "$OUT/bench_$op" ${BENCH_ARGS:-} > "$OUT/bench_$op.log" 2>&1
        echo "bench $op rc=$?"
        grep -E "faster than|slower than" "$OUT/bench_$op.log" | head -40
    done
fi
if has sweep; then
    # SWEEP_ARGS: e.g. "--quick"
    limited python -m benchmarks.cuda_paths --out "$OUT/sweep.jsonl" ${SWEEP_ARGS:-} > "$OUT/sweep.log" 2>&1
    echo "sweep rc=$?"
    tail -40 "$OUT/sweep.log"
fi
if has bench-lm; then
    # LM_ARGS: e.g. "--chunk 4096"
    limited python -m benchmarks.bench_linear_distillation_loss ${LM_ARGS:-} >> "$OUT/bench_lm.log" 2>&1
    cat "$OUT/bench_lm.log"
fi
if has bench-quick; then
    python -m benchmarks.run --quick --out "$OUT/bench" > "$OUT/bench.log" 2>&1
    tail -60 "$OUT/bench.log"
fi
if has bench-cpu; then
    limited python -m benchmarks.run --device cpu --quick --modes fwd,fwd+bwd --dtypes fp32,bf16 \
        --out "$OUT/bench_cpu" > "$OUT/bench_cpu.log" 2>&1
    grep -v "benchmarks:" "$OUT/bench_cpu.log" | tail -40
fi
if has ncu; then
    # Throughput, occupancy and stall reasons of the CUDA kernels' second (warm) launches.
    ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        -k regex:"kl_held_kernel|kl_stream_kernel|bernoulli_rows_kernel" -s 3 -c 3 python scripts/ncu_workload.py > "$OUT/ncu.txt" 2>&1
    echo "ncu rc=$?"
    grep -E "^  [a-z_:]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Theoretical Occ|Compute \(SM\)" "$OUT/ncu.txt" | head -40
fi
