"""The planner: counts measured by admitting requests, and bytes that add up."""

from __future__ import annotations

import json

import pytest
from hybrid_geometries import jamba_mini, pure_recurrent, small_hybrid

from avmp.memory import planner
from avmp.memory.planner import Plan, plan
from avmp.memory.spec import MemoryConfig
from avmp.models.geometry import ModelGeometry

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def jamba_plan() -> Plan:
    return plan(jamba_mini(), MemoryConfig(12 * GiB), 512, 256)


def test_avmp_is_within_one_percent_of_oracle(jamba_plan: Plan) -> None:
    oracle = jamba_plan.allocator("oracle").num_requests
    assert oracle == (12 * GiB) // jamba_mini().request_bytes(768)
    assert jamba_plan.allocator("avmp").num_requests >= 0.99 * oracle
    assert jamba_plan.allocator("avmp").ratio_to_oracle >= 0.99


def test_unified_count_and_padding_follow_vllm_blocks(jamba_plan: Plan) -> None:
    unified = jamba_plan.unified
    assert jamba_plan.vllm_block_size == 80
    assert (unified.num_state_blocks_per_request, unified.num_kv_blocks_per_request) == (7, 10)
    row = jamba_plan.allocator("unified")
    assert row.num_requests == (unified.num_blocks - 1) // 17  # block 0 is the null block
    # each of 7 state blocks pads 4 layers' state pages by 327,680 - 311,296 bytes
    assert unified.state_padding_bytes == row.num_requests * 7 * 4 * (327_680 - 311_296)
    # 10 blocks of 80 tokens hold 800 token slots for 768 tokens (48 x 16 exactly)
    assert unified.kv_padding_bytes == row.num_requests * 32 * 16_384
    assert row.padding_bytes == unified.state_padding_bytes + unified.kv_padding_bytes
    assert row.rounding_bytes == 12 * GiB - (unified.num_blocks - 1) * unified.block_bytes


def test_static_loses_the_pool_it_cannot_use(jamba_plan: Plan) -> None:
    row = jamba_plan.allocator("static")
    assert row.num_requests < jamba_plan.allocator("oracle").num_requests
    assert row.padding_bytes == 0
    assert row.unusable_bytes > 1 * GiB  # the state pool is far bigger than the KV pool needs


@pytest.mark.parametrize(
    ("geometry", "tokens"),
    [
        (jamba_mini(), 100),
        (jamba_mini("float32"), 3000),
        (small_hybrid(), 77),
        (pure_recurrent(), 5),
    ],
)
def test_bytes_add_up_to_the_budget(geometry: ModelGeometry, tokens: int) -> None:
    result = plan(geometry, MemoryConfig(64 * MiB), tokens, 1)
    for row in result.allocators:
        total = row.needed_bytes + row.padding_bytes + row.rounding_bytes + row.unusable_bytes
        assert total == result.budget_bytes, row.name
        assert min(row.padding_bytes, row.rounding_bytes, row.unusable_bytes) >= 0, row.name
        assert row.needed_bytes == row.num_requests * geometry.request_bytes(tokens + 1)
        assert row.num_requests <= result.allocator("oracle").num_requests, row.name


def test_page_rounding_counts_the_last_partial_page() -> None:
    geometry = small_hybrid()
    result = plan(geometry, MemoryConfig(4 * MiB), 16, 1)  # 17 tokens: 15 empty token slots
    oracle = result.allocator("oracle")
    assert oracle.rounding_bytes == oracle.num_requests * 15 * geometry.kv_bytes_per_token


def test_pure_recurrent_model_has_no_vllm_block_size() -> None:
    result = plan(pure_recurrent(), MemoryConfig(64 * MiB), 100, 100)
    assert result.vllm_block_size is None
    assert result.break_even_tokens is None
    assert result.allocator("unified").padding_bytes == 0


def test_names_and_options_choose_what_is_measured() -> None:
    result = plan(
        jamba_mini(),
        MemoryConfig(1 * GiB),
        64,
        64,
        names=["static"],
        options={"static": {"state_fraction": 0.25}},
    )
    assert [row.name for row in result.allocators] == ["static", "oracle"]
    default = plan(jamba_mini(), MemoryConfig(1 * GiB), 64, 64, names=["static"])
    assert result.allocator("static").num_requests != default.allocator("static").num_requests


def test_to_dict_is_json(jamba_plan: Plan) -> None:
    data = json.loads(json.dumps(jamba_plan.to_dict()))
    assert data["vllm_block_size"] == 80
    assert data["request_tokens"] == 768
    assert [row["name"] for row in data["allocators"]] == [r.name for r in jamba_plan.allocators]
    with pytest.raises(AttributeError):
        jamba_plan.budget_bytes = 1  # type: ignore[misc]


def test_bad_requests_are_value_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    config = MemoryConfig(64 * MiB)
    with pytest.raises(ValueError, match="prompt length"):
        plan(jamba_mini(), config, 0, 10)
    with pytest.raises(ValueError, match="output length"):
        plan(jamba_mini(), config, 10, -1)
    with pytest.raises(ValueError, match="more than the whole budget"):
        plan(jamba_mini(), config, 100_000, 1)
    monkeypatch.setattr(planner, "MAX_PLANNED_REQUESTS", 3)
    with pytest.raises(ValueError, match="plan with less memory"):
        plan(jamba_mini(), config, 1, 1)
