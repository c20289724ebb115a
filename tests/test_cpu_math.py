"""The CPU kernels' inline math (csrc/cpu_math.h, used where ATen would call Sleef per vector: the probability
teachers' log, the Bernoulli KL's target entropy, the JSD's log mixture) against float64, in fp32 ulps of the
correctly rounded result. Each was swept over every float of its range once (2026-11-24); here, samples of every
binade and every float where the method switches or cancels."""
import math

import pytest
import torch

ULP_UNIT = 3.0  # log1p_unit: a plain series in s, softplus's cheaper log1p (worst 2.88 over [0, 1])
torch_fn = {"log": torch.log, "log1p": torch.log1p, "log1p_unit": torch.log1p, "expm1_nonpos": torch.expm1}


def _ulp_error(fn, x):
    from kl_ext._fused import _native

    got = _native().cpu_math(x, fn).double()
    ref = torch_fn[fn](x.double())
    r32 = ref.float().abs()
    ulp = (torch.nextafter(r32, torch.tensor(math.inf)) - r32).double()
    return (got - ref).abs() / torch.where(r32 == 0, 2.0 ** -149, ulp)


def _floats(first, last, step=1, negative=False):
    bits = torch.arange(first, last, step, dtype=torch.int64)
    if negative:
        bits = bits - (1 << 31)  # the sign bit, as int32
    return bits.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("fn, floats, ulps", [
    ("log", (0x3F000000, 0x40000000), 1.0),  # [0.5, 2): every float, where k ln 2 and log m cancel or vanish
    ("log", (1, 0x00800000, 4099), 1.0),  # subnormals, scaled before the reduction
    ("log", (0x00800000, 0x7F800000, 4099), 1.0),  # every binade
    ("expm1_nonpos", (0x3F700000, 0x3F880000, 1, True), 1.4),  # every float in [-1.06, -0.94]: the switch at -1
    ("expm1_nonpos", (1, 0x7F800000, 4099, True), 1.4),
    ("log1p", (0x3E800000, 0x3F000000, 1, True), 1.0),  # every float in [-1/2, -1/4]: the switch at 1 - sqrt(1/2)
    ("log1p", (0x3B000000, 0x3D000000, 1, True), 1.0),  # every float in [-1/32, -1/512]: where 1 + y rounds
    ("log1p", (1, 0x3F800001, 4099, True), 1.0),  # (-1, 0) to -1 itself: the JSD's range
    ("log1p_unit", (0x3E800000, 0x3F800001), ULP_UNIT),  # every float in [1/4, 1]: the largest s
    ("log1p_unit", (0, 0x3F800001, 4099), ULP_UNIT),  # [0, 1]: softplus's exp(-|z|)
], ids=["log-around-1", "log-subnormal", "log-binades", "expm1-switch", "expm1-binades", "log1p-switch",
        "log1p-small", "log1p-binades", "log1p_unit-top", "log1p_unit-binades"])
def test_within_ulps(require_backend, fn, floats, ulps):
    require_backend("cpu")
    from kl_ext._fused import _native
    if fn == "expm1_nonpos" and _native().cpu_capability == "default":
        # The portable build has no FMA: its products round apart (worst 1.498 ulp over every float of
        # [-1.06, -0.94], 2026-12-05; the FMA builds 1.4).
        ulps = 1.5
    err = _ulp_error(fn, _floats(*floats))
    assert err.max().item() <= ulps, f"worst {err.max().item():.3f} ulp"


@pytest.mark.parametrize("fn, x", [
    ("log", [0.0, -0.0, math.inf, -math.inf, math.nan, -1.0, -1e-45, 1.0, 1e-45, 3.4e38]),
    ("log1p", [0.0, -0.0, -1.0, math.nan, 1e-30, -1e-30, math.inf]),
    ("expm1_nonpos", [0.0, -0.0, -math.inf, math.nan, -1e-30, -1.0, -100.0]),
    ("log1p_unit", [0.0, 1.0, 1e-45, 1e-30, 0.5]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: ATen's own functions
def test_special_values_as_torch(require_backend, fn, x, dtype):
    require_backend("cpu")
    from kl_ext._fused import _native

    x = torch.tensor(x * 3, dtype=dtype)  # a full vector and a short last one
    torch.testing.assert_close(_native().cpu_math(x, fn), torch_fn[fn](x), equal_nan=True,
                               rtol=3e-7 if dtype == torch.float32 else 1e-15, atol=0)
