"""One rank of tests/test_tp_linear_distillation.py's gloo group: runs every case of
vocab_parallel_linear_distillation_loss on its shard of the LM head, compares with linear_distillation_loss on the
gathered head in float64, and writes {case: error message or None} as JSON.
Usage: python tp_head_worker.py RANK WORLD STORE_FILE OUT_FILE"""
import zlib

import torch
import torch.distributed as dist

import gloo_rank
import kl_ext
from kl_ext._registry import REGISTRY
from kl_ext.distributed import VocabParallelLinearDistillationLoss, vocab_parallel_linear_distillation_loss

SPLITS = {2: {"V37": [19, 18]}, 3: {"V100": [34, 34, 32], "zero_shard": [7, 0, 6]}}
TEACHERS = ("hidden", "logits", "log_probs", "probs")
DIVERGENCES = tuple(REGISTRY)  # every registered divergence
REDUCTIONS = ("batchmean", "sum", "none")
CHUNKS = (1, 7, None)  # None: every row in one chunk here (the default for so few rows)
LEAD, H, H_T = (2, 5), 8, 12


def cases(world):
    """Every case id of a world size, and its settings: every teacher form x divergence, the reductions, options
    and chunk sizes rotating over them (each form meets every reduction); bf16 for a few."""
    out, i = {}, 0
    for split in SPLITS[world]:
        for teacher in TEACHERS:
            for div in DIVERGENCES:
                red = REDUCTIONS[(i + i // 3) % 3]  # against chunk i % 3: every pair in nine cases
                c = dict(split=split, teacher=teacher, divergence=div, reduction=red, chunk=CHUNKS[i % 3],
                         dtype=torch.float32, bias=i % 2 == 0, labels=i % 4 in (1, 2), mask=i % 3 == 1,
                         softcap=5.0 if i % 5 == 2 else None, logit_scale=0.7 if i % 5 == 3 else 1.0,
                         temperature=2.0 if i % 2 else 1.0)
                out[f"{split}-{teacher}-{div}-{red}-chunk{c['chunk']}"] = c
                i += 1
        for teacher in ("hidden", "logits"):
            for div in DIVERGENCES[teacher == "logits"::2]:
                out[f"{split}-{teacher}-{div}-batchmean-bf16"] = dict(
                    split=split, teacher=teacher, divergence=div, reduction="batchmean", chunk=7,
                    dtype=torch.bfloat16, bias=True, labels=True, mask=False, softcap=None, logit_scale=1.0,
                    temperature=1.0)
    return out


def make(c, V):
    """The whole problem every rank builds alike (same seed), in float64."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(sorted((k, str(v)) for k, v in c.items())).encode()))
    d = torch.float64
    x = torch.randn(*LEAD, H, generator=g, dtype=d)
    w = torch.randn(V, H, generator=g, dtype=d) * 0.5
    b = torch.randn(V, generator=g, dtype=d) * 0.1 if c["bias"] else None
    t = dict()
    if c["teacher"] == "hidden":
        t = dict(target=torch.randn(*LEAD, H_T, generator=g, dtype=d),
                 target_linear_weight=torch.randn(V, H_T, generator=g, dtype=d) * 0.4,
                 target_linear_bias=torch.randn(V, generator=g, dtype=d) * 0.1 if c["bias"] else None)
    else:
        z = torch.randn(*LEAD, V, generator=g, dtype=d) * 2
        t = dict(target={"logits": z, "log_probs": z.log_softmax(-1), "probs": z.softmax(-1)}[c["teacher"]],
                 target_type=c["teacher"])
    labels = torch.randint(0, V, LEAD, generator=g) if c["labels"] else None
    if labels is not None:
        labels[0, 1] = -100  # ignored
    mask = (torch.rand(LEAD, generator=g) > 0.3) if c["mask"] else None
    row_w = torch.rand(LEAD, generator=g, dtype=d) + 0.5
    return x, w, b, t, labels, mask, row_w


def options(c):
    return dict(divergence=c["divergence"], **gloo_rank.divergence_params(c["divergence"]),
                temperature=c["temperature"], softcap=c["softcap"],
                logit_scale=c["logit_scale"], hard_weight=0.5 if c["labels"] else 0.0, reduction=c["reduction"],
                chunk_size=c["chunk"], backend="cpu")


def backward_of(loss, row_w):
    return (loss * row_w.to(loss.dtype)).sum() if loss.dim() else loss * 1.7


def check(actual, expected, what, dtype):
    # Relative to the largest entry: bf16 logits round at ~4e-3 of their size.
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.double().abs().max().item() if expected.numel() else 0.0, 1e-6)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def shard(v, lo, hi, dtype):
    return None if v is None else v[lo:hi].to(dtype)


def run_case(c, rank, world):
    sizes = SPLITS[world][c["split"]]
    V, lo = sum(sizes), sum(sizes[:rank])
    hi = lo + sizes[rank]
    x, w, b, t, labels, mask, row_w = make(c, V)
    # Expected: the single-device loss on the whole head, materialized (the reference), in float64.
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if b is not None else None
    ref = kl_ext.linear_distillation_loss(xr, wr, t["target"], linear_bias=br, labels=labels, mask=mask,
                                          **{k: v for k, v in t.items() if k != "target"},
                                          **{**options(c), "backend": "torch"})
    backward_of(ref, row_w).backward()
    # This rank: its shard of the head (and of a dense teacher), in the case's dtype.
    dt = c["dtype"]
    xs, ws = x.to(dt).requires_grad_(), w[lo:hi].to(dt).requires_grad_()
    bs = b[lo:hi].to(dt).requires_grad_() if b is not None else None
    if c["teacher"] == "hidden":
        teacher = dict(target=t["target"].to(dt), target_linear_weight=shard(t["target_linear_weight"], lo, hi, dt),
                       target_linear_bias=shard(t["target_linear_bias"], lo, hi, dt))
    else:
        teacher = dict(target=t["target"][..., lo:hi].to(dt), target_type=t["target_type"])
    got = vocab_parallel_linear_distillation_loss(xs, ws, teacher.pop("target"), linear_bias=bs, labels=labels,
                                                  mask=mask, **teacher, **options(c))
    assert got.dtype == torch.float32, got.dtype
    backward_of(got, row_w).backward()
    check(got, ref, "loss", dt)
    check(xs.grad, xr.grad, "input gradient", dt)
    check(ws.grad, wr.grad[lo:hi], "weight gradient", dt)
    if b is not None:
        check(bs.grad, br.grad[lo:hi], "bias gradient", dt)


def special_cases(rank, world, group1):
    """DTensor weights, the collectives counted, peak memory per chunk, a group of one, the Module, bad input."""
    out = {}
    case = gloo_rank.recorder(out)

    V = 37 if world == 2 else 100
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(12, H, generator=gen)
    w = torch.randn(V, H, generator=gen)
    tx, tw = torch.randn(12, H_T, generator=gen), torch.randn(V, H_T, generator=gen)
    labels = torch.randint(0, V, (12,), generator=gen)
    cols = torch.arange(V).chunk(world)[rank]
    lo, hi = int(cols[0]), int(cols[-1]) + 1

    def whole():
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = kl_ext.linear_distillation_loss(xr, wr, tx, target_linear_weight=tw, labels=labels, hard_weight=0.3,
                                              divergence="jsd", chunk_size=5)
        ref.backward()
        return ref, xr.grad, wr.grad[lo:hi]

    @case("dtensor")
    def _():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (world,))
        xs = x.clone().requires_grad_()
        wd = distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_()
        twd = distribute_tensor(tw.clone(), mesh, [Shard(0)])
        got = vocab_parallel_linear_distillation_loss(xs, wd, tx, target_linear_weight=twd, labels=labels,
                                                      hard_weight=0.3, divergence="jsd", chunk_size=5)
        got.backward()
        ref, gx, gw = whole()
        check(got, ref, "loss", torch.float32)
        check(xs.grad, gx, "input gradient", torch.float32)
        check(wd.grad.full_tensor()[lo:hi], gw, "weight gradient", torch.float32)

    @case("module")
    def _():
        xs, ws = x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
        loss = VocabParallelLinearDistillationLoss(divergence="jsd", hard_weight=0.3, chunk_size=5)
        got = loss(xs, ws, tx, target_linear_weight=tw[lo:hi], labels=labels)
        got.backward()
        ref, gx, gw = whole()
        check(got, ref, "loss", torch.float32)
        check(xs.grad, gx, "input gradient", torch.float32)
        check(ws.grad, gw, "weight gradient", torch.float32)

    @case("collectives")
    def _():
        # Per chunk of c rows: KL 2 all-reduces (maxima c x 2, sums c x 3 + 1, float64), JSD 3 (c x 2, c x 2 + 1,
        # c x 2), the hard loss 2 (c, c x 2, fp32), the input gradient 1 (c x H): O(chunk) elements, none O(V).
        # Before the chunks one all-gather of the shard widths (and the ranks check, 2 int64, when asked).
        chunk, rows = 5, x.shape[0]
        real_reduce, real_gather = dist.all_reduce, dist.all_gather
        for div, per_chunk in (("kl", lambda c: [c * 2 * 8, (c * 3 + 1) * 8]),
                               ("jsd", lambda c: [c * 2 * 8, (c * 2 + 1) * 8, c * 2 * 8])):
            for check_ranks in (True, False):
                calls = []

                def counting_reduce(tensor, *args, **kwargs):
                    calls.append(("all_reduce", tensor.numel() * tensor.element_size()))
                    return real_reduce(tensor, *args, **kwargs)

                def counting_gather(tensors, tensor, *args, **kwargs):
                    calls.append(("all_gather", tensor.numel() * tensor.element_size()))
                    return real_gather(tensors, tensor, *args, **kwargs)

                dist.all_reduce, dist.all_gather = counting_reduce, counting_gather
                try:
                    xs = x.clone().requires_grad_()
                    vocab_parallel_linear_distillation_loss(
                        xs, w[lo:hi].clone().requires_grad_(), tx, target_linear_weight=tw[lo:hi], labels=labels,
                        hard_weight=0.3, divergence=div, chunk_size=chunk, check_ranks=check_ranks).backward()
                finally:
                    dist.all_reduce, dist.all_gather = real_reduce, real_gather
                want = [("all_reduce", 16)] * check_ranks + [("all_gather", 8)]
                for s in range(0, rows, chunk):
                    c = min(chunk, rows - s)
                    want += [("all_reduce", n) for n in per_chunk(c) + [c * 4, c * 2 * 4, c * H * 4]]
                assert calls == want, (div, calls, want)

    @case("peak_memory_per_chunk")
    def _():
        # Beyond the inputs and the returned gradients, a few (chunk x V_r) tensors: never (rows x V_r).
        from benchmarks.common import peak_tensor_bytes
        rows, hidden, vocab, chunk = 512, 64, 4000 * world, 16
        g = torch.Generator().manual_seed(3)
        xs = torch.randn(rows, hidden, generator=g, requires_grad=True)
        ws = torch.randn(vocab // world, hidden, generator=g, requires_grad=True)
        ts = torch.randn(rows, vocab // world, generator=g)
        lab = torch.randint(0, vocab, (rows,), generator=g)

        def step():
            vocab_parallel_linear_distillation_loss(xs, ws, ts, labels=lab, hard_weight=0.5, chunk_size=chunk,
                                                    check_ranks=False).backward()
        grads = (xs.numel() + 2 * ws.numel()) * 4
        peak = peak_tensor_bytes(step)
        assert peak <= grads + 6 * chunk * (vocab // world) * 4 + (1 << 16), peak
        assert peak < rows * (vocab // world) * 4 / 2, peak

    @case("group_of_one")
    def _():
        if group1 is None:
            return
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        got = vocab_parallel_linear_distillation_loss(xs, ws, tx, target_linear_weight=tw, group=group1)
        got.backward()
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        want = kl_ext.linear_distillation_loss(xr, wr, tx, target_linear_weight=tw)
        want.backward()
        assert torch.equal(got, want) and torch.equal(xs.grad, xr.grad) and torch.equal(ws.grad, wr.grad)

    @case("bad_input")
    def _():
        ws = w[lo:hi]
        for kw, msg in ((dict(target_indices=torch.zeros(12, 2, dtype=torch.int64)), "top-k teacher"),
                        (dict(reduction="mean"), "'mean' has no meaning")):
            try:
                vocab_parallel_linear_distillation_loss(x, ws, tx, target_linear_weight=tw[lo:hi], **kw)
            except ValueError as e:
                assert msg in str(e), e
            else:
                raise AssertionError(f"no error for {kw}")

    return out


if __name__ == "__main__":
    gloo_rank.main(cases, run_case, special_cases)
