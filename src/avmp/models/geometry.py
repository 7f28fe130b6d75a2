"""Cache geometry of a hybrid model: which layers cache what, in how many bytes.

Everything downstream (allocators, planner, simulator, engine) sizes its units from a
`ModelGeometry`; nothing here imports torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import StrEnum

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (``bfloat16``, ``float16``, ``float32``)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


class LayerKind(StrEnum):
    """What a cache-holding layer is."""

    ATTENTION = "attention"
    MAMBA1 = "mamba1"
    MAMBA2 = "mamba2"
    GATED_DELTANET = "gated_deltanet"
    LIGHTNING = "lightning"
    SHORT_CONV = "short_conv"


class ConvColumns(StrEnum):
    """How many columns a conv state keeps: ``d_conv - 1`` (vLLM, mamba_ssm) or
    ``d_conv`` (Hugging Face transformers)."""

    VLLM = "vllm"
    TRANSFORMERS = "transformers"

    def columns(self, d_conv: int) -> int:
        return d_conv - 1 if self is ConvColumns.VLLM else d_conv


@dataclass(frozen=True)
class CacheTensor:
    """One tensor a layer caches for one request (state) or one token (K, V).

    The shape has no batch dimension: ``(kv_heads, head_dim)`` per token for K and V,
    e.g. ``(channels, columns)`` for a conv state, ``(heads, head_dim, d_state)`` for a
    Mamba2 SSM state.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        dtype_bytes(self.dtype)
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"{self.name}: every dimension must be positive, got {self.shape}")

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def num_bytes(self) -> int:
        return self.num_elements * dtype_bytes(self.dtype)


@dataclass(frozen=True)
class AttentionLayer:
    """An attention layer's KV cache: K and V, ``[kv_heads, head_dim]`` per token."""

    layer_index: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    @property
    def kind(self) -> LayerKind:
        return LayerKind.ATTENTION

    @property
    def tensors(self) -> tuple[CacheTensor, CacheTensor]:
        shape = (self.num_kv_heads, self.head_dim)
        return CacheTensor("k", shape, self.dtype), CacheTensor("v", shape, self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes(self.dtype)


@dataclass(frozen=True)
class RecurrentLayer:
    """A recurrent layer's per-request state: a conv state (absent for lightning
    attention) and an SSM / linear-attention state (absent for a short convolution,
    LFM2's, whose whole state is its conv window), each with its own dtype."""

    layer_index: int
    kind: LayerKind
    ssm: CacheTensor | None
    conv: CacheTensor | None = None

    def __post_init__(self) -> None:
        if self.ssm is None and self.conv is None:
            raise ValueError(f"recurrent layer {self.layer_index} caches nothing")

    @property
    def tensors(self) -> tuple[CacheTensor, ...]:
        return tuple(t for t in (self.conv, self.ssm) if t is not None)

    @property
    def conv_bytes(self) -> int:
        return 0 if self.conv is None else self.conv.num_bytes

    @property
    def ssm_bytes(self) -> int:
        return 0 if self.ssm is None else self.ssm.num_bytes

    @property
    def state_bytes(self) -> int:
        return self.conv_bytes + self.ssm_bytes


@dataclass(frozen=True)
class ParallelDims:
    """The sizes beyond the caches that tensor parallelism splits across ranks, so that
    a split can be checked (and weights per rank counted) from the geometry alone.

    Attributes:
        num_attention_heads: query heads of each attention layer (0 without attention).
        mlp_widths: intermediate widths of the dense MLPs and shared experts, each split
            column-wise across ranks.
        num_experts: routed experts of each MoE layer (0 without experts); whole experts
            are split across ranks.
        num_mamba2_groups: groups of the Mamba2 layers (0 without Mamba2): fewer groups
            than ranks are replicated, and each gated-norm group then spans ranks.
    """

    num_attention_heads: int = 0
    mlp_widths: tuple[int, ...] = ()
    num_experts: int = 0
    num_mamba2_groups: int = 0

    def __post_init__(self) -> None:
        counts = (self.num_attention_heads, self.num_experts, self.num_mamba2_groups)
        if min(*counts, *self.mlp_widths) < 0:
            raise ValueError(f"parallel dims must be >= 0, got {self}")


@dataclass(frozen=True)
class ModelGeometry:
    """The cache geometry of one model, plus the few dimensions a time model needs.

    ``num_layers`` counts decoder blocks; one block may hold both an attention and a
    recurrent cache (Falcon-H1) and Zamba2's shared attention blocks count once per
    invocation in ``attention_layers``. ``parallel_dims`` holds what tensor parallelism
    splits beside the caches (None where the geometry was not read from a config);
    ``num_ranks`` above 1 marks one rank's share of a model split over that many GPUs
    (`avmp.models.tensor_parallel.rank_geometry`): its units are the rank's shards.
    """

    name: str
    family: str
    num_layers: int
    attention_layers: tuple[AttentionLayer, ...]
    recurrent_layers: tuple[RecurrentLayer, ...]
    hidden_size: int
    vocab_size: int
    num_params: int
    num_active_params: int
    weight_dtype: str = "bfloat16"
    ssm_dtype: str = "bfloat16"
    conv_columns: ConvColumns = ConvColumns.VLLM
    confirmed: bool = True
    parallel_dims: ParallelDims | None = None
    num_ranks: int = 1

    def __post_init__(self) -> None:
        if not self.attention_layers and not self.recurrent_layers:
            raise ValueError(f"{self.name}: a model needs at least one cache-holding layer")
        dtype_bytes(self.weight_dtype)
        if self.num_ranks < 1:
            raise ValueError(f"{self.name}: num_ranks must be >= 1, got {self.num_ranks}")

    @property
    def num_attention_layers(self) -> int:
        return len(self.attention_layers)

    @property
    def num_recurrent_layers(self) -> int:
        return len(self.recurrent_layers)

    @functools.cached_property
    def kv_bytes_per_token(self) -> int:
        # cached: the simulator's scheduler asks for it per request and step (a frozen
        # geometry never changes; `dataclasses.replace` makes a new one)
        return sum(layer.kv_bytes_per_token for layer in self.attention_layers)

    @property
    def conv_bytes_per_request(self) -> int:
        return sum(layer.conv_bytes for layer in self.recurrent_layers)

    @property
    def ssm_bytes_per_request(self) -> int:
        return sum(layer.ssm_bytes for layer in self.recurrent_layers)

    @property
    def state_bytes_per_request(self) -> int:
        return self.conv_bytes_per_request + self.ssm_bytes_per_request

    @property
    def weight_bytes(self) -> int:
        return self.num_params * dtype_bytes(self.weight_dtype)

    @property
    def break_even_tokens(self) -> int | None:
        """Tokens at which one request's KV equals its state (None without attention)."""
        if self.kv_bytes_per_token == 0:
            return None
        return round(self.state_bytes_per_request / self.kv_bytes_per_token)

    def request_bytes(self, num_tokens: int) -> int:
        """Exact cache bytes of one request holding ``num_tokens`` tokens."""
        return self.state_bytes_per_request + num_tokens * self.kv_bytes_per_token
