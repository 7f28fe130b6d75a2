"""The checkpoint loader: sharded checkpoints load; a malformed or partial directory gets
one error that names what is missing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_helpers import TinyCheckpoint, granite_config, transformers
from safetensors.torch import load_file, save_file

from avmp.engine.loader import CheckpointError, load_model


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(granite_config())
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    return tmp_path


def _config_and_tensors(
    tmp_path: Path, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> dict[str, torch.Tensor]:
    """A tiny GraniteMoeHybrid checkpoint's config.json copied into ``tmp_path`` and its
    tensors, for a test to edit and save beside it."""
    source = tiny_checkpoint("granitemoehybrid").path
    shutil.copy(source / "config.json", tmp_path / "config.json")
    return load_file(str(source / "model.safetensors"))


def test_sharded_checkpoint_loads_every_tensor(sharded: Path) -> None:
    model = load_model(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    params = model.state_dict()
    for name, file in index["weight_map"].items():
        assert torch.equal(params[name], load_file(str(sharded / file))[name])


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(tmp_path)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path / "nowhere")


def test_missing_weight_file_named(sharded: Path) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (sharded / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing weight file.*{victim}"):
        load_model(sharded)


@pytest.mark.parametrize("text", ["[1, 2]", '{"metadata": {}}', '{"weight_map": "x"}',
                                  '{"weight_map": {"lm_head.weight": 3}}'])  # fmt: skip
def test_malformed_index_is_named(sharded: Path, text: str) -> None:
    (sharded / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="index.json: malformed index"):
        load_model(sharded)


def test_no_weights_at_all(sharded: Path) -> None:
    for file in sharded.glob("*.safetensors*"):
        file.unlink()
    with pytest.raises(CheckpointError, match="missing weights"):
        load_model(sharded)


def test_missing_tensors_listed(
    tmp_path: Path, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    tensors = _config_and_tensors(tmp_path, tiny_checkpoint)
    del tensors["model.norm.weight"], tensors["model.layers.2.self_attn.q_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors: .*q_proj.*model.norm.weight"):
        load_model(tmp_path)


def test_shape_mismatch_named(
    tmp_path: Path, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    tensors = _config_and_tensors(tmp_path, tiny_checkpoint)
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatch for model.norm.weight.*\(7,\)"):
        load_model(tmp_path)


def test_unsupported_family(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    config.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="not supported by the engine"):
        load_model(tmp_path)


def test_tied_embeddings_load_without_lm_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(granite_config(tie_word_embeddings=True))
    hf.save_pretrained(str(tmp_path))
    model = load_model(tmp_path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_malformed_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_float8_tensor_loads_as_transformers_reads_it(
    tmp_path: Path, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    tensors = _config_and_tensors(tmp_path, tiny_checkpoint)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert torch.equal(model.model.norm.weight, hf.model.norm.weight)
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight holds NaN"):
        load_model(tmp_path)


def test_config_dtype_the_engine_does_not_run_is_named(
    tmp_path: Path, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    source = tiny_checkpoint("granitemoehybrid").path
    shutil.copy(source / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "float8_e4m3fn"}))
    with pytest.raises(CheckpointError, match="config.json: dtype float8_e4m3fn is not one"):
        load_model(tmp_path)
    assert load_model(tmp_path, torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_path_with_tilde_is_under_home(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(sharded.parent))
    model = load_model(f"~/{sharded.name}/")
    assert torch.equal(model.lm_head.weight, load_model(sharded).lm_head.weight)
