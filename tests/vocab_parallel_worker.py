"""One rank of tests/test_distributed.py's gloo group: runs every case on its shard of the vocabulary, compares
with the single-process float64 reference on the gathered rows, and writes {case: error message or None} as
JSON.  Usage: python vocab_parallel_worker.py RANK WORLD STORE_FILE OUT_FILE"""
import zlib

import torch
import torch.distributed as dist

import gloo_rank
from kl_ext import reference
from kl_ext._registry import REGISTRY, bind
from kl_ext.distributed import (vocab_parallel_divergence_with_logits, vocab_parallel_jsd_with_logits,
                                vocab_parallel_kl_div_with_logits)

SPLITS = {2: {"V37": [19, 18]}, 3: {"V1000": [334, 334, 332], "zero_shard": [7, 0, 6]}}
# Every registered divergence (its parameters inside their range, gloo_rank.divergence_params), and
# the named functions of the KL and the JSD.
KINDS = {name: {"divergence": name, **gloo_rank.divergence_params(name)} for name in REGISTRY}
KINDS.update({"kl_fn": {"direction": "forward"}, "kl_reverse_fn": {"direction": "reverse"},
              "jsd_fn": {"beta": 0.5}})
TARGET_TYPES = ("logits", "log_probs", "probs")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
LEAD = (2, 3)


def cases(world):
    """Every case id of a world size, and its settings."""
    out, i = {}, 0
    combos = [(red, masked) for red in REDUCTIONS for masked in (False, True)]
    for split in SPLITS[world]:
        for kind in KINDS:
            for tt in TARGET_TYPES:
                # The KL's and the JSD's functions: every reduction with and without a mask; the registry's
                # divergences: two of those combinations in turn (six of the eight over its target types).
                todo = combos if kind.endswith("_fn") else [combos[i % 8], combos[(i + 3) % 8]]
                i += 1
                for red, masked in todo:
                    out[f"{split}-{kind}-{tt}-{red}-{'mask' if masked else 'nomask'}-cpu"] = dict(
                        split=split, kind=kind, target_type=tt, reduction=red, masked=masked, backend="cpu",
                        dtype=torch.float32, temperature=1.0)
        if world == 2:
            for kind in KINDS:
                for tt in TARGET_TYPES:
                    out[f"{split}-{kind}-{tt}-none-mask-triton"] = dict(
                        split=split, kind=kind, target_type=tt, reduction="none", masked=True, backend="triton",
                        dtype=torch.float32, temperature=1.0)
        for dtype in (torch.bfloat16, torch.float64):
            out[f"{split}-kl-logits-batchmean-T2-{str(dtype)[6:]}-cpu"] = dict(
                split=split, kind="kl", target_type="logits", reduction="batchmean", masked=False, backend="cpu",
                dtype=dtype, temperature=2.0)
            out[f"{split}-jsd-logits-batchmean-T2-{str(dtype)[6:]}-cpu"] = dict(
                split=split, kind="jsd", target_type="logits", reduction="batchmean", masked=False,
                backend="cpu", dtype=dtype, temperature=2.0)
    return out


def full_rows(c, V):
    """The gathered rows every rank builds alike (same seed): student, teacher in its form, mask, grad weights."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((c["kind"], c["target_type"], c["reduction"], V)).encode()))
    x = torch.randn(*LEAD, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(*LEAD, V, generator=g, dtype=torch.float64) * 2
    if c["target_type"] == "probs":
        t = torch.softmax(t, -1)
    elif c["target_type"] == "log_probs":
        t = torch.log_softmax(t, -1)
    mask = (torch.rand(LEAD, generator=g) > 0.3) if c["masked"] else None
    w = torch.rand(LEAD, generator=g, dtype=torch.float64) + 0.5
    return x, t, mask, w


def loss_fn(c, vocab_parallel):
    kw = dict(KINDS[c["kind"]], target_type=c["target_type"], temperature=c["temperature"],
              reduction=c["reduction"])
    if vocab_parallel:
        fn = vocab_parallel_kl_div_with_logits if "direction" in kw else vocab_parallel_jsd_with_logits \
            if "divergence" not in kw else vocab_parallel_divergence_with_logits
        return lambda x, t, mask: fn(x, t, mask=mask, backend=c["backend"], **kw)
    name = kw.pop("divergence", None) or {"forward": "kl", "reverse": "reverse_kl"}.get(kw.pop("direction", None),
                                                                                      "jsd")
    fn = bind(name, alpha=kw.pop("alpha", None), beta=kw.pop("beta", None)).reference()
    return lambda x, t, mask: fn(x, t, mask=mask, **kw)


def backward_of(loss, w):
    return (loss * w.to(loss.dtype)).sum() if loss.dim() else loss * 1.7


def check(actual, expected, what, dtype):
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (2e-2, 2e-3) if dtype == torch.bfloat16 \
        else (1e-4, 2e-6)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run_case(c, rank, world):
    sizes = SPLITS[world][c["split"]]
    V, lo = sum(sizes), sum(sizes[:rank])
    hi = lo + sizes[rank]
    x, t, mask, w = full_rows(c, V)
    xr, tr = x.clone().requires_grad_(), t.clone().requires_grad_()
    ref = loss_fn(c, False)(xr, tr, mask)
    backward_of(ref, w).backward()
    xs = x[..., lo:hi].to(c["dtype"]).requires_grad_()
    ts = t[..., lo:hi].to(c["dtype"]).requires_grad_()
    got = loss_fn(c, True)(xs, ts, mask)
    assert got.dtype == (torch.float64 if c["dtype"] == torch.float64 else torch.float32), got.dtype
    backward_of(got, w).backward()
    check(got, ref, "loss", c["dtype"])
    check(xs.grad, xr.grad[..., lo:hi], "input gradient", c["dtype"])
    check(ts.grad, tr.grad[..., lo:hi], "target gradient", c["dtype"])


def special_cases(rank, world, group1):
    """Cases beyond the grid: DTensor, collectives counted, group of one, disagreeing ranks, identical rows."""
    out = {}
    case = gloo_rank.recorder(out)

    V = 37 if world == 2 else 1000
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, V, generator=gen)
    t = torch.randn(4, V, generator=gen)
    cols = torch.arange(V).chunk(world)[rank]
    lo, hi = int(cols[0]), int(cols[-1]) + 1

    @case("dtensor")
    def _():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (world,))
        xd = distribute_tensor(x.clone(), mesh, [Shard(-1)]).requires_grad_()
        td = distribute_tensor(t.clone(), mesh, [Shard(-1)])
        for fn, kw in ((vocab_parallel_kl_div_with_logits, {}), (vocab_parallel_jsd_with_logits, {"beta": 0.5})):
            xd.grad = None
            got = fn(xd, td, **kw)
            got.backward()
            xs = xd.to_local().detach().requires_grad_()
            plain = fn(xs, td.to_local(), **kw)
            plain.backward()
            assert torch.equal(got, plain), (got, plain)
            # By value, whatever the placement: torch 2.11 accumulates an unevenly sharded leaf's gradient as
            # Replicate (the full tensor on every rank), later versions as Shard(-1).
            assert torch.equal(xd.grad.full_tensor()[..., lo:hi], xs.grad)
            xr = x.double().requires_grad_()
            ref = (reference.kl_div_with_logits if not kw else reference.jsd_with_logits)(xr, t.double(), **kw)
            ref.backward()
            check(got, ref, "loss", torch.float32)
            check(xs.grad, xr.grad[:, lo:hi], "input gradient", torch.float32)

    @case("collectives")
    def _():
        xs, ts = x[:, lo:hi].clone().requires_grad_(), t[:, lo:hi].clone()
        calls = []
        real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tensor.numel() * tensor.element_size())
            return real(tensor, *args, **kwargs)

        rows = x.shape[0]
        # KL: maxima (rows x 2), sums (rows x 3 + 1); JSD: maxima, sums (rows x 2 + 1), loss sums (rows x 2);
        # float64. The ranks check: 2 int64 values first.
        for fn, want in ((vocab_parallel_kl_div_with_logits, [rows * 2 * 8, (rows * 3 + 1) * 8]),
                         (vocab_parallel_jsd_with_logits, [rows * 2 * 8, (rows * 2 + 1) * 8, rows * 2 * 8])):
            for check_ranks in (True, False):
                calls.clear()
                dist.all_reduce = counting
                try:
                    fn(xs, ts, check_ranks=check_ranks).backward()
                finally:
                    dist.all_reduce = real
                assert calls == [16] * check_ranks + want, (fn.__name__, calls, want)

    @case("group_of_one")
    def _():
        if group1 is None:
            return
        xs = x.clone().requires_grad_()
        got = vocab_parallel_kl_div_with_logits(xs, t, group=group1, direction="reverse")
        got.backward()
        xr = x.clone().requires_grad_()
        from kl_ext import kl_div_with_logits
        want = kl_div_with_logits(xr, t, direction="reverse")
        want.backward()
        assert torch.equal(got, want) and torch.equal(xs.grad, xr.grad)

    @case("ranks_disagree")
    def _():
        xs = torch.randn(3 + rank, hi - lo)
        try:
            vocab_parallel_kl_div_with_logits(xs, xs.clone())
        except ValueError as e:
            assert "disagree" in str(e), e
        else:
            raise AssertionError("no error for leading shapes that differ between ranks")

    @case("identical_rows_give_zero")
    def _():
        xs = x[:, lo:hi].clone()
        for kind, kw in KINDS.items():
            got = loss_fn(dict(kind=kind, target_type="logits", temperature=1.0, reduction="none", backend="cpu"),
                          True)(xs, xs.clone(), None)
            assert torch.equal(got, torch.zeros_like(got)), (kind, got)

    return out


if __name__ == "__main__":
    gloo_rank.main(cases, run_case, special_cases)
