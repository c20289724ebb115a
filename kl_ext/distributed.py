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
  3. the JSD's mixture is not a function of shard statistics: a pass with the whole row's log-sum-exps gives
     each shard's sums of its terms, and a third all-reduce SUM the row's loss;
  4. when gradients are wanted, a finishing pass with the whole row's statistics writes them.
Communication: 2 all-reduces (KL) or 3 (JSD) in the forward, of 2 - 3 values per row (float64) plus one
count; none in the backward; no host sync. Unless check_ranks=False, one more all-reduce (two values) and a host
sync first check that the ranks agree on the shapes, dtypes and options (a mismatch is an error, not a hang).
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.distributed as dist

from kl_ext.jsd_with_logits import jsd_with_logits
from kl_ext._backends import op, resolve
from kl_ext._fused import (_flat_mask, _fused_backward, _grad_scale, _keep_grads, _reduce, _rows, _target, apply,
                           divergence_op, kernel_backward)
from kl_ext._validation import DIRECTIONS, _option, acc_dtype, check_jsd, needs_grad

__all__ = ["vocab_parallel_kl_div_with_logits", "vocab_parallel_jsd_with_logits"]

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


class VocabParallelFunction(torch.autograd.Function):
    """A row-softmax loss (KL or generalized JSD) over vocabulary shards; see the module docstring."""

    @staticmethod
    def forward(ctx, input, target, mask, beta, target_type, temperature, reduction, group, backend, grad_input,
                grad_target):
        name, options = divergence_op(beta, temperature)
        jsd, forward = 0 < beta < 1, beta == 0
        logits = target_type == "logits"
        acc = acc_dtype(input.dtype)
        rows, V_r = math.prod(input.shape[:-1]), input.shape[-1]
        x, t, m = _rows(input), _rows(_target(target, input)), _flat_mask(mask)

        def run(row_stats, gi=False, gt=False, grad_scale=None):
            return op(backend, name)(x, t, m, target_type, *options, gi, gt, grad_scale, row_stats)

        local = run(x.new_empty((rows, 0), dtype=acc))[0].double()  # (rows, 3): shard loss, log-masses
        kl_r, ls_r, lt_r = local.unbind(1)
        shift, rel = _log_sum_exp(local[:, 1:], group)                              # all-reduce 1
        cols = [rel] if jsd else [rel, _shard_terms(kl_r, ls_r, lt_r, shift, logits, forward)[:, None]]
        summed = torch.cat([torch.cat(cols, 1).reshape(-1), local.new_full((1,), V_r)])
        dist.all_reduce(summed, group=group)                                        # all-reduce 2
        V = summed[-1]
        total = summed[:-1].reshape(rows, -1)
        LS = shift[:, 0] + torch.log(total[:, 0])
        LT = shift[:, 1] + torch.log(total[:, 1])
        given = torch.stack([LS, LT, torch.zeros_like(LS), torch.zeros_like(LS)], 1)
        if jsd:
            sums = run(given.to(acc))[0].double()                                   # this shard's sum q g, sum p h
            dist.all_reduce(sums, group=group)                                      # all-reduce 3
            given[:, 2:] = sums
            loss = sums.sum(1)
        else:
            loss = _kl_from_shards(total, LS, LT, logits, forward)
            given[:, 2] = loss
        if mask is not None:
            loss = torch.where(m, loss, torch.zeros_like(loss))
        counted = m.sum() if mask is not None else rows
        if reduction == "mean":
            counted = counted * V
        grad_scale = _grad_scale(reduction, counted, acc, input.device)
        given = given.to(acc)
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
        return *_fused_backward(ctx, grad_out), None, None, None, None, None, None, None, None, None


def _vocab_parallel(input, target, beta, group, target_type, temperature, reduction, mask, backend, check_ranks):
    input, target, mask, group = _unwrap(input, target, mask, group)
    check_jsd(input, target, mask, target_type, temperature, beta, reduction)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kl_ext: the vocab-parallel losses need torch.distributed initialized "
                           "(torch.distributed.init_process_group); on one process use kl_div_with_logits / "
                           "jsd_with_logits")
    if dist.get_world_size(group) == 1:  # exactly the single-process loss
        return jsd_with_logits(input, target, beta=beta, target_type=target_type,
                                           temperature=temperature, reduction=reduction, mask=mask, backend=backend)
    be = resolve(backend, input.device)
    if be == "torch":
        raise RuntimeError("kl_ext: the vocab-parallel losses run on the kernel backends ('cpu', 'cuda', "
                           "'triton'); the C++ extension is not built here (see README 'Install')")
    signature = (tuple(input.shape[:-1]), str(input.dtype), str(target.dtype), mask is not None, target_type,
                 float(temperature), float(beta), reduction)
    if check_ranks:
        _check_ranks(group, signature, input.device)
    return apply(VocabParallelFunction, input, target, mask, float(beta), target_type, float(temperature),
                 reduction, group, be, needs_grad(input), needs_grad(target))


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
    return _vocab_parallel(input, target, 0.0 if direction == "forward" else 1.0, group, target_type, temperature,
                           reduction, mask, backend, check_ranks)


def vocab_parallel_jsd_with_logits(input: torch.Tensor, target: torch.Tensor, *, beta: float = 0.5, group=None,
                                   target_type: str = "logits", temperature: float = 1.0,
                                   reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
                                   backend: str = "auto", check_ranks: bool = True) -> torch.Tensor:
    """jsd_with_logits over vocabulary shards; arguments as vocab_parallel_kl_div_with_logits (beta 0 and 1 are
    the forward and reverse KL)."""
    return _vocab_parallel(input, target, beta, group, target_type, temperature, reduction, mask, backend,
                           check_ranks)
