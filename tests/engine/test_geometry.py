"""The cache geometry the engine's models declare (which sizes the pools and the views)
agrees with the one ``avmp.models`` reads from config.json (which the planner and the
simulator use)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_helpers import CONFIGS, TinyCheckpoint

from avmp.engine.loader import load_model
from avmp.engine.tiny import tiny_config, tiny_model
from avmp.models.geometry import ConvColumns, ModelGeometry
from avmp.models.hf import geometry_from_config
from avmp.models.zoo import zoo_config


def shapes(geometry: ModelGeometry) -> list[tuple[object, ...]]:
    """Every cache tensor's layer, kind, name and shape (the config reader keeps conv
    state in bf16 whatever the model's dtype; the engine keeps it in the model's)."""
    rows: list[tuple[object, ...]] = []
    for a in geometry.attention_layers:
        rows.append((a.layer_index, "attention", a.num_kv_heads, a.head_dim, a.dtype))
    for r in geometry.recurrent_layers:
        rows += [(r.layer_index, r.kind, t.name, t.shape) for t in r.tensors]
        if r.ssm is not None:  # a short convolution caches its conv window only
            rows.append((r.layer_index, r.kind, "ssm dtype", r.ssm.dtype))
    return rows


def assert_same_caches(ours: ModelGeometry, theirs: ModelGeometry) -> None:
    assert shapes(ours) == shapes(theirs)
    assert ours.kv_bytes_per_token == theirs.kv_bytes_per_token


@pytest.mark.parametrize("columns", list(ConvColumns))
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_model_geometry_matches_config_reader(
    family: str, columns: ConvColumns, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    path = tiny_checkpoint(family).path
    ours = load_model(path).geometry(torch.float32, torch.float32, columns)
    theirs = geometry_from_config(
        path, ssm_dtype="float32", kv_dtype="float32", conv_columns=columns
    )
    assert_same_caches(ours, theirs)


@pytest.mark.parametrize(
    "name", ["granite-4.0-h-tiny", "bamba-9b", "nemotron-h-8b", "jamba-1.5-mini", "falcon-h1-0.5b"]
)
def test_tiny_zoo_model_keeps_the_layer_pattern(name: str) -> None:
    raw = zoo_config(name)
    model = tiny_model(raw)
    geometry = model.geometry(torch.float32)
    published = geometry_from_config(raw)
    assert geometry.num_layers == published.num_layers
    assert [a.layer_index for a in geometry.attention_layers] == [
        a.layer_index for a in published.attention_layers
    ]
    assert [r.layer_index for r in geometry.recurrent_layers] == [
        r.layer_index for r in published.recurrent_layers
    ]
    assert tiny_config(raw).vocab_size == 32000
