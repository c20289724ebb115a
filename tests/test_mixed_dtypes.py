"""Mixed precision: input and target in different dtypes (a 16-bit one with float32, either way round) are each read
in their own dtype by the kernels (no casting pass), math in fp32, gradients in each tensor's dtype; KL-family
losses float32. The BCE drop-in takes every pair torch takes and returns what torch returns."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import kl_ext
from kl_ext import reference
from kl_ext._fused import _target
from kl_ext._registry import bind
from conftest import DIVERGENCES, TOL, assert_close_rel, backend_params, divergence_params
from test_row_layouts import _Ops

MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
         (torch.float32, torch.float16)]


def _case(kind, xd, td, shape=(3, 5, 37)):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * 2).to(xd)
    t = torch.randn(*shape, generator=g)
    t = (t.sigmoid() if kind in ("bernoulli", "bce") else t * 2).to(td)
    return x, t


def _call(mod, kind, x, t, **kw):
    if kind in DIVERGENCES:
        div = bind(kind, **divergence_params(kind))
        return (div.functional() if mod is kl_ext else div.reference())(x, t, temperature=1.5, **kw)
    if kind == "bernoulli":
        return mod.bernoulli_kl_div_with_logits(x, t, **kw)
    return mod.binary_cross_entropy_with_logits(x, t, **kw)


def _worst(*dtypes):
    return max((TOL[d] for d in dtypes), key=lambda tol: tol[0])


# Every pair on the C++ kernels (each pair is its own instantiation); the Triton kernels upcast every load the same
# way, so the bfloat16 pairs there (the interpreter is slow in CI).
@pytest.mark.parametrize("backend,xd,td", [("cpu", *p) for p in MIXED] + [("triton", *p) for p in MIXED[:2]],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", [*DIVERGENCES, "bernoulli", "bce"])
def test_mixed_pairs_read_in_place(require_backend, backend, kind, xd, td):
    require_backend(backend)
    x, t = _case(kind, xd, td)
    x.requires_grad_()
    t.requires_grad_()
    with _Ops(least=x.shape[-1]) as ops:
        loss = _call(kl_ext, kind, x, t, backend=backend)
        loss.backward()
    assert not ops.copies, ops.copies  # neither tensor is cast
    assert x.grad.dtype == xd and t.grad.dtype == td
    expected_dtype = F.binary_cross_entropy_with_logits(x, t).dtype if kind == "bce" else torch.float32
    assert loss.dtype == expected_dtype
    x64, t64 = (v.detach().double().requires_grad_() for v in (x, t))
    ref = reference if kind != "bce" else None
    exp = _call(ref, kind, x64, t64) if ref else F.binary_cross_entropy_with_logits(x64, t64)
    gx, gt = torch.autograd.grad(exp, (x64, t64))
    rtol, gtol = _worst(xd, td)
    assert_close_rel(loss.detach(), exp, rtol, f"{kind} loss")
    assert_close_rel(x.grad, gx, gtol, f"{kind} grad input")
    assert_close_rel(t.grad, gt, gtol, f"{kind} grad target")


@pytest.mark.parametrize("xd,td", [(torch.bfloat16, torch.float16), (torch.float64, torch.float32),
                                   (torch.float32, torch.float64)], ids=str)
def test_other_pairs_are_refused_with_the_fix(xd, td):
    x, t = _case("kl", xd, td)
    for kind in DIVERGENCES:
        with pytest.raises(TypeError, match="pair bfloat16 / float16 with float32.*cast one of them"):
            _call(kl_ext, kind, x, t)


def test_only_pairs_outside_the_kernels_are_cast():
    # Every kernel backend reads the supported pairs in place; the BCE drop-in's other pairs are cast.
    x, t = torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3)
    assert _target(t, x) is t and _target(x, t) is x
    assert _target(t.double(), x).dtype == torch.bfloat16
    assert _target(t.half(), x).dtype == torch.bfloat16


BCE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _bce_factors(C):
    """weight / pos_weight broadcasts torch accepts: none, per class, per element, (rows, 1), 0-d."""
    g = torch.Generator().manual_seed(2)
    return [None, torch.rand(C, generator=g) + 0.5, torch.rand(4, C, generator=g) + 0.5,
            torch.rand(4, 1, generator=g) + 0.5, torch.tensor(1.7)]


@pytest.mark.parametrize("backend", backend_params())
def test_bce_drop_in_matches_torch_for_every_dtype_pair(require_backend, backend):
    require_backend(backend)
    for xd, td in itertools.product(BCE_DTYPES, BCE_DTYPES):
        for reduction in ("none", "mean", "sum"):
            _compare_bce(backend, xd, td, None, None, reduction, torch.float32)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("wd", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_bce_drop_in_matches_torch_for_every_weight_broadcast(require_backend, backend, wd):
    require_backend(backend)
    factors = _bce_factors(6)
    for (w, pw), reduction in itertools.product(itertools.product(factors, factors[:2] + factors[4:]),
                                                ("none", "mean", "sum")):
        _compare_bce(backend, torch.bfloat16, torch.float32, w, pw, reduction, wd)


def _compare_bce(backend, xd, td, w, pw, reduction, wd, shape=(4, 6)):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=g) * 3
    t0 = torch.rand(shape, generator=g)
    w, pw = (None if f is None else f.to(wd) for f in (w, pw))
    runs = []
    for fn in (lambda *a, **k: kl_ext.binary_cross_entropy_with_logits(*a, backend=backend, **k),
               F.binary_cross_entropy_with_logits):
        x = x0.to(xd).requires_grad_()
        t = t0.to(td).requires_grad_()
        out = fn(x, t, weight=w, pos_weight=pw, reduction=reduction)
        up = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
        out.backward(up)
        runs.append((out, x.grad, t.grad))
    what = f"{xd}/{td} w {None if w is None else tuple(w.shape)} pw {None if pw is None else tuple(pw.shape)} " \
           f"{reduction}"
    # Against torch computing in the pair's own precision: the least precise dtype involved sets the tolerance
    # (the Triton kernels compute float64 in float32).
    dtypes = [torch.float32 if backend == "triton" and d == torch.float64 else d for d in (xd, td, runs[1][0].dtype)]
    rtol, gtol = _worst(*dtypes)
    for mine, theirs, name, tol in zip(runs[0], runs[1], ("loss", "grad input", "grad target"), (rtol, gtol, gtol)):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (what, name, mine.dtype, theirs.dtype)
        assert_close_rel(mine.detach(), theirs.detach(), 4 * tol, f"{what}: {name}")


@pytest.mark.parametrize("backend", backend_params())
def test_bce_drop_in_takes_0d_input(require_backend, backend):
    require_backend(backend)
    for reduction in ("none", "mean", "sum"):
        _compare_bce(backend, torch.float32, torch.float32, None, None, reduction, torch.float32, shape=())
        _compare_bce(backend, torch.bfloat16, torch.float32, torch.tensor(0.7), torch.tensor(2.0), reduction,
                     torch.float32, shape=())
