"""Hugging Face ``config.json`` -> `ModelGeometry`.

One reader per ``model_type``. Key names and defaults follow transformers' configuration
classes, so a geometry read here matches what transformers and vLLM would allocate for
the same checkpoint. Two kinds of key:

- required: the sizes that say which model this is (layer count, hidden size,
  vocabulary, attention heads, MLP width). transformers' defaults for these are one
  checkpoint's values, and every saved config.json writes them, so a config without one
  is truncated or hand-written: a default would describe another model, and a later
  error would quote a number the user never wrote. A missing one is an error naming
  the key and the file.
- conventions of the family (conv width, expand factor, groups, state size, KV heads =
  query heads, ``head_dim`` = hidden / heads, layer periods): absent, they take the
  default their transformers class would give them.

Parameter counts are estimates from the config (linear layers, embeddings, experts;
norms and biases are ignored): the step-time model needs weight bytes and active
parameters, not an exact count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    ConvColumns,
    LayerKind,
    ModelGeometry,
    ParallelDims,
    RecurrentLayer,
    dtype_bytes,
)
from avmp.models.tensor_parallel import mamba2_groups
from avmp.units import ceil_div, round_up

CONFIG_FILENAME = "config.json"
# Conv state lives in the activation dtype (bf16) in vLLM and transformers alike; only
# the SSM / linear-attention state's dtype varies between engines, so only it is an option.
_CONV_DTYPE = "bfloat16"
_REQUIRED: Any = object()


class ConfigError(ValueError):
    """A config that cannot be read into a geometry; the message is one line."""


class _Config:
    """Typed, defaulting access to one config dict; errors name the key and the model."""

    def __init__(self, raw: Mapping[str, Any], label: str) -> None:
        self.raw = raw
        self.label = label

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def value(self, key: str, default: Any = _REQUIRED) -> Any:
        found = self.raw.get(key)
        if found is not None:
            return found
        if default is _REQUIRED:
            raise ConfigError(f"{self.label}: missing key {key!r}")
        return default

    def dim(self, key: str, default: Any = _REQUIRED) -> int:
        """A positive integer dimension."""
        found = self.value(key, default)
        if isinstance(found, bool) or not isinstance(found, int):
            raise ConfigError(f"{self.label}: {key!r} must be an integer, got {found!r}")
        if found <= 0:
            raise ConfigError(f"{self.label}: {key!r} must be positive, got {found}")
        return found

    def count(self, key: str, default: Any = _REQUIRED) -> int:
        """A non-negative integer (e.g. a number of experts, 0 meaning none)."""
        found = self.value(key, default)
        if isinstance(found, bool) or not isinstance(found, int) or found < 0:
            raise ConfigError(
                f"{self.label}: {key!r} must be a non-negative integer, got {found!r}"
            )
        return found

    def flag(self, key: str, default: bool) -> bool:
        found = self.value(key, default)
        if not isinstance(found, bool):
            raise ConfigError(f"{self.label}: {key!r} must be true or false, got {found!r}")
        return found

    def sequence(self, key: str, default: Any = _REQUIRED) -> list[Any]:
        found = self.value(key, default)
        if not isinstance(found, list):
            raise ConfigError(f"{self.label}: {key!r} must be a list, got {found!r}")
        return found

    def indices(self, key: str, default: Any = _REQUIRED) -> set[int]:
        """A list of layer indices, as a set."""
        found = self.sequence(key, default)
        for item in found:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ConfigError(
                    f"{self.label}: {key!r} must be a list of layer indices, got {item!r} in it"
                )
        return set(found)

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.label}: {message}")


@dataclass(frozen=True)
class _Options:
    ssm_dtype: str
    conv_columns: ConvColumns
    kv_dtype: str


@dataclass
class _Params:
    """Running parameter totals: everything, and what one token actually uses."""

    total: int = 0
    active: int = 0

    def add(self, total: int, active: int | None = None) -> None:
        self.total += total
        self.active += total if active is None else active


@dataclass
class _Build:
    """What a family reader collects before it becomes a `ModelGeometry`."""

    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    attention: list[AttentionLayer] = field(default_factory=list)
    recurrent: list[RecurrentLayer] = field(default_factory=list)
    params: _Params = field(default_factory=_Params)
    # what tensor parallelism splits beside the caches (`ParallelDims`)
    num_attention_heads: int = 0
    mlp_widths: set[int] = field(default_factory=set)
    num_experts: int = 0

    def dense_width(self, width: int) -> int:
        """Record a dense MLP's (or shared expert's) width, which ranks split; returns it."""
        self.mlp_widths.add(width)
        return width


# ---------------------------------------------------------------- cache tensors


def _mamba1(index: int, d_inner: int, d_state: int, d_conv: int, opt: _Options) -> RecurrentLayer:
    conv = CacheTensor("conv", (d_inner, opt.conv_columns.columns(d_conv)), _CONV_DTYPE)
    ssm = CacheTensor("ssm", (d_inner, d_state), opt.ssm_dtype)
    return RecurrentLayer(index, LayerKind.MAMBA1, ssm=ssm, conv=conv)


@dataclass(frozen=True)
class _Mamba2Dims:
    num_heads: int
    head_dim: int
    num_groups: int
    d_state: int
    d_conv: int

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        return self.d_inner + 2 * self.num_groups * self.d_state


def _mamba2(index: int, dims: _Mamba2Dims, opt: _Options) -> RecurrentLayer:
    columns = opt.conv_columns.columns(dims.d_conv)
    conv = CacheTensor("conv", (dims.conv_channels, columns), _CONV_DTYPE)
    ssm = CacheTensor("ssm", (dims.num_heads, dims.head_dim, dims.d_state), opt.ssm_dtype)
    return RecurrentLayer(index, LayerKind.MAMBA2, ssm=ssm, conv=conv)


@dataclass(frozen=True)
class _DeltaNetDims:
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    d_conv: int

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim


def _deltanet(index: int, dims: _DeltaNetDims, opt: _Options) -> RecurrentLayer:
    columns = opt.conv_columns.columns(dims.d_conv)
    conv = CacheTensor("conv", (dims.conv_channels, columns), _CONV_DTYPE)
    ssm = CacheTensor("ssm", (dims.value_heads, dims.key_dim, dims.value_dim), opt.ssm_dtype)
    return RecurrentLayer(index, LayerKind.GATED_DELTANET, ssm=ssm, conv=conv)


def _short_conv(index: int, channels: int, d_conv: int, opt: _Options) -> RecurrentLayer:
    """LFM2's gated short convolution: its conv window is its whole state."""
    conv = CacheTensor("conv", (channels, opt.conv_columns.columns(d_conv)), _CONV_DTYPE)
    return RecurrentLayer(index, LayerKind.SHORT_CONV, ssm=None, conv=conv)


def _lightning(index: int, num_heads: int, head_dim: int, opt: _Options) -> RecurrentLayer:
    ssm = CacheTensor("kv_state", (num_heads, head_dim, head_dim), opt.ssm_dtype)
    return RecurrentLayer(index, LayerKind.LIGHTNING, ssm=ssm)


# ---------------------------------------------------------------- parameter estimates


def _attention_params(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """q, k, v and o projections (``num_heads * head_dim`` may differ from hidden)."""
    return 2 * hidden * num_heads * head_dim + 2 * hidden * num_kv_heads * head_dim


def _mlp_params(hidden: int, intermediate: int, *, gated: bool = True) -> int:
    return (3 if gated else 2) * hidden * intermediate


def _mamba1_params(hidden: int, d_inner: int, d_state: int, d_conv: int, dt_rank: int) -> int:
    in_out = 3 * hidden * d_inner
    x_proj = d_inner * (dt_rank + 2 * d_state)
    return in_out + x_proj + dt_rank * d_inner + d_inner * (d_state + d_conv + 2)


def _mamba2_params(hidden: int, dims: _Mamba2Dims) -> int:
    in_proj = hidden * (dims.d_inner + dims.conv_channels + dims.num_heads)
    conv = dims.conv_channels * dims.d_conv
    return in_proj + conv + dims.d_inner * hidden + dims.d_inner + 3 * dims.num_heads


def _embedding_params(vocab: int, hidden: int, tied: bool) -> int:
    return vocab * hidden * (1 if tied else 2)


def _add_moe(b: _Build, hidden: int, experts: int, top_k: int, expert_params: int) -> None:
    """Routed experts plus the router; only ``top_k`` experts count as active."""
    b.num_experts = max(b.num_experts, experts)
    router = hidden * experts
    b.params.add(experts * expert_params + router, top_k * expert_params + router)


# ---------------------------------------------------------------- shared readers


def _layer_types(cfg: _Config, key: str) -> list[str]:
    """A per-layer type list, legacy names mapped as transformers does."""
    legacy = {"mamba": "linear_attention", "attention": "full_attention"}
    types = cfg.sequence(key)
    if not all(isinstance(t, str) for t in types):
        raise cfg.fail(f"{key!r} must be a list of strings")
    return [legacy.get(t, t) for t in types]


def _mamba2_dims(cfg: _Config, d_inner: int) -> _Mamba2Dims:
    """Mamba2 dims as Bamba, GraniteMoeHybrid and FalconH1 name them (``mamba_*``)."""
    num_heads = cfg.dim("mamba_n_heads", 128)
    head = cfg.value("mamba_d_head", "auto")
    head_dim = d_inner // num_heads if head == "auto" else cfg.dim("mamba_d_head")
    if head_dim <= 0 or head_dim * num_heads != d_inner:
        raise cfg.fail(f"mamba heads x head dim ({num_heads} x {head_dim}) != inner size {d_inner}")
    return _Mamba2Dims(
        num_heads=num_heads,
        head_dim=head_dim,
        num_groups=cfg.dim("mamba_n_groups", 1),
        d_state=cfg.dim("mamba_d_state", 256),
        d_conv=cfg.dim("mamba_d_conv", 4),
    )


@dataclass(frozen=True)
class _AttnDims:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _attn_dims(
    cfg: _Config,
    hidden: int,
    *,
    kv_heads_default: int | None = None,
    head_dim_default: int | None = None,
) -> _AttnDims:
    """Attention dims with the family's transformers defaults: the query heads are
    required; KV heads default to the query heads where the class default is None;
    ``head_dim`` falls back to ``hidden / heads`` unless the class has its own default."""
    num_heads = cfg.dim("num_attention_heads")
    num_kv_heads = cfg.dim("num_key_value_heads", kv_heads_default or num_heads)
    if cfg.has("head_dim") or head_dim_default is not None:
        head_dim = cfg.dim("head_dim", head_dim_default)
    else:
        if hidden % num_heads:
            raise cfg.fail(
                f"hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}"
            )
        head_dim = hidden // num_heads
    return _checked_attn(cfg, _AttnDims(num_heads, num_kv_heads, head_dim))


def _checked_attn(
    cfg: _Config,
    dims: _AttnDims,
    keys: tuple[str, str] = ("num_attention_heads", "num_key_value_heads"),
) -> _AttnDims:
    """Grouped-query attention shares each KV head among an equal number of query heads
    (every family here repeats KV heads ``heads / kv_heads`` times), so the query heads
    must be a multiple of the KV heads."""
    if dims.num_heads % dims.num_kv_heads:
        raise cfg.fail(
            f"{keys[0]} {dims.num_heads} is not a multiple of {keys[1]} {dims.num_kv_heads}"
        )
    return dims


# Most decoder layers a config may declare: far beyond any published model (Nemotron-H-56B
# has 118), low enough that reading the layers of a mistyped count stays instant.
MAX_LAYERS = 10_000


def _base(cfg: _Config, family: str) -> _Build:
    """The required sizes every family reader starts from."""
    num_layers = cfg.dim("num_hidden_layers")
    if num_layers > MAX_LAYERS:
        raise cfg.fail(f"num_hidden_layers {num_layers} is more than {MAX_LAYERS:,} layers")
    return _Build(
        family=family,
        num_layers=num_layers,
        hidden_size=cfg.dim("hidden_size"),
        vocab_size=cfg.dim("vocab_size"),
    )


def _add_attention(build: _Build, index: int, dims: _AttnDims, opt: _Options) -> None:
    build.attention.append(AttentionLayer(index, dims.num_kv_heads, dims.head_dim, opt.kv_dtype))
    build.num_attention_heads = dims.num_heads
    build.params.add(
        _attention_params(build.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim)
    )


def _add_embeddings(build: _Build, cfg: _Config, tied_default: bool) -> None:
    tied = cfg.flag("tie_word_embeddings", tied_default)
    build.params.add(_embedding_params(build.vocab_size, build.hidden_size, tied))


# ---------------------------------------------------------------- families


def _jamba(cfg: _Config, opt: _Options) -> _Build:
    """Jamba: Mamba1 mixers, attention every ``attn_layer_period``-th layer from an offset,
    MoE MLP every ``expert_layer_period``-th layer from an offset."""
    b = _base(cfg, "jamba")
    h = b.hidden_size
    attn = _attn_dims(cfg, h, kv_heads_default=8)
    d_inner = cfg.dim("mamba_expand", 2) * h
    d_state, d_conv = cfg.dim("mamba_d_state", 16), cfg.dim("mamba_d_conv", 4)
    dt_rank_raw = cfg.value("mamba_dt_rank", "auto")
    dt_rank = ceil_div(h, 16) if dt_rank_raw == "auto" else cfg.dim("mamba_dt_rank")
    attn_period, attn_offset = cfg.dim("attn_layer_period", 8), cfg.count("attn_layer_offset", 4)
    exp_period, exp_offset = cfg.dim("expert_layer_period", 2), cfg.count("expert_layer_offset", 1)
    experts, top_k = cfg.dim("num_experts", 16), cfg.dim("num_experts_per_tok", 2)
    mlp = _mlp_params(h, b.dense_width(cfg.dim("intermediate_size")))
    for i in range(b.num_layers):
        if i % attn_period == attn_offset:
            _add_attention(b, i, attn, opt)
        else:
            b.recurrent.append(_mamba1(i, d_inner, d_state, d_conv, opt))
            b.params.add(_mamba1_params(h, d_inner, d_state, d_conv, dt_rank))
        if experts > 1 and i % exp_period == exp_offset:
            _add_moe(b, h, experts, top_k, mlp)
        else:
            b.params.add(mlp)
    _add_embeddings(b, cfg, False)
    return b


def _bamba(cfg: _Config, opt: _Options) -> _Build:
    """Bamba: Mamba2 everywhere except ``attn_layer_indices``; dense gated MLP."""
    b = _base(cfg, "bamba")
    attn_indices = cfg.indices("attn_layer_indices", [])
    types = [
        "full_attention" if i in attn_indices else "linear_attention" for i in range(b.num_layers)
    ]
    mlp = _mlp_params(b.hidden_size, b.dense_width(cfg.dim("intermediate_size")))
    _hybrid_mamba2_layers(b, cfg, opt, types, lambda _: b.params.add(mlp), kv_heads_default=8)
    _add_embeddings(b, cfg, False)
    return b


def _granite_hybrid(cfg: _Config, opt: _Options) -> _Build:
    """Granite-4.0-H: Mamba2 or attention per ``layer_types``; every layer has a shared
    (always active) MLP and, when ``num_local_experts`` > 0, routed experts."""
    b = _base(cfg, "granitemoehybrid")
    types = (
        _layer_types(cfg, "layer_types")
        if cfg.has("layer_types")
        else ["linear_attention"] * b.num_layers
    )
    experts = cfg.count("num_local_experts", 8)
    top_k = cfg.dim("num_experts_per_tok", 2) if experts else 0
    expert = _mlp_params(b.hidden_size, cfg.dim("intermediate_size"))
    shared = _mlp_params(b.hidden_size, b.dense_width(cfg.dim("shared_intermediate_size", 1024)))

    def add_mlp(_: int) -> None:
        b.params.add(shared)
        if experts:
            _add_moe(b, b.hidden_size, experts, top_k, expert)

    _hybrid_mamba2_layers(b, cfg, opt, types, add_mlp, kv_heads_default=None)
    _add_embeddings(b, cfg, False)
    return b


def _hybrid_mamba2_layers(
    b: _Build,
    cfg: _Config,
    opt: _Options,
    types: list[str],
    add_mlp: Callable[[int], None],
    *,
    kv_heads_default: int | None,
) -> None:
    """Bamba / Granite layout: each layer is attention or Mamba2, followed by an MLP."""
    if len(types) != b.num_layers:
        raise cfg.fail(f"{len(types)} layer types for num_hidden_layers {b.num_layers}")
    attn = _attn_dims(cfg, b.hidden_size, kv_heads_default=kv_heads_default)
    dims = _mamba2_dims(cfg, cfg.dim("mamba_expand", 2) * b.hidden_size)
    for i, kind in enumerate(types):
        if kind == "full_attention":
            _add_attention(b, i, attn, opt)
        elif kind == "linear_attention":
            b.recurrent.append(_mamba2(i, dims, opt))
            b.params.add(_mamba2_params(b.hidden_size, dims))
        else:
            raise cfg.fail(f"unknown layer type {kind!r} at layer {i}")
        add_mlp(i)


_NEMOTRON_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def _nemotron_types(cfg: _Config) -> list[str]:
    if cfg.has("layers_block_type"):
        return _layer_types(cfg, "layers_block_type")
    pattern = cfg.value("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise cfg.fail(f"'hybrid_override_pattern' must be a non-empty string, got {pattern!r}")
    unknown = sorted(set(pattern) - set(_NEMOTRON_PATTERN))
    if unknown:
        raise cfg.fail(f"'hybrid_override_pattern' has unknown symbols {unknown} (known: M * - E)")
    return [_NEMOTRON_PATTERN[c] for c in pattern]


def _nemotron_h(cfg: _Config, opt: _Options) -> _Build:
    """Nemotron-H: one mixer per layer (Mamba2, attention, relu2 MLP or MoE) from the
    ``hybrid_override_pattern`` string (or ``layers_block_type``)."""
    types = _nemotron_types(cfg)
    b = _Build("nemotron_h", len(types), cfg.dim("hidden_size"), cfg.dim("vocab_size"))
    h = b.hidden_size
    attn = _attn_dims(
        cfg, h, kv_heads_default=8, head_dim_default=cfg.dim("attention_head_dim", 128)
    )
    # NemotronHConfig lets the legacy mamba_* spellings override the plain ones.
    dims = _Mamba2Dims(
        num_heads=cfg.dim("mamba_num_heads", 128),
        head_dim=cfg.dim("mamba_head_dim", 64),
        num_groups=cfg.dim("mamba_n_groups", cfg.dim("n_groups", 8)),
        d_state=cfg.dim("ssm_state_size", 128),
        d_conv=cfg.dim("mamba_d_conv", cfg.dim("conv_kernel", 4)),
    )
    for i, kind in enumerate(types):
        if kind == "full_attention":
            _add_attention(b, i, attn, opt)
        elif kind == "linear_attention":
            b.recurrent.append(_mamba2(i, dims, opt))
            b.params.add(_mamba2_params(h, dims))
        elif kind == "mlp":
            b.params.add(_mlp_params(h, b.dense_width(cfg.dim("intermediate_size")), gated=False))
        elif kind == "moe":
            _nemotron_moe(b, cfg)
        else:
            raise cfg.fail(f"unknown layer type {kind!r} at layer {i}")
    _add_embeddings(b, cfg, False)
    return b


def _nemotron_moe(b: _Build, cfg: _Config) -> None:
    h = b.hidden_size
    expert = _mlp_params(h, cfg.dim("moe_intermediate_size", 7688), gated=False)
    experts, top_k = cfg.dim("n_routed_experts", 8), cfg.dim("num_experts_per_tok", 2)
    _add_moe(b, h, experts, top_k, expert)
    shared = cfg.count("n_shared_experts", 1)
    width = cfg.dim("moe_shared_expert_intermediate_size", 7688)
    if shared:
        b.dense_width(width)
    b.params.add(shared * _mlp_params(h, width, gated=False))


def _falcon_h1(cfg: _Config, opt: _Options) -> _Build:
    """Falcon-H1: attention and Mamba2 side by side in every layer, then a gated MLP."""
    b = _base(cfg, "falcon_h1")
    attn = _attn_dims(cfg, b.hidden_size, kv_heads_default=8)
    dims = _mamba2_dims(cfg, _falcon_d_ssm(cfg, b.hidden_size))
    mlp = _mlp_params(b.hidden_size, b.dense_width(cfg.dim("intermediate_size")))
    for i in range(b.num_layers):
        _add_attention(b, i, attn, opt)
        b.recurrent.append(_mamba2(i, dims, opt))
        b.params.add(_mamba2_params(b.hidden_size, dims) + mlp)
    _add_embeddings(b, cfg, False)
    return b


def _falcon_d_ssm(cfg: _Config, hidden: int) -> int:
    """FalconH1Config defaults ``mamba_d_ssm`` to 1024; an explicit null means
    ``mamba_expand * hidden_size``."""
    if "mamba_d_ssm" in cfg.raw and cfg.raw["mamba_d_ssm"] is None:
        return cfg.dim("mamba_expand", 2) * hidden
    return cfg.dim("mamba_d_ssm", 1024)


def _zamba2_types(cfg: _Config) -> list[str]:
    if cfg.has("layers_block_type"):
        return _layer_types(cfg, "layers_block_type")
    five = ["linear_attention"] * 5 + ["hybrid"]
    tail = ["linear_attention"] * 4 + ["hybrid"] + ["linear_attention"] * 3 + ["hybrid"]
    return ["linear_attention"] + five * 7 + tail + ["linear_attention"] * 2


def _zamba2(cfg: _Config, opt: _Options) -> _Build:
    """Zamba2: Mamba2 in every layer; ``hybrid`` layers also call one of
    ``num_mem_blocks`` shared transformer blocks whose attention input is the hidden
    state concatenated with the embeddings (2x wide). Each invocation has its own KV."""
    types = _zamba2_types(cfg)
    b = _Build("zamba2", len(types), cfg.dim("hidden_size"), cfg.dim("vocab_size"))
    if cfg.has("num_hidden_layers") and cfg.dim("num_hidden_layers") != b.num_layers:
        raise cfg.fail(
            f"{b.num_layers} layer types for num_hidden_layers {cfg.dim('num_hidden_layers')}"
        )
    h = b.hidden_size
    heads = cfg.dim("num_attention_heads")
    attn = _AttnDims(heads, cfg.dim("num_key_value_heads", heads), 2 * h // heads)
    if attn.head_dim * heads != 2 * h:
        raise cfg.fail(f"2 x hidden_size {2 * h} is not a multiple of num_attention_heads {heads}")
    _checked_attn(cfg, attn)
    mamba_heads = cfg.dim("n_mamba_heads", 8)
    d_inner = cfg.dim("mamba_expand", 2) * h
    dims = _Mamba2Dims(
        mamba_heads,
        d_inner // mamba_heads,
        cfg.dim("mamba_ngroups", 1),
        cfg.dim("mamba_d_state", 64),
        cfg.dim("mamba_d_conv", 4),
    )
    for i, kind in enumerate(types):
        if kind not in ("linear_attention", "hybrid"):
            raise cfg.fail(f"unknown layer type {kind!r} at layer {i}")
        b.recurrent.append(_mamba2(i, dims, opt))
        b.params.add(_mamba2_params(h, dims))
        if kind == "hybrid":
            b.attention.append(AttentionLayer(i, attn.num_kv_heads, attn.head_dim, opt.kv_dtype))
            b.num_attention_heads = attn.num_heads
            b.params.add(h * h)  # the per-invocation linear back into the residual stream
    _zamba2_shared_blocks(b, cfg, attn)
    _add_embeddings(b, cfg, True)
    return b


def _zamba2_shared_blocks(b: _Build, cfg: _Config, attn: _AttnDims) -> None:
    h = b.hidden_size
    wide = 2 * h
    attention = 3 * wide * attn.num_heads * attn.head_dim + attn.num_heads * attn.head_dim * h
    mlp = _mlp_params(h, b.dense_width(cfg.dim("intermediate_size", 4 * h)))
    b.params.add(cfg.dim("num_mem_blocks", 1) * (attention + mlp))


def _qwen3_next(cfg: _Config, opt: _Options) -> _Build:
    """Qwen3-Next: gated DeltaNet layers with full attention every
    ``full_attention_interval``-th layer (or per ``layer_types``); MoE MLPs."""
    return _gated_deltanet_hybrid(cfg, opt, "qwen3_next", kv_heads=2, experts=512, top_k=10)


def _qwen3_5(cfg: _Config, opt: _Options) -> _Build:
    """Qwen3.5 / Qwen3.6 dense: Qwen3-Next's layers with a dense MLP (Qwen3_5TextConfig
    has no experts; its KV heads default to 4). Reads the text model of a multimodal
    checkpoint (``text_config``): the vision tower caches nothing per token."""
    text = _text_config(cfg)
    return _gated_deltanet_hybrid(text, opt, "qwen3_5", kv_heads=4, experts=0, top_k=0, top=cfg)


def _qwen3_5_moe(cfg: _Config, opt: _Options) -> _Build:
    """Qwen3.5 / Qwen3.6 MoE: Qwen3-Next's layers, experts in every layer (256, top 8 by
    default, as Qwen3_5MoeTextConfig)."""
    text = _text_config(cfg)
    return _gated_deltanet_hybrid(
        text, opt, "qwen3_5_moe", kv_heads=2, experts=256, top_k=8, top=cfg
    )


def _text_config(cfg: _Config) -> _Config:
    """The text model of a multimodal wrapper config (``model_type`` qwen3_5 /
    qwen3_5_moe), or the config itself for a text-only one (``*_text``)."""
    if str(cfg.value("model_type", "")).endswith("_text"):
        return cfg
    if not cfg.has("text_config"):
        raise cfg.fail("missing key 'text_config' (the text model of a multimodal checkpoint)")
    return _sub_config(cfg, "text_config")


def _gated_deltanet_hybrid(
    cfg: _Config,
    opt: _Options,
    family: str,
    *,
    kv_heads: int,
    experts: int,
    top_k: int,
    top: _Config | None = None,
) -> _Build:
    """Gated DeltaNet layers beside gated full attention (every
    ``full_attention_interval``-th layer, or per ``layer_types``), each followed by a
    dense MLP or experts; ``kv_heads``, ``experts`` and ``top_k`` are the family's
    defaults. ``top`` is the wrapper config of a multimodal checkpoint, which may hold
    ``tie_word_embeddings``."""
    b = _base(cfg, family)
    h = b.hidden_size
    if cfg.has("layer_types"):
        types = _layer_types(cfg, "layer_types")
    else:
        interval = cfg.dim("full_attention_interval", 4)
        types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(b.num_layers)
        ]
    if len(types) != b.num_layers:
        raise cfg.fail(f"{len(types)} layer types for num_hidden_layers {b.num_layers}")
    attn = _attn_dims(cfg, h, kv_heads_default=kv_heads, head_dim_default=256)
    dims = _DeltaNetDims(
        key_heads=cfg.dim("linear_num_key_heads", 16),
        value_heads=cfg.dim("linear_num_value_heads", 32),
        key_dim=cfg.dim("linear_key_head_dim", 128),
        value_dim=cfg.dim("linear_value_head_dim", 128),
        d_conv=cfg.dim("linear_conv_kernel_dim", 4),
    )
    if dims.value_heads % dims.key_heads:
        raise cfg.fail(
            f"linear_num_value_heads {dims.value_heads} is not a multiple of "
            f"linear_num_key_heads {dims.key_heads}"
        )
    for i, kind in enumerate(types):
        if kind == "full_attention":
            _add_attention(b, i, attn, opt)
            b.params.add(h * attn.num_heads * attn.head_dim)  # output gate doubles q_proj
        elif kind == "linear_attention":
            b.recurrent.append(_deltanet(i, dims, opt))
            b.params.add(_deltanet_params(h, dims))
        else:
            raise cfg.fail(f"unknown layer type {kind!r} at layer {i}")
        _qwen3_next_mlp(b, cfg, i, experts, top_k)
    _add_embeddings(b, cfg, top is not None and top.flag("tie_word_embeddings", False))
    return b


def _deltanet_params(hidden: int, dims: _DeltaNetDims) -> int:
    value_width = dims.value_heads * dims.value_dim
    in_proj = hidden * (dims.conv_channels + value_width + 2 * dims.value_heads)
    return in_proj + dims.conv_channels * dims.d_conv + value_width * hidden


def _qwen3_next_mlp(b: _Build, cfg: _Config, index: int, experts: int, top_k: int) -> None:
    h = b.hidden_size
    experts = cfg.count("num_experts", experts)
    step = cfg.dim("decoder_sparse_step", 1)
    dense_layers = cfg.indices("mlp_only_layers", [])
    if experts == 0 or index in dense_layers or (index + 1) % step:
        b.params.add(_mlp_params(h, b.dense_width(cfg.dim("intermediate_size"))))
        return
    expert = _mlp_params(h, cfg.dim("moe_intermediate_size", 512))
    _add_moe(b, h, experts, cfg.dim("num_experts_per_tok", top_k), expert)
    shared = b.dense_width(cfg.dim("shared_expert_intermediate_size", 512))
    b.params.add(_mlp_params(h, shared) + h)


def _minimax_types(cfg: _Config, num_layers: int) -> list[str]:
    if cfg.has("layer_types"):
        return _layer_types(cfg, "layer_types")
    if cfg.has("attn_type_list"):
        codes = cfg.sequence("attn_type_list")
        if any(c not in (0, 1) for c in codes):
            raise cfg.fail("'attn_type_list' must hold 0 (lightning) or 1 (softmax attention)")
        return ["full_attention" if c == 1 else "linear_attention" for c in codes]
    return ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(num_layers)]


def _minimax(cfg: _Config, opt: _Options) -> _Build:
    """MiniMax-Text-01: lightning (linear) attention, whose per-request state is one
    ``head_dim x head_dim`` matrix per head, with softmax attention on some layers; MoE."""
    b = _base(cfg, "minimax")
    h = b.hidden_size
    types = _minimax_types(cfg, b.num_layers)
    if len(types) != b.num_layers:
        raise cfg.fail(f"{len(types)} layer types for num_hidden_layers {b.num_layers}")
    attn = _attn_dims(cfg, h, kv_heads_default=8)
    expert = _mlp_params(h, cfg.dim("intermediate_size"))
    experts, top_k = cfg.dim("num_local_experts", 8), cfg.dim("num_experts_per_tok", 2)
    for i, kind in enumerate(types):
        if kind == "full_attention":
            _add_attention(b, i, attn, opt)
        elif kind == "linear_attention":
            b.recurrent.append(_lightning(i, attn.num_heads, attn.head_dim, opt))
            b.params.add(5 * h * attn.num_heads * attn.head_dim)  # qkv, gate, out
        else:
            raise cfg.fail(f"unknown layer type {kind!r} at layer {i}")
        _add_moe(b, h, experts, top_k, expert)
    _add_embeddings(b, cfg, False)
    return b


def _lfm2_types(cfg: _Config, num_layers: int) -> list[str]:
    if cfg.has("layer_types"):
        return _layer_types(cfg, "layer_types")
    attention = cfg.indices("full_attn_idxs", list(range(num_layers)))
    return ["full_attention" if i in attention else "conv" for i in range(num_layers)]


def _lfm2_mlp_width(cfg: _Config) -> int:
    """The SwiGLU width LFM2 builds: ``intermediate_size`` (legacy ``block_ff_dim``),
    with ``block_auto_adjust_ff_dim`` two thirds of it times the multiplier, rounded up
    to ``block_multiple_of``."""
    key = "block_ff_dim" if cfg.has("block_ff_dim") else "intermediate_size"
    width = cfg.dim(key, 12288)
    if not cfg.flag("block_auto_adjust_ff_dim", True):
        return width
    width = int(2 * width / 3)
    multiplier = cfg.raw.get("block_ffn_dim_multiplier", 1.0)
    if multiplier is None:  # transformers then neither scales nor rounds
        return width
    if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
        raise cfg.fail(f"'block_ffn_dim_multiplier' must be a number, got {multiplier!r}")
    return round_up(int(multiplier * width), cfg.dim("block_multiple_of", 256))


def _lfm2(cfg: _Config, opt: _Options) -> _Build:
    """LFM2: gated short convolutions (``conv_L_cache`` taps over ``hidden`` channels,
    the conv window the only state) and grouped-query attention at ``full_attn_idxs``
    (or per ``layer_types``); a SwiGLU MLP in every layer."""
    b = _base(cfg, "lfm2")
    h = b.hidden_size
    types = _lfm2_types(cfg, b.num_layers)
    if len(types) != b.num_layers:
        raise cfg.fail(f"{len(types)} layer types for num_hidden_layers {b.num_layers}")
    attn = _attn_dims(cfg, h, kv_heads_default=8)
    d_conv = cfg.dim("conv_L_cache", 3)
    for i, kind in enumerate(types):
        if kind == "full_attention":
            _add_attention(b, i, attn, opt)
        elif kind == "conv":
            b.recurrent.append(_short_conv(i, h, d_conv, opt))
            b.params.add(4 * h * h + h * d_conv)  # in_proj (B, C, x), out_proj, taps
        else:
            raise cfg.fail(f"unknown layer type {kind!r} at layer {i}")
        b.params.add(_mlp_params(h, b.dense_width(_lfm2_mlp_width(cfg))))
    # legacy checkpoints name the tie ``tie_embedding``; it wins, as in transformers
    tied = cfg.flag("tie_embedding", cfg.flag("tie_word_embeddings", True))
    b.params.add(_embedding_params(b.vocab_size, h, tied))
    return b


def _mamba2_pure(cfg: _Config, opt: _Options) -> _Build:
    """Pure Mamba2 (transformers ``Mamba2Config``)."""
    b = _base(cfg, "mamba2")
    dims = _Mamba2Dims(
        num_heads=cfg.dim("num_heads", 128),
        head_dim=cfg.dim("head_dim", 64),
        num_groups=cfg.dim("n_groups", 8),
        d_state=cfg.dim("state_size", 128),
        d_conv=cfg.dim("conv_kernel", 4),
    )
    for i in range(b.num_layers):
        b.recurrent.append(_mamba2(i, dims, opt))
        b.params.add(_mamba2_params(b.hidden_size, dims))
    _add_embeddings(b, cfg, False)
    return b


def _mamba_ssm(cfg: _Config, opt: _Options) -> _Build:
    """A ``mamba_ssm`` checkpoint config (``d_model``, ``n_layer``, ``ssm_cfg``), as the
    state-spaces Mamba2 checkpoints ship it; optional attention at ``attn_layer_idx``."""
    ssm = _sub_config(cfg, "ssm_cfg")
    if ssm.value("layer", "Mamba1") != "Mamba2":
        raise cfg.fail("only Mamba2 mamba_ssm checkpoints are supported (ssm_cfg.layer)")
    b = _Build("mamba2", cfg.dim("n_layer"), cfg.dim("d_model"), _padded_vocab(cfg))
    d_inner = ssm.dim("expand", 2) * b.hidden_size
    head_dim = ssm.dim("headdim", 64)
    if d_inner % head_dim:
        raise cfg.fail(f"inner size {d_inner} is not a multiple of ssm_cfg.headdim {head_dim}")
    dims = _Mamba2Dims(
        d_inner // head_dim,
        head_dim,
        ssm.dim("ngroups", 1),
        ssm.dim("d_state", 128),
        ssm.dim("d_conv", 4),
    )
    attn_layers = cfg.indices("attn_layer_idx", [])
    for i in range(b.num_layers):
        if i in attn_layers:
            _mamba_ssm_attention(b, cfg, i, opt)
        else:
            b.recurrent.append(_mamba2(i, dims, opt))
            b.params.add(_mamba2_params(b.hidden_size, dims))
        if cfg.count("d_intermediate", 0):
            b.params.add(_mlp_params(b.hidden_size, b.dense_width(cfg.count("d_intermediate"))))
    b.params.add(_embedding_params(b.vocab_size, b.hidden_size, cfg.flag("tie_embeddings", True)))
    return b


def _padded_vocab(cfg: _Config) -> int:
    vocab, multiple = cfg.dim("vocab_size"), cfg.dim("pad_vocab_size_multiple", 8)
    return round_up(vocab, multiple)


def _sub_config(cfg: _Config, key: str) -> _Config:
    """A nested object of a mamba_ssm config (``ssm_cfg``, ``attn_cfg``)."""
    nested = cfg.value(key, {})
    if not isinstance(nested, dict):
        raise cfg.fail(f"{key!r} must be an object, got {nested!r}")
    return _Config(nested, f"{cfg.label} {key}")


def _mamba_ssm_attention(b: _Build, cfg: _Config, index: int, opt: _Options) -> None:
    attn_cfg = _sub_config(cfg, "attn_cfg")
    heads = attn_cfg.dim("num_heads")
    head_dim = attn_cfg.dim("head_dim", b.hidden_size // heads)
    dims = _AttnDims(heads, attn_cfg.dim("num_heads_kv", heads), head_dim)
    _add_attention(b, index, _checked_attn(attn_cfg, dims, ("num_heads", "num_heads_kv")), opt)


_READERS: dict[str, Callable[[_Config, _Options], _Build]] = {
    "bamba": _bamba,
    "falcon_h1": _falcon_h1,
    "granitemoehybrid": _granite_hybrid,
    "jamba": _jamba,
    "lfm2": _lfm2,
    "mamba2": _mamba2_pure,
    "minimax": _minimax,
    "minimax_text_01": _minimax,
    "nemotron_h": _nemotron_h,
    "qwen3_next": _qwen3_next,
    "qwen3_5": _qwen3_5,
    "qwen3_5_text": _qwen3_5,
    "qwen3_5_moe": _qwen3_5_moe,
    "qwen3_5_moe_text": _qwen3_5_moe,
    "zamba2": _zamba2,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_READERS))


# ---------------------------------------------------------------- entry points


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``config.json`` (or the one inside a checkpoint directory).

    Raises:
        ConfigError: no such file, or not a JSON object.
    """
    file = Path(path)
    if file.is_dir():
        file = file / CONFIG_FILENAME
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no config file at {file}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"malformed config {file}: not UTF-8 text") from None
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"malformed JSON in {file}: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"malformed config {file}: expected a JSON object")
    return loaded


def _model_type(cfg: _Config) -> str:
    if not cfg.has("model_type") and cfg.has("ssm_cfg") and cfg.has("d_model"):
        return "mamba_ssm"
    model_type = cfg.value("model_type")
    if not isinstance(model_type, str) or model_type not in _READERS:
        raise ConfigError(
            f"{cfg.label}: unsupported model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return str(model_type)


def _options(ssm_dtype: str, conv_columns: str | ConvColumns, kv_dtype: str) -> _Options:
    for label, dtype in (("ssm_dtype", ssm_dtype), ("kv_dtype", kv_dtype)):
        try:
            dtype_bytes(dtype)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    try:
        columns = ConvColumns(conv_columns)
    except ValueError:
        known = ", ".join(c.value for c in ConvColumns)
        raise ConfigError(f"unknown conv_columns {conv_columns!r}; known: {known}") from None
    return _Options(ssm_dtype=ssm_dtype, conv_columns=columns, kv_dtype=kv_dtype)


def geometry_from_config(
    config: str | os.PathLike[str] | Mapping[str, Any],
    *,
    name: str | None = None,
    ssm_dtype: str = "bfloat16",
    conv_columns: str | ConvColumns = "vllm",
    kv_dtype: str = "bfloat16",
) -> ModelGeometry:
    """Build a `ModelGeometry` from a Hugging Face config.

    Args:
        config: a config dict, a ``config.json`` path, or a checkpoint directory.
        name: the geometry's name; defaults to the config's ``_name_or_path``, the
            directory name, or the model type.
        ssm_dtype: dtype of SSM / linear-attention state (``bfloat16`` or ``float32``).
        conv_columns: ``vllm`` keeps ``d_conv - 1`` conv columns, ``transformers`` ``d_conv``.
        kv_dtype: dtype of the attention KV cache.

    Raises:
        ConfigError: unreadable or malformed config, unsupported ``model_type``, a
            missing key without a default, or a non-positive dimension.
    """
    opt = _options(ssm_dtype, conv_columns, kv_dtype)
    if isinstance(config, Mapping):
        raw = config
        label = geometry_name = str(name or config.get("_name_or_path") or "config")
    else:
        raw = load_config(config)
        path = Path(config)
        # Errors name the file; the geometry is named after the checkpoint.
        label = str(path / CONFIG_FILENAME if path.is_dir() else path)
        geometry_name = name or _path_label(path)
    cfg = _Config(raw, label)
    model_type = _model_type(cfg)
    build = _mamba_ssm(cfg, opt) if model_type == "mamba_ssm" else _READERS[model_type](cfg, opt)
    return _to_geometry(build, geometry_name, raw, opt)


def _path_label(path: Path) -> str:
    return path.name if path.is_dir() else (path.parent.name or path.name)


def _to_geometry(build: _Build, name: str, raw: Mapping[str, Any], opt: _Options) -> ModelGeometry:
    try:
        return ModelGeometry(
            name=name,
            family=build.family,
            num_layers=build.num_layers,
            attention_layers=tuple(build.attention),
            recurrent_layers=tuple(build.recurrent),
            hidden_size=build.hidden_size,
            vocab_size=build.vocab_size,
            num_params=build.params.total,
            num_active_params=build.params.active,
            ssm_dtype=opt.ssm_dtype,
            conv_columns=opt.conv_columns,
            confirmed=bool(raw.get("_avmp_confirmed", True)),
            parallel_dims=ParallelDims(
                build.num_attention_heads,
                tuple(sorted(build.mlp_widths)),
                build.num_experts,
                mamba2_groups(build.recurrent),
            ),
        )
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
