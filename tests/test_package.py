"""Packaging, backend choice and input validation (shared by every backend)."""
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kl_ext
from kl_ext._backends import resolve

NEUTRAL_CWD = "/"


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=NEUTRAL_CWD, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_triton_kernels_is_not_a_top_level_module():
    r = _python("import kl_ext.triton_kernels, importlib.util; "
                "print(importlib.util.find_spec('triton_kernels') is None or "
                "'kl_ext' not in (importlib.util.find_spec('triton_kernels').origin or ''))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_import_is_lazy():
    # Importing kl_ext neither imports triton nor initialises CUDA.
    r = _python("import sys, torch, kl_ext; print('triton' in sys.modules, torch.cuda.is_initialized())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup.py builds with OpenMP on Linux")
def test_cpu_kernels_run_rows_on_threads():
    # at::parallel_for is an OpenMP pragma in ATen's headers: compiled without -fopenmp, every CPU kernel ran
    # on one thread (setup.py).
    import kl_ext._C
    assert kl_ext._C.openmp


def _native_modules():
    import glob
    import kl_ext._C
    here = os.path.dirname(kl_ext._C.__file__)
    return sorted(glob.glob(os.path.join(here, "_C.*.so")) + glob.glob(os.path.join(here, "_cpu_*.so")))


def _built_capabilities():
    import glob
    here = os.path.dirname(kl_ext.__file__)
    return {os.path.basename(f).split(".")[0][len("_cpu_"):] for f in glob.glob(os.path.join(here, "_cpu_*.so"))}


def _needs_portable_build():
    if "default" not in _built_capabilities():
        pytest.skip("the portable CPU kernels were not built (`make setup` builds this CPU's only; "
                    "KL_EXT_CPU_CAPABILITIES=default,avx2,avx512 builds them all, as CI does)")


def test_cpu_kernels_for_this_cpu_are_loaded():
    # setup.py builds the CPU kernels per capability (x86-64: default, avx2, avx512) and kl_ext/_cpu.py loads the
    # best one the CPU runs, so a plain `pip install` is both portable and fast.
    import kl_ext._C
    from kl_ext import _cpu
    built = _built_capabilities()
    requested = os.environ.get("KL_EXT_CPU_CAPABILITIES")
    if requested and requested != "native":
        # A subset asked for (CI's second torch: KL_EXT_CPU_CAPABILITIES=default); the portable one always comes.
        assert built == set(requested.split(",")) | {"default"}, built
    elif platform.machine() in ("x86_64", "AMD64"):
        # Everything (setup.py's default, CI's first torch) or this CPU's best only (`make setup`: native).
        assert built in ({"default", "avx2", "avx512"}, {_cpu.supported()}), built
    expected = next(c for c in _cpu.CAPABILITIES[_cpu.CAPABILITIES.index(_cpu.supported()):] if c in built)
    if os.environ.get(_cpu.ENV_VAR) is None:
        assert kl_ext._C.cpu_capability == expected
    assert kl_ext._C.cpu_kernels.__name__ == f"kl_ext._cpu_{kl_ext._C.cpu_capability}"
    assert kl_ext._C.cpu_capability in built


def test_a_cpu_capability_can_be_lowered_not_raised():
    _needs_portable_build()
    r = _python("import kl_ext._C; print(kl_ext._C.cpu_capability)", KL_EXT_CPU_CAPABILITY="default")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "default"
    # Asking for more than the CPU has (ATEN_CPU_CAPABILITY lowers it for torch and kl_ext alike) gives what runs.
    r = _python("import kl_ext._C; print(kl_ext._C.cpu_capability)", ATEN_CPU_CAPABILITY="default",
                KL_EXT_CPU_CAPABILITY="avx512")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "default"
    r = _python("import kl_ext._C", KL_EXT_CPU_CAPABILITY="sse9")
    assert r.returncode != 0 and "KL_EXT_CPU_CAPABILITY='sse9'; expected one of avx512, avx2, default" in r.stderr


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 capabilities")
def test_each_cpu_build_has_its_instructions():
    # The flags reached each module: no AVX register in the portable one, ymm in the AVX2 one, zmm in AVX-512's.
    import shutil
    if shutil.which("objdump") is None:
        pytest.skip("objdump not found")
    here = os.path.dirname(kl_ext.__file__)
    for cap in _built_capabilities():
        so = next(f for f in os.listdir(here) if f.startswith(f"_cpu_{cap}.") and f.endswith(".so"))
        dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", os.path.join(here, so)], capture_output=True,
                             text=True, check=True).stdout
        assert ("%ymm" in dis, "%zmm" in dis) == {"default": (False, False), "avx2": (True, False),
                                                  "avx512": (True, True)}[cap], cap


def test_portable_cpu_kernels_agree_with_the_best():
    # The same losses and gradients from the portable build as from the one this CPU runs (other instructions,
    # other roundings: close, not bitwise).
    _needs_portable_build()
    code = """
import torch, kl_ext
g = torch.Generator().manual_seed(0)
x = torch.randn(6, 3001, generator=g, dtype=torch.float32, requires_grad=True)
t = torch.randn(6, 3001, generator=g, dtype=torch.bfloat16)
out = []
for loss in (kl_ext.kl_div_with_logits(x, t, backend="cpu"), kl_ext.jsd_with_logits(x, t, beta=0.3, backend="cpu"),
             kl_ext.sparse_kl_div_with_logits(x, *kl_ext.topk_target(t, 7), backend="cpu"),
             kl_ext.bernoulli_kl_div_with_logits(x, t.float().sigmoid(), backend="cpu")):
    out += [loss.detach(), torch.autograd.grad(loss, x)[0]]
torch.save(out, "{path}")
"""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        results = []
        for cap in ("default", None):
            path = os.path.join(d, f"{cap}.pt")
            env = {"KL_EXT_CPU_CAPABILITY": cap} if cap else {}
            r = _python(code.format(path=path), **env)
            assert r.returncode == 0, r.stderr
            results.append(torch.load(path))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)


def test_available_backends():
    b = kl_ext.available_backends()
    assert b[0] == "torch" and set(b) <= {"torch", "cpu", "cuda", "triton"}


def test_auto_prefers_cpu_kernels_and_env_override(monkeypatch):
    if "cpu" in kl_ext.available_backends():
        assert resolve("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setenv("KL_EXT_BACKEND", "torch")
    assert resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("KL_EXT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="KL_EXT_BACKEND"):
        resolve("auto", torch.device("cpu"))


def test_explicit_backend_on_wrong_device_says_why():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
        kl_ext.kl_div_with_logits(x, x, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        kl_ext.kl_div_with_logits(x, x, backend="gpu")


X = torch.randn(4, 5)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(target_type="prob"), ValueError, "target_type must be one of"),
    (dict(direction="backward"), ValueError, "direction must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=torch.tensor(2.0)), TypeError, "temperature must be a Python float"),
    (dict(target=torch.randn(4, 6)), ValueError, "must equal input shape"),
    (dict(target=X.double()), TypeError, "cast one of them"),
    (dict(target=X.long()), TypeError, "must be float32, float16, bfloat16 or float64"),
    (dict(target=torch.randn(4, 5, device="meta")), ValueError, "move them to one device"),
    (dict(mask=torch.ones(4)), TypeError, "mask must be a bool tensor"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, "one value per row"),
    (dict(input=torch.tensor(1.0), target=torch.tensor(1.0)), ValueError, "class dimension"),
])
def test_kl_bad_input(kwargs, exc, match):
    args = dict(input=X, target=X)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kl_ext.kl_div_with_logits(args.pop("input"), args.pop("target"), **args)


@pytest.mark.parametrize("fn,kwargs,exc,match", [
    (kl_ext.bernoulli_kl_div_with_logits, dict(target_type="log_probs"), ValueError, "target_type must be one of"),
    (kl_ext.bernoulli_kl_div_with_logits, dict(weight=torch.rand(3)), ValueError, "does not broadcast"),
    (kl_ext.bernoulli_kl_div_with_logits, dict(weight=torch.rand(2, 4, 5)), ValueError, "enlarge"),
    (kl_ext.bernoulli_kl_div_with_logits, dict(weight=torch.rand(5, requires_grad=True)), NotImplementedError,
     "detach"),
    (kl_ext.binary_cross_entropy_with_logits, dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (kl_ext.binary_cross_entropy_with_logits, dict(pos_weight=torch.rand(7)), ValueError, "does not broadcast"),
])
def test_bernoulli_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(X, torch.rand(4, 5), **kwargs)


# ------------------------------------------------------------------------ validate=True: the pitfalls


def test_validate_probs_passed_as_log_probs():
    p = F.softmax(X, -1)
    with pytest.raises(ValueError, match="look like probabilities.*target_type='probs'.*negative"):
        kl_ext.kl_div_with_logits(X, p, target_type="log_probs", validate=True)


def test_validate_log_probs_passed_as_probs():
    with pytest.raises(ValueError, match="looks like log-probabilities"):
        kl_ext.kl_div_with_logits(X, F.log_softmax(X, -1), target_type="probs", validate=True)


def test_validate_multilabel_targets_point_to_bernoulli():
    multi = torch.tensor([[0.99, 0.01, 0.99, 0.1, 0.1]]).expand(4, 5)
    with pytest.raises(ValueError, match="multi-label.*bernoulli_kl_div_with_logits"):
        kl_ext.kl_div_with_logits(X, multi, target_type="probs", validate=True)


def test_validate_student_probabilities():
    with pytest.raises(ValueError, match="raw logits"):
        kl_ext.kl_div_with_logits(F.softmax(X, -1), X, validate=True)


def test_validate_bernoulli_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kl_ext.bernoulli_kl_div_with_logits(X, X, validate=True)


def test_validate_accepts_correct_inputs():
    kl_ext.kl_div_with_logits(X, F.softmax(X, -1), target_type="probs", validate=True)
    kl_ext.kl_div_with_logits(X, F.log_softmax(X, -1), target_type="log_probs", validate=True)
    kl_ext.kl_div_with_logits(X, X * 2, validate=True)
    kl_ext.bernoulli_kl_div_with_logits(X, torch.rand(4, 5), validate=True)


def test_benchmark_summary_says_slower_and_names_the_fastest_peer(capsys):
    # benchmarks/run.py's closing lines: "N x slower" when slower (never "0.6x faster"), and each kl_ext row
    # against the fastest torch peer of its row (issue 15's bar), the BCE drop-in against the BCE calls only.
    from benchmarks.common import Row
    from benchmarks.run import _speedups

    def row(op, provider, ms):
        return Row(op=op, mode="fwd", dtype="float32", shape="4x5", V=5, provider=provider, ms=ms)

    _speedups([row("kl", "kl_ext cpu", 2.0), row("kl", "nn.KLDivLoss eager", 1.0),
               row("kl", "reference compiled", 3.0), row("bernoulli", "kl_ext BCE cpu", 1.0),
               row("bernoulli", "BCEWithLogitsLoss eager", 4.0), row("bernoulli", "BCEWithLogitsLoss compiled", 2.0),
               row("bernoulli", "reference KL compiled", 0.5)])
    out = capsys.readouterr().out
    first, eager, fastest = out.split("kl_ext against")
    assert first.strip() == "" and "the eager call users write" in eager and "the fastest torch peer" in fastest
    assert "2.00x slower than nn.KLDivLoss eager" in eager and "faster than nn.KLDivLoss" not in eager
    assert "4.00x faster than BCEWithLogitsLoss eager" in eager
    assert "2.00x slower than nn.KLDivLoss eager" in fastest
    assert "2.00x faster than BCEWithLogitsLoss compiled" in fastest and "reference KL" not in fastest


def test_torch_range_is_one_statement_and_checked_at_import(monkeypatch):
    from kl_ext import _torch_range as r
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = {f: open(os.path.join(root, f), encoding="utf-8").read()
            for f in ("pyproject.toml", "requirements.txt", "README.md", "scripts/sdist_check.sh")}
    for f, body in text.items():
        assert r.REQUIREMENT in body, f"{f} does not state {r.REQUIREMENT}"
    # The installed package's metadata (setup.py derives it from _torch_range.py).
    from importlib.metadata import requires
    from packaging.requirements import Requirement
    torch_req = [Requirement(q) for q in requires("kl_ext") if q.startswith("torch")]
    assert [str(q.specifier) for q in torch_req] == [str(Requirement(r.REQUIREMENT).specifier)], torch_req
    monkeypatch.delenv(r.OVERRIDE, raising=False)
    for ok in ("2.11.0+cu130", "2.12.1", "2.14.1", f"{r.MAX[0]}.{r.MAX[1]}.9"):
        r.check(ok)
    for bad in ("2.10.0", "2.15.0.dev20261201", "3.0.0"):
        with pytest.raises(ImportError, match=r"supports torch 2\.11 - 2\.14"):
            r.check(bad)
    monkeypatch.setenv(r.OVERRIDE, "1")
    r.check("2.15.0")


@pytest.mark.parametrize("bad,kind", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
def test_validate_names_nan_and_inf_and_their_row(bad, kind):
    x, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    idx, vals = kl_ext.topk_target(t, 2)
    poisoned = lambda a: a.index_put((torch.tensor(1), torch.tensor(2), torch.tensor(1)), torch.tensor(bad))  # noqa
    calls = {
        "input": lambda a, b: kl_ext.kl_div_with_logits(a, b, validate=True),
        "target": lambda a, b: kl_ext.jsd_with_logits(b, a, validate=True),
        "target_values": lambda a, b: kl_ext.sparse_kl_div_with_logits(b, idx, a[..., :2], validate=True),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"{name} \(.*\) holds {kind} in row \(1, 2\); 1 of 6 rows"):
            call(poisoned(x), t)
        with pytest.raises(ValueError, match="mask="):
            call(poisoned(x), t)
    with pytest.raises(ValueError, match=rf"input \(the logits\) holds {kind}"):
        kl_ext.bernoulli_kl_div_with_logits(poisoned(x), t.sigmoid(), validate=True)
    # -inf is a class with no mass, not an error; without validate nothing is checked (no host sync).
    kl_ext.kl_div_with_logits(x, t.index_put((torch.tensor(0), torch.tensor(0), torch.tensor(1)),
                                             torch.tensor(float("-inf"))), validate=True)
    assert not torch.isfinite(kl_ext.kl_div_with_logits(poisoned(x), t))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_labels_with_ignore_index_are_a_row_mask(backend):
    if backend != "torch":
        from kl_ext._backends import _usable
        if not _usable(backend, torch.device("cpu"))[0]:
            pytest.skip(f"{backend} unavailable")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    labels[0, 1] = labels[1, 3] = -100
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 0] = False
    idx, vals = kl_ext.topk_target(t, 3)
    calls = [lambda **kw: kl_ext.kl_div_with_logits(x, t, backend=backend, **kw),
             lambda **kw: kl_ext.jsd_with_logits(x, t, beta=0.3, backend=backend, **kw),
             lambda **kw: kl_ext.sparse_kl_div_with_logits(x, idx, vals, backend=backend, **kw)]
    for call in calls:
        torch.testing.assert_close(call(labels=labels), call(mask=labels != -100))
        torch.testing.assert_close(call(labels=labels, mask=mask), call(mask=mask & (labels != -100)))
        torch.testing.assert_close(call(labels=labels.masked_fill(labels == -100, 99), ignore_index=99),
                                   call(mask=labels != -100))
    module = kl_ext.KLDivWithLogitsLoss(ignore_index=-1, backend=backend)
    torch.testing.assert_close(module(x, t, labels=labels.masked_fill(labels == -100, -1)),
                               calls[0](mask=labels != -100))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        calls[0](labels=labels.float())
    with pytest.raises(ValueError, match=r"labels shape \(8,\) must equal the input's leading shape \(2, 4\)"):
        calls[1](labels=labels.reshape(-1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup.py strips on Linux")
def test_release_build_has_no_debug_info():
    # setup.py links with --strip-debug unless KL_EXT_DEBUG=1 (the DWARF was 21 of 22 MB of the CPU-only build).
    import kl_ext._C
    if os.environ.get("KL_EXT_DEBUG") == "1":
        pytest.skip("a debug build (KL_EXT_DEBUG=1)")
    for so in _native_modules():
        with open(so, "rb") as f:
            assert b".debug_info" not in f.read(), f"{so} carries DWARF debug sections"
    from importlib.metadata import metadata
    summary = metadata("kl_ext")["Summary"]
    assert all(w in summary for w in ("KL", "JSD", "top-k", "LM-head", "vocab-parallel", "Bernoulli", "BCE")), summary


def test_benchmark_table_and_plots_a_person_reads(tmp_path, capsys):
    # Milliseconds to three significant digits, the columns explained, long provider names in their column, and a
    # plot even when the run measured one shape (the quick run: a bar chart).
    from benchmarks.common import Row, fmt_ms, plot, print_table
    assert [fmt_ms(v) for v in (1234.5, 12.345, 0.12345, 0.0001234)] == ["1234", "12.3", "0.123", "1.2e-04"]
    rows = [Row(op="kl", mode="fwd+bwd", dtype="float32", shape="4096x32000", V=32000, provider=p, ms=ms, gbps=g,
                pct_copy=g / 0.3) for p, ms, g in (("kl_ext cpu", 50.0, 20.0),
                                                   ("reference compiled (max-autotune-no-cudagraphs)", 90.0, 11.0))]
    rows.append(Row(op="kl", mode="fwd+bwd", dtype="float32", shape="8x1000", V=1000, provider="kl_ext cpu", ms=0.13,
                    timing="wall"))
    print_table(rows, 30.0)
    out = capsys.readouterr().out
    assert "higher is better" in out and "Lower is better" in out and "extraMB" not in out  # not measured on CPU
    lines = [line for line in out.splitlines() if line.startswith("kl ")]
    assert len({line.index(" 50") if " 50" in line else line.index(" 90") for line in lines[:2]}) == 1, lines
    assert "130.0" in lines[2] and "GB/s" not in out.split("Small losses")[1]  # us per step, no bandwidth
    assert "reference compiled (max-autotune-no-cudagraphs)  kl_ext.reference" in out  # each provider explained
    pngs = plot(rows, 30.0, str(tmp_path), "test CPU")
    assert [os.path.basename(p) for p in pngs] == ["kl_fwd+bwd_float32.png", "small_wall_8x1000.png"]
    assert all(os.path.getsize(p) > 1000 for p in pngs)
