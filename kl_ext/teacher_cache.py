"""Offline distillation from a served teacher: its top-k log-probs as (indices, log_probs) tensors for
sparse_kl_div_with_logits, from vLLM's or SGLang's output, stored as safetensors shards that remember the temperature
the log-probs were taken at.

* vLLM (`SamplingParams(prompt_logprobs=k)`): `output.prompt_logprobs`, per position None (the first) or a dict
  token id -> an object with `.logprob` (and `.rank`). vLLM adds the position's own token when it is outside the top
  k, so a position may hold k + 1 entries: the k most likely are kept.
* SGLang (`return_logprob=True, top_logprobs_num=k`): `meta_info["input_top_logprobs"]`, per position None or a list
  of (logprob, token_id, text) tuples.

A position with fewer than k entries, or None, is padded with index -1 (an empty slot to the sparse loss). Log-probs
are the teacher's at the temperature it was served with: a loss call at another temperature would silently train on
the wrong teacher (the classic mistake), so `CachedTeacher.loss` refuses it.

    >>> import torch, kl_ext
    >>> from kl_ext import teacher_cache as tc
    >>> class LP:                                   # what vLLM puts in its dicts
    ...     def __init__(self, logprob): self.logprob = logprob
    >>> vllm_out = [None, {7: LP(-0.1), 3: LP(-2.5)}, {5: LP(-0.7), 7: LP(-0.9), 1: LP(-3.0)}]
    >>> idx, lp = tc.from_vllm_prompt_logprobs(vllm_out, k=2)
    >>> idx.tolist()
    [[-1, -1], [7, 3], [5, 7]]
    >>> teacher = tc.CachedTeacher(idx, lp, temperature=1.0)
    >>> loss = teacher.loss(torch.randn(3, 10), temperature=1.0)
    >>> teacher.loss(torch.randn(3, 10), temperature=2.0)
    Traceback (most recent call last):
    ...
    ValueError: kl_ext: the cached teacher's log-probs were taken at temperature 1.0, but the loss asks for 2.0; ...
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

__all__ = ["from_vllm_prompt_logprobs", "from_sglang_input_top_logprobs", "save_shard", "load_shard", "collate",
           "CachedTeacher"]

FORMAT = "kl_ext.teacher_cache/1"
_PROGRESS_FROM = 20000  # positions: a progress bar for conversions this large


def _positions(entries, k: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """entries: per position None or a list of (token id, log-prob) -> (P, k) int32 indices (-1: empty) and float32
    log-probs (-inf: empty), the k most likely of each position, checked (ids unique, log-probs finite and <= 0)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"kl_ext: k must be a positive int (the top-k kept per position), got {k!r}")
    P = len(entries)
    idx = torch.full((P, k), -1, dtype=torch.int32)
    lp = torch.full((P, k), -math.inf, dtype=torch.float32)
    rows = entries
    if P >= _PROGRESS_FROM:
        from tqdm import tqdm
        rows = tqdm(entries, desc=f"kl_ext: {what} -> top-{k}", unit="pos")
    for pos, items in enumerate(rows):
        if not items:
            continue
        ids = [int(t) for t, _ in items]
        vals = [float(v) for _, v in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"kl_ext: {what} position {pos} lists a token id twice ({sorted(ids)}); each position "
                             "must give each token once")
        bad = next((v for v in vals if not v <= 1e-6), None)  # NaN fails the comparison too
        if bad is not None:
            raise ValueError(f"kl_ext: {what} position {pos} has log-prob {bad}: log-probs must be finite numbers "
                             "<= 0 (were probabilities or logits passed?)")
        best = sorted(range(len(ids)), key=lambda i: -vals[i])[:k]
        idx[pos, :len(best)] = torch.tensor([ids[i] for i in best], dtype=torch.int32)
        lp[pos, :len(best)] = torch.tensor([min(vals[i], 0.0) for i in best], dtype=torch.float32)
    return idx, lp


def from_vllm_prompt_logprobs(prompt_logprobs: Sequence, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's vLLM `prompt_logprobs` -> (indices (P, k) int32, log_probs (P, k) float32)."""
    entries = [None if d is None else [(t, getattr(v, "logprob", v)) for t, v in d.items()] for d in prompt_logprobs]
    return _positions(entries, k, "vLLM prompt_logprobs")


def from_sglang_input_top_logprobs(input_top_logprobs: Sequence, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's SGLang `input_top_logprobs` -> (indices (P, k) int32, log_probs (P, k) float32)."""
    entries = [None if items is None else [(item[1], item[0]) for item in items] for items in input_top_logprobs]
    return _positions(entries, k, "SGLang input_top_logprobs")


def save_shard(path: str, indices: torch.Tensor, log_probs: torch.Tensor, temperature: float) -> None:
    """Write one shard (safetensors: no pickle, memory-mapped on load) with the temperature it was taken at."""
    from safetensors.torch import save_file
    if indices.shape != log_probs.shape or indices.dim() < 2:
        raise ValueError(f"kl_ext: indices {tuple(indices.shape)} and log_probs {tuple(log_probs.shape)} must share "
                         "a shape (..., k)")
    save_file({"indices": indices.to(torch.int32).contiguous(), "log_probs": log_probs.float().contiguous()}, path,
              metadata={"format": FORMAT, "temperature": repr(float(temperature))})


def load_shard(path: str, k: Optional[int] = None) -> "CachedTeacher":
    """Read a shard written by save_shard: its tensors (memory-mapped) and temperature. k: the top-k expected
    (a shard of another k is an error)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"kl_ext: {path} is not a kl_ext teacher-cache shard (format {meta.get('format')!r})")
        indices, log_probs = f.get_tensor("indices"), f.get_tensor("log_probs")
    if k is not None and indices.shape[-1] != k:
        raise ValueError(f"kl_ext: {path} holds top-{indices.shape[-1]} teachers, not the top-{k} expected")
    return CachedTeacher(indices, log_probs, float(meta["temperature"]))


class CachedTeacher(NamedTuple):
    """A cached sparse teacher: indices (..., k) (-1: empty), log_probs (..., k), the temperature they were taken at."""

    indices: torch.Tensor
    log_probs: torch.Tensor
    temperature: float

    def loss(self, student_logits: torch.Tensor, *, temperature: float, **kwargs) -> torch.Tensor:
        """sparse_kl_div_with_logits(student_logits, indices, log_probs, temperature=temperature, **kwargs), refused
        when temperature is not the one the log-probs were taken at."""
        if not math.isclose(temperature, self.temperature, rel_tol=1e-6):
            raise ValueError(f"kl_ext: the cached teacher's log-probs were taken at temperature {self.temperature}, "
                             f"but the loss asks for {temperature}; the student's softmax must use the teacher's "
                             "(cache the teacher again at the other temperature to change it)")
        from kl_ext.sparse_kl_div_with_logits import sparse_kl_div_with_logits
        idx, lp = self.indices.to(student_logits.device), self.log_probs.to(student_logits.device)
        return sparse_kl_div_with_logits(student_logits, idx, lp, temperature=temperature, **kwargs)


def collate(batch: Sequence) -> CachedTeacher:
    """For a DataLoader over CachedTeacher sequences of one temperature and k: pads to the longest sequence with
    empty slots (index -1) -> a CachedTeacher of (batch, longest, k) tensors."""
    temps = {float(b.temperature) for b in batch}
    ks = {b.indices.shape[-1] for b in batch}
    if len(temps) != 1 or len(ks) != 1:
        raise ValueError(f"kl_ext: a batch mixes teachers of temperatures {sorted(temps)} and top-k {sorted(ks)}; "
                         "collate sequences cached the same way")
    L, k = max(b.indices.shape[0] for b in batch), ks.pop()
    idx = torch.full((len(batch), L, k), -1, dtype=torch.int32)
    lp = torch.full((len(batch), L, k), -math.inf, dtype=torch.float32)
    for i, b in enumerate(batch):
        idx[i, :b.indices.shape[0]] = b.indices
        lp[i, :b.log_probs.shape[0]] = b.log_probs
    return CachedTeacher(idx, lp, temps.pop())
