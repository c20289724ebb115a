"""The shared body of the gloo test workers (tests/vocab_parallel_worker.py, tests/tp_head_worker.py): one rank
runs every case, records {case: error message or None} and writes it as JSON for the test, which fails with it.
Usage of a worker: python <worker>.py RANK WORLD STORE_FILE OUT_FILE"""
import json
import os
import sys
import traceback

import torch.distributed as dist

from kl_ext._registry import REGISTRY


def divergence_params(name):
    """A registered divergence's parameters at a value inside their range (not where it is the KL): what every test
    that iterates the registry passes (tests/conftest.py re-exports it; the workers here take it directly)."""
    return {p: {"alpha": 0.2, "beta": 0.3}[p] for p in REGISTRY[name].params}


def recorder(out):
    """@case(name) runs the decorated function at once, recording None or its traceback under name in out."""
    def case(name):
        def wrap(fn):
            try:
                fn()
                out[name] = None
            except Exception:  # noqa: BLE001  (reported to the test, which fails with it)
                out[name] = traceback.format_exc()
        return wrap
    return case


def main(cases, run_case, special_cases):
    """cases(world) -> {name: settings}; run_case(settings, rank, world); special_cases(rank, world, group1) ->
    {name: error or None}, group1 a group of rank 0 alone (None on the other ranks)."""
    rank, world, store, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    case = recorder(results)
    for name, c in cases(world).items():
        case(name)(lambda: run_case(c, rank, world))
    group1 = dist.new_group([0])  # every rank takes part in creating it
    results.update(special_cases(rank, world, group1 if rank == 0 else None))
    with open(out_file, "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    # Gloo's worker threads can abort the interpreter's own teardown ("terminate called without an active
    # exception": CI, 2026-11-24; pytorch/pytorch#179291): every result is written and the group destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
