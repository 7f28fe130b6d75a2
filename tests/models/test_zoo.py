"""Every zoo model against the reference table (docs: shared/reference/MODELS.md).

The table's rows are copied here verbatim so the tests run from a clean clone: layers,
attention and recurrent layer counts, KV heads, head dim, KV bytes per token (exact),
state per request with bf16 and fp32 SSM state (MiB, rounded to 0.1) and the bf16
break-even length (tokens at which KV equals state).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest

from avmp.models import ConfigError, ModelGeometry, resolve_model, zoo_config, zoo_names

MIB = 1 << 20


class Row(NamedTuple):
    layers: int
    attention: int
    recurrent: int
    kv_heads: int | None
    head_dim: int | None
    kv_bytes_per_token: int
    state_mib_bf16: float
    state_mib_fp32: float
    break_even: int | None


TABLE: dict[str, Row] = {
    "jamba-v0.1": Row(32, 4, 28, 8, 128, 16_384, 8.3, 15.3, 532),
    "jamba-1.5-mini": Row(32, 4, 28, 8, 128, 16_384, 8.3, 15.3, 532),
    # not in MODELS.md: MODELS.md's formulas on the zoo's config (Jamba-1.5 paper's figures)
    "jamba-1.5-large": Row(72, 9, 63, 8, 128, 36_864, 37.4, 68.9, 1_064),
    "zamba2-2.7b": Row(54, 9, 54, 32, 160, 184_320, 35.4, 69.1, 201),
    "falcon-h1-0.5b": Row(36, 36, 36, 2, 64, 18_432, 13.9, 27.4, 789),
    "falcon-h1-1.5b": Row(24, 24, 24, 2, 128, 24_576, 36.5, 72.5, 1_557),
    "falcon-h1-7b": Row(44, 44, 44, 2, 128, 45_056, 66.9, 132.9, 1_557),
    "falcon-h1-34b": Row(72, 72, 72, 4, 128, 147_456, 146.1, 290.1, 1_039),
    "bamba-9b": Row(32, 3, 29, 8, 128, 12_288, 59.4, 117.4, 5_069),
    "granite-4.0-h-micro": Row(40, 4, 36, 8, 64, 8_192, 36.9, 72.9, 4_723),
    "granite-4.0-h-tiny": Row(40, 4, 36, 4, 128, 8_192, 27.7, 54.7, 3_544),
    "granite-4.0-h-small": Row(40, 4, 36, 8, 128, 16_384, 73.7, 145.7, 4_719),
    "nemotron-h-8b": Row(52, 4, 24, 8, 128, 16_384, 49.4, 97.4, 3_162),
    "nemotron-h-47b": Row(98, 5, 45, 8, 128, 20_480, 365.3, 725.3, 18_702),
    "nemotron-h-56b": Row(118, 10, 54, 8, 128, 40_960, 438.3, 870.3, 11_221),
    "nemotron-nano-9b-v2": Row(56, 4, 27, 8, 128, 16_384, 69.4, 136.9, 4_442),
    "qwen3-next-80b-a3b": Row(48, 12, 36, 2, 256, 24_576, 37.7, 73.7, 1_608),
    # not in MODELS.md: from MODELS.md's formulas on the zoo's (unconfirmed) config
    "qwen3.5-4b": Row(32, 8, 24, 4, 256, 32_768, 25.1, 49.1, 804),
    "minimax-text-01": Row(80, 10, 70, 8, 128, 40_960, 140.0, 280.0, 3_584),
    # not in MODELS.md: the conv windows only (2 columns of 2,048 bf16 channels, 10 layers)
    "lfm2-1.2b": Row(16, 6, 10, 8, 64, 12_288, 0.1, 0.1, 7),
    "mamba2-2.7b": Row(64, 0, 64, None, None, 0, 82.0, 162.0, None),
}

# MODELS.md: not confirmed from a first-party config.
UNCONFIRMED = {
    "minimax-text-01",
    "falcon-h1-0.5b",
    "falcon-h1-1.5b",
    "granite-4.0-h-micro",
    "granite-4.0-h-small",
    "qwen3.5-4b",
    "lfm2-1.2b",
}

# Published sizes (billions of parameters: total, active or None for dense / not checked).
PUBLISHED_PARAMS: dict[str, tuple[float, float | None]] = {
    "jamba-1.5-mini": (52.0, 12.0),
    "jamba-1.5-large": (398.0, 94.0),
    "jamba-v0.1": (52.0, 12.0),
    "granite-4.0-h-micro": (3.0, None),
    "granite-4.0-h-tiny": (7.0, None),
    "granite-4.0-h-small": (32.0, 9.0),
    "nemotron-h-8b": (8.0, None),
    "nemotron-h-47b": (47.0, None),
    "nemotron-h-56b": (56.0, None),
    "nemotron-nano-9b-v2": (9.0, None),
    "bamba-9b": (9.0, None),
    "falcon-h1-0.5b": (0.5, None),
    "falcon-h1-1.5b": (1.5, None),
    "falcon-h1-7b": (7.6, None),
    "falcon-h1-34b": (34.0, None),
    "zamba2-2.7b": (2.7, None),
    "mamba2-2.7b": (2.7, None),
    "qwen3-next-80b-a3b": (80.0, None),
    "minimax-text-01": (456.0, 45.9),
    "lfm2-1.2b": (1.2, None),
}


def test_zoo_holds_exactly_the_reference_models() -> None:
    assert zoo_names() == sorted(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_layer_counts_and_attention_dims(name: str) -> None:
    row, geometry = TABLE[name], resolve_model(name)
    assert geometry.num_layers == row.layers
    assert geometry.num_attention_layers == row.attention
    assert geometry.num_recurrent_layers == row.recurrent
    assert {layer.num_kv_heads for layer in geometry.attention_layers} == _as_set(row.kv_heads)
    assert {layer.head_dim for layer in geometry.attention_layers} == _as_set(row.head_dim)
    assert geometry.kv_bytes_per_token == row.kv_bytes_per_token


def _as_set(value: int | None) -> set[int]:
    return set() if value is None else {value}


def _mib(num_bytes: int) -> float:
    return num_bytes / MIB


@pytest.mark.parametrize("name", sorted(TABLE))
def test_state_per_request_bf16_and_fp32(name: str) -> None:
    row = TABLE[name]
    bf16 = resolve_model(name, ssm_dtype="bfloat16")
    fp32 = resolve_model(name, ssm_dtype="float32")
    assert _mib(bf16.state_bytes_per_request) == pytest.approx(row.state_mib_bf16, abs=0.05)
    assert _mib(fp32.state_bytes_per_request) == pytest.approx(row.state_mib_fp32, abs=0.05)
    # fp32 doubles the SSM part only; conv state stays bf16.
    assert fp32.conv_bytes_per_request == bf16.conv_bytes_per_request
    assert fp32.ssm_bytes_per_request == 2 * bf16.ssm_bytes_per_request


@pytest.mark.parametrize("name", sorted(TABLE))
def test_break_even(name: str) -> None:
    row, geometry = TABLE[name], resolve_model(name)
    if row.break_even is None:
        assert geometry.break_even_tokens is None
        return
    assert geometry.break_even_tokens is not None
    assert abs(geometry.break_even_tokens - row.break_even) <= 1
    # KV of break_even tokens equals the state, within one token's KV.
    gap = abs(
        geometry.request_bytes(geometry.break_even_tokens) - 2 * geometry.state_bytes_per_request
    )
    assert gap <= geometry.kv_bytes_per_token


@pytest.mark.parametrize("name", sorted(TABLE))
def test_confirmed_flag_and_source(name: str) -> None:
    config = zoo_config(name)
    assert config["_avmp_confirmed"] is (name not in UNCONFIRMED)
    assert isinstance(config["_avmp_source"], str) and config["_avmp_source"]
    assert resolve_model(name).confirmed is (name not in UNCONFIRMED)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_params_near_published_size(name: str) -> None:
    total, active = PUBLISHED_PARAMS[name]
    geometry = resolve_model(name)
    assert geometry.num_params / 1e9 == pytest.approx(total, rel=0.15)
    if active is not None:
        assert geometry.num_active_params / 1e9 == pytest.approx(active, rel=0.15)
    assert geometry.num_active_params <= geometry.num_params


def test_dense_models_have_every_parameter_active() -> None:
    for name in ("bamba-9b", "falcon-h1-7b", "nemotron-h-8b", "zamba2-2.7b", "granite-4.0-h-micro"):
        geometry = resolve_model(name)
        assert geometry.num_active_params == geometry.num_params


def test_names_are_case_insensitive() -> None:
    assert resolve_model("Jamba-1.5-Mini") == resolve_model("jamba-1.5-mini")
    assert zoo_config("GRANITE-4.0-H-TINY") == zoo_config("granite-4.0-h-tiny")


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown model 'jamba-2'; known: bamba-9b, .*zamba2-2.7b$"
    ):
        resolve_model("jamba-2")
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        zoo_config("nope")


def test_zoo_config_is_a_fresh_copy() -> None:
    zoo_config("bamba-9b")["hidden_size"] = 1
    assert zoo_config("bamba-9b")["hidden_size"] == 4096


def test_resolve_model_reads_a_path(tmp_path: pytest.TempPathFactory) -> None:
    import json
    from pathlib import Path

    folder = Path(str(tmp_path)) / "my-bamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(zoo_config("bamba-9b")))
    by_dir = resolve_model(str(folder), ssm_dtype="float32")
    by_file = resolve_model(str(folder / "config.json"), ssm_dtype="float32")
    assert by_dir.name == by_file.name == "my-bamba"
    assert (
        by_dir.state_bytes_per_request
        == resolve_model("bamba-9b", ssm_dtype="float32").state_bytes_per_request
    )


def _families() -> dict[str, str]:
    return {name: resolve_model(name).family for name in zoo_names()}


def test_every_supported_family_is_in_the_zoo() -> None:
    assert set(_families().values()) == {
        "jamba",
        "zamba2",
        "falcon_h1",
        "bamba",
        "granitemoehybrid",
        "nemotron_h",
        "qwen3_next",
        "qwen3_5",
        "minimax",
        "mamba2",
        "lfm2",
    }


def _geometry_sanity(geometry: ModelGeometry) -> None:
    indices = [layer.layer_index for layer in geometry.attention_layers]
    assert indices == sorted(set(indices))
    assert all(0 <= i < geometry.num_layers for i in indices)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_layer_indices_are_in_range_and_unique(name: str) -> None:
    geometry = resolve_model(name)
    _geometry_sanity(geometry)
    recurrent = [layer.layer_index for layer in geometry.recurrent_layers]
    assert recurrent == sorted(set(recurrent)) and all(
        0 <= i < geometry.num_layers for i in recurrent
    )
