"""Launching the multi-process tests (tests/test_distributed.py, tests/test_trl_distributed.py): one place for
the free port, the spawn, running a named check in a rank and leaving the rank fast; and ``simulate``, which runs
a check on ranks simulated in this process (threads on torch's threaded process group), for world sizes and
settings that need no real process each.

A test module defines its own entry point ``entry(rank, world, port, *args)`` (module level, so that the spawned
processes can import it by name), which sets up its process group, calls ``run_check`` per check and ends with
``leave()``; the test calls ``spawn(entry, world, *args)``. Spawning and importing cost most of such a test, so
one spawn runs a whole batch of checks.
"""

import os
import socket
import sys
import threading
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


# The collectives a simulated rank may call (the library uses all_gather and all_reduce); one it cannot hand the
# turn on in (a DTensor's, FSDP's) leaves the other ranks waiting, and ``simulate`` fails at its time-out.
HANDED_ON = ("all_gather", "all_reduce", "broadcast", "barrier")


def simulate(check, world: int, *args, seed: int = 1234, timeout: float = 300.0):
    """``check(rank, world, *args)`` on ``world`` ranks simulated in this process, each a thread in a threaded
    process group (``torch.distributed`` collectives between the threads), seeded with ``seed`` as a spawned rank
    is. One rank runs at a time: the turn passes only inside a collective, and each rank keeps its own RNG state
    across the hand-over, so every rank draws the numbers a spawned rank would, and the Triton interpreter (not
    thread-safe) runs one launch at a time. The first rank's failure is raised, naming it."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.multi_threaded_pg import (
        ProcessLocalGroup,
        _install_threaded_pg,
        _uninstall_threaded_pg,
    )

    turn = threading.Lock()
    real = {name: getattr(dist, name) for name in HANDED_ON}

    def handing_on(collective):
        def call(*a, **k):
            state = torch.get_rng_state()
            turn.release()
            try:
                return collective(*a, **k)
            finally:
                turn.acquire()
                torch.set_rng_state(state)

        return call

    store, failures = dist.HashStore(), []

    def rank_main(rank):
        dist.init_process_group("threaded", rank=rank, world_size=world, store=store)  # waits for every rank
        try:
            with turn:
                try:
                    torch.manual_seed(seed)
                    check(rank, world, *args)
                except BaseException as error:  # noqa: BLE001 - any failure of a rank fails the test
                    failures.append((rank, traceback.format_exc()))
                    ProcessLocalGroup.exception_handle(error)  # wake the ranks waiting in a collective
        finally:
            dist.destroy_process_group()

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    for name, collective in real.items():
        setattr(dist, name, handing_on(collective))
    try:
        threads = [threading.Thread(target=rank_main, args=(rank,), daemon=True) for rank in range(world)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise AssertionError(f"{check.__name__}: simulated ranks still running after {timeout} s (a collective "
                                 f"outside {HANDED_ON} never hands the turn on)")  # fmt: skip
    finally:
        for name, collective in real.items():
            setattr(dist, name, collective)
        ProcessLocalGroup.reset()
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if failures:  # the first is the cause: the ranks it woke in their collectives fail after it
        rank, trace = failures[0]
        raise AssertionError(f"[simulated rank {rank}/{world}] {check.__name__}: {trace}")
