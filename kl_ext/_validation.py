"""Input checks, shared by every backend and run once, before any kernel.

Shape/dtype/option checks never read tensor values (no host sync). The opt-in value checks
(validate=True) do read values, and name the classic nn.KLDivLoss pitfalls in their messages.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

TARGET_TYPES = ("logits", "log_probs", "probs")
BERNOULLI_TARGET_TYPES = ("probs", "logits")
DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
BCE_REDUCTIONS = ("none", "sum", "mean")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _option(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"kl_ext: {name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def _tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kl_ext: {name} must be a torch.Tensor, got {type(x).__name__}")


def _floating(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"kl_ext: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}; "
                        f"convert it with {name}.float()")


def _temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"kl_ext: temperature must be a Python float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"kl_ext: temperature must be a finite number > 0, got {temperature}")


_HALF = (torch.bfloat16, torch.float16)


def dtype_pair_supported(input_dtype: torch.dtype, target_dtype: torch.dtype) -> bool:
    """The dtype pairs the kernels read in place, each tensor in its own dtype (csrc/common.h): one dtype, or a
    16-bit one with float32 in either order (mixed precision)."""
    return input_dtype == target_dtype or (input_dtype == torch.float32 and target_dtype in _HALF) or \
        (input_dtype in _HALF and target_dtype == torch.float32)


def _pair(input, target, what: str = "target", any_dtypes: bool = False) -> None:
    _tensor("input", input)
    _tensor(what, target)
    _floating("input", input)
    _floating(what, target)
    if input.dim() == 0:
        raise ValueError("kl_ext: input must have a class dimension (at least 1-D, classes last); "
                         "for a single logit use shape (1,)")
    if target.shape != input.shape:
        raise ValueError(f"kl_ext: {what} shape {tuple(target.shape)} must equal input shape {tuple(input.shape)} "
                         "(rows = leading dims, classes = last dim); broadcasting is not supported")
    if target.device != input.device:
        raise ValueError(f"kl_ext: input is on {input.device} but {what} is on {target.device}; "
                         f"move them to one device, e.g. {what}.to(input.device)")
    if not any_dtypes and not dtype_pair_supported(input.dtype, target.dtype):
        raise TypeError(f"kl_ext: input is {input.dtype} but {what} is {target.dtype}: input and {what} may share "
                        "a dtype, or pair bfloat16 / float16 with float32 (either way round); float64 pairs only "
                        f"with float64; cast one of them, e.g. {what}.to(input.dtype)")


def _mask(mask, input) -> None:
    if mask is None:
        return
    _tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"kl_ext: mask must be a bool tensor (True = row counted), got {mask.dtype}; "
                        "use mask.bool() or (labels != ignore_index)")
    _per_row("mask", mask, input, "value")


def _per_row(name, t, input, what) -> None:
    """t holds one `what` per row of input: its leading shape, on its device."""
    if t.shape != input.shape[:-1]:
        raise ValueError(f"kl_ext: {name} shape {tuple(t.shape)} must equal the input's leading shape "
                         f"{tuple(input.shape[:-1])} (one {what} per row)")
    if t.device != input.device:
        raise ValueError(f"kl_ext: {name} is on {t.device} but input is on {input.device}; "
                         f"use {name}.to(input.device)")


def label_mask(mask, labels, ignore_index, input):
    """The row mask with labels as one more source, as TRL and Liger take them: rows whose label is ignore_index
    (-100: padding) are left out, combined with `mask` (already checked) when both are given. No host sync."""
    if labels is None:
        return mask
    _tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"kl_ext: labels must be an integer tensor (token ids, ignore_index={ignore_index} for "
                        f"rows to leave out), got {labels.dtype}; for a bool row mask pass mask=")
    _per_row("labels", labels, input, "label")
    keep = labels != ignore_index
    return keep if mask is None else mask & keep


def check_kl(input, target, mask, target_type, temperature, direction, reduction) -> None:
    _option("target_type", target_type, TARGET_TYPES)
    _option("direction", direction, DIRECTIONS)
    _option("reduction", reduction, REDUCTIONS)
    _temperature(temperature)
    _pair(input, target)
    _mask(mask, input)


TAILS = ("bucket", "renorm")


def check_sparse(input, target_indices, target_values, mask, target_type, tail, temperature, reduction) -> None:
    _option("target_type", target_type, TARGET_TYPES)
    _option("tail", tail, TAILS)
    _option("reduction", reduction, REDUCTIONS)
    _temperature(temperature)
    _tensor("input", input)
    _tensor("target_indices", target_indices)
    _tensor("target_values", target_values)
    _floating("input", input)
    _floating("target_values", target_values)
    if input.dim() == 0:
        raise ValueError("kl_ext: input must have a class dimension (at least 1-D, classes last)")
    if target_indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"kl_ext: target_indices must be int64 or int32 class indices (-1 for an empty slot), "
                         f"got {target_indices.dtype}; e.g. the indices of torch.topk, or kl_ext.topk_target")
    if target_indices.shape != target_values.shape:
        raise ValueError(f"kl_ext: target_indices shape {tuple(target_indices.shape)} must equal target_values "
                         f"shape {tuple(target_values.shape)} (one index per value, k per row)")
    if target_indices.dim() != input.dim() or target_indices.shape[:-1] != input.shape[:-1]:
        raise ValueError(f"kl_ext: target_indices / target_values shape {tuple(target_indices.shape)} must be the "
                         f"input's leading shape {tuple(input.shape[:-1])} plus k (the teacher's entries per row)")
    for name, t in (("target_indices", target_indices), ("target_values", target_values)):
        if t.device != input.device:
            raise ValueError(f"kl_ext: input is on {input.device} but {name} is on {t.device}; "
                             f"use {name}.to(input.device)")
    _mask(mask, input)


def validate_finite(x: torch.Tensor, name: str, what: str) -> None:
    """validate=True: NaN or +inf in x (-inf is allowed: a class with no mass) -> ValueError naming the first bad row
    (reads values, syncs)."""
    if x.numel() == 0 or not x.is_floating_point():
        return
    bad = torch.isnan(x) | torch.isposinf(x)
    if not bool(bad.any()):
        return
    rows = bad.reshape(-1, x.shape[-1]).any(-1) if x.dim() > 0 else bad.reshape(1)
    first = int(rows.nonzero()[0, 0])
    lead = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), x.shape[:-1])) if x.dim() > 1 else ()
    row = x.reshape(-1, x.shape[-1])[first] if x.dim() > 0 else x.reshape(1)
    kind = "NaN" if bool(torch.isnan(row).any()) else "+inf"
    at = f"row {lead if len(lead) != 1 else lead[0]}" if x.dim() > 1 else "its values"
    raise ValueError(f"kl_ext: {name} ({what}) holds {kind} in {at}; {int(rows.sum())} of {rows.numel()} rows have "
                     f"NaN or +inf, and the loss would be NaN. Find where it comes from (an overflowing activation, a "
                     f"division by zero, corrupt data), or leave such rows out with mask= (-inf is fine: a class "
                     f"with no mass)")


def validate_sparse_indices(target_indices: torch.Tensor, V: int) -> None:
    """validate=True for sparse teachers: every index in [-1, V), no class twice in a row (reads values, syncs)."""
    if target_indices.numel() == 0:
        return
    bad = (target_indices < -1) | (target_indices >= V)
    if bool(bad.any()):
        i = target_indices[bad][0].item()
        raise ValueError(f"kl_ext: target_indices holds {i}, outside [-1, {V}): indices must be classes of the "
                         "input's last dim, or -1 for an empty slot")
    s = target_indices.sort(-1).values
    if bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()):
        raise ValueError("kl_ext: a row of target_indices names the same class twice; each class may appear once "
                         "per row (the result is undefined otherwise): deduplicate, or merge their values")


LINEAR_REDUCTIONS = ("none", "sum", "batchmean")


def check_linear_distillation(input, weight, target, bias, t_weight, t_bias, t_indices, form, target_type, divergence,
                              tail, temperature, logit_scale, softcap, labels, hard_weight, soft_weight, mask,
                              reduction, chunk_size) -> None:
    """divergence: the _registry.Bound (its name and parameters already checked)."""
    if reduction == "mean":
        raise ValueError("kl_ext: reduction='mean' has no meaning for linear_distillation_loss (it would divide by "
                         "the vocabulary); use 'batchmean' (per counted row), 'sum' or 'none'")
    _option("reduction", reduction, LINEAR_REDUCTIONS)
    _option("target_type", target_type, TARGET_TYPES)
    _option("tail", tail, TAILS)
    _temperature(temperature)
    for name, x in (("input", input), ("linear_weight", weight), ("target", target)):
        _tensor(name, x)
        _floating(name, x)
    if input.dim() < 1 or weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"kl_ext: linear_weight must be (V, H) with H = input.shape[-1] = "
                         f"{input.shape[-1] if input.dim() else None}; got {tuple(weight.shape)}")
    if weight.dtype != input.dtype or weight.device != input.device:
        raise ValueError(f"kl_ext: linear_weight ({weight.dtype}, {weight.device}) must match input "
                         f"({input.dtype}, {input.device})")
    V = weight.shape[0]
    if bias is not None and (bias.shape != (V,) or bias.dtype != input.dtype):
        raise ValueError(f"kl_ext: linear_bias must be ({V},) in {input.dtype}")
    lead = input.shape[:-1]
    if target.shape[:-1] != lead or target.device != input.device:
        raise ValueError(f"kl_ext: target must have the input's leading shape {tuple(lead)} on {input.device}; "
                         f"got {tuple(target.shape)} on {target.device}")
    for name, x in (("target", target), ("target_linear_weight", t_weight), ("target_linear_bias", t_bias)):
        if x is not None and x.requires_grad:
            raise ValueError(f"kl_ext: {name} requires grad, but the teacher side is constant here; pass "
                             f"{name}.detach()")
    if form == "hidden":
        if target_type != "logits":
            raise ValueError("kl_ext: with target_linear_weight the teacher's logits are computed: leave "
                             "target_type='logits'")
        if t_weight.dim() != 2 or t_weight.shape != (V, target.shape[-1]) or t_weight.dtype != target.dtype:
            raise ValueError(f"kl_ext: target_linear_weight must be (V, H_t) = ({V}, {target.shape[-1]}) in the "
                             f"target's dtype; got {tuple(t_weight.shape)} {t_weight.dtype}")
        if t_bias is not None and (t_bias.shape != (V,) or t_bias.dtype != target.dtype):
            raise ValueError(f"kl_ext: target_linear_bias must be ({V},) in the target's dtype")
    elif form == "sparse":
        if divergence.kl != "forward":
            raise ValueError(f"kl_ext: a sparse (top-k) teacher supports divergence='kl' only (the KL(teacher || "
                             f"student) over the teacher's support and tail bucket), got {divergence.name!r}; give "
                             f"the teacher as dense rows or hidden states for the other divergences")
        check_sparse(torch.empty(lead + (V,), device="meta"), t_indices.to("meta"), target.to("meta"), None,
                     target_type, tail, temperature, "batchmean")
    elif target.shape[-1] != V:
        raise ValueError(f"kl_ext: a dense target must have V = {V} classes in its last dim (or give "
                         "target_linear_weight for teacher hidden states, or target_indices for a top-k teacher)")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"kl_ext: softcap must be None or a number > 0, got {softcap!r}")
    if not isinstance(logit_scale, (int, float)) or isinstance(logit_scale, bool) or not math.isfinite(logit_scale):
        raise ValueError(f"kl_ext: logit_scale must be a finite number, got {logit_scale!r}")
    if labels is not None:
        _tensor("labels", labels)
        if labels.dtype != torch.int64 or labels.shape != lead:
            raise ValueError(f"kl_ext: labels must be int64 of the input's leading shape {tuple(lead)}")
    _mask(mask, input)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"kl_ext: chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _factor(name: str, f, input) -> None:
    if f is None:
        return
    _tensor(name, f)
    _floating(name, f)
    if f.device != input.device:
        raise ValueError(f"kl_ext: {name} is on {f.device} but input is on {input.device}; "
                         f"use {name}.to(input.device)")
    try:
        torch.broadcast_shapes(f.shape, input.shape)
    except RuntimeError:
        raise ValueError(f"kl_ext: {name} shape {tuple(f.shape)} does not broadcast against input shape "
                         f"{tuple(input.shape)}; give one value per class (shape ({input.shape[-1]},)) or per element")
    if torch.broadcast_shapes(f.shape, input.shape) != input.shape:
        raise ValueError(f"kl_ext: {name} shape {tuple(f.shape)} would enlarge the loss beyond input shape "
                         f"{tuple(input.shape)}")
    if f.requires_grad:
        raise NotImplementedError(f"kl_ext: gradients w.r.t. {name} are not supported; pass {name}.detach()")


def check_bernoulli(input, target, weight, target_type, temperature, reduction) -> None:
    _option("target_type", target_type, BERNOULLI_TARGET_TYPES)
    _option("reduction", reduction, REDUCTIONS)
    _temperature(temperature)
    _pair(input, target)
    _factor("weight", weight, input)


def check_bce(input, target, weight, pos_weight, reduction) -> None:
    _option("reduction", reduction, BCE_REDUCTIONS)
    if isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor) and target.shape != input.shape:
        raise ValueError(f"kl_ext: Target size ({target.size()}) must be the same as input size ({input.size()}) "
                         "(as torch's binary_cross_entropy_with_logits requires)")
    _pair(input, target, any_dtypes=True)  # as torch's: pairs the kernels do not read are cast (_fused._target)
    _factor("weight", weight, input)
    _factor("pos_weight", pos_weight, input)


# --- opt-in value checks (validate=True); these read values and may sync -------------------------------

def _looks_like_probs(x: torch.Tensor) -> bool:
    return bool(((x >= 0) & (x <= 1)).all())


def _rows_sum_to_one(p: torch.Tensor, tol: float = 1e-2) -> bool:
    return bool(((p.double().sum(-1) - 1).abs() <= tol).all())


def validate_kl_values(input: torch.Tensor, target: torch.Tensor, target_type: str) -> None:
    if input.numel() == 0:
        return
    validate_finite(input, "input", "the student's logits")
    validate_finite(target, "target", f"the teacher's {target_type.replace('_', '-')}")
    if _looks_like_probs(input) and _rows_sum_to_one(input) and input.shape[-1] > 1:
        raise ValueError("kl_ext: the input rows look like probabilities (in [0, 1], summing to 1). "
                         "kl_div_with_logits takes the student's raw logits: pass the logits, not softmax(logits)")
    if target_type == "probs":
        if not _looks_like_probs(target):
            if bool((target <= 0).all()):
                raise ValueError("kl_ext: target_type='probs' but the target is <= 0 everywhere: it looks like "
                                 "log-probabilities. Use target_type='log_probs' (the nn.KLDivLoss pitfall of "
                                 "passing log-probs where probs belong, or forgetting log_target=True)")
            raise ValueError("kl_ext: target_type='probs' but some target values are outside [0, 1]; "
                             "if these are logits use target_type='logits'")
        if not _rows_sum_to_one(target):
            sums = target.double().sum(-1)
            if bool((sums > 1 + 1e-2).any()):
                raise ValueError("kl_ext: target rows sum to more than 1: these look like multi-label targets "
                                 "(independent per-class probabilities). A softmax KL is the wrong loss for them: "
                                 "use kl_ext.bernoulli_kl_div_with_logits. (If you meant an unnormalised "
                                 "truncated teacher, call without validate=True.)")
            raise ValueError("kl_ext: target rows do not sum to 1. If this is a truncated top-k teacher that is "
                             "fine: call without validate=True; otherwise normalise the target")
    elif target_type == "log_probs":
        finite = target[torch.isfinite(target)]
        if _looks_like_probs(target) and _rows_sum_to_one(target):
            raise ValueError("kl_ext: target_type='log_probs' but the target rows look like probabilities "
                             "(in [0, 1], summing to 1). Use target_type='probs' (with nn.KLDivLoss this mistake "
                             "gives a negative 'KL')")
        if bool((finite > 1e-4).any()) or not _rows_sum_to_one(target.double().exp()):
            raise ValueError("kl_ext: target_type='log_probs' but exp(target) rows do not sum to 1; "
                             "if these are raw logits use target_type='logits'")
    elif target.shape[-1] > 1 and _looks_like_probs(target) and _rows_sum_to_one(target):
        raise ValueError("kl_ext: target_type='logits' but the target rows look like probabilities; "
                         "use target_type='probs' (softmax of probabilities is not the teacher you mean)")


def validate_bernoulli_values(input: torch.Tensor, target: torch.Tensor, target_type: str) -> None:
    validate_finite(input, "input", "the logits")
    validate_finite(target, "target", f"the targets' {target_type}")
    if target_type == "probs" and target.numel() and not _looks_like_probs(target):
        raise ValueError("kl_ext: Bernoulli targets with target_type='probs' must lie in [0, 1]; "
                         "pass target_type='logits' for raw teacher logits")


def needs_grad(x: Optional[torch.Tensor]) -> bool:
    return x is not None and x.requires_grad and torch.is_grad_enabled()
