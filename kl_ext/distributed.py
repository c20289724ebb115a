"""Vocab-parallel losses over torch.distributed: each rank holds (..., V_r), its shard of the vocabulary (the
layout of Megatron-style tensor parallelism and of a DTensor placed Shard(-1)); the full logits are never
gathered. The result on every rank is what kl_div_with_logits / jsd_with_logits give on the full rows, with
the gradients of the local shards.

Per call, on each rank's shard, with the fused kernels' vocab-parallel modes (csrc/common.h, KLCall):
  1. a statistics pass: per row, the log-masses (log-sum-exp) of student and teacher on the shard, and for the
     KL the shard's own KL between its renormalized distributions;
  2. all-reduce MAX of the log-masses, then all-reduce SUM of the masses relative to those maxima (the whole
     row's log-sum-exps) and, for the KL, of the shard KLs weighted by the shard's mass: by the chain rule of
     the KL, KL(p || q) = sum_r P_r KL(p_r || q_r) + sum_r P_r log(P_r / Q_r), the whole row's KL;
  3. the other divergences (JSD, TVD, skew KL: kl_ext/_registry.py) are not functions of shard statistics: a
     pass with the whole row's log-sum-exps gives each shard's sums of its terms, and a third all-reduce SUM the
     row's loss;
  4. when gradients are wanted, a finishing pass with the whole row's statistics writes them.
Communication: 2 all-reduces (KL) or 3 (the others) in the forward, of 2 - 3 values per row (float64) plus one
count; none in the backward; no host sync. Unless check_ranks=False, one more all-reduce (two values) and a host
sync first check that the ranks agree on the shapes, dtypes and options (a mismatch is an error, not a hang).
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.distributed as dist

from kl_ext._backends import op, resolve
from kl_ext._divergence import divergence_with_logits
from kl_ext._fused import (_flat_mask, _fused_backward, _grad_scale, _keep_grads, _reduce, _rows, _target, apply,
                           kernel_backward)
from kl_ext._registry import Bound, bind, kernel_bound
from kl_ext._validation import DIRECTIONS, _option, acc_dtype, check_kl, check_linear_distillation, needs_grad

__all__ = ["vocab_parallel_kl_div_with_logits", "vocab_parallel_jsd_with_logits",
           "vocab_parallel_divergence_with_logits", "vocab_parallel_linear_distillation_loss",
           "VocabParallelLinearDistillationLoss"]

def _unwrap(input, target, mask, group):
    """DTensor input and target placed Shard(-1) on a 1-D mesh -> their local shards and the mesh's group."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without DTensor
        return input, target, mask, group
    dtensors = [isinstance(x, DTensor) for x in (input, target)]
    if not any(dtensors):
        return input, target, mask, group
    if not all(dtensors):
        raise TypeError("kl_ext: input and target must both be DTensors (placed Shard(-1)) or both plain tensors "
                        "(this rank's shards)")
    for name, x in (("input", input), ("target", target)):
        placements = x.placements
        if x.device_mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or \
                placements[0].dim not in (-1, x.dim() - 1):
            raise ValueError(f"kl_ext: {name} must be a DTensor on a 1-D device mesh placed Shard(-1) (the "
                             f"vocabulary split over the ranks), got placements {placements} on a "
                             f"{x.device_mesh.ndim}-D mesh; redistribute it, e.g. "
                             f"{name}.redistribute(mesh, [Shard(-1)])")
    if isinstance(mask, DTensor):
        mask = mask.full_tensor()
    return input.to_local(), target.to_local(), mask, input.device_mesh.get_group()


def _check_ranks(group, signature, device):
    """Raise, on every rank, if the ranks' signatures differ: one all-reduce of two values and a host sync. (A
    rank cannot skip it on its own: the other ranks would be in another collective, and NCCL hangs there.)"""
    h = zlib.crc32(repr(signature).encode())
    seen = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=group)
    hi, neg_lo = seen.tolist()
    if hi != -neg_lo:
        raise ValueError(f"kl_ext: the ranks of the group disagree on the loss's leading shape, dtypes, mask or "
                         f"options (this rank: {signature}); every rank must pass its shard of the same rows")


def _log_sum_exp(log_mass, group):
    """Per row and column, the log-sum-exp over the ranks of log_mass (float64, -inf: no mass): (maxima used as
    shifts, the sums relative to them) after the first all-reduce (MAX); the caller sums the second."""
    m = log_mass.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return shift, torch.exp(log_mass - shift)


def _kl_from_shards(total, LS, LT, logits, forward):
    """The whole row's KL from the sums over the ranks (student mass, teacher mass, shard terms; relative to the
    shifts) and the row's log-sum-exps; see the module docstring. A side with no mass: 0 or +inf, as the
    kernels give."""
    sum_s, sum_t, terms = total.unbind(1)
    inf, zero = torch.full_like(LS, math.inf), torch.zeros_like(LS)
    if not logits:
        if not forward:
            return torch.where(sum_s == 0, zero, terms / sum_s - LS)
        mass = torch.exp(LT)
        return torch.where(mass == 0, zero, torch.where(sum_s == 0, inf, terms + LS * mass))
    weight, other = (sum_t, sum_s) if forward else (sum_s, sum_t)
    kl = terms / weight - ((LT - LS) if forward else (LS - LT))
    return torch.where(weight == 0, zero, torch.where(other == 0, inf, kl))


def _shard_terms(kl_r, ls_r, lt_r, shift, logits, forward):
    """Each shard's term of the whole row's KL, relative to the shifts (summed over the ranks)."""
    zero = torch.zeros_like(kl_r)
    if forward and not logits:  # sum_r kl_r - sum_r m_r ls_r, m_r = the shard's teacher mass
        m_r = torch.exp(lt_r)
        return kl_r - torch.where(m_r > 0, m_r * ls_r, zero)
    w = torch.exp((lt_r - shift[:, 1]) if forward else (ls_r - shift[:, 0]))  # the shard's unnormalized mass
    d = (lt_r - ls_r) if forward else (ls_r if not logits else ls_r - lt_r)
    return torch.where(w > 0, w * (kl_r + d), zero)


def _whole_rows(run, rows, V_r, divergence: Bound, target_type, group, acc, device):
    """The whole rows' loss (float64, per row; masked rows included) from this rank's shard, and the statistics
    the finishing pass takes (`given`, acc dtype), and V (the summed shard widths, a device scalar). run(row_stats)
    runs the fused op on the shard in a vocab-parallel mode (steps 1 - 3 of the module docstring)."""
    jsd, forward, logits = divergence.kl is None, divergence.kl == "forward", target_type == "logits"
    local = run(torch.empty((rows, 0), dtype=acc, device=device))[0].double()  # (rows, 3): shard loss, log-masses
    kl_r, ls_r, lt_r = local.unbind(1)
    shift, rel = _log_sum_exp(local[:, 1:], group)                                  # all-reduce 1
    cols = [rel] if jsd else [rel, _shard_terms(kl_r, ls_r, lt_r, shift, logits, forward)[:, None]]
    summed = torch.cat([torch.cat(cols, 1).reshape(-1), local.new_full((1,), V_r)])
    dist.all_reduce(summed, group=group)                                            # all-reduce 2
    total = summed[:-1].reshape(rows, -1)
    LS = shift[:, 0] + torch.log(total[:, 0])
    LT = shift[:, 1] + torch.log(total[:, 1])
    given = torch.stack([LS, LT, torch.zeros_like(LS), torch.zeros_like(LS)], 1)
    if jsd:
        sums = run(given.to(acc))[0].double()                                       # this shard's sum q g, sum p h
        dist.all_reduce(sums, group=group)                                          # all-reduce 3
        given[:, 2:] = sums
        loss = sums.sum(1)
    else:
        loss = _kl_from_shards(total, LS, LT, logits, forward)
        given[:, 2] = loss
    return loss, given.to(acc), summed[-1]


def shard_rows_loss(fn, x, t, mask, target_type, options, divergence, group, grad, grad_scale):
    """(loss per row in acc dtype, gradient w.r.t. x times grad_scale or None) of the whole rows whose shards
    are x, t on this rank: fn is the fused op (kl_div_with_logits_fwd / divergence_with_logits_fwd of a kernel
    backend) with its `options`. For linear_distillation_loss's vocab-parallel form, per chunk of rows."""
    acc = acc_dtype(x.dtype)

    def run(row_stats, gi=False):
        return fn(x, t, mask, target_type, *options, gi, False, grad_scale if gi else None, row_stats)

    loss, given, _ = _whole_rows(run, x.shape[0], x.shape[-1], divergence, target_type, group, acc, x.device)
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss.to(acc), (run(given, True)[1] if grad else None)


def shard_cross_entropy(z, local_labels, live, group, grad, grad_scale):
    """Cross-entropy of the whole rows whose shards are z (rows, V_r) on this rank, each label held by one rank
    (local_labels: the label minus this rank's first class; outside [0, V_r): another rank's): (loss per row in
    acc dtype, 0 where not live; gradient w.r.t. z times grad_scale, in z's dtype, or None). Two all-reduces of
    O(rows) values: the rows' maxima, then their exponential sums and label logits."""
    acc = acc_dtype(z.dtype)
    rows, V_r = z.shape
    zf = z.to(acc)
    owned = (local_labels >= 0) & (local_labels < V_r)
    m = zf.amax(-1) if V_r else zf.new_full((rows,), -math.inf)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(zf - shift[:, None])
    idx = local_labels.clamp(0, max(V_r - 1, 0))[:, None]
    picked = zf.gather(1, idx)[:, 0] if V_r else torch.zeros_like(m)
    sums = torch.stack([e.sum(-1), torch.where(owned, picked, torch.zeros_like(picked))], 1)
    dist.all_reduce(sums, group=group)
    loss = shift + torch.log(sums[:, 0]) - sums[:, 1]
    if live is not None:
        loss = torch.where(live, loss, torch.zeros_like(loss))
    if not grad:
        return loss, None
    g = e / sums[:, :1]
    if V_r:
        g.scatter_add_(1, idx, -owned.to(acc)[:, None])  # softmax - one-hot
    g = g * grad_scale
    if live is not None:
        g = torch.where(live[:, None], g, torch.zeros_like(g))
    return loss, g.to(z.dtype)


class VocabParallelFunction(torch.autograd.Function):
    """A divergence (by its kernels' name and parameter, as DivergenceWithLogitsFunction) over vocabulary shards;
    see the module docstring."""

    @staticmethod
    def forward(ctx, input, target, mask, divergence, param, target_type, temperature, reduction, group, backend,
                grad_input, grad_target):
        bound = kernel_bound(divergence, param)
        name, options = bound.op(temperature)
        acc = acc_dtype(input.dtype)
        rows, V_r = math.prod(input.shape[:-1]), input.shape[-1]
        x, t, m = _rows(input), _rows(_target(target, input)), _flat_mask(mask)

        def run(row_stats, gi=False, gt=False, grad_scale=None):
            return op(backend, name)(x, t, m, target_type, *options, gi, gt, grad_scale, row_stats)

        loss, given, V = _whole_rows(run, rows, V_r, bound, target_type, group, acc, input.device)
        if mask is not None:
            loss = torch.where(m, loss, torch.zeros_like(loss))
        counted = m.sum() if mask is not None else rows
        if reduction == "mean":
            counted = counted * V
        grad_scale = _grad_scale(reduction, counted, acc, input.device)
        if grad_input or grad_target:
            _, gx, gt = run(given, grad_input, grad_target, grad_scale)             # finishing pass
        else:
            gx = gt = input.new_empty((0,))
        _keep_grads(ctx, backend, (input, target, mask), gx, gt,
                    lambda: run(given, grad_input, grad_target, grad_scale))
        out = _reduce(ctx, loss.to(acc), reduction, grad_scale)
        return out.reshape(input.shape[:-1]) if reduction == "none" else out

    @staticmethod
    @kernel_backward
    def backward(ctx, grad_out):
        return _fused_backward(ctx, grad_out)


def _vocab_parallel(input, target, divergence: Bound, group, target_type, temperature, reduction, mask, backend,
                    check_ranks):
    input, target, mask, group = _unwrap(input, target, mask, group)
    check_kl(input, target, mask, target_type, temperature, "forward", reduction)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kl_ext: the vocab-parallel losses need torch.distributed initialized "
                           "(torch.distributed.init_process_group); on one process use kl_div_with_logits / "
                           "jsd_with_logits")
    if dist.get_world_size(group) == 1:  # exactly the single-process loss
        return divergence_with_logits(input, target, divergence, target_type=target_type, temperature=temperature,
                                      reduction=reduction, mask=mask, labels=None, ignore_index=-100,
                                      backend=backend, validate=False)
    be = resolve(backend, input.device)
    if be == "torch":
        raise RuntimeError("kl_ext: the vocab-parallel losses run on the kernel backends ('cpu', 'cuda', "
                           "'triton'); the C++ extension is not built here (see README 'Install')")
    signature = (tuple(input.shape[:-1]), str(input.dtype), str(target.dtype), mask is not None, target_type,
                 float(temperature), divergence.kernel, divergence.param, reduction)
    if check_ranks:
        _check_ranks(group, signature, input.device)
    return apply(VocabParallelFunction, input, target, mask, divergence.kernel, divergence.param, target_type,
                 float(temperature), reduction, group, backend=be, grad_input=needs_grad(input),
                 grad_target=needs_grad(target))


def vocab_parallel_kl_div_with_logits(input: torch.Tensor, target: torch.Tensor, *, group=None,
                                      target_type: str = "logits", temperature: float = 1.0,
                                      direction: str = "forward", reduction: str = "batchmean",
                                      mask: Optional[torch.Tensor] = None, backend: str = "auto",
                                      check_ranks: bool = True) -> torch.Tensor:
    """kl_div_with_logits over vocabulary shards: input and target are this rank's (..., V_r) shard of the last
    dim (the shards of `group`'s ranks, in rank order, make the full rows; V_r may differ, 0 included), or
    DTensors placed Shard(-1) on a 1-D mesh. Leading dims and mask are the same on every rank. Returns, on every
    rank, the loss of the full rows; gradients flow to the local shards. group: default the world.
    check_ranks: first check that the ranks agree on the leading shape, dtypes and options (one all-reduce of two
    values and a host sync per call; a mismatch is then an error on every rank instead of a hang); pass False
    once the training step is known to be consistent."""
    _option("direction", direction, DIRECTIONS)
    return _vocab_parallel(input, target, bind("kl" if direction == "forward" else "reverse_kl"), group,
                           target_type, temperature, reduction, mask, backend, check_ranks)


def vocab_parallel_jsd_with_logits(input: torch.Tensor, target: torch.Tensor, *, beta: float = 0.5, group=None,
                                   target_type: str = "logits", temperature: float = 1.0,
                                   reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
                                   backend: str = "auto", check_ranks: bool = True) -> torch.Tensor:
    """jsd_with_logits over vocabulary shards; arguments as vocab_parallel_kl_div_with_logits (beta 0 and 1 are
    the forward and reverse KL)."""
    return _vocab_parallel(input, target, bind("jsd", beta=beta), group, target_type, temperature, reduction, mask,
                           backend, check_ranks)


def vocab_parallel_divergence_with_logits(input: torch.Tensor, target: torch.Tensor, *, divergence: str,
                                          alpha: Optional[float] = None, beta: Optional[float] = None, group=None,
                                          target_type: str = "logits", temperature: float = 1.0,
                                          reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
                                          backend: str = "auto", check_ranks: bool = True) -> torch.Tensor:
    """Any divergence of the row losses by name over vocabulary shards: "kl", "reverse_kl", "jsd" (beta), "tvd",
    "skew_kl", "skew_reverse_kl" (alpha), as linear_distillation_loss names them; arguments as
    vocab_parallel_kl_div_with_logits."""
    return _vocab_parallel(input, target, bind(divergence, alpha=alpha, beta=beta), group, target_type,
                           temperature, reduction, mask, backend, check_ranks)


def _local(x, name, dim):
    """A DTensor argument -> (its local tensor, its mesh's group); a plain tensor or None -> (itself, None). dim:
    the dim it must be sharded on (None: replicated)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch without DTensor
        return x, None
    if not isinstance(x, DTensor):
        return x, None
    want = Replicate() if dim is None else Shard(dim % x.dim())
    placements = [Shard(p.dim % x.dim()) if isinstance(p, Shard) else p for p in x.placements]
    if x.device_mesh.ndim != 1 or placements != [want]:
        raise ValueError(f"kl_ext: {name} must be a DTensor on a 1-D device mesh placed {want}, got "
                         f"{x.placements} on a {x.device_mesh.ndim}-D mesh; redistribute it, e.g. "
                         f"{name}.redistribute(mesh, [{want}])")
    return x.to_local(), x.device_mesh.get_group()


def vocab_parallel_linear_distillation_loss(
        input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *, group=None,
        linear_bias: Optional[torch.Tensor] = None, target_linear_weight: Optional[torch.Tensor] = None,
        target_linear_bias: Optional[torch.Tensor] = None, target_indices: Optional[torch.Tensor] = None,
        target_type: str = "logits", divergence: str = "kl", alpha: Optional[float] = None,
        beta: Optional[float] = None, tail: str = "bucket",
        temperature: float = 1.0, logit_scale: float = 1.0, softcap: Optional[float] = None,
        labels: Optional[torch.Tensor] = None, ignore_index: int = -100, hard_weight: float = 0.0,
        soft_weight: float = 1.0, mask: Optional[torch.Tensor] = None, reduction: str = "batchmean",
        chunk_size: Optional[int] = None, backend: str = "auto", check_ranks: bool = True) -> torch.Tensor:
    """linear_distillation_loss with the LM head split by vocabulary over `group`'s ranks (the Megatron /
    torchtitan layout): no rank holds more than a chunk of its own shard's logits, and none is gathered.

    linear_weight (V_r, H), linear_bias (V_r,), target_linear_weight (V_r, H_t), target_linear_bias and a dense
    target (..., V_r) are this rank's shard of the classes (the ranks' shards, in rank order, make the V classes;
    V_r may differ), or DTensors placed Shard(0) (a dense target: Shard(-1)) on a 1-D mesh. input (..., H), the
    teacher's hidden states, labels and mask are the same on every rank. Returns, on every rank, what
    linear_distillation_loss gives with the gathered weights; input's gradient is the whole one on every rank,
    each weight's gradient is this rank's shard of the whole one. Every divergence of linear_distillation_loss; hard
    labels (each held by the rank whose shard has it); reductions "batchmean", "sum", "none". A top-k teacher
    (target_indices) is not supported here.

    Per chunk of rows: this rank's GEMM; the row statistics combined with all-reduces of O(chunk) values (2 for
    the KL, 3 for the other divergences, 2 for the hard loss); the fused kernels' vocab-parallel modes; the gradient GEMMs, the
    input gradient summed with one all-reduce of chunk x H. Before the chunks, one all-gather of the shard widths
    (and, with chunk_size=None, a host sync to agree on the chunk size from the whole V: pass chunk_size to avoid
    it). check_ranks as in vocab_parallel_kl_div_with_logits.

    Example, in each of 2 processes (torchrun --nproc-per-node 2; examples/tp_distill.py trains with it):

        rank, world = dist.get_rank(), dist.get_world_size()
        shard = slice(rank * V // world, (rank + 1) * V // world)
        loss = vocab_parallel_linear_distillation_loss(hidden, head.weight[shard], teacher_hidden,
                                                       target_linear_weight=teacher_head[shard], chunk_size=1024)
    """
    from kl_ext.linear_distillation_loss import _fused, default_chunk_size, linear_distillation_loss
    groups = []
    local = {}
    for name, x, dim in (("input", input, None), ("linear_weight", linear_weight, 0), ("linear_bias", linear_bias, 0),
                         ("target_linear_weight", target_linear_weight, 0),
                         ("target_linear_bias", target_linear_bias, 0),
                         ("target", target, None if target_linear_weight is not None else -1),
                         ("labels", labels, None), ("mask", mask, None)):
        local[name], g = _local(x, name, dim)
        groups.append(g)
    if group is None:  # a DTensor's mesh, else the world
        group = next((g for g in groups if g is not None), None) or dist.group.WORLD
    input, linear_weight, target, labels, mask = (local[k] for k in ("input", "linear_weight", "target", "labels",
                                                                     "mask"))
    linear_bias, target_linear_weight, target_linear_bias = (local[k] for k in ("linear_bias", "target_linear_weight",
                                                                                "target_linear_bias"))
    if target_indices is not None:
        raise ValueError("kl_ext: a top-k teacher (target_indices) over vocabulary shards is not supported; give the "
                         "teacher as hidden states + its head's shard, or as this rank's shard of dense rows")
    kw = dict(linear_bias=linear_bias, target_linear_weight=target_linear_weight,
              target_linear_bias=target_linear_bias, target_type=target_type, divergence=divergence, alpha=alpha,
              beta=beta, tail=tail, temperature=temperature, logit_scale=logit_scale, softcap=softcap, labels=labels,
              ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight, mask=mask,
              reduction=reduction, chunk_size=chunk_size)
    form = "hidden" if target_linear_weight is not None else "dense"
    div = bind(divergence, alpha=alpha, beta=beta)
    check_linear_distillation(input, linear_weight, target, linear_bias, target_linear_weight, target_linear_bias,
                              None, form, target_type, div, tail, temperature, logit_scale, softcap,
                              labels, hard_weight, soft_weight, mask, reduction, chunk_size)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kl_ext: the vocab-parallel losses need torch.distributed initialized "
                           "(torch.distributed.init_process_group); on one process use linear_distillation_loss")
    if dist.get_world_size(group) == 1:  # exactly the single-process loss
        return linear_distillation_loss(input, linear_weight, target, backend=backend, **kw)
    be = resolve(backend, input.device)
    if be == "torch":
        raise RuntimeError("kl_ext: the vocab-parallel losses run on the kernel backends ('cpu', 'cuda', "
                           "'triton'); the C++ extension is not built here (see README 'Install')")
    if check_ranks:
        signature = (tuple(input.shape), str(input.dtype), str(target.dtype), form,
                     tuple(target.shape[:-1]) if form == "dense" else tuple(target.shape), target_type, div.kernel,
                     div.param, float(temperature), float(logit_scale), softcap, labels is not None,
                     float(hard_weight), float(soft_weight), mask is not None, reduction, chunk_size,
                     linear_bias is not None, target_linear_bias is not None)
        _check_ranks(group, signature, input.device)
    width = torch.tensor([linear_weight.shape[0]], dtype=torch.int64, device=input.device)
    widths = [torch.empty_like(width) for _ in range(dist.get_world_size(group))]
    dist.all_gather(widths, width, group=group)
    widths = torch.cat(widths)
    offset = widths[:dist.get_rank(group)].sum()
    rows = math.prod(input.shape[:-1])
    if chunk_size is None:  # every rank must run the same chunks (their collectives pair up): from the whole V
        kw["chunk_size"] = default_chunk_size(rows, input.shape[-1], int(widths.sum()), cuda=input.is_cuda)
    return _fused(input, linear_weight, target, linear_bias, target_linear_weight, target_linear_bias, None, form,
                  target_type, div, tail, temperature, logit_scale, softcap, labels, ignore_index,
                  hard_weight, soft_weight, mask, reduction, kw["chunk_size"], be, group=group, label_offset=offset)


class VocabParallelLinearDistillationLoss(torch.nn.Module):
    """Module form of vocab_parallel_linear_distillation_loss: settings (and the group) in __init__, tensors in
    forward, as kl_ext.LinearDistillationLoss."""

    def __init__(self, *, group=None, target_type: str = "logits", divergence: str = "kl",
                 alpha: Optional[float] = None, beta: Optional[float] = None, temperature: float = 1.0, logit_scale: float = 1.0, softcap: Optional[float] = None,
                 ignore_index: int = -100, hard_weight: float = 0.0, soft_weight: float = 1.0,
                 reduction: str = "batchmean", chunk_size: Optional[int] = None, backend: str = "auto",
                 check_ranks: bool = True):
        super().__init__()
        self.group = group
        self.settings = dict(target_type=target_type, divergence=divergence, alpha=alpha, beta=beta,
                             temperature=temperature,
                             logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
                             hard_weight=hard_weight, soft_weight=soft_weight, reduction=reduction,
                             chunk_size=chunk_size, backend=backend, check_ranks=check_ranks)

    def forward(self, input, linear_weight, target, linear_bias=None, target_linear_weight=None,
                target_linear_bias=None, labels=None, mask=None):
        return vocab_parallel_linear_distillation_loss(
            input, linear_weight, target, group=self.group, linear_bias=linear_bias,
            target_linear_weight=target_linear_weight, target_linear_bias=target_linear_bias, labels=labels,
            mask=mask, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
