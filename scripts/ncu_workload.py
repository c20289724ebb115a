"""A small workload for Nsight Compute (scripts/gpu_check.sh, stage ncu): one fwd+bwd of each CUDA kernel family
at a benchmark shape (bf16, 131072 x 4096 KL; Bernoulli KL and BCE), after a warm-up."""
import torch

import kl_ext

x = torch.randn(131072, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
t = torch.randn(131072, 4096, device="cuda", dtype=torch.bfloat16)
p = t.float().sigmoid().to(torch.bfloat16)
for _ in range(2):
    kl_ext.kl_div_with_logits(x, t, backend="cuda").backward()
    kl_ext.bernoulli_kl_div_with_logits(x, p, backend="cuda").backward()
    kl_ext.binary_cross_entropy_with_logits(x, p, backend="cuda").backward()
torch.cuda.synchronize()
