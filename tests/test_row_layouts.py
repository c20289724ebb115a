"""Rows read in place (csrc/common.h, RowLayout): every op takes inputs whose last dim has unit stride and whose
leading dims have any strides (the shifted logits of next-token training, expanded teachers, transposed batch
dims) without copying them, on every kernel backend: results and gradients equal to the contiguous call, and
no copy op runs. The CUDA kernels through the emulator (tests/cuda_emu) at the op level."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kl_ext
from kl_ext._fused import _rows
from conftest import backend_params


def _losses(kind):
    """(loss of (input, target), the target's form: a function of teacher logits, applied before any view is
    taken (an op on a strided tensor may round differently), whether the target takes a gradient)."""
    if kind == "kl":
        return lambda x, t, be: kl_ext.kl_div_with_logits(x, t, temperature=2.0, backend=be), None, True
    if kind == "reverse_kl":
        return (lambda x, t, be: kl_ext.kl_div_with_logits(x, t, target_type="log_probs", direction="reverse",
                                                           reduction="sum", backend=be),
                lambda t: t.log_softmax(-1), False)
    if kind == "jsd":
        return lambda x, t, be: kl_ext.jsd_with_logits(x, t, beta=0.3, reduction="none", backend=be).sum(), None, True
    if kind == "sparse":
        def sparse(x, t, be):
            idx = torch.arange(3).expand(*x.shape[:-1], 3)  # stride-0 indices: made contiguous (k per row)
            return kl_ext.sparse_kl_div_with_logits(x, idx, t[..., :3], backend=be)
        return sparse, lambda t: t.log_softmax(-1), False
    if kind == "bernoulli":
        return (lambda x, t, be: kl_ext.bernoulli_kl_div_with_logits(x, t, reduction="sum", backend=be),
                torch.sigmoid, True)
    return lambda x, t, be: kl_ext.binary_cross_entropy_with_logits(x, t, backend=be), torch.sigmoid, True


def _layouts(B, T, V, dtype, form=None):
    """(name, input, target) views with strided leading dims, each readable in place; form(teacher logits) is
    the target."""
    g = torch.Generator().manual_seed(0)
    form = form or (lambda t: t)

    def make(*shape, teacher=False):
        x = torch.randn(*shape, generator=g)
        return (form(x) if teacher else x).to(dtype)

    x, xt, xp = make(B, T + 1, V), make(T, B, V), make(B * T, V + 3)
    t, row, tp = make(B, T + 1, V, teacher=True), make(V, teacher=True), make(B * T, V + 3, teacher=True)
    return [
        ("shifted", x[:, :-1], t[:, 1:]),                     # logits[:, :-1]: batch stride (T + 1) V
        ("expanded teacher", x[:, 1:], row.expand(B, T, V)),  # stride 0 over both leading dims
        ("transposed", xt.transpose(0, 1), t[:, :-1]),        # (T, B, V) seen as (B, T, V)
        ("padded rows", xp[:, :V], tp[:, 3:]),                # 2-D, row stride V + 3 (unaligned rows)
    ]


KINDS = ["kl", "reverse_kl", "jsd", "sparse", "bernoulli", "bce"]


# Row addressing does not depend on the dtype: bfloat16 on the C++ kernels (their 16-bit staging paths), the
# interpreted Triton kernels (slow in CI) in float32.
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                           ("triton", torch.float32)], ids=str)
def test_strided_rows_equal_the_contiguous_call(require_backend, backend, kind, dtype):
    require_backend(backend)
    loss_of, form, target_grad = _losses(kind)
    for name, x, t in _layouts(2, 5, 37, dtype, form):
        assert _rows(x).data_ptr() == x.data_ptr() and _rows(t).data_ptr() == t.data_ptr(), name  # views
        runs = []
        for xs, ts in ((x, t), (x.contiguous(), t.contiguous())):
            xs = xs.detach().requires_grad_()
            ts = ts.detach().requires_grad_(target_grad)
            loss = loss_of(xs, ts, backend)
            loss.backward()
            assert xs.grad.shape == xs.shape
            runs.append((loss, xs.grad, ts.grad))
        for a, b, what in zip(runs[0], runs[1], ("loss", "grad input", "grad target")):
            # The same kernel reads the same values: equal bitwise.
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{kind} {name}: {what}"


class _Ops(TorchDispatchMode):
    """The aten / custom ops a call runs, and the copies among them of at least `least` elements."""

    def __init__(self, least):
        super().__init__()
        self.names, self.copies, self.least = [], [], least

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        if func.__name__.split(".")[0] in ("clone", "copy_", "_to_copy", "contiguous"):
            if isinstance(args[0], torch.Tensor) and args[0].numel() >= self.least:
                self.copies.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["kl", "jsd", "bce"])
@pytest.mark.parametrize("backend", backend_params())
def test_no_copy_of_strided_inputs(require_backend, backend, kind):
    require_backend(backend)
    loss_of, form, target_grad = _losses(kind)
    _, x, t = _layouts(2, 5, 37, torch.float32, form)[0]
    x = x.detach().requires_grad_()
    t = t.detach().requires_grad_(target_grad)
    # Copies of a row or more: the upstream gradient of reduction='none' (one value per row) may be made contiguous.
    with _Ops(least=x.shape[-1]) as ops:
        loss_of(x, t, backend).backward()
    assert any("fwd" in n for n in ops.names), ops.names  # the mode saw the op
    assert not ops.copies, ops.copies
    # The mode does see a copy: leading dims that do not fold into two are copied once.
    x4, t4 = (torch.randn(3, 4, 5, 37).transpose(0, 2) for _ in range(2))
    with _Ops(least=x.shape[-1]) as ops:
        loss_of(x4.requires_grad_(), form(t4) if form else t4, backend)
    assert ops.copies


def test_rows_view_folds_leading_dims():
    x = torch.randn(3, 4, 5, 6)
    assert _rows(x).shape == (60, 6)                              # contiguous: one view
    assert _rows(x[:, :, :-1]).shape == (12, 4, 6)               # (A, B, V): the last two leading dims fold
    assert _rows(x[:, 1:2]).shape == (3, 5, 6)                   # the batch dim steps over a gap
    assert _rows(x[:, :, 1:2]).shape == (12, 6)                  # a size-1 dim drops out
    y = x.transpose(0, 2)
    assert _rows(y).shape == (60, 6) and _rows(y).is_contiguous()  # three unfoldable dims: copied
    assert _rows(x[..., ::2]).is_contiguous()                    # strided classes: copied
    z = torch.randn(7).expand(2, 3, 7)
    r = _rows(z)
    assert r.shape == (6, 7) and r.stride() == (0, 1) and torch.equal(r, z.reshape(6, 7))
    assert _rows(torch.randn(0, 3, 5)[:, :2]).shape == (0, 5)


# (rows layout) cases at the op level for the emulated CUDA kernels: 16-byte packs where every row starts on a
# 16-byte boundary, 1-element loads where not; resident and streamed rows; 2-D and 3-D views.
EMU_CASES = [(2, 3, 64, 0), (2, 3, 64, 1), (2, 3, 37, 0), (2, 2, 9000, 0), (2, 2, 9000, 4)]


@pytest.mark.parametrize("B,T,V,skew", EMU_CASES)
@pytest.mark.parametrize("op_name", ["kl", "jsd", "sparse", "bernoulli"])
def test_emulated_cuda_kernels_read_strided_rows(emu, B, T, V, skew, op_name):  # noqa: F811
    g = torch.Generator().manual_seed(V + skew)
    base = torch.randn(B, T + 1, V + skew, generator=g)
    x = base[:, 1:, :V]       # 3-D (B, T, V), row strides (T + 1)(V + skew) and V + skew
    t = torch.randn(T, B, V, generator=g).transpose(0, 1)
    grad = (True, op_name != "sparse")
    if op_name == "kl":
        args = ("logits", 2.0, "forward", *grad, None)
        run = lambda ops, x, t: ops.kl_div_with_logits_fwd(x, t, None, *args)  # noqa: E731
    elif op_name == "jsd":
        args = ("logits", 1.0, "jsd", 0.4, *grad, None)
        run = lambda ops, x, t: ops.divergence_with_logits_fwd(x, t, None, *args)  # noqa: E731
    elif op_name == "sparse":
        idx = torch.arange(4).repeat(B * T, 1)
        vals = torch.randn(B * T, 4, generator=g).log_softmax(-1)
        run = lambda ops, x, t: ops.sparse_kl_div_with_logits_fwd(x, idx, vals, None, "log_probs", "bucket",  # noqa
                                                                  1.0, *grad, None)
    else:
        run = lambda ops, x, t: ops.bernoulli_kl_div_with_logits_fwd(x, t, None, None, "logits", 1.0,  # noqa
                                                                     True, False, *grad, None)
    got = run(emu, _rows(x), _rows(t))
    assert _rows(x).dim() == 3 and _rows(t).dim() == 3
    exp = run(torch.ops.kl_ext, x.reshape(-1, V).contiguous(), t.reshape(-1, V).contiguous())
    for a, b in zip(got, exp):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_and_compile_on_strided_mixed_rows(require_backend, backend):
    require_backend(backend)
    from kl_ext._backends import op
    from conftest import assert_compiled_matches_eager
    _, x, t = _layouts(2, 3, 37, torch.float32)[0]
    for name, extra in (("kl_div_with_logits_fwd", ("forward",)), ("divergence_with_logits_fwd", ("jsd", 0.4))):
        args = (_rows(x), _rows(t).to(torch.bfloat16), None, "logits", 1.0, *extra, True, True, None)
        torch.library.opcheck(op(backend, name), args)
    big = torch.randn(2, 4, 37)
    teacher = torch.randn(2, 4, 37, dtype=torch.bfloat16)

    def step(b, tt):  # the shifted next-token call, student float32, teacher bfloat16
        return kl_ext.kl_div_with_logits(b[:, :-1], tt[:, 1:], backend=backend) + \
            kl_ext.bernoulli_kl_div_with_logits(b[:, 1:], tt[:, :-1].sigmoid(), backend=backend)
    assert_compiled_matches_eager(step, [big], (teacher,))
