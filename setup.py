"""Build kl_ext: the C++ CPU ops always, the CUDA ops when torch has CUDA and nvcc is found."""
import glob
import os
import platform
import re
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


HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    # The one place the version is written: kl_ext/__init__.py (not imported here: it needs the built ops).
    with open(os.path.join(HERE, "kl_ext", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _torch_requirement():
    # The one place the supported range is written: kl_ext/_torch_range.py (not imported: it checks the torch).
    with open(os.path.join(HERE, "kl_ext", "_torch_range.py")) as f:
        text = f.read()
    lo, hi = (tuple(int(v) for v in re.search(rf"^{name} = \((\d+), (\d+)\)", text, re.M).groups())
              for name in ("MIN", "MAX"))
    return f"torch>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}"


def _readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def _want_cuda():
    if os.environ.get("KL_EXT_NO_CUDA") == "1":
        return False, "KL_EXT_NO_CUDA=1"
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} has no CUDA"
    if not os.environ.get("CUDA_HOME") or not os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


# The -std level comes from torch (C++20 from torch 2.13 on). KL_EXT_CXX_OPT: scripts/sdist_check.sh builds at -O0
# (it checks the package, not its speed; CI has 20 minutes on 2 cores).
cxx_flags = [os.environ.get("KL_EXT_CXX_OPT", "-O3")]
# at::parallel_for is an inline `#pragma omp parallel` in ATen's headers: without -fopenmp an extension's CPU
# kernels silently run on one thread (kl_ext's did until 2026-11-23). Linking -fopenmp names libgomp.so.1, which
# resolves to the copy torch has already loaded: one OpenMP runtime, torch.set_num_threads applies.
link_flags = []
if platform.system() == "Linux":
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
    # Python's CFLAGS bring -g: without stripping, DWARF was 21 of the CPU-only _C's 22 MB. KL_EXT_DEBUG=1 keeps it.
    if os.environ.get("KL_EXT_DEBUG") != "1":
        link_flags.append("-Wl,--strip-debug")
# ATen's Vectorized<float> is only SIMD (and exp/log only Sleef-backed) when a CPU_CAPABILITY is defined;
# extensions get the scalar fallback otherwise. The default build is portable (any x86-64 or other CPU runs
# it, so a wheel can be shared); KL_EXT_AVX2=1 builds the vectorized AVX2+FMA kernels, for CPUs that have
# them (`make setup` does, for the machine it runs on). kl_ext._C.cpu_capability says which was built.
if os.environ.get("KL_EXT_AVX2") == "1":
    if platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit(f"kl_ext: KL_EXT_AVX2=1 needs an x86-64 build, not {platform.machine()}")
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
print(f"kl_ext: CPU kernels for {'AVX2' if os.environ.get('KL_EXT_AVX2') == '1' else 'any CPU (portable)'}")

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
        extra_link_args=link_flags,
    )
else:
    print(f"kl_ext: building the CPU ops only ({why_not})")
    ext = CppExtension("kl_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

setup(
    name="kl_ext",
    version=_version(),
    description=("Fused distillation losses for PyTorch: KL and generalized JSD from logits, top-k teachers, the "
                 "LM-head-fused and vocab-parallel losses, sigmoid-Bernoulli KL, BCE; CPU, CUDA and Triton kernels"),
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    keywords=["pytorch", "kl-divergence", "knowledge-distillation", "cuda", "triton"],
    packages=["kl_ext", "kl_ext.integrations", "kl_ext.triton_kernels"],
    # The Triton sources live at the top level but must never install as a bare `triton_kernels`
    # module: that import name belongs to other projects.
    package_dir={"kl_ext": "kl_ext", "kl_ext.triton_kernels": "triton_kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=[_torch_requirement()],
    extras_require={
        "triton": ["triton>=3.3"],
        "cache": ["safetensors", "tqdm"],  # kl_ext.teacher_cache
        "bench": ["matplotlib", "tqdm", "numpy"],
        "dev": ["pytest", "ninja", "numpy", "build", "matplotlib", "tqdm"],
    },
)
