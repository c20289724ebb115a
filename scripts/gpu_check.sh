#!/usr/bin/env bash
# On the GPU box (torch preinstalled, no network): build, GPU tests, sanitizer, benchmark; logs under $OUT.
# Run from the repo root:  OUT=/tmp/out bash scripts/gpu_check.sh
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
    > "$OUT/env.txt" 2>&1
pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -m pytest -q tests -x -p no:cacheprovider > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"
tail -5 "$OUT/tests.log"
for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" python -c "
import torch, kl_ext
for be in kl_ext.available_backends():
    if be in ('cuda', 'triton'):
        x = torch.randn(37, 4099, device='cuda', requires_grad=True); t = torch.randn(37, 4099, device='cuda')
        kl_ext.kl_div_with_logits(x, t, backend=be, mask=torch.rand(37, device='cuda') > .3).backward()
        kl_ext.bernoulli_kl_div_with_logits(x, t.sigmoid(), backend=be).backward()
torch.cuda.synchronize()" > "$OUT/sanitizer_$tool.log" 2>&1
    tail -2 "$OUT/sanitizer_$tool.log"
done
python -m benchmarks.run --out "$OUT/bench" > "$OUT/bench.log" 2>&1
tail -60 "$OUT/bench.log"
