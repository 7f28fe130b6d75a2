"""SSM-state dtype choices and each family's default as vLLM and SGLang ship it."""

from __future__ import annotations

import pytest

from avmp.models import (
    PEER_SSM_DTYPES,
    ConfigError,
    default_ssm_dtype,
    resolve_model,
    ssm_dtype_name,
    zoo_names,
)


@pytest.mark.parametrize(
    ("choice", "name"),
    [("bf16", "bfloat16"), ("FP32", "float32"), ("fp16", "float16"), ("float32", "float32"),
     ("auto", None)],
)
def test_choices_map_to_dtype_names(choice: str, name: str | None) -> None:
    assert ssm_dtype_name(choice) == name


def test_unknown_choice_is_one_line() -> None:
    with pytest.raises(ValueError, match="one of auto, bf16, fp16, fp32, got 'int8'"):
        ssm_dtype_name("int8")
    with pytest.raises(ConfigError, match="got 'int8'"):
        resolve_model("nemotron-h-8b", ssm_dtype="int8")


def test_family_defaults_follow_the_peers() -> None:
    assert default_ssm_dtype("nemotron_h") == "float32"  # vLLM and SGLang
    assert default_ssm_dtype("granitemoehybrid") == "float32"  # SGLang's Mamba2 state
    assert default_ssm_dtype("jamba") == "bfloat16"  # both: the model's dtype
    assert default_ssm_dtype("no-such-family") == "bfloat16"


def test_every_zoo_family_has_a_stated_default() -> None:
    families = {resolve_model(name).family for name in zoo_names()}
    assert families <= set(PEER_SSM_DTYPES)


@pytest.mark.parametrize("name", ["nemotron-h-8b", "jamba-1.5-mini", "qwen3-next-80b-a3b"])
def test_auto_builds_the_familys_default(name: str) -> None:
    auto = resolve_model(name, ssm_dtype="auto")
    expected = default_ssm_dtype(auto.family)
    assert auto.ssm_dtype == expected
    assert auto == resolve_model(name, ssm_dtype=expected)
    fp32, bf16 = resolve_model(name, ssm_dtype="fp32"), resolve_model(name, ssm_dtype="bf16")
    assert fp32.ssm_bytes_per_request == 2 * bf16.ssm_bytes_per_request
    assert fp32.conv_bytes_per_request == bf16.conv_bytes_per_request  # conv follows the model
