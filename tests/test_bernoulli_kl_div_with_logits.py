"""Sigmoid-Bernoulli KL and the BCE-with-logits drop-in (one kernel family)."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import kl_ext
from kl_ext import reference
from conftest import (HAS_THP, TOL, asks_for_huge_pages, assert_close_rel, assert_compiled_matches_eager,
                      backend_params, triton_gpu_compile)

REDUCTIONS = ["none", "sum", "mean", "batchmean"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_case(shape, target_type, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    if target_type == "probs":  # away from 0 and 1, where d/dp is infinite
        t = (0.02 + 0.96 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)
    else:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    return x, t


def grads(fn, x, t, seed=1):
    x = x.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = fn(x, t)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(loss.dtype)
    gx, gt = torch.autograd.grad(loss, (x, t), g)
    return loss.detach(), gx, gt


def test_reference_is_bce_minus_entropy():
    x, t = make_case((4, 5), "probs", torch.float64)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    entropy = -(t * t.log() + (1 - t) * (1 - t).log())
    torch.testing.assert_close(reference.bernoulli_kl_div_with_logits(x, t, reduction="none"), bce - entropy)
    # batchmean: summed over classes, averaged over samples
    torch.testing.assert_close(reference.bernoulli_kl_div_with_logits(x, t), (bce - entropy).sum() / 4)


def test_reference_closed_form():
    # KL(Bern(0.9) || Bern(0.5)) = 0.9 log(1.8) + 0.1 log(0.2)
    x = torch.zeros(1, 1, dtype=torch.float64)
    t = torch.full((1, 1), 0.9, dtype=torch.float64)
    expected = 0.9 * torch.log(torch.tensor(1.8, dtype=torch.float64)) + 0.1 * torch.log(torch.tensor(0.2, dtype=torch.float64))
    torch.testing.assert_close(reference.bernoulli_kl_div_with_logits(x, t, reduction="sum"), expected)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_type", ["probs", "logits"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backend_matches_reference(backend, dtype, target_type, reduction, require_backend):
    require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32")
    loss_tol, grad_tol = TOL[dtype]
    for shape, temperature, weight_shape in [((6, 5), 1.0, None), ((3, 4, 37), 2.0, (37,)), ((9, 1), 0.5, (9, 1)),
                                             ((2, 1100), 1.3, (2, 1100))]:
        x, t = make_case(shape, target_type, dtype, seed=len(shape))
        w = None if weight_shape is None else torch.rand(weight_shape, generator=torch.Generator().manual_seed(5))
        kw = dict(target_type=target_type, temperature=temperature, weight=w, reduction=reduction)
        loss, gx, gt = grads(lambda a, b: kl_ext.bernoulli_kl_div_with_logits(a, b, backend=backend, **kw), x, t)
        rloss, rgx, rgt = grads(lambda a, b: reference.bernoulli_kl_div_with_logits(a, b, **kw), x.double(), t.double())
        what = f"{shape} T={temperature} w={weight_shape}"
        assert_close_rel(loss, rloss, loss_tol, "loss " + what)
        assert_close_rel(gx, rgx, grad_tol, "grad input " + what)
        assert_close_rel(gt, rgt, grad_tol, "grad target " + what)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_zero_when_distributions_match(backend, require_backend):
    if backend != "torch":
        require_backend(backend)
    x, _ = make_case((4, 7), "logits", torch.float32)
    exact = kl_ext.bernoulli_kl_div_with_logits(x, x, target_type="logits", reduction="none", backend=backend)
    assert (exact == 0).all()
    probs = kl_ext.bernoulli_kl_div_with_logits(x, torch.sigmoid(x), reduction="none", backend=backend)
    assert probs.abs().max() < 1e-6
    # ...while BCE stays at the targets' entropy
    bce = kl_ext.binary_cross_entropy_with_logits(x, torch.sigmoid(x), backend=backend)
    assert bce > 0.1


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_same_input_gradient_as_bce(backend, require_backend):
    if backend != "torch":
        require_backend(backend)
    x, t = make_case((5, 6), "probs", torch.float32)
    _, gkl, _ = grads(lambda a, b: kl_ext.bernoulli_kl_div_with_logits(a, b, reduction="sum", backend=backend), x, t)
    _, gbce, _ = grads(lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction="sum"), x, t)
    torch.testing.assert_close(gkl, gbce)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_hard_targets_and_extreme_logits(backend, require_backend):
    if backend != "torch":
        require_backend(backend)
    x = torch.tensor([[-100.0, 100.0, 0.0, 30.0]])
    t = torch.tensor([[0.0, 1.0, 0.5, 1.0]])
    loss = kl_ext.bernoulli_kl_div_with_logits(x, t, reduction="none", backend=backend)
    assert torch.isfinite(loss).all() and loss.min() >= 0
    ref = reference.bernoulli_kl_div_with_logits(x.double(), t.double(), reduction="none")
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty(backend, reduction, require_backend):
    if backend != "torch":
        require_backend(backend)
    x, t = make_case((0, 5), "probs", torch.float32)
    loss, gx, _ = grads(lambda a, b: kl_ext.bernoulli_kl_div_with_logits(a, b, reduction=reduction, backend=backend),
                        x, t)
    assert loss.shape == ((0, 5) if reduction == "none" else ()) and not loss.isnan().any()
    assert gx.shape == x.shape


# ------------------------------------------------------------------------------------------ BCE drop-in


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weights", ["none", "weight", "pos_weight", "both"])
def test_bce_matches_torch(backend, dtype, reduction, weights, require_backend):
    require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32")
    gen = torch.Generator().manual_seed(7)
    x, t = make_case((4, 3, 29), "probs", dtype)
    w = torch.rand(3, 1, generator=gen).to(dtype) if weights in ("weight", "both") else None
    pw = (3 * torch.rand(29, generator=gen)).to(dtype) if weights in ("pos_weight", "both") else None
    loss, gx, gt = grads(lambda a, b: kl_ext.binary_cross_entropy_with_logits(
        a, b, weight=w, pos_weight=pw, reduction=reduction, backend=backend), x, t)
    wd = None if w is None else w.double()
    pwd = None if pw is None else pw.double()
    rloss, rgx, rgt = grads(lambda a, b: F.binary_cross_entropy_with_logits(
        a, b, weight=wd, pos_weight=pwd, reduction=reduction), x.double(), t.double())
    assert loss.dtype == dtype  # torch's BCE returns the input dtype
    tol = TOL[dtype][1] * (2 if dtype == torch.bfloat16 else 1)  # the loss itself is rounded to bf16 here
    assert_close_rel(loss, rloss, tol, "loss")
    assert_close_rel(gx, rgx, tol, "grad input")
    assert_close_rel(gt, rgt, tol, "grad target")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bce_takes_a_0d_input_as_torch_does(backend, require_backend):
    require_backend(backend)
    x, t = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    w, pw = torch.tensor(1.5, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    for reduction, kw in itertools.product(["none", "sum", "mean"], [{}, {"weight": w, "pos_weight": pw}]):
        got = grads(lambda a, b: kl_ext.binary_cross_entropy_with_logits(a, b, reduction=reduction, backend=backend,
                                                                         **kw), x, t)
        exp = grads(lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction=reduction, **kw), x, t)
        for a, e in zip(got, exp):
            assert a.shape == e.shape == ()
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_bce_module_is_drop_in():
    pw = torch.rand(6) * 2
    ours = kl_ext.BCEWithLogitsLoss(pos_weight=pw)
    theirs = torch.nn.BCEWithLogitsLoss(pos_weight=pw)
    x, t = make_case((8, 6), "probs", torch.float32)
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    assert set(dict(ours.named_buffers())) == {"pos_weight"}
    # What code that takes torch's module relies on: the type, its arguments in its order, its state dict.
    assert isinstance(ours, torch.nn.BCEWithLogitsLoss) and isinstance(ours, torch.nn.modules.loss._Loss)
    w = torch.rand(6)
    for args, kw in (((w, None, None, "sum", pw), {}), ((w,), dict(size_average=False)),
                     ((), dict(reduce=False)), ((w,), dict(size_average=True, reduce=True))):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            mine, ref = kl_ext.BCEWithLogitsLoss(*args, **kw), torch.nn.BCEWithLogitsLoss(*args, **kw)
        assert mine.reduction == ref.reduction and (not kw or seen), (args, kw)
        torch.testing.assert_close(mine(x, t), ref(x, t))
        # The functional warns as torch's does for the legacy arguments (caught here: a test prints no warnings).
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ours_f = kl_ext.binary_cross_entropy_with_logits(x, t, *args, **kw)
            n_ours = len(seen)
            theirs_f = F.binary_cross_entropy_with_logits(x, t, *args, **kw)
        assert n_ours == len(seen) - n_ours, (args, kw, [str(w.message) for w in seen])
        torch.testing.assert_close(ours_f, theirs_f)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    loaded = kl_ext.BCEWithLogitsLoss(pos_weight=torch.zeros(6))
    loaded.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(loaded(x, t), theirs(x, t))
    with pytest.raises(ValueError, match=r"Target size \(torch.Size\(\[8, 5\]\)\) must be the same as input size"):
        ours(x, t[:, :5])


# -------------------------------------------------------------------------------- autograd and tracing


@pytest.mark.parametrize("target_type", ["probs", "logits"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_cpu(target_type, reduction, require_backend):
    require_backend("cpu")
    x, t = make_case((3, 4), target_type, torch.float64, seed=2)
    w = torch.rand(4, dtype=torch.float64)
    x.requires_grad_()
    t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_ext.bernoulli_kl_div_with_logits(
        a, b, target_type=target_type, temperature=1.3, weight=w, reduction=reduction, backend="cpu"), (x, t))
    if target_type == "probs":
        pw = torch.rand(4, dtype=torch.float64) * 2
        assert torch.autograd.gradcheck(lambda a, b: kl_ext.binary_cross_entropy_with_logits(
            a, b, weight=w, pos_weight=pw, reduction="sum" if reduction == "batchmean" else reduction,
            backend="cpu"), (x, t))


def test_compile_fullgraph_cpu(require_backend):
    require_backend("cpu")
    x, t = make_case((4, 3, 17), "probs", torch.float32)
    w = torch.rand(17)

    def step(a, b):
        return (kl_ext.bernoulli_kl_div_with_logits(a, b, weight=w, backend="cpu")
                + kl_ext.binary_cross_entropy_with_logits(a, b, pos_weight=w, backend="cpu"))

    assert_compiled_matches_eager(step, (x,), (t,))


def test_module_stores_settings_only():
    w = torch.rand(5)
    m = kl_ext.BernoulliKLDivWithLogitsLoss(weight=w, temperature=2.0, backend="torch")
    assert list(m.parameters()) == []
    x, t = make_case((3, 5), "probs", torch.float32)
    torch.testing.assert_close(m(x, t), kl_ext.bernoulli_kl_div_with_logits(x, t, weight=w, temperature=2.0,
                                                                             backend="torch"))


def test_triton_kernels_compile_for_gpu_without_spilling():
    # Compiled Triton is stricter than the interpreter; tiles of 2048 elements per 8 warps do not spill on sm_90
    # (4096 per 8 warps spilled up to 152 bytes with 255 registers).
    kernels = triton_gpu_compile("bernoulli")
    assert len(kernels) == 12
    assert all(k["stack"] == 0 for k in kernels), kernels


@pytest.mark.skipif(not HAS_THP, reason="Linux with THP only")
def test_large_cpu_outputs_ask_for_huge_pages(require_backend):
    # The elementwise loss and the gradient are fresh memory the kernel fills: csrc/common.h's empty_output
    # advises huge pages before the first write. 8 MiB each holds an aligned 2 MiB range.
    require_backend("cpu")
    x = torch.randn(2048, 1024, requires_grad=True)
    loss = kl_ext.bernoulli_kl_div_with_logits(x, torch.rand(2048, 1024), reduction="none", backend="cpu")
    assert asks_for_huge_pages(loss)
    loss.sum().backward()
    assert asks_for_huge_pages(x.grad)
