"""Launch configurations chosen from the shape and dtype (no autotuning: nothing runs at import)."""
import inspect
import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_numpy_fix():
    """Triton 3.6's interpreter (torch 2.11's) takes int() of a one-element 1-D array where a kernel uses a
    runtime tensor as a range() bound, which numpy 2.4 refuses; Triton 3.7 squeezes the array first. The same
    squeeze for older Tritons, so the interpreter (CI's way of running these kernels) works with any numpy."""
    from triton.runtime import interpreter
    patch = interpreter._patch_lang_tensor
    if "squeeze" in inspect.getsource(patch):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    interpreter._patch_lang_tensor = patched


if interpreting():
    _interpreter_numpy_fix()


def rows_of(t) -> int:
    """Rows of a (rows, V) or (A, B, V) row tensor (csrc/common.h, RowLayout)."""
    return t.shape[0] * (t.shape[1] if t.dim() == 3 else 1)


def row_layout(t) -> tuple[int, int, int]:
    """(inner, s0, s1) of a row tensor: row r starts at (r // inner) * s0 + (r % inner) * s1 (csrc/common.h)."""
    if t.dim() == 2:
        return 1, t.stride(0), 0
    return max(t.shape[1], 1), t.stride(0), t.stride(1)


def row_config(V: int, elem_size: int, one_block_max: int = 16384) -> tuple[int, int, bool]:
    """(BLOCK, num_warps, ONE_CHUNK) for the one-program-per-row KL kernel.

    Rows up to 16384 are held in registers in one block (ONE_CHUNK: one read): warps grow with the block
    so that ptxas (sm_90, Triton 3.8, checked by tests/triton_gpu_compile.py) needs <= 128 registers without
    spilling (16-bit rows at 16384 spill up to 72 bytes). 32768 would spill ~1 KB per thread: longer rows stream
    in chunks of 16 KiB per operand. Kernels that keep more per element (the JSD: 144 - 464 bytes of spills at
    16384) pass a smaller one_block_max. The interpreter runs numpy per program, where small chunks are faster.
    """
    if interpreting():
        block = min(triton.next_power_of_2(max(V, 1)), 1024)
        return block, 4, V <= block
    block = triton.next_power_of_2(max(V, 1))
    if block <= one_block_max:
        return block, min(max(block // 512, 4), 32), True
    block = 8192 if elem_size <= 2 else 4096
    return block, block // 512, False


def tile_config(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for elementwise kernels over (rows, C) with per-row sums."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 1024)
    block_r = max(1, (256 if interpreting() else 2048) // block_c)
    return block_r, block_c, max(1, min(8, block_r * block_c // 256))


def flat_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for flat elementwise kernels."""
    return (1024, 4) if interpreting() else (4096, 8)
