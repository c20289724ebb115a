"""Which build of the C++ CPU kernels runs: chosen at import from the CPU, as ATen chooses its own.

setup.py compiles the CPU kernels (csrc/*.cpp but module.cpp and fused_backward.cpp) once per capability into
their own extension modules, kl_ext._cpu_default (portable), _cpu_avx2 and _cpu_avx512 (x86-64). Each registers
the CPU ops, so exactly one may be loaded: kl_ext._C's initialisation calls load(), which takes the best build
that this CPU runs, as torch.backends.cpu.get_cpu_capability() reports it (ATEN_CPU_CAPABILITY lowers that for
torch and kl_ext alike; KL_EXT_CPU_CAPABILITY lowers it for kl_ext only). Separate shared objects, loaded
locally, keep inline functions compiled with AVX flags away from code that must run on any CPU."""

import importlib
import os

import torch

# Best first; each entry runs on every CPU that runs the ones after it.
CAPABILITIES = ("avx512", "avx2", "default")
ENV_VAR = "KL_EXT_CPU_CAPABILITY"


def supported() -> str:
    """The best capability this CPU (and ATEN_CPU_CAPABILITY) allows."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return cap if cap in CAPABILITIES else "default"


def load():
    """Import the best CPU kernel module that was built and runs here; its `capability` says which."""
    best = CAPABILITIES.index(supported())
    asked = os.environ.get(ENV_VAR)
    if asked:
        if asked not in CAPABILITIES:
            raise ImportError(f"kl_ext: {ENV_VAR}={asked!r}; expected one of {', '.join(CAPABILITIES)}")
        best = max(best, CAPABILITIES.index(asked))  # lower only: a higher one would fault on this CPU
    for cap in CAPABILITIES[best:]:
        try:
            return importlib.import_module(f"kl_ext._cpu_{cap}")
        except ModuleNotFoundError as e:
            if e.name != f"kl_ext._cpu_{cap}":
                raise
    raise ImportError(f"kl_ext: no CPU kernel module that runs at capability {CAPABILITIES[best]!r} was built (a "
                      "`make setup` build has this CPU's best only); rebuild with "
                      "KL_EXT_CPU_CAPABILITIES=default,avx2,avx512 for all of them")
