"""tvd_with_logits and skew_kl_div_with_logits (policies of divergence_with_logits_fwd): every kernel backend
against the float64 reference and the references against the definitions, ties (TVD's sign(0) = 0), skew alpha 0
and near 0 against the KL, awkward shapes (V = 1, odd V, V > 64k, empty, all masked), gradcheck, opcheck,
compile, the Modules; their CUDA kernels in the emulator, and on a GPU when there is one."""
import pytest
import torch
import torch.nn.functional as F

import kl_ext
from kl_ext import reference
from conftest import TOL, assert_close_rel, assert_compiled_matches_eager, backend_params
from test_jsd_with_logits import check_against_reference
from test_kl_div_with_logits import DTYPES, TARGET_TYPES, make_case
from test_kl_div_with_logits import run as run_kl

# name -> (functional, its options): the TVD and the skew KL in both directions at small and large alpha.
LOSSES = {
    "tvd": (kl_ext.tvd_with_logits, {}),
    "skew_forward_0.1": (kl_ext.skew_kl_div_with_logits, {"alpha": 0.1}),
    "skew_reverse_0.1": (kl_ext.skew_kl_div_with_logits, {"alpha": 0.1, "direction": "reverse"}),
    "skew_forward_0.7": (kl_ext.skew_kl_div_with_logits, {"alpha": 0.7}),
    "skew_reverse_0.01": (kl_ext.skew_kl_div_with_logits, {"alpha": 0.01, "direction": "reverse"}),
}


def run(name, x, t, backend, **kw):
    """Loss and (input, target) grads under a random upstream gradient."""
    fn, opts = LOSSES[name]
    x = x.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = fn(x, t, backend=backend, **opts, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gx, gt = torch.autograd.grad(loss, (x, t), g.to(loss.device, loss.dtype))
    return loss.detach(), gx, gt


def _teacher(t, target_type, temperature):
    t = t.double()
    return {"logits": lambda: F.softmax(t / temperature, -1), "log_probs": t.exp, "probs": lambda: t}[target_type]()


@pytest.mark.parametrize("target_type", TARGET_TYPES)
def test_references_match_the_definitions(target_type):
    x, t, _ = make_case((5, 13), target_type, torch.float64)
    q, p = F.softmax(x / 1.3, -1), _teacher(t, target_type, 1.3)
    kw = dict(target_type=target_type, temperature=1.3, reduction="none")
    torch.testing.assert_close(reference.tvd_with_logits(x, t, **kw), 0.5 * (p - q).abs().sum(-1))
    for alpha in (0.1, 0.6):
        m = alpha * p + (1 - alpha) * q
        torch.testing.assert_close(reference.skew_kl_div_with_logits(x, t, alpha=alpha, **kw),
                                   torch.xlogy(p, p / m).sum(-1), rtol=1e-12, atol=1e-14)
        m = alpha * q + (1 - alpha) * p
        torch.testing.assert_close(reference.skew_kl_div_with_logits(x, t, alpha=alpha, direction="reverse", **kw),
                                   torch.xlogy(q, q / m).sum(-1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_type", TARGET_TYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_backend_matches_reference(backend, dtype, target_type, name, require_backend):
    require_backend(backend)
    check_against_reference(lambda x, t, be, **kw: run(name, x, t, be, **kw), backend, dtype, target_type, name)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["tvd", "skew_forward_0.1", "skew_reverse_0.1"])
def test_large_vocab(backend, name, require_backend):
    require_backend(backend)
    x, t, _ = make_case((2, 70000), "logits", torch.float32)
    loss, gx, gt = run(name, x, t, backend)
    rloss, rgx, rgt = run(name, x.double(), t.double(), "torch")
    for got, exp, what in ((loss, rloss, "loss"), (gx, rgx, "grad input"), (gt, rgt, "grad target")):
        assert_close_rel(got, exp, 1e-4, what)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
@pytest.mark.parametrize("target_type", ["logits", "probs"])
def test_tvd_ties_have_zero_gradient(backend, target_type, require_backend):
    # sign(0) = 0 where p_v = q_v (as torch.sign): identical distributions give loss 0 and exactly zero gradients.
    # Exact ties: the same logits on both sides; uniform rows against exactly 1 / 16.
    require_backend(backend)
    x = torch.randn(3, 16, dtype=torch.float64) if target_type == "logits" else torch.zeros(3, 16,
                                                                                             dtype=torch.float64)
    t = x.clone() if target_type == "logits" else torch.full((3, 16), 1 / 16, dtype=torch.float64)
    loss, gx, gt = run("tvd", x, t, backend, target_type=target_type)
    assert loss.abs().max() <= 1e-15
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gt, torch.zeros_like(gt))


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_tvd_gradient_is_the_sign_of_the_difference(backend, require_backend):
    # d/dq of 1/2 sum |p - q| is sign(q - p) / 2 with sign(0) = 0: through the softmax, the input's gradient is
    # q (s - sum q s), s = sign(q - p) / 2 (ties: test_tvd_ties_have_zero_gradient).
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    p = torch.tensor([[0.05, 0.3, 0.2, 0.45]], dtype=torch.float64)
    s = torch.sign(q - p) / 2
    expected = q * (s - (q * s).sum(-1, keepdim=True))
    require_backend(backend)
    x = q.log().requires_grad_()
    kl_ext.tvd_with_logits(x, p, target_type="probs", reduction="sum", backend=backend).backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("target_type", TARGET_TYPES)
def test_skew_alpha_0_is_the_kl(backend, direction, target_type, require_backend):
    require_backend(backend)
    x, t, mask = make_case((4, 3, 29), target_type, torch.float32, masked=True)
    kw = dict(target_type=target_type, temperature=1.5, mask=mask)
    LOSSES["_skew0"] = (kl_ext.skew_kl_div_with_logits, {"alpha": 0.0, "direction": direction})
    try:
        got = run("_skew0", x, t, backend, **kw)
    finally:
        del LOSSES["_skew0"]
    for a, b, what in zip(got, run_kl(x, t, backend, direction=direction, **kw), ("loss", "grad input", "grad target")):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("alpha", [1e-6, 1e-3])
def test_skew_small_alpha_is_accurate(backend, direction, alpha, require_backend):
    # The mixture's log where the larger side's weight is tiny (csrc/divergences.h, log_mixture_exact): 1 +
    # c expm1(-|d|) would cancel to ~6e-8 / alpha relative error in fp32; the kernels hold fp32 accuracy.
    require_backend(backend)
    x, t, _ = make_case((6, 300), "logits", torch.float32)
    LOSSES["_skew"] = (kl_ext.skew_kl_div_with_logits, {"alpha": alpha, "direction": direction})
    try:
        got = run("_skew", x, t, backend, reduction="none")
        exp = run("_skew", x.double(), t.double(), "torch", reduction="none")
    finally:
        del LOSSES["_skew"]
    for a, b, what in zip(got, exp, ("loss", "grad input", "grad target")):
        assert_close_rel(a, b, 2e-5, what)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
@pytest.mark.parametrize("name", ["skew_forward_0.1", "skew_reverse_0.1"])
def test_skew_is_finite_where_the_kl_is_infinite(backend, name, require_backend):
    # A teacher with zeros, a student with underflowing entries: KL(q || p) is infinite; the skew KLs are bounded
    # by -log(alpha) (own / m <= 1 / alpha) with finite gradients to the input. Entries where p = q = 0 add nothing.
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g)
    x[:, 40:] = -1e4
    p = torch.softmax(torch.randn(4, 64, generator=g), -1)
    p[:, :20] = 0
    p[:, 50:] = 0
    p = p / p.sum(-1, keepdim=True)
    loss, gx, _ = run(name, x, p, backend, target_type="probs", reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all()
    assert (loss >= 0).all() and (loss <= -torch.log(torch.tensor(0.1)) + 1e-5).all()
    rloss, rgx, _ = run(name, x.double(), p.double(), "torch", target_type="probs", reduction="none")
    assert_close_rel(loss, rloss, 2e-5, "loss")
    assert_close_rel(gx, rgx, 2e-5, "grad input")


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
@pytest.mark.parametrize("name", ["tvd", "skew_forward_0.1"])
def test_empty_and_all_masked_give_zero(backend, name, require_backend):
    require_backend(backend)
    fn, opts = LOSSES[name]
    x = torch.randn(0, 7, requires_grad=True)
    assert fn(x, x.detach(), backend=backend, **opts).item() == 0
    x = torch.randn(3, 7, requires_grad=True)
    loss = fn(x, torch.randn(3, 7), mask=torch.zeros(3, dtype=torch.bool), backend=backend, **opts)
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros(3, 7))


@pytest.mark.parametrize("alpha", [-0.1, 1.0, float("nan"), "0.5", True])
def test_alpha_must_be_in_0_1(alpha):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\)"):
        kl_ext.skew_kl_div_with_logits(x, x, alpha=alpha)
    with pytest.raises(ValueError, match="direction"):
        kl_ext.skew_kl_div_with_logits(x, x, direction="backward")


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("target_type", TARGET_TYPES)
def test_gradcheck_cpu(name, target_type, require_backend):
    require_backend("cpu")
    fn, opts = LOSSES[name]
    x, t, _ = make_case((3, 7), target_type, torch.float64, seed=3)
    mask = torch.tensor([True, False, True])
    x.requires_grad_()
    t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, target_type=target_type, reduction="sum", mask=mask,
                                                    temperature=1.7, backend="cpu", **opts), (x, t))


@pytest.mark.parametrize("name", ["tvd", "skew_reverse_0.1"])
def test_compile_fullgraph_cpu(name, require_backend):
    require_backend("cpu")
    fn, opts = LOSSES[name]
    x, t, mask = make_case((4, 6, 33), "logits", torch.float32, masked=True)
    assert_compiled_matches_eager(lambda a, b, m: fn(a, b, temperature=2.0, mask=m, backend="cpu", **opts), (x, t),
                                  (mask,))


def test_modules_store_settings_only():
    x, t, _ = make_case((3, 8), "logits", torch.float64)
    m = kl_ext.TVDWithLogitsLoss(temperature=2.0, reduction="sum", backend="torch")
    torch.testing.assert_close(m(x, t), reference.tvd_with_logits(x, t, temperature=2.0, reduction="sum"))
    s = kl_ext.SkewKLDivWithLogitsLoss(alpha=0.3, direction="reverse", reduction="none", backend="torch")
    torch.testing.assert_close(s(x, t), reference.skew_kl_div_with_logits(x, t, alpha=0.3, direction="reverse",
                                                                          reduction="none"))
    for mod in (m, s):
        assert list(mod.parameters()) == [] and list(mod.buffers()) == []
    assert "alpha=0.3" in repr(s) and "direction='reverse'" in repr(s)


def test_tvd_is_bounded_by_1():
    x, t, _ = make_case((64, 5), "logits", torch.float64)
    loss = reference.tvd_with_logits(x * 10, t * 10, reduction="none")
    assert (loss >= 0).all() and (loss <= 1 + 1e-12).all()


@pytest.mark.parametrize("dtype,target_type", [(torch.float32, tt) for tt in TARGET_TYPES] +
                         [(torch.bfloat16, "probs")], ids=str)
@pytest.mark.parametrize("divergence,params", [("tvd", (0.0,)), ("skew_forward", (0.1, 0.01)),
                                               ("skew_reverse", (0.3, 1e-5))])
def test_cuda_kernels_emulated(emu, dtype, target_type, divergence, params):
    # csrc/cuda's DivergenceLoss with these terms on every launch path (tests/test_cuda_emulated.py's shapes).
    from test_cuda_emulated import check_divergence_kernels
    name = {"tvd": "tvd", "skew_forward": "skew_forward_0.1", "skew_reverse": "skew_reverse_0.1"}[divergence]
    fn, opts = LOSSES[name]

    def ref(x, t, param, **kw):
        return fn(x, t, backend="torch", **{**opts, **({"alpha": param} if param else {})}, **kw)
    check_divergence_kernels(emu, dtype, target_type, divergence, params, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_gpu_backends_match_reference(backend, name, require_backend):
    # Held rows (one block, a cluster) and streamed ones, bf16 and fp32, against the float64 reference.
    require_backend(backend, "cuda")
    for (N, V), dtype in (((64, 4096), torch.bfloat16), ((8, 65536), torch.bfloat16), ((16, 32000), torch.float32),
                          ((4, 300001), torch.float32)):
        x, t, _ = make_case((N, V), "logits", dtype)
        loss, gx, gt = run(name, x.cuda(), t.cuda(), backend, reduction="none")
        rloss, rgx, rgt = run(name, x.double(), t.double(), "torch", reduction="none")
        tol = TOL[dtype]
        assert_close_rel(loss.cpu(), rloss, tol[0], f"{name} {N}x{V} loss", atol=1e-6)
        for got, exp, what in ((gx, rgx, "grad input"), (gt, rgt, "grad target")):
            floor = (exp.to(dtype).double() - exp).abs().max() / exp.abs().max().clamp(min=1e-30)
            assert_close_rel(got.cpu(), exp, tol[1] + 2 * float(floor), f"{name} {N}x{V} {what}")
