"""Launch configurations chosen from the shape and dtype (no autotuning: nothing runs at import)."""
import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def row_config(V: int, elem_size: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a one-program-per-row kernel streaming a row of V elements."""
    # 16 KiB of input per chunk and operand keeps the online pass register-resident; the interpreter runs
    # numpy per program, where smaller chunks are faster.
    cap = 1024 if interpreting() else (8192 if elem_size <= 2 else 4096)
    block = min(triton.next_power_of_2(max(V, 1)), cap)
    warps = 4 if block <= 2048 else (8 if block <= 4096 else 16)
    return block, warps


def tile_config(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for elementwise kernels over (rows, C) with per-row sums."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 1024)
    block_r = max(1, (256 if interpreting() else 4096) // block_c)
    return block_r, block_c, 4 if block_r * block_c <= 2048 else 8


def flat_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for flat elementwise kernels."""
    return (1024, 4) if interpreting() else (4096, 8)
