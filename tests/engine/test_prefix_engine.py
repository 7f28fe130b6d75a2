"""Prefix caching in the engine: greedy outputs are token-identical with the cache and
without it, and hits really happen (prompt tokens taken from the cache, fewer tokens
computed), on tiny random models of a Mamba2 hybrid (Granite-4.0-H, Bamba), Jamba
(Mamba1) and Qwen3-Next (gated DeltaNet), in every layout, with and without overlap,
under memory pressure (evictions, preemption), for each checkpoint placement policy.

Two workloads: multi-turn conversations (turn k's prompt is turn k-1's prompt, its
answer and new user tokens) and a shared system prompt before short user parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts

from avmp.engine.engine import Engine, EngineConfig, RequestOptions
from avmp.engine.prefix_cache import StateSlotCopier, resolve_prefix_cache
from avmp.memory.spec import PoolKind
from avmp.sched.prefix import PrefixCacheConfig

FAMILIES = ["granitemoehybrid", "bamba", "jamba", "qwen3_next"]
LAYOUTS = ["avmp", "static", "unified"]
MAX_TOKENS = 7
# Granite-4.0-H's layers, widened so that a request's state (~270 KiB) and KV (4 KiB a
# token) are large against a 2 MiB chunk: 4 MiB runs out within a few hundred tokens
# (as many attention as Mamba layers: one vLLM group, which the unified layout needs)
HEAVY_GRANITE: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=64, shared_intermediate_size=128,
    num_attention_heads=2, num_key_value_heads=2, num_local_experts=0, num_hidden_layers=4,
    layer_types=["mamba", "attention", "attention", "mamba"],
    mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1, mamba_chunk_size=32,
)  # fmt: skip


def _config(**options: Any) -> EngineConfig:
    defaults: dict[str, Any] = dict(
        memory_bytes=8 * MiB,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=32,  # long prompts prefill in chunks
        check_integrity=True,
        preemption="recompute",
    )
    return EngineConfig(**{**defaults, **options})


def _multi_turn(
    engine: Engine, first: list[int], new: list[int], num_turns: int, max_tokens: int = MAX_TOKENS
) -> tuple[list[list[list[int]]], list[list[list[int]]], list[int]]:
    """Run the conversations turn by turn (one `generate` per turn). Returns each turn's
    prompts and outputs, and the tokens each turn computed."""
    prompts = random_prompts(first, seed=3)
    turns_prompts, turns_outputs, computed = [], [], []
    for turn in range(num_turns):
        outputs = engine.generate(prompts, max_tokens=max_tokens)
        turns_prompts.append(prompts)
        turns_outputs.append([output.token_ids for output in outputs])
        computed.append(engine.stats.num_computed_tokens)
        assert all(output.finish_reason == "length" for output in outputs)
        users = random_prompts(new, seed=10 + turn)
        prompts = [p + o.token_ids + u for p, o, u in zip(prompts, outputs, users, strict=True)]
    return turns_prompts, turns_outputs, computed


def _both(
    checkpoint: TinyCheckpoint, workload: Callable[[Engine], Any], **options: Any
) -> tuple[Any, Any, Engine, Engine]:
    """The workload without and with the prefix cache (``avmp`` unless given): both
    results, then both engines."""
    prefix = options.pop("prefix_cache", "avmp")
    engine_off = Engine(checkpoint.path, _config(**options))
    engine_on = Engine(checkpoint.path, _config(prefix_cache=prefix, **options))
    return workload(engine_off), workload(engine_on), engine_off, engine_on


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_is_identical_and_hits(
    family: str, layout: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    checkpoint = tiny_checkpoint(family, eos_token_id=None)
    # unified's vLLM block is 32-48 tokens for these models: prompts long enough to fill
    first, new = ([9, 14, 6], [5, 3, 8]) if layout != "unified" else ([70, 55, 90], [20, 9, 30])

    def workload(engine: Engine) -> Any:
        return _multi_turn(engine, first, new, num_turns=3)

    (_, outputs_off, computed_off), (prompts, outputs_on, computed_on), _, engine = _both(
        checkpoint, workload, allocator=layout
    )
    assert outputs_on == outputs_off
    totals = engine.totals.prefix
    assert totals.num_hits >= len(first) and totals.num_hit_tokens > 0
    assert totals.num_queried_tokens == sum(len(p) for turn in prompts for p in turn)
    assert computed_on[0] == computed_off[0]  # nothing cached before the first turn
    assert computed_on[1] < computed_off[1] and computed_on[2] < computed_off[2]
    assert engine.stats.num_computed_tokens == computed_on[2]
    last = engine.stats.prefix  # the last `generate` call's share of the totals
    assert computed_off[2] - computed_on[2] == last.num_hit_tokens
    assert engine.allocator.usage().num_requests == 0


def test_multi_turn_matches_transformers(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    """A turn resumed from a checkpoint writes what transformers writes from the whole
    prompt (not just what the engine writes without the cache)."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None)
    engine = Engine(checkpoint.path, _config(prefix_cache="avmp"))
    prompts, outputs, _ = _multi_turn(engine, [9, 14], [5, 3], num_turns=3)
    for turn_prompts, turn_outputs in zip(prompts, outputs, strict=True):
        for prompt, output in zip(turn_prompts, turn_outputs, strict=True):
            assert output == checkpoint.reference(prompt, MAX_TOKENS)
    assert engine.totals.prefix.num_hit_tokens > 0


def _shared_system_prompt(engine: Engine) -> list[list[int]]:
    """Eight requests: one 40-token system prompt, then 3 to 12 tokens of their own; two
    run at a time, so later ones find what the earlier ones left."""
    (system,) = random_prompts([40], seed=7)
    users = random_prompts([3, 12, 5, 9, 4, 11, 7, 6], seed=8)
    outputs = engine.generate([system + user for user in users], max_tokens=MAX_TOKENS)
    return [output.token_ids for output in outputs]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_system_prompt_is_identical_and_hits(
    family: str, overlap: bool, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    checkpoint = tiny_checkpoint(family, eos_token_id=None)
    off, on, engine_off, engine = _both(
        checkpoint, _shared_system_prompt, max_num_seqs=2, overlap=overlap
    )
    assert on == off
    prefix = engine.stats.prefix
    # the checkpoint at the branch point, the system prompt's end (10 whole pages), or
    # one a prefill chunk left inside it (Jamba's small state: every few pages)
    assert prefix.num_hits >= 4 and 40 * 4 <= prefix.num_hit_tokens <= 40 * prefix.num_hits
    saved = engine_off.stats.num_computed_tokens - engine.stats.num_computed_tokens
    assert saved == prefix.num_hit_tokens


@pytest.mark.parametrize("policy", ["vllm-align", "sglang"])
def test_the_peers_policies_are_identical(
    policy: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """vLLM's align mode (here on AVMP's pages, its block from this model's unified
    layout) and SGLang's every-64-tokens rule resume from their own checkpoints."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None)

    def workload(engine: Engine) -> Any:
        return _multi_turn(engine, [70, 100], [30, 12], num_turns=3)

    off, on, _, engine = _both(checkpoint, workload, prefix_cache=policy, max_num_batched_tokens=64)
    assert on[1] == off[1]
    assert engine.totals.prefix.num_hit_tokens > 0 and on[2][2] < off[2][2]
    assert engine.scheduler.prefix is not None
    assert engine.scheduler.prefix.tree.config.policy == policy


@pytest.mark.parametrize(("layout", "budget_mib"), [("avmp", 4), ("static", 4), ("unified", 5)])
def test_identical_under_memory_pressure(
    layout: str, budget_mib: int, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """At 4-5 MiB the cached pages and checkpoints compete with the live requests: cached
    units are evicted, requests are preempted and recomputed (after which they match
    the cache again), and the outputs stay those of the run without the cache. (In
    unified a checkpoint is a whole padded state group: at 4 MiB none survives to a hit.)"""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None, **HEAVY_GRANITE)

    def workload(engine: Engine) -> Any:
        first, new = [40, 70, 20, 90, 33, 50], [15, 13, 18, 9, 20, 14]
        return _multi_turn(engine, first, new, num_turns=3, max_tokens=12)

    options = dict(
        memory_bytes=budget_mib * MiB, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
        admission="greedy", allocator=layout,
    )  # fmt: skip
    off, on, _, engine = _both(checkpoint, workload, **options)
    assert on[1] == off[1]
    totals = engine.totals
    assert totals.num_preemptions > 0
    prefix = totals.prefix
    assert prefix.num_evicted_checkpoints > 0 and prefix.num_evicted_pages > 0
    assert prefix.num_hit_tokens > 0


def test_off_changes_nothing(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None)
    assert EngineConfig(prefix_cache="off").prefix_cache is None
    engine = Engine(checkpoint.path, _config(prefix_cache="off"))
    _multi_turn(engine, [9, 14], [5, 3], num_turns=2)
    assert engine.scheduler.prefix is None and engine.prefix_cache is None
    assert engine.totals.prefix.num_queried_tokens == 0
    assert engine.allocator.cached_keys() == [] and engine.slot_copier.num_copies == 0


def test_checkpoint_copy_is_the_whole_slot(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """A checkpoint is the whole slot (conv and SSM state of every recurrent layer):
    after a multi-turn run each checkpoint's bytes are those of a slot's state at some
    position, and a reset evicts every one of them."""
    checkpoint = tiny_checkpoint("jamba", eos_token_id=None)
    engine = Engine(checkpoint.path, _config(prefix_cache="avmp"))
    _multi_turn(engine, [9, 14, 6], [5, 3, 8], num_turns=2)
    prefix = engine.scheduler.prefix
    assert prefix is not None and prefix.tree.num_checkpoints > 0
    copier = engine.slot_copier
    slot_bytes = engine.backing.spec.unit_bytes(PoolKind.STATE)
    assert copier.num_copies > 0 and copier.num_bytes == copier.num_copies * slot_bytes
    held = engine.totals.prefix
    assert held.checkpoint_bytes == held.num_checkpoints * slot_bytes
    for key in engine.allocator.cached_keys():
        pool, unit = engine.allocator._cached.lookup(key)  # type: ignore[attr-defined]
        if pool is PoolKind.STATE:
            assert any(engine.backing.read_unit(pool, unit))  # a state, not a blank slot
    assert engine.reset_prefix_cache() > 0
    assert engine.allocator.cached_keys() == [] and engine.totals.prefix.num_checkpoints == 0


def test_slot_copier_copies_rows_in_either_direction() -> None:
    """The copier moves one slot's bytes whatever the pool's row order (the one-buffer
    backing keeps its state pool in reverse)."""

    class Backing:
        def __init__(self) -> None:
            self.table = torch.arange(24, dtype=torch.uint8).view(4, 6)

        def unit_table(self, pool: PoolKind) -> torch.Tensor:
            return self.table

        def row_of(self, pool: PoolKind, index: int) -> int:
            return 3 - index  # reversed

    backing = Backing()
    copier = StateSlotCopier(backing)  # type: ignore[arg-type]
    copier(0, 2)  # unit 0 is row 3, unit 2 row 1
    assert backing.table[1].tolist() == list(range(18, 24))
    assert backing.table[3].tolist() == list(range(18, 24))
    assert copier.num_copies == 1 and copier.num_bytes == 6


def test_bad_prefix_cache_settings_are_one_line(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    with pytest.raises(ValueError, match="prefix_cache must be one of off, avmp"):
        EngineConfig(prefix_cache="lru")
    with pytest.raises(ValueError, match="prefix_cache must be one of"):
        EngineConfig(prefix_cache=3)  # type: ignore[arg-type]
    # a state slot of just over 1 MiB: 4 MiB (2 chunks) holds a request's slot and a page,
    # not a checkpoint beside them
    overrides = {**HEAVY_GRANITE, "mamba_d_state": 256}
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None, **overrides)
    engine = Engine(checkpoint.path, _config(memory_bytes=4 * MiB, block_size=16))
    (output,) = engine.generate(random_prompts([5]), max_tokens=2)
    assert output.finish_reason == "length"  # without the cache it runs
    with pytest.raises(ValueError, match="room for a checkpoint beside a request") as error:
        Engine(checkpoint.path, _config(memory_bytes=4 * MiB, block_size=16, prefix_cache="avmp"))
    assert "\n" not in str(error.value)


def test_policy_names_resolve_for_the_model(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None)
    engine = Engine(checkpoint.path, _config())
    geometry = engine.geometry
    assert resolve_prefix_cache("off", geometry, 16) is None
    assert resolve_prefix_cache("avmp", geometry, 16) == PrefixCacheConfig("avmp", "flops")
    sglang = resolve_prefix_cache("sglang", geometry, 16)
    assert sglang == PrefixCacheConfig("sglang", "lru")
    align = resolve_prefix_cache("vllm-align", geometry, 16)
    assert align is not None and align.align_tokens % 16 == 0 and align.align_tokens >= 16
    given = PrefixCacheConfig("avmp", "lru")
    assert resolve_prefix_cache(given, geometry, 16) is given


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["avmp", "unified"])
@pytest.mark.parametrize("family", ["granitemoehybrid", "jamba", "qwen3_next"])
def test_multi_turn_on_cuda_with_triton_overlap_and_graphs(
    family: str, layout: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """On the GPU: Triton kernels, decode graphs and overlapped steps; the checkpoint
    copies are ordered on the stream between the steps that write and read them."""
    checkpoint = tiny_checkpoint(family, eos_token_id=None)
    first, new = ([9, 14, 6], [5, 3, 8]) if layout != "unified" else ([70, 55, 90], [20, 9, 30])

    def workload(engine: Engine) -> Any:
        return _multi_turn(engine, first, new, num_turns=3)

    options = dict(device="cuda", kernels="triton", overlap=True, cuda_graphs=True,
                   allocator=layout)  # fmt: skip
    (_, off, computed_off), (prompts, on, computed_on), _, engine = _both(
        checkpoint, workload, **options
    )
    assert on == off
    for turn_prompts, turn_outputs in zip(prompts, on, strict=True):
        for prompt, output in zip(turn_prompts, turn_outputs, strict=True):
            assert output == checkpoint.reference(prompt, MAX_TOKENS)
    assert computed_on[2] < computed_off[2] and engine.totals.prefix.num_hits > 0


def test_token_units_are_keyed_by_exact_ids_as_tokens_become_known() -> None:
    """The engine's keys: a unit is the tuple of its token ids, built once its tokens
    are known (the list grows as the host reads sampled tokens)."""
    from avmp.sched.prefix import TokenUnits

    tokens = [5, 6, 7, 8, 9]
    units = TokenUnits(tokens, unit_tokens=2, num_units=4)
    assert len(units) == 4 and units[:2] == [(5, 6), (7, 8)]
    with pytest.raises(RuntimeError, match="unit 2 needs 6 tokens; 5 are known"):
        units[2]
    tokens.append(10)  # a sampled token read
    assert units[2] == (9, 10) and units[-2] == (9, 10)
    with pytest.raises(IndexError):
        units[4]


def _one_at_a_time(engine: Engine, prompts: list[list[int]], boundary: int) -> list[list[int]]:
    """Each prompt alone (the next submitted once the last finished), with
    ``prefix_boundary``; their greedy outputs."""
    outputs = []
    for prompt in prompts:
        options = RequestOptions(max_tokens=MAX_TOKENS, prefix_boundary=boundary)
        request_id = engine.add_request(prompt, options)
        tokens: list[int] = []
        for _ in range(100):
            if not engine.has_unfinished_requests:
                break
            tokens += [t for u in engine.step() if u.request_id == request_id
                       for t in u.new_token_ids]  # fmt: skip
        else:
            raise AssertionError("a request unfinished after 100 steps")
        outputs.append(tokens)
    return outputs


@pytest.mark.parametrize("family", ["granitemoehybrid", "jamba"])
def test_a_system_prompt_boundary_is_resumed_by_the_second_request(
    family: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Requests one after another, a 42-token system prompt before their own tokens:
    with the boundary given, the first keeps a checkpoint at the system prompt's last
    whole page (40) and every later one resumes there; without it the second finds
    only the branch point (it takes the checkpoint there, for the third). Outputs are
    the same either way, and as without the cache."""
    checkpoint = tiny_checkpoint(family, eos_token_id=None)
    (system,) = random_prompts([42], seed=7)
    prompts = [system + user for user in random_prompts([5, 9, 6], seed=8)]
    runs = {}
    for cache, boundary in (("off", 0), ("avmp", 0), ("avmp", 42)):
        # each prompt in one chunk: no chunk end inside the system prompt keeps a state
        engine = Engine(checkpoint.path, _config(prefix_cache=cache, max_num_batched_tokens=64))
        runs[cache, boundary] = _one_at_a_time(engine, prompts, boundary), engine.stats.prefix
    assert runs["avmp", 0][0] == runs["avmp", 42][0] == runs["off", 0][0]
    assert runs["avmp", 0][1].num_hit_tokens == 40  # the third request only
    assert runs["avmp", 42][1].num_hit_tokens == 80  # the second and the third


def test_a_bad_prefix_boundary_is_one_line() -> None:
    with pytest.raises(ValueError, match="prefix_boundary must be a whole number >= 0"):
        RequestOptions(prefix_boundary=-1)
