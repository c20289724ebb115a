"""Shared test setup. Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter, which must
be chosen before triton is imported."""
import json
import os
import subprocess
import sys

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kl_ext  # noqa: E402
import kl_ext._registry  # noqa: E402
from benchmarks.common import peak_tensor_bytes  # noqa: E402,F401  (re-exported for the tests)
from kl_ext._backends import _register, _usable  # noqa: E402
from gloo_rank import divergence_params  # noqa: E402,F401  (re-exported for the tests)

CPU = torch.device("cpu")

# Every divergence of the registry (kl_ext/_registry.py), by name: the suites that take a divergence iterate it, so
# a new one is tested everywhere by being registered. Its parameters at a value inside their range (not where the
# divergence is the KL): divergence_params(name) (tests/gloo_rank.py, which the gloo workers share).
DIVERGENCES = tuple(kl_ext._registry.REGISTRY)
SPARSE_DIVERGENCES = tuple(n for n, d in kl_ext._registry.REGISTRY.items() if d.sparse)


def cpu_backends():
    """Kernel backends that run on CPU tensors here: the C++ ops, and Triton under the interpreter."""
    return [b for b in ("cpu", "triton") if _usable(b, CPU)[0]]


def backend_params():
    return [pytest.param(b, id=b) for b in ("cpu", "triton")]


@pytest.fixture
def require_backend():
    def _require(backend, device=CPU):
        ok, why = _usable(backend, torch.device(device))
        if not ok:
            pytest.skip(f"backend {backend!r} unavailable: {why}")
        _register(backend)  # its torch.ops exist for tests that call them directly, whatever ran before
    return _require


# KL_EXT_EMU_SANITIZE=address (AddressSanitizer + UndefinedBehaviorSanitizer) or thread (ThreadSanitizer) builds the
# emulated kernels instrumented; the Python running them must preload the runtime (scripts/sanitize.sh does).
# The instrumented builds take float32 and bfloat16 rows only (KL_EXT_TWO_PAIRS, csrc/common.h: every launch path,
# both pack widths, a third of the build time).
SANITIZE_FLAGS = {
    "": ["-O2"],
    "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                "-DKL_EXT_TWO_PAIRS"],
    "thread": ["-O1", "-g", "-fsanitize=thread", "-DKL_EXT_TWO_PAIRS"],
}


def build_emulator(sanitize="", source=None, name="kl_ext_cuda_emu"):
    """Compile tests/cuda_emu/emu_ops.cpp (the kernels of `source`/csrc/cuda, default this checkout's) and load it:
    its ops become torch.ops.<name>.*, defined with the real ops' schemas."""
    from torch.utils.cpp_extension import load
    here = os.path.dirname(os.path.abspath(__file__))
    root = source or os.path.dirname(here)
    tag = "-".join(filter(None, [name, sanitize, f"torch{torch.__version__}"]))
    # Built in the checkout, per torch version: the shared ~/.cache/torch_extensions would hand one torch's build to
    # another (the same name and flags; CI tests two torches on one machine), and a run killed mid-build there
    # leaves a lock every later run waits on forever.
    where = os.path.join(os.path.dirname(here), "build", tag)
    os.makedirs(where, exist_ok=True)
    from kl_ext import _ops
    _ops.define(name, [n for n in _ops.SCHEMAS if n.endswith("_fwd")])  # the real ops' schemas
    flags = SANITIZE_FLAGS[sanitize]
    # -std=c++20 for the emulator's std::barrier: torch before 2.13 compiles extensions as C++17 (the last -std wins).
    preload = os.environ.pop("LD_PRELOAD", None)  # a sanitizer's runtime is for this process, not the compiler
    try:
        load(name=name, sources=[os.path.join(here, "cuda_emu", "emu_ops.cpp")],
             extra_cflags=flags + ["-std=c++20", f"-I{root}", f"-DKL_EXT_EMU_NAMESPACE={name}"],
             extra_ldflags=[f for f in flags if f.startswith("-fsanitize")], is_python_module=False,
             build_directory=where)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return getattr(torch.ops, name)


@pytest.fixture(scope="session")
def emu():
    """The CUDA kernels (csrc/cuda/*.cuh) compiled as host C++ against tests/cuda_emu/cuda_emu.h: their ops as
    torch.ops.kl_ext_cuda_emu, on an emulated device of one SM with clusters (blocks and clusters loop over rows)."""
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():  # requirements-dev.txt has it; a bare GPU box may not
        pytest.skip("building the emulated kernels needs ninja (pip install ninja)")
    ops = build_emulator(os.environ.get("KL_EXT_EMU_SANITIZE", ""))
    ops.set_device(1, True)
    return ops


# Tolerances against the float64 reference: (loss rtol, grad error relative to the gradient's max).
# 16-bit gradients are rounded twice (the unscaled gradient, then grad_output * it): up to ~1.5 ulp.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 3e-3),
       torch.bfloat16: (1e-2, 2e-2)}


# Transparent huge pages: csrc/common.h's empty_output asks for them for large CPU outputs (Linux).
HAS_THP = os.path.exists("/sys/kernel/mm/transparent_hugepage")


def asks_for_huge_pages(t):
    """Whether the mapping that holds t's first 2 MiB-aligned address is marked for huge pages (VmFlags hg)."""
    huge = 1 << 21
    addr = (t.data_ptr() + huge - 1) // huge * huge
    assert addr + huge <= t.data_ptr() + t.numel() * t.element_size(), "too small to hold an aligned 2 MiB range"
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def assert_close_rel(actual, expected, rtol, what="", atol=0.0):
    """|actual - expected| <= rtol * max(|expected|, tiny) + atol, elementwise against the scale of `expected`."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    fin = torch.isfinite(expected)
    assert torch.equal(fin, torch.isfinite(actual)), f"{what}: non-finite pattern differs"
    torch.testing.assert_close(actual[~fin], expected[~fin], rtol=0, atol=0, equal_nan=True,
                               msg=f"{what}: infinities differ")
    scale = expected[fin].abs().max().clamp(min=1e-6) if fin.any() else 1.0
    err = ((actual[fin] - expected[fin]).abs().max() - atol).clamp(min=0) / scale if fin.any() else 0.0
    assert err <= rtol, f"{what}: relative error {float(err):.3g} > {rtol} (beyond atol {atol})"


def assert_compiled_matches_eager(step, grad_inputs, other=()):
    """torch.compile(step, fullgraph=True) gives eager's loss and gradients w.r.t. grad_inputs."""
    torch._dynamo.reset()
    runs = []
    for fn in (torch.compile(step, fullgraph=True), step):
        xs = [x.detach().clone().requires_grad_() for x in grad_inputs]
        loss = fn(*xs, *other)
        loss.backward()
        runs.append((loss.detach(), [x.grad for x in xs]))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b)


def triton_gpu_compile(op):
    """Compile `op`'s Triton kernels for sm_90 in a fresh process (tests/triton_gpu_compile.py): one dict per
    kernel configuration, with its registers and spill bytes. Skips when triton is not installed."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_gpu_compile.py")
    r = subprocess.run([sys.executable, script, op], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


def cuda_kernel_resources():
    """Registers and stack (spill) bytes of every CUDA kernel in the built extension, per architecture, from
    cuobjdump (the CUDA toolkit's, else the one bundled with Triton). Skips without either, or without CUDA
    kernels in the build."""
    import kl_ext._C as ext
    if not torch._C._dispatch_has_kernel_for_dispatch_key("kl_ext::kl_div_with_logits_fwd", "CUDA"):
        pytest.skip("the extension was built without CUDA")
    tools = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        tools.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    tool = next((t for t in tools if os.path.exists(t)), None)
    if tool is None:
        pytest.skip("no cuobjdump")
    out = subprocess.run([tool, "-res-usage", ext.__file__], capture_output=True, text=True, check=True).stdout
    kernels, arch, name = [], None, None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("= ")[1]
        elif line.startswith("Function "):
            name = line[len("Function "):].rstrip(":")
        elif line.startswith("REG:") and name:
            fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
            kernels.append({"arch": arch, "name": name, "regs": int(fields["REG"]), "stack": int(fields["STACK"])})
            name = None
    return kernels



def gloo_worlds(tmp_path_factory, worker):
    """world size -> per-rank {case: error or None} of tests/<worker> (RANK WORLD STORE OUT), run in `world`
    processes of a gloo group; each world is spawned once, on first use."""
    here = os.path.dirname(os.path.abspath(__file__))
    done = {}

    def get(world):
        if world not in done:
            if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
                pytest.skip("torch.distributed with gloo is not available")
            if not _usable("cpu", CPU)[0]:
                pytest.skip("the C++ extension is not built")
            d = tmp_path_factory.mktemp(f"world{world}")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here),
                                                               os.environ.get("PYTHONPATH", "")]),
                       OMP_NUM_THREADS="1")
            procs = [subprocess.Popen([sys.executable, os.path.join(here, worker), str(r), str(world),
                                       str(d / "store"), str(d / f"rank{r}.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for r in range(world)]
            logs = [p.communicate(timeout=900)[0] for p in procs]
            for r, (p, log) in enumerate(zip(procs, logs)):
                assert p.returncode == 0, f"rank {r} of {world} failed:\n{log[-4000:]}"
            done[world] = [json.loads((d / f"rank{r}.json").read_text()) for r in range(world)]
        return done[world]
    return get


def _skip_reason(report) -> str:
    """A skip's reason as the test gave it (without pytest's "Skipped: "), cut to 90 characters for the line."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    return reason if len(reason) <= 90 else reason[:87] + "..."


def pytest_collection_modifyitems(items):
    """Every test of the emulated CUDA kernels is marked `emulated` (-m "not emulated" leaves them out: CI's run on
    the lowest torch, where the kernels are the same C++ and only the Python side differs)."""
    for item in items:
        if "emu" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.emulated)


def pytest_terminal_summary(terminalreporter):
    """One line: why tests were skipped, most common reason first (pytest -rs would list every test)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if getattr(r, "longrepr", None)]
    if not skipped:
        return
    from collections import Counter
    counts = Counter(_skip_reason(r) for r in skipped)
    terminalreporter.write_line(f"skipped {len(skipped)}: " + "; ".join(f"{n} × {why}" for why, n in
                                                                        counts.most_common()))
