"""Distillation on the users' own problems, with running code (the README's main job, part 1).

Answers, on CPU in well under two minutes:
  1. "how do I distil with KL?" — a teacher MLP on 2-D Gaussian blobs, a student distilled with
     kl_div_with_logits at T = 2 (+ the hard loss); the hand-composed nn.KLDivLoss pipeline gives the same
     loss at every step; and the same student trained with the generalized JSD (beta = 0.5, jsd_with_logits),
     the loss of on-policy distillation.
  2. "how do I use KL for multi-label soft targets like [0.99, 0.01, 0.99, 0.1, 0.1]?" — Bernoulli KL vs
     BCEWithLogitsLoss: identical gradients, but the KL goes to ~0 while BCE plateaus at the targets' entropy.
  3. "nn.KLDivLoss gives me a negative loss" / "mean or batchmean?" — each pitfall shown, and what kl_ext says.

    python examples/distill_demo.py [--steps 300] [--out demo_out]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import kl_ext

T = 2.0


def blobs(n, gen, device):
    centers = torch.tensor([[0.0, 2.0], [-1.8, -1.0], [1.8, -1.0]], device=device)
    y = torch.randint(0, 3, (n,), generator=gen, device=device)
    x = centers[y] + 0.9 * torch.randn(n, 2, generator=gen, device=device)
    return x, y


def mlp(hidden, out, gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, out))


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train(model, x, objective, steps, lr, bar):
    """Adam on objective(model(x)) -> (loss, value to log). Returns the logged values and the gradient of
    the model's first parameter at step 0."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    logged, first_grad = [], None
    for step in range(steps):
        opt.zero_grad()
        loss, value = objective(model(x))
        loss.backward()
        if step == 0:
            first_grad = next(model.parameters()).grad.clone()
        opt.step()
        logged.append(value.item())
        bar.update(1)
    return logged, first_grad


def multiclass(steps, device, bar):
    gen = torch.Generator(device=device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    xtr, ytr = blobs(2048, gen, device)
    xte, yte = blobs(2048, gen, device)
    teacher = mlp(64, 3, cpu_gen).to(device)
    ce = lambda logits: (F.cross_entropy(logits, ytr),) * 2  # noqa: E731
    train(teacher, xtr, ce, steps, 1e-2, bar)
    with torch.no_grad():
        t_logits = teacher(xtr)

    student0 = mlp(4, 3, cpu_gen).to(device)
    kldiv = nn.KLDivLoss(reduction="batchmean")

    def objective(soft_loss):
        def fn(s):
            soft = soft_loss(s)
            return 0.5 * F.cross_entropy(s, ytr) + 0.5 * T**2 * soft, soft
        return fn

    runs = {}
    for name, soft_loss in (("kl_ext", lambda s: kl_ext.kl_div_with_logits(s, t_logits, temperature=T)),
                            # what users write by hand
                            ("nn.KLDivLoss", lambda s: kldiv(F.log_softmax(s / T, -1), F.softmax(t_logits / T, -1)))):
        student = copy.deepcopy(student0)
        runs[name] = (student, train(student, xtr, objective(soft_loss), steps, 1e-2, bar)[0])
    diff = max(abs(a - b) for a, b in zip(runs["kl_ext"][1], runs["nn.KLDivLoss"][1]))
    jsd_student = copy.deepcopy(student0)
    jsd = lambda s: kl_ext.jsd_with_logits(s, t_logits, beta=0.5, temperature=T)  # noqa: E731
    jsd_curve = train(jsd_student, xtr, objective(jsd), steps, 1e-2, bar)[0]
    # Offline distillation from a cache: the teacher's top-2 log-probs per sample (of 3 classes), the rest of
    # its mass one "ghost" class. The same student, trained from the cache; its dense KL to the full teacher.
    idx, lp = kl_ext.topk_target(t_logits, 2, temperature=T)
    topk_student = copy.deepcopy(student0)
    topk = lambda s: kl_ext.sparse_kl_div_with_logits(s, idx, lp, temperature=T)  # noqa: E731
    topk_curve = train(topk_student, xtr, objective(topk), steps, 1e-2, bar)[0]
    with torch.no_grad():
        topk_dense = kl_ext.kl_div_with_logits(topk_student(xtr), t_logits, temperature=T).item()
    return {"topk_curve": topk_curve, "topk_dense_kl": topk_dense, "topk_student_acc": accuracy(topk_student, xte, yte),
            "teacher_acc": accuracy(teacher, xte, yte), "student_acc": accuracy(runs["kl_ext"][0], xte, yte),
            "kl_curve": runs["kl_ext"][1], "max_step_diff": diff, "jsd_curve": jsd_curve,
            "jsd_student_acc": accuracy(jsd_student, xte, yte)}


def multilabel(steps, device, bar):
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1024, 8, generator=gen, device=device)
    w_teacher = torch.randn(8, 5, generator=gen, device=device) * 1.5
    soft = torch.sigmoid(x @ w_teacher)          # a teacher's per-class probabilities, e.g. [0.99, 0.01, ...]
    entropy = -(torch.xlogy(soft, soft) + torch.xlogy(1 - soft, 1 - soft)).sum(-1).mean().item()
    torch.manual_seed(2)
    base = nn.Linear(8, 5).to(device)
    bce = nn.BCEWithLogitsLoss(reduction="sum")
    objectives = {"bernoulli KL": lambda z: (kl_ext.bernoulli_kl_div_with_logits(z, soft),) * 2,  # per-sample KL
                  "BCEWithLogits": lambda z: (bce(z, soft) / x.shape[0],) * 2}
    curves, grads = {}, {}
    for name, objective in objectives.items():
        curves[name], grads[name] = train(copy.deepcopy(base), x, objective, steps, 5e-2, bar)
    return {"entropy": entropy, "curves": curves,
            "grad_diff": (grads["bernoulli KL"] - grads["BCEWithLogits"]).abs().max().item(),
            "final_kl": curves["bernoulli KL"][-1], "final_bce": curves["BCEWithLogits"][-1]}


def pitfalls():
    """Each pitfall: what nn.KLDivLoss returns, and what kl_ext says with validate=True."""
    torch.manual_seed(0)
    s, t = torch.randn(64, 10), torch.randn(64, 10)
    multi = torch.tensor([0.99, 0.01, 0.99, 0.1, 0.1]).expand(64, 5)
    kd = lambda red: nn.KLDivLoss(reduction=red)  # noqa: E731
    out = []

    def says(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "(accepted)"

    out.append(("probabilities passed as the input (log-probs expected)",
                kd("batchmean")(F.softmax(s, -1), F.softmax(t, -1)).item(),
                "negative: it computed sum p (log p - q), not a KL",
                says(lambda: kl_ext.kl_div_with_logits(F.softmax(s, -1), t, validate=True))))
    out.append(("log-probs passed as the target (probs expected)",
                kd("batchmean")(F.log_softmax(s, -1), F.log_softmax(t, -1)).item(),
                "NaN: log of negative targets (log_target=True was needed)",
                says(lambda: kl_ext.kl_div_with_logits(s, F.log_softmax(t, -1), target_type="probs",
                                                       validate=True))))
    out.append(("reduction='mean' instead of 'batchmean'",
                kd("mean")(F.log_softmax(s, -1), F.softmax(t, -1)).item(),
                f"V = 10 times smaller than the KL per sample "
                f"({kd('batchmean')(F.log_softmax(s, -1), F.softmax(t, -1)).item():.4f}, kl_ext's default)",
                f"kl_ext batchmean: {kl_ext.kl_div_with_logits(s, t).item():.4f}"))
    out.append(("softmax KL on multi-label targets",
                kd("batchmean")(F.log_softmax(s[:, :5], -1), multi).item(),
                "a softmax forces the classes to compete; the targets are independent per class",
                says(lambda: kl_ext.kl_div_with_logits(s[:, :5], multi, target_type="probs", validate=True))))
    return out


def run(steps=300, out=None, device=None, show=True):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tqdm(total=7 * steps, desc="training", file=sys.stderr, disable=not show) as bar:
        mc = multiclass(steps, device, bar)
        ml = multilabel(steps, device, bar)
    with warnings.catch_warnings():  # torch's own warning about reduction='mean': the pitfall shown, and explained
        warnings.filterwarnings("ignore", message="reduction: 'mean' divides the total loss")
        shown = pitfalls()
    res = {"multiclass": mc, "multilabel": ml, "pitfalls": shown, "device": str(device),
           "backend": kl_ext._backends.resolve("auto", device)}
    if show:
        report(res)
    if out:
        os.makedirs(out, exist_ok=True)
        res["png"] = plot(res, os.path.join(out, "distill_demo.png"))
        if show:
            print(f"\nwrote {res['png']}")
    return res


def report(res):
    mc, ml = res["multiclass"], res["multilabel"]
    print(f"\ndevice {res['device']}, kl_ext backend {res['backend']!r}")
    print("\n1. Distillation, 3 Gaussian blobs, T = 2")
    print(f"   teacher test accuracy            {mc['teacher_acc']:.3f}   (chance 0.333)")
    print(f"   student test accuracy (distilled) {mc['student_acc']:.3f}")
    print(f"   kl_ext vs nn.KLDivLoss pipeline, max |loss difference| over {len(mc['kl_curve'])} steps: "
          f"{mc['max_step_diff']:.2e}")
    print(f"   student trained with the generalized JSD (beta 0.5) instead: accuracy {mc['jsd_student_acc']:.3f}, "
          f"JSD {mc['jsd_curve'][0]:.4f} -> {mc['jsd_curve'][-1]:.4f}")
    print(f"   student distilled from a cached top-2 teacher (sparse_kl_div_with_logits): accuracy "
          f"{mc['topk_student_acc']:.3f}, sparse KL {mc['topk_curve'][0]:.4f} -> {mc['topk_curve'][-1]:.4f}; its dense "
          f"KL to the full teacher {mc['topk_dense_kl']:.4f} (the dense-KL student's: {mc['kl_curve'][-1]:.4f})")
    print("\n2. Multi-label soft targets, 5 classes")
    print(f"   max |grad difference| Bernoulli KL vs BCEWithLogits at step 0: {ml['grad_diff']:.2e}")
    print(f"   final Bernoulli KL {ml['final_kl']:.4f}  (-> 0 at a perfect fit)")
    print(f"   final BCE          {ml['final_bce']:.4f}  (plateaus at the targets' entropy {ml['entropy']:.4f})")
    print("\n3. Pitfalls")
    for what, value, why, says in res["pitfalls"]:
        print(f"   - {what}: nn.KLDivLoss gives {value:.4f} -> {why}\n     {says}")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    # The top-2 curve equals the forward KL's here (3 classes: the tail bucket is exactly the third class), so it
    # is drawn dashed over a wider solid line: both stay visible.
    a.plot(res["multiclass"]["kl_curve"], linewidth=4, alpha=0.45, label="forward KL(teacher || student)")
    a.plot(res["multiclass"]["jsd_curve"], label="generalized JSD, beta 0.5")
    a.plot(res["multiclass"]["topk_curve"], linestyle="--", color="k", linewidth=1.2,
           label="sparse KL, cached top-2 teacher + tail\n(= the forward KL with 3 classes)")
    a.set_title("distillation at T=2: the soft loss each student trains on", fontsize=9)
    a.legend(fontsize=8)
    a.set_xlabel("training step")
    a.set_ylabel("loss per sample (nats, log scale)")
    a.set_yscale("log")
    for name, curve in res["multilabel"]["curves"].items():
        b.plot(curve, label=name)
    b.axhline(res["multilabel"]["entropy"], color="k", linestyle="--", label="targets' entropy")
    b.set_title("multi-label soft targets (per-sample loss)", fontsize=9)
    b.set_xlabel("training step")
    b.set_ylabel("loss per sample (nats)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    run(args.steps, args.out, args.device)
