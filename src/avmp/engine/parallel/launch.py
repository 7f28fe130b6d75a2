"""Starting and stopping a tensor-parallel group: NCCL on GPUs, gloo on CPU, ranks
spawned here (`run_ranks`); the engine's own groups, torchrun's included, are joined by
`avmp.engine.tp_step.join_groups`."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes

from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.models.tensor_parallel import check_num_ranks


def backend_for(device: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_world_size(size: int, device: str) -> None:
    """One clear error for a size no machine of this kind can run.

    Raises:
        ValueError: ``size`` is outside 1..8 (one host,
            `avmp.models.tensor_parallel.check_num_ranks`), or above the number of CUDA
            devices when the device is CUDA.
    """
    check_num_ranks(size)
    if torch.device(device).type == "cuda" and size > torch.cuda.device_count():
        raise ValueError(
            f"--tensor-parallel {size} needs {size} CUDA devices; this machine has "
            f"{torch.cuda.device_count()}"
        )


def init_group(rank: int, size: int, device: str, init_method: str) -> TensorParallel:
    """Join the group as ``rank`` of ``size`` (on CUDA, on device ``rank``).

    Returns:
        The rank's `TensorParallel`; `SINGLE` for a size of 1 (no group is made).
    """
    if size == 1:
        return SINGLE
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank,
                            world_size=size)  # fmt: skip
    return TensorParallel(rank, size, dist.group.WORLD)


def shut_down(tp: TensorParallel) -> None:
    """Leave the group (nothing to do for one rank)."""
    if not tp.is_single and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on this host that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_ranks(
    fn: Callable[..., Any], size: int, *args: Any, device: str = "cpu", threads: int = 1
) -> list[Any]:
    """Run ``fn(tp, *args)`` on ``size`` local ranks and return their results by rank.

    Each rank is a process started with ``spawn`` (``fn`` and ``args`` must pickle:
    a module-level function), joins a group on a fresh local port, runs ``fn`` with
    ``threads`` CPU threads, saves its result, and leaves the group. A size of 1 runs
    ``fn(SINGLE, *args)`` here, in this process.

    Raises:
        ValueError: a bad size (`check_world_size`).
        torch.multiprocessing.ProcessRaisedException: a rank raised (the other ranks
            are stopped); its message holds the rank's traceback.
    """
    check_world_size(size, device)
    if size == 1:
        return [fn(SINGLE, *args)]
    init_method = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="avmp-tp-") as out:
        rank_args = (size, device, init_method, threads, out, fn, args)
        start_processes(  # type: ignore[no-untyped-call]
            _rank_main, args=rank_args, nprocs=size, join=True, start_method="spawn"
        )
        return [torch.load(Path(out) / f"{rank}.pt", weights_only=False) for rank in range(size)]


def _rank_main(
    rank: int,
    size: int,
    device: str,
    init_method: str,
    threads: int,
    out: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(threads)
    tp = init_group(rank, size, device, init_method)
    try:
        result = fn(tp, *args)
    finally:
        shut_down(tp)
    # results go through files, not a pipe: a rank blocked writing a large result
    # into a pipe nobody reads until every rank has exited would never exit
    torch.save(result, Path(out) / f"{rank}.pt")
