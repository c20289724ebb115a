"""GPU tests: skipped cleanly without a CUDA device (the GPU is only queried when tests run, not at import)."""
import pytest
import torch

import kl_ext
from kl_ext import reference
from kl_ext._backends import _register, _usable
from conftest import TOL, assert_close_rel, assert_compiled_matches_eager

pytestmark = pytest.mark.gpu


def _gpu_backend(backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, why = _usable(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    _register(backend)


def _case(N, V, dtype, tt="logits", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(N, V, device="cuda", generator=g) * 3).to(dtype)
    t = torch.randn(N, V, device="cuda", generator=g) * 3
    # probs floored, as in the CPU tests: float16 has no zero probabilities (whose -inf gradients the
    # reference gives as nan in places).
    floor = 1e-4 if dtype == torch.float16 else 1e-6  # reverse probs gradients -q/p must fit float16
    t = {"logits": t, "log_probs": t.log_softmax(-1), "probs": t.softmax(-1).clamp(min=floor)}[tt].to(dtype)
    return x, t


def _check_vs_reference(loss_fn, backend, x, t, dtype, atol=0.0):
    """loss_fn(input, target, backend) ('none' reduction) and its gradients under a random upstream gradient,
    against the float64 reference."""
    out = []
    for be, xx, tt_ in ((backend, x, t), ("torch", x.double(), t.double())):
        a, b = xx.clone().requires_grad_(), tt_.clone().requires_grad_()
        loss = loss_fn(a, b, be)
        g = torch.randn(loss.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        out.append((loss.detach(), *torch.autograd.grad(loss, (a, b), g.to(loss.dtype))))
    for got, exp, what in zip(out[0], out[1], ("loss", "grad input", "grad target")):
        assert_close_rel(got, exp, TOL[dtype][0 if what == "loss" else 1], what, atol=atol)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tt", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("V", [1, 37, 4096, 32000, 128256, 262144])
def test_kl_vs_reference(backend, dtype, tt, direction, V):
    _gpu_backend(backend)
    x, t = _case(4 if V > 100000 else 64, V, dtype, tt)
    mask = torch.rand(x.shape[0], device="cuda") > 0.25
    _check_vs_reference(lambda a, b, be: kl_ext.kl_div_with_logits(
        a, b, target_type=tt, direction=direction, mask=mask, temperature=1.5, reduction="none", backend=be),
        backend, x, t, dtype)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tt", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("V", [1, 37, 4096, 32000, 128256])
def test_jsd_vs_reference(backend, dtype, tt, V):
    _gpu_backend(backend)
    x, t = _case(4 if V > 100000 else 64, V, dtype, tt)
    mask = torch.rand(x.shape[0], device="cuda") > 0.25
    _check_vs_reference(lambda a, b, be: kl_ext.jsd_with_logits(
        a, b, beta=0.3, target_type=tt, mask=mask, temperature=1.5, reduction="none", backend=be),
        backend, x, t, dtype, atol=1e-6)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("xd,td", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                   (torch.float16, torch.float32), (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("V", [37, 4096, 32000])
def test_mixed_dtype_pairs_vs_reference(backend, xd, td, V):
    # Each tensor read in its own dtype (no cast), gradients in each one's dtype.
    _gpu_backend(backend)
    x, t = _case(64, V, torch.float32, "log_probs")
    x, t = x.to(xd), t.to(td)
    half = xd if xd != torch.float32 else td
    for fn in (lambda a, b, be: kl_ext.kl_div_with_logits(a, b, target_type="log_probs", temperature=1.5,
                                                          reduction="none", backend=be),
               lambda a, b, be: kl_ext.jsd_with_logits(a, b, beta=0.3, target_type="log_probs", reduction="none",
                                                       backend=be),
               lambda a, b, be: kl_ext.bernoulli_kl_div_with_logits(a, b.float().exp().to(b.dtype),
                                                                    reduction="none", backend=be)):
        _check_vs_reference(fn, backend, x, t, half, atol=1e-6)
        a, b = x.clone().requires_grad_(), t.clone().requires_grad_()
        fn(a, b, backend).sum().backward()
        assert a.grad.dtype == xd and b.grad.dtype == td


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_jsd_deterministic_compiled_and_opcheck(backend):
    _gpu_backend(backend)
    x, t = _case(32, 40000, torch.bfloat16)  # streamed on both backends
    runs = [kl_ext.jsd_with_logits(x.clone().requires_grad_(), t, beta=0.5, backend=backend, reduction="none")
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert_compiled_matches_eager(lambda a, b: kl_ext.jsd_with_logits(a, b, beta=0.5, backend=backend),
                                  (x[:, :4096], t[:, :4096]))
    ops = torch.ops.kl_ext if backend == "cuda" else torch.ops.kl_ext_triton
    xs, ts = _case(8, 1000, torch.float32)
    torch.library.opcheck(ops.divergence_with_logits_fwd.default,
                          (xs, ts, None, "logits", 1.0, "jsd", 0.5, True, True, torch.tensor(0.5, device="cuda")))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync_deterministic_and_graph_capture(backend):
    _gpu_backend(backend)
    x, t = _case(256, 32000, torch.bfloat16)
    mask = torch.rand(256, device="cuda") > 0.5
    xs = x.clone().requires_grad_()

    def step():
        loss = kl_ext.kl_div_with_logits(xs, t, mask=mask, backend=backend)
        loss.backward()
        return loss

    step()  # warm up (compiles Triton kernels)
    xs.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        l1 = step()
        g1, xs.grad = xs.grad, None
        l2 = step()
        g2, xs.grad = xs.grad, None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(l1, l2) and torch.equal(g1, g2)  # bitwise run to run

    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kl_ext.kl_div_with_logits(static_x, t, mask=mask, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        static_loss = kl_ext.kl_div_with_logits(static_x, t, mask=mask, backend=backend)
    static_x.copy_(x * 0.5)
    graph.replay()
    torch.testing.assert_close(static_loss, kl_ext.kl_div_with_logits(x * 0.5, t, mask=mask, backend=backend))


# The CUDA row engine's paths (KL_EXT_CUDA_ROWS: its limits; csrc/cuda/kl_div_with_logits.cuh): held in one block,
# over a cluster of 2, 8 and (opted into) 16 blocks, streamed.
ENGINE_PATHS = [(4096, torch.float32, None), (32000, torch.bfloat16, None), (100000, torch.bfloat16, None),
                (262144, torch.float32, "cluster=16"), (140000, torch.float32, None)]
ENGINE_IDS = ["held", "cluster2", "cluster8", "cluster16", "streamed"]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("V,dtype,tune", ENGINE_PATHS, ids=ENGINE_IDS)
def test_bitwise_deterministic(backend, V, dtype, tune, monkeypatch):
    # Fixed-order reductions, no atomics: every launch path gives identical bits run to run.
    _gpu_backend(backend)
    if tune:
        monkeypatch.setenv("KL_EXT_CUDA_ROWS", tune)
    x, t = _case(16, V, dtype)
    p = t.float().sigmoid().to(dtype)
    runs = []
    for _ in range(2):
        a, b = x.clone().requires_grad_(), t.clone().requires_grad_()
        kl = kl_ext.kl_div_with_logits(a, b, direction="reverse", backend=backend)
        with torch.no_grad():
            fwd_only = kl_ext.kl_div_with_logits(x, t, backend=backend)
        a2 = x.clone().requires_grad_()
        bern = kl_ext.bernoulli_kl_div_with_logits(a2, p, backend=backend)
        runs.append((kl, fwd_only, bern, *torch.autograd.grad(kl, (a, b)), *torch.autograd.grad(bern, a2)))
    for r1, r2 in zip(*runs):
        assert torch.equal(r1, r2)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("V", [4096, 40000])  # one block / streamed
def test_compile_fullgraph(backend, V):
    _gpu_backend(backend)
    x, t = _case(16, V, torch.bfloat16)
    assert_compiled_matches_eager(lambda a, b: kl_ext.kl_div_with_logits(a, b, temperature=2.0, backend=backend),
                                  (x, t))
    # Bitwise: the same kernels in the same precision (Inductor passes Python floats to Triton as fp64: the
    # kernels cast them, else the compiled step runs other math, or fails to compile a streamed row).
    for fn in (kl_ext.kl_div_with_logits, kl_ext.jsd_with_logits):
        step = lambda a, b: fn(a, b, temperature=2.0, reduction="none", backend=backend)  # noqa: E731
        torch._dynamo.reset()
        assert torch.equal(torch.compile(step, fullgraph=True)(x, t), step(x, t)), fn.__name__


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_opcheck_gpu(backend):
    _gpu_backend(backend)
    ops = torch.ops.kl_ext if backend == "cuda" else torch.ops.kl_ext_triton
    x, t = _case(8, 1000, torch.float32)
    gs = torch.tensor(0.5, device="cuda")
    torch.library.opcheck(ops.kl_div_with_logits_fwd.default, (x, t, None, "logits", 1.0, "forward", True, True, gs))
    torch.library.opcheck(ops.bernoulli_kl_div_with_logits_fwd.default,
                          (x, t.sigmoid(), None, None, "probs", 1.0, True, False, True, False))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bernoulli_and_bce_vs_reference(backend):
    _gpu_backend(backend)
    x, t = _case(512, 1000, torch.bfloat16)
    p = t.float().sigmoid().to(torch.bfloat16)
    a = kl_ext.bernoulli_kl_div_with_logits(x, p, backend=backend)
    assert_close_rel(a, reference.bernoulli_kl_div_with_logits(x.double(), p.double()), 1e-4)
    w = torch.rand(1000, device="cuda") + 0.5
    pw = torch.rand(1000, device="cuda") * 3
    b = kl_ext.binary_cross_entropy_with_logits(x.float(), p.float(), weight=w, pos_weight=pw, backend=backend)
    exp = torch.nn.functional.binary_cross_entropy_with_logits(x.double(), p.double(), weight=w.double(),
                                                               pos_weight=pw.double())
    assert_close_rel(b, exp, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_pow_31_elements(backend):
    _gpu_backend(backend)
    N, V = 8200, 262144  # N * V > 2**31: int64 offsets
    x, t = _case(N, V, torch.bfloat16)
    loss = kl_ext.kl_div_with_logits(x, t, reduction="none", backend=backend)
    tail = reference.kl_div_with_logits(x[-2:].double(), t[-2:].double(), reduction="none")
    assert_close_rel(loss[-2:], tail, 1e-4)


@pytest.mark.parametrize("V,dtype,grads,tune,tol", [(4096, torch.float32, True, None, 0.03),
                                                     (100000, torch.bfloat16, True, None, 0.03),
                                                     (100000, torch.bfloat16, True, "cluster=1", 0.1)],
                         ids=["held", "cluster", "streamed"])
def test_cuda_tiny_kl_precision(V, dtype, grads, tune, tol, monkeypatch):
    # As tests/test_cuda_emulated.py measures on the CPU, now with the GPU's own exp2 / log2 and sum orders.
    _gpu_backend("cuda")
    if tune:
        monkeypatch.setenv("KL_EXT_CUDA_ROWS", tune)
    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(4, V, device="cuda", generator=g) * 0.01).to(dtype)
    t = (s.float() + torch.randn(4, V, device="cuda", generator=g) * 0.001).to(dtype)
    x = s.clone().requires_grad_(grads)
    loss = kl_ext.kl_div_with_logits(x, t, reduction="none", backend="cuda")
    exp = reference.kl_div_with_logits(s.double(), t.double(), reduction="none")
    assert ((loss.detach().double() - exp).abs() / exp).max() < tol


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tt", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("V,k", [(1, 1), (37, 7), (4000, 300), (32000, 64), (128256, 1024), (140000, 64)])
def test_sparse_vs_reference(backend, dtype, tt, tail, V, k):
    _gpu_backend(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(8, V, device="cuda", generator=g) * 2).to(dtype)
    t = torch.randn(8, V, device="cuda", generator=g) * 2
    lp, idx = t.log_softmax(-1).topk(k, -1)
    vals = {"log_probs": lp, "probs": lp.exp(), "logits": t.gather(-1, idx)}[tt]
    if k > 1:
        idx[0, -1] = -1
    mask = torch.rand(8, device="cuda") > 0.25
    _check_vs_reference(lambda a, v, be: kl_ext.sparse_kl_div_with_logits(
        a, idx, v, target_type=tt, tail=tail, mask=mask, temperature=1.5, reduction="none", backend=be),
        backend, x, vals, dtype, atol=1e-6)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_sparse_bad_indices_deterministic_compiled_and_opcheck(backend):
    _gpu_backend(backend)
    x = torch.randn(16, 5000, device="cuda")
    idx, lp = kl_ext.topk_target(torch.randn(16, 5000, device="cuda"), 64)
    bad, empty = idx.clone(), idx.clone()
    bad[0, 3], bad[1, 5] = 10 ** 9, -7  # never dereferenced: as if empty
    empty[0, 3], empty[1, 5] = -1, -1
    a = kl_ext.sparse_kl_div_with_logits(x, bad, lp, reduction="none", backend=backend)
    b = kl_ext.sparse_kl_div_with_logits(x, empty, lp, reduction="none", backend=backend)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"outside \[-1, 5000\)"):
        kl_ext.sparse_kl_div_with_logits(x, bad, lp, backend=backend, validate=True)
    runs = [kl_ext.sparse_kl_div_with_logits(x, idx, lp, reduction="none", backend=backend) for _ in range(2)]
    assert torch.equal(*runs)
    assert_compiled_matches_eager(lambda s, v, i: kl_ext.sparse_kl_div_with_logits(s, i, v, backend=backend),
                                  (x, lp), (idx,))
    ops = torch.ops.kl_ext_triton if backend == "triton" else torch.ops.kl_ext
    torch.library.opcheck(ops.sparse_kl_div_with_logits_fwd.default,
                          (x, idx, lp, None, "log_probs", "bucket", 1.0, True, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["hidden", "dense", "sparse"])
def test_linear_distillation_vs_reference(backend, dtype, form):
    # The CPU tests' small cases (every divergence and option, chunks 1 / 7 / all), on the GPU's kernels + cuBLAS.
    _gpu_backend(backend)
    from test_linear_distillation_loss import OPTIONS, make, run
    cuda = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
    x, w, b, forms, labels, mask = map(cuda, make(dtype))
    forms = {f: {k: cuda(v) for k, v in kw.items()} for f, kw in forms.items()}
    tol = {torch.float32: 2e-5, torch.bfloat16: 5e-2}[dtype]
    for i, (div, opts) in enumerate((d, o) for d in (["kl"] if form == "sparse" else ["kl", "reverse_kl", "jsd"])
                                    for o in OPTIONS):
        kw = dict(forms[form], divergence=div, beta=0.3, chunk_size=(1, 7, None)[i % 3],
                  reduction=("batchmean", "sum", "none")[(i + i // 3) % 3])
        kw.update({k: (labels if k == "labels" else mask if k == "mask" else v) for k, v in opts.items()})
        bias = b if i % 2 else None
        got = run(x, w, bias, backend, **kw)
        kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
        exp = run(x.double(), w.double(), bias.double() if bias is not None else None, "torch", **kw64)
        for a, e, name in zip(got, exp, ("loss", "grad input", "grad weight", "grad bias")):
            assert_close_rel(a, e, tol, f"{name} {div} {opts} {kw['chunk_size']}", atol=1e-6)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_linear_distillation_memory_and_determinism(backend):
    # An LM-head shape: extra memory O(chunk x V) by torch.cuda.max_memory_allocated, and bitwise-identical runs.
    _gpu_backend(backend)
    rows, hidden, vocab, chunk = 8192, 256, 32000, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / 16).to(torch.bfloat16)
    tx, tw = x.flip(0).clone(), w.flip(1).clone()

    def step():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = kl_ext.linear_distillation_loss(xs, ws, tx, target_linear_weight=tw, softcap=30.0, chunk_size=chunk,
                                               backend=backend)
        loss.backward()
        return loss.detach(), xs.grad, ws.grad
    first = step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    second = step()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (x.numel() + 3 * w.numel()) * 4  # input/weight clones and gradients, the fp32 weight accumulator
    assert extra <= grads + 6 * chunk * vocab * 4, extra  # the student's bf16 logits alone are 4x that
    assert all(torch.equal(a, e) for a, e in zip(first, second))
    with torch.no_grad():
        exp = kl_ext.linear_distillation_loss(x.double(), w.double(), tx.double(), target_linear_weight=tw.double(),
                                              softcap=30.0, backend="torch")
    assert_close_rel(first[0], exp, 5e-2, "loss")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op_name", ["kl_div_with_logits_fwd", "divergence_with_logits_fwd"])
@pytest.mark.parametrize("target_type", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("V", [37, 4096, 40000])  # unaligned / resident or one block / streamed
def test_vocab_parallel_modes_match_cpu(backend, op_name, target_type, V):
    # The row_stats modes kl_ext.distributed runs (statistics pass, finishing pass) on the GPU kernels: what the
    # C++ CPU kernels give, which tests/test_distributed.py checks on real process groups.
    from test_distributed import _mode_args
    _gpu_backend(backend)
    _register("cpu")
    for args in _mode_args(op_name, target_type, V):
        want = getattr(torch.ops.kl_ext, op_name)(*args)
        dev = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        got = getattr(getattr(torch.ops, "kl_ext_triton" if backend == "triton" else "kl_ext"), op_name)(*dev)
        for g, w, what in zip(got, want, ("out", "grad input", "grad target")):
            torch.testing.assert_close(g.cpu(), w, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_linear_distillation_compiles_fullgraph(backend, reduction):
    # The CUDA path of the LM-head loss (out-dtype GEMMs, the CUDA chunk size) under torch.compile(fullgraph=True),
    # every loss the chunks call, an upstream gradient != 1 (tests/test_compile.py holds the CPU cases).
    _gpu_backend(backend)
    from test_compile import _compare
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 64, 32, device="cuda", generator=g).bfloat16()
    w = (torch.randn(1000, 32, device="cuda", generator=g) * 0.3).bfloat16()
    th = torch.randn(2, 64, 24, device="cuda", generator=g).bfloat16()
    tw = torch.randn(1000, 24, device="cuda", generator=g).bfloat16()
    labels = torch.randint(0, 1000, (2, 64), device="cuda", generator=g)

    def step(a, ww):
        return kl_ext.linear_distillation_loss(a, ww, th, target_linear_weight=tw, labels=labels, hard_weight=0.5,
                                               softcap=30.0, reduction=reduction, backend=backend)
    _compare(step, (x, w), (), "inductor", tol=dict(rtol=2e-2, atol=1e-3))
