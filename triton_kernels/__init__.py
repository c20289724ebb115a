"""kl_ext's Triton backend (installed as kl_ext.triton_kernels). Importing it registers
torch.ops.kl_ext_triton.{kl_div_with_logits_fwd, jsd_with_logits_fwd, sparse_kl_div_with_logits_fwd,
bernoulli_kl_div_with_logits_fwd, scale_grad}."""
from kl_ext.triton_kernels import (bernoulli_kl_div_with_logits, jsd_with_logits, kl_div_with_logits,  # noqa: F401
                                   scale_grad, sparse_kl_div_with_logits)
