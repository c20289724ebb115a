"""The CUDA KL kernel's two ways with long rows on this GPU: held in registers (one 512-thread block per row, or a
cluster of blocks) against streamed twice, fwd+bwd, as effective % of the device copy.

    python -m benchmarks.cuda_paths
The launcher reads KL_EXT_CUDA_LONG_ROWS at each call; the default ("hold") is chosen from this comparison.
"""
from __future__ import annotations

import os

import torch

import kl_ext
from benchmarks.bench_kl_div_with_logits import make_inputs
from benchmarks.common import copy_bandwidth_gbps, time_ms


def main():
    dev = torch.device("cuda")
    copy = copy_bandwidth_gbps(dev)
    print(f"{torch.cuda.get_device_name()}; copy {copy:.0f} GB/s")
    for dtype in (torch.bfloat16, torch.float32):
        for V in (16384, 32000, 65536, 128256, 262144):
            N = (1 << 29) // V
            s, t = make_inputs(N, V, dtype, dev)
            x = s.detach().requires_grad_()
            line = f"{str(dtype)[6:]:<9}{N}x{V:<8}"
            for mode in ("hold", "stream"):
                os.environ["KL_EXT_CUDA_LONG_ROWS"] = mode

                def run():
                    kl_ext.kl_div_with_logits(x, t, backend="cuda").backward()
                    x.grad = None
                ms = time_ms(run, dev, reps=20)
                line += f"  {mode} {ms:7.3f} ms {100 * 3 * s.numel() * s.element_size() / (ms * 1e-3) / 1e9 / copy:5.1f}%"
            print(line, flush=True)
    os.environ.pop("KL_EXT_CUDA_LONG_ROWS")


if __name__ == "__main__":
    main()
