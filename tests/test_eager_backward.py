"""The eager path of every loss (kl_ext/_fused.py apply): its forward without autograd.Function, its backward a
C++ node (csrc/fused_backward.cpp). Its gradients against the reference are checked by each op's tests; here,
what the node itself must do as the autograd.Function's backward did."""
import pytest
import torch

import kl_ext
from kl_ext._registry import bind
from conftest import DIVERGENCES, backend_params, divergence_params

B, V, K = 4, 11, 3


def _losses():
    """name -> (its autograd.Function's name, loss(x, t, reduction, backend) with t the op's differentiable target,
    make target). Every registered divergence (one Function for all of them), then the other ops."""
    idx = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(r))[:K] for r in range(B)])
    losses = {name: ("DivergenceWithLogitsFunction", lambda x, t, r, be, fn=bind(name, **divergence_params(name))
                     .functional(): fn(x, t, reduction=r, backend=be), lambda: torch.randn(B, V))
              for name in DIVERGENCES}
    return {
        **losses,
        "sparse_kl": ("SparseKLDivWithLogitsFunction",
            lambda x, t, r, be: kl_ext.sparse_kl_div_with_logits(x, idx, t, target_type="logits", reduction=r,
                                                                 backend=be),
            lambda: torch.randn(B, K)),
        "bernoulli_kl": ("BernoulliKLDivWithLogitsFunction",
            lambda x, t, r, be: kl_ext.bernoulli_kl_div_with_logits(x, t, target_type="logits", reduction=r,
                                                                    backend=be),
            lambda: torch.randn(B, V)),
        "bce": ("BCEWithLogitsFunction",
            lambda x, t, r, be: kl_ext.binary_cross_entropy_with_logits(x, t, reduction="mean" if r == "batchmean"
                                                                        else r, backend=be),
            lambda: torch.rand(B, V)),
    }


LOSSES = list(_losses())


def _case(name, seed=0):
    torch.manual_seed(seed)
    _, loss_of, make_t = _losses()[name]
    return loss_of, torch.randn(B, V, requires_grad=True), make_t().requires_grad_()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", backend_params())
def test_eager_backward_is_the_cpp_node(require_backend, backend, name):
    require_backend(backend)
    loss_of, x, t = _case(name)
    loss = loss_of(x, t, "batchmean", backend)
    assert loss.grad_fn.name() == _losses()[name][0] + "Backward"
    assert not isinstance(loss.grad_fn, torch.autograd.function.BackwardCFunction)  # not the Python Function


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", backend_params())
def test_retained_graph_gives_each_backward_its_own_scale(require_backend, backend, name, reduction):
    # The first backward scales the saved gradients in place; later ones recompute them from the inputs.
    require_backend(backend)
    loss_of, x, t = _case(name)
    loss = loss_of(x, t, reduction, backend)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1))
    first = torch.autograd.grad(loss, (x, t), g, retain_graph=True)
    second = torch.autograd.grad(loss, (x, t), -3 * g)
    for a, b in zip(first, second):
        torch.testing.assert_close(b, -3 * a)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        torch.autograd.grad(loss, (x, t), g)


@pytest.mark.parametrize("name", LOSSES)
def test_saved_gradients_go_through_saved_tensor_hooks(require_backend, name):
    # As ctx.save_for_backward would: e.g. activation offloading packs them.
    require_backend("cpu")
    loss_of, x, t = _case(name)
    packed, unpacked = [], []

    def pack(tensor):
        packed.append(tensor.shape)
        return tensor.clone()

    def unpack(tensor):
        unpacked.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = loss_of(x, t, "sum", "cpu")
    loss.backward()
    assert sorted(packed) == sorted([x.shape, t.shape]) and sorted(unpacked) == sorted(packed)
    expected = torch.autograd.grad(loss_of(x, t, "sum", "cpu"), (x, t))
    torch.testing.assert_close((x.grad, t.grad), expected)


@pytest.mark.parametrize("name", LOSSES)
def test_gradient_only_where_wanted(require_backend, name):
    require_backend("cpu")
    loss_of, x, t = _case(name)
    t.requires_grad_(False)
    loss_of(x, t, "batchmean", "cpu").backward()
    assert x.grad is not None and t.grad is None
    x.grad = None
    with torch.no_grad():
        assert loss_of(x, t, "batchmean", "cpu").grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [0, 1, 9, (1 << 16) + 1])  # the last one: past the loop, ATen's sum
@pytest.mark.parametrize("scaled", [False, True])
def test_reduced_loss_is_the_scaled_sum_of_the_rows(require_backend, dtype, rows, scaled):
    # The eager path reduces the per-row losses in C++ (csrc/fused_backward.cpp reduce_rows).
    require_backend("cpu")
    from kl_ext._fused import _native

    loss = torch.randn(rows, dtype=torch.float64).exp()
    scale = torch.tensor(1.0 / max(rows, 1), dtype=torch.float64) if scaled else None
    expected = loss.sum() * (scale if scaled else 1.0)
    out = _native().reduce_rows(loss.to(dtype), None if scale is None else scale.to(dtype))
    assert out.dtype == dtype and out.shape == ()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=0)


def test_call_overhead_benchmark_runs(require_backend, capsys):
    # benchmarks/bench_call_overhead.py backs BENCHMARKS.md's per-call table: it must keep running.
    require_backend("cpu")
    from benchmarks import bench_call_overhead

    bench_call_overhead.main(["--shapes", "2x3", "--rounds", "1", "--calls", "2"])
    out = capsys.readouterr().out
    for loss in ("KL", "Bernoulli KL", "BCE", "JSD"):
        assert f"2x3       {loss} " in out
