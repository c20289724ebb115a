"""The ops' schemas, each written once, with their fake (meta) kernels beside them.

`kl_ext::` (the C++ CPU / CUDA kernels: csrc/ only registers implementations), `kl_ext_triton::` (the Triton
backend, `triton_op`) and the CUDA emulator's `kl_ext_cuda_emu::` (tests/) are all defined from SCHEMAS, and
register these fakes, so torch.compile and opcheck trace every backend the same way. Defined at kl_ext import.

The fused forward ops return (loss, grad_input, grad_target): the loss per row (or the vocab-parallel modes'
statistics, csrc/common.h KLCall) and, when asked, the gradients of the row losses times grad_scale (a 0-d
accumulation-dtype tensor, e.g. 1 / rows for 'batchmean'; empty tensors when not asked). input / target are rows
(csrc/common.h RowLayout) of a supported dtype pair; losses are in the accumulation dtype, 0 for masked rows.
"""
import math

import torch

SCHEMAS = {
    # Per-row KL; direction "forward" KL(p || q) or "reverse" KL(q || p).
    "kl_div_with_logits_fwd":
        "(Tensor input, Tensor target, Tensor? mask, str target_type, float temperature, str direction, "
        "bool grad_input, bool grad_target, Tensor? grad_scale=None, Tensor? row_stats=None) "
        "-> (Tensor, Tensor, Tensor)",
    # Per-row divergence over two softmax rows with row sums of its own (csrc/divergences.cpp): "jsd" (param:
    # beta), "tvd", "skew_forward" / "skew_reverse" (param: alpha); param in (0, 1) where used.
    "divergence_with_logits_fwd":
        "(Tensor input, Tensor target, Tensor? mask, str target_type, float temperature, str divergence, "
        "float param, bool grad_input, bool grad_target, Tensor? grad_scale=None, Tensor? row_stats=None) "
        "-> (Tensor, Tensor, Tensor)",
    # Sparse teacher: target_indices int64 (rows, k), -1 an empty slot; target_values (rows, k) in the
    # accumulation dtype; tail "bucket" or "renorm". grad_target: w.r.t. the values.
    "sparse_kl_div_with_logits_fwd":
        "(Tensor input, Tensor target_indices, Tensor target_values, Tensor? mask, str target_type, str tail, "
        "float temperature, bool grad_input, bool grad_target, Tensor? grad_scale=None) "
        "-> (Tensor, Tensor, Tensor)",
    # Elementwise (rows, C) loss when `elementwise`, else per-row sums; weight / pos_weight per class or per
    # element (accumulation dtype); subtract_entropy=false is binary cross-entropy with logits.
    "bernoulli_kl_div_with_logits_fwd":
        "(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, str target_type, float temperature, "
        "bool subtract_entropy, bool elementwise, bool grad_input, bool grad_target, Tensor? grad_scale=None) "
        "-> (Tensor, Tensor, Tensor)",
    # grad * scale, scale (accumulation dtype) one value, one per row or one per element.
    "scale_grad": "(Tensor grad, Tensor scale) -> Tensor",
    "scale_grad_": "(Tensor(a!) grad, Tensor scale) -> ()",
}
MUTATES = {"scale_grad_": ("grad",)}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x):
    """Rows of a (rows, V) or (A, B, V) row tensor."""
    return math.prod(x.shape[:-1])


def _grads(input, target, grad_input, grad_target):
    """Contiguous (rows, V) gradients of the row tensors (csrc/common.h, grad_like)."""
    gi = input.new_empty((_rows(input), input.shape[-1])) if grad_input else input.new_empty((0,))
    gt = target.new_empty((_rows(target), target.shape[-1])) if grad_target else target.new_empty((0,))
    return gi, gt


def _row_loss(input, row_stats):
    """Per-row loss, or the vocab-parallel modes' (rows, 3) / (rows, 2) (csrc/common.h, KLCall)."""
    rows = _rows(input)
    shape = (rows,) if row_stats is None else (rows, 3 if row_stats.shape[1] == 0 else 2)
    return input.new_empty(shape, dtype=_acc(input.dtype))


def _kl_fwd(input, target, mask, target_type, temperature, direction, grad_input, grad_target, grad_scale=None,
            row_stats=None):
    return _row_loss(input, row_stats), *_grads(input, target, grad_input, grad_target)


def _divergence_fwd(input, target, mask, target_type, temperature, divergence, param, grad_input, grad_target,
                    grad_scale=None, row_stats=None):
    return _row_loss(input, row_stats), *_grads(input, target, grad_input, grad_target)


def _sparse_fwd(input, target_indices, target_values, mask, target_type, tail, temperature, grad_input, grad_target,
                grad_scale=None):
    gv = torch.empty_like(target_values) if grad_target else target_values.new_empty((0,))
    return input.new_empty((_rows(input),), dtype=_acc(input.dtype)), _grads(input, input, grad_input, False)[0], gv


def _bernoulli_fwd(input, target, weight, pos_weight, target_type, temperature, subtract_entropy, elementwise,
                   grad_input, grad_target, grad_scale=None):
    shape = (_rows(input), input.shape[-1]) if elementwise else (_rows(input),)
    return (input.new_empty(shape, dtype=_acc(input.dtype)), *_grads(input, target, grad_input, grad_target))


def _scale_grad(grad, scale):
    return torch.empty_like(grad)


def _scale_grad_(grad, scale):
    return None


FAKES = {"kl_div_with_logits_fwd": _kl_fwd, "divergence_with_logits_fwd": _divergence_fwd,
         "sparse_kl_div_with_logits_fwd": _sparse_fwd, "bernoulli_kl_div_with_logits_fwd": _bernoulli_fwd,
         "scale_grad": _scale_grad, "scale_grad_": _scale_grad_}
assert FAKES.keys() == SCHEMAS.keys()

_LIBRARIES: dict = {}  # kept alive: a Library's definitions go with it


def define(namespace: str, names=None) -> None:
    """Define the ops (all, or `names`) in `namespace` from SCHEMAS, with their fakes; the implementations are
    registered by whoever owns the namespace (csrc/ for kl_ext, the emulator for kl_ext_cuda_emu)."""
    lib = _LIBRARIES.setdefault(namespace, torch.library.Library(namespace, "FRAGMENT"))
    for name in names or SCHEMAS:
        lib.define(name + SCHEMAS[name])
        torch.library.register_fake(f"{namespace}::{name}", FAKES[name], lib=lib)


def triton_op(name: str):
    """Decorator: the Triton backend's implementation of op `name`, as the custom op kl_ext_triton::`name` of
    the same schema, with its fake."""
    def register(fn):
        op = torch.library.custom_op(f"kl_ext_triton::{name}", fn, mutates_args=MUTATES.get(name, ()),
                                     schema=SCHEMAS[name])
        op.register_fake(FAKES[name])
        return op
    return register


define("kl_ext")
