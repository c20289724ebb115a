"""scale_grad: the backward op shared by every loss (grad * scale, scale per tensor, per row or per element)."""
import pytest
import torch

from conftest import backend_params, triton_gpu_compile


def _op(backend, name="scale_grad"):
    if backend == "triton":
        import kl_ext.triton_kernels  # noqa: F401
        return getattr(torch.ops.kl_ext_triton, name)
    return getattr(torch.ops.kl_ext, name)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("scale_numel", ["one", "rows", "elements"])
def test_scale_grad(backend, dtype, scale_numel, require_backend):
    require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32")
    g = torch.randn(5, 7).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    shape = {"one": (1,), "rows": (5,), "elements": (35,)}[scale_numel]
    s = torch.randn(shape, dtype=acc)
    expected = g.to(acc) * (s.reshape(5, 7) if scale_numel == "elements" else s.reshape(-1, 1))
    out = _op(backend)(g, s)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype))
    inplace = g.clone()
    _op(backend, "scale_grad_")(inplace, s)
    torch.testing.assert_close(inplace, expected.to(dtype))


def test_scale_of_another_size_is_refused(require_backend):
    require_backend("cpu")
    g = torch.randn(5, 9)
    with pytest.raises(RuntimeError, match="1, rows or rows\\*V"):
        torch.ops.kl_ext.scale_grad(g, torch.rand(3))


def test_triton_kernels_compile_for_gpu():
    kernels = triton_gpu_compile("scale")
    assert len(kernels) == 4 and all(k["stack"] == 0 for k in kernels), kernels
