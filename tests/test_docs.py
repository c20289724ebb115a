"""The docstrings: every public function and Module explains its arguments and has an example, and every example
runs and prints what it says (doctest)."""
import doctest
import importlib

import pytest

import kl_ext

# The autograd Functions are the ops' plumbing (README "API"); everything else in kl_ext.__all__ is for users.
PUBLIC = [n for n in kl_ext.__all__ if not n.endswith("Function")]
# Every module a public name lives in, and the public modules that are not re-exported.
MODULES = sorted({getattr(kl_ext, n).__module__ for n in PUBLIC} | {"kl_ext.integrations.trl", "kl_ext.teacher_cache"})


@pytest.mark.parametrize("name", PUBLIC)
def test_public_api_has_an_example(name):
    doc = getattr(kl_ext, name).__doc__ or ""
    assert ">>> " in doc, f"kl_ext.{name} has no example in its docstring"


@pytest.mark.parametrize("name", ["kl_div_with_logits", "jsd_with_logits", "tvd_with_logits",
                                  "skew_kl_div_with_logits"])
def test_arguments_are_explained(name):
    # Each row loss states every argument itself (not "as kl_div_with_logits"), the temperature rule in one sentence.
    import inspect
    fn = getattr(kl_ext, name)
    doc = " ".join(fn.__doc__.split())
    for arg in inspect.signature(fn).parameters:
        assert f"{arg}:" in doc or f"{arg}, " in doc, (name, arg)
    assert "as kl_div_with_logits" not in doc and "{common_args}" not in doc
    assert ("The student's logits are always divided by T; the teacher's are divided by T only when "
            'target_type="logits"') in doc
    assert '"torch": the pure-PyTorch reference' in doc


@pytest.mark.parametrize("module", MODULES)
def test_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
