"""Helpers for the engine tests (imported by name; conftest.py only holds fixtures).

Tiny random-weight models of every family the engine runs, written with
``save_pretrained`` and compared against transformers' own greedy ``generate``.

Multipliers and options are set away from their defaults so that a forward pass that
ignored one would not match.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from avmp.engine.engine import Engine, RequestOptions, RequestUpdate
from avmp.engine.sampling import TokenLogprobs
from avmp.memory.backing.views import TORCH_DTYPES
from avmp.models.geometry import ModelGeometry

transformers = pytest.importorskip("transformers")

VOCAB = 128
MiB = 1 << 20
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# float32 on GPU must stay float32 (TF32 convolutions would change greedy tokens)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def granite_config(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.1,  # large enough that every layer moves the logits
        hidden_size=64,
        intermediate_size=32,
        shared_intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["mamba", "mamba", "attention", "mamba"],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=2,
        mamba_chunk_size=8,
        position_embedding_type="rope",
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=1.5,
    )
    kwargs.update(overrides)
    return transformers.GraniteMoeHybridConfig(**kwargs)


def bamba_config(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.1,  # large enough that every layer moves the logits
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_indices=[1],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=2,
        mamba_chunk_size=8,
    )
    kwargs.update(overrides)
    return transformers.BambaConfig(**kwargs)


def nemotron_config(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.1,  # large enough that every layer moves the logits
        hidden_size=64,
        intermediate_size=96,
        layers_block_type=["linear_attention", "mlp", "full_attention", "moe"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        chunk_size=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
        n_group=1,
        topk_group=1,
    )
    kwargs.update(overrides)
    return transformers.NemotronHConfig(**kwargs)


def jamba_config(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.1,  # large enough that every layer moves the logits
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=8,
    )
    kwargs.update(overrides)
    return transformers.JambaConfig(**kwargs)


def falcon_config(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.1,  # large enough that every layer moves the logits
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=2,
        mamba_chunk_size=8,
        mamba_d_ssm=128,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
        embedding_multiplier=1.5,
        lm_head_multiplier=0.8,
        key_multiplier=0.7,
        attention_in_multiplier=1.2,
        attention_out_multiplier=0.9,
        ssm_in_multiplier=1.1,
        ssm_out_multiplier=0.6,
        ssm_multipliers=[1.0, 0.9, 1.1, 1.2, 0.8],
        mlp_multipliers=[1.3, 0.7],
    )
    kwargs.update(overrides)
    return transformers.FalconH1Config(**kwargs)


def zamba2_config(**overrides: Any) -> Any:
    """Two shared blocks over three hybrid layers (block 0 used twice, with its own
    adapters each time), rotary on, attention 2x wide."""
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.1,  # large enough that every layer moves the logits
        hidden_size=64,
        intermediate_size=96,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"],
        num_attention_heads=4,
        num_key_value_heads=4,  # transformers' k/v adapters need as many KV heads as heads
        n_mamba_heads=8,
        mamba_d_state=16,
        mamba_ngroups=2,
        chunk_size=8,
        num_mem_blocks=2,
        use_shared_attention_adapter=True,
        adapter_rank=8,
        use_mem_rope=True,
    )
    kwargs.update(overrides)
    kwargs["num_hidden_layers"] = len(kwargs["layers_block_type"])
    return transformers.Zamba2Config(**kwargs)


def _gated_deltanet_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-Next / Qwen3.5 text sizes: 2 key heads serving 4 value heads of another
    width than the keys, attention at layer 1, partial rotary away from its default."""
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.1,  # large enough that every layer moves the logits
        hidden_size=64,
        intermediate_size=96,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000.0,
            "partial_rotary_factor": 0.5,
        },
    )
    kwargs.update(overrides)
    kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    return kwargs


_DELTANET_MOE: dict[str, Any] = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
)  # fmt: skip


def qwen3_next_config(**overrides: Any) -> Any:
    """Experts on every layer but layer 2 (a dense MLP), top-k weights not renormalised."""
    extra = dict(_DELTANET_MOE, mlp_only_layers=[2], norm_topk_prob=False, **overrides)
    return transformers.Qwen3NextConfig(**_gated_deltanet_kwargs(extra))


def qwen3_5_config(**overrides: Any) -> Any:
    """The Qwen3.5 dense text model (the multimodal wrapper is tested in test_qwen3_next)."""
    return transformers.Qwen3_5TextConfig(**_gated_deltanet_kwargs(overrides))


def qwen3_5_moe_config(**overrides: Any) -> Any:
    kwargs = _gated_deltanet_kwargs({**_DELTANET_MOE, **overrides})
    return transformers.Qwen3_5MoeTextConfig(**kwargs)


def lfm2_config(**overrides: Any) -> Any:
    """Short convolutions around one attention layer, conv bias on, the MLP width
    adjusted as LFM2 does (a multiplier and a rounding away from their defaults)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.1,  # large enough that every layer moves the logits
        hidden_size=64,
        intermediate_size=96,
        layer_types=["conv", "full_attention", "conv", "conv"],
        num_attention_heads=4,
        num_key_value_heads=2,
        conv_L_cache=3,
        conv_bias=True,
        block_multiple_of=16,
        block_ffn_dim_multiplier=1.5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    kwargs.update(overrides)
    kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    return transformers.Lfm2Config(**kwargs)


def minimax_config(**overrides: Any) -> Any:
    """Lightning layers around one softmax-attention layer, blocks of 8 tokens (so a
    prefill chunk spans several), residual factors away from 1."""
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        initializer_range=0.1,  # large enough that every layer moves the logits
        hidden_size=64,
        intermediate_size=32,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=8,
        full_attn_alpha_factor=1.2,
        full_attn_beta_factor=0.9,
        linear_attn_alpha_factor=0.8,
        linear_attn_beta_factor=1.1,
        mlp_alpha_factor=1.3,
        mlp_beta_factor=0.7,
    )
    kwargs.update(overrides)
    kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    return transformers.MiniMaxConfig(**kwargs)


CONFIGS: dict[str, Callable[..., Any]] = {
    "granitemoehybrid": granite_config,
    "bamba": bamba_config,
    "nemotron_h": nemotron_config,
    "jamba": jamba_config,
    "falcon_h1": falcon_config,
    "qwen3_next": qwen3_next_config,
    "qwen3_5": qwen3_5_config,
    "qwen3_5_moe": qwen3_5_moe_config,
    "zamba2": zamba2_config,
    "lfm2": lfm2_config,
    "minimax": minimax_config,
}


@torch.no_grad()
def make_recurrence_matter(model: Any) -> None:
    """Move the parameters that default to constants away from them.

    With transformers' initialisation (``A = -1 .. -heads``, ``dt_bias = 1``) a Mamba
    state forgets within a few tokens, so a kernel that mishandled the state carried
    across prefill chunks would still pass. Here states decay slowly (``|A| dt`` near
    0.01), and norms, ``D`` and the expert-routing bias differ from their defaults.
    """
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            param.copy_(torch.log(torch.rand_like(param) * 0.09 + 0.01))
        elif leaf == "dt_bias" or name.endswith("dt_proj.bias"):
            param.fill_(-2.0)
        elif leaf == "D" or (leaf == "weight" and "norm" in name):
            param.copy_(1.0 + 0.2 * torch.randn_like(param))


class TinyCheckpoint:
    """A tiny random model saved to disk, plus greedy references from transformers."""

    def __init__(self, config: Any, path: Path, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.hf = transformers.AutoModelForCausalLM.from_config(config).eval()
        make_recurrence_matter(self.hf)
        self.hf.save_pretrained(str(path))
        self.path = path
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def reference(self, prompt: list[int], max_tokens: int) -> list[int]:
        """transformers' greedy continuation of ``prompt`` alone (batch 1, no padding)."""
        key = (tuple(prompt), max_tokens)
        if key not in self._cache:
            with torch.no_grad():
                out = self.hf.generate(
                    torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False
                )
            self._cache[key] = out[0, len(prompt) :].tolist()
        return self._cache[key]


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    """Prompts of the given lengths, avoiding the special ids 0-2 (pad, bos, eos)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


PromptReference = list[tuple[float, int, list[int], list[float]]]  # logprob, rank, top k


def prompt_logprobs_reference(hf: Any, prompt: list[int], k: int) -> PromptReference:
    """transformers' log-probability (log-softmax of its logits), rank and top ``k`` (ids,
    values) of every prompt token p >= 1 under ``hf``'s forward pass over ``prompt``."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [P - 1, V]
    chosen = logprobs.gather(1, torch.tensor(prompt[1:])[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top, ids = logprobs.topk(k, dim=-1)
    return [
        (float(c), int(r), i.tolist(), t.tolist())
        for c, r, i, t in zip(chosen[:, 0], ranks, ids, top, strict=True)
    ]


def assert_prompt_logprobs(
    checkpoint: TinyCheckpoint, prompt: list[int], k: int, got: list[TokenLogprobs | None] | None
) -> None:
    """``got`` (`RequestUpdate.prompt_logprobs`) is transformers' for ``prompt``: None
    first, then every position's log-probability, rank and top ``k``."""
    assert got is not None and len(got) == len(prompt) and got[0] is None
    reference = prompt_logprobs_reference(checkpoint.hf, prompt, k)
    for position, (entry, (logprob, rank, ids, values)) in enumerate(
        zip(got[1:], reference, strict=True), 1
    ):
        assert entry is not None, position
        assert entry.logprob == pytest.approx(logprob, abs=1e-4), position
        assert entry.rank == rank, position
        assert [token for token, _ in entry.top] == ids, position
        assert [value for _, value in entry.top] == pytest.approx(values, abs=1e-4)


def run_requests(
    engine: Engine, requests: list[tuple[list[int], RequestOptions]]
) -> list[list[RequestUpdate]]:
    """Add every request, step until all have finished (bounded); each one's updates."""
    ids = [engine.add_request(prompt, options) for prompt, options in requests]
    updates: dict[int, list[RequestUpdate]] = {request_id: [] for request_id in ids}
    for _ in range(10_000):
        if not engine.has_unfinished_requests:
            break
        for update in engine.step():
            updates[update.request_id].append(update)
    assert not engine.has_unfinished_requests
    return [updates[request_id] for request_id in ids]


class DenseLayerCaches:
    """`LayerCaches` with every layer's own tensors and a fixed number of pages and
    slots (no pools, no migration), so that the model and kernel tests can check
    numerics against hand-built page tables: per-layer K/V ``[num_pages, block_size,
    kv_heads, head_dim]`` and per-layer conv/SSM state ``[num_slots, ...]``."""

    def __init__(
        self,
        geometry: ModelGeometry,
        num_pages: int,
        num_slots: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in geometry.attention_layers:
            shape = (num_pages, block_size, layer.num_kv_heads, layer.head_dim)
            dtype = TORCH_DTYPES[layer.dtype]
            self._kv[layer.layer_index] = (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
        for rec in geometry.recurrent_layers:
            # a tensor the layer does not cache is empty, as the engine's views give it
            conv, ssm = (
                torch.zeros((num_slots, 0), device=device)
                if t is None
                else torch.zeros((num_slots, *t.shape), dtype=TORCH_DTYPES[t.dtype], device=device)
                for t in (rec.conv, rec.ssm)
            )
            self._state[rec.layer_index] = (conv, ssm)

    def kv(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._kv[layer_index]

    def state(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._state[layer_index]


def reference_tokens_with_ops(
    family: str, ops: Any, prompts: list[list[int]], max_tokens: int = 6
) -> tuple[list[list[list[int]]], Any]:
    """Greedy tokens of each prompt, alone, from the reference runner of a tiny
    ``family`` model (weights ~N(0, 0.3) from seed 0) whose layers run ``ops`` (None:
    the reference ops); and the model."""
    from avmp.engine.engine import EngineConfig
    from avmp.engine.models import model_class

    config = CONFIGS[family]()
    model = model_class(config.model_type)(config)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    engine = Engine(model, EngineConfig(16 * MiB, block_size=4, kernels="reference"))
    if ops is not None:
        engine.runner.ops = ops
        engine.model.use_ops(ops)
    tokens = [[o.token_ids for o in engine.generate([p], max_tokens=max_tokens)] for p in prompts]
    return tokens, model
