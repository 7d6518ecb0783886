"""Launching the multi-process tests (tests/test_distributed.py, tests/test_trl_distributed.py): one place for
the free port, the spawn, running a named check in a rank and leaving the rank fast.

A test module defines its own entry point ``entry(rank, world, port, *args)`` (module level, so that the spawned
processes can import it by name), which sets up its process group, calls ``run_check`` per check and ends with
``leave()``; the test calls ``spawn(entry, world, *args)``. Spawning and importing cost most of such a test, so
one spawn runs a whole batch of checks.
"""

import os
import socket
import sys
import time
import traceback


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the ranks rendezvous on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(entry, world: int, *args):
    """``entry(rank, world, port, *args)`` in ``world`` spawned processes; a rank's exception fails the call."""
    import torch.multiprocessing as mp

    mp.spawn(entry, args=(world, free_port(), *args), nprocs=world, join=True)


def run_check(check, label: str, rank: int, world: int, *args):
    """``check(rank, world, *args)``; a failure is re-raised naming the rank and ``label`` (mp.spawn shows the
    parent only the exception's text). With $DPO_KERNELS_TEST_TIMING set, rank 0 prints the check's seconds."""
    start = time.perf_counter()
    try:
        check(rank, world, *args)
    except Exception as e:
        raise AssertionError(f"[rank {rank}/{world}] {label}: {traceback.format_exc()}") from e
    if os.environ.get("DPO_KERNELS_TEST_TIMING") and rank == 0:
        print(f"{label}: {time.perf_counter() - start:.2f} s", file=sys.stderr)


def leave():
    """End a rank that succeeded without the interpreter's teardown, which takes seconds per spawned process
    (gloo, DeepSpeed and library threads) and can abort after all output; a failure raises normally instead, so
    that mp.spawn reports it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
