"""The CPU kernels' inline log (csrc/cpu_math.h log_poly: the probability teachers' log, the Bernoulli KL's
target entropy and gradient) against float64's, in fp32 ulps of the correctly rounded result."""
import math

import pytest
import torch


def _ulp_error(x):
    from kl_ext._fused import _native

    got = _native().log_poly(x).double()
    ref = torch.log(x.double())
    r32 = ref.float().abs()
    ulp = (torch.nextafter(r32, torch.tensor(math.inf)) - r32).double()
    return (got - ref).abs() / ulp


def _floats(first, last, step):
    return torch.arange(first, last, step, dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("bits", [
    (0x3F000000, 0x40000000, 1),  # [0.5, 2): every float, where k ln 2 and log m cancel or vanish
    (1, 0x00800000, 4099),  # subnormals, scaled before the reduction
    (0x00800000, 0x7F800000, 4099),  # every binade, a sample of each
], ids=["around-1", "subnormal", "all-binades"])
def test_log_within_one_ulp(require_backend, bits):
    require_backend("cpu")
    err = _ulp_error(_floats(*bits))
    assert err.max().item() <= 1.0, f"worst {err.max().item():.3f} ulp"


def test_log_special_values_as_torch(require_backend):
    require_backend("cpu")
    from kl_ext._fused import _native

    x = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -1.0, -1e-45, 1.0, 1e-45, 3.4e38] * 3)[:29]
    for dtype in (torch.float32, torch.float64):  # 29 values: full vectors and a short last one
        torch.testing.assert_close(_native().log_poly(x.to(dtype)), torch.log(x.to(dtype)), equal_nan=True,
                                   rtol=2e-7 if dtype == torch.float32 else 1e-15, atol=0)
