"""The fused forward / backward every kernel-backed loss shares.

Training-step design: when a gradient is wanted, the forward op computes it together with the loss (the
inputs are read once), already divided by the reduction's denominator (a device tensor: no host sync).
Backward only multiplies it by grad_output, in place (scale_grad_), which moves no bytes when grad_output
is 1 (loss.backward() on a reduced loss). A second backward through a retained graph recomputes the
gradients from the saved inputs. Under torch.compile the out-of-place scale_grad keeps the graph functional.
The backward is once_differentiable: use backend="torch" (the reference) for double backward.
Each loss is an autograd.Function (what torch.compile traces); in eager mode apply() runs its forward directly
and the backward is a C++ node (csrc/fused_backward.cpp) doing what _fused_backward does, without Python.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from kl_ext._backends import native_loaded, op
from kl_ext._validation import acc_dtype, dtype_pair_supported


DOUBLE_BACKWARD = ("kl_ext: a backward with create_graph=True (double backward, e.g. a gradient penalty) needs "
                   "second derivatives, which the kernel backends do not give; compute this loss with "
                   "backend='torch' (the differentiable reference) for it")


def kernel_backward(backward):
    """@once_differentiable, and an error at once when the backward runs with create_graph=True (rather than a
    gradient that silently cannot be differentiated again, or an error only at the second backward)."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(DOUBLE_BACKWARD)
        return inner(ctx, *grads)
    return checked


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> the kernels' rows, read in place (csrc/common.h, RowLayout): a (rows, V) or (A, B, V) view with
    unit stride over V and the leading dims' own strides, so shifted slices (logits[:, :-1]), expanded teachers
    and transposed batch dims are not copied. Copied only when the leading dims do not fold into two, or V is
    strided. Works for V == 0 and empty leading dims."""
    V = x.shape[-1]
    if x.dim() == 2 and (x.stride(1) == 1 or V <= 1):
        return x  # no view op: per-call overhead shows on small losses
    rows = math.prod(x.shape[:-1])
    if x.is_contiguous():
        return x.view(rows, V)
    dims = []  # (size, stride) of the leading dims, outer first; an outer dim that steps over the inner folds in
    for n, s in zip(x.shape[:-1], x.stride()[:-1]):
        if n == 1:
            continue
        if dims and dims[-1][1] == n * s:
            dims[-1] = (dims[-1][0] * n, s)
        else:
            dims.append((n, s))
    if rows == 0 or len(dims) > 2 or x.stride(-1) != 1:
        return _contiguous_rows(x)
    # A view (the leading dims fold into these), by reshape rather than as_strided: Inductor on torch 2.11 drops
    # a view's storage offset from as_strided, and Dynamo there cannot read storage_offset() in a Function.
    return x.reshape((dims[0][0], dims[1][0], V) if len(dims) == 2 else (rows, V))


def _contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., k) -> contiguous (rows, k): the sparse teacher's indices and values, k per row (small)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def _target(target: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """The target as the kernels read it: in its own dtype for the pairs of dtype_pair_supported (csrc/common.h,
    every backend). The BCE drop-in takes every pair torch takes: the others (bf16 with fp16, float64 with a
    narrower dtype) are cast to the input's dtype, one more pass."""
    if dtype_pair_supported(input.dtype, target.dtype):
        return target
    return target.to(input.dtype)


def _factor(f: Optional[torch.Tensor], input: torch.Tensor) -> Optional[torch.Tensor]:
    """A weight broadcast against input -> per-class (C,) or per-element (rows*C,) tensor in acc dtype."""
    if f is None:
        return None
    C = input.shape[-1]
    f = f.detach().to(acc_dtype(input.dtype))
    if all(s == 1 for s in f.shape[:-1]) and (f.dim() == 0 or f.shape[-1] in (1, C)):
        return f.reshape(-1).expand(C).contiguous()
    return f.expand(input.shape).reshape(-1).contiguous()


def _grad_scale(reduction, counted, acc, device):
    """1 / what the reduced loss divides by, a 0-d tensor (the kernels' grad_scale); None for 'sum' and 'none'.
    counted: an int or a device tensor. Nothing counted (empty batch, all rows masked) gives loss 0, never 0/0."""
    if reduction not in ("mean", "batchmean"):
        return None
    if isinstance(counted, torch.Tensor):
        return counted.clamp(min=1).to(acc).reciprocal()
    denom = float(max(counted, 1))
    if torch.compiler.is_compiling():
        return torch.full((), 1.0 / denom, dtype=acc, device=device)
    # One 0-d tensor per value, reused (the kernels only read it): a torch.full per call shows on small losses.
    key = (denom, acc, device)
    if key not in _SCALES:
        if len(_SCALES) >= 256:
            _SCALES.clear()
        _SCALES[key] = torch.full((), 1.0 / denom, dtype=acc, device=device)
    return _SCALES[key]


_SCALES: dict = {}


def _reduce(ctx, loss, reduction, scale):
    if reduction == "none":
        return loss
    if type(ctx) is _EagerCtx:  # one C++ call (small CPU losses: a loop, no dispatcher round trips)
        return _native().reduce_rows(loss, scale)
    # Out of place: on torch 2.11 - 2.12 Dynamo returns the Function's intermediates as extra outputs, and an
    # in-place product is the same tensor twice, whose gradient arrives as zeros (pytorch/pytorch#180642).
    return loss.sum() if scale is None else loss.sum() * scale


def _keep_grads(ctx, backend, sources, gx, gt, rerun):
    """Keep the forward's gradients for _fused_backward. rerun() recomputes (loss, gx, gt) for a second backward
    through a retained graph, from sources: the user's tensors (input and target first; not copies made from
    them, which would stay alive with the graph)."""
    if type(ctx) is _EagerCtx:  # apply() hands these to the C++ node, which knows the rest
        ctx.saved_tensors, ctx.rerun = (gx, gt), (rerun, sources, [x._version for x in sources if x is not None])
        return
    ctx.backend, ctx.shapes, ctx.scaled_in_place = backend, (sources[0].shape, sources[1].shape), False
    ctx.save_for_backward(gx, gt)
    if not torch.compiler.is_compiling():
        ctx.rerun = (rerun, sources, [x._version for x in sources if x is not None])


def _fused_forward(ctx, name, backend, make_args, sources, reduction, counted, grad_input, grad_target):
    """Run forward op `name` on make_args() (its leading arguments), reduce its loss and keep its gradients
    for backward. sources: the user's tensors the arguments are made from (input and target first).
    counted: what the reduction divides by, an int or a device tensor."""
    input = sources[0]
    scale = _grad_scale(reduction, counted, acc_dtype(input.dtype), input.device)
    grad_args = (grad_input, grad_target, scale if grad_input or grad_target else None)
    run = _raw_op(backend, name) if type(ctx) is _EagerCtx else op(backend, name)
    loss, gx, gt = run(*make_args(), *grad_args)
    _keep_grads(ctx, backend, sources, gx, gt, lambda: run(*make_args(), *grad_args))
    return _reduce(ctx, loss, reduction, scale)


def _rows_forward(ctx, name, backend, make_args, sources, mask, reduction, grad_input, grad_target):
    """_fused_forward for the row losses (one loss per row of sources[0], the input): the bool row mask counts
    rows, 'mean' also divides by the classes, 'none' keeps the leading shape."""
    input = sources[0]
    counted = mask.sum() if mask is not None else math.prod(input.shape[:-1])
    if reduction == "mean":
        counted = counted * input.shape[-1]
    out = _fused_forward(ctx, name, backend, make_args, sources, reduction, counted, grad_input, grad_target)
    return out.reshape(input.shape[:-1]) if reduction == "none" else out


def _flat_mask(mask):
    return mask.reshape(-1).contiguous() if mask is not None else None


def _softmax_rows_forward(ctx, name, backend, input, target, mask, target_type, options, reduction, grad_input,
                          grad_target):
    """_rows_forward for the row-softmax losses whose op takes rows, target rows, flat mask, target_type and
    `options`."""
    def make_args():
        return _rows(input), _rows(_target(target, input)), _flat_mask(mask), target_type, *options

    return _rows_forward(ctx, name, backend, make_args, (input, target, mask), mask, reduction, grad_input,
                         grad_target)


class _EagerCtx:
    """What _keep_grads records when apply() runs a Function's forward without autograd.Function."""
    __slots__ = ("saved_tensors", "rerun")


def apply(function, *args, backend: str, grad_input: bool, grad_target: bool):
    """function.apply(*args, backend, grad_input, grad_target) for the losses' autograd Functions (their forward
    takes input and target first, and these three last). In eager mode the same forward runs without
    autograd.Function's machinery and the backward is a C++ node (csrc/fused_backward.cpp) doing what
    _fused_backward does: the Python layers cost ~100 µs per call, as much as the kernels of a small loss.
    torch.compile traces function.apply."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or not native_loaded():
        return function.apply(*args, backend, grad_input, grad_target)
    ctx = _EagerCtx()
    grad_enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        out = function.forward(ctx, *args, backend, grad_input, grad_target)
    finally:
        torch._C._set_grad_enabled(grad_enabled)
    if grad_input or grad_target:
        gx, gt = ctx.saved_tensors
        del ctx.saved_tensors  # the node holds them (as saved variables: saved-tensor hooks apply), not ctx
        scale_op = "kl_ext_triton::scale_grad_" if backend == "triton" else "kl_ext::scale_grad_"
        _native().attach_fused_backward(out, args[0], args[1], gx if grad_input else None,
                                        gt if grad_target else None, scale_op, lambda: _recompute(ctx),
                                        function.__name__ + "Backward")
    return out


_RAW_OPS: dict = {}


def _raw_op(backend, name):
    """op(backend, name) for eager calls: the overload's C++ callable, without OpOverloadPacket.__call__'s frame."""
    if (backend, name) not in _RAW_OPS:
        _RAW_OPS[backend, name] = op(backend, name).default._op
    return _RAW_OPS[backend, name]


@functools.lru_cache(maxsize=None)
def _native():
    import kl_ext._C

    return kl_ext._C


def _recompute(ctx):
    rerun, sources, versions = ctx.rerun
    if [x._version for x in sources if x is not None] != versions:
        raise RuntimeError("kl_ext: a second backward through this loss (retain_graph=True) needs its inputs, "
                           "but they were modified in place after the forward; compute the loss again")
    _, gx, gt = rerun()
    return gx, gt


def _fused_backward(ctx, grad_out):
    """A loss Function's backward: the saved gradients times grad_output for its input and target (its first two
    arguments), None for the rest."""
    # In each gradient's accumulation dtype (the BCE drop-in's loss may be float64 for float32 kernels).
    scale = grad_out.reshape(-1).contiguous()
    wanted = ctx.needs_input_grad[:2]
    if torch.compiler.is_compiling():
        gx, gt = ctx.saved_tensors
        grads = [op(ctx.backend, "scale_grad")(g, scale.to(acc_dtype(g.dtype))) if w else None
                 for g, w in zip((gx, gt), wanted)]
    else:
        # The saved gradients are scaled in place once; a later backward (retained graph) recomputes them
        # (and must not unpack the saved tensors, which the first backward modified).
        gx, gt = _recompute(ctx) if ctx.scaled_in_place else ctx.saved_tensors
        ctx.scaled_in_place = True
        grads = []
        for g, w in zip((gx, gt), wanted):
            if w:
                op(ctx.backend, "scale_grad_")(g, scale.to(acc_dtype(g.dtype)))
            grads.append(g if w else None)
    rest = (None,) * (len(ctx.needs_input_grad) - 2)
    return (*(g.reshape(shape) if g is not None else None for g, shape in zip(grads, ctx.shapes)), *rest)
