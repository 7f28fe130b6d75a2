"""The inference engine: hybrid models on AVMP memory, driven by the shared scheduler.

Per step (as in nano-vllm's ``LLMEngine.step``): the scheduler plans which requests
compute how many tokens, asking the AVMP manager for every page and slot (which may
migrate chunks between the pools or compact one); the engine reads each request's
current blocks, the runner runs the model over the pools' views, the sampler picks the
next tokens, and the scheduler records the step. A preempted request either has its
units copied to the host tier and copied back when it resumes (`avmp.engine.host_tier`,
ordered on a copy stream), or loses its cache and is recomputed from its prompt and the
tokens it had already produced; ``preemption`` says which.

Steps overlap with the device (as vLLM's async scheduling and SGLang's overlap scheduler
do): step N+1 is planned and launched while the device still computes step N, and N's
tokens are read only then; a token of N that N+1 needs is read from the device there.
The allocator's work for N+1 therefore costs no device time. It stays correct because
every use of memory is ordered on the device's stream, and the one host-side operation
that is not, unmapping a chunk that migrates, is deferred until an event recorded behind
the queued work has completed, without the host waiting for it
(`CudaVmmBacking.unmap_chunks`).

Requests come in two ways over the same step loop: `Engine.add_request` /
`Engine.step` / `Engine.abort_request`, one step at a time with an update per request
(what `avmp.engine.loop` drives for a server), and `Engine.generate`, a batch in and its
outputs out, built on those three calls.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import operator
import os
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch

from avmp.engine.fast_runner import DEFAULT_MAX_MIXED_GRAPHS, FastModelRunner
from avmp.engine.generation_config import resolve_generation_config
from avmp.engine.grammar import GrammarCompiler, GrammarMasks, GrammarSpec, advance
from avmp.engine.host_tier import HostSwapper, measure_copy_bandwidth, measure_prefill_s_per_token
from avmp.engine.loader import load_model
from avmp.engine.models.base import HybridModel
from avmp.engine.ops import REFERENCE_OPS
from avmp.engine.parallel.group import TensorParallel
from avmp.engine.parallel.launch import check_world_size
from avmp.engine.prefix_cache import (
    HostCheckpointCopies,
    PrefixCounts,
    StateSlotCopier,
    check_prefix_choice,
    check_room_for_checkpoint,
    clear_prefix_cache,
    device_rates,
    resolve_prefix_cache,
)
from avmp.engine.runner import ModelRunner, PoolViews, SequenceWork
from avmp.engine.sampling import (
    MAX_LOGPROBS,
    PenaltyCounts,
    PromptLogprobs,
    SampledLogprobs,
    SampledTokens,
    SamplingParams,
    TokenLogprobs,
    sample,
    steered_logits,
)
from avmp.engine.tokenizer import Tokenizer, load_tokenizer
from avmp.engine.tp_step import (
    FollowerFailed,
    Leader,
    Replica,
    ShardBuilder,
    build_shard,
    rank_device,
)
from avmp.kernels.choice import KERNEL_CHOICES, use_triton
from avmp.memory.backing.device import TensorBacking
from avmp.memory.backing.shared_buffer import SharedBufferBacking
from avmp.memory.backing.torch_buffer import TorchBufferBacking
from avmp.memory.backing.unit_format import CacheFormat
from avmp.memory.backing.views import TORCH_DTYPES, build_views
from avmp.memory.registry import make_allocator
from avmp.memory.spec import (
    CHUNK_GRANULARITY_BYTES,
    AllocatorStats,
    CacheAllocator,
    MemoryConfig,
    MemoryUsage,
)
from avmp.memory.unified import unified_buffer_bytes
from avmp.models.geometry import ConvColumns, ModelGeometry
from avmp.sched.prefix import DeviceRates, PrefixCacheConfig
from avmp.sched.request import RequestSpec
from avmp.sched.scheduler import RequestStatus, Scheduler, SchedulerConfig, StepPlan
from avmp.sched.swap import (
    HOST_TIER_RATIO,
    Admission,
    PreemptionCosts,
    PreemptionMode,
    parse_choice,
)
from avmp.sched.timeline import TimelineRecorder
from avmp.sim.timing import ACTIVATION_COPIES, LOGIT_BYTES
from avmp.units import format_bytes

DTYPES = TORCH_DTYPES
ENGINE_ALLOCATORS = ("avmp", "static", "unified")
ENGINE_BACKINGS = ("torch", "cuda_vmm")
ENGINE_DEVICES = ("cpu", "cuda")
TIMELINE_SAMPLES = 200
# the default host tier (`HOST_TIER_RATIO` x the budget) takes at most this share of the
# host's available memory
HOST_TIER_MAX_SHARE = 0.5
# The prefill chunk timed for the auto rule's prefill speed, at most
PREFILL_PROBE_TOKENS = 2048
PROBE_REQUEST_ID = -1  # the timed chunk's request: prompts' ids count from 0
# One torch thread on the CPU: the engine's CPU steps are many small kernels, for which
# more threads cost more in hand-offs than they save, and far more on a busy machine.
DEFAULT_CPU_THREADS = 1


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from, besides the model and its tokenizer.

    Attributes:
        memory_bytes: cache budget for both pools (weights not included).
        device: ``cpu`` or ``cuda`` (``cuda:N`` for one GPU of several).
        dtype: compute dtype name; None keeps the checkpoint's.
        kernels: ``auto`` (Triton on CUDA when installed, else the torch reference),
            ``reference`` or ``triton`` (see `avmp.kernels.choice.use_triton`).
        cuda_graphs: with Triton on CUDA, replay decode steps as CUDA graphs (and, with
            ``mixed_graphs``, prefill and mixed steps).
        pad_decode: with Triton and no graphs, still pad decode steps to the graph sizes
            and run that padded pass eagerly (what a graph computes, checkable on the CPU).
        mixed_graphs: with ``cuda_graphs``, also replay prefill and mixed steps (prefill
            chunks beside decodes) as CUDA graphs, padded to token and sequence buckets
            (`avmp.engine.fast_runner`), for the models whose prefill path allows it.
        max_mixed_graphs: prefill and mixed graphs captured at most (each bucket met
            first captures one; past the cap, new buckets run eagerly).
        pad_mixed: with Triton and no graphs, still pad prefill and mixed steps to their
            buckets and run that padded pass eagerly (as ``pad_decode``).
        allocator: ``avmp`` (two pools, capacity migrates), ``static`` (SGLang's split,
            fixed at start-up) or ``unified`` (vLLM's padded block pool, on one plain
            buffer; see `avmp.memory.registry`). All run the same kernels.
        state_fraction: the static split's share of the budget for state (None: SGLang's).
        backing: what holds the pools: ``torch`` (one buffer on ``device``) or
            ``cuda_vmm`` (CUDA virtual memory, chunks mapped on demand).
        overlap: plan and launch each step before reading the previous step's tokens,
            so the scheduler's and the allocator's work runs while the device computes
            (a request that samples its end-of-sequence token then computes one more
            token, dropped). Off: every step waits for its own tokens.
        cpu_threads: torch's intra-op threads when ``device`` is the CPU (a process-wide
            setting, applied when the engine is built); None leaves torch's own.
        block_size: tokens per KV page.
        chunk_bytes: unit of capacity that migrates between the pools.
        max_num_seqs: running requests at most.
        max_num_batched_tokens: tokens per step at most (prefill is chunked under it).
        migration_batch_chunks: extra chunks moved per migration.
        ssm_dtype: dtype of the SSM state (None: the model's dtype).
        conv_columns: conv-state columns kept per layer (``d_conv - 1`` by default).
        check_integrity: run the allocator's invariant checks after every step (also on
            when ``AVMP_DEBUG=1``).
        preemption: how a preempted request gives its memory back: ``recompute``,
            ``swap`` (to the host tier) or ``auto`` (per victim, the cheaper; see
            `avmp.sched.swap.PreemptionMode`).
        admission: when a waiting request may start: ``greedy``, ``reserve`` (its and
            the running requests' growth must fit) or ``sglang`` (`Admission`).
        host_tier_bytes: pinned host memory for swapped-out requests; None: twice
            ``memory_bytes`` (SGLang HiCache's default ratio), at most half the host's
            available memory (0 under ``recompute``, which needs none).
        preemption_costs: the rates ``auto`` compares; None: measured when the engine is
            built (a timed pinned copy and a timed prefill chunk).
        max_model_len: prompt + max_tokens at most per request (vLLM's
            ``--max-model-len``); longer ones are refused (`RequestTooLarge`) or, in
            `Engine.generate`, rejected. None: only memory limits a request (none of
            the families the engine runs has learned absolute positions).
        prefix_cache: reuse cached prefixes (`avmp.sched.prefix`): KV pages keyed by
            their token ids and state checkpoints copied between slots
            (`avmp.engine.prefix_cache`). A `PrefixCacheConfig`, or a name of
            `PREFIX_CACHE_CHOICES` resolved for the model when the engine is built;
            None or ``off``: no caching, nothing changes.
        prefix_host_level: with a prefix cache named by policy, keep the checkpoints it
            evicts in the host tier as a second level (`avmp.sched.prefix.HostLevel`,
            ``PrefixCacheConfig.host_level``); needs a host tier (not ``recompute``,
            ``host_tier_bytes`` not 0).
        tensor_parallel: ranks the model is split over (1..8; on CUDA one GPU each,
            ``cuda:0`` .. ``cuda:N-1``). Above 1 the engine starts ranks 1..N-1 itself
            (or joins torchrun's group) and plans every step on rank 0
            (`avmp.engine.tp_step`); the budget and the host tier are each rank's.
        generation_config: whose ``generation_config.json`` to read
            (`avmp.engine.generation_config`): ``auto`` or ``vllm``, the checkpoint
            directory's (a built model has none); a path, that directory's or that file.
            Its end-of-sequence ids stop requests in every case; the sampling defaults
            it sets (`Engine.generation_defaults`, empty under ``vllm``) are for the
            callers that fill requests in, such as the server.
    """

    memory_bytes: int = 12 << 30
    device: str = "cpu"
    dtype: str | None = None
    kernels: str = "auto"
    cuda_graphs: bool = True
    pad_decode: bool = False
    mixed_graphs: bool = True
    max_mixed_graphs: int = DEFAULT_MAX_MIXED_GRAPHS
    pad_mixed: bool = False
    allocator: str = "avmp"
    state_fraction: float | None = None
    backing: str = "torch"
    overlap: bool = True
    cpu_threads: int | None = DEFAULT_CPU_THREADS
    block_size: int = 16
    chunk_bytes: int = CHUNK_GRANULARITY_BYTES
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    migration_batch_chunks: int = 0
    ssm_dtype: str | None = None
    conv_columns: ConvColumns = ConvColumns.VLLM
    check_integrity: bool = False
    preemption: PreemptionMode = PreemptionMode.AUTO
    admission: Admission = Admission.RESERVE
    host_tier_bytes: int | None = None
    preemption_costs: PreemptionCosts | None = None
    max_model_len: int | None = None
    prefix_cache: PrefixCacheConfig | str | None = None
    prefix_host_level: bool = False
    tensor_parallel: int = 1
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("dtype", "ssm_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
        _check_choice("kernels", self.kernels, KERNEL_CHOICES)
        _check_choice("allocator", self.allocator, ENGINE_ALLOCATORS)
        _check_choice("backing", self.backing, ENGINE_BACKINGS)
        self.torch_device()
        if self.state_fraction is not None and self.allocator != "static":
            raise ValueError("state_fraction applies to the static allocator only")
        if self.backing != "torch" and self.allocator == "unified":
            raise ValueError("the unified layout runs on one plain buffer; keep backing 'torch'")
        if self.backing == "cuda_vmm" and self.torch_device().type != "cuda":
            raise ValueError(f"backing 'cuda_vmm' needs a CUDA device, got {self.device!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_mixed_graphs < 0:
            raise ValueError(f"max_mixed_graphs must be >= 0, got {self.max_mixed_graphs}")
        if self.chunk_bytes > 0 and self.memory_bytes < self.chunk_bytes:  # named as here
            raise ValueError(f"memory_bytes ({self.memory_bytes}) must hold at least one "
                             f"chunk (chunk_bytes {self.chunk_bytes})")  # fmt: skip
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError("generation_config must be 'auto', 'vllm' or a path")
        self._check_preemption()
        self._check_prefix_cache()
        self._check_tensor_parallel()
        _ = self.memory_config, self.scheduler_config  # derived once: a bad value fails here
        object.__setattr__(self, "admission", self.scheduler_config.admission)

    def _check_types(self) -> None:
        # before the range checks: NaN passes every comparison, and a float or a bool
        # reaches torch (or slices a buffer) far from here
        for name in _WHOLE_FIELDS + _OPTIONAL_WHOLE_FIELDS:
            value = getattr(self, name)
            if not is_whole(value) and not (value is None and name in _OPTIONAL_WHOLE_FIELDS):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name in _FLAG_FIELDS:  # 'no' would be true
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _check_preemption(self) -> None:
        object.__setattr__(
            self, "preemption", parse_choice(PreemptionMode, "preemption", self.preemption)
        )
        if self.host_tier_bytes is not None and self.host_tier_bytes < 0:
            raise ValueError(f"host_tier_bytes must be >= 0, got {self.host_tier_bytes}")
        if self.host_tier_bytes == 0 and self.preemption is PreemptionMode.SWAP:
            raise ValueError("preemption 'swap' needs a host tier (0 bytes)")

    def _check_prefix_cache(self) -> None:
        choice = self.prefix_cache
        if choice is not None and not isinstance(choice, PrefixCacheConfig):
            check_prefix_choice(choice)  # a name, or raises
            if choice == "off":
                choice = None
                object.__setattr__(self, "prefix_cache", None)
        if self.prefix_host_level and not isinstance(choice, str):
            raise ValueError(
                "prefix_host_level keeps the prefix cache's evicted checkpoints in the host "
                "tier: it needs a prefix cache named by policy"
                + ("" if choice is None else " (a PrefixCacheConfig says host_level itself)")
            )
        host_level = self.prefix_host_level or (
            isinstance(choice, PrefixCacheConfig) and choice.host_level
        )
        no_tier = self.preemption is PreemptionMode.RECOMPUTE or self.host_tier_bytes == 0
        if host_level and no_tier:
            raise ValueError(
                "the prefix cache's host level keeps checkpoints in the host tier; "
                "preemption 'recompute' or host_tier_bytes 0 leave none"
            )

    def _check_tensor_parallel(self) -> None:
        size = self.tensor_parallel
        if not is_whole(size):
            raise ValueError(f"tensor_parallel must be a whole number, got {size!r}")
        if size == 1:
            return
        check_world_size(size, self.device)  # 1..8, and no more than the CUDA devices
        if self.torch_device().index is not None:
            raise ValueError(
                f"tensor_parallel {size} puts rank r on cuda:r; give device 'cuda', "
                f"not {self.device!r}"
            )

    def torch_device(self) -> torch.device:
        """The device as torch names it.

        Raises:
            ValueError: not a CPU or CUDA device name.
        """
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ENGINE_DEVICES:
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        return device

    @cached_property
    def memory_config(self) -> MemoryConfig:
        """How the allocator cuts the budget."""
        return MemoryConfig(
            self.memory_bytes, self.chunk_bytes, self.block_size, self.migration_batch_chunks
        )

    @cached_property
    def scheduler_config(self) -> SchedulerConfig:
        """How the scheduler batches and admits requests. Preemption is added by the
        engine once the host tier and the costs are resolved (`scheduler_config_with`)."""
        return SchedulerConfig(
            self.max_num_seqs, self.max_num_batched_tokens, admission=self.admission
        )

    def scheduler_config_with(
        self, host_tier_bytes: int, costs: PreemptionCosts | None
    ) -> SchedulerConfig:
        """The scheduler's config with this preemption policy, a host tier of
        ``host_tier_bytes`` and ``costs`` (needed under ``auto``); ``auto`` without a
        host tier recomputes (nowhere to swap to)."""
        preemption = self.preemption
        if preemption is PreemptionMode.AUTO and host_tier_bytes == 0:
            preemption = PreemptionMode.RECOMPUTE
        return dataclasses.replace(
            self.scheduler_config,
            preemption=preemption,
            host_tier_bytes=host_tier_bytes,
            costs=costs,
        )


_WHOLE_FIELDS = (
    "memory_bytes", "block_size", "chunk_bytes", "max_num_seqs", "max_num_batched_tokens",
    "migration_batch_chunks", "max_mixed_graphs",
)  # fmt: skip
_OPTIONAL_WHOLE_FIELDS = ("cpu_threads", "host_tier_bytes", "max_model_len")
_FLAG_FIELDS = (
    "cuda_graphs", "pad_decode", "mixed_graphs", "pad_mixed", "overlap", "check_integrity",
    "prefix_host_level",
)  # fmt: skip


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _checked_arrivals(arrival_s: list[float] | None, num_prompts: int) -> list[float]:
    """Per prompt, its arrival in seconds after the start (all 0 when None).

    Raises:
        ValueError: not one finite number >= 0 per prompt.
    """
    if arrival_s is None:
        return [0.0] * num_prompts
    if len(arrival_s) != num_prompts:
        raise ValueError(f"{len(arrival_s)} arrival times for {num_prompts} prompts")
    for index, value in enumerate(arrival_s):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"arrival_s[{index}] must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"arrival_s[{index}] must be finite and >= 0, got {value!r}")
    return [float(value) for value in arrival_s]


@dataclass(frozen=True)
class GenerationOutput:
    """One prompt's result.

    Attributes:
        finish_reason: ``stop`` (end-of-sequence token), ``length`` (max_tokens reached)
            or ``rejected`` (the request could never fit in memory; ``error`` says why).
        num_preemptions: how often it was preempted and recomputed.
        arrival_s: when the prompt arrived, in seconds after `Engine.generate` started
            (its ``arrival_s``; 0 when every prompt is there from the start).
        joined_s: when it joined the scheduler: at or after ``arrival_s``, since the
            engine adds arrivals between steps (None: never added, not yet arrived).
        first_token_s: when the host read its first generated token (None: none).
        finish_s: when the host read its last generated token (None: none).
        prompt_logprobs: with `Engine.generate`'s ``prompt_logprobs``, as
            `RequestUpdate.prompt_logprobs` gives them; else None.
    """

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    num_preemptions: int = 0
    error: str | None = None
    arrival_s: float = 0.0
    joined_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token, from the arrival (None without tokens)."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (0 for one token, as vLLM's
        goodput counts it; None without tokens)."""
        if self.first_token_s is None or self.finish_s is None:
            return None
        if len(self.token_ids) <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (len(self.token_ids) - 1)


@dataclass
class EngineStats:
    """What one `generate` call did, for the CLI and the tests."""

    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_computed_tokens: int = 0
    num_recompute_tokens: int = 0
    num_preemptions: int = 0
    elapsed_s: float = 0.0
    idle_s: float = 0.0  # slept waiting for the next arrival
    num_swapped_out: int = 0  # preempted requests copied to the host tier
    num_swapped_in: int = 0  # resumed from it
    swapped_bytes: int = 0  # copied between the device and the host tier, both ways
    allocator: AllocatorStats = field(default_factory=AllocatorStats)
    usage: MemoryUsage | None = None
    peak_kv_capacity_bytes: int = 0
    peak_state_capacity_bytes: int = 0
    timeline: list[dict[str, float]] = field(default_factory=list)
    prefix: PrefixCounts = field(default_factory=PrefixCounts)  # this call's; zero when off

    @property
    def generated_tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


_UNFINISHED = (RequestStatus.WAITING, RequestStatus.RUNNING)
# finish reasons after which a token still on the device for the request is dropped
_DROPS_LATE_TOKENS = ("stop", "abort")
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def is_whole(value: object) -> bool:
    """An int (numpy's and torch's integers too), not a bool: NaN, 1.5 and '4' are not."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class RequestOptions:
    """One request's sampling and stopping (`Engine.add_request`).

    Attributes:
        max_tokens: tokens to generate at most (>= 1).
        temperature: 0 means greedy (argmax).
        top_p: nucleus sampling's mass, in (0, 1].
        top_k: keep the ``top_k`` most likely tokens before top-p (0: off).
        min_p: keep the tokens at least ``min_p`` times as likely as the most likely one
            (0: off; vLLM's).
        seed: the seed of the request's own generator, which makes its tokens the same
            whatever shares the batch; None: the engine picks one (the request's id).
        stop_token_ids: finish (reason ``stop``) after sampling one of these; the token
            stays in the output, as OpenAI and vLLM do for ids.
        ignore_eos: keep generating after the end-of-sequence token.
        min_tokens: tokens to generate before the end-of-sequence token or a stop id may
            be sampled (vLLM's ``min_tokens``: their logits are masked until then).
        logprobs: None, or report each output token's log-probability and those of the
            ``logprobs`` most likely tokens there (0 to `MAX_LOGPROBS`;
            `RequestUpdate.new_logprobs`).
        logit_bias: (token id, amount) pairs added to the logits before sampling (OpenAI's
            ``logit_bias``, amounts in [-100, 100]); the reported log-probabilities stay
            the model's.
        frequency_penalty, presence_penalty: OpenAI's, in [-2, 2]: subtracted from a
            token's logit per time it occurs in the output, and once if it does.
        repetition_penalty: vLLM's, > 0 (1: off): a logit of a token seen in the prompt
            or the output is divided by it when positive, multiplied when negative.
        prompt_logprobs: None, or report for every prompt position p >= 1 the
            log-probability of prompt token p given the tokens before it, its rank and
            the ``prompt_logprobs`` most likely tokens there (0 to `MAX_LOGPROBS`;
            `RequestUpdate.prompt_logprobs`). Computed per prefill chunk; such a request
            computes its whole prompt (it takes no prefix-cache hit).
        prefix_boundary: prompt tokens that other requests are likely to share (a chat's
            leading system messages: `avmp.serve.chat.system_prompt_end`); the ``avmp``
            prefix cache keeps a checkpoint there when memory is idle
            (`avmp.sched.prefix.segment_boundaries`). 0: none; a boundary at or past the
            prompt's end is ignored. Outputs do not depend on it.
        grammar: None, or what the output must match (`GrammarSpec`: a JSON schema, a
            regular expression, choices, a Lark grammar): each token is sampled from
            those the grammar allows next, and the request finishes (reason ``stop``)
            once the grammar is complete. The reported log-probabilities stay the
            model's. `Engine.add_request` compiles it (ValueError if it does not).
    Raises:
        ValueError: a bad value (one line naming it).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    prefix_boundary: int = 0
    prompt_logprobs: int | None = None
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        if not is_whole(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a whole number >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "min_p"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        self.sampling(0)  # temperature, top_p and top_k are checked there
        low, high = SEED_RANGE
        if self.seed is not None and (not is_whole(self.seed) or not low <= self.seed < high):
            raise ValueError(f"seed must be a whole number in [-2**63, 2**64), got {self.seed!r}")
        stop = self.stop_token_ids
        if not isinstance(stop, (tuple, list)) or not all(is_whole(t) and t >= 0 for t in stop):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {stop!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not is_whole(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be a whole number in [0, max_tokens = "
                             f"{self.max_tokens}], got {self.min_tokens!r}")  # fmt: skip
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_whole(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or a whole number in [0, {MAX_LOGPROBS}], "
                                 f"got {value!r}")  # fmt: skip
        bias = self.logit_bias
        if not isinstance(bias, (tuple, list)) or not all(
            isinstance(pair, (tuple, list)) and len(pair) == 2 and is_whole(pair[0])
            and pair[0] >= 0 and _is_number(pair[1]) and -100 <= pair[1] <= 100
            for pair in bias
        ):  # fmt: skip
            raise ValueError(f"logit_bias must be (token id >= 0, amount in [-100, 100]) pairs, "
                             f"got {bias!r}")  # fmt: skip
        object.__setattr__(self, "logit_bias", tuple((int(t), float(a)) for t, a in bias))
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        value = self.repetition_penalty
        if not _is_number(value) or not 0.0 < value < math.inf:
            raise ValueError(f"repetition_penalty must be a number > 0, got {value!r}")
        if not is_whole(self.prefix_boundary) or self.prefix_boundary < 0:
            raise ValueError(
                f"prefix_boundary must be a whole number >= 0, got {self.prefix_boundary!r}"
            )
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise ValueError(f"grammar must be None or a GrammarSpec, got {self.grammar!r}")

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on."""
        return bool(self.frequency_penalty or self.presence_penalty
                    or self.repetition_penalty != 1.0)  # fmt: skip

    def sampling(self, seed: int) -> SamplingParams:
        """These settings as the sampler takes them, with the generator's ``seed``."""
        return SamplingParams(self.temperature, self.top_p, self.top_k, seed, self.min_p)


@dataclass(frozen=True)
class RequestUpdate:
    """What one request produced since its last update (`Engine.step`).

    Attributes:
        new_token_ids: tokens read since the last update (may be empty, e.g. in the
            final update of an abort).
        finish_reason: None while running; ``stop`` (end-of-sequence or a stop id),
            ``length``, ``abort`` or ``rejected`` (the scheduler could never fit it).
        error: why it was rejected.
        num_output_tokens: every token produced so far, ``new_token_ids`` included.
        num_preemptions: how often the request was preempted so far.
        new_logprobs: one per new token when the request asked for them
            (`RequestOptions.logprobs`), else None.
        prompt_logprobs: when the request asked for them
            (`RequestOptions.prompt_logprobs`), in its first update that carries tokens
            or its final one, whichever comes first: one entry per prompt position,
            None for the first (nothing precedes it), then each prompt token's (with its
            rank); shorter only when the request ended before its prompt was computed.
            None in every other update.
    """

    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    error: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int = 0
    new_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class RequestTooLarge(ValueError):
    """A prompt (+ max_tokens) that this engine can never hold: longer than its
    ``max_model_len`` if one is set, or than its memory (the scheduler's own
    can-ever-fit rule). Raised by `Engine.add_request` before anything is queued."""


@dataclass
class EngineTotals:
    """One engine's counters since it was built (`EngineStats` covers one `generate`
    call): what a server's metrics report."""

    num_steps: int = 0
    num_preemptions: int = 0
    num_swapped_out: int = 0
    num_swapped_in: int = 0
    swapped_bytes: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_requests: int = 0  # joined the batch
    num_aborted: int = 0
    num_rejected: int = 0
    prefix: PrefixCounts = field(default_factory=PrefixCounts)  # zero without a prefix cache


@dataclass(frozen=True)
class _PromptSpan:
    """Prompt positions ``first .. first + count - 1`` of one request whose
    log-probabilities a step computes (`RequestOptions.prompt_logprobs`)."""

    request_id: int
    first: int
    count: int


class _Pending:
    """A launched step whose sampled tokens the host has not read yet: the requests that
    sampled, in row order, and their tokens; and the prompt log-probabilities it
    computed, span after span."""

    __slots__ = ("request_ids", "tokens", "index", "logprobs", "logprob_ids", "prompt",
                 "prompt_spans")  # fmt: skip

    def __init__(
        self,
        request_ids: list[int],
        tokens: SampledTokens,
        logprobs: SampledLogprobs | None = None,
        logprob_ids: list[int] | None = None,
    ) -> None:
        self.request_ids = request_ids
        self.tokens = tokens
        self.index = {request_id: i for i, request_id in enumerate(request_ids)}
        self.logprobs = logprobs  # of the requests in ``logprob_ids``, in that order
        self.logprob_ids = logprob_ids or []
        self.prompt: PromptLogprobs | None = None
        self.prompt_spans: list[_PromptSpan] = []


class _Live:
    """An unfinished request, or a finished one whose final update is not out yet: its
    tokens so far, its sampling settings and generator, the token ids that stop it, how
    many output tokens its updates have carried, and when it arrived, joined the
    scheduler and had its first and latest token read (seconds after the engine's
    clock started: `Engine.generate` restarts it)."""

    __slots__ = (
        "index", "prompt", "tokens", "max_tokens", "sampling", "generator", "stop_ids",
        "min_tokens", "logprobs_k", "logprobs", "logit_bias", "penalties", "finish_reason",
        "error", "num_reported", "prefix_boundary", "prompt_logprobs_k", "prompt_logprobs",
        "prompt_reported", "matcher",
        "arrival_s", "joined_s", "first_token_s", "last_token_s",
    )  # fmt: skip

    def __init__(
        self,
        index: int,
        prompt: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_ids: frozenset[int],
        generator: torch.Generator | None,
        arrival_s: float,
        min_tokens: int = 0,
        logprobs_k: int | None = None,
        logit_bias: tuple[tuple[int, float], ...] = (),
        penalties: tuple[float, float, float] | None = None,
    ) -> None:
        self.index = index
        self.prompt = prompt
        self.tokens = list(prompt)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stop_ids = stop_ids
        self.min_tokens = min_tokens
        self.logprobs_k = logprobs_k
        self.logprobs: list[TokenLogprobs] = []  # one per output token, when asked for
        self.logit_bias = logit_bias
        self.penalties = penalties  # frequency, presence, repetition; None: all off
        self.prefix_boundary = 0  # `RequestOptions.prefix_boundary`
        self.prompt_logprobs_k: int | None = None  # `RequestOptions.prompt_logprobs`
        # per prompt position computed so far, when asked for (position 0 has none)
        self.prompt_logprobs: list[TokenLogprobs | None] = [None]
        self.prompt_reported = False  # went out in an update
        self.matcher: Any = None  # `RequestOptions.grammar`'s llguidance matcher, if any
        self.generator = generator
        self.finish_reason = ""
        self.error: str | None = None
        self.num_reported = 0
        self.arrival_s = arrival_s
        self.joined_s: float | None = None
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None


class Engine:
    """Runs one hybrid model with its caches in AVMP pools (or a baseline's layout).

    Args:
        model: a checkpoint directory, or an already built `HybridModel`.
        config: how to run it (default: `EngineConfig`'s defaults).
        tokenizer: overrides the checkpoint's tokenizer.

    Raises:
        ValueError: a device this machine lacks, a budget larger than the device or the
            host holds (checked before loading; once loaded, weights + budget + the
            activation estimate, `activation_estimate_bytes`), a host tier larger than
            the host's available memory (`resolve_host_tier_bytes`), a checkpoint that
            cannot be loaded, or a model the engine cannot cache exactly.
    """

    def __init__(
        self,
        model: str | Path | HybridModel | ShardBuilder,
        config: EngineConfig | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        config = config or EngineConfig()
        if isinstance(model, (str, Path)):  # its config, weights, tokenizer, generation config
            model = Path(model).expanduser()
        if os.environ.get("AVMP_DEBUG") == "1":
            config = dataclasses.replace(config, check_integrity=True)
        self.config = config
        self.device = config.torch_device()
        check_device_holds(self.device, config.memory_bytes)
        self.host_tier_bytes = resolve_host_tier_bytes(config)
        if self.device.type == "cpu" and config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        # rank 0 of several (`avmp.engine.tp_step`); None: one rank, no broadcast anywhere
        self._leader: Leader | None = None
        if config.tensor_parallel > 1:
            self._leader = Leader.start(model, config, self.host_tier_bytes)
            self.device = rank_device(config, self._leader.tp)
        try:
            self._build(model, tokenizer)
        except BaseException:
            if self._leader is not None:
                self._leader.stop()
            raise
        self._prefix_seen = PrefixCounts()  # the prefix cache's counts at the last step
        self.stats = EngineStats()
        self.totals = EngineTotals()
        self._next_request_id = 0
        self._timeline = TimelineRecorder(TIMELINE_SAMPLES)
        self._start = time.perf_counter()
        self._requests: dict[int, _Live] = {}  # by id, until their final update is out
        self._touched: dict[int, None] = {}  # ids with news since the last update, in order
        self._aborts: list[int] = []  # ids to abort at the next step
        # during `generate`: each finished request's preemptions, by id (the scheduler
        # forgets a request once its final update is out)
        self._generating: dict[int, int] | None = None
        self._closed = False
        # every id that ends a request (config.json's, generation_config.json's, else
        # the tokenizer's); the first is the one a grammar's finished output gets
        self.eos_token_ids = self._eos_token_ids()
        self._eos = self.eos_token_ids[0] if self.eos_token_ids else None
        # grammars compile against the tokenizer on first use (`RequestOptions.grammar`)
        self._grammars = GrammarCompiler(self.tokenizer, self._eos, self.geometry.vocab_size)
        self._masks: GrammarMasks | None = None
        self._guided: set[int] = set()  # ids of the requests with a grammar, until forgotten
        self.overlap = config.overlap  # may be switched between `generate` calls
        self._pending: _Pending | None = None

    # -- construction ---------------------------------------------------------------

    def _build(
        self, model: str | Path | HybridModel | ShardBuilder, tokenizer: Tokenizer | None
    ) -> None:
        """Load the model, build the memory and the runner, and the scheduler over them.
        On rank 0 of several: the byte operations are logged for the followers from the
        allocator's first call on, and the followers are waited for before any run."""
        config, leader = self.config, self._leader
        self.generation_defaults = resolve_generation_config(config.generation_config, model)
        self.model = self._load(model)
        self.tokenizer = tokenizer
        if tokenizer is None and isinstance(model, (str, Path)):
            self.tokenizer = load_tokenizer(model)
        self.geometry = self._geometry()
        # the output-token counts of the requests with penalties, on the device
        self._penalties = PenaltyCounts(self.geometry.vocab_size, self.device)
        self._check_fits()
        self.allocator, self.backing, cache_format = self._memory()
        if leader is not None:
            leader.log.watch_backing(self.backing)
        warm_up_compaction(self.device, cache_format)
        self.views = PoolViews(build_views(self.backing, cache_format))
        self.runner = self._runner()
        self.swapper = self._swapper(cache_format)
        if leader is not None:
            leader.wait_ready()
        self.preemption_costs = config.preemption_costs or self._measure_costs()
        self.prefix_cache = resolve_prefix_cache(
            config.prefix_cache, self.geometry, config.block_size, self._prefix_rates(),
            host_level=config.prefix_host_level,
        )  # fmt: skip
        self.slot_copier = StateSlotCopier(self.backing)
        self.scheduler = self._scheduler()

    def _runner(self) -> ModelRunner:
        """The reference runner, or (where ``kernels`` resolves to Triton on this device)
        the fast one: one host-to-device copy per step, decode graphs, and the layers'
        Triton kernels, given to the model here, once."""
        return build_runner(self.model, self.views, self.config, self.device)

    def _swapper(self, cache_format: CacheFormat) -> HostSwapper | None:
        """The host tier's arena and copier, allocated once (none under recompute);
        logged on rank 0 of several."""
        swapper = build_swapper(self.config, self.backing, cache_format, self.host_tier_bytes)
        if swapper is None or self._leader is None:
            return swapper
        return self._leader.log.swapper(swapper)  # type: ignore[return-value]

    def _measure_costs(self) -> PreemptionCosts | None:
        """The rates ``auto`` compares, measured here: the copy bandwidth of a pinned
        copy and the prefill speed of one chunk of at most `PREFILL_PROBE_TOKENS`
        tokens run through this engine's runner and memory. None unless ``auto``, or
        when not even one token fits (no request can ever run, so none is preempted)."""
        if self.config.preemption is not PreemptionMode.AUTO or not self.host_tier_bytes:
            return None  # nothing to compare: without a host tier `auto` recomputes
        return self._probe_costs()

    def _probe_costs(self) -> PreemptionCosts | None:
        """The prefill speed and host copy bandwidth measured here (`_measure_costs`);
        None when not even one token fits."""
        num_tokens = min(self.config.max_num_batched_tokens, PREFILL_PROBE_TOKENS)
        runner = self.runner if self._leader is None else self._leader.probe_runner(self.runner)
        prefill_s = measure_prefill_s_per_token(
            runner, self.views, self.allocator, PROBE_REQUEST_ID, num_tokens,
            self.geometry.vocab_size,
        )  # fmt: skip
        if prefill_s is None:
            return None
        return PreemptionCosts(prefill_s, measure_copy_bandwidth(self.device))

    def _prefix_rates(self) -> DeviceRates | None:
        """The prefix cache's rules priced at this device (`device_rates`): the speeds
        ``auto`` measured, else measured here. None where no policy name is resolved (no
        cache, or a `PrefixCacheConfig` given whole) or not even one token fits."""
        choice = self.config.prefix_cache
        if choice is None or isinstance(choice, PrefixCacheConfig):
            return None
        costs = self.preemption_costs or self._probe_costs()
        if costs is None:
            return None
        chunk = min(self.config.max_num_batched_tokens, PREFILL_PROBE_TOKENS)
        return device_rates(self.geometry, costs, chunk, self.device)

    def _scheduler(self) -> Scheduler:
        """The scheduler with the resolved host tier and costs. Under ``auto`` without
        costs (nothing fits, so nothing is ever preempted) it recomputes."""
        config = self.config
        if config.preemption is PreemptionMode.AUTO and self.preemption_costs is None:
            config = dataclasses.replace(config, preemption=PreemptionMode.RECOMPUTE)
        scheduler_config = config.scheduler_config_with(self.host_tier_bytes, self.preemption_costs)
        if self.prefix_cache is None:
            return Scheduler(self.allocator, scheduler_config, self.swapper)
        check_room_for_checkpoint(self.allocator)
        scheduler_config = dataclasses.replace(scheduler_config, prefix_cache=self.prefix_cache)
        copier = self.slot_copier
        if self._leader is not None:
            copier = self._leader.log.slot_copier(copier)  # type: ignore[assignment]
        scheduler = Scheduler(
            self.allocator, scheduler_config, self.swapper, copier, self._token_ids
        )
        if scheduler.prefix is not None:
            scheduler.prefix.may_stop = self._may_stop
        if self.swapper is not None and scheduler.prefix is not None:  # host level, if asked
            scheduler.prefix.use_host_tier(scheduler.host_tier, HostCheckpointCopies(self.swapper))
        return scheduler

    def _may_stop(self, request_id: int) -> bool:
        """Whether a request can finish before its max_tokens (a stop token it may
        sample, or a grammar it may complete): the prefix cache takes stop checkpoints
        only for those."""
        request = self._requests[request_id]
        return bool(request.stop_ids) or request.matcher is not None

    def _token_ids(self, request_id: int) -> list[int]:
        """A request's tokens read so far (the prefix cache keys its units by them)."""
        return self._requests[request_id].tokens

    def _load(self, model: str | Path | HybridModel | ShardBuilder) -> HybridModel:
        if self._leader is not None:  # rank 0's shard
            return build_shard(model, self.config, self._leader.tp, self.device)
        torch_dtype = None if self.config.dtype is None else DTYPES[self.config.dtype]
        if isinstance(model, HybridModel):
            return model.to(device=self.device, dtype=torch_dtype).eval()
        if not isinstance(model, (str, Path)):  # a ShardBuilder: one rank's, the whole
            return build_shard(model, self.config, TensorParallel(), self.device)
        return load_model(model, torch_dtype, str(self.device))

    def _geometry(self) -> ModelGeometry:
        return model_geometry(self.model, self.config)

    def _check_fits(self) -> None:
        """Weights (loaded, on the device), the cache budget and the activation estimate
        against the device's memory, before the cache is allocated."""
        check_fits(self.model, self.geometry, self.config, self.device)

    def _memory(self) -> tuple[CacheAllocator, TensorBacking, CacheFormat]:
        """The allocator, the backing it drives and the byte format the views read."""
        return build_memory(self.config, self.geometry, self.device)

    # -- requests, one step at a time -----------------------------------------------
    # Not thread-safe: one thread adds, aborts and steps (`avmp.engine.loop` is that
    # thread for an asyncio server).

    def add_request(self, prompt: str | list[int], options: RequestOptions) -> int:
        """Queue one request; it joins the batch at the next `step`.

        Returns:
            The request's id, which its updates carry.
        Raises:
            ValueError: an empty prompt, a token id outside the vocabulary (in the prompt
                or in ``logit_bias``), or text without a tokenizer.
            RequestTooLarge: a request this engine can never hold
                (`check_request_fits`); nothing is queued.
            TypeError: ``options`` is not a `RequestOptions`.
            RuntimeError: the engine is closed.
        """
        self._check_open()
        if not isinstance(options, RequestOptions):
            raise TypeError(f"options must be a RequestOptions, got {options!r:.80}")
        ids = self._encode(prompt)
        vocab = self.geometry.vocab_size
        if any(token >= vocab for token, _ in options.logit_bias):
            raise ValueError(f"logit_bias token ids must lie in [0, {vocab})")
        self.check_request_fits(len(ids), options.max_tokens)
        request_id = self._register(ids, options, None, self._now())
        self._join(request_id, self._now())
        return request_id

    def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` into the cache `add_request` takes grammars from; safe to call
        from any thread (a server compiles off the engine thread, which then only copies
        the compiled grammar).

        Raises:
            ValueError: one line: the grammar does not compile, or the tokenizer cannot
                take grammars (`avmp.engine.grammar.GrammarCompiler.matcher`).
        """
        self._grammars.matcher(spec)

    def check_request_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request that could never run: more tokens than ``max_model_len``
        (where set), or than an empty memory holds (the scheduler's rejection rule).

        Raises:
            RequestTooLarge: one line with the sizes.
        """
        reason = self._length_limit_error(num_prompt_tokens, max_tokens)
        total = num_prompt_tokens + max_tokens
        if reason is None and not self.allocator.fits_alone(total):
            budget = format_bytes(self.config.memory_bytes)
            reason = (
                f"prompt {num_prompt_tokens} + max_tokens {max_tokens} = {total} tokens "
                f"do not fit even in an empty memory of {budget} ({self.config.allocator})"
            )
        if reason is not None:
            raise RequestTooLarge(reason)

    def max_request_tokens(self) -> int:
        """The most tokens (prompt + output) a request may have: ``max_model_len``
        where set, else what an empty memory holds (`check_request_fits`' rules), found
        by doubling and halving over `CacheAllocator.fits_alone`."""
        if self.config.max_model_len is not None:
            return self.config.max_model_len
        fits, too_many = 0, 1
        while self.allocator.fits_alone(too_many):
            fits, too_many = too_many, too_many * 2
            if too_many > 1 << 40:  # memory no request can run out of
                return fits
        while too_many - fits > 1:
            middle = (fits + too_many) // 2
            fits, too_many = (middle, too_many) if self.allocator.fits_alone(middle) \
                else (fits, middle)  # fmt: skip
        return fits

    def _length_limit_error(self, num_prompt_tokens: int, max_tokens: int) -> str | None:
        limit = self.config.max_model_len
        total = num_prompt_tokens + max_tokens
        if limit is None or total <= limit:
            return None
        return (
            f"prompt {num_prompt_tokens} + max_tokens {max_tokens} = {total} tokens is "
            f"more than max_model_len {limit}"
        )

    def abort_request(self, request_id: int) -> None:
        """Abort a request at the next `step`: its pages, slot and host-tier copy are
        freed there, a token still on the device for it is dropped, and that step
        returns its final update (reason ``abort``). Unknown or finished ids are
        ignored; aborting twice is aborting once."""
        self._aborts.append(request_id)

    def step(self) -> list[RequestUpdate]:
        """Apply the aborts, then run one scheduler step (plan, launch, and read the
        previous step's tokens under ``overlap``); with nothing to plan, read the last
        step's tokens.

        Returns:
            The updates of the requests whose tokens were read, or that finished, in
            this call; each request's final update (``finished``) comes exactly once.
        Raises:
            RuntimeError: the engine is closed.
        """
        self._check_open()
        self._apply_aborts()
        if self.scheduler.has_unfinished:
            self._step()
        else:
            self._settle()  # nothing to plan: the last step's tokens, if still unread
        return self._updates()

    @property
    def uses_prefix_boundaries(self) -> bool:
        """Whether `RequestOptions.prefix_boundary` places anything: the ``avmp`` prefix
        cache is on (the peers' rules take no boundary)."""
        prefix = self.scheduler.prefix
        return prefix is not None and prefix.tree.config.policy == "avmp"

    @property
    def has_unfinished_requests(self) -> bool:
        """Whether a request still awaits its final update from `step`."""
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def close(self) -> None:
        """Release the cache's memory: the pools, the decode graphs and the host tier
        (the weights stay). The engine runs nothing afterwards; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending = None
        self._requests.clear()
        self._penalties = PenaltyCounts(self.geometry.vocab_size, self.device)
        self._touched.clear()
        self._aborts.clear()
        self.scheduler.swapper = None
        self.swapper = None
        del self.runner, self.views  # they hold views of the pools, and the graphs
        self.backing.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        if self._leader is not None:  # the followers release theirs and exit
            self._leader.stop()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")
        if self._leader is not None and self._leader.stopped:  # a follower failed
            raise FollowerFailed("the tensor-parallel group has stopped; build a new engine")

    # -- generation -----------------------------------------------------------------

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        max_tokens: int | list[int] = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        ignore_eos: bool = False,
        arrival_s: list[float] | None = None,
        prompt_logprobs: int | None = None,
    ) -> list[GenerationOutput]:
        """Generate up to ``max_tokens`` tokens for every prompt (one limit for all, or
        one per prompt), batched continuously: `add_request` and `step` until done.

        Args:
            seed: prompt ``i`` samples from a generator seeded ``seed + i``.
            arrival_s: replay a trace: per prompt, the seconds after this call starts at
                which it arrives (in any order). A prompt joins the scheduler only once
                the wall clock reaches its arrival; while none is unfinished the engine
                sleeps until the next one. None: every prompt is there from the start.
            prompt_logprobs: every prompt's log-probabilities, with the ``k`` most
                likely tokens per position (`RequestOptions.prompt_logprobs`).
        Returns:
            One output per prompt, in prompt order, with its arrival, first-token and
            finish times. A prompt that can never fit is ``rejected``, not raised.
        Raises:
            ValueError: an empty prompt, a token id outside the vocabulary, text
                prompts without a tokenizer, bad sampling settings, or arrival times
                that are not one finite number >= 0 per prompt.
            RuntimeError: requests added with `add_request` are unfinished.
        """
        self._check_open()
        if self.has_unfinished_requests:
            raise RuntimeError("generate() needs an idle engine: added requests are unfinished")
        limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else max_tokens
        if len(limits) != len(prompts):
            raise ValueError(f"{len(limits)} max_tokens for {len(prompts)} prompts")
        if any(limit < 1 for limit in limits):
            raise ValueError(f"max_tokens must be >= 1, got {min(limits)}")
        arrivals = _checked_arrivals(arrival_s, len(prompts))
        options = [
            RequestOptions(
                limit,
                temperature,
                top_p,
                seed=seed + index,
                ignore_eos=ignore_eos,
                prompt_logprobs=prompt_logprobs,
            )
            for index, limit in enumerate(limits)
        ]
        token_prompts = [self._encode(prompt) for prompt in prompts]
        self.stats = EngineStats(num_prompt_tokens=sum(len(p) for p in token_prompts))
        before = copy.deepcopy(self.allocator.stats)
        self._timeline = TimelineRecorder(TIMELINE_SAMPLES)
        self._start = time.perf_counter()
        live = {}
        for index, prompt in enumerate(token_prompts):
            request_id = self._register(prompt, options[index], index, arrivals[index])
            live[request_id] = self._requests[request_id]
        self._generating = {}
        try:
            self._run(live, deque(sorted(live, key=lambda r: (live[r].arrival_s, r))))
            self.stats.elapsed_s = self._now()
            outputs = [
                self._output(rid, live[rid]) for rid in sorted(live, key=lambda r: live[r].index)
            ]
        finally:
            self._generating = None
        self.stats.timeline = self._timeline.samples()
        self._finish_stats(before)
        self.stats.num_generated_tokens = sum(len(o.token_ids) for o in outputs)
        return outputs

    def _run(self, live: dict[int, _Live], arrivals: deque[int]) -> None:
        """Step until every request has arrived and none is unfinished. Arrivals join
        between steps; with nothing to run, the last step's tokens are read (they
        finish requests) and the engine sleeps until the next arrival."""
        while arrivals or self.scheduler.has_unfinished:
            self._join_arrivals(live, arrivals)
            if self.scheduler.has_unfinished:
                self.step()
            elif arrivals:
                self.step()  # reads the last step's tokens
                wait_s = live[arrivals[0]].arrival_s - self._now()
                if wait_s > 0:
                    time.sleep(wait_s)
                    self.stats.idle_s += wait_s
        self.step()  # the last step's tokens
        if self.has_unfinished_requests:
            raise RuntimeError(f"requests {sorted(self._requests)} left without a final update")

    def _now(self) -> float:
        """Seconds since the engine's clock started (its construction, or the start of
        the current `generate` call)."""
        return time.perf_counter() - self._start

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = _token_ids(prompt)
        vocab = self.geometry.vocab_size
        if not ids:
            raise ValueError("a prompt must have at least one token")
        if min(ids) < 0 or max(ids) >= vocab:  # C loops: a 128k prompt in about a ms
            raise ValueError(f"token ids must lie in [0, {vocab})")
        return ids

    def _register(
        self, prompt: list[int], options: RequestOptions, index: int | None, arrival_s: float
    ) -> int:
        """Record a request (not yet in the scheduler) under the next id; ``index``: its
        place among `generate`'s prompts (None: its id)."""
        matcher = None if options.grammar is None else self._grammars.matcher(options.grammar)
        request_id = self._next_request_id
        self._next_request_id += 1
        seed = request_id if options.seed is None else options.seed
        sampling = options.sampling(seed)
        generator = None
        if not sampling.is_greedy:
            generator = torch.Generator(self.device).manual_seed(seed)
        stop_ids = set(options.stop_token_ids)
        if not options.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        self._requests[request_id] = _Live(
            request_id if index is None else index,
            prompt,
            options.max_tokens,
            sampling,
            frozenset(stop_ids),
            generator,
            arrival_s,
            options.min_tokens,
            options.logprobs,
            options.logit_bias,
            (options.frequency_penalty, options.presence_penalty, options.repetition_penalty)
            if options.penalized
            else None,
        )
        self._requests[request_id].prefix_boundary = options.prefix_boundary
        self._requests[request_id].prompt_logprobs_k = options.prompt_logprobs
        self._requests[request_id].matcher = matcher
        if matcher is not None:
            self._guided.add(request_id)
        if options.penalized:
            self._penalties.add(request_id, prompt)
        return request_id

    def _join_arrivals(self, live: dict[int, _Live], arrivals: deque[int]) -> None:
        """Add to the scheduler, in arrival order, every request whose arrival the
        clock has reached (ids taken from the front of ``arrivals``)."""
        now = self._now()
        while arrivals and live[arrivals[0]].arrival_s <= now:
            self._join(arrivals.popleft(), now)

    def _join(self, request_id: int, now: float) -> None:
        """Hand a registered request to the scheduler, which queues or rejects it."""
        request = self._requests[request_id]
        request.joined_s = now
        self.totals.num_requests += 1
        self.totals.num_prompt_tokens += len(request.prompt)
        reason = self._length_limit_error(len(request.prompt), request.max_tokens)
        if reason is None:
            num_prompt, boundary = len(request.prompt), request.prefix_boundary
            segments = ()
            if 0 < boundary < num_prompt:  # the prefix cache keys units by token ids
                segments = ((("head", request_id), boundary),
                            (("rest", request_id), num_prompt - boundary))  # fmt: skip
            spec = RequestSpec(
                request_id, request.arrival_s, num_prompt, request.max_tokens, segments,
                reads_prefix_cache=request.prompt_logprobs_k is None,
            )  # fmt: skip
            rejection = self.scheduler.add_request(spec)
            reason = None if rejection is None else rejection.reason
        if reason is not None:
            self._finish(request_id, "rejected", reason)

    def _finish(self, request_id: int, reason: str, error: str | None = None) -> None:
        """Mark a request finished; its final update goes out once no token of it is
        left on the device (`_updates`)."""
        request = self._requests[request_id]
        if reason == "rejected" and request.finish_reason != "rejected":
            self.totals.num_rejected += 1
        request.finish_reason = reason
        request.error = error
        self._touched[request_id] = None

    def _apply_aborts(self) -> None:
        """Stop every request aborted since the last step: the scheduler frees its
        pages and slot (and its host-tier copy, if swapped out)."""
        aborts, self._aborts = self._aborts, []
        for request_id in aborts:
            request = self._requests.get(request_id)
            if request is None or request.finish_reason:
                continue  # unknown, or finished already
            scheduled = self.scheduler.requests.get(request_id)
            if scheduled is not None and scheduled.status in _UNFINISHED:
                self.scheduler.stop(request_id)
            self._finish(request_id, "abort")
            self.totals.num_aborted += 1

    def _step(self) -> None:
        """Plan, launch and finish one step. With ``overlap`` the step is launched before
        the previous step's tokens are read, so planning it (the allocator's work) ran
        while the device computed the previous one; an end-of-sequence token is then
        learned one step late (`_settle`)."""
        plan = self.scheduler.schedule()
        for rejection in plan.rejected:
            if rejection.request_id in self._requests:  # else: reported already
                self._finish(rejection.request_id, "rejected", rejection.reason)
        self._count(plan)
        if plan.is_empty:
            late = self._settle()
            stopped = [request_id for request_id in late if self.scheduler.stop(request_id)]
            if self.scheduler.has_unfinished and not (plan.rejected or plan.preempted or stopped):
                raise RuntimeError("the scheduler planned nothing while requests are waiting")
            return
        early = self._settle_for_grammars(plan)
        launched = self._launch(plan)
        pending = launched if self.overlap else None
        if not self.overlap:  # read this step's tokens now
            self._pending = launched
        late = early + self._settle()
        outcome = self.scheduler.finish_step(plan, late)  # finishes those that sampled now
        sampled = set(launched.request_ids)
        for request_id in late:
            if request_id not in sampled:  # not in this step: preempted meanwhile
                self.scheduler.stop(request_id)
        for request_id in outcome.finished:
            request = self._requests[request_id]
            self._finish(request_id, request.finish_reason or "length", request.error)
        self._pending = pending
        self._track(plan)

    def _settle_for_grammars(self, plan: StepPlan) -> list[int]:
        """Under ``overlap``, read the previous step's tokens before launching this one
        when a request of this plan with a grammar has its token among them: its mask
        depends on that token, which the matcher must consume first. Such a step does
        not overlap; steps without grammar requests are untouched. Returns what
        `_settle` returns (nothing when it need not read)."""
        pending = self._pending
        if (
            pending is None
            or not self._guided
            or not any(
                chunk.request_id in pending.index and chunk.request_id in self._guided
                for chunk in plan.chunks
            )
        ):
            return []
        return self._settle()

    def _count(self, plan: StepPlan) -> None:
        """Add a plan's preemptions and swaps to this call's stats and the totals."""
        for counters in (self.stats, self.totals):
            counters.num_preemptions += len(plan.preempted)
            counters.num_swapped_out += len(plan.swapped_out)
            counters.num_swapped_in += len(plan.swapped_in)
            counters.swapped_bytes += plan.num_swap_bytes

    def _launch(self, plan: StepPlan) -> _Pending:
        """Run the model on the plan and sample, without waiting for the device. A token
        the previous step sampled and the host has not read is passed as a carried id
        (`SequenceWork.token_ids`) and read on the device. Prompt rows whose
        log-probabilities a request asked for get their logits too, after the sampled
        rows' (`SequenceWork.logit_rows`)."""
        carry = {} if self._pending is None else self._pending.index
        work: list[SequenceWork] = []
        sampling: list[int] = []
        steer: list[tuple[int, list[tuple[int, float]]]] = []  # logit_bias, min_tokens masks
        penalized: list[tuple[int, int, tuple[float, float, float]]] = []
        guided: list[tuple[int, Any]] = []  # (row, matcher) of the requests with grammars
        spans: list[_PromptSpan] = []
        for chunk in plan.chunks:
            request = self._requests[chunk.request_id]
            blocks = self.allocator.units(chunk.request_id)
            end = chunk.start + chunk.num_tokens
            known = len(request.tokens) + (chunk.request_id in carry)
            tokens = request.tokens[chunk.start : end]
            if end > len(request.tokens):  # its last token is still on the device
                tokens.append(-1 - carry[chunk.request_id])
            samples = end == known
            rows = range(0)
            if request.prompt_logprobs_k is not None:
                rows = _prompt_rows(request, chunk.start, end)
                if rows:
                    spans.append(_PromptSpan(chunk.request_id, chunk.start + rows.start + 1,
                                             len(rows)))  # fmt: skip
            work.append(
                SequenceWork(
                    tokens,
                    chunk.start,
                    self.views.slot_row(blocks.slot) if blocks.slot >= 0 else 0,
                    self.views.page_rows(blocks.pages),
                    samples,
                    rows,
                )
            )
            if samples:
                sampling.append(chunk.request_id)
                # the sampled token is output number known - len(prompt), counting from 0
                held = bool(request.stop_ids) and known - len(request.prompt) < request.min_tokens
                if request.logit_bias or held:  # most requests build nothing here
                    pairs = list(request.logit_bias)
                    if held:
                        pairs += [(token, -math.inf) for token in request.stop_ids]
                    steer.append((len(sampling) - 1, pairs))
                if request.penalties is not None:
                    penalized.append((len(sampling) - 1, chunk.request_id, request.penalties))
                if request.matcher is not None and not request.finish_reason:
                    guided.append((len(sampling) - 1, request.matcher))
        carried = None if self._pending is None else self._pending.tokens.device
        if self._leader is None:
            logits = self.runner.execute(work, carried)
        else:  # every rank runs the step: the plan goes out first
            logits = self._leader.execute(self.runner, work, carried, bool(sampling))
        if not spans:
            return self._sample(logits, sampling, steer, penalized, guided)
        pending = self._sample(logits[: len(sampling)], sampling, steer, penalized, guided)
        pending.prompt = self._prompt_logprobs(logits[len(sampling) :], spans)
        pending.prompt_spans = spans
        return pending

    def _sample(
        self,
        logits: torch.Tensor,
        sampling: list[int],
        steer: list[tuple[int, list[tuple[int, float]]]],
        penalized: list[tuple[int, int, tuple[float, float, float]]],
        guided: list[tuple[int, Any]],
    ) -> _Pending:
        """Sample the next token of each request in ``sampling`` from its row of
        ``logits`` (penalties, ``steer``'s masks and the grammar masks of ``guided``'s
        rows applied first), with the log-probabilities of those that asked (the raw
        logits'), all left on the device."""
        if not sampling:
            return _Pending([], SampledTokens(logits.new_empty(0, dtype=torch.long)))
        rows = [self._requests[request_id] for request_id in sampling]
        raw = logits
        if penalized:
            logits = self._penalties.apply(logits, penalized)
        if steer:
            logits = steered_logits(logits, steer)
        if guided:
            if self._masks is None:
                self._masks = GrammarMasks(self._grammars.vocab_size, self._eos)
            logits = self._masks.apply(logits, guided)
        sampled = sample(logits, [r.sampling for r in rows], [r.generator for r in rows])
        if penalized:  # counted on the device: the next step's penalties see this token
            self._penalties.count([(row, request_id) for row, request_id, _ in penalized], sampled)
        if self._leader is not None:  # the followers' carried tokens of the next step
            self._leader.share_sampled(sampled)
        asked = [(i, k) for i, r in enumerate(rows) if (k := r.logprobs_k) is not None]
        if not asked:
            return _Pending(sampling, SampledTokens(sampled))
        logprobs = SampledLogprobs(raw, sampled, asked)
        ids = [sampling[i] for i, _ in asked]
        return _Pending(sampling, SampledTokens(sampled), logprobs, ids)

    def _prompt_logprobs(self, logits: torch.Tensor, spans: list[_PromptSpan]) -> PromptLogprobs:
        """The log-probabilities of the prompt tokens that ``spans`` name, from the
        logits of the rows before them (``logits``: one row per position, span after
        span)."""
        targets: list[int] = []
        ks: list[int] = []
        for span in spans:
            request = self._requests[span.request_id]
            targets += request.prompt[span.first : span.first + span.count]
            ks += [request.prompt_logprobs_k or 0] * span.count
        return PromptLogprobs(logits, targets, ks)

    def _settle(self) -> list[int]:
        """Read the last launched step's tokens (waiting for that step alone) and append
        them. Returns the requests that sampled a stop token (end-of-sequence or a stop
        id) and are still unfinished in the scheduler; a token computed after one, or
        for an aborted request, is dropped."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        if pending.prompt is not None:
            self._add_prompt_logprobs(pending.prompt, pending.prompt_spans)
        late = []
        tokens = pending.tokens.tolist()
        logprobs = {} if pending.logprobs is None else dict(
            zip(pending.logprob_ids, pending.logprobs.tolist(), strict=True)
        )  # fmt: skip
        now = self._now()
        for request_id, token in zip(pending.request_ids, tokens, strict=True):
            request = self._requests.get(request_id)
            if request is None or request.finish_reason in _DROPS_LATE_TOKENS:
                continue
            request.tokens.append(token)
            if request_id in logprobs:
                request.logprobs.append(logprobs[request_id])
            self._touched[request_id] = None
            self.totals.num_generated_tokens += 1
            if request.first_token_s is None:
                request.first_token_s = now
            request.last_token_s = now
            complete = request.matcher is not None and advance(request.matcher, token)
            if token in request.stop_ids or complete:
                request.finish_reason = "stop"
                if self.scheduler.requests[request_id].status in _UNFINISHED:
                    late.append(request_id)
        return late

    def _add_prompt_logprobs(self, prompt: PromptLogprobs, spans: list[_PromptSpan]) -> None:
        """Append a step's prompt log-probabilities to their requests' lists, each
        position once: a request recomputed after a preemption may have asked for
        positions again (a step launched before the earlier one was read)."""
        values = prompt.tolist()
        at = 0
        for span in spans:
            part, at = values[at : at + span.count], at + span.count
            request = self._requests.get(span.request_id)
            if request is None:
                continue  # its final update is out
            have = len(request.prompt_logprobs)
            if span.first > have:
                raise RuntimeError(
                    f"request {span.request_id}: prompt log-probabilities from position "
                    f"{span.first} arrived before position {have}"
                )
            request.prompt_logprobs.extend(part[have - span.first :])

    def _updates(self) -> list[RequestUpdate]:
        """The updates of the requests touched since the last call. A finished request's
        final update waits while a token of it is still on the device, unless that
        token is to be dropped (stop, abort)."""
        on_device = {} if self._pending is None else self._pending.index
        updates = []
        for request_id in self._touched:
            request = self._requests[request_id]
            reason = request.finish_reason
            done = bool(reason) and (reason in _DROPS_LATE_TOKENS or request_id not in on_device)
            num_prompt = len(request.prompt)
            new = request.tokens[num_prompt + request.num_reported :]
            if not new and not done:
                continue
            reported = request.num_reported
            request.num_reported += len(new)
            scheduled = self.scheduler.requests.get(request_id)
            prompt_logprobs = None
            if request.prompt_logprobs_k is not None and not request.prompt_reported:
                prompt_logprobs = list(request.prompt_logprobs)
                request.prompt_reported = True
            updates.append(
                RequestUpdate(
                    request_id,
                    new,
                    done,
                    reason if done else None,
                    request.error if done else None,
                    num_prompt,
                    len(request.tokens) - num_prompt,
                    0 if scheduled is None else scheduled.num_preemptions,
                    None
                    if request.logprobs_k is None
                    else request.logprobs[reported : reported + len(new)],
                    prompt_logprobs,
                )
            )
            if done:
                del self._requests[request_id]
                self._guided.discard(request_id)
                self._penalties.remove(request_id)
                self._forget(request_id)
        self._touched = {}
        return updates

    def _forget(self, request_id: int) -> None:
        """Drop the scheduler's record of a request whose final update is out, keeping
        what `generate` reports of it (its preemptions) while a `generate` call runs."""
        scheduled = self.scheduler.requests.get(request_id)
        if scheduled is None:
            return
        if self._generating is not None:
            self._generating[request_id] = scheduled.num_preemptions
        self.scheduler.forget(request_id)

    def _eos_token_ids(self) -> tuple[int, ...]:
        """The model config's end-of-sequence id (or ids: a list), then the generation
        config's, each once; the tokenizer's when neither names one."""
        eos = getattr(self.model.config, "eos_token_id", None)
        ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        ids += self.generation_defaults.eos_token_ids
        if not ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))

    def _track(self, plan: StepPlan) -> None:
        self.stats.num_steps += 1
        self.totals.num_steps += 1
        self.stats.num_computed_tokens += plan.num_tokens
        self.stats.num_recompute_tokens += plan.num_recompute_tokens
        usage = self.allocator.usage()
        self.stats.peak_kv_capacity_bytes = max(
            self.stats.peak_kv_capacity_bytes, usage.kv_capacity_bytes
        )
        self.stats.peak_state_capacity_bytes = max(
            self.stats.peak_state_capacity_bytes, usage.state_capacity_bytes
        )
        self._count_prefix()
        if self._timeline.should_sample(self.stats.num_steps - 1):
            now = self._now()
            scheduler = self.scheduler
            self._timeline.add(now, usage, scheduler.num_running, scheduler.num_waiting)
        if self.config.check_integrity:
            self.allocator.check_integrity()

    def _count_prefix(self) -> None:
        """Add what the prefix cache did in this step to this call's stats and the totals."""
        if self.scheduler.prefix is None:
            return
        now = PrefixCounts.of(self.scheduler.prefix)
        growth = now.since(self._prefix_seen)
        self._prefix_seen = now
        self.stats.prefix = self.stats.prefix.plus(growth)
        self.totals.prefix = self.totals.prefix.plus(growth)

    def reset_prefix_cache(self) -> int:
        """Evict every cached page and checkpoint that no running request uses (as
        vLLM's ``reset_prefix_cache``: a benchmark's runs start alike). Returns how many
        units went; 0 without a prefix cache."""
        prefix = self.scheduler.prefix
        if prefix is None:
            return 0
        num_evicted = clear_prefix_cache(prefix)
        self._prefix_seen = PrefixCounts.of(prefix)  # evictions asked for: not counted
        self.totals.prefix = self.totals.prefix.held_as(self._prefix_seen)
        return num_evicted

    def _finish_stats(self, before: AllocatorStats) -> None:
        """What the allocator did during this call (its own counters are lifelong)."""
        now = self.allocator.stats
        delta = {
            name: value - getattr(before, name)
            for name, value in vars(now).items()
            if isinstance(value, int)
        }
        moved = {
            k: v - before.chunks_migrated_to.get(k, 0) for k, v in now.chunks_migrated_to.items()
        }
        self.stats.allocator = AllocatorStats(**delta, chunks_migrated_to=moved)
        self.stats.usage = self.allocator.usage()

    def warmup(self) -> None:
        """Run the step shapes a workload meets once, untimed, so that the first timed
        `generate` (or the first requests a server takes) does not pay one-time work.

        On the CPU that is torch's initialisation: one short request. On CUDA each new
        step shape also compiles Triton variants (chunk tables, ragged sizes) and captures
        decode graphs: on an H200 the first 8k-token prefill step of Nemotron-H-8B took
        3.5 s instead of 0.2 s, and the first mixed step 1.2 s. So a prompt longer than one
        step (a full step, then a chunk that attends to its cached context) runs beside
        short requests that decode meanwhile (mixed steps), then decodes alone. The
        lifetime totals are left as they were. Then, with prefill and mixed graphs on,
        the buckets a workload meets most are captured (`_capture_common_mixed`).
        """
        totals = copy.deepcopy(self.totals)
        self.generate([[1, 2, 3]], max_tokens=2, ignore_eos=True)
        if self.device.type == "cuda":
            self.generate(self._warmup_prompts(), max_tokens=8, ignore_eos=True)
            self._capture_common_mixed()
        self.reset_prefix_cache()  # the warm-up prompts are no one's prefix
        self.totals = totals

    def _capture_common_mixed(self) -> None:
        """Capture up to half of ``max_mixed_graphs`` prefill and mixed graphs before
        any request (a server's steps do not pay their captures; the other half is
        left for buckets met later), with block tables for a step's worth of context
        per sequence (``max_model_len`` if shorter): a step needing a wider table
        captures its own, which then serves every narrower one, while a wider table
        for all would cost every step its packing. One rank only: on several, every
        capture must happen in the same step on every rank, which the steps arrange."""
        runner = self.runner
        if self._leader is not None or not isinstance(runner, FastModelRunner):
            return
        if not runner.use_mixed_graphs:
            return
        config = self.config
        context = min(config.max_model_len or config.max_num_batched_tokens,
                      config.max_num_batched_tokens)  # fmt: skip
        shapes = runner.common_mixed_shapes(config.max_num_seqs, context)
        runner.capture_mixed(shapes[: runner.max_mixed_graphs // 2])

    def _warmup_prompts(self) -> list[list[int]]:
        """Three short prompts (ragged lengths) and one longer than a step, as long as the
        memory holds it alone."""
        long_tokens = self.config.max_num_batched_tokens + 17
        while long_tokens > 64 and not self.allocator.fits_alone(long_tokens + 8):
            long_tokens //= 2
        vocab = max(self.geometry.vocab_size - 3, 1)
        return [[3 + i % vocab for i in range(n)] for n in (5, 16, 33, long_tokens)]

    def _output(self, request_id: int, request: _Live) -> GenerationOutput:
        generated = request.tokens[len(request.prompt) :]
        text = None if self.tokenizer is None else self.tokenizer.decode(generated)
        # absent: never scheduled (over max_model_len)
        preemptions = (self._generating or {}).get(request_id, 0)
        return GenerationOutput(
            request.index,
            request.prompt,
            generated,
            text,
            request.finish_reason,
            preemptions,
            request.error,
            request.arrival_s,
            request.joined_s,
            request.first_token_s,
            request.last_token_s,
            None if request.prompt_logprobs_k is None else request.prompt_logprobs,
        )


def _token_ids(prompt: object) -> list[int]:
    """A prompt given as token ids, as a list of ints.

    Raises:
        ValueError: not a sequence of whole numbers (int() would make 1.5 token 1,
            '7' token 7 and bytes their byte values).
    """
    try:
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError
        items = list(prompt)  # type: ignore[call-overload]
        if bool in map(type, items):
            raise TypeError
        return list(map(operator.index, items))  # ints, numpy's and torch's integers
    except TypeError:
        raise ValueError(
            f"a prompt is text or a list of token ids (whole numbers), got {prompt!r:.80}"
        ) from None


def _prompt_rows(request: _Live, start: int, end: int) -> range:
    """The rows of a chunk of positions ``start .. end - 1`` whose logits give prompt
    log-probabilities the request has not read yet: row ``i`` (position ``start + i``)
    predicts prompt token ``start + i + 1``; the last prompt position predicts the first
    output token, not a prompt token."""
    first = max(start + 1, len(request.prompt_logprobs))  # the first position to compute
    last = min(end, len(request.prompt) - 1)
    return range(first - 1 - start, max(last - start, first - 1 - start))


def model_geometry(model: HybridModel, config: EngineConfig) -> ModelGeometry:
    """The cache geometry of ``model`` (a rank's shard: the rank's units) under
    ``config``'s state dtype and conv columns.

    Raises:
        ValueError: units that are not 16-byte multiples (the engine needs exact ones).
    """
    dtype = next(model.parameters()).dtype
    ssm = None if config.ssm_dtype is None else DTYPES[config.ssm_dtype]
    geometry = model.geometry(dtype, ssm, config.conv_columns)
    padding = CacheFormat.from_geometry(geometry, config.block_size).padding_bytes
    if padding:
        raise ValueError(
            f"{geometry.name}: cache tensors are not 16-byte multiples "
            f"({padding} bytes of padding per page + slot); the engine needs exact units"
        )
    return geometry


def check_fits(
    model: HybridModel, geometry: ModelGeometry, config: EngineConfig, device: torch.device
) -> None:
    """Weights (loaded, on ``device``), the cache budget and the activation estimate
    against the device's memory, before the cache is allocated (`check_device_holds`)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    dtype_bytes = next(model.parameters()).element_size()
    activations = activation_estimate_bytes(geometry, config, dtype_bytes)
    if device.type == "cuda":  # torch's cached free blocks count as used there
        torch.cuda.empty_cache()
    check_device_holds(device, config.memory_bytes, weight_bytes, activations, weights_loaded=True)


def build_backing(config: EngineConfig, device: torch.device) -> TensorBacking:
    """An empty backing of ``config``'s kind on ``device``."""
    # compaction's row copy: Triton's on CUDA (it falls back to torch's where Triton
    # cannot run); elsewhere the backing's own torch copy
    from avmp.kernels.triton.compact import copy_rows

    copy = copy_rows if device.type == "cuda" else None
    if config.backing == "cuda_vmm":
        from avmp.memory.backing.cuda_vmm import CudaVmmBacking

        return CudaVmmBacking(device.index or 0, copy_rows=copy)
    return TorchBufferBacking(device, copy_rows=copy)


def build_memory(
    config: EngineConfig, geometry: ModelGeometry, device: torch.device
) -> tuple[CacheAllocator, TensorBacking, CacheFormat]:
    """The allocator, the backing it drives and the byte format the views read. Built
    alike from the same geometry and budget, two ranks' backings hold the same chunks
    in the same pools."""
    memory = config.memory_config
    name, state_fraction = config.allocator, config.state_fraction
    options = {} if state_fraction is None else {"state_fraction": state_fraction}
    backing: TensorBacking
    if name == "unified":  # vLLM's pool is one plain buffer whatever the backing
        backing = SharedBufferBacking(unified_buffer_bytes(geometry, memory), device)
    else:
        backing = build_backing(config, device)
    allocator = make_allocator(name, geometry, memory, backing, **options)
    return allocator, backing, allocator.cache_format()


def warm_up_compaction(device: torch.device, cache_format: CacheFormat) -> None:
    """Compile compaction's copy on CUDA before any timed step (nothing on the CPU)."""
    if device.type == "cuda":
        from avmp.kernels.triton.compact import warm_up

        warm_up(device, (cache_format.page.unit_bytes, cache_format.slot.unit_bytes))


def build_runner(
    model: HybridModel, views: PoolViews, config: EngineConfig, device: torch.device
) -> ModelRunner:
    """The reference runner, or (where ``kernels`` resolves to Triton on this device)
    the fast one: one host-to-device copy per step, decode graphs, and the layers'
    Triton kernels, given to the model here, once."""
    if not use_triton(config.kernels, device):
        model.use_ops(REFERENCE_OPS)
        return ModelRunner(model, views, config.block_size, device)
    from avmp.engine.triton_ops import TritonOps

    model.use_ops(TritonOps())
    return FastModelRunner(
        model,
        views,
        config.block_size,
        device,
        cuda_graphs=config.cuda_graphs,
        pad_decode=config.pad_decode,
        mixed_graphs=config.mixed_graphs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_mixed_graphs=config.max_mixed_graphs,
        pad_mixed=config.pad_mixed,
    )


def build_swapper(
    config: EngineConfig, backing: TensorBacking, cache_format: CacheFormat, host_tier_bytes: int
) -> HostSwapper | None:
    """The host tier's arena and copier, allocated once (none under recompute)."""
    if not host_tier_bytes or config.preemption is PreemptionMode.RECOMPUTE:
        return None
    return HostSwapper(backing, cache_format, host_tier_bytes)


def build_follower(
    model: str | Path | HybridModel | ShardBuilder,
    config: EngineConfig,
    host_tier_bytes: int,
    tp: TensorParallel,
) -> tuple[Replica, ModelRunner]:
    """What a follower rank holds, built as `Engine` builds rank 0's: its shard of the
    model, pools of the same layout (an allocator is built to attach and map the
    backing as rank 0's was, then dropped: rank 0's plans every later change), its
    host tier and runner."""
    device = rank_device(config, tp)
    if device.type == "cpu" and config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    shard = build_shard(model, config, tp, device)
    geometry = model_geometry(shard, config)
    check_fits(shard, geometry, config, device)
    _, backing, cache_format = build_memory(config, geometry, device)
    warm_up_compaction(device, cache_format)
    views = PoolViews(build_views(backing, cache_format))
    runner = build_runner(shard, views, config, device)
    swapper = build_swapper(config, backing, cache_format, host_tier_bytes)
    return Replica(backing, swapper, StateSlotCopier(backing)), runner


def check_device_holds(
    device: torch.device,
    memory_bytes: int,
    weight_bytes: int = 0,
    activation_bytes: int = 0,
    weights_loaded: bool = False,
) -> None:
    """Refuse, before the cache is allocated, a device this machine lacks or a run
    larger than it can hold: the cache budget, plus the weights and the activation
    estimate where given, against the free memory of a CUDA device (the host's
    available memory for the CPU).

    Args:
        weights_loaded: the weights already sit on ``device``, so the free memory
            measured now is what is left after them and they count as available.
    Raises:
        ValueError: one line with the device, each figure and the memory it has.
    """
    available, holder = _device_memory(device)
    if available is None:
        return
    if weights_loaded:
        available += weight_bytes
    needed = memory_bytes + weight_bytes + activation_bytes
    if needed <= available:
        return
    has = holder.format(format_bytes(available))
    if not (weight_bytes or activation_bytes):
        raise ValueError(f"memory {format_bytes(memory_bytes)} is more than {has}")
    before = " before the weights" if weights_loaded else ""
    raise ValueError(
        f"weights {format_bytes(weight_bytes)} + cache {format_bytes(memory_bytes)} + "
        f"activations {format_bytes(activation_bytes)} = {format_bytes(needed)} is more "
        f"than {has}{before}"
    )


def _device_memory(device: torch.device) -> tuple[int | None, str]:
    """The memory ``device`` can still give (None where unknown) and a sentence that
    says who has it, with ``{}`` where the figure goes.

    Raises:
        ValueError: a CUDA device this machine lacks.
    """
    if device.type != "cuda":
        return host_available_bytes(), "this host has {} available"
    if not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {device}: this machine has {count} GPU(s)")
    free, _ = torch.cuda.mem_get_info(index)
    return free, f"{device} has {{}} free"


def resolve_host_tier_bytes(config: EngineConfig) -> int:
    """The host tier's size: as configured, or twice the cache budget (SGLang HiCache's
    ``--hicache-ratio 2``) capped at half the host's available memory; 0 under
    ``recompute`` unless a size is given.

    Raises:
        ValueError: a configured size larger than the host's available memory (one line
            naming both).
    """
    available = host_available_bytes()
    if config.host_tier_bytes is not None:
        if available is not None and config.host_tier_bytes > available:
            raise ValueError(
                f"host tier {format_bytes(config.host_tier_bytes)} is more than this host "
                f"has available ({format_bytes(available)})"
            )
        return config.host_tier_bytes
    if config.preemption is PreemptionMode.RECOMPUTE:
        return 0
    wanted = HOST_TIER_RATIO * config.memory_bytes
    if available is None:
        return wanted
    return min(wanted, int(available * HOST_TIER_MAX_SHARE))


def activation_estimate_bytes(
    geometry: ModelGeometry, config: EngineConfig, dtype_bytes: int
) -> int:
    """Peak activation memory of one step, estimated (not measured) by the simulator's
    stated rule (`avmp.sim.timing.activation_bytes`) at the engine's compute dtype::

        max_num_batched_tokens x hidden_size x ACTIVATION_COPIES (16) x dtype_bytes
        + min(max_num_seqs, max_num_batched_tokens) x vocab_size x LOGIT_BYTES (4)

    Every token of the largest step keeps 16 hidden-size vectors alive at the peak (the
    residual stream, a norm's output, a layer's in-projection and a gated MLP's
    up-projections, with slack); every sampling row keeps fp32 logits.
    """
    num_tokens = config.max_num_batched_tokens
    hidden = num_tokens * geometry.hidden_size * ACTIVATION_COPIES * dtype_bytes
    num_rows = min(config.max_num_seqs, num_tokens)
    return hidden + num_rows * geometry.vocab_size * LOGIT_BYTES


def host_available_bytes() -> int | None:
    """Memory the host can still give (Linux ``MemAvailable``; else its physical memory;
    None where neither is known)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
