"""sparse_kl_div_with_logits: every kernel backend against a float64 definition of the sparse-teacher KL (both
tails, all target types, both gradients), the round trip k = V against the dense KL, the tail summed outside
the support, edge cases (V = 1, empty slots, -inf logits, empty batch, all masked), bad input, gradcheck,
opcheck, compile."""
import math

import pytest
import torch

import kl_ext
from kl_ext import reference
from conftest import TOL, assert_close_rel, assert_compiled_matches_eager, backend_params, triton_gpu_compile
from test_kl_div_with_logits import DTYPES, REDUCTIONS, TARGET_TYPES

TAILS = ["bucket", "renorm"]


def make_sparse(shape, k, target_type, dtype, seed=0, empty=True, masked=False, values_dtype=None):
    """Student logits (shape), and a teacher's top-k (indices, values) from its full log_softmax: "log_probs",
    their exp ("probs") or the teacher's logits of those classes ("logits"). The first row's last slot is
    empty (-1) when k > 1 and `empty`."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    lp, idx = torch.log_softmax(t, -1).topk(k, -1)
    vals = {"log_probs": lp, "probs": lp.exp(), "logits": t.gather(-1, idx)}[target_type]
    if empty and k > 1:
        idx.reshape(-1, k)[0, -1] = -1
    mask = torch.rand(shape[:-1], generator=gen) > 0.3 if masked else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return x, idx, vals.to(values_dtype or acc), mask


def definition(x, idx, v, target_type, tail, temperature):
    """Per-row loss in float64, row by row, straight from the contract."""
    out = []
    for xr, ir, vr in zip(x.double().reshape(-1, x.shape[-1]), idx.reshape(-1, idx.shape[-1]),
                          v.double().reshape(-1, v.shape[-1])):
        q = torch.softmax(xr / temperature, -1)
        keep = ir >= 0
        S, vals = ir[keep], vr[keep]
        if target_type == "logits" or tail == "renorm":
            w = vals / temperature if target_type == "logits" else (vals if target_type == "log_probs" else vals.log())
            p = torch.softmax(w, -1) if len(S) else w
            p_tail = 0.0
        else:
            p = vals.exp() if target_type == "log_probs" else vals
            p_tail = 0.0 if len(S) == xr.numel() else max(1 - float(p.sum()), 0.0)
        row = float(torch.xlogy(p, p / q[S]).sum())
        if p_tail > 0:
            outside = torch.ones_like(q, dtype=torch.bool)
            outside[S] = False
            row += p_tail * math.log(p_tail / float(q[outside].sum()))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape[:-1])


def run(x, idx, v, backend, **kw):
    """Loss and (input, values) grads under a random upstream gradient."""
    x = x.detach().clone().requires_grad_()
    v = v.detach().clone().requires_grad_()
    loss = kl_ext.sparse_kl_div_with_logits(x, idx, v, backend=backend, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gx, gv = torch.autograd.grad(loss, (x, v), g.to(loss.dtype))
    return loss.detach(), gx, gv


@pytest.mark.parametrize("target_type", TARGET_TYPES)
@pytest.mark.parametrize("tail", TAILS)
def test_reference_matches_the_definition(target_type, tail):
    for shape, k in (((5, 13), 4), ((3, 9), 9), ((2, 1), 1)):
        x, idx, v, _ = make_sparse(shape, k, target_type, torch.float64)
        got = reference.sparse_kl_div_with_logits(x, idx, v, target_type=target_type, tail=tail, temperature=1.3,
                                                  reduction="none")
        torch.testing.assert_close(got, definition(x, idx, v, target_type, tail, 1.3), rtol=1e-12, atol=1e-14)


# (3, 2100) spans several chunks: Triton's streamed path; k = V (64), k = 1 with V = 1, empty slots, masks.
CASES = [((4, 37), 7, False, 1.0), ((2, 3, 64), 64, True, 2.5), ((5, 1), 1, True, 0.7), ((3, 2100), 64, True, 1.3)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_type", TARGET_TYPES)
@pytest.mark.parametrize("tail", TAILS)
def test_backend_matches_reference(backend, dtype, target_type, tail, require_backend):
    require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32; float64 is the cpu/torch backends' job")
    loss_tol, grad_tol = TOL[dtype]
    for i, ((shape, k, masked, temperature), reduction) in enumerate(zip(CASES, REDUCTIONS)):
        x, idx, v, mask = make_sparse(shape, k, target_type, dtype, seed=i, masked=masked)
        kw = dict(target_type=target_type, tail=tail, reduction=reduction, mask=mask, temperature=temperature)
        loss, gx, gv = run(x, idx, v, backend, **kw)
        rloss, rgx, rgv = run(x.double(), idx, v.double(), "torch", **kw)
        what = f"{shape} k={k} {reduction} T={temperature} mask={masked}"
        assert loss.dtype == v.dtype and gx.dtype == dtype and gv.dtype == v.dtype
        assert_close_rel(loss, rloss, loss_tol, "loss " + what, atol=1e-6)
        floor = (rgx.to(dtype).double() - rgx).abs().max() / rgx.abs().max().clamp(min=1e-30)
        assert_close_rel(gx, rgx, grad_tol + 2 * float(floor), "grad input " + what, atol=1e-6)
        assert_close_rel(gv, rgv, loss_tol, "grad values " + what, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_full_support_equals_dense_kl(backend, require_backend):
    # k = V log-probs from topk_target, tail "bucket": the dense KL at the same temperature, to fp32 accuracy
    # (the cached log-probs round, so their p_tail is ~1e-7, and the support holds every class: no tail term).
    require_backend(backend)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 50, generator=gen) * 3, torch.randn(2, 3, 50, generator=gen) * 3
    idx, lp = kl_ext.topk_target(t, 50, temperature=2.0)
    assert idx.shape == (2, 3, 50) and lp.dtype == torch.float32
    loss, gx, _ = run(x, idx, lp, backend, temperature=2.0, reduction="none")
    x64 = x.double().requires_grad_()
    dense = kl_ext.kl_div_with_logits(x64, t.double(), temperature=2.0, reduction="none", backend="torch")
    rgx, = torch.autograd.grad(dense, x64, torch.randn(dense.shape, generator=torch.Generator().manual_seed(1),
                                                        dtype=torch.float64))
    assert_close_rel(loss, dense.detach(), 2e-5, "loss")
    assert_close_rel(gx, rgx, 2e-5, "grad input")


@pytest.mark.parametrize("backend", backend_params())
def test_tail_is_summed_outside_the_support(backend, require_backend):
    # The student holds all but ~1e-8 of its mass on the support: 1 - sum_S q would be pure rounding in fp32.
    # (The float32 "torch" reference is not this accurate: autograd's log_softmax backward cancels.)
    require_backend(backend)
    V, k = 1000, 10
    x = torch.zeros(2, V)
    x[:, :k] = 25.0
    idx = torch.arange(k).expand(2, k).contiguous()
    lp = torch.full((2, k), math.log((1 - 1e-3) / k))  # p_tail = 1e-3
    loss, gx, gv = run(x, idx, lp, backend, reduction="none")
    rloss, rgx, rgv = run(x.double(), idx, lp.double(), "torch", reduction="none")
    q_tail = (V - k) / (V - k + k * math.exp(25.0))
    assert q_tail < 1e-6
    q_s = math.exp(25.0) / (V - k + k * math.exp(25.0))
    p = math.exp(float(lp[0, 0]))  # as stored (float32)
    exact = k * p * math.log(p / q_s) + (1 - k * p) * math.log((1 - k * p) / q_tail)
    assert abs(rloss[0].item() - exact) <= 1e-9 * exact
    assert_close_rel(loss, rloss, 1e-5, "loss")
    assert_close_rel(gv, rgv, 1e-5, "grad values")
    # The support's gradients q - p ~ 1e-4 cancel: fp32 q (~1e-7 relative) leaves ~1e-4 of them.
    assert_close_rel(gx, rgx, 5e-4, "grad input")


@pytest.mark.parametrize("backend", backend_params())
def test_large_vocab(backend, require_backend):
    require_backend(backend)
    x, idx, v, _ = make_sparse((2, 70000), 64, "log_probs", torch.float32)
    for tail in TAILS:
        got = run(x, idx, v, backend, tail=tail)
        exp = run(x.double(), idx, v.double(), "torch", tail=tail)
        for a, b, what in zip(got, exp, ("loss", "grad input", "grad values")):
            assert_close_rel(a, b, 1e-4, f"{tail} {what}")


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_neg_inf_student_logits(backend, require_backend):
    # -inf outside the support: no mass, no gradient, finite loss. Inside it, where the teacher has mass: +inf.
    require_backend(backend)
    x, idx, v, _ = make_sparse((3, 40), 5, "log_probs", torch.float32, empty=False)
    x[0, :20] = torch.where(torch.isin(torch.arange(20), idx[0]), x[0, :20], torch.tensor(float("-inf")))
    x[1, idx[1, 0]] = float("-inf")
    loss, gx, _ = run(x, idx, v, backend, reduction="none")
    rloss, rgx, _ = run(x.double(), idx, v.double(), "torch", reduction="none")
    assert math.isfinite(loss[0]) and loss[1] == float("inf") and math.isfinite(loss[2])
    assert_close_rel(loss, rloss, 2e-5, "loss")
    assert_close_rel(gx[[0, 2]], rgx[[0, 2]], 2e-5, "grad input")


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_empty_batch_all_masked_and_empty_rows_give_zero(backend, require_backend):
    require_backend(backend)
    x = torch.randn(0, 7, requires_grad=True)
    assert kl_ext.sparse_kl_div_with_logits(x, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3),
                                            backend=backend).item() == 0
    x = torch.randn(3, 7, requires_grad=True)
    idx, v = torch.randint(0, 7, (3, 2)), torch.full((3, 2), -1.0)
    loss = kl_ext.sparse_kl_div_with_logits(x, idx, v, mask=torch.zeros(3, dtype=torch.bool), backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros(3, 7))
    # A row of empty slots has no teacher: 0 in both tails (bucket: all mass in the tail, as the student's).
    for tail in TAILS:
        out = kl_ext.sparse_kl_div_with_logits(x.detach(), torch.full((3, 2), -1), v, tail=tail, reduction="none",
                                               backend=backend)
        assert out.abs().max() <= 1e-6, tail


def test_bad_input():
    x, idx, v, _ = make_sparse((2, 3, 10), 4, "log_probs", torch.float32)
    f = kl_ext.sparse_kl_div_with_logits
    with pytest.raises(ValueError, match="int64 or int32"):
        f(x, idx.float(), v)
    with pytest.raises(ValueError, match="must equal target_values shape"):
        f(x, idx[..., :3], v)
    with pytest.raises(ValueError, match="leading shape"):
        f(x, idx[:1], v[:1])
    with pytest.raises(ValueError, match="tail must be one of"):
        f(x, idx, v, tail="ghost")
    f(x, idx.int(), v.to(torch.bfloat16), backend="torch")  # int32 indices, any float values dtype


@pytest.mark.parametrize("backend", ["torch"] + backend_params())
def test_validate_rejects_bad_indices(backend, require_backend):
    require_backend(backend)
    x, idx, v, _ = make_sparse((2, 10), 3, "log_probs", torch.float32)
    for bad, match in ((10, r"outside \[-1, 10\)"), (-2, r"outside \[-1, 10\)"), (int(idx[0, 1]), "twice")):
        i = idx.clone()
        i[0, 0] = bad
        with pytest.raises(ValueError, match=match):
            kl_ext.sparse_kl_div_with_logits(x, i, v, backend=backend, validate=True)


def test_out_of_range_index_without_validate(require_backend):
    # The CPU kernel raises; the Triton kernel skips the slot (never reads or writes outside the row).
    x, idx, v, _ = make_sparse((2, 10), 3, "log_probs", torch.float32)
    i = idx.clone()
    i[0, 0] = 10 ** 6
    require_backend("cpu")
    with pytest.raises(RuntimeError, match=r"outside \[-1, 10\)"):
        kl_ext.sparse_kl_div_with_logits(x, i, v, backend="cpu")
    require_backend("triton")
    got = kl_ext.sparse_kl_div_with_logits(x, i, v, backend="triton", reduction="none")
    empty = i.clone()
    empty[0, 0] = -1
    torch.testing.assert_close(got, kl_ext.sparse_kl_div_with_logits(x, empty, v, backend="cpu", reduction="none"))


@pytest.mark.parametrize("target_type", TARGET_TYPES)
@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck_cpu(target_type, tail, require_backend):
    require_backend("cpu")
    x, idx, v, _ = make_sparse((3, 7), 3, target_type, torch.float64, seed=3)
    mask = torch.tensor([True, False, True])
    x.requires_grad_()
    v.requires_grad_()
    for reduction in ("batchmean", "none"):
        def fn(a, b):
            return kl_ext.sparse_kl_div_with_logits(a, idx, b, target_type=target_type, tail=tail, mask=mask,
                                                    reduction=reduction, temperature=1.7, backend="cpu")
        assert torch.autograd.gradcheck(fn, (x, v))


def test_compile_fullgraph_cpu(require_backend):
    require_backend("cpu")
    x, idx, v, mask = make_sparse((4, 6, 33), 8, "log_probs", torch.float32, masked=True)
    assert_compiled_matches_eager(
        lambda a, b, i, m: kl_ext.sparse_kl_div_with_logits(a, i, b, temperature=2.0, mask=m, backend="cpu"),
        (x, v), (idx, mask))


def test_module_stores_settings_only():
    m = kl_ext.SparseKLDivWithLogitsLoss(tail="renorm", temperature=2.0, reduction="sum", backend="torch")
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    x, idx, v, _ = make_sparse((3, 8), 3, "log_probs", torch.float64)
    torch.testing.assert_close(m(x, idx, v), reference.sparse_kl_div_with_logits(
        x, idx, v, tail="renorm", temperature=2.0, reduction="sum"))
    assert "tail='renorm'" in repr(m)


def test_values_gradient_in_their_dtype(require_backend):
    require_backend("cpu")
    x, idx, v, _ = make_sparse((3, 30), 4, "log_probs", torch.float32, values_dtype=torch.bfloat16)
    v.requires_grad_()
    kl_ext.sparse_kl_div_with_logits(x, idx.int(), v, backend="cpu").backward()
    assert v.grad.dtype == torch.bfloat16


def test_triton_kernels_compile_for_gpu_without_spilling():
    kernels = triton_gpu_compile("sparse")
    assert {k["dtype"] for k in kernels} == {"bf16", "fp32"}
    for k in kernels:
        assert k["stack"] <= 128 and k["regs"] <= 128, k
