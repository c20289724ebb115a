"""kl_ext.distributed: the vocab-parallel losses on real torch.distributed groups (gloo, CPU), 2 and 3 processes
spawned here, against the single-process float64 reference on the gathered rows; uneven shards and a rank with
no columns, every reduction, masks, both directions, the JSD, every target type, both gradients, bf16 / float64,
the Triton kernels (interpreter), DTensor input, the collectives counted, a group of one, disagreeing ranks.
The cases run in tests/vocab_parallel_worker.py, one world per size; each case is one test here."""
import json
import os
import subprocess
import sys

import pytest
import torch

import vocab_parallel_worker as worker
from kl_ext._backends import _usable

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ("dtensor", "collectives", "group_of_one", "ranks_disagree", "identical_rows_give_zero")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """world size -> per-rank {case: error or None}; each world is spawned once, on first use."""
    done = {}

    def get(world):
        if world not in done:
            if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
                pytest.skip("torch.distributed with gloo is not available")
            if not _usable("cpu", torch.device("cpu"))[0]:
                pytest.skip("the C++ extension is not built")
            d = tmp_path_factory.mktemp(f"world{world}")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
                       OMP_NUM_THREADS="1")
            procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "vocab_parallel_worker.py"), str(r),
                                       str(world), str(d / "store"), str(d / f"rank{r}.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for r in range(world)]
            logs = [p.communicate(timeout=900)[0] for p in procs]
            for r, (p, log) in enumerate(zip(procs, logs)):
                assert p.returncode == 0, f"rank {r} of {world} failed:\n{log[-4000:]}"
            done[world] = [json.loads((d / f"rank{r}.json").read_text()) for r in range(world)]
        return done[world]
    return get


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
