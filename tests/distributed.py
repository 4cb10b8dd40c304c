"""Run a function on W CPU ranks (gloo, torch.multiprocessing) and collect each rank's result.

Used by every test of sharded code: the function must live at module level of an importable
module (spawned processes import it). A rank that raises makes the whole call raise with that
rank's traceback, and a timeout turns a hang into a failure instead of a stuck suite.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: Any, backend: str) -> None:
    # What torchrun sets; DeepSpeed insists on LOCAL_RANK.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        out.put((rank, True, result))
    except BaseException:  # report any failure, including assertion errors, to the parent
        out.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0,
                    backend: str = "gloo") -> list[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` ranks (gloo; nccl for the GPU tests, rank r on
    cuda:r); return the results in rank order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out, backend)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            rank, ok, value = out.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout}s waiting for {world - len(results)} rank(s): a hang")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
