"""kl_ext.integrations.trl against TRL's own GKDTrainer.generalized_jsd_loss on the same inputs: loss and student
gradient to fp32 accuracy, every beta edge, temperature, labels, reduction and num_items_in_batch (skipped when trl
is not installed; requirements-dev.txt installs it)."""
import os

import pytest
import torch

from kl_ext.integrations import trl as kl_trl
from conftest import backend_params

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="module")
def trl_loss():
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 5, 37, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(3, 5, 37, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, 37, (3, 5), generator=g)
    labels[0, 3:] = -100
    labels[2, 0] = -100
    return s, t, labels


def _grad(fn, s, t, **kw):
    s = s.detach().clone().requires_grad_()
    out = fn(s, t, **kw)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype) + 2
    (g,) = torch.autograd.grad(out, s, go)
    return out.detach(), g


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none", "items"])
def test_generalized_jsd_loss_is_trls(trl_loss, require_backend, backend, beta, temperature, with_labels,
                                      reduction):
    require_backend(backend)
    s, t, labels = _inputs()
    kw = dict(labels=labels if with_labels else None, beta=beta, temperature=temperature)
    if reduction == "items":  # TRL's gradient-accumulation normalizer replaces the reduction
        kw["num_items_in_batch"] = torch.tensor(23)
    else:
        kw["reduction"] = reduction
    exp = _grad(trl_loss, s, t, **kw)
    got = _grad(lambda a, b, **k: kl_trl.generalized_jsd_loss(a, b, backend=backend, **k), s, t, **kw)
    for a, e, what in zip(got, exp, ("loss", "student gradient")):
        assert a.shape == e.shape and a.dtype == e.dtype, what
        # To fp32 accuracy relative to the largest entry (the triton kernels reduce float64 rows in float32).
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-6 * float(e.abs().max()), msg=lambda m: f"{what}: {m}")


def test_float32_logits_and_the_hooks(trl_loss):
    s, t, labels = _inputs(torch.float32)
    for beta in (0.0, 0.3, 1.0):
        torch.testing.assert_close(kl_trl.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=2.0),
                                   trl_loss(s, t, labels=labels, beta=beta, temperature=2.0), rtol=2e-5, atol=1e-7)
    from trl.experimental.gkd import GKDTrainer

    class Fused(kl_trl.FusedGeneralizedJSD, GKDTrainer):
        pass
    assert Fused.generalized_jsd_loss is kl_trl.generalized_jsd_loss

    class Patched(GKDTrainer):
        pass
    assert kl_trl.patch(Patched).generalized_jsd_loss is kl_trl.generalized_jsd_loss
    assert GKDTrainer.generalized_jsd_loss is trl_loss  # the base class is left alone


def test_hf_trainer_example_distils(tmp_path):
    # examples/hf_trainer_distill.py: a Trainer subclass with linear_distillation_loss, then the offline path
    # through a teacher-cache shard; both students end closer to the data than they started.
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    import importlib.util
    import time
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "hf_trainer_distill.py")
    spec = importlib.util.spec_from_file_location("hf_trainer_distill", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    start = time.perf_counter()
    res = example.main(steps=20, out=str(tmp_path))
    print(f"examples/hf_trainer_distill.py: {time.perf_counter() - start:.1f} s")
    assert (tmp_path / "teacher_top8.safetensors").exists()
    before = res["student before"]
    assert res["online (linear_distillation_loss)"] < before - 0.5
    assert res["offline (top-8 cache, sparse KL)"] < before - 0.5


# transformers' own deprecation, raised inside TRL's GKDConfig: not ours to fix.
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_gkd_trainer_step_with_the_drop_in(tmp_path, monkeypatch):
    # A TRL GKDTrainer step (tiny Llama models from configs, a word-level tokenizer built here: nothing downloaded)
    # with the mixin installed: the step runs kl_ext's fused op and moves the student, and the trainer's loss on a
    # batch is TRL's own formula's on the same logits.
    gkd = pytest.importorskip("trl.experimental.gkd")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    datasets = pytest.importorskip("datasets")
    V, L = 48, 12
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                                     unk_token="[UNK]")

    def llama(seed, hidden):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=2 * L, pad_token_id=0, eos_token_id=2))

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(4):
        ids = torch.randint(3, V, (L,), generator=g)
        labels = ids.clone()
        labels[:4] = -100  # the prompt
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * L, "labels": labels.tolist()})

    def collate(batch):
        return {k: torch.tensor([r[k] for r in batch]) for k in ("input_ids", "attention_mask", "labels")}

    class Fused(kl_trl.FusedGeneralizedJSD, gkd.GKDTrainer):
        pass

    calls = []

    def counted(*a, **k):
        calls.append(a[0].shape)
        return jsd_with_logits(*a, **k)
    jsd_with_logits = kl_trl.jsd_with_logits
    monkeypatch.setattr(kl_trl, "jsd_with_logits", counted)
    student, teacher = llama(0, 16), llama(1, 32)
    args = gkd.GKDConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, lmbda=0.0, beta=0.5,
                         learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                         max_length=L)
    trainer = Fused(model=student, teacher_model=teacher, args=args, data_collator=collate,
                    train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    batch = collate(rows)
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, dict(batch))
        s = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        want = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=batch["labels"][:, 1:], beta=0.5)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert calls == [(4, L - 1, V)] * 2  # the loss above, then the training step's
