"""kl_ext: fused KL-divergence losses for PyTorch (CPU C++, CUDA and Triton kernels).

Importing kl_ext needs no GPU: the native extension registers its ops on first use, Triton is imported
only when the triton backend is chosen.
"""
from kl_ext import _torch_range  # noqa: F401  (first: refuses a torch outside the supported range)
from kl_ext import _ops  # noqa: F401  (the ops' schemas and fakes, before any kernel registers)
from kl_ext._backends import available_backends
from kl_ext.functional import (BCEWithLogitsFunction, BernoulliKLDivWithLogitsFunction, KLDivWithLogitsFunction,
                               bernoulli_kl_div_with_logits, binary_cross_entropy_with_logits, kl_div_with_logits)
from kl_ext._divergence import DivergenceWithLogitsFunction
from kl_ext.jsd_with_logits import JSDWithLogitsLoss, jsd_with_logits
from kl_ext.skew_kl_div_with_logits import SkewKLDivWithLogitsLoss, skew_kl_div_with_logits
from kl_ext.tvd_with_logits import TVDWithLogitsLoss, tvd_with_logits
from kl_ext.sparse_kl_div_with_logits import (SparseKLDivWithLogitsFunction, SparseKLDivWithLogitsLoss,
                                              sparse_kl_div_with_logits, topk_target)
from kl_ext.linear_distillation_loss import (LinearDistillationFunction, LinearDistillationLoss,
                                             linear_distillation_loss)
from kl_ext.modules import BCEWithLogitsLoss, BernoulliKLDivWithLogitsLoss, KLDivWithLogitsLoss


def __getattr__(name):
    """A public name that was renamed keeps working, with a FutureWarning saying what replaces it."""
    from kl_ext._divergence import RENAMED
    if name in RENAMED:
        import warnings
        obj, instead = RENAMED[name]
        warnings.warn(f"kl_ext.{name} is renamed and will be removed in a future release; use {instead}",
                      FutureWarning, stacklevel=2)
        return obj
    raise AttributeError(f"module 'kl_ext' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["kl_div_with_logits", "KLDivWithLogitsLoss", "KLDivWithLogitsFunction",
           "jsd_with_logits", "JSDWithLogitsLoss", "tvd_with_logits", "TVDWithLogitsLoss",
           "skew_kl_div_with_logits", "SkewKLDivWithLogitsLoss", "DivergenceWithLogitsFunction",
           "sparse_kl_div_with_logits", "SparseKLDivWithLogitsLoss", "SparseKLDivWithLogitsFunction", "topk_target",
           "linear_distillation_loss", "LinearDistillationLoss", "LinearDistillationFunction",
           "bernoulli_kl_div_with_logits", "BernoulliKLDivWithLogitsLoss", "BernoulliKLDivWithLogitsFunction",
           "binary_cross_entropy_with_logits", "BCEWithLogitsLoss", "BCEWithLogitsFunction", "available_backends"]
