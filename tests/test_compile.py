"""torch.compile(fullgraph=True) against eager for every loss, every reduction, on every backend CI runs (cpu, and
triton in its interpreter), with an upstream gradient that is not 1 and inputs that arrive as graph inputs (mask,
teacher): the test that caught compiled gradients of zero on torch 2.11 (an in-place product returned twice by
AOTAutograd). Every case runs under the `aot_eager` compiler (Dynamo + AOTAutograd: where that bug lived, seconds per
case); one case per loss also through Inductor, whose code generation is where torch 2.11 dropped a view's offset."""
import pytest
import torch

import kl_ext
from kl_ext._registry import bind
from conftest import DIVERGENCES, backend_params, divergence_params

REDUCTIONS = ["batchmean", "mean", "sum", "none"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, t = r(3, 4, 33) * 2, r(3, 4, 33) * 2
    mask = torch.rand(3, 4, generator=g) > 0.3
    idx = torch.stack([torch.randperm(33, generator=g)[:5] for _ in range(12)]).reshape(3, 4, 5)
    idx[0, 0, 4] = -1  # an empty slot
    vals = torch.log_softmax(r(3, 4, 5), -1) - 0.5  # log-probs of a teacher with mass outside its top 5
    return x, t, mask, idx, vals


def _losses(backend):
    """name -> step(x, t, mask, reduction) -> loss: every registered divergence (the teacher's forms and
    temperatures in turn), then the other losses."""
    kw = dict(backend=backend)
    out = {}
    for i, name in enumerate(DIVERGENCES):
        fn = bind(name, **divergence_params(name)).functional()
        tt, temperature = ("logits", "probs", "log_probs")[i % 3], (2.0, 1.0, 1.5)[i % 3]
        teacher = {"logits": lambda t: t, "probs": lambda t: t.softmax(-1),
                   "log_probs": lambda t: t.log_softmax(-1)}[tt]
        out[name] = lambda x, t, m, r, fn=fn, tt=tt, T=temperature, teacher=teacher: fn(
            x, teacher(t), target_type=tt, temperature=T, mask=m, reduction=r, **kw)
    return {
        **out,
        "bernoulli": lambda x, t, m, r: kl_ext.bernoulli_kl_div_with_logits(x, t.sigmoid(), reduction=r, **kw),
        "bce": lambda x, t, m, r: kl_ext.binary_cross_entropy_with_logits(
            x, t.sigmoid(), pos_weight=torch.full((33,), 1.5, dtype=x.dtype), reduction=r, **kw),
    }


def _compare(step, grad_inputs, other, compiler, tol=dict(rtol=1e-9, atol=1e-12)):
    """Loss and gradients of torch.compile(step, fullgraph=True, backend=compiler) equal eager's, with a random
    upstream gradient (float64 cases here: the same kernels, so to float64 rounding)."""
    torch._dynamo.reset()
    runs = []
    for fn in (torch.compile(step, fullgraph=True, backend=compiler), step):
        xs = [x.detach().clone().requires_grad_() for x in grad_inputs]
        loss = fn(*xs, *other)
        go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7), dtype=loss.dtype).to(loss.device) + 2
        grads = torch.autograd.grad(loss, xs, go)
        runs.append((loss.detach(), *grads))
    for what, a, b in zip(("loss", *(f"grad {i}" for i in range(len(grad_inputs)))), *runs):
        assert b.abs().max() > 0 or what == "loss", f"{what}: eager gradient is zero, the case tests nothing"
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss,reduction", [(loss, r) for loss in (*DIVERGENCES, "bernoulli", "bce") for r in REDUCTIONS
                                            if not (loss == "bce" and r == "batchmean")])  # torch's BCE has none
def test_compiled_matches_eager(loss, reduction, backend, require_backend):
    require_backend(backend)
    x, t, mask, _, _ = _inputs()
    fn = _losses(backend)[loss]
    _compare(lambda a, b, m: fn(a, b, m, reduction), (x, t), (mask,), "aot_eager")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compiled_matches_eager_sparse(reduction, backend, require_backend):
    require_backend(backend)
    x, _, mask, idx, vals = _inputs()

    def step(a, v, i, m):
        return kl_ext.sparse_kl_div_with_logits(a, i, v, temperature=1.5, mask=m, reduction=reduction,
                                                backend=backend)
    _compare(step, (x, vals), (idx, mask), "aot_eager")


def _lm_inputs():
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w, b, th, tw = r(2, 5, 8), r(29, 8) * 0.5, r(29), r(2, 5, 6), r(29, 6) * 0.5
    labels = torch.randint(0, 29, (2, 5), generator=g)
    labels[1, 3] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 2] = False
    dense = r(2, 5, 29) * 2
    idx, lp = kl_ext.topk_target(dense, 4)
    return x, w, b, th, tw, labels, mask, dense, idx, lp


# 'mean' raises for this loss. The dense teacher with every registered divergence, the reductions in turn.
LM_CASES = [("hidden", "kl", r) for r in ("batchmean", "sum", "none")] + \
    [("sparse", "kl", r) for r in ("batchmean", "sum", "none")] + \
    [("dense", d, ("batchmean", "sum", "none")[i % 3]) for i, d in enumerate(DIVERGENCES)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("form,divergence,reduction", LM_CASES)
def test_compiled_matches_eager_linear_distillation(form, divergence, reduction, backend, require_backend):
    require_backend(backend)
    x, w, b, th, tw, labels, mask, dense, idx, lp = _lm_inputs()
    common = dict(labels=labels, hard_weight=0.5, mask=mask, reduction=reduction, chunk_size=4, backend=backend)
    if form == "hidden":
        def step(a, ww, bb, t, t_w):
            return kl_ext.linear_distillation_loss(a, ww, t, linear_bias=bb, target_linear_weight=t_w,
                                                   target_linear_bias=bb.detach(), temperature=2.0, softcap=3.0,
                                                   **common)
        other = (th, tw)
    elif form == "dense":
        def step(a, ww, bb, t):
            return kl_ext.linear_distillation_loss(a, ww, t, linear_bias=bb, divergence=divergence,
                                                   **divergence_params(divergence), logit_scale=0.7, **common)
        other = (dense,)
    else:
        def step(a, ww, bb, v, i):
            return kl_ext.linear_distillation_loss(a, ww, v, linear_bias=bb, target_indices=i,
                                                   target_type="log_probs", **common)
        other = (lp, idx)
    _compare(step, (x, w, b), other, "aot_eager")


@pytest.mark.parametrize("backend", backend_params())
def test_inductor_matches_eager(backend, require_backend):
    """Inductor (the default compiler) on every loss at once, 'mean' and 'batchmean', a shifted next-token view."""
    require_backend(backend)
    x, t, mask, idx, vals = _inputs()
    losses = _losses(backend)

    def step(a, b, v, m, i):
        total = kl_ext.sparse_kl_div_with_logits(a[:, 1:], i[:, :-1], v[:, :-1], mask=m[:, 1:], backend=backend)
        for name, fn in losses.items():
            total = total + fn(a[:, 1:], b[:, :-1], m[:, 1:], "mean" if name in ("bce", "tvd") else "batchmean")
        return total
    _compare(step, (x, t, vals), (mask, idx), "inductor")
    x, w, b, th, tw, labels, mask, _, _, _ = _lm_inputs()
    _compare(lambda a, ww: kl_ext.linear_distillation_loss(a, ww, th, target_linear_weight=tw, labels=labels,
                                                            hard_weight=0.5, chunk_size=4, backend=backend),
             (x, w), (), "inductor")
