"""jsd_with_logits: every kernel backend against a float64 implementation of the generalized JSD, the KL at
beta 0 and 1, edge cases (underflow, V = 1, empty, all masked), gradcheck, opcheck, compile."""
import math

import pytest
import torch
import torch.nn.functional as F

import kl_ext
from kl_ext import reference
from conftest import TOL, assert_close_rel, assert_compiled_matches_eager, backend_params, triton_gpu_compile
from test_kl_div_with_logits import DTYPES, REDUCTIONS, TARGET_TYPES, make_case
from test_kl_div_with_logits import run as run_kl

BETAS = [0.1, 0.5, 0.9]


def jsd_formula(x, t, beta, target_type="logits", temperature=1.0):
    """Per-row generalized JSD in float64, straight from the definition (m = beta p + (1 - beta) q)."""
    q = F.softmax(x.double() / temperature, -1)
    t = t.double()
    p = {"logits": lambda: F.softmax(t / temperature, -1), "log_probs": t.exp, "probs": lambda: t}[target_type]()
    m = beta * p + (1 - beta) * q
    return beta * torch.xlogy(p, p / m).sum(-1) + (1 - beta) * torch.xlogy(q, q / m).sum(-1)


def run(x, t, backend, **kw):
    """Loss and (input, target) grads under a random upstream gradient."""
    x = x.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = kl_ext.jsd_with_logits(x, t, backend=backend, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gx, gt = torch.autograd.grad(loss, (x, t), g.to(loss.dtype))
    return loss.detach(), gx, gt


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("target_type", TARGET_TYPES)
def test_reference_matches_the_definition(beta, target_type):
    x, t, _ = make_case((5, 13), target_type, torch.float64)
    got = reference.jsd_with_logits(x, t, beta=beta, target_type=target_type, temperature=1.3, reduction="none")
    torch.testing.assert_close(got, jsd_formula(x, t, beta, target_type, 1.3), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
@pytest.mark.parametrize("target_type", TARGET_TYPES)
def test_beta_0_and_1_are_the_two_kl_directions(backend, target_type, require_backend):
    require_backend(backend)
    x, t, mask = make_case((4, 3, 29), target_type, torch.float32, masked=True)
    for beta, direction in ((0, "forward"), (1.0, "reverse")):
        kw = dict(target_type=target_type, temperature=1.5, mask=mask)
        a = run(x, t, backend, beta=beta, **kw)
        b = run_kl(x, t, backend, direction=direction, **kw)
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def check_against_reference(run, backend, dtype, target_type, what=""):
    """run(x, t, backend, **options) -> (loss, grad input, grad target) of a two-row loss on `backend` against the
    float64 reference: V = 1, odd V, a 3-D batch, and (3, 2100), several blocks (the Triton kernels' streaming
    path), each shape with another reduction, masks and temperatures. Shared by the divergences' tests."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32; float64 is the cpu/torch backends' job")
    loss_tol, grad_tol = TOL[dtype]
    cases = [((4, 37), False, 1.0), ((2, 3, 50), True, 2.5), ((5, 1), True, 0.7), ((3, 2100), True, 1.3)]
    for (shape, masked, temperature), reduction in zip(cases, REDUCTIONS):
        x, t, mask = make_case(shape, target_type, dtype, seed=len(shape), masked=masked)
        kw = dict(target_type=target_type, reduction=reduction, mask=mask, temperature=temperature)
        loss, gx, gt = run(x, t, backend, **kw)
        rloss, rgx, rgt = run(x.double(), t.double(), "torch", **kw)
        case = f"{what} {shape} {reduction} T={temperature} mask={masked}"
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert gx.dtype == dtype and gt.dtype == dtype
        # fp32 log m carries ~1e-7 absolute error: losses near 0 (V = 1) are compared absolutely.
        assert_close_rel(loss, rloss, loss_tol, "loss " + case, atol=1e-6)
        for got, exp, name in ((gx, rgx, "grad input "), (gt, rgt, "grad target ")):
            floor = (exp.to(dtype).double() - exp).abs().max() / exp.abs().max().clamp(min=1e-30)
            assert_close_rel(got, exp, grad_tol + 2 * float(floor), name + case, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_type", TARGET_TYPES)
@pytest.mark.parametrize("beta", BETAS)
def test_backend_matches_reference(backend, dtype, target_type, beta, require_backend):
    require_backend(backend)
    check_against_reference(lambda x, t, be, **kw: run(x, t, be, beta=beta, **kw), backend, dtype, target_type)


@pytest.mark.parametrize("backend", backend_params())
def test_large_vocab(backend, require_backend):
    require_backend(backend)
    x, t, _ = make_case((2, 70000), "logits", torch.float32)
    loss, gx, gt = run(x, t, backend, beta=0.5)
    rloss, rgx, rgt = run(x.double(), t.double(), "torch", beta=0.5)
    for got, exp, what in ((loss, rloss, "loss"), (gx, rgx, "grad input"), (gt, rgt, "grad target")):
        assert_close_rel(got, exp, 1e-4, what)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_underflow_in_both_rows_is_finite(backend, require_backend):
    # Logits around -1e4 in both rows: most entries have p = q = 0 in every precision; Liger's JSD returns NaN.
    require_backend(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, generator=gen, dtype=torch.float64) - 1e4
    t = torch.randn(4, 300, generator=gen, dtype=torch.float64) - 1e4
    x[:, :5] += 1e4
    t[:, 3:9] += 1e4
    loss, gx, gt = run(x.float(), t.float(), backend, beta=0.5)
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gt).all()
    rloss, rgx, rgt = run(x.float().double(), t.float().double(), "torch", beta=0.5)
    assert_close_rel(loss, rloss, 1e-5, "loss")
    assert_close_rel(gx, rgx, 1e-5, "grad input")
    assert_close_rel(gt, rgt, 1e-5, "grad target")


@pytest.mark.parametrize("backend", backend_params())
def test_identical_rows(backend, require_backend):
    require_backend(backend)
    x, _, _ = make_case((3, 1000), "logits", torch.float32)
    for beta in BETAS:
        assert kl_ext.jsd_with_logits(x, x, beta=beta, reduction="none", backend=backend).abs().max() <= 1e-6
    if backend == "cpu":
        x64 = x.double()
        zero = torch.zeros(3, dtype=torch.float64)
        assert torch.equal(kl_ext.jsd_with_logits(x64, x64, reduction="none", backend="cpu"), zero)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_empty_and_all_masked_give_zero(backend, require_backend):
    require_backend(backend)
    x = torch.randn(0, 7, requires_grad=True)
    assert kl_ext.jsd_with_logits(x, x.detach(), backend=backend).item() == 0
    x = torch.randn(3, 7, requires_grad=True)
    loss = kl_ext.jsd_with_logits(x, torch.randn(3, 7), mask=torch.zeros(3, dtype=torch.bool), backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros(3, 7))


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), "0.5", True, torch.tensor(0.5)])
def test_beta_must_be_a_number_in_0_1(beta):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="beta must be a number in"):
        kl_ext.jsd_with_logits(x, x, beta=beta)


@pytest.mark.parametrize("target_type", TARGET_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_cpu(target_type, reduction, require_backend):
    require_backend("cpu")
    x, t, _ = make_case((3, 7), target_type, torch.float64, seed=3)
    mask = torch.tensor([True, False, True])
    x.requires_grad_()
    t.requires_grad_()

    def fn(a, b):
        return kl_ext.jsd_with_logits(a, b, beta=0.3, target_type=target_type, reduction=reduction, mask=mask,
                                      temperature=1.7, backend="cpu")
    assert torch.autograd.gradcheck(fn, (x, t))


def test_compile_fullgraph_cpu(require_backend):
    require_backend("cpu")
    x, t, mask = make_case((4, 6, 33), "logits", torch.float32, masked=True)
    assert_compiled_matches_eager(
        lambda a, b, m: kl_ext.jsd_with_logits(a, b, beta=0.4, temperature=2.0, mask=m, backend="cpu"), (x, t),
        (mask,))


def test_module_stores_settings_only():
    m = kl_ext.JSDWithLogitsLoss(beta=0.25, temperature=2.0, reduction="sum", backend="torch")
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    x, t, _ = make_case((3, 8), "logits", torch.float64)
    torch.testing.assert_close(m(x, t), reference.jsd_with_logits(x, t, beta=0.25, temperature=2.0, reduction="sum"))
    assert "beta=0.25" in repr(m)


def test_symmetric_jsd_is_bounded_by_log_2():
    x, t, _ = make_case((64, 5), "logits", torch.float64)
    loss = reference.jsd_with_logits(x * 10, t * 10, reduction="none")
    assert (loss >= 0).all() and (loss <= math.log(2) + 1e-12).all()


def test_triton_kernels_compile_for_gpu_without_spilling():
    # Every divergence's terms over the one kernel (the TVD and skew KL too).
    kernels = triton_gpu_compile("divergence")
    assert {k["divergence"] for k in kernels} == {0, 1, 2, 3}
    assert {(k["one_chunk"], k["dtype"]) for k in kernels} == {(True, "bf16"), (False, "bf16"), (True, "fp32"),
                                                                 (False, "fp32")}
    for k in kernels:
        assert k["stack"] <= 128 and k["regs"] <= 128, k
