"""kl_ext.distributed: the vocab-parallel losses on real torch.distributed groups (gloo, CPU), 2 and 3 processes
spawned here, against the single-process float64 reference on the gathered rows; uneven shards and a rank with
no columns, every reduction, masks, both directions, the JSD, every target type, both gradients, bf16 / float64,
the Triton kernels (interpreter), DTensor input, the collectives counted, a group of one, disagreeing ranks.
The cases run in tests/vocab_parallel_worker.py, one world per size; each case is one test here."""
import pytest
import torch

import vocab_parallel_worker as worker
from conftest import gloo_worlds
from kl_ext._backends import _usable

SPECIAL = ("dtensor", "collectives", "group_of_one", "ranks_disagree", "identical_rows_give_zero")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    return gloo_worlds(tmp_path_factory, "vocab_parallel_worker.py")


def _params():
    return [pytest.param(w, name, id=f"{w}ranks-{name}")
            for w in (2, 3) for name in [*worker.cases(w), *SPECIAL]]


@pytest.mark.parametrize("world, case", _params())
def test_vocab_parallel_matches_single_process(worlds, world, case):
    if case.endswith("-triton") and not _usable("triton", torch.device("cpu"))[0]:
        pytest.skip("triton (interpreter) unavailable")
    for rank, results in enumerate(worlds(world)):
        assert case in results, f"rank {rank} did not run {case}"
        assert results[case] is None, f"rank {rank} of {world}: {results[case]}"


# The ops' vocab-parallel modes (csrc/common.h, KLCall), single process: every kernel backend gives what the C++
# CPU kernels give (which the worlds above check against the reference); tests/test_cuda_emulated.py does the
# same for the CUDA kernels.
def _mode_args(op_name, target_type, V, seed=0):
    """(op, statistics-pass args, finishing-pass args) over 5 rows, one masked, at temperature 1.5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, V, generator=g) * 2
    t = torch.randn(5, V, generator=g) * 2
    if target_type == "probs":
        t = torch.softmax(t, -1) * 0.4  # one shard's share of a row's mass
    elif target_type == "log_probs":
        t = torch.log_softmax(t, -1) - 1.0
    mask = torch.tensor([True, False, True, True, True])
    opts = ("reverse",) if op_name == "kl_div_with_logits_fwd" else ("jsd", 0.3)
    given = torch.stack([torch.logsumexp(x / 1.5, -1) + 0.7, torch.rand(5, generator=g) + 0.5,
                         torch.rand(5, generator=g), torch.rand(5, generator=g)], 1)
    if target_type != "logits":
        given[:, 1] = -0.2  # log of the teacher's whole mass
    lead = (x, t, mask, target_type, 1.5, *opts)
    return lead + (False, False, None, x.new_empty((5, 0))), lead + (True, True, torch.tensor(0.25), given)


@pytest.mark.parametrize("op_name", ["kl_div_with_logits_fwd", "divergence_with_logits_fwd"])
@pytest.mark.parametrize("target_type", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("V", [37, 20000], ids=["one_block", "streamed"])
def test_row_stats_modes_triton_matches_cpu(require_backend, op_name, target_type, V):
    require_backend("cpu")
    require_backend("triton")
    for args in _mode_args(op_name, target_type, V):
        want = getattr(torch.ops.kl_ext, op_name)(*args)
        got = getattr(torch.ops.kl_ext_triton, op_name)(*args)
        for g, w, what in zip(got, want, ("out", "grad input", "grad target")):
            torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def test_row_stats_checks(require_backend):
    require_backend("cpu")
    stats_args, finish_args = _mode_args("kl_div_with_logits_fwd", "logits", 7)
    with pytest.raises(RuntimeError, match="computes no gradients"):
        torch.ops.kl_ext.kl_div_with_logits_fwd(*stats_args[:6], True, False, None, stats_args[-1])
    with pytest.raises(RuntimeError, match="row_stats must be"):
        torch.ops.kl_ext.kl_div_with_logits_fwd(*finish_args[:-1], finish_args[-1][:, :3].contiguous())


def test_needs_an_initialized_process_group(require_backend):
    require_backend("cpu")
    from kl_ext.distributed import vocab_parallel_kl_div_with_logits
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_kl_div_with_logits(torch.randn(2, 5), torch.randn(2, 5))
