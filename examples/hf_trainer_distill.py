"""Distillation with a Hugging Face Trainer, two ways, on CPU in well under a minute (tiny Llama models built from
configs: nothing is downloaded).

1. Online: a Trainer subclass whose compute_loss runs kl_ext.linear_distillation_loss on the models' last hidden
   states and LM-head weights (the (tokens x vocab) logits are never held), plus the usual next-token loss.
2. Offline: the teacher's top-k log-probs cached once to a safetensors shard (kl_ext.teacher_cache), the student
   trained from the shard with sparse_kl_div_with_logits at the cached temperature.

    python examples/hf_trainer_distill.py [--steps 30] [--out hf_distill_out]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import kl_ext
from kl_ext import teacher_cache

VOCAB, SEQ, T = 256, 32, 2.0


def tiny_llama(hidden, layers, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


class TokenData(torch.utils.data.Dataset):
    """Sequences from a fixed random bigram chain: a structure both models can learn."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        nxt = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)
        seqs = torch.empty(n, SEQ, dtype=torch.long)
        seqs[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
        for i in range(1, SEQ):
            seqs[:, i] = nxt[seqs[:, i - 1], torch.randint(0, 4, (n,), generator=g)]
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return {"input_ids": self.seqs[i], "labels": self.seqs[i], "index": torch.tensor(i)}


class DistillTrainer(Trainer):
    """compute_loss: next-token cross-entropy + the KL to the teacher, fused with the student's LM head."""

    def __init__(self, *args, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        hidden = model.model(input_ids=ids).last_hidden_state
        with torch.no_grad():
            t_hidden = self.teacher.model(input_ids=ids).last_hidden_state
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]  # position i predicts token i + 1
        loss = kl_ext.linear_distillation_loss(hidden, model.lm_head.weight, t_hidden,
                                               target_linear_weight=self.teacher.lm_head.weight.detach(), temperature=T,
                                               labels=labels, hard_weight=0.5, mask=labels != -100)
        return (loss, None) if return_outputs else loss


class CachedTrainer(Trainer):
    """compute_loss from the cached top-k teacher: each example's index picks its cached rows."""

    def __init__(self, *args, cache=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
        rows = inputs["index"]
        teacher = teacher_cache.CachedTeacher(self.cache.indices[rows], self.cache.log_probs[rows],
                                              self.cache.temperature)
        loss = teacher.loss(logits, temperature=T)
        return (loss, None) if return_outputs else loss


def train_teacher(data, steps, out):
    teacher = tiny_llama(128, 2, seed=1)
    args = TrainingArguments(output_dir=os.path.join(out, "teacher"), max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=10**6,
                             remove_unused_columns=False, disable_tqdm=True)
    Trainer(model=teacher, args=args, train_dataset=data).train()
    return teacher


def eval_ce(model, data):
    with torch.no_grad():
        ids = data.seqs[:64]
        return float(model(input_ids=ids, labels=ids).loss)


@torch.no_grad()
def cache_teacher(teacher, data, k, path):
    """The offline step: the teacher's top-k log-probs of every position, to a shard (as a served teacher's would
    come from kl_ext.teacher_cache.from_vllm_prompt_logprobs)."""
    logits = teacher(input_ids=data.seqs).logits[:, :-1]
    idx, lp = kl_ext.topk_target(logits, k, temperature=T)
    teacher_cache.save_shard(path, idx, lp, temperature=T)
    return teacher_cache.load_shard(path, k=k)


def main(steps=30, out=None, k=8):
    out = out or tempfile.mkdtemp(prefix="hf_distill_")
    data = TokenData(512)
    teacher = train_teacher(data, steps, out)
    results = {"teacher": eval_ce(teacher, data)}
    common = dict(max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3, report_to=[], use_cpu=True,
                  save_strategy="no", logging_steps=10**6, remove_unused_columns=False, disable_tqdm=True)
    student = tiny_llama(64, 1, seed=2)
    results["student before"] = eval_ce(student, data)
    DistillTrainer(model=student, args=TrainingArguments(output_dir=os.path.join(out, "online"), **common),
                   train_dataset=data, teacher=teacher).train()
    results["online (linear_distillation_loss)"] = eval_ce(student, data)
    cache = cache_teacher(teacher, data, k, os.path.join(out, "teacher_top8.safetensors"))
    student = tiny_llama(64, 1, seed=2)
    CachedTrainer(model=student, args=TrainingArguments(output_dir=os.path.join(out, "offline"), **common),
                  train_dataset=data, cache=cache).train()
    results[f"offline (top-{k} cache, sparse KL)"] = eval_ce(student, data)
    for name, ce in results.items():
        print(f"next-token cross-entropy, {name:<36} {ce:.3f}")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    main(a.steps, a.out)
