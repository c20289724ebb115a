"""Tensor-parallel distillation on CPU: a student whose LM head is split by vocabulary over the ranks (the Megatron /
torchtitan layout) learns from a teacher whose head is split the same way, with
kl_ext.distributed.vocab_parallel_linear_distillation_loss: no rank ever holds all the logits, and none are
gathered.

    torchrun --standalone --nproc-per-node 2 examples/tp_distill.py [--steps 200]

The model is deliberately tiny (a bigram LM: embedding -> MLP -> head) so it trains in seconds on gloo; the loss
call is the one a large model makes. Each rank holds the replicated trunk and its shard of the head; the input
gradient the loss returns is already summed over the ranks, so the replicated trunk needs no all-reduce of its own.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from kl_ext.distributed import vocab_parallel_linear_distillation_loss

VOCAB, HIDDEN, TEACHER_HIDDEN, SEQ, BATCH = 203, 32, 48, 32, 16


class ShardedBigramLM(nn.Module):
    """Embedding and MLP replicated; the head's rows [lo, hi) of the vocabulary on this rank."""

    def __init__(self, hidden, lo, hi, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # every rank builds the same replicated weights
        self.embed = nn.Parameter(torch.randn(VOCAB, hidden, generator=g) * 0.5)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        for p in self.mlp.parameters():
            p.data = torch.randn(p.shape, generator=g) * hidden ** -0.5
        self.head = nn.Parameter((torch.randn(VOCAB, hidden, generator=g) * hidden ** -0.5)[lo:hi].clone())

    def hidden_states(self, tokens):
        return self.mlp(self.embed[tokens])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi = rank * VOCAB // world, (rank + 1) * VOCAB // world  # 203 classes: uneven shards

    teacher = ShardedBigramLM(TEACHER_HIDDEN, lo, hi, seed=1)
    teacher.requires_grad_(False)
    student = ShardedBigramLM(HIDDEN, lo, hi, seed=2)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-2)
    data = torch.Generator().manual_seed(3)  # the same batches on every rank

    first = last = None
    for step in range(args.steps):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=data)
        inputs = tokens[:, :-1]
        # Soft targets only: these random tokens carry no signal for a hard loss (labels=tokens[:, 1:] with
        # hard_weight adds one; each label is held by the rank whose shard has its class).
        loss = vocab_parallel_linear_distillation_loss(
            student.hidden_states(inputs), student.head, teacher.hidden_states(inputs),
            target_linear_weight=teacher.head, temperature=2.0, chunk_size=128,
            check_ranks=step == 0)  # the ranks' arguments are checked once; later steps skip the host sync
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if rank == 0 and step % max(1, args.steps // 5) == 0:
            print(f"step {step:4d}  loss {last:.4f}")
    # Every rank computed the same loss of the whole vocabulary.
    spread = torch.tensor([last, -last])
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    assert spread[0] + spread[1] <= 1e-6 * abs(last), "ranks disagree on the loss"
    if rank == 0:
        print(f"{world} ranks, head shards of {[(r + 1) * VOCAB // world - r * VOCAB // world for r in range(world)]} "
              f"classes: loss fell from {first:.4f} to {last:.4f} in {args.steps} steps")
        assert last < first
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
