"""Teachers with exact zeros (probability 0, log-probability -inf; Bernoulli targets 0 and 1): every kernel backend
gives the float64 reference's answer, non-finite entries included (README "Semantics": a zero teacher entry adds 0
to the loss; a probability target's gradient there is the one-sided derivative, -inf for p log p, and 0 for a
log-probability target). The same kernel op is called on each backend: the C++ CPU kernels, the Triton kernels
(interpreter here, compiled on a GPU) and the CUDA kernels (emulator here, and the real ones where there is a GPU),
in fp32 / bf16 / fp16 and the mixed pairs, with targets that hold zeros exactly in their own dtype (16-bit
probabilities that underflowed)."""
import pytest
import torch

from kl_ext import reference
from kl_ext._backends import op
from kl_ext._registry import bind
from conftest import DIVERGENCES, TOL, assert_close_rel, divergence_params

GS = 0.5  # the reduction's scale the kernels fold into their gradients

# (input dtype, target dtype): one dtype, and the mixed pairs the kernels read in place.
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
         (torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]


BACKENDS = ["cpu", "triton", pytest.param("emu", marks=pytest.mark.emulated), "cuda"]


def _runner(backend, request):
    """name, args -> the kernel op of `backend` ('cpu', 'triton', 'emu' or 'cuda') on CPU tensors, results on the
    CPU. Triton runs on the GPU where there is one (else in its interpreter); 'cuda' skips without a GPU."""
    if backend == "emu":
        emu = request.getfixturevalue("emu")
        return lambda name, *args: getattr(emu, name)(*args)
    on_gpu = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    request.getfixturevalue("require_backend")(backend, "cuda" if on_gpu else "cpu")
    if not on_gpu:
        return lambda name, *args: op(backend, name)(*args)

    def run(name, *args):
        out = op(backend, name)(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
        return tuple(o.cpu() for o in out)
    return run


def _zero_probs(N, V, dtype, seed=0):
    """Rows of probabilities in `dtype` with exact zeros: peaked rows whose tails underflow in 16 bits, two entries
    set to 0 in every row, and a one-hot row."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 6, -1)
    p[:, 1] = 0
    p[:, V // 2] = 0
    p[-1] = 0
    p[-1, 3] = 1
    return p.to(dtype)


def _check(got, exp, xd, td, what):
    for g, e, name, d in zip(got, exp, ("loss", "grad input", "grad target"), (torch.float32, xd, td)):
        # Compared with the exact value rounded to the result's dtype: beyond its range (-q / p of a tiny p) that
        # is infinite; and a 16-bit gradient is at best the exact one rounded (as in test_cuda_emulated).
        e = e.to(d).double() if d != torch.float64 else e
        fin = torch.isfinite(e)
        floor = float((e[fin].to(d).double() - e[fin]).abs().max() / e[fin].abs().max().clamp(min=1e-30)) \
            if fin.any() else 0.0
        assert_close_rel(g, e, TOL[d][0 if name == "loss" else 1] + 2 * floor, f"{what}: {name}", atol=1e-6)


def _softmax_case(tt, xd, td, N=6, V=37):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(xd)
    p = _zero_probs(N, V, td)
    t = p if tt == "probs" else p.double().log().to(td)
    return x, t


def _reference_rows(fn, x, t, **kw):
    x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
    rows = fn(x64, t64, reduction="none", **kw)
    gx, gt = torch.autograd.grad(rows.sum() * GS, (x64, t64))
    return rows.detach(), gx, gt


def _gs(x):
    return torch.tensor(GS, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xd,td", PAIRS, ids=str)
@pytest.mark.parametrize("tt", ["probs", "log_probs"])
def test_divergences_with_zero_teacher_entries(backend, xd, td, tt, request):
    run = _runner(backend, request)
    x, t = _softmax_case(tt, xd, td)
    for i, name in enumerate(DIVERGENCES):  # each registered divergence on its op (the KL op where it is the KL)
        div = bind(name, **divergence_params(name))
        temperature = (1.0, 1.5)[i % 2]
        exp = _reference_rows(div.reference(), x, t, target_type=tt, temperature=temperature)
        op_name, options = div.op(temperature)
        got = run(op_name, x, t, None, tt, *options, True, True, _gs(x))
        _check(got, exp, xd, td, f"{name} {dict(div.params)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xd", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tt,tail", [("probs", "bucket"), ("log_probs", "bucket"), ("probs", "renorm")])
def test_sparse_teacher_with_zero_values(backend, xd, tt, tail, request):
    run = _runner(backend, request)
    N, V, k = 5, 41, 6
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(xd)
    idx = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    p = torch.rand(N, k, generator=g, dtype=torch.float64) * 0.15
    p[:, 2] = 0  # a slot of probability 0 in every row
    p[-1] = 0
    p[-1, 0] = 1  # a one-hot row: no tail
    values = (p if tt == "probs" else p.log()).float()
    x64, v64 = x.double().requires_grad_(), values.double().requires_grad_()
    rows = reference.sparse_kl_div_with_logits(x64, idx, v64, target_type=tt, tail=tail, reduction="none")
    exp = (rows.detach(), *torch.autograd.grad(rows.sum() * GS, (x64, v64)))
    got = run("sparse_kl_div_with_logits_fwd", x, idx, values, None, tt, tail, 1.0, True, True, _gs(x))
    _check(got, exp, xd, torch.float32, f"sparse {tt} {tail}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xd,td", PAIRS, ids=str)
def test_bernoulli_with_targets_zero_and_one(backend, xd, td, request):
    run = _runner(backend, request)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 24, generator=g, dtype=torch.float64) * 3).to(xd)
    p = torch.rand(4, 24, generator=g, dtype=torch.float64)
    p[:, ::5] = 0
    p[:, 1::7] = 1
    t = p.to(td)
    x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
    elems = reference.bernoulli_kl_div_with_logits(x64, t64, reduction="none")
    exp = (elems.sum(-1).detach(), *torch.autograd.grad(elems.sum() * GS, (x64, t64)))
    got = run("bernoulli_kl_div_with_logits_fwd", x, t, None, None, "probs", 1.0, True, False, True, True, _gs(x))
    _check(got, exp, xd, td, "Bernoulli KL")
