"""kl_ext's Triton backend (installed as kl_ext.triton_kernels). Importing it registers
torch.ops.kl_ext_triton.{kl_div_with_logits_fwd, divergence_with_logits_fwd, sparse_kl_div_with_logits_fwd,
bernoulli_kl_div_with_logits_fwd, scale_grad(_)} with the schemas and fakes of kl_ext/_ops.py: custom ops, opaque to
torch.compile, which runs them as eager does (Inductor's own launch of a user Triton kernel passed its float
arguments wrongly: compiled losses of 0 on an H100, torch 2.11 / Triton 3.6)."""
from kl_ext.triton_kernels import (bernoulli_kl_div_with_logits, divergences, kl_div_with_logits,  # noqa: F401
                                   scale_grad, sparse_kl_div_with_logits)
