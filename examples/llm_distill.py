"""Distil a small causal language model from a larger one with kl_ext.linear_distillation_loss, fed by the two
models' last hidden states and LM-head weights: the (tokens x vocab) logits are never held at once.

Pure torch, synthetic data, CPU in well under a minute (python examples/llm_distill.py). The data is a random
first-order Markov chain over the vocabulary (each token has a few likely successors): the teacher (2 layers,
width 128) learns it from next-token cross-entropy, then the student (1 layer, width 64) learns from the
teacher's soft next-token distributions (forward KL at T = 2, plus 0.2 x cross-entropy on the labels). At the
end, one training step's peak tensor memory: fused vs the unfused path (materialized logits + the loss).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kl_ext  # noqa: E402
from benchmarks.common import peak_tensor_bytes  # noqa: E402


class CausalLM(nn.Module):
    """Token + position embeddings, pre-norm transformer blocks with a causal mask, an untied LM head."""

    def __init__(self, vocab, width, layers, seq, gen):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(seq, width, generator=gen) * 0.02)
        block = lambda: nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True,  # noqa: E731
                                                   norm_first=True)
        self.blocks = nn.ModuleList(block() for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def hidden(self, tokens):
        T = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:T]
        causal = nn.Transformer.generate_square_subsequent_mask(T)
        for b in self.blocks:
            h = b(h, src_mask=causal, is_causal=True)
        return self.norm(h)


def markov_batch(trans, batch, seq, gen):
    tokens = torch.empty(batch, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, trans.shape[0], (batch,), generator=gen)
    for i in range(seq):
        tokens[:, i + 1] = torch.multinomial(trans[tokens[:, i]], 1, generator=gen).squeeze(1)
    return tokens[:, :-1], tokens[:, 1:]


def run(steps=60, vocab=512, seq=32, batch=16, T=2.0, show=True):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, vocab, generator=gen) * 3
    trans = torch.softmax(logits, -1)  # each token: a few likely successors
    teacher = CausalLM(vocab, 128, 2, seq, gen)
    student = CausalLM(vocab, 64, 1, seq, gen)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = markov_batch(trans, batch, seq, gen)
        loss = F.cross_entropy(teacher.head(teacher.hidden(x)).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher_ce = loss.item()
    teacher.requires_grad_(False)

    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    curve = []
    for _ in range(steps):
        x, y = markov_batch(trans, batch, seq, gen)
        with torch.no_grad():
            t_hidden = teacher.hidden(x)
        loss = kl_ext.linear_distillation_loss(student.hidden(x), student.head.weight, t_hidden,
                                               target_linear_weight=teacher.head.weight, temperature=T,
                                               labels=y, hard_weight=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())

    # One step's peak tensor memory (beyond inputs and weights), fused vs materialized logits.
    x, y = markov_batch(trans, 64, seq, gen)
    with torch.no_grad():
        t_hidden = teacher.hidden(x)
    s_hidden = student.hidden(x).detach().requires_grad_()
    w = student.head.weight

    def fused():
        kl_ext.linear_distillation_loss(s_hidden, w, t_hidden, target_linear_weight=teacher.head.weight,
                                        temperature=T, labels=y, hard_weight=0.2).backward()

    def unfused():
        z, t = s_hidden @ w.t(), t_hidden @ teacher.head.weight.t()
        soft = kl_ext.kl_div_with_logits(z, t, temperature=T)
        (soft + 0.2 * F.cross_entropy(z.flatten(0, 1), y.flatten())).backward()

    mem = {name: peak_tensor_bytes(fn) / 2**20 for name, fn in (("fused", fused), ("unfused", unfused))}
    res = {"teacher_ce": teacher_ce, "curve": curve, "peak_mib": mem, "tokens": x.numel(), "vocab": vocab}
    if show:
        print(f"teacher next-token cross-entropy after {steps} steps: {teacher_ce:.3f} "
              f"(uniform: {torch.log(torch.tensor(float(vocab))).item():.3f})")
        print(f"student distillation loss (KL at T={T} + 0.2 CE): {curve[0]:.3f} -> {curve[-1]:.3f}")
        print(f"one step at {x.numel()} tokens x {vocab} vocab, peak tensor memory: fused "
              f"{mem['fused']:.1f} MiB vs unfused {mem['unfused']:.1f} MiB (logits, their gradient and softmax)")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    t0 = time.time()
    run(args.steps)
    print(f"({time.time() - t0:.1f} s)")
