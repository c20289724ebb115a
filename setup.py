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
    # Compiling the CUDA kernels takes many minutes on a small machine: only for a GPU that is here, or for the
    # architectures asked for (CI, wheels, a build machine without a GPU).
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True, f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    if torch.cuda.is_available():
        return True, f"a GPU is visible ({torch.cuda.get_device_name()})"
    return False, ("no GPU is visible and TORCH_CUDA_ARCH_LIST is unset; set it, e.g. TORCH_CUDA_ARCH_LIST=9.0, to "
                   "build the CUDA kernels anyway")


# The -std level comes from torch (C++20 from torch 2.13 on). KL_EXT_CXX_OPT: scripts/sdist_check.sh builds at -O0
# (it checks the package, not its speed; CI has 20 minutes on 2 cores).
cxx_flags = [os.environ.get("KL_EXT_CXX_OPT", "-O3")]
# at::parallel_for is an inline `#pragma omp parallel` in ATen's headers: without -fopenmp an extension's CPU
# kernels silently run on one thread. Linking -fopenmp names libgomp.so.1, which
# resolves to the copy torch has already loaded: one OpenMP runtime, torch.set_num_threads applies.
link_flags = []
if platform.system() == "Linux":
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
    # Python's CFLAGS bring -g: without stripping, DWARF was 21 of the CPU-only _C's 22 MB. KL_EXT_DEBUG=1 keeps it.
    if os.environ.get("KL_EXT_DEBUG") != "1":
        link_flags.append("-Wl,--strip-debug")
# KL_EXT_SANITIZE=address,undefined: the CPU kernels instrumented (scripts/sanitize.sh; the Python that loads them
# preloads the runtime).
if os.environ.get("KL_EXT_SANITIZE"):
    sanitize = [f"-fsanitize={os.environ['KL_EXT_SANITIZE']}", "-fno-sanitize-recover=all"]
    cxx_flags += sanitize + ["-fno-omit-frame-pointer", "-g"]
    link_flags += sanitize
# ATen's Vectorized<float> is only SIMD (and exp/log only Sleef-backed) when a CPU_CAPABILITY is defined;
# extensions get the scalar fallback otherwise. So the CPU kernels (csrc/*.cpp but the two of kl_ext._C) are
# compiled once per capability, with ATen's flags for it, into their own modules kl_ext._cpu_<capability>;
# kl_ext/_cpu.py loads the best one this CPU runs (kl_ext._C.cpu_capability says which). Hidden visibility: each
# module's inline functions, compiled with its flags, bind inside it.
CPU_CAPABILITY_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
x86 = platform.machine() in ("x86_64", "AMD64")
# KL_EXT_CPU_CAPABILITIES=default,avx2 builds a subset (CI's second torch; the sdist check); "native" builds only the
# best one this CPU runs (`make setup`: a third of the compile time; such a build is not portable). Otherwise the
# portable one is always built.
buildable = list(CPU_CAPABILITY_FLAGS) if x86 else ["default"]
wanted = os.environ.get("KL_EXT_CPU_CAPABILITIES", ",".join(buildable)).split(",")
if wanted == ["native"]:
    native = torch.backends.cpu.get_cpu_capability().lower()
    capabilities = [native if native in buildable else "default"]
else:
    if set(wanted) - set(buildable):
        raise SystemExit(f"kl_ext: KL_EXT_CPU_CAPABILITIES={','.join(wanted)}: {platform.machine()} builds "
                         f"{', '.join(buildable)} (or native)")
    capabilities = [c for c in CPU_CAPABILITY_FLAGS if c in wanted or c == "default"]
print(f"kl_ext: CPU kernels for {', '.join(capabilities)} (the best one the CPU runs is loaded)")

core_sources = ["csrc/module.cpp", "csrc/fused_backward.cpp"]
cpu_sources = sorted(set(glob.glob("csrc/*.cpp")) - set(core_sources))
extensions = [
    CppExtension(f"kl_ext._cpu_{cap}", cpu_sources,
                 extra_compile_args={"cxx": cxx_flags + CPU_CAPABILITY_FLAGS[cap]
                                     + ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]},
                 extra_link_args=link_flags)
    for cap in capabilities
]
with_cuda, why = _want_cuda()
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # PTX: newer GPUs JIT it
    print(f"kl_ext: building CPU + CUDA ops (CUDA {torch.version.cuda}, arch {os.environ['TORCH_CUDA_ARCH_LIST']}; "
          f"{why})")
    extensions.append(CUDAExtension(
        "kl_ext._C",
        core_sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx_flags + ["-DKL_EXT_WITH_CUDA"],
                            "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    ))
else:
    print(f"kl_ext: building the CPU ops only ({why})")
    extensions.append(CppExtension("kl_ext._C", core_sources, extra_compile_args={"cxx": cxx_flags},
                                   extra_link_args=link_flags))


class BuildPerExtension(BuildExtension):
    """Each extension in its own temporary directory: the capability modules compile the same sources with other
    flags, and one shared directory (one build.ninja, one object per source) would rebuild or mix them."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


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
    ext_modules=extensions,
    cmdclass={"build_ext": BuildPerExtension},
    python_requires=">=3.10",
    install_requires=[_torch_requirement()],
    extras_require={
        "triton": ["triton>=3.3"],
        "cache": ["safetensors", "tqdm"],  # kl_ext.teacher_cache
        "bench": ["matplotlib", "tqdm", "numpy"],
        "dev": ["pytest", "ninja", "numpy", "build", "matplotlib", "tqdm"],
    },
)
