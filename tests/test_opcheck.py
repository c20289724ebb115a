"""torch.library.opcheck over every op of kl_ext/_ops.SCHEMAS (schema, fake kernel, autograd registration,
dispatch on the C++ CPU kernels): each op its samples below, every registered divergence on
divergence_with_logits_fwd, the vocab-parallel statistics modes; the Triton twins' schemas (the interpreter is
slow; their full opcheck runs on a GPU, tests/test_gpu.py). A schema without samples fails the first test."""
import pytest
import torch

from kl_ext import _ops
from kl_ext._registry import bind
from conftest import DIVERGENCES, divergence_params
from test_distributed import _mode_args
from test_kl_div_with_logits import make_case
from test_sparse_kl_div_with_logits import make_sparse

TARGET_TYPES = ("logits", "log_probs", "probs")


def _softmax_rows():
    """(x, t, mask, target_type) over every target type; masked and unmasked."""
    for i, tt in enumerate(TARGET_TYPES):
        x, t, mask = make_case((4, 19), tt, torch.float32, seed=i, masked=True)
        yield x, t, mask, tt
        yield x, t, None, tt


def _kl():
    for x, t, mask, tt in _softmax_rows():
        for d in ("forward", "reverse"):
            yield (x, t, mask, tt, 1.5, d, True, tt == "logits", torch.tensor(0.25))
            yield (x, t, mask, tt, 1.0, d, False, False)
    for tt in ("logits", "probs"):
        yield from _mode_args("kl_div_with_logits_fwd", tt, 19)


def _divergence():
    rows = list(_softmax_rows())
    for i, name in enumerate(DIVERGENCES):  # the registered divergences that run this op (not the KL's)
        div = bind(name, **divergence_params(name))
        if div.kl is not None:
            continue
        x, t, mask, tt = rows[i % len(rows)]
        yield (x, t, mask, tt, 1.5, div.kernel, div.param, True, tt == "logits", torch.tensor(0.25))
        yield (x, t, None, tt, 1.0, div.kernel, div.param, False, False)
    for tt in ("logits", "probs"):
        yield from _mode_args("divergence_with_logits_fwd", tt, 19)


def _sparse():
    for tt in TARGET_TYPES:
        x, idx, v, mask = make_sparse((4, 19), 5, tt, torch.float32, masked=True)
        yield (x, idx, v, mask, tt, "bucket", 1.5, True, True, torch.tensor(0.25))
        yield (x, idx, v, None, tt, "renorm", 1.0, False, False)


def _bernoulli():
    x, t, _ = make_case((5, 9), "probs", torch.float32)
    w = torch.rand(9)
    yield (x, t, None, None, "probs", 1.0, True, True, True, True)
    yield (x, t, w, None, "logits", 2.0, True, False, True, False)
    yield (x, t, w, torch.rand(45), "probs", 1.0, False, False, False, True, torch.tensor(0.5))


def _scale(clone):
    g = torch.randn(5, 9)
    for scale in (torch.rand(1), torch.rand(5), torch.rand(45)):
        yield (g.clone() if clone else g, scale)


SAMPLES = {"kl_div_with_logits_fwd": _kl, "divergence_with_logits_fwd": _divergence,
           "sparse_kl_div_with_logits_fwd": _sparse, "bernoulli_kl_div_with_logits_fwd": _bernoulli,
           "scale_grad": lambda: _scale(False), "scale_grad_": lambda: _scale(True)}


def test_every_schema_has_samples():
    assert set(SAMPLES) == set(_ops.SCHEMAS)


@pytest.mark.parametrize("name", list(_ops.SCHEMAS))
def test_opcheck_cpu(name, require_backend):
    require_backend("cpu")
    samples = list(SAMPLES[name]())
    assert samples
    for args in samples:
        torch.library.opcheck(getattr(torch.ops.kl_ext, name).default, args)


@pytest.mark.parametrize("name", list(_ops.SCHEMAS))
def test_triton_schema(name, require_backend):
    require_backend("triton")
    for args in list(SAMPLES[name]())[:2]:
        torch.library.opcheck(getattr(torch.ops.kl_ext_triton, name).default, args, test_utils="test_schema")
