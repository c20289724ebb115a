import math

import re

import pytest
import torch
import torch.nn.functional as F

import kl_ext
from kl_ext import reference
from conftest import (HAS_THP, TOL, asks_for_huge_pages, assert_close_rel, assert_compiled_matches_eager,
                      backend_params, cuda_kernel_resources, triton_gpu_compile)

TARGET_TYPES = ["logits", "log_probs", "probs"]
DIRECTIONS = ["forward", "reverse"]
REDUCTIONS = ["none", "sum", "mean", "batchmean"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_target(shape, target_type, dtype, gen, scale=2.0):
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if target_type == "log_probs":
        t = F.log_softmax(t, -1)
    elif target_type == "probs":
        # Floor at 1e-6 so no probability underflows to 0 in float16 (zero targets have their own tests).
        t = F.softmax(t, -1).clamp(min=1e-6)
    return t.to(dtype)


def make_case(shape, target_type, dtype, seed=0, masked=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    t = make_target(shape, target_type, dtype, gen)
    mask = None
    if masked and len(shape) > 1:
        mask = torch.rand(shape[:-1], generator=gen) > 0.3
    return x, t, mask


def run(x, t, backend, grad_out_seed=1, **kw):
    """Loss and (input, target) grads under a random upstream gradient."""
    x = x.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = kl_ext.kl_div_with_logits(x, t, backend=backend, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64)
    gx, gt = torch.autograd.grad(loss, (x, t), g.to(loss.dtype))
    return loss.detach(), gx, gt


def ref(x, t, **kw):
    return run(x.double(), t.double(), "torch", **kw)


# ---------------------------------------------------------------------------------------- the reference


def test_reference_closed_form_two_classes():
    # p = softmax([0, log 3]) = [1/4, 3/4], q = [1/2, 1/2]: KL(p||q) = 1/4 log(1/2) + 3/4 log(3/2).
    x = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    kl_pq = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl_qp = 0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75)
    assert reference.kl_div_with_logits(x, t).item() == pytest.approx(kl_pq, rel=1e-12)
    assert reference.kl_div_with_logits(x, t, direction="reverse").item() == pytest.approx(kl_qp, rel=1e-12)


# F.kl_div warns that its "mean" divides by the classes too: the very behaviour compared here.
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")
@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean", "none"])
def test_reference_matches_f_kl_div(reduction):
    x, t, _ = make_case((6, 11), "probs", torch.float64)
    ls = F.log_softmax(x, -1)
    ours_p = reference.kl_div_with_logits(x, t, target_type="probs", reduction=reduction)
    ours_lp = reference.kl_div_with_logits(x, t.log(), target_type="log_probs", reduction=reduction)
    theirs = F.kl_div(ls, t, reduction=reduction)
    theirs_lp = F.kl_div(ls, t.log(), reduction=reduction, log_target=True)
    if reduction == "none":  # F.kl_div is elementwise; ours is per row
        theirs, theirs_lp = theirs.sum(-1), theirs_lp.sum(-1)
    torch.testing.assert_close(ours_p, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_lp, theirs_lp, rtol=1e-12, atol=1e-12)


def test_reference_batchmean_is_per_row_for_3d():
    # F.kl_div's 'batchmean' divides by the first dim only; ours divides by the rows (B*T tokens).
    x, t, _ = make_case((2, 5, 7), "probs", torch.float64)
    ours = reference.kl_div_with_logits(x, t, target_type="probs")
    theirs = F.kl_div(F.log_softmax(x, -1), t, reduction="batchmean")
    torch.testing.assert_close(ours * 5, theirs, rtol=1e-12, atol=1e-12)


def test_reference_temperature_is_softmax_of_scaled_logits():
    x, t, _ = make_case((3, 9), "logits", torch.float64)
    ours = reference.kl_div_with_logits(x, t, temperature=3.0, reduction="sum")
    theirs = F.kl_div(F.log_softmax(x / 3, -1), F.log_softmax(t / 3, -1), reduction="sum", log_target=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_reference_gradgradcheck():
    x, t, _ = make_case((3, 5), "logits", torch.float64)
    x.requires_grad_()
    t.requires_grad_()
    fn = lambda a, b: reference.kl_div_with_logits(a, b, temperature=1.5, direction="reverse")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, t))


# ---------------------------------------------------------------------- every kernel backend vs reference


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_type", TARGET_TYPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backend_matches_reference(backend, dtype, target_type, direction, reduction, require_backend):
    require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32; float64 is the cpu/torch backends' job")
    loss_tol, grad_tol = TOL[dtype]
    # (3, 2100) spans several blocks: the Triton kernels' streaming path; the others fit one block.
    for shape, masked, temperature in [((4, 37), False, 1.0), ((2, 3, 50), True, 2.5), ((5, 1), True, 0.7),
                                       ((3, 2100), True, 1.3)]:
        x, t, mask = make_case(shape, target_type, dtype, seed=len(shape), masked=masked)
        kw = dict(target_type=target_type, direction=direction, reduction=reduction, mask=mask,
                  temperature=temperature)
        loss, gx, gt = run(x, t, backend, **kw)
        rloss, rgx, rgt = ref(x, t, **kw)
        what = f"{shape} T={temperature} mask={masked}"
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert gx.dtype == dtype and gt.dtype == dtype
        assert_close_rel(loss, rloss, loss_tol, "loss " + what)
        # Tiny 16-bit gradients ('mean' over 2100 classes) are subnormal: allow what rounding the exact
        # gradient to the dtype itself loses, on top of the dtype's tolerance.
        for got, exp, name in ((gx, rgx, "grad input "), (gt, rgt, "grad target ")):
            floor = (exp.to(dtype).double() - exp).abs().max() / exp.abs().max().clamp(min=1e-30)
            assert_close_rel(got, exp, grad_tol + 2 * float(floor), name + what)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("target_type", TARGET_TYPES)
def test_large_vocab(backend, target_type, require_backend):
    require_backend(backend)
    x, t, _ = make_case((2, 70000), target_type, torch.float32)
    for direction in DIRECTIONS:
        loss, gx, gt = run(x, t, backend, target_type=target_type, direction=direction)
        rloss, rgx, rgt = ref(x, t, target_type=target_type, direction=direction)
        assert_close_rel(loss, rloss, 1e-4, direction)
        assert_close_rel(gx, rgx, 1e-4, direction)
        assert_close_rel(gt, rgt, 1e-4, direction)


@pytest.mark.parametrize("backend", backend_params())
def test_forward_only_no_grad_buffers(backend, require_backend):
    require_backend(backend)
    x, t, _ = make_case((3, 40), "logits", torch.float32)
    with torch.no_grad():
        out = kl_ext.kl_div_with_logits(x, t, backend=backend)
    assert out.grad_fn is None
    assert_close_rel(out, reference.kl_div_with_logits(x.double(), t.double()), 1e-5)


@pytest.mark.skipif(not HAS_THP, reason="Linux with THP only")
def test_large_cpu_gradient_asks_for_huge_pages(require_backend):
    # The fused forward writes the gradient into fresh memory: csrc/common.h advises huge pages for it before the
    # first write (a fault per 2 MiB instead of per 4 KiB). 8 MiB holds at least one aligned 2 MiB range.
    require_backend("cpu")
    x = torch.randn(2048, 1024, requires_grad=True)
    kl_ext.kl_div_with_logits(x, torch.randn(2048, 1024), backend="cpu").backward()
    assert asks_for_huge_pages(x.grad)


# ------------------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
class TestEdgeCases:
    def test_v1_is_zero(self, backend, require_backend):
        if backend != "torch":
            require_backend(backend)
        x, t, _ = make_case((4, 1), "logits", torch.float32)
        loss, gx, gt = run(x, t, backend)
        assert loss.item() == 0 and gx.abs().max() == 0 and gt.abs().max() == 0

    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_empty_batch(self, backend, reduction, require_backend):
        if backend != "torch":
            require_backend(backend)
        x, t, _ = make_case((0, 7), "logits", torch.float32)
        loss, gx, gt = run(x, t, backend, reduction=reduction)
        assert loss.shape == ((0,) if reduction == "none" else ())
        assert not loss.isnan().any() and loss.sum() == 0
        assert gx.shape == x.shape and gt.shape == t.shape

    def test_all_rows_masked(self, backend, require_backend):
        if backend != "torch":
            require_backend(backend)
        x, t, _ = make_case((3, 4, 9), "logits", torch.float32)
        x[0, 0] = float("nan")  # masked garbage must not leak
        mask = torch.zeros(3, 4, dtype=torch.bool)
        for reduction in REDUCTIONS:
            loss, gx, gt = run(x, t, backend, mask=mask, reduction=reduction)
            assert (loss == 0).all() and (gx == 0).all() and (gt == 0).all()

    def test_masked_rows_are_not_counted(self, backend, require_backend):
        if backend != "torch":
            require_backend(backend)
        x, t, _ = make_case((6, 9), "logits", torch.float32)
        mask = torch.tensor([True, False, True, True, False, False])
        loss, gx, _ = run(x, t, backend, mask=mask)
        sub, sgx, _ = run(x[mask], t[mask], backend)
        torch.testing.assert_close(loss, sub, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gx[mask], sgx, rtol=1e-5, atol=1e-7)  # 3 rows counted either way
        assert (gx[~mask] == 0).all()

    def test_self_kl_is_zero(self, backend, require_backend):
        if backend != "torch":
            require_backend(backend)
        x, _, _ = make_case((5, 33), "logits", torch.float32)
        for direction in DIRECTIONS:
            assert kl_ext.kl_div_with_logits(x, x, backend=backend, direction=direction,
                                             reduction="none").abs().max() <= 1e-6
            probs = kl_ext.kl_div_with_logits(x, F.softmax(x, -1), target_type="probs", backend=backend,
                                              direction=direction, reduction="none")
            assert probs.min() >= -1e-6 and probs.max() <= 1e-5

    def test_masked_vocab_teacher(self, backend, require_backend):
        # Teacher -inf entries (p = 0) contribute nothing: same as dropping those classes.
        if backend != "torch":
            require_backend(backend)
        x, t, _ = make_case((3, 12), "logits", torch.float32)
        t[:, 8:] = float("-inf")
        loss, gx, gt = run(x, t, backend, direction="forward")
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gt).all()
        rloss, rgx, _ = ref(x, t, direction="forward")
        assert_close_rel(loss, rloss, 1e-5)
        assert_close_rel(gx, rgx, 1e-5)

    def test_student_neg_inf_where_teacher_has_mass_is_inf(self, backend, require_backend):
        if backend != "torch":
            require_backend(backend)
        x, t, _ = make_case((2, 6), "logits", torch.float32)
        x[0, 2] = float("-inf")
        loss = kl_ext.kl_div_with_logits(x, t, backend=backend, reduction="none")
        assert loss[0] == float("inf") and torch.isfinite(loss[1])

    def test_entirely_neg_inf_rows(self, backend, require_backend):
        # Defined: an all -inf row has probs 0. Teacher with no mass -> forward KL 0 and zero grads;
        # student with no mass -> forward KL +inf (teacher has mass), reverse KL 0.
        if backend != "torch":
            require_backend(backend)
        x, t, _ = make_case((3, 6), "logits", torch.float32)
        t[0] = float("-inf")
        x[1] = float("-inf")
        fwd = kl_ext.kl_div_with_logits(x, t, backend=backend, reduction="none")
        rev = kl_ext.kl_div_with_logits(x, t, backend=backend, reduction="none", direction="reverse")
        assert fwd[0] == 0 and fwd[1] == float("inf") and torch.isfinite(fwd[2])
        assert rev[1] == 0 and torch.isfinite(rev[2])
        _, gx, gt = run(x, t, backend, reduction="none")
        assert (gx[0] == 0).all() and (gt[0] == 0).all() and not gx.isnan().any()

    def test_zero_probability_targets(self, backend, require_backend):
        if backend != "torch":
            require_backend(backend)
        x, t, _ = make_case((3, 8), "probs", torch.float32)
        t[0] = 0
        t[1, :4] = 0
        loss = kl_ext.kl_div_with_logits(x, t, target_type="probs", backend=backend, reduction="none")
        assert loss[0] == 0 and torch.isfinite(loss).all()
        theirs = F.kl_div(F.log_softmax(x, -1), t, reduction="none").sum(-1)
        torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-6)

    def test_3d_input(self, backend, require_backend):
        if backend != "torch":
            require_backend(backend)
        x, t, mask = make_case((2, 3, 10), "logits", torch.float32, masked=True)
        per_row = kl_ext.kl_div_with_logits(x, t, backend=backend, reduction="none", mask=mask)
        assert per_row.shape == (2, 3)
        mean = kl_ext.kl_div_with_logits(x, t, backend=backend, mask=mask)
        torch.testing.assert_close(mean, per_row.sum() / mask.sum().clamp(min=1))


# -------------------------------------------------------------------------------- autograd and tracing


@pytest.mark.parametrize("target_type", TARGET_TYPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_cpu(target_type, direction, reduction, require_backend):
    require_backend("cpu")
    x, t, _ = make_case((3, 7), target_type, torch.float64, seed=3)
    mask = torch.tensor([True, False, True])
    x.requires_grad_()
    t.requires_grad_()

    def fn(a, b):
        return kl_ext.kl_div_with_logits(a, b, target_type=target_type, direction=direction, reduction=reduction,
                                         mask=mask, temperature=1.7, backend="cpu")
    assert torch.autograd.gradcheck(fn, (x, t))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("path", ["eager", "function"])
def test_double_backward_is_refused_at_the_first_backward(require_backend, backend, path, monkeypatch):
    # The kernel backends give no second derivatives: a backward with create_graph=True raises at once, naming
    # backend="torch" (which supports double backward), on the eager C++ node and on the autograd.Function path
    # alike (the latter is what torch.compile traces; forced here by hiding the native node).
    require_backend(backend)
    if path == "function":
        monkeypatch.setattr("kl_ext._fused.native_loaded", lambda: False)
    x, t, _ = make_case((2, 5), "logits", torch.float64)
    x.requires_grad_()
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    for loss in (lambda: kl_ext.kl_div_with_logits(x, t, backend=backend) * w,
                 lambda: kl_ext.jsd_with_logits(x, t, backend=backend),
                 lambda: kl_ext.sparse_kl_div_with_logits(x, *kl_ext.topk_target(t, 2), backend=backend),
                 lambda: kl_ext.bernoulli_kl_div_with_logits(x, t.sigmoid(), backend=backend)):
        with pytest.raises(RuntimeError, match="create_graph=True.*backend='torch'"):
            torch.autograd.grad(loss(), x, create_graph=True)
        torch.autograd.grad(loss(), x)  # without it, as always
    (g,) = torch.autograd.grad(kl_ext.kl_div_with_logits(x, t, backend="torch") * w, x, create_graph=True)
    g.sum().backward()  # the reference differentiates twice
    assert w.grad is not None


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_compile_fullgraph_cpu(reduction, require_backend):
    require_backend("cpu")
    x, t, mask = make_case((4, 6, 33), "logits", torch.float32, masked=True)

    def step(a, b, m):
        loss = kl_ext.kl_div_with_logits(a, b, temperature=2.0, reduction=reduction, mask=m, backend="cpu")
        return loss if reduction != "none" else (loss * 0.5).sum()

    assert_compiled_matches_eager(step, (x, t), (mask,))


@pytest.mark.parametrize("backend", backend_params())
def test_deterministic(backend, require_backend):
    require_backend(backend)
    x, t, mask = make_case((8, 300), "logits", torch.float32, masked=True)
    a = run(x, t, backend, mask=mask)
    b = run(x, t, backend, mask=mask)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_module_stores_settings_only():
    m = kl_ext.KLDivWithLogitsLoss(temperature=2.0, direction="reverse", reduction="sum", backend="torch")
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    x, t, mask = make_case((3, 4, 5), "logits", torch.float32, masked=True)
    torch.testing.assert_close(m(x, t, mask), kl_ext.kl_div_with_logits(
        x, t, temperature=2.0, direction="reverse", reduction="sum", mask=mask, backend="torch"))
    assert "reverse" in repr(m)


def test_non_contiguous_inputs(require_backend):
    require_backend("cpu")
    x, t, _ = make_case((9, 6), "logits", torch.float32)
    xs, ts = x.t().contiguous().t(), t[:, :].t().contiguous().t()
    assert not xs.is_contiguous()
    torch.testing.assert_close(kl_ext.kl_div_with_logits(xs, ts, backend="cpu"),
                               kl_ext.kl_div_with_logits(x, t, backend="cpu"))


@pytest.mark.parametrize("backend", backend_params())
def test_retain_graph_second_backward(backend, require_backend):
    # Backward scales the saved gradient in place; a second backward through the retained graph recomputes it.
    require_backend(backend)
    x, t, mask = make_case((5, 23), "logits", torch.float32, masked=True)
    x.requires_grad_()
    t.requires_grad_()
    loss = kl_ext.kl_div_with_logits(x, t, mask=mask, backend=backend)
    g1 = torch.autograd.grad(loss, (x, t), torch.tensor(2.0), retain_graph=True)
    g2 = torch.autograd.grad(loss, (x, t), torch.tensor(-0.5), retain_graph=True)
    g3 = torch.autograd.grad(loss, (x, t))
    for a, b, c in zip(g1, g2, g3):
        torch.testing.assert_close(a, 2 * c)
        torch.testing.assert_close(b, -0.5 * c)
    _, rgx, rgt = ref(x, t, mask=mask)
    g = torch.randn((), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close_rel(g3[0] * g, rgx, 1e-5)
    assert_close_rel(g3[1] * g, rgt, 1e-5)


def test_retain_graph_after_inplace_input_change_is_refused(require_backend):
    require_backend("cpu")
    x, t, _ = make_case((3, 8), "logits", torch.float32)
    x.requires_grad_()
    loss = kl_ext.kl_div_with_logits(x, t, backend="cpu")
    loss.backward(retain_graph=True)
    t.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_triton_kernels_compile_for_gpu_without_spilling():
    # The interpreter runs code compiled Triton rejects (a non-constexpr global once passed here), and only
    # ptxas says whether a row held in registers spills: compile the launch configurations for sm_90.
    kernels = triton_gpu_compile("kl")
    assert {(k["one_chunk"], k["dtype"]) for k in kernels} == {(True, "bf16"), (False, "bf16"), (True, "fp32"),
                                                                 (False, "fp32")}
    for k in kernels:
        # One-block rows up to 16384: <= 72 spill bytes (row_config); 32768 in one block would spill ~1 KB.
        assert k["stack"] <= 128 and k["regs"] <= 128, k


def test_cuda_kernels_build_without_heavy_spills():
    # ptxas's register allocation decides whether a row held in registers stays there (checked on the built
    # extension, sm_90). The row engine's held kernels (the KL's and the divergences', the sparse teacher's) are
    # bounded (__launch_bounds__) to 64 registers at 1 pack per thread (4 blocks of 256 per SM) and 128 at 2 - 8
    # (2 blocks of 256; 8 packs: 1 of 512) and must not spill there; the streamed kernels (512 threads, one row in
    # flight per block) may spill a little.
    engine = ("kl_held_kernel", "kl_stream_kernel", "sparse_held_kernel", "sparse_stream_kernel")
    kernels = [k for k in cuda_kernel_resources() if any(name in k["name"] for name in engine)]
    assert {k["arch"] for k in kernels} >= {"sm_90"}
    held = {}
    for k in kernels:
        found = re.search(r"(kl|sparse)_held_kernelI.*?Li(\d+)ELi(\d+)E", k["name"])
        if found:
            kind, vec, items = found.group(1), int(found.group(2)), int(found.group(3))
            if k["arch"] == "sm_90":
                held[kind, items] = held.get((kind, items), 0) + 1
            assert k["stack"] == 0 and k["regs"] <= {1: 64, 2: 128, 4: 128, 8: 128}[items], k
        elif "kernelId" not in k["name"]:  # float64 streams, for accuracy, not speed
            assert k["stack"] <= 64, k
    # Every packs-per-thread configuration: for the 7 dtype pairs other than float64, KL and the divergences; for
    # the sparse teacher's 3 dtypes other than float64.
    assert held == {**{("kl", i): 14 for i in (1, 2, 4, 8)}, **{("sparse", i): 3 for i in (1, 2, 4, 8)}}


def test_tiny_kl_between_near_identical_rows_cpu(require_backend):
    # A KL of ~5e-7 at V = 32000 in fp32 (a student near convergence): with one running fp32 sum of the
    # exponentials and a difference of their logs, the loss was off by up to 3x; now by a few percent.
    require_backend("cpu")
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 32000, generator=g) * 0.01
    t = s + torch.randn(8, 32000, generator=g) * 0.001
    got = kl_ext.kl_div_with_logits(s, t, reduction="none", backend="cpu")
    exp = reference.kl_div_with_logits(s.double(), t.double(), reduction="none")
    assert exp.max() < 1e-6
    assert ((got.double() - exp).abs() / exp).max() < 0.1
