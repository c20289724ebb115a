"""The CUDA backend's kernels, executed on the CPU: csrc/cuda/<op>.cuh built against tests/cuda_emu/cuda_emu.h
(each CUDA thread a CPU thread, real barriers and warp shuffles) and registered as torch.ops.kl_ext_cuda_emu.*
with the real ops' schemas. Shapes and engine limits (KL_EXT_CUDA_ROWS) are chosen to reach every launch
configuration (rows held with 1, 2, 4 and 8 packs per thread, in one block or a cluster of 2 - 16, streamed rows,
16-byte packs and unaligned rows, blocks looping over rows).
Compared with the float64 reference (kl_ext.reference). tests/test_gpu.py runs the same kernels on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from kl_ext import reference
from conftest import TOL, assert_close_rel
from test_kl_div_with_logits import make_case

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TARGET_TYPES = ["logits", "log_probs", "probs"]
# Every target type in float32 and bfloat16 (the two pack widths); float16 and float64 (the same code over another
# element type) through one each: CI time.
CASES = [(d, tt) for d in DTYPES[:2] for tt in TARGET_TYPES] + [(torch.float16, "probs"), (torch.float64, "log_probs")]


def kl_expected(x, t, mask, target_type, temperature, direction, gs):
    """Row losses and the gradients of their sum times gs, from the float64 reference."""
    x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
    rows = reference.kl_div_with_logits(x64, t64, target_type=target_type, temperature=temperature,
                                        direction=direction, reduction="none", mask=mask)
    gx, gt = torch.autograd.grad(rows.sum() * gs, (x64, t64))
    return rows.detach(), gx, gt


def check_grads(got, exp, dtype, what):
    # As in test_kl_div_with_logits: a 16-bit gradient can only be as good as the exact one rounded to it.
    floor = (exp.to(dtype).double() - exp).abs().max() / exp.abs().max().clamp(min=1e-30)
    assert_close_rel(got, exp, TOL[dtype][1] + 2 * float(floor), what)


# (rows, V): V=1 and odd V stream in 1-element packs; the rest (16-byte packs) are held with the most packs per
# thread that leave a block of >= 128 threads (fp32 / bf16: 20, 64, 1000 one pack per thread; 4000 four / two;
# 2100 four (fp32); 9000 eight, fp32 over a cluster of 2; 33000 eight over a cluster of 8 / 4; 70000 a cluster of
# 8, fp32 in blocks of 288 threads); float64 streams. 70 rows: blocks loop over rows (the emulated grid limit is 4).
KL_SHAPES = [(3, 1), (5, 37), (70, 20), (24, 1000), (4, 64), (3, 2100), (3, 2101), (3, 4000), (3, 9000), (2, 33000),
             (2, 70000)]
# The teacher's form changes the per-element math, not the launch: every shape for logits, and for log-probs and
# probs one of each kind (1-element packs, blocks looping over rows, held in one block, over a cluster; with
# ENGINE_TUNES: clusters of 2 - 16 and streamed). CI time.
KL_SHAPES_FORMS = [(5, 37), (70, 20), (3, 4000), (3, 9000)]
# Engine limits (KL_EXT_CUDA_ROWS) and whether the device has clusters: the defaults; no clusters (one block of up
# to 512 threads, else streamed); blocks of 32 threads and 2 packs, which take clusters of 2 - 16 (16 opted into).
ENGINE_TUNES = [(None, True), (None, False), ("threads=32,items=2,cluster=16", True)]


def tuned(emu, monkeypatch, tune, clusters, call):
    """call() with the engine limits `tune` (KL_EXT_CUDA_ROWS; None: the defaults) on a device with or without
    clusters."""
    if tune:
        monkeypatch.setenv("KL_EXT_CUDA_ROWS", tune)
    else:
        monkeypatch.delenv("KL_EXT_CUDA_ROWS", raising=False)
    emu.set_device(1, clusters)
    try:
        return call()
    finally:
        emu.set_device(1, True)


def engine_runs(emu, monkeypatch, dtype, V, call):
    """call() under every engine configuration of ENGINE_TUNES for the fp32 and bf16 kernels in 16-byte packs, the
    defaults only for the others (CI time): yields (what, call's result)."""
    tunes = ENGINE_TUNES if dtype in (torch.float32, torch.bfloat16) and V % 8 == 0 else ENGINE_TUNES[:1]
    for tune, clusters in tunes:
        yield f"{tune=} {clusters=}", tuned(emu, monkeypatch, tune, clusters, call)


@pytest.mark.parametrize("dtype,target_type", CASES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_kernels_match_reference(emu, dtype, target_type, direction, monkeypatch):
    for i, (N, V) in enumerate(KL_SHAPES if target_type == "logits" else KL_SHAPES_FORMS):
        x, t, _ = make_case((N, V), target_type, dtype, seed=i)
        mask = torch.arange(N) % 3 != 1
        gs = torch.tensor(0.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        rloss, rgx, rgt = kl_expected(x, t, mask, target_type, 1.5, direction, 0.5)
        runs = engine_runs(emu, monkeypatch, dtype, V,
                           lambda: emu.kl_div_with_logits_fwd(x, t, mask, target_type, 1.5, direction, True, True, gs))
        for how, (loss, gx, gt) in runs:
            what = f"{N}x{V} {how}"
            assert loss.dtype == gs.dtype and gx.dtype == dtype and gt.dtype == dtype
            assert_close_rel(loss, rloss, TOL[dtype][0], "loss " + what)
            check_grads(gx, rgx, dtype, "grad input " + what)
            check_grads(gt, rgt, dtype, "grad target " + what)


# The divergences (DivergenceLoss: csrc/divergences.h's terms) run the KL's row engine with one more reduction:
# held (1, 2, 4, 8 packs; fp32 9000 and 33000 over clusters of 2 and 8) and streamed (1-element packs; float64).
JSD_SHAPES = [(3, 1), (5, 37), (70, 20), (4, 1000), (3, 2101), (2, 9000), (2, 33000)]
JSD_SHAPES_FORMS = [(5, 37), (70, 20), (4, 1000), (2, 9000)]  # log-probs and probs: as KL_SHAPES_FORMS


def check_divergence_kernels(emu, dtype, target_type, divergence, params, ref):
    """The emulated divergence_with_logits_fwd of `divergence` over JSD_SHAPES (logits; the other teacher forms
    JSD_SHAPES_FORMS), params in turn, against
    ref(x, t, param, **reference options) in float64; forward only, streamed; identical rows exactly 0. Each
    divergence's tests call it (the JSD here, the others in their own test files)."""
    for i, (N, V) in enumerate(JSD_SHAPES if target_type == "logits" else JSD_SHAPES_FORMS):
        x, t, _ = make_case((N, V), target_type, dtype, seed=i)
        mask = torch.arange(N) % 3 != 1
        param = params[i % len(params)]
        gs = torch.tensor(0.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
        rows = ref(x64, t64, param, target_type=target_type, temperature=1.5, reduction="none", mask=mask)
        rgx, rgt = torch.autograd.grad(rows.sum() * 0.5, (x64, t64))
        loss, gx, gt = emu.divergence_with_logits_fwd(x, t, mask, target_type, 1.5, divergence, param, True, True,
                                                      gs)
        what = f"{divergence} {N}x{V} param={param}"
        assert_close_rel(loss, rows.detach(), TOL[dtype][0], "loss " + what, atol=1e-6)
        check_grads(gx, rgx, dtype, "grad input " + what)
        check_grads(gt, rgt, dtype, "grad target " + what)
    x, t, _ = make_case((3, 5000), "logits", torch.float32)  # forward only, streamed
    loss, gx, _ = emu.divergence_with_logits_fwd(x, t, None, "logits", 1.0, divergence, params[0], False, False,
                                                 None)
    assert gx.numel() == 0
    assert_close_rel(loss, ref(x.double(), t.double(), params[0], reduction="none"), 2e-5)
    assert torch.equal(emu.divergence_with_logits_fwd(x, x, None, "logits", 1.0, divergence, params[0], False,
                                                      False, None)[0], torch.zeros(3))  # identical rows: exactly 0


@pytest.mark.parametrize("dtype,target_type", CASES, ids=str)
def test_jsd_kernels_match_reference(emu, dtype, target_type):
    check_divergence_kernels(emu, dtype, target_type, "jsd", (0.1, 0.5, 0.9),
                             lambda x, t, beta, **kw: reference.jsd_with_logits(x, t, beta=beta, **kw))


@pytest.mark.parametrize("V", [37, 2100, 70000])
def test_kl_kernels_without_gradients_and_grad_scale(emu, V):
    x, t, _ = make_case((3, V), "logits", torch.float32)
    rloss, rgx, _ = kl_expected(x, t, None, "logits", 1.0, "forward", 1.0)
    loss, gx, gt = emu.kl_div_with_logits_fwd(x, t, None, "logits", 1.0, "forward", False, False, None)
    assert gx.numel() == 0 and gt.numel() == 0
    assert_close_rel(loss, rloss, TOL[torch.float32][0], "loss only")
    loss2, gx, gt = emu.kl_div_with_logits_fwd(x, t, None, "logits", 1.0, "forward", True, False, None)
    # Without gradients long rows stream (one read); with them they stream twice.
    assert_close_rel(loss2, rloss, TOL[torch.float32][0], "loss with grad input")
    assert gt.numel() == 0
    check_grads(gx, rgx, torch.float32, "grad input, grad_scale absent")


def test_kl_kernels_edge_rows(emu):
    import kl_ext._C  # noqa: F401  (the CPU op, the reference for these conventions)
    # Identical rows -> exactly 0; rows with no mass follow the CPU kernel's conventions (README "Semantics"),
    # down to the NaN gradients of an infinite KL.
    inf = float("inf")
    V = 40
    x = torch.randn(5, V)
    t = torch.randn(5, V)
    t[0] = x[0]                 # identical
    x[1] = -inf                 # student without mass
    t[2] = -inf                 # teacher without mass
    x[3] = -inf
    t[3] = -inf                 # neither
    x[4, :7] = -inf             # student -inf where the teacher has mass
    for direction in ("forward", "reverse"):
        got = emu.kl_div_with_logits_fwd(x, t, None, "logits", 1.0, direction, True, True, None)
        exp = torch.ops.kl_ext.kl_div_with_logits_fwd(x, t, None, "logits", 1.0, direction, True, True, None)
        assert got[0][0] == 0
        for a, b, what in zip(got, exp, ("loss", "grad input", "grad target")):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, equal_nan=True, msg=f"{direction} {what}")


def test_kl_kernels_unaligned_rows_and_determinism(emu):
    # A view starting 4 bytes into its storage cannot use 16-byte packs: the 1-element path must take it.
    N, V = 4, 2048
    buf = torch.randn(N * V + 1)
    x = buf[1:].view(N, V)
    t = torch.randn(N, V)
    a = emu.kl_div_with_logits_fwd(x, t, None, "logits", 2.0, "reverse", True, True, None)
    b = emu.kl_div_with_logits_fwd(x.clone(), t, None, "logits", 2.0, "reverse", True, True, None)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-8)
    c = emu.kl_div_with_logits_fwd(x, t, None, "logits", 2.0, "reverse", True, True, None)
    assert all(torch.equal(u, v) for u, v in zip(a, c))  # bitwise, run to run


def bernoulli_expected(x, t, weight, pos_weight, target_type, temperature, entropy):
    x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
    w = weight.double() if weight is not None else None
    if entropy:
        elem = reference.bernoulli_kl_div_with_logits(x64, t64, target_type=target_type, temperature=temperature,
                                                      weight=w, reduction="none")
    else:
        pw = pos_weight.double() if pos_weight is not None else None
        elem = F.binary_cross_entropy_with_logits(x64 / temperature, t64, weight=w, pos_weight=pw,
                                                  reduction="none")
    return (elem.detach(), *torch.autograd.grad(elem.sum() * 0.25, (x64, t64)))


# C: 1 lane per row (C <= 8) up to a whole warp (C > 128); 300 rows of 5 classes make blocks loop.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["kl_probs", "kl_logits", "bce", "bce_pos_weight"])
@pytest.mark.parametrize("N,C", [(300, 5), (9, 1), (17, 37), (6, 300), (4, 1000)])
def test_bernoulli_kernels_match_reference(emu, dtype, kind, N, C):
    gen = torch.Generator().manual_seed(C)
    x = (torch.randn(N, C, generator=gen, dtype=torch.float64) * 3).to(dtype)
    u = torch.randn(N, C, generator=gen, dtype=torch.float64) * 2
    target_type = "logits" if kind == "kl_logits" else "probs"
    # Targets stay off 0 and 1 (in bfloat16 too), where the target gradient of the entropy is infinite.
    t = (u if target_type == "logits" else u.sigmoid().clamp(0.01, 0.99)).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(C, generator=gen, dtype=torch.float64).to(acc) + 0.5
    pos_weight = None
    if kind == "bce_pos_weight":
        pos_weight = torch.rand(N * C, generator=gen, dtype=torch.float64).to(acc) * 3
    entropy = kind.startswith("kl")
    temperature = 1.0 if kind.startswith("bce") else 1.7
    gs = torch.tensor(0.25, dtype=acc)
    exp = bernoulli_expected(x, t, weight, pos_weight.view(N, C) if pos_weight is not None else None,
                             target_type, temperature, entropy)
    for elementwise in (True, False):
        loss, gx, gt = emu.bernoulli_kl_div_with_logits_fwd(x, t, weight, pos_weight, target_type, temperature,
                                                            entropy, elementwise, True, True, gs)
        assert loss.dtype == acc and gx.dtype == dtype
        assert_close_rel(loss, exp[0] if elementwise else exp[0].sum(-1), TOL[dtype][0], f"loss {elementwise=}")
        check_grads(gx, exp[1], dtype, "grad input")
        check_grads(gt, exp[2], dtype, "grad target")


# Input and target in different dtypes, each read in its own (Pack<target_t>, pair_vec): every pair, through the
# resident rows with packs (4 x 1000), 1-element packs (5 x 37, and targets whose rows start off a pack boundary),
# blocks looping over rows (70 x 20) and streamed rows (2 x 9000); KL, JSD, Bernoulli KL and BCE.
MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
         (torch.float32, torch.float16)]


@pytest.mark.parametrize("xd,td", MIXED, ids=str)
def test_mixed_dtype_pairs_match_reference(emu, xd, td):
    half = xd if xd != torch.float32 else td
    gs = torch.tensor(0.5)
    for i, (N, V, skew) in enumerate([(70, 20, 0), (5, 37, 0), (4, 1000, 1), (4, 1000, 0), (2, 9000, 0)]):
        target_type, direction = TARGET_TYPES[i % 3], ("forward", "reverse")[i % 2]
        x, t, _ = make_case((N, V + skew), target_type, torch.float64, seed=i)
        x, t = x[:, skew:].to(xd), t[:, skew:].to(td)  # skew: rows start one element past a pack boundary
        mask = torch.arange(N) % 3 != 1
        what = f"{N}x{V} {skew=} {target_type} {direction}"
        rloss, rgx, rgt = kl_expected(x, t, mask, target_type, 1.5, direction, 0.5)
        loss, gx, gt = emu.kl_div_with_logits_fwd(x, t, mask, target_type, 1.5, direction, True, True, gs)
        assert loss.dtype == torch.float32 and gx.dtype == xd and gt.dtype == td
        assert_close_rel(loss, rloss, TOL[half][0], "KL loss " + what)
        check_grads(gx, rgx, xd, "KL grad input " + what)
        check_grads(gt, rgt, td, "KL grad target " + what)
        x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
        rows = reference.jsd_with_logits(x64, t64, beta=0.3, target_type=target_type, temperature=1.5,
                                         reduction="none", mask=mask)
        rgx, rgt = torch.autograd.grad(rows.sum() * 0.5, (x64, t64))
        loss, gx, gt = emu.divergence_with_logits_fwd(x, t, mask, target_type, 1.5, "jsd", 0.3, True, True, gs)
        assert gx.dtype == xd and gt.dtype == td
        assert_close_rel(loss, rows.detach(), TOL[half][0], "JSD loss " + what, atol=1e-6)
        check_grads(gx, rgx, xd, "JSD grad input " + what)
        check_grads(gt, rgt, td, "JSD grad target " + what)
        p = t.float().sigmoid().clamp(0.01, 0.99).to(td)
        for entropy in (True, False):
            exp = bernoulli_expected(x, p, None, None, "probs", 1.0, entropy)
            loss, gx, gt = emu.bernoulli_kl_div_with_logits_fwd(x, p, None, None, "probs", 1.0, entropy, True, True,
                                                                True, gs.new_tensor(0.25))
            assert gx.dtype == xd and gt.dtype == td
            assert_close_rel(loss, exp[0], TOL[half][0], f"Bernoulli loss {entropy=} " + what)
            check_grads(gx, exp[1], xd, f"Bernoulli grad input {entropy=} " + what)
            check_grads(gt, exp[2], td, f"Bernoulli grad target {entropy=} " + what)


def test_bernoulli_kernels_exactly_zero_when_matched(emu):
    x = torch.randn(7, 33)
    loss, _, _ = emu.bernoulli_kl_div_with_logits_fwd(x, x, None, None, "logits", 1.0, True, False, False, False,
                                                      None)
    assert torch.equal(loss, torch.zeros(7))


# Each launch path of the row engine once, at the smallest shape that takes it (scripts/sanitize.sh runs these under
# AddressSanitizer and ThreadSanitizer, where a CUDA thread is an instrumented OS thread): (tune, clusters, rows, V,
# what). Blocks of 32 threads and 2 packs make clusters of 2 - 16 blocks at V <= 8192.
LAUNCH_PATHS = [
    (None, True, 3, 1, "streamed, 1-element packs"), (None, True, 5, 37, "odd V: 1-element packs"),
    (None, True, 70, 20, "blocks looping over rows"), (None, True, 6, 1000, "held, 1 pack per thread"),
    (None, True, 3, 2100, "held, 2 - 4 packs"), (None, True, 3, 4000, "held, 2 - 4 packs"),
    (None, True, 2, 9000, "held, 4 - 8 packs (fp32: a cluster of 2)"), (None, False, 2, 9000, "streamed"),
    ("threads=32,items=2,cluster=16", True, 3, 1024, "a cluster of 2 - 4"),
    ("threads=32,items=2,cluster=16", True, 2, 4096, "a cluster of 8 - 16"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op_name", ["kl_div_with_logits_fwd", "divergence_with_logits_fwd"])
def test_each_launch_path(emu, monkeypatch, op_name, dtype):
    options = ("reverse",) if op_name == "kl_div_with_logits_fwd" else ("skew_reverse", 0.3)
    for i, (tune, clusters, N, V, what) in enumerate(LAUNCH_PATHS):
        x, t, _ = make_case((N, V), "logits", dtype, seed=i)
        mask = torch.arange(N) % 3 != 1
        loss, gx, gt = tuned(emu, monkeypatch, tune, clusters, lambda: getattr(emu, op_name)(
            x, t, mask, "logits", 1.5, *options, True, True, torch.tensor(0.5)))
        x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
        ref = reference.kl_div_with_logits if len(options) == 1 else reference.skew_kl_div_with_logits
        kw = dict(direction="reverse") if len(options) == 1 else dict(direction="reverse", alpha=0.3)
        rows = ref(x64, t64, target_type="logits", temperature=1.5, reduction="none", mask=mask, **kw)
        rgx, rgt = torch.autograd.grad(rows.sum() * 0.5, (x64, t64))
        what = f"{N}x{V} {what} {tune=} {clusters=}"
        assert_close_rel(loss, rows.detach(), TOL[dtype][0], "loss " + what, atol=1e-6)
        check_grads(gx, rgx, dtype, "grad input " + what)
        check_grads(gt, rgt, dtype, "grad target " + what)


def test_kl_kernels_widest_cluster(emu):
    # V = 262144 in bfloat16, held: a row over a cluster of 8 blocks of 512 threads (the widest default split).
    x, t, _ = make_case((2, 262144), "logits", torch.bfloat16)
    loss, gx, _ = emu.kl_div_with_logits_fwd(x, t, None, "logits", 1.0, "reverse", True, False, None)
    rloss, rgx, _ = kl_expected(x, t, None, "logits", 1.0, "reverse", 1.0)
    assert_close_rel(loss, rloss, TOL[torch.bfloat16][0], "loss")
    check_grads(gx, rgx, torch.bfloat16, "grad input")


@pytest.mark.parametrize("V,dtype,grads,clusters,tol", [(4096, torch.float32, True, True, 0.03),
                                                         (100000, torch.bfloat16, True, True, 0.03),
                                                         (100000, torch.bfloat16, True, False, 0.1)],
                         ids=["held", "cluster", "streamed"])
def test_kl_kernels_tiny_kl_between_near_identical_rows(emu, V, dtype, grads, clusters, tol):
    # A ~5e-7 KL at V = 4096 and more (a student near convergence). Held rows take their maxima first and sum
    # in fp32, d_s - d_t as a sum of differences; streamed rows move each thread's online statistics to the row
    # maxima once and sum them in double. Plain fp32 sums of d_s and d_t were off by ~20%.
    emu.set_device(1, clusters)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(4, V, generator=g) * 0.01).to(dtype)
    t = (s.float() + torch.randn(4, V, generator=g) * 0.001).to(dtype)
    loss, _, _ = emu.kl_div_with_logits_fwd(s, t, None, "logits", 1.0, "forward", grads, False, None)
    emu.set_device(1, True)
    exp = reference.kl_div_with_logits(s.double(), t.double(), reduction="none")
    assert exp.max() < 1e-6
    assert ((loss.double() - exp).abs() / exp).max() < tol


# The sparse teacher's kernels on the row engine's launch shapes: held with 1 pack per thread (fp32 / bf16 1000;
# 70 x 20 in fp32: blocks looping over rows), 2 (bf16 4000), 4 (fp32 2100, 4000), 8 (bf16 9000; fp32 9000 over a
# cluster of 2; 70000: V > 64k over a cluster of 8), streamed (1-element packs: V = 1, 37, 2101; float64; without
# clusters beyond one block); k = V (64), k > a block's threads (300), empty slots. fp32 and bf16 also under the
# other ENGINE_TUNES (clusters of 2 - 16 blocks of 32 threads; no clusters).
SPARSE_SHAPES = [(3, 1, 1), (5, 37, 7), (70, 20, 5), (4, 64, 64), (3, 1000, 64), (3, 2100, 300), (3, 2101, 300),
                 (3, 4000, 64), (2, 9000, 64), (2, 70000, 100)]


@pytest.mark.parametrize("dtype,target_type", CASES, ids=str)
def test_sparse_kernels_match_reference(emu, dtype, target_type, monkeypatch):
    from test_sparse_kl_div_with_logits import make_sparse
    for i, (N, V, k) in enumerate(SPARSE_SHAPES):
        x, idx, v, _ = make_sparse((N, V), k, target_type, dtype, seed=i)
        mask = torch.arange(N) % 3 != 1
        tail = ("bucket", "renorm")[i % 2]
        gs = torch.tensor(0.5, dtype=v.dtype)
        x64, v64 = x.double().requires_grad_(), v.double().requires_grad_()
        rows = reference.sparse_kl_div_with_logits(x64, idx, v64, target_type=target_type, tail=tail,
                                                   temperature=1.5, reduction="none", mask=mask)
        rgx, rgv = torch.autograd.grad(rows.sum() * 0.5, (x64, v64))
        runs = engine_runs(emu, monkeypatch, dtype, V, lambda: emu.sparse_kl_div_with_logits_fwd(
            x, idx, v, mask, target_type, tail, 1.5, True, True, gs))
        for how, (loss, gx, gv) in runs:
            what = f"{N}x{V} k={k} {tail} {how}"
            assert loss.dtype == v.dtype and gx.dtype == dtype and gv.dtype == v.dtype
            assert_close_rel(loss, rows.detach(), TOL[dtype][0], "loss " + what, atol=1e-6)
            check_grads(gx, rgx, dtype, "grad input " + what)
            assert_close_rel(gv, rgv, TOL[dtype][0], "grad values " + what, atol=1e-6)


def test_sparse_kernels_forward_only_bad_indices_and_determinism(emu):
    import kl_ext._C  # noqa: F401  (the CPU op: the reference for an out-of-range slot, taken as empty)
    from test_sparse_kl_div_with_logits import make_sparse
    x, idx, v, _ = make_sparse((3, 5000), 64, "log_probs", torch.float32)
    loss, gx, gv = emu.sparse_kl_div_with_logits_fwd(x, idx, v, None, "log_probs", "bucket", 1.0, False, False, None)
    assert gx.numel() == 0 and gv.numel() == 0
    exp = torch.ops.kl_ext.sparse_kl_div_with_logits_fwd(x, idx, v, None, "log_probs", "bucket", 1.0, True, True, None)
    assert_close_rel(loss, exp[0], 2e-5, "forward only")
    # Indices outside [-1, V) are skipped by the kernel (never dereferenced): as if the slot were empty.
    bad, empty = idx.clone(), idx.clone()
    bad[0, 3], bad[1, 5] = 5000, -7
    empty[0, 3], empty[1, 5] = -1, -1
    got = emu.sparse_kl_div_with_logits_fwd(x, bad, v, None, "log_probs", "bucket", 1.0, True, True, None)
    exp = torch.ops.kl_ext.sparse_kl_div_with_logits_fwd(x, empty, v, None, "log_probs", "bucket", 1.0, True, True, None)
    for a, b, what in zip(got, exp, ("loss", "grad input", "grad values")):
        assert_close_rel(a, b, 2e-5, what)
    again = emu.sparse_kl_div_with_logits_fwd(x, bad, v, None, "log_probs", "bucket", 1.0, True, True, None)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # bitwise, run to run


@pytest.mark.parametrize("op_name", ["kl_div_with_logits_fwd", "divergence_with_logits_fwd"])
@pytest.mark.parametrize("target_type", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("V", [37, 1000, 9000], ids=["unaligned", "resident", "streamed"])
def test_vocab_parallel_modes_match_cpu(emu, require_backend, op_name, target_type, V):
    # The row_stats modes (kl_ext.distributed): what the C++ CPU kernels give, which tests/test_distributed.py
    # checks against the reference on real process groups.
    from test_distributed import _mode_args
    require_backend("cpu")
    for args in _mode_args(op_name, target_type, V):
        want = getattr(torch.ops.kl_ext, op_name)(*args)
        got = getattr(emu, op_name)(*args)
        for g, w, what in zip(got, want, ("out", "grad input", "grad target")):
            torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("tune", ["threads=33", "items=3", "cluster=32", "threads", "blocks=4", "threads=-32"])
def test_engine_limits_are_checked(emu, tune, monkeypatch):
    # KL_EXT_CUDA_ROWS (the row engine's limits, for sweeps) is read at each launch: a bad value is an error that
    # says what is allowed, never a launch the GPU rejects.
    monkeypatch.setenv("KL_EXT_CUDA_ROWS", tune)
    x, t, _ = make_case((2, 64), "logits", torch.float32)
    with pytest.raises(RuntimeError, match="KL_EXT_CUDA_ROWS"):
        emu.kl_div_with_logits_fwd(x, t, None, "logits", 1.0, "forward", True, False, None)
