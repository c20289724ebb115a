"""Build kl_ext: the C++ CPU ops always, the CUDA ops when torch has CUDA and nvcc is found."""
import glob
import os
import platform
import shutil

# Must be settled before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
if "CUDA_HOME" not in os.environ:
    # /usr/local/cuda first: an `nvcc` on PATH may be a wrapper script outside the toolkit.
    for nvcc in ("/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if nvcc and os.path.exists(nvcc):
            os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
            break

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cpu_has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2 " in f.read()
    except OSError:
        return False


def _want_cuda():
    if os.environ.get("KL_EXT_NO_CUDA") == "1":
        return False, "KL_EXT_NO_CUDA=1"
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} has no CUDA"
    if not os.environ.get("CUDA_HOME") or not os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


cxx_flags = ["-O3", "-Wno-unknown-pragmas"]  # the -std level comes from torch (C++20 from torch 2.13 on)
# ATen's Vectorized<float> is only SIMD (and exp/log only Sleef-backed) when a CPU_CAPABILITY is defined;
# extensions get the scalar fallback otherwise. AVX2+FMA is on every x86-64 server of the last decade.
if platform.machine() in ("x86_64", "AMD64") and os.environ.get("KL_EXT_NO_AVX2") != "1" and _cpu_has_avx2():
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]

sources = sorted(glob.glob("csrc/*.cpp"))
with_cuda, why_not = _want_cuda()
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # PTX: newer GPUs JIT it
    print(f"kl_ext: building CPU + CUDA ops (CUDA {torch.version.cuda}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
    ext = CUDAExtension(
        "kl_ext._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx_flags + ["-DKL_EXT_WITH_CUDA"],
                            "nvcc": ["-O3", "-lineinfo"]},
    )
else:
    print(f"kl_ext: building the CPU ops only ({why_not})")
    ext = CppExtension("kl_ext._C", sources, extra_compile_args={"cxx": cxx_flags})

setup(
    name="kl_ext",
    version="0.1.0",
    description="Fused KL-divergence losses for PyTorch: softmax KL from logits, sigmoid-Bernoulli KL, BCE",
    packages=["kl_ext", "kl_ext.triton_kernels"],
    # The Triton sources live at the top level but must never install as a bare `triton_kernels`
    # module: that import name belongs to other projects.
    package_dir={"kl_ext": "kl_ext", "kl_ext.triton_kernels": "triton_kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
)
