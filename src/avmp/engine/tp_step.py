"""The engine's step on several ranks: rank 0 plans, every rank computes.

Rank 0 (the engine's own process) runs the scheduler and the allocator; ranks 1..N-1
(followers) hold the same pools, each unit the rank's shard, with the same page and slot
ids (docs/design-tp.md, "The engine step on N ranks"). What rank 0's allocator does to
bytes while it plans (migration's chunk maps and unmaps, compaction's row copies, the
prefix cache's slot copies, host-tier swaps) is logged in order by `ByteOpLog`; before
every run of the model rank 0 broadcasts one message, the logged operations then the
step's `SequenceWork` (`pack_message`), and each follower applies the operations to its
own backing and runs the same step. Rank 0 samples and broadcasts the sampled ids, which
the followers keep as the next step's carried tokens (`fill_carried` under ``overlap``).

Messages go over a gloo group (on the host, so rank 0 never waits for the device to
send one); the model's all-reduces and the sampled ids go over the device group (NCCL
on GPUs). Both groups have a timeout, and a follower that dies closes its connections,
so rank 0 gets one error naming the rank, never a hang (`Leader`).

World size 1 never reaches this module: the engine then runs exactly its one-rank code.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avmp.engine.parallel.group import TensorParallel
from avmp.engine.parallel.launch import backend_for, free_port
from avmp.engine.runner import ModelRunner, SequenceWork
from avmp.memory.backing.device import TensorBacking
from avmp.memory.host_tier import HostExtent
from avmp.memory.spec import PoolKind, RequestUnits

if TYPE_CHECKING:
    from avmp.engine.engine import EngineConfig
    from avmp.engine.host_tier import HostSwapper
    from avmp.engine.models.base import HybridModel

# How long a collective may wait for the other ranks before it fails (a hung rank; a
# dead one fails the collective at once, its connections closed). Long enough for the
# slowest step seen (a first 8k-token prefill compiling kernels: seconds) by far.
GROUP_TIMEOUT_S = float(os.environ.get("AVMP_TP_TIMEOUT_S", "600"))
# After a collective failed: how long rank 0 waits for a follower to say why.
FAILURE_REPORT_S = 5.0
POOL_CODES = {PoolKind.KV: 0, PoolKind.STATE: 1}
POOLS = {code: pool for pool, code in POOL_CODES.items()}


class Op(IntEnum):
    """A byte operation on the pools, as the message codes it."""

    MAP = 1  # pool, n, chunk ids...
    UNMAP = 2  # pool, n
    COPY_UNITS = 3  # pool, n, (src, dst) x n
    SLOT_COPY = 4  # src slot, dst slot
    SWAP_OUT = 5  # request id, slot, n pages, pages..., extent offset, extent bytes
    SWAP_IN = 6  # the same fields


class Kind(IntEnum):
    """What a message asks the followers to do."""

    STOP = 0
    STEP = 1


# -- the log of byte operations (rank 0) ---------------------------------------------------


class ByteOpLog:
    """What rank 0's allocator, prefix cache and host tier did to the pools' bytes
    since the last message, as int64 words in the order they happened: a follower
    replays them in that order, so its pools hold what rank 0's hold (its shard of it)
    when the next step runs."""

    def __init__(self) -> None:
        self.words: list[int] = []

    def take(self) -> list[int]:
        """The words logged since the last call, and an empty log."""
        words, self.words = self.words, []
        return words

    def watch_backing(self, backing: TensorBacking) -> None:
        """Log every map, unmap and unit copy ``backing`` carries out from now on (the
        allocator's calls; a call that raises changed nothing and is not logged)."""
        map_chunks, unmap_chunks, copy_units = (
            backing.map_chunks, backing.unmap_chunks, backing.copy_units
        )  # fmt: skip

        def logged_map(pool: PoolKind, chunk_ids: list[int]) -> None:
            map_chunks(pool, chunk_ids)
            self.words += [Op.MAP, POOL_CODES[pool], len(chunk_ids), *chunk_ids]

        def logged_unmap(pool: PoolKind, num_chunks: int) -> list[int]:
            ids = unmap_chunks(pool, num_chunks)
            self.words += [Op.UNMAP, POOL_CODES[pool], num_chunks]
            return ids

        def logged_copy(pool: PoolKind, moves: list[tuple[int, int]]) -> None:
            copy_units(pool, moves)
            if moves:
                flat = [index for move in moves for index in move]
                self.words += [Op.COPY_UNITS, POOL_CODES[pool], len(moves), *flat]

        # instance attributes shadow the methods: the allocator keeps its backing object
        backing.map_chunks = logged_map  # type: ignore[method-assign]
        backing.unmap_chunks = logged_unmap  # type: ignore[method-assign]
        backing.copy_units = logged_copy  # type: ignore[method-assign]

    def slot_copier(self, copier: Callable[[int, int], None]) -> Callable[[int, int], None]:
        """``copier`` (the prefix cache's slot copy), logged."""

        def logged(src: int, dst: int) -> None:
            copier(src, dst)
            self.words += [Op.SLOT_COPY, src, dst]

        return logged

    def swapper(self, swapper: HostSwapper) -> LoggedSwapper:
        """``swapper`` (the host tier), logged."""
        return LoggedSwapper(swapper, self)


class LoggedSwapper:
    """A `HostSwapper` whose swaps are logged: each follower swaps its own shard of
    the same units to the same offsets of its own arena (every rank's units are the
    same size, so rank 0's extents fit every arena)."""

    def __init__(self, swapper: HostSwapper, log: ByteOpLog) -> None:
        self.inner = swapper
        self.log = log

    def swap_out(self, request_id: int, units: RequestUnits, extent: HostExtent) -> None:
        self.inner.swap_out(request_id, units, extent)
        self._log(Op.SWAP_OUT, request_id, units, extent)

    def swap_in(self, request_id: int, units: RequestUnits, extent: HostExtent) -> None:
        self.inner.swap_in(request_id, units, extent)
        self._log(Op.SWAP_IN, request_id, units, extent)

    def _log(self, op: Op, request_id: int, units: RequestUnits, extent: HostExtent) -> None:
        self.log.words += [op, request_id, units.slot, len(units.pages), *units.pages,
                           extent.offset, extent.num_bytes]  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # counters and sizes, read by the engine


@dataclass
class Replica:
    """What a follower applies byte operations to: its own backing, host tier and slot
    copier (the same kinds rank 0 has, over the rank's shard of every unit)."""

    backing: TensorBacking
    swapper: HostSwapper | None
    slot_copier: Callable[[int, int], None]

    def apply(self, words: list[int]) -> None:
        """Replay the logged operations ``words`` in order.

        Raises:
            ValueError: an operation code this module does not know (a corrupt message).
        """
        at = 0
        while at < len(words):
            op = words[at]
            if op == Op.MAP:
                pool, count = POOLS[words[at + 1]], words[at + 2]
                self.backing.map_chunks(pool, words[at + 3 : at + 3 + count])
                at += 3 + count
            elif op == Op.UNMAP:
                self.backing.unmap_chunks(POOLS[words[at + 1]], words[at + 2])
                at += 3
            elif op == Op.COPY_UNITS:
                pool, count = POOLS[words[at + 1]], words[at + 2]
                flat = words[at + 3 : at + 3 + 2 * count]
                self.backing.copy_units(pool, list(zip(flat[::2], flat[1::2], strict=True)))
                at += 3 + 2 * count
            elif op == Op.SLOT_COPY:
                self.slot_copier(words[at + 1], words[at + 2])
                at += 3
            elif op in (Op.SWAP_OUT, Op.SWAP_IN):
                at = self._swap(op, words, at)
            else:
                raise ValueError(f"unknown byte operation {op} in a step message")

    def _swap(self, op: int, words: list[int], at: int) -> int:
        request_id, slot, count = words[at + 1 : at + 4]
        pages = tuple(words[at + 4 : at + 4 + count])
        offset, num_bytes = words[at + 4 + count : at + 6 + count]
        if self.swapper is None:
            raise ValueError("a swap arrived at a rank without a host tier")
        swap = self.swapper.swap_out if op == Op.SWAP_OUT else self.swapper.swap_in
        swap(request_id, RequestUnits(slot, pages), HostExtent(offset, num_bytes))
        return at + 6 + count


# -- messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepMessage:
    """One run of the model, as every rank receives it.

    Attributes:
        ops: the byte operations to apply first (`ByteOpLog` words).
        work: the step's sequences, in view rows.
        carried: the step reads the previous step's sampled ids (``-1 - i`` token ids).
        samples: rank 0 samples after this run and broadcasts the ids.
    """

    ops: list[int]
    work: list[SequenceWork]
    carried: bool
    samples: bool


HEADER = 5  # kind, carried, samples, number of op words, number of sequences
SEQUENCE_FIELDS = 7  # tokens, context, slot row, pages, samples, logit rows' start and stop


def pack_message(message: StepMessage) -> list[int]:
    """The message as int64 words: a header, the operations, then per sequence its
    counts and flags followed by its token ids and page rows."""
    words = [Kind.STEP, int(message.carried), int(message.samples), len(message.ops),
             len(message.work), *message.ops]  # fmt: skip
    for w in message.work:
        words += [len(w.token_ids), w.num_context, w.slot_row, len(w.page_rows), int(w.samples),
                  w.logit_rows.start, w.logit_rows.stop]  # fmt: skip
    for w in message.work:
        words += w.token_ids
        words += w.page_rows
    return words


def unpack_message(words: list[int]) -> StepMessage | None:
    """The message ``words`` hold; None for a stop message.

    Raises:
        ValueError: words that are not a message (a corrupt or truncated one).
    """
    if not words or words[0] == Kind.STOP:
        return None
    if words[0] != Kind.STEP or len(words) < HEADER:
        raise ValueError(f"not a step message (kind {words[0]}, {len(words)} words)")
    _, carried, samples, num_ops, num_work = words[:HEADER]
    at = HEADER + num_ops
    ops = words[HEADER:at]
    heads = [words[at + i * SEQUENCE_FIELDS : at + (i + 1) * SEQUENCE_FIELDS]
             for i in range(num_work)]  # fmt: skip
    at += num_work * SEQUENCE_FIELDS
    work = []
    for num_tokens, num_context, slot_row, num_pages, sequence_samples, first, stop in heads:
        tokens = words[at : at + num_tokens]
        pages = words[at + num_tokens : at + num_tokens + num_pages]
        at += num_tokens + num_pages
        rows = range(first, stop)
        work.append(
            SequenceWork(tokens, num_context, slot_row, pages, bool(sequence_samples), rows)
        )
    if at != len(words):
        raise ValueError(f"a step message of {len(words)} words ends at word {at}")
    return StepMessage(ops, work, bool(carried), bool(samples))


def send(words: list[int], group: Any) -> None:
    """Broadcast ``words`` from rank 0: its length first, then the words."""
    payload = torch.tensor(words, dtype=torch.int64)
    dist.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), 0, group=group)
    dist.broadcast(payload, 0, group=group)


def receive(group: Any) -> list[int]:
    """The words rank 0 broadcast with `send`."""
    length = torch.empty(1, dtype=torch.int64)
    dist.broadcast(length, 0, group=group)
    payload = torch.empty(int(length.item()), dtype=torch.int64)
    dist.broadcast(payload, 0, group=group)
    words: list[int] = payload.tolist()
    return words


# -- groups ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Groups:
    """A rank's place: the device group its model communicates in (`TensorParallel`)
    and the host group the step messages travel in."""

    tp: TensorParallel
    control: Any


def join_groups(rank: int, size: int, device: str, init_method: str | None) -> Groups:
    """Join a group of ``size`` as ``rank`` (on CUDA, on the device of the rank, or
    ``LOCAL_RANK`` under torchrun), with `GROUP_TIMEOUT_S` on every collective.

    Args:
        init_method: a ``tcp://`` address; None: the environment torchrun sets.
    """
    timeout = timedelta(seconds=GROUP_TIMEOUT_S)
    backend = backend_for(device)
    if backend == "nccl":
        local = rank if init_method is not None else int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank,
                            world_size=size, timeout=timeout)  # fmt: skip
    control = dist.group.WORLD
    if backend != "gloo":  # messages stay on the host: sending one never waits for a GPU
        control = dist.new_group(backend="gloo", timeout=timeout)
    return Groups(TensorParallel(rank, size, dist.group.WORLD), control)


def rank_device(config: EngineConfig, tp: TensorParallel) -> torch.device:
    """The device of ``tp``'s rank: the CPU, or the CUDA device the group set."""
    device = config.torch_device()
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def torchrun_rank(size: int) -> int | None:
    """This process's rank when torchrun started it for a group of ``size``; None when
    torchrun did not (no ``WORLD_SIZE`` in the environment).

    Raises:
        ValueError: torchrun started a group of another size.
    """
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return None
    if int(world) != size:
        raise ValueError(f"--tensor-parallel {size} under torchrun with {world} processes")
    return int(os.environ.get("RANK", "0"))


# -- the model each rank builds ---------------------------------------------------------------


class ShardBuilder(Protocol):
    """Builds one rank's shard of a model directly (a model too large to build whole on
    every rank, such as a benchmark's random weights at full size); must pickle, as
    followers receive it."""

    def __call__(self, tp: TensorParallel, device: torch.device) -> HybridModel: ...


@dataclass(frozen=True)
class RandomWeights:
    """A `ShardBuilder` of random weights: the rank's shard of a transformers
    ``config``, built directly on the device in ``dtype`` and filled from ``seed``
    (`avmp.engine.tiny.init_random_weights`). Every rank's shard has the same shapes,
    so every rank draws the same bits: the full model they stand for repeats one shard,
    which changes no step's cost (for speed figures, not for text)."""

    config: Any
    seed: int = 0
    dtype: str = "bfloat16"

    def __call__(self, tp: TensorParallel, device: torch.device) -> HybridModel:
        from avmp.engine.engine import DTYPES
        from avmp.engine.models import model_class
        from avmp.engine.tiny import init_random_weights

        default = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[self.dtype])
        try:
            with torch.device(device):
                model = model_class(self.config.model_type)(self.config, tp)
        finally:
            torch.set_default_dtype(default)
        init_random_weights(model, self.seed)
        return model.eval()


def build_shard(
    model: Any, config: EngineConfig, tp: TensorParallel, device: torch.device
) -> HybridModel:
    """This rank's shard of ``model``: a checkpoint read shard by shard, a whole model
    sliced (every rank holds the same one), or a `ShardBuilder`'s."""
    from avmp.engine.engine import DTYPES
    from avmp.engine.loader import load_model
    from avmp.engine.models.base import HybridModel

    dtype = None if config.dtype is None else DTYPES[config.dtype]
    if isinstance(model, HybridModel):
        return model.to(device=device, dtype=dtype).eval().sharded(tp)
    if isinstance(model, (str, Path)):
        return load_model(model, dtype, str(device), tp)
    shard = model(tp, device)
    return shard.to(device=device, dtype=dtype).eval()


# -- rank 0 ------------------------------------------------------------------------------------


class FollowerFailed(RuntimeError):
    """A follower rank died or raised: the engine cannot run another step."""


class Leader:
    """Rank 0's side of the group: starts the followers (or joins torchrun's group),
    broadcasts each run of the model and the sampled ids, and stops the followers.

    Every collective error is turned into one `FollowerFailed` naming the rank that
    failed and why, when a follower said (its traceback's last line) or died (its exit
    code)."""

    def __init__(self, groups: Groups, processes: list[Any], errors: Any) -> None:
        self.groups = groups
        self.tp = groups.tp
        self.processes = processes
        self.errors = errors
        self.log = ByteOpLog()
        self.stopped = False

    @classmethod
    def start(cls, model: Any, config: EngineConfig, host_tier_bytes: int) -> Leader:
        """Rank 0 of ``config.tensor_parallel`` ranks: under torchrun, joins its group;
        otherwise spawns ranks 1..N-1 (each builds its shard of ``model`` and follows)
        and joins them on a fresh local port."""
        size = config.tensor_parallel
        rank = torchrun_rank(size)
        if rank is not None:
            if rank != 0:
                raise ValueError(f"rank {rank} of torchrun's group follows: call follow()")
            return cls(join_groups(0, size, config.device, None), [], None)._hello(host_tier_bytes)
        context = mp.get_context("spawn")
        errors = context.SimpleQueue()
        init_method = f"tcp://127.0.0.1:{free_port()}"
        processes = []
        for follower in range(1, size):
            args = (follower, size, init_method, model, config, errors)
            process = context.Process(target=_follower_main, args=args, daemon=True)
            process.start()
            processes.append(process)
        try:
            groups = join_groups(0, size, config.device, init_method)
        except BaseException:
            _kill(processes)
            raise
        return cls(groups, processes, errors)._hello(host_tier_bytes)

    def _hello(self, host_tier_bytes: int) -> Leader:
        """Tell the followers what rank 0 resolved for the whole group: the host tier's
        size (each rank's arena must take rank 0's extents)."""
        self._guarded(lambda: send([host_tier_bytes], self.groups.control))
        return self

    def wait_ready(self) -> None:
        """Wait until every follower has built its model and pools."""
        self._guarded(lambda: dist.barrier(group=self.groups.control))

    def execute(
        self,
        runner: ModelRunner,
        work: list[SequenceWork],
        carried: torch.Tensor | None,
        samples: bool,
    ) -> torch.Tensor:
        """Broadcast the logged operations and ``work``, then run it here (the
        followers run it at the same time). ``samples``: `share_sampled` follows."""
        message = StepMessage(self.log.take(), work, carried is not None, samples)

        def run() -> torch.Tensor:
            send(pack_message(message), self.groups.control)
            return runner.execute(work, carried)

        return self._guarded(run)

    def share_sampled(self, sampled: torch.Tensor) -> None:
        """Broadcast rank 0's sampled ids (on the device) to the followers."""
        self._guarded(lambda: dist.broadcast(sampled, 0, group=self.tp.group))

    def probe_runner(self, runner: ModelRunner) -> BroadcastRunner:
        """``runner`` with every run broadcast, for runs that do not sample (the
        prefill probe that times a chunk for the preemption rule)."""
        return BroadcastRunner(self, runner)

    def stop(self) -> None:
        """Tell the followers to stop, wait for them, and leave the group; idempotent.
        A follower that does not exit in time is killed."""
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(RuntimeError):  # a follower gone already: killed below
            send([Kind.STOP], self.groups.control)
        for process in self.processes:
            process.join(timeout=30)
        _kill(self.processes)
        if dist.is_initialized():
            dist.destroy_process_group()

    def _guarded(self, call: Callable[[], Any]) -> Any:
        if self.stopped:
            raise FollowerFailed("the tensor-parallel group has stopped")
        try:
            return call()
        except RuntimeError as error:
            failure = self._failure()
            if failure is None:
                raise
            self.stop()
            raise FollowerFailed(failure) from error

    def _failure(self) -> str | None:
        """Why a follower failed: what it reported, else which one died and how;
        None when every follower still runs (the error was rank 0's own)."""
        for process in self.processes:
            process.join(timeout=FAILURE_REPORT_S / max(len(self.processes), 1))
        reports = []
        while self.errors is not None and not self.errors.empty():
            rank, text = self.errors.get()
            reports.append(f"tensor-parallel rank {rank} failed: {text}")
        if reports:
            return "; ".join(reports)
        dead = [(rank, p.exitcode) for rank, p in enumerate(self.processes, 1) if not p.is_alive()]
        if dead:
            return "; ".join(f"tensor-parallel rank {r} exited (code {c})" for r, c in dead)
        if not self.processes:  # torchrun's followers: rank 0 cannot see them
            return "a tensor-parallel collective failed (a follower under torchrun stopped?)"
        return None


class BroadcastRunner:
    """A runner whose every run is broadcast first, followed by no sampling."""

    def __init__(self, leader: Leader, runner: ModelRunner) -> None:
        self.leader = leader
        self.runner = runner
        self.device = runner.device

    def execute(
        self, work: list[SequenceWork], carried: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.leader.execute(self.runner, work, carried, samples=False)


def _kill(processes: list[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


# -- followers --------------------------------------------------------------------------------


def _follower_main(
    rank: int,
    size: int,
    init_method: str,
    model: Any,
    config: EngineConfig,
    errors: Any,
) -> None:
    """A spawned follower: join, build, follow until told to stop; an error is
    reported to rank 0 (its last line) before the process exits."""
    try:
        groups = join_groups(rank, size, config.device, init_method)
        follow(model, config, groups)
    except BaseException as error:
        errors.put((rank, _last_line(error)))
        traceback.print_exc()
        raise SystemExit(1) from None


def _last_line(error: BaseException) -> str:
    text = traceback.format_exception_only(type(error), error)
    return text[-1].strip() if text else type(error).__name__


def follow(model: Any, config: EngineConfig, groups: Groups) -> None:
    """Rank > 0: build this rank's shard of ``model`` and pools as rank 0 builds its
    own, then run every step rank 0 broadcasts until it says stop; leave the group."""
    from avmp.engine.engine import build_follower

    try:
        (host_tier_bytes,) = receive(groups.control)
        replica, runner = build_follower(model, config, host_tier_bytes, groups.tp)
        dist.barrier(group=groups.control)  # built: rank 0 may send steps
        run_steps(replica, runner, groups)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_steps(replica: Replica, runner: ModelRunner, groups: Groups) -> None:
    """The follower's loop: apply each message's operations, run its step, and keep
    rank 0's sampled ids for the next step's carried tokens."""
    carried_ids: torch.Tensor | None = None
    while (message := unpack_message(receive(groups.control))) is not None:
        replica.apply(message.ops)
        runner.execute(message.work, carried_ids if message.carried else None)
        if message.samples:
            num_sampled = sum(w.samples for w in message.work)
            carried_ids = torch.empty(num_sampled, dtype=torch.int64, device=runner.device)
            dist.broadcast(carried_ids, 0, group=groups.tp.group)


def run_torchrun_follower(model: Any, config: EngineConfig) -> None:
    """A follower started by torchrun (``RANK`` > 0): what ``avmp generate`` and
    ``avmp serve`` run there instead of the engine, until rank 0's engine closes."""
    rank = torchrun_rank(config.tensor_parallel)
    if rank is None or rank == 0:
        raise ValueError("run_torchrun_follower runs on torchrun's ranks 1..N-1")
    groups = join_groups(rank, config.tensor_parallel, config.device, None)
    follow(model, config, groups)


def is_torchrun_follower(size: int) -> bool:
    """Whether this process is rank 1..N-1 of a torchrun group of ``size``."""
    rank = torchrun_rank(size) if size > 1 else None
    return rank is not None and rank > 0
