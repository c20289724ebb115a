"""Backend choice: the one place that decides which implementation runs.

Nothing here touches the GPU or imports Triton at kl_ext import time; probes run on first use. The probes
are constants to torch.compile, so choosing a backend never breaks a graph.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

def _compile_constant(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo (and, through it, triton) at
    kl_ext import: that decorator only sets this attribute. tests/ compile with fullgraph=True to keep it true."""
    fn._dynamo_marked_constant = True
    return fn


BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
ENV_VAR = "KL_EXT_BACKEND"


@functools.lru_cache(maxsize=None)
def native_loaded() -> bool:
    """True when the compiled extension (kl_ext._C) imported and registered its kernels (the schemas and
    fakes: kl_ext/_ops.py)."""
    try:
        import kl_ext._C  # noqa: F401
    except ImportError:
        return False
    return True


_PROBES: dict = {}  # probe results; a plain dict, since Dynamo traces into functools.lru_cache wrappers


@_compile_constant
def _native_kernel(dispatch_key: str) -> bool:
    if dispatch_key not in _PROBES:
        _PROBES[dispatch_key] = native_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "kl_ext::kl_div_with_logits_fwd", dispatch_key)
    return _PROBES[dispatch_key]


@_compile_constant
def triton_interpret() -> bool:
    """Triton's interpreter runs kernels on CPU tensors; it is chosen by TRITON_INTERPRET=1 before import."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@_compile_constant
def _triton_importable() -> bool:
    if "triton" not in _PROBES:
        _PROBES["triton"] = importlib.util.find_spec("triton") is not None
    return _PROBES["triton"]


def _usable(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether `backend` can run on tensors of `device`, and if not, why (said to the user)."""
    cuda = device.type == "cuda"
    if backend == "torch":
        return True, ""
    if backend == "cpu":
        if not _native_kernel("CPU"):
            return False, "the C++ extension is not built (reinstall with `pip install --no-build-isolation -e .`)"
        return (not cuda), "the 'cpu' backend takes CPU tensors; use backend='cuda', 'triton' or 'auto'"
    if backend == "cuda":
        if not _native_kernel("CUDA"):
            return False, ("the CUDA kernels are not built (needs a CUDA torch and nvcc at install time; "
                           "see README 'Install')")
        return cuda, "the 'cuda' backend takes CUDA tensors; use backend='cpu' or 'auto'"
    if backend == "triton":
        if not _triton_importable():
            return False, "triton is not installed (pip install triton)"
        if cuda or triton_interpret():
            return True, ""
        return False, "the 'triton' backend takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set)"
    return False, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


@_compile_constant
def _env_backend() -> str:
    return os.environ.get(ENV_VAR, "auto") or "auto"


_RESOLVED: dict = {}  # (backend, device type, KL_EXT_BACKEND) -> what resolve() chose: it runs on every call


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` (possibly "auto" or KL_EXT_BACKEND) on `device`."""
    key = None if torch.compiler.is_compiling() else (backend, device.type, _env_backend())
    if key in _RESOLVED:
        return _RESOLVED[key]
    if backend not in BACKENDS:
        raise ValueError(f"kl_ext: backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    if backend == "auto":
        backend = _env_backend()
        if backend not in BACKENDS:
            raise ValueError(f"kl_ext: {ENV_VAR}={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        # Triton first on GPUs: it matched or beat the CUDA kernels on every large row (BENCHMARKS.md); the CUDA
        # kernels stay selectable and are the fallback.
        order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        backend = next((b for b in order if _usable(b, device)[0]), "torch")
    else:
        ok, why = _usable(backend, device)
        if not ok:
            raise RuntimeError(f"kl_ext: backend {backend!r} cannot run on {device.type} tensors here: {why}")
    _register(backend)
    if key is not None:
        _RESOLVED[key] = backend
    return backend


def available_backends() -> list[str]:
    """Backends usable on this machine for some device (GPU probed here, lazily): "torch" (the reference) always,
    "cpu" with the C++ extension built, "cuda" with its kernels built and a GPU, "triton" with Triton and a GPU.

    >>> import kl_ext
    >>> "torch" in kl_ext.available_backends()
    True
    """
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [b for b in BACKENDS[1:] if any(_usable(b, d)[0] for d in devices)]


@_compile_constant
def _register(backend: str) -> bool:
    """Import the module that registers `backend`'s ops (run once, eagerly, even under torch.compile)."""
    if backend == "triton":
        from kl_ext import triton_kernels  # noqa: F401  (registers torch.ops.kl_ext_triton)
    elif backend in ("cpu", "cuda"):
        native_loaded()
    return True


def op(backend: str, name: str):
    """The registered op `name` of a concrete kernel backend ("cpu", "cuda" or "triton"), its module loaded (a
    Function's apply() may come before any functional)."""
    _register(backend)
    return getattr(torch.ops.kl_ext_triton if backend == "triton" else torch.ops.kl_ext, name)
