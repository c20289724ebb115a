"""kl_ext.distributed.vocab_parallel_linear_distillation_loss: the LM head split by vocabulary over real gloo
groups of 2 and 3 processes (uneven shards, a rank with no classes), against linear_distillation_loss on the
gathered head in float64: every teacher form (hidden states + head shard; dense logits / log-probs / probs
shards), KL / reverse KL / JSD, every reduction, temperature, softcap, logit_scale, bias, hard labels, masks,
chunk sizes 1 / 7 / all rows, fp32 and bf16; DTensor weights, the Module, the collectives counted, peak memory
per chunk, a group of one, bad input. The cases run in tests/tp_head_worker.py, one world per size."""
import os
import subprocess
import sys

import pytest
import torch

import tp_head_worker as worker
from conftest import gloo_worlds

SPECIAL = ("dtensor", "module", "collectives", "peak_memory_per_chunk", "group_of_one", "bad_input")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    return gloo_worlds(tmp_path_factory, "tp_head_worker.py")


@pytest.mark.parametrize("world, case", [pytest.param(w, name, id=f"{w}ranks-{name}")
                                         for w in (2, 3) for name in [*worker.cases(w), *SPECIAL]])
def test_tp_head_matches_the_gathered_head(worlds, world, case):
    for rank, results in enumerate(worlds(world)):
        assert case in results, f"rank {rank} did not run {case}"
        assert results[case] is None, f"rank {rank} of {world}: {results[case]}"


def test_tp_distill_example_runs_under_torchrun(tmp_path):
    # examples/tp_distill.py: a two-rank tensor-parallel student distilled on CPU (gloo), launched with torchrun.
    from kl_ext._backends import _usable
    if not _usable("cpu", torch.device("cpu"))[0]:
        pytest.skip("the C++ extension is not built")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        os.path.join(HERE, "..", "examples", "tp_distill.py"), "--steps", "30"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "loss fell" in r.stdout, r.stdout
