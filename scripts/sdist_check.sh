#!/usr/bin/env bash
# Release check (run by CI): build the sdist, check it holds every source a build needs, install it with
# --no-build-isolation into a fresh virtual environment that has only torch (+ pip's build tools), and
# smoke-test it from outside the source tree. Uses .venv's python (with `build`) for the sdist.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

.venv/bin/python -m build --sdist --no-isolation --outdir "$work/dist" . > "$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/kl_ext-*.tar.gz)
top=$(basename "$sdist" .tar.gz)
tar tzf "$sdist" | sed "s|^$top/||" | sort > "$work/files"
missing=$(git ls-files csrc triton_kernels kl_ext setup.py pyproject.toml README.md LICENSE MANIFEST.in | sort \
    | comm -23 - "$work/files")
[ -z "$missing" ] || { echo "sdist lacks: $missing" >&2; exit 1; }
if grep -E '(^tests/|\.so$|\.o$|^build/)' "$work/files"; then echo "sdist holds build output or tests" >&2; exit 1; fi
echo "sdist: $(basename "$sdist"), $(wc -l < "$work/files") entries, every source present"

# Only torch: the CPU wheel where this machine has it (small), else the dev venv's torch range.
python3 -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
$pip install -q "torch==2.13.0+cpu" 2>/dev/null || $pip install -q "torch>=2.11,<2.15"
$pip install -q "setuptools>=64" wheel ninja  # what --no-build-isolation builds with (ninja: parallel compiles)
# -O0 and only the portable CPU kernels: this checks the package (sources, install, import, results), not its
# speed, and compiles in a fraction of the time.
KL_EXT_NO_CUDA=1 KL_EXT_CXX_OPT=-O0 KL_EXT_CPU_CAPABILITIES=default $pip install -q --no-build-isolation "$sdist" > "$work/install.log" 2>&1 \
    || { tail -30 "$work/install.log"; exit 1; }

cd "$work"  # outside the source tree: the installed package, not the checkout
"$work/venv/bin/python" - "$repo" <<'PY'
import importlib.util, os, subprocess, sys
import torch, kl_ext, kl_ext._C
assert not kl_ext.__file__.startswith(sys.argv[1]), kl_ext.__file__
assert importlib.util.find_spec("triton_kernels") is None, "a bare triton_kernels module was installed"
if importlib.util.find_spec("triton") is not None:
    import kl_ext.triton_kernels  # noqa: F401
else:
    assert importlib.util.find_spec("kl_ext.triton_kernels") is not None
for be in kl_ext.available_backends():
    dev = "cuda" if be == "cuda" else "cpu"
    if be == "triton" and not torch.cuda.is_available():
        continue
    x = torch.randn(4, 37, device=dev, requires_grad=True)
    t = torch.randn(4, 37, device=dev)
    for loss in (kl_ext.kl_div_with_logits(x, t, backend=be),
                 kl_ext.jsd_with_logits(x, t, beta=0.3, backend=be),
                 kl_ext.sparse_kl_div_with_logits(x, *kl_ext.topk_target(t, 5), backend=be),
                 kl_ext.bernoulli_kl_div_with_logits(x, t.sigmoid(), backend=be),
                 kl_ext.binary_cross_entropy_with_logits(x, t.sigmoid(), backend=be)):
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), be
        x.grad = None
    print(f"  backend {be}: fwd+bwd ok")
# The inline math (csrc/cpu_math.h) holds in the portable build's scalar Vectorized too (bit tricks included).
pos = torch.arange(1, 0x7F800000, 65521).to(torch.int32).view(torch.float32)
unit = pos[pos <= 1]
for fn, x, ref, rtol in (("log", pos, torch.log, 1.2e-7), ("log1p", -unit, torch.log1p, 1.2e-7),
                         ("expm1_nonpos", -pos, torch.expm1, 1.7e-7), ("log1p_unit", unit, torch.log1p, 3.6e-7)):
    want = ref(x.double()).float()
    torch.testing.assert_close(kl_ext._C.cpu_math(x, fn), want, rtol=rtol, atol=1e-45, msg=fn)
print("  portable build: cpu_math within its ulps")
# Built with KL_EXT_CPU_CAPABILITIES=default: the portable module is what loads, and it has no AVX (ymm)
# instruction, so it runs on any x86-64 (a full build adds _cpu_avx2 / _cpu_avx512 beside it).
assert kl_ext._C.cpu_capability == "default", kl_ext._C.cpu_capability
assert kl_ext._C.openmp, "the CPU kernels were built without OpenMP: one thread"
dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", kl_ext._C.cpu_kernels.__file__], capture_output=True,
                     text=True)
if dis.returncode == 0:
    assert "%ymm" not in dis.stdout, "the portable build uses AVX registers"
    print("  portable build: no AVX instructions")
print(f"kl_ext {kl_ext.__version__} from the sdist: ok ({os.path.dirname(kl_ext.__file__)})")
PY
