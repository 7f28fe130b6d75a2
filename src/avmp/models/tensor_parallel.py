"""How tensor parallelism splits a hybrid model over N ranks, and what one rank holds.

The rules follow vLLM's tensor-parallel layers, so a split that vLLM refuses is refused
here with the figure that does not divide:

- attention (``QKVParallelLinear`` in ``vllm/model_executor/layers/linear.py``): query
  heads must divide by N; KV heads are sharded when N divides them, and when there are
  fewer KV heads than ranks each rank holds one KV head, replicated on
  ``N / kv_heads`` ranks (rank r holds head ``r // replicas``);
- Mamba2 (``MambaMixer2`` in ``vllm/model_executor/layers/mamba/mamba_mixer2.py``):
  heads must divide by N; groups are sharded where N divides them and replicated (one
  group per rank, the group of the rank's heads) where there are fewer groups than
  ranks, so a gated-norm group then spans several ranks and its sum of squares must be
  all-reduced (vLLM supports only one group there; any group count dividing N works
  here the same way);
- Mamba1 (``MambaMixer`` in ``vllm/model_executor/layers/mamba/mamba_mixer.py``): the
  inner size is split column-wise; ``x_proj`` is row-parallel, one extra all-reduce;
- gated DeltaNet (``Qwen3NextGatedDeltaNet`` in ``vllm/model_executor/models/
  qwen3_next.py``): key heads and value heads each divide by N;
- lightning attention (``vllm/model_executor/models/minimax_text_01.py``): heads divide
  by N; LFM2's short convolution (``vllm/model_executor/layers/mamba/short_conv.py``):
  its conv channels divide by N;
- MoE: whole experts are split over the ranks (expert parallel), an equal number each;
- vocabulary (``VocabParallelEmbedding``): padded to a multiple of 64 per rank.

Every unit of the caches then holds the rank's shard: a rank's KV page and state slot
are those of the geometry `rank_geometry` returns, and the pools of every rank are
identical in layout. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from fractions import Fraction

from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    ParallelDims,
    RecurrentLayer,
)

MAX_TENSOR_PARALLEL = 8  # the GPUs of one host that NVLink joins
VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE


def check_num_ranks(num_ranks: int) -> None:
    """Raises ValueError unless ``num_ranks`` is a whole number in 1..`MAX_TENSOR_PARALLEL`."""
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int):
        raise ValueError(f"tensor parallel size must be a whole number, got {num_ranks!r}")
    if not 1 <= num_ranks <= MAX_TENSOR_PARALLEL:
        raise ValueError(
            f"tensor parallel size must be in 1..{MAX_TENSOR_PARALLEL} (one host), got {num_ranks}"
        )


@dataclass(frozen=True)
class HeadSplit:
    """How ``num_ranks`` ranks hold ``total`` heads (or groups): ``per_rank`` each, every
    head on ``num_replicas`` ranks (1 when sharded; more when there are fewer heads than
    ranks and each rank holds a copy of one)."""

    total: int
    num_ranks: int
    per_rank: int
    num_replicas: int

    def first(self, rank: int) -> int:
        """Index of the first head ``rank`` holds (its heads are consecutive)."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank must be in 0..{self.num_ranks - 1}, got {rank}")
        return (rank // self.num_replicas) * self.per_rank


def shard(total: int, num_ranks: int, what: str) -> int:
    """Share of each rank when ``total`` splits evenly over ``num_ranks`` ranks.

    Raises:
        ValueError: ``num_ranks`` does not divide ``total`` (names ``what`` and both figures).
    """
    check_num_ranks(num_ranks)
    if total <= 0 or total % num_ranks:
        raise ValueError(f"{what} ({total}) do not split evenly over {num_ranks} ranks")
    return total // num_ranks


def split_heads(total: int, num_ranks: int, what: str) -> HeadSplit:
    """Heads sharded where ``num_ranks`` divides them, replicated (one per rank) where
    they are fewer than the ranks and divide them (vLLM's rule for KV heads).

    Raises:
        ValueError: neither divides the other.
    """
    check_num_ranks(num_ranks)
    if total > 0 and total % num_ranks == 0:
        return HeadSplit(total, num_ranks, total // num_ranks, 1)
    if 0 < total < num_ranks and num_ranks % total == 0:
        return HeadSplit(total, num_ranks, 1, num_ranks // total)
    raise ValueError(
        f"{what} ({total}) neither split evenly over {num_ranks} ranks nor divide them "
        "(to be replicated)"
    )


@dataclass(frozen=True)
class Mamba2Split:
    """One Mamba2 layer over the ranks: heads sharded; groups sharded or replicated
    (a replicated group's gated norm then spans its ``groups.num_replicas`` ranks)."""

    heads: HeadSplit
    groups: HeadSplit
    head_dim: int
    d_state: int

    @property
    def conv_channels_per_rank(self) -> int:
        return self.heads.per_rank * self.head_dim + 2 * self.groups.per_rank * self.d_state


def split_mamba2(
    num_heads: int, num_groups: int, head_dim: int, d_state: int, num_ranks: int
) -> Mamba2Split:
    """vLLM's ``MambaMixer2`` split: heads must divide by ``num_ranks``; groups divide by
    it or divide it."""
    heads = shard(num_heads, num_ranks, "Mamba2 heads")
    if num_heads % num_groups:
        raise ValueError(f"Mamba2 heads ({num_heads}) are not a multiple of groups ({num_groups})")
    return Mamba2Split(
        HeadSplit(num_heads, num_ranks, heads, 1),
        split_heads(num_groups, num_ranks, "Mamba2 groups"),
        head_dim,
        d_state,
    )


@dataclass(frozen=True)
class DeltaNetSplit:
    """One gated DeltaNet layer over the ranks: key and value heads both sharded."""

    key_heads: int
    value_heads: int


def split_deltanet(num_key_heads: int, num_value_heads: int, num_ranks: int) -> DeltaNetSplit:
    return DeltaNetSplit(
        shard(num_key_heads, num_ranks, "gated DeltaNet key heads"),
        shard(num_value_heads, num_ranks, "gated DeltaNet value heads"),
    )


def experts_per_rank(num_experts: int, num_ranks: int) -> int:
    """Whole routed experts each rank holds (rank r holds ``r * k .. (r + 1) * k - 1``)."""
    return shard(num_experts, num_ranks, "routed experts")


def vocab_per_rank(vocab_size: int, num_ranks: int) -> int:
    """Rows of the embedding and LM head each rank holds: the vocabulary padded to a
    multiple of `VOCAB_PADDING` x ``num_ranks``, as vLLM's ``VocabParallelEmbedding``."""
    check_num_ranks(num_ranks)
    multiple = VOCAB_PADDING * num_ranks
    return -(-vocab_size // multiple) * multiple // num_ranks


# ---------------------------------------------------------------- one rank's geometry


def rank_geometry(geometry: ModelGeometry, num_ranks: int) -> ModelGeometry:
    """What one of ``num_ranks`` ranks holds: every cache tensor cut to the rank's shard
    (so `ModelGeometry.kv_bytes_per_token` and `state_bytes_per_request` are one rank's
    page and slot sizes, the same on every rank) and the parameters one rank stores.

    The parameter counts stay estimates, as the geometry's own: ``num_params / N`` plus
    what replication adds (KV projections of replicated KV heads, the B and C
    projections of replicated Mamba2 groups); norms, routers and vocabulary padding are
    left out. ``hidden_size`` and ``vocab_size`` stay the model's; ``num_ranks`` says
    that it is one rank's share (so a time model adds the all-reduces between ranks).

    Raises:
        ValueError: a figure of the model does not split over ``num_ranks`` ranks (the
            message names the model and the figure), or ``geometry`` is a rank's already.
    """
    check_num_ranks(num_ranks)
    if geometry.num_ranks != 1:
        raise ValueError(f"{geometry.name} is already one of {geometry.num_ranks} ranks' shares")
    if num_ranks == 1:
        return geometry
    dims = geometry.parallel_dims or ParallelDims(
        num_mamba2_groups=mamba2_groups(geometry.recurrent_layers)
    )
    try:
        _check_parallel_dims(dims, num_ranks)
        attention = tuple(_rank_attention(layer, num_ranks) for layer in geometry.attention_layers)
        recurrent = tuple(_rank_recurrent(layer, num_ranks) for layer in geometry.recurrent_layers)
    except ValueError as error:
        raise ValueError(f"{geometry.name} on {num_ranks} GPUs: {error}") from None
    extra = _replication_params(geometry, num_ranks)
    return replace(
        geometry,
        attention_layers=attention,
        recurrent_layers=recurrent,
        num_params=_ceil(Fraction(geometry.num_params, num_ranks) + extra),
        num_active_params=_ceil(Fraction(geometry.num_active_params, num_ranks) + extra),
        parallel_dims=dims,
        num_ranks=num_ranks,
    )


def _ceil(value: Fraction) -> int:
    return -(-value.numerator // value.denominator)


def _check_parallel_dims(dims: ParallelDims | None, num_ranks: int) -> None:
    if dims is None:
        return
    if dims.num_attention_heads:
        shard(dims.num_attention_heads, num_ranks, "attention heads")
    for width in dims.mlp_widths:
        shard(width, num_ranks, "MLP intermediate channels")
    if dims.num_experts:
        experts_per_rank(dims.num_experts, num_ranks)


def _rank_attention(layer: AttentionLayer, num_ranks: int) -> AttentionLayer:
    kv = split_heads(layer.num_kv_heads, num_ranks, "KV heads")
    return replace(layer, num_kv_heads=kv.per_rank)


def _rank_recurrent(layer: RecurrentLayer, num_ranks: int) -> RecurrentLayer:
    if layer.kind is LayerKind.MAMBA2:
        return _rank_mamba2(layer, num_ranks)
    if layer.kind is LayerKind.GATED_DELTANET:
        return _rank_deltanet(layer, num_ranks)
    if layer.kind is LayerKind.MAMBA1:
        channels = shard(_conv(layer).shape[0], num_ranks, "Mamba1 inner channels")
        return _with_rows(layer, channels, channels)
    if layer.kind is LayerKind.LIGHTNING:
        heads = shard(_ssm(layer).shape[0], num_ranks, "lightning attention heads")
        return _with_rows(layer, None, heads)
    if layer.kind is LayerKind.SHORT_CONV:
        channels = shard(_conv(layer).shape[0], num_ranks, "short convolution channels")
        return _with_rows(layer, channels, None)
    raise ValueError(f"no tensor-parallel rule for {layer.kind} layers")


def mamba2_groups(layers: Iterable[RecurrentLayer]) -> int:
    """Groups of the Mamba2 layers among ``layers`` (the most of any; 0 without Mamba2)."""
    return max(map(layer_mamba2_groups, layers), default=0)


def layer_mamba2_groups(layer: RecurrentLayer) -> int:
    """A Mamba2 layer's groups (0 for any other layer)."""
    return _mamba2_dims(layer)[2] if layer.kind is LayerKind.MAMBA2 else 0


def _mamba2_dims(layer: RecurrentLayer) -> tuple[int, int, int, int]:
    """Heads, head dim, d_state and groups of a Mamba2 layer, its groups read back from
    the conv channels (``heads x head_dim + 2 x groups x d_state``)."""
    num_heads, head_dim, d_state = _shape(_ssm(layer), 3, layer)
    num_groups = (_conv(layer).shape[0] - num_heads * head_dim) // (2 * d_state)
    return num_heads, head_dim, num_groups, d_state


def _mamba2_split(layer: RecurrentLayer, num_ranks: int) -> Mamba2Split:
    num_heads, head_dim, num_groups, d_state = _mamba2_dims(layer)
    return split_mamba2(num_heads, num_groups, head_dim, d_state, num_ranks)


def _rank_mamba2(layer: RecurrentLayer, num_ranks: int) -> RecurrentLayer:
    split = _mamba2_split(layer, num_ranks)
    ssm = _ssm(layer)
    return _with_shapes(
        layer,
        (split.conv_channels_per_rank, *_conv(layer).shape[1:]),
        (split.heads.per_rank, *ssm.shape[1:]),
    )


def _rank_deltanet(layer: RecurrentLayer, num_ranks: int) -> RecurrentLayer:
    value_heads, key_dim, value_dim = _shape(_ssm(layer), 3, layer)
    key_heads = (_conv(layer).shape[0] - value_heads * value_dim) // (2 * key_dim)
    split = split_deltanet(key_heads, value_heads, num_ranks)
    channels = 2 * split.key_heads * key_dim + split.value_heads * value_dim
    return _with_shapes(
        layer, (channels, *_conv(layer).shape[1:]), (split.value_heads, key_dim, value_dim)
    )


def _with_rows(
    layer: RecurrentLayer, conv_rows: int | None, ssm_rows: int | None
) -> RecurrentLayer:
    """The layer with its tensors' first dimension (channels or heads) cut to a rank's."""
    conv = None if conv_rows is None else (conv_rows, *_conv(layer).shape[1:])
    ssm = None if ssm_rows is None else (ssm_rows, *_ssm(layer).shape[1:])
    return _with_shapes(layer, conv, ssm)


def _with_shapes(
    layer: RecurrentLayer, conv: tuple[int, ...] | None, ssm: tuple[int, ...] | None
) -> RecurrentLayer:
    """The layer with new shapes for the tensors given (None keeps one absent)."""
    return replace(
        layer,
        conv=layer.conv if conv is None else replace(_conv(layer), shape=conv),
        ssm=layer.ssm if ssm is None else replace(_ssm(layer), shape=ssm),
    )


def _shape(tensor: CacheTensor, num_dims: int, layer: RecurrentLayer) -> tuple[int, ...]:
    """A state tensor's shape, which the split reads its heads from."""
    if len(tensor.shape) != num_dims:
        raise ValueError(
            f"{layer.kind} layer {layer.layer_index}: {tensor.name} state of shape "
            f"{tensor.shape} does not name its heads (expected {num_dims} dimensions)"
        )
    return tensor.shape


def _conv(layer: RecurrentLayer) -> CacheTensor:
    if layer.conv is None:
        raise ValueError(f"{layer.kind} layer {layer.layer_index} has no conv state")
    return layer.conv


def _ssm(layer: RecurrentLayer) -> CacheTensor:
    if layer.ssm is None:
        raise ValueError(f"{layer.kind} layer {layer.layer_index} has no SSM state")
    return layer.ssm


def _replication_params(geometry: ModelGeometry, num_ranks: int) -> Fraction:
    """Parameters a rank holds beyond its 1/N share: a replicated KV head's K and V
    projections, a replicated Mamba2 group's B and C projections (0 when sharded)."""
    hidden, extra = geometry.hidden_size, Fraction(0)
    for attn in geometry.attention_layers:
        kv = split_heads(attn.num_kv_heads, num_ranks, "KV heads")
        full = 2 * hidden * attn.head_dim * attn.num_kv_heads
        extra += 2 * hidden * attn.head_dim * kv.per_rank - Fraction(full, num_ranks)
    for layer in geometry.recurrent_layers:
        if layer.kind is LayerKind.MAMBA2:
            split = _mamba2_split(layer, num_ranks)
            full = 2 * hidden * split.d_state * split.groups.total
            extra += 2 * hidden * split.d_state * split.groups.per_rank - Fraction(full, num_ranks)
    return extra
