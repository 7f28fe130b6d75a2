"""config.json -> geometry: layouts per family, the conv column convention, transformers'
defaults, and every error path (one clear line each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from avmp.models import (
    SUPPORTED_MODEL_TYPES,
    ConfigError,
    ConvColumns,
    LayerKind,
    geometry_from_config,
    load_config,
    resolve_model,
    zoo_config,
    zoo_names,
)


def _config(name: str, **changes: Any) -> dict[str, Any]:
    config = zoo_config(name)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def _raises(config: Any, match: str, **options: Any) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        geometry_from_config(config, **options)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ layouts


def test_jamba_attention_every_eighth_layer_from_offset_four() -> None:
    geometry = resolve_model("jamba-1.5-mini")
    assert [a.layer_index for a in geometry.attention_layers] == [4, 12, 20, 28]
    assert {r.kind for r in geometry.recurrent_layers} == {LayerKind.MAMBA1}
    mamba = geometry.recurrent_layers[0]
    assert mamba.conv is not None and mamba.conv.shape == (8192, 3)
    assert mamba.ssm.shape == (8192, 16)


def test_nemotron_pattern_symbols() -> None:
    geometry = geometry_from_config(
        _config("nemotron-h-8b", hybrid_override_pattern="M-*EM", num_hidden_layers=None)
    )
    assert geometry.num_layers == 5
    assert [a.layer_index for a in geometry.attention_layers] == [2]
    assert [r.layer_index for r in geometry.recurrent_layers] == [0, 4]


def test_nemotron_layers_block_type_wins_over_pattern() -> None:
    types = ["mamba", "attention", "mlp"]
    geometry = geometry_from_config(_config("nemotron-h-8b", layers_block_type=types))
    assert geometry.num_layers == 3 and geometry.num_attention_layers == 1


def test_nemotron_legacy_mamba_spellings_override() -> None:
    plain = resolve_model("nemotron-h-8b")
    legacy = geometry_from_config(_config("nemotron-h-8b", mamba_n_groups=1, mamba_d_conv=5))
    conv = legacy.recurrent_layers[0].conv
    assert conv is not None and conv.shape == (128 * 64 + 2 * 1 * 128, 4)
    assert legacy.ssm_bytes_per_request == plain.ssm_bytes_per_request


def test_falcon_h1_has_attention_and_mamba2_in_every_layer() -> None:
    geometry = resolve_model("falcon-h1-7b")
    every = list(range(44))
    assert [a.layer_index for a in geometry.attention_layers] == every
    assert [r.layer_index for r in geometry.recurrent_layers] == every


def test_falcon_h1_mamba_d_ssm_default_and_null() -> None:
    changes: dict[str, Any] = {"mamba_d_head": "auto", "mamba_n_heads": 16}
    default = geometry_from_config(_config("falcon-h1-7b", mamba_d_ssm=None, **changes))
    assert default.recurrent_layers[0].ssm.shape == (16, 1024 // 16, 256)
    config = _config("falcon-h1-7b", **changes)
    config["mamba_d_ssm"] = None
    from_expand = geometry_from_config(config)
    assert from_expand.recurrent_layers[0].ssm.shape == (16, 2 * 3072 // 16, 256)


def test_zamba2_shared_attention_is_twice_as_wide_and_counted_per_invocation() -> None:
    geometry = resolve_model("zamba2-2.7b")
    hybrid = [
        i for i, t in enumerate(zoo_config("zamba2-2.7b")["layers_block_type"]) if t == "hybrid"
    ]
    assert [a.layer_index for a in geometry.attention_layers] == hybrid
    assert {a.head_dim for a in geometry.attention_layers} == {2 * 2560 // 32}
    assert geometry.num_recurrent_layers == geometry.num_layers


def test_qwen3_next_full_attention_interval() -> None:
    geometry = geometry_from_config(_config("qwen3-next-80b-a3b", full_attention_interval=3))
    assert [a.layer_index for a in geometry.attention_layers] == list(range(2, 48, 3))
    deltanet = geometry.recurrent_layers[0]
    assert deltanet.kind is LayerKind.GATED_DELTANET
    assert deltanet.ssm.shape == (32, 128, 128)
    assert deltanet.conv is not None and deltanet.conv.shape == (2 * 16 * 128 + 32 * 128, 3)


def test_minimax_attn_type_list_and_layer_types_agree() -> None:
    by_list = resolve_model("minimax-text-01")
    codes = zoo_config("minimax-text-01")["attn_type_list"]
    types = ["full_attention" if c else "linear_attention" for c in codes]
    by_types = geometry_from_config(
        _config("minimax-text-01", model_type="minimax", attn_type_list=None, layer_types=types)
    )
    assert by_types.attention_layers == by_list.attention_layers
    assert by_types.recurrent_layers == by_list.recurrent_layers
    lightning = by_list.recurrent_layers[0]
    assert lightning.kind is LayerKind.LIGHTNING and lightning.conv is None
    assert lightning.ssm.shape == (64, 128, 128)


def test_mamba_ssm_and_transformers_mamba2_agree() -> None:
    from_ssm = resolve_model("mamba2-2.7b")
    hf = {
        "model_type": "mamba2",
        "hidden_size": 2560,
        "num_heads": 80,
        "head_dim": 64,
        "state_size": 128,
        "n_groups": 1,
        "num_hidden_layers": 64,
        "vocab_size": 50288,
        "tie_word_embeddings": True,
    }
    from_hf = geometry_from_config(hf)
    assert from_hf.recurrent_layers == from_ssm.recurrent_layers
    assert from_hf.num_params == pytest.approx(from_ssm.num_params, rel=1e-3)


def test_mamba_ssm_hybrid_attention_layers() -> None:
    config = _config(
        "mamba2-2.7b", attn_layer_idx=[3, 7], attn_cfg={"num_heads": 20, "num_heads_kv": 4}
    )
    geometry = geometry_from_config(config)
    assert [a.layer_index for a in geometry.attention_layers] == [3, 7]
    assert geometry.kv_bytes_per_token == 2 * 2 * 4 * 128 * 2


# ------------------------------------------------------------------ defaults


# Keys that state a family convention, absent from a config, take transformers' default.
CONVENTION_KEYS = {
    "jamba-v0.1": ["mamba_d_conv", "mamba_expand", "mamba_d_state", "num_key_value_heads",
                   "attn_layer_period", "attn_layer_offset", "mamba_dt_rank"],
    "qwen3-next-80b-a3b": ["linear_conv_kernel_dim", "head_dim", "num_key_value_heads",
                           "full_attention_interval", "layer_types"],
}


@pytest.mark.parametrize("zoo_name", sorted(CONVENTION_KEYS))
def test_missing_convention_keys_take_transformers_defaults(zoo_name: str) -> None:
    # JambaConfig's and Qwen3NextConfig's conventions are those models' values.
    bare = geometry_from_config(_config(zoo_name, **dict.fromkeys(CONVENTION_KEYS[zoo_name])))
    zoo = resolve_model(zoo_name)
    assert bare.attention_layers == zoo.attention_layers
    assert bare.recurrent_layers == zoo.recurrent_layers


REQUIRED = ["hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
            "intermediate_size"]


@pytest.mark.parametrize("key", REQUIRED)
@pytest.mark.parametrize("zoo_name", ["jamba-1.5-mini", "bamba-9b", "granite-4.0-h-tiny",
                                      "falcon-h1-7b", "minimax-text-01"])
def test_missing_size_is_named_with_the_file_not_defaulted(
    zoo_name: str, key: str, tmp_path: Path
) -> None:
    """A size the model is defined by is never filled in from some other checkpoint
    (the error would then quote a number the user never wrote)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config(zoo_name, **{key: None})))
    _raises(path, f"^{path}: missing key '{key}'$")


@pytest.mark.parametrize(
    "zoo_name, key",
    [("nemotron-h-8b", "hidden_size"), ("nemotron-h-8b", "num_attention_heads"),
     ("zamba2-2.7b", "vocab_size"), ("zamba2-2.7b", "num_attention_heads"),
     ("qwen3-next-80b-a3b", "num_hidden_layers"), ("mamba2-2.7b", "n_layer")],
)
def test_missing_size_in_other_families(zoo_name: str, key: str) -> None:
    _raises(_config(zoo_name, **{key: None}), f"missing key '{key}'")


def test_name_defaults() -> None:
    config = _config("jamba-v0.1", _name_or_path=None)
    assert geometry_from_config(config).name == "config"
    assert geometry_from_config({**config, "_name_or_path": "ai21/x"}).name == "ai21/x"
    assert geometry_from_config(config, name="mine").name == "mine"


# ------------------------------------------------------------------ conv columns and dtypes


@pytest.mark.parametrize("name", zoo_names())
def test_conv_columns_convention(name: str) -> None:
    vllm = resolve_model(name, conv_columns="vllm")
    hf = resolve_model(name, conv_columns=ConvColumns.TRANSFORMERS)
    assert vllm.conv_columns is ConvColumns.VLLM and hf.conv_columns is ConvColumns.TRANSFORMERS
    assert hf.ssm_bytes_per_request == vllm.ssm_bytes_per_request
    assert hf.kv_bytes_per_token == vllm.kv_bytes_per_token
    for v_layer, h_layer in zip(vllm.recurrent_layers, hf.recurrent_layers, strict=True):
        if v_layer.conv is None:
            assert h_layer.conv is None
            continue
        assert h_layer.conv is not None
        channels, columns = v_layer.conv.shape
        assert h_layer.conv.shape == (channels, columns + 1)


def test_dtypes_are_applied() -> None:
    geometry = resolve_model("bamba-9b", ssm_dtype="float32", kv_dtype="float16")
    assert {a.dtype for a in geometry.attention_layers} == {"float16"}
    assert {r.ssm.dtype for r in geometry.recurrent_layers} == {"float32"}
    assert {r.conv.dtype for r in geometry.recurrent_layers if r.conv} == {"bfloat16"}
    assert geometry.ssm_dtype == "float32"


# ------------------------------------------------------------------ errors


def test_unknown_model_type_lists_supported() -> None:
    message = _raises({"model_type": "llama"}, "unsupported model_type 'llama'; supported: ")
    assert all(t in message for t in SUPPORTED_MODEL_TYPES)


def test_missing_model_type() -> None:
    _raises({"hidden_size": 8}, "missing key 'model_type'")


def test_missing_key_without_default_is_named() -> None:
    _raises({"model_type": "nemotron_h"}, "missing key 'hybrid_override_pattern'")
    _raises({"d_model": 64, "ssm_cfg": {"layer": "Mamba2"}}, "missing key 'n_layer'")
    _raises(
        _config("mamba2-2.7b", attn_layer_idx=[1], attn_cfg={}), "attn_cfg: missing key 'num_heads'"
    )


@pytest.mark.parametrize(
    "key, value", [("hidden_size", 0), ("num_key_value_heads", -1), ("num_hidden_layers", 0)]
)
def test_non_positive_dims(key: str, value: int) -> None:
    _raises(_config("bamba-9b", **{key: value}), f"'{key}' must be positive, got {value}")


def test_wrong_types() -> None:
    _raises(_config("bamba-9b", hidden_size="4096"), "'hidden_size' must be an integer")
    _raises(_config("bamba-9b", hidden_size=True), "'hidden_size' must be an integer")
    _raises(_config("bamba-9b", attn_layer_indices="9"), "'attn_layer_indices' must be a list")
    _raises(
        _config("bamba-9b", tie_word_embeddings="no"), "'tie_word_embeddings' must be true or false"
    )
    _raises(_config("granite-4.0-h-tiny", num_local_experts=-2), "must be a non-negative integer")


def test_inconsistent_layouts() -> None:
    _raises(
        _config("granite-4.0-h-tiny", layer_types=["mamba"] * 3),
        "3 layer types for num_hidden_layers 40",
    )
    _raises(
        _config("granite-4.0-h-tiny", layer_types=["mamba"] * 39 + ["conv"]),
        "unknown layer type 'conv' at layer 39",
    )
    _raises(_config("nemotron-h-8b", hybrid_override_pattern="M*X"), r"unknown symbols \['X'\]")
    _raises(_config("zamba2-2.7b", num_hidden_layers=50), "54 layer types for num_hidden_layers 50")
    _raises(_config("minimax-text-01", attn_type_list=[0, 2]), "'attn_type_list' must hold 0")
    _raises(
        _config("bamba-9b", mamba_d_head=32),
        r"mamba heads x head dim \(128 x 32\) != inner size 8192",
    )
    _raises(
        _config("jamba-v0.1", num_attention_heads=3, num_key_value_heads=1),
        "not a multiple of num_attention_heads 3",
    )
    _raises(_config("mamba2-2.7b", ssm_cfg={"layer": "Mamba1"}), "only Mamba2")
    _raises(_config("mamba2-2.7b", ssm_cfg=[1]), "'ssm_cfg' must be an object")


@pytest.mark.parametrize(
    "zoo_name, heads, kv_heads",
    [("jamba-1.5-mini", 12, 5), ("falcon-h1-7b", 12, 8), ("granite-4.0-h-tiny", 12, 5),
     ("qwen3-next-80b-a3b", 16, 3), ("zamba2-2.7b", 32, 5)],
)
def test_query_heads_must_be_a_multiple_of_kv_heads(zoo_name: str, heads: int,
                                                    kv_heads: int) -> None:
    changes: dict[str, Any] = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    if zoo_name == "jamba-1.5-mini":
        changes["hidden_size"] = 12 * 256  # divisible, so the heads rule is what fails
    _raises(
        _config(zoo_name, **changes),
        f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
    )
    config = _config("mamba2-2.7b", attn_layer_idx=[1], attn_cfg={"num_heads": 12,
                                                                  "num_heads_kv": 5})
    _raises(config, "attn_cfg: num_heads 12 is not a multiple of num_heads_kv 5")


def test_bad_options() -> None:
    _raises({"model_type": "jamba"}, "ssm_dtype: unknown dtype 'fp8'", ssm_dtype="fp8")
    _raises({"model_type": "jamba"}, "kv_dtype: unknown dtype 'int4'", kv_dtype="int4")
    _raises(
        {"model_type": "jamba"},
        "unknown conv_columns 'both'; known: vllm, transformers",
        conv_columns="both",
    )


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "jamba",')
    _raises(bad, f"malformed JSON in {bad}")
    _raises(tmp_path, f"malformed JSON in {bad}")  # a directory means its config.json
    bad.write_text("[1, 2]")
    _raises(str(bad), f"malformed config {bad}: expected a JSON object")
    _raises(tmp_path / "absent", "no config file at")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'absent'}: no such file or directory"):
        resolve_model(str(tmp_path / "absent"))


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"model_type": "nemotron_h"}))
    _raises(path, f"^{path}: missing key 'hybrid_override_pattern'$")
    (tmp_path / "config.json").write_text(json.dumps(_config("jamba-v0.1", hidden_size=-4)))
    _raises(tmp_path, f"^{tmp_path / 'config.json'}: 'hidden_size' must be positive, got -4$")


def test_binary_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(bytes(range(128, 256)))
    _raises(path, f"malformed config {path}: not UTF-8 text")


def test_load_config_round_trip(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(zoo_config("jamba-v0.1")))
    assert load_config(tmp_path) == zoo_config("jamba-v0.1")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
