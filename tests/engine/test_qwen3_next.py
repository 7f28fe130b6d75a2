"""Qwen3.5 as published: a multimodal checkpoint (text model under
``model.language_model.``, a vision tower, multi-token-prediction layers) runs its text
model token-identically to transformers; the DeltaNet state the engine allocates is the
geometry `avmp.models` reads; the output gate and the MoE matter."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import MiB, make_recurrence_matter, qwen3_5_moe_config, random_prompts

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.loader import load_model
from avmp.engine.models.qwen3_next import text_config
from avmp.models.geometry import ConvColumns, LayerKind
from avmp.models.hf import geometry_from_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

MAX_TOKENS = 8
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny Qwen3.5 MoE checkpoint in the published layout, plus an ``mtp.`` tensor."""
    text = qwen3_5_moe_config().to_dict()
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=VISION)
    torch.manual_seed(0)
    hf = transformers.Qwen3_5MoeForConditionalGeneration(config).eval()
    make_recurrence_matter(hf)
    path = tmp_path_factory.mktemp("qwen3_5_moe_vl")
    hf.save_pretrained(str(path))
    file = path / "model.safetensors"
    tensors = safetensors_torch.load_file(str(file))
    assert any(k.startswith("model.language_model.") for k in tensors)
    assert any(k.startswith("model.visual.") for k in tensors)
    tensors["mtp.fc.weight"] = torch.randn(64, 128)
    safetensors_torch.save_file(tensors, str(file), metadata={"format": "pt"})
    return path, hf


def test_multimodal_checkpoint_runs_its_text_model(multimodal: tuple[Path, object]) -> None:
    path, hf = multimodal
    config = EngineConfig(
        memory_bytes=4 * MiB, block_size=4, max_num_batched_tokens=12, check_integrity=True
    )
    engine = Engine(path, config)
    prompts = random_prompts([5, 17, 2])
    outputs = engine.generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
        assert output.token_ids == ref[0, len(prompt) :].tolist()


@pytest.mark.parametrize("ssm", [torch.float32, torch.bfloat16])
def test_engine_state_is_the_configs_geometry(
    multimodal: tuple[Path, object], ssm: torch.dtype
) -> None:
    path, _ = multimodal
    ours = load_model(path).geometry(torch.float32, ssm, ConvColumns.VLLM)
    name = "float32" if ssm == torch.float32 else "bfloat16"
    theirs = geometry_from_config(path, ssm_dtype=name, kv_dtype="float32")
    assert ours.family == theirs.family == "qwen3_5_moe"
    assert [(r.layer_index, r.kind, r.ssm.shape, r.ssm.dtype) for r in ours.recurrent_layers] == [
        (r.layer_index, r.kind, r.ssm.shape, r.ssm.dtype) for r in theirs.recurrent_layers
    ]
    assert [r.conv.shape for r in ours.recurrent_layers if r.conv] == [
        r.conv.shape for r in theirs.recurrent_layers if r.conv
    ]
    assert ours.kv_bytes_per_token == theirs.kv_bytes_per_token
    (first, *_) = ours.recurrent_layers
    # conv over q, k (2 heads of 16) and v (4 heads of 8); state [Hv, dk, dv]
    assert first.kind is LayerKind.GATED_DELTANET
    assert first.conv is not None and first.conv.shape == (2 * 2 * 16 + 4 * 8, 3)
    assert first.ssm.shape == (4, 16, 8)


def test_a_wrapper_without_its_text_model_is_refused() -> None:
    with pytest.raises(ValueError, match="text_config"):
        text_config(SimpleNamespace(model_type="qwen3_5", text_config=None))
