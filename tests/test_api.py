"""The public API as a contract: every name that shipped keeps working (a renamed one warns and does what it did),
and the divergence registry (kl_ext/_registry.py) reaches every entry point that takes a divergence by name."""
import warnings

import pytest
import torch

import kl_ext
import kl_ext.distributed
import kl_ext.integrations.trl
import kl_ext.teacher_cache
from kl_ext._registry import REGISTRY, bind
from conftest import DIVERGENCES, divergence_params

# Every public name each module has exported since 0.1.0 (git log of their __all__); a name leaves this list only
# through a release that says so.
SHIPPED = {
    kl_ext: ["BCEWithLogitsFunction", "BCEWithLogitsLoss", "BernoulliKLDivWithLogitsFunction",
             "BernoulliKLDivWithLogitsLoss", "DivergenceWithLogitsFunction", "JSDWithLogitsFunction",
             "JSDWithLogitsLoss", "KLDivWithLogitsFunction", "KLDivWithLogitsLoss", "LinearDistillationFunction",
             "LinearDistillationLoss", "SkewKLDivWithLogitsLoss", "SparseKLDivWithLogitsFunction",
             "SparseKLDivWithLogitsLoss", "TVDWithLogitsLoss", "available_backends", "bernoulli_kl_div_with_logits",
             "binary_cross_entropy_with_logits", "jsd_with_logits", "kl_div_with_logits", "linear_distillation_loss",
             "skew_kl_div_with_logits", "sparse_kl_div_with_logits", "topk_target", "tvd_with_logits"],
    kl_ext.distributed: ["VocabParallelLinearDistillationLoss", "vocab_parallel_jsd_with_logits",
                         "vocab_parallel_kl_div_with_logits", "vocab_parallel_linear_distillation_loss"],
    kl_ext.integrations.trl: ["FusedGeneralizedJSD", "generalized_jsd_loss", "patch"],
    kl_ext.teacher_cache: ["CachedTeacher", "collate", "from_sglang_input_top_logprobs", "from_vllm_prompt_logprobs",
                           "load_shard", "save_shard"],
}
RENAMED = {"JSDWithLogitsFunction"}


@pytest.mark.parametrize("module", SHIPPED, ids=lambda m: m.__name__)
def test_every_shipped_name_is_still_there(module):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the renamed names may warn
        for name in SHIPPED[module]:
            if name in RENAMED:
                continue
            assert getattr(module, name) is not None, name
            assert name in module.__all__, name


def test_renamed_function_warns_and_still_computes_its_loss():
    with pytest.warns(FutureWarning, match="JSDWithLogitsFunction is renamed.*DivergenceWithLogitsFunction"):
        fn = kl_ext.JSDWithLogitsFunction
    assert "JSDWithLogitsFunction" not in kl_ext.__all__
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64)
    got = fn.apply(x, t, None, 0.3, "logits", 1.5, "batchmean", "cpu", True, False)  # 0.1.0's arguments
    gx, = torch.autograd.grad(got, x)
    x2 = x.detach().requires_grad_()
    want = kl_ext.jsd_with_logits(x2, t, beta=0.3, temperature=1.5, backend="torch")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, torch.autograd.grad(want, x2)[0])
    with pytest.raises(AttributeError, match="no attribute 'JSDWithLogitsFunctio'"):
        kl_ext.JSDWithLogitsFunctio  # noqa: B018


def test_kl_function_keeps_its_arguments():
    # KLDivWithLogitsFunction is the KL of the one divergence Function, with 0.1.0's argument order.
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64)
    for direction in ("forward", "reverse"):
        got = kl_ext.KLDivWithLogitsFunction.apply(x, t, None, "logits", 2.0, direction, "sum", "cpu", True, False)
        want = kl_ext.kl_div_with_logits(x, t, temperature=2.0, direction=direction, reduction="sum",
                                         backend="torch")
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_a_divergence_is_the_same_loss_at_every_entry_point(name, require_backend):
    """Its row loss, the LM-head loss with an identity head, and the vocab-parallel loss in a group of one give the
    registry's reference; at its KL parameters it is the KL."""
    require_backend("cpu")
    params = divergence_params(name)
    g = torch.Generator().manual_seed(0)
    x, t = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    want = bind(name, **params).reference()(x, t, target_type="logits", temperature=1.3, reduction="batchmean",
                                            mask=None)
    row = bind(name, **params).functional()(x, t, temperature=1.3, backend="cpu")
    head = kl_ext.linear_distillation_loss(x, torch.eye(9, dtype=torch.float64), t, divergence=name, **params,
                                           temperature=1.3, backend="cpu")
    torch.testing.assert_close(row, want)
    torch.testing.assert_close(head, want)
    kl = REGISTRY[name].kl
    for p in params:
        for value in (0.0, 1.0):
            direction = kl({**params, p: value}) if value < 1 or p == "beta" else None
            if direction is None:
                continue
            at = kl_ext.linear_distillation_loss(x, torch.eye(9, dtype=torch.float64), t, divergence=name,
                                                 **{p: value}, backend="cpu")
            torch.testing.assert_close(at, kl_ext.kl_div_with_logits(x, t, direction=direction, backend="torch"))


def test_unknown_divergences_and_parameters_are_refused_everywhere():
    x, w, t = torch.randn(2, 4), torch.randn(5, 4), torch.randn(2, 5)
    names = "'kl', 'reverse_kl', 'jsd', 'tvd', 'skew_kl', 'skew_reverse_kl'"
    with pytest.raises(ValueError, match=f"divergence must be one of {names}"):
        kl_ext.linear_distillation_loss(x, w, t, divergence="kl_forward")
    with pytest.raises(ValueError, match="divergence must be one of"):
        kl_ext.distributed.vocab_parallel_divergence_with_logits(t, t, divergence="hellinger")
    for fn, kw in ((kl_ext.jsd_with_logits, dict(beta=1.5)), (kl_ext.skew_kl_div_with_logits, dict(alpha=1.0)),
                   (kl_ext.skew_kl_div_with_logits, dict(alpha=True))):
        with pytest.raises(ValueError, match="must be a number in"):
            fn(t, t, **kw)
