#!/usr/bin/env bash
# On the GPU box (torch preinstalled, no network): build, GPU tests, sanitizer, benchmark; logs under $OUT.
# Run from the repo root:  OUT=/tmp/out bash scripts/gpu_check.sh [stage ...]
# Stages: build test sanitize bench (the full sweep) bench-quick; default: build test sanitize bench.
# Each stage fits a 10-minute call; a later call on the same warm box can skip the build (pip -e keeps it).
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
stages="${*:-build test sanitize bench}"
has() { [[ " $stages " == *" $1 "* ]]; }

if has build; then
    { nvidia-smi; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
        > "$OUT/env.txt" 2>&1
    MAX_JOBS="${MAX_JOBS:-16}" pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1 \
        || { tail -50 "$OUT/build.log"; exit 1; }
    # Benchmark baselines fetched beforehand (`make gpu-wheels`, then carry wheels/): the box has no network.
    if ls wheels/*.whl > /dev/null 2>&1; then
        pip install --no-deps --no-index wheels/*.whl >> "$OUT/build.log" 2>&1 && echo "installed wheels/"
    fi
    echo "build ok"
fi

if has test; then
    python -m pytest -q tests -p no:cacheprovider -rfEs > "$OUT/tests.log" 2>&1
    echo "tests rc=$?" >> "$OUT/tests.log"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
    tail -3 "$OUT/tests.log"
fi

if has sanitize; then
    # Every launch path on a small grid: resident rows (16-byte and 1-element packs), rows split over a
    # cluster (sm_90), streamed rows (forward only), Bernoulli / BCE; both GPU backends.
    cat > "$OUT/sanitize.py" <<'PY'
import torch, kl_ext
for be in kl_ext.available_backends():
    if be not in ("cuda", "triton"):
        continue
    for N, V, dtype in [(37, 4099, torch.float32), (8, 4096, torch.bfloat16), (4, 40000, torch.bfloat16),
                        (2, 70000, torch.float32)]:
        x = torch.randn(N, V, device="cuda", dtype=dtype, requires_grad=True)
        t = torch.randn(N, V, device="cuda", dtype=dtype, requires_grad=True)
        kl_ext.kl_div_with_logits(x, t, backend=be, mask=torch.rand(N, device="cuda") > .3).backward()
        with torch.no_grad():
            kl_ext.kl_div_with_logits(x, t, backend=be, direction="reverse")
        kl_ext.bernoulli_kl_div_with_logits(x, t.detach().float().sigmoid().to(dtype), backend=be).backward()
torch.cuda.synchronize()
print("sanitizer workload done")
PY
    for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" python "$OUT/sanitize.py" > "$OUT/sanitizer_$tool.log" 2>&1
        echo "$tool rc=$?"
        tail -2 "$OUT/sanitizer_$tool.log"
    done
fi

if has bench; then
    python -m benchmarks.run --out "$OUT/bench" > "$OUT/bench.log" 2>&1
    tail -80 "$OUT/bench.log"
fi
if has bench-quick; then
    python -m benchmarks.run --quick --out "$OUT/bench" > "$OUT/bench.log" 2>&1
    tail -60 "$OUT/bench.log"
fi
