"""kl_ext.teacher_cache: vLLM- and SGLang-shaped outputs (built here, no server) -> tensors -> safetensors shard ->
DataLoader batch, equal to the source; bad input refused with the position named; the temperature kept and
enforced."""
import math
import random

import pytest
import torch

import kl_ext
from kl_ext import teacher_cache as tc

pytest.importorskip("safetensors")


class Logprob:
    """vLLM's per-token entry."""

    def __init__(self, logprob, rank):
        self.logprob, self.rank = logprob, rank


def _teacher(P=9, V=50, k=4, seed=0):
    """A teacher's top-(k+1) per position as {token: log-prob}; position 0 has none (vLLM's first)."""
    rng = random.Random(seed)
    out = [None]
    for _ in range(P - 1):
        lp = torch.log_softmax(torch.randn(V, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))), -1)
        top = torch.topk(lp, k + rng.choice((-2, 0, 1)))  # fewer than k, k, or vLLM's k + 1
        out.append(dict(zip(top.indices.tolist(), top.values.tolist())))
    return out


def _vllm(teacher):
    return [None if d is None else {t: Logprob(v, r + 1) for r, (t, v) in enumerate(d.items())} for d in teacher]


def _sglang(teacher):
    return [None if d is None else [(v, t, f"tok{t}") for t, v in d.items()] for d in teacher]


def _expected(teacher, k):
    return [[] if d is None else sorted(d.items(), key=lambda kv: -kv[1])[:k] for d in teacher]


def _as_sets(idx, lp):
    return [sorted((int(i), round(float(v), 6)) for i, v in zip(r_i, r_v) if i >= 0) for r_i, r_v in zip(idx, lp)]


@pytest.mark.parametrize("source", ["vllm", "sglang"])
def test_round_trip_to_a_dataloader_batch(source, tmp_path):
    k = 4
    seqs = [_teacher(P=p, seed=p) for p in (9, 5, 12)]
    convert = tc.from_vllm_prompt_logprobs if source == "vllm" else tc.from_sglang_input_top_logprobs
    shaped = _vllm if source == "vllm" else _sglang
    cached = []
    for n, teacher in enumerate(seqs):
        idx, lp = convert(shaped(teacher), k)
        assert idx.dtype == torch.int32 and lp.dtype == torch.float32 and idx.shape == (len(teacher), k)
        assert _as_sets(idx, lp) == sorted_sets(_expected(teacher, k))
        tc.save_shard(str(tmp_path / f"s{n}.safetensors"), idx, lp, temperature=2.0)
        cached.append(tc.load_shard(str(tmp_path / f"s{n}.safetensors"), k=k))
        assert cached[-1].temperature == 2.0 and torch.equal(cached[-1].indices, idx)
    loader = torch.utils.data.DataLoader(cached, batch_size=3, collate_fn=tc.collate)
    batch = next(iter(loader))
    assert batch.indices.shape == (3, 12, k) and batch.temperature == 2.0
    for n, teacher in enumerate(seqs):
        assert _as_sets(batch.indices[n], batch.log_probs[n]) == sorted_sets(_expected(teacher, k)) + \
            [[]] * (12 - len(teacher))  # padding: empty slots
    # The batch feeds the sparse loss at its temperature, the same as the per-sequence tensors do.
    student = torch.randn(3, 12, 50)
    got = batch.loss(student, temperature=2.0, reduction="sum")
    exp = sum(kl_ext.sparse_kl_div_with_logits(student[n, :len(t)], cached[n].indices, cached[n].log_probs,
                                               temperature=2.0, reduction="sum") for n, t in enumerate(seqs))
    torch.testing.assert_close(got, exp)
    with pytest.raises(ValueError, match="taken at temperature 2.0, but the loss asks for 1.0"):
        batch.loss(student, temperature=1.0)


def sorted_sets(rows):
    return [sorted((t, round(v, 6)) for t, v in r) for r in rows]


def test_bad_input_is_refused_naming_the_position(tmp_path):
    good = {1: Logprob(-0.5, 1), 2: Logprob(-1.0, 2)}
    cases = [([None, good, [(-0.1, 4, "a"), (-0.2, 4, "b")]], "lists a token id twice", "position 2"),
             ([None, good, [(float("nan"), 4, "a")]], "log-prob nan", "position 2"),
             ([[(0.7, 4, "a")]], "log-prob 0.7", "position 0")]
    for data, what, where in cases:
        with pytest.raises(ValueError, match=f"{where} .*{what}|{where}.*{what}"):
            tc.from_sglang_input_top_logprobs([d if not isinstance(d, dict) else [(v.logprob, t, "")
                                                                                  for t, v in d.items()]
                                               for d in data], 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        tc.from_vllm_prompt_logprobs([good], 0)
    idx, lp = tc.from_vllm_prompt_logprobs([None, good], 2)
    tc.save_shard(str(tmp_path / "a.safetensors"), idx, lp, temperature=1.0)
    with pytest.raises(ValueError, match="holds top-2 teachers, not the top-4 expected"):
        tc.load_shard(str(tmp_path / "a.safetensors"), k=4)
    other = tc.CachedTeacher(idx, lp, 2.0)
    with pytest.raises(ValueError, match="mixes teachers of temperatures"):
        tc.collate([tc.load_shard(str(tmp_path / "a.safetensors")), other])
    from safetensors.torch import save_file
    save_file({"indices": idx}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="not a kl_ext teacher-cache shard"):
        tc.load_shard(str(tmp_path / "c.safetensors"))


def test_empty_slots_and_positions_add_nothing():
    # A position without entries (vLLM's first) and padded slots contribute no loss and no gradient.
    idx, lp = tc.from_vllm_prompt_logprobs([None, {3: Logprob(0.0, 1)}], 2)   # position 1: all mass on token 3
    x = torch.zeros(2, 5, requires_grad=True)
    loss = tc.CachedTeacher(idx, lp, 1.0).loss(x, temperature=1.0, reduction="none")
    assert loss[0] == 0 and math.isclose(float(loss[1].detach()), math.log(5), rel_tol=1e-6)
    loss.sum().backward()
    assert torch.all(x.grad[0] == 0)
