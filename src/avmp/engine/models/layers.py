"""Layers shared by the hybrid families: norms, rotary embeddings, paged attention,
the Mamba2 mixer, MLPs and mixture-of-experts.

Module and parameter names follow Hugging Face transformers so that a checkpoint written
by ``save_pretrained`` loads with ``load_state_dict`` unchanged. Every layer works on the
flat ``[T, hidden]`` token array of a step and reads/writes its cache through
`LayerCaches` (see ``avmp.engine.batch``). Layers with a kernel choice are `OpsLayer`s:
they run their norms, activations, attention and Mamba1/Mamba2 cores through ``self.ops``.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.experts import GATED_MLP, ExpertLayout, ExpertSlice
from avmp.engine.ops import (
    REFERENCE_OPS,
    Activation,
    DecodeConv,
    Ops,
    OutputAct,
    relu_squared,
)
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import NormSpan, column_linear, embedding, row_linear
from avmp.engine.parallel.shards import Rows, set_shard
from avmp.kernels import reference as ref


class OpsLayer(nn.Module):
    """A layer whose kernels come from ``ops``: the torch reference until
    `HybridModel.use_ops` gives every layer of a model the same other `Ops`."""

    ops: Ops = REFERENCE_OPS


def activation(name: str) -> Activation:
    """The activation function transformers means by ``name``."""
    table: dict[str, Activation] = {
        "silu": F.silu,
        "swish": F.silu,
        "gelu": F.gelu,
        "relu": F.relu,
        "relu2": relu_squared,
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {', '.join(table)}"
        ) from None


def shard_param(param: nn.Parameter, rows: Rows, tp: TensorParallel) -> nn.Parameter:
    """``param`` (this rank's rows, along its first dimension), its shard recorded
    when there are several ranks."""
    if not tp.is_single:
        set_shard(param, 0, rows)
    return param


def depthwise_conv(channels: Rows, d_conv: int, bias: bool, tp: TensorParallel) -> nn.Conv1d:
    """The causal depthwise conv of a recurrent mixer over this rank's ``channels``."""
    width = channels.size
    conv = nn.Conv1d(width, width, d_conv, groups=width, padding=d_conv - 1, bias=bias)
    shard_param(conv.weight, channels, tp)
    if conv.bias is not None:
        shard_param(conv.bias, channels, tp)
    return conv


def head_dim_of(config: Any) -> int:
    """Attention head size: ``head_dim`` when the config sets it, else hidden / heads."""
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


class RMSNorm(OpsLayer):
    """RMS norm computed in float32. ``fp32_weight`` multiplies before the cast back
    (Nemotron-H); the others cast first (Llama style)."""

    def __init__(self, size: int, eps: float, fp32_weight: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps
        self.fp32_weight = fp32_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.variance_epsilon, self.fp32_weight)

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor, scale: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = x + delta * scale`` and the norm of ``s`` (one launch when fused)."""
        return self.ops.add_rms_norm(
            x, delta, scale, self.weight, self.variance_epsilon, self.fp32_weight
        )


class Residual:
    """The residual stream through the blocks, its latest addition deferred.

    A pre-norm block adds its output to the stream and the next block starts by
    normalising the sum; deferring the addition to that norm lets the fused norm do both
    in one launch (`RMSNorm.add_norm`), about one elementwise launch saved per layer and
    residual. Unfused, the stream adds exactly as the blocks did (``x + delta * scale``).
    """

    __slots__ = ("x", "delta", "scale")

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.delta: torch.Tensor | None = None
        self.scale: float | None = None

    def add(self, delta: Any, scale: float | None = None) -> None:
        """Add ``delta * scale`` to the stream (when it is next read). ``delta``: a
        tensor, or what an ops' ``residual`` linear returned (a split K's parts, which
        the stream's next fused norm sums; anything else reading it sums them first)."""
        if self.delta is not None:
            self.value()
        self.delta, self.scale = delta, scale

    def value(self) -> torch.Tensor:
        """The stream with every addition made."""
        if self.delta is not None:
            delta = _tensor(self.delta)
            delta = delta if self.scale is None else delta * self.scale
            self.x, self.delta = self.x + delta, None
        return self.x

    def norm(self, norm: RMSNorm) -> torch.Tensor:
        """``norm`` of the stream, the deferred addition made on the way."""
        if self.delta is None:
            out: torch.Tensor = norm(self.x)
            return out
        self.x, out = norm.add_norm(self.x, self.delta, self.scale)
        self.delta = None
        return out

    def normed(self, norm: RMSNorm) -> NormedStream:
        """``norm`` of the stream for readers that are linear layers (`NormedStream`);
        they read it before the stream's next addition."""
        return NormedStream(self, norm)


def _tensor(value: Any) -> torch.Tensor:
    """``value`` as a tensor: split-K parts (`SplitParts`) summed."""
    if isinstance(value, torch.Tensor):
        return value
    out: torch.Tensor = value.total()
    return out


class NormedStream:
    """``norm`` of a `Residual` stream, computed by whoever reads it first.

    A linear layer reading it (`linear`) computes the norm in its own prologue where
    the ops fuse one (`Ops.fuses_prologue`: a decode row on the Triton path), the
    stream's deferred addition made on the way; each further linear does the same
    from the updated stream. Any other reader, and a linear the ops do not fuse, takes
    the tensor (`value`), computed once. Every reader runs before the stream's next
    addition (the block's readers of one norm do).
    """

    __slots__ = ("stream", "norm", "_value")

    def __init__(self, stream: Residual, norm: RMSNorm) -> None:
        self.stream, self.norm = stream, norm
        self._value: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.stream.x.dtype

    def value(self) -> torch.Tensor:
        """The normalised stream as a tensor."""
        if self._value is None:
            self._value = self.stream.norm(self.norm)
        return self._value

    def linear(
        self, linear: nn.Module, conv: DecodeConv | None = None, act: OutputAct | None = None
    ) -> torch.Tensor:
        """``linear(norm(stream))`` (``conv``, ``act``: a decode conv step or an activation
        the fused ops may apply to the output, `DecodeConv`, `OutputAct`)."""
        s, norm = self.stream, self.norm
        if (
            self._value is not None
            or type(linear) is not nn.Linear
            or not norm.ops.fuses_prologue(s.x, linear.weight, linear.bias)
        ):
            out: torch.Tensor = linear(self.value())
            return out
        s.x, out = norm.ops.norm_linear(
            s.x, s.delta, s.scale, norm.weight, norm.variance_epsilon, norm.fp32_weight,
            linear.weight, linear.bias, conv, act,
        )  # fmt: skip
        s.delta = None
        return out


Normed = torch.Tensor | NormedStream


def linear_of(
    linear: nn.Module, x: Normed, conv: DecodeConv | None = None, act: OutputAct | None = None
) -> torch.Tensor:
    """``linear(x)`` of a tensor or of a `NormedStream` (its norm fused where it can be;
    ``conv``, ``act``: a decode conv step or an activation the fused ops may apply to
    the output)."""
    if isinstance(x, NormedStream):
        return x.linear(linear, conv, act)
    out: torch.Tensor = linear(x)
    return out


class StackedLinears:
    """Linear layers reading the same input, run as one linear where the ops stack
    them (`Ops.stack_linears`) and their weights are consecutive rows of one tensor
    (`stack`): one GEMM, and one norm before it, instead of one per layer (an attention
    layer's q, k and v projections).

    Not a module: the layers stay their owner's submodules under their checkpoint
    names. The stacked view is checked against the layers' parameters on every call, so
    parameters replaced since (moved, reloaded) fall back to one linear per layer.
    """

    __slots__ = ("linears", "_key", "_stacked")

    def __init__(self, *linears: nn.Module) -> None:
        self.linears = linears
        self._key: tuple[int, ...] = ()
        self._stacked: nn.Linear | None = None

    @torch.no_grad()
    def stack(self) -> None:
        """Move the layers' weights (and biases) into one tensor, in order, each
        layer's parameters views of it; values unchanged. Does nothing when they are
        stacked already, are not all ``nn.Linear`` of one input width, dtype and
        device, or only some have a bias."""
        linears = self.linears
        if self.linear() is not None or not _stackable(linears):
            return
        weight = torch.cat([linear.weight for linear in linears])
        bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        start = 0
        for linear in linears:
            rows = linear.out_features
            linear.weight = _view_parameter(linear.weight, weight[start : start + rows])
            if bias is not None:
                linear.bias = _view_parameter(linear.bias, bias[start : start + rows])
            start += rows

    def linear(self) -> nn.Linear | None:
        """One ``nn.Linear`` over the layers' stacked parameters, or None where they
        are not consecutive rows of one tensor."""
        params = [p for linear in self.linears for p in linear.parameters(recurse=False)]
        key = tuple(p.data_ptr() for p in params)
        if key != self._key:
            self._key, self._stacked = key, _stacked_linear(self.linears)
        return self._stacked

    def __call__(self, ops: Ops, x: Normed) -> list[torch.Tensor]:
        """``[linear(x) for linear in linears]`` (views of one output where stacked)."""
        stacked = self.linear() if ops.stack_linears else None
        if stacked is None:
            return [linear_of(linear, x) for linear in self.linears]
        sizes = [linear.out_features for linear in self.linears]
        return list(linear_of(stacked, x).split(sizes, dim=-1))


def _stackable(linears: tuple[nn.Module, ...]) -> bool:
    """Whether ``linears`` can share one weight tensor (`StackedLinears.stack`)."""
    first = linears[0]
    return all(
        type(linear) is nn.Linear
        and linear.in_features == first.in_features
        and linear.weight.dtype == first.weight.dtype
        and linear.weight.device == first.weight.device
        and (linear.bias is None) == (first.bias is None)
        for linear in linears
    )


def _view_parameter(old: nn.Parameter, view: torch.Tensor) -> nn.Parameter:
    """A parameter over ``view`` with ``old``'s gradient flag and attributes (e.g. its
    tensor-parallel shard)."""
    param = nn.Parameter(view, requires_grad=old.requires_grad)
    param.__dict__.update(old.__dict__)
    return param


def _consecutive(tensors: list[torch.Tensor]) -> bool:
    """Whether contiguous ``tensors`` follow each other in one storage."""
    for a, b in pairwise(tensors):
        if not (
            a.is_contiguous()
            and b.is_contiguous()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.data_ptr() + a.numel() * a.element_size() == b.data_ptr()
        ):
            return False
    return True


def _stacked_linear(linears: tuple[nn.Module, ...]) -> nn.Linear | None:
    """One ``nn.Linear`` whose parameters span ``linears``' consecutive ones, or None."""
    if not _stackable(linears):
        return None
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears if linear.bias is not None]
    if not (_consecutive(weights) and _consecutive(biases)):
        return None
    first, rows = linears[0], sum(linear.out_features for linear in linears)
    stacked = nn.Linear(first.in_features, rows, bias=bool(biases), device="meta")
    stacked.weight = nn.Parameter(
        first.weight.detach().as_strided((rows, first.in_features), (first.in_features, 1)),
        requires_grad=False,
    )
    if biases:
        bias = biases[0].detach().as_strided((rows,), (1,))
        stacked.bias = nn.Parameter(bias, requires_grad=False)
    return stacked


def act_mlp(
    layer: OpsLayer, act: Activation, x: Normed, up: nn.Module, down: nn.Module, gated: bool,
    residual: bool = False,
) -> Any:
    """``down(act(a) * b)`` with ``a, b`` the two halves of ``up(x)``'s features
    (``gated``: Granite-4.0-H's input_linear), else ``down(act(up(x)))`` (Nemotron-H's
    relu²). The activation runs as ``up`` stores its output where the ops can
    (`OutputAct`), else in ``down``'s prologue where they fuse it (`glu_linear`,
    `act_linear`), else on its own. ``residual``: the output only joins the residual
    stream (`Ops.linear`)."""
    offer = OutputAct(act, gated)
    h = linear_of(up, x, act=offer)
    if offer.applied:
        if type(down) is nn.Linear:
            return layer.ops.linear(h, down.weight, down.bias, residual)
        out: torch.Tensor = down(h)
        return out
    if gated:
        a, b = h.chunk(2, dim=-1)
        return glu_linear(layer, act, a, b, down)
    return act_linear(layer, act, h, down)


def glu_linear(
    layer: OpsLayer, act: Activation, gate: torch.Tensor, up: torch.Tensor, linear: nn.Module
) -> torch.Tensor:
    """``linear(act(gate) * up)``, in one kernel where ``layer``'s ops fuse it."""
    if type(linear) is nn.Linear and layer.ops.fuses_prologue(gate, linear.weight, linear.bias):
        return layer.ops.glu_linear(act, gate, up, linear.weight, linear.bias)
    out: torch.Tensor = linear(layer.ops.glu(act, gate, up))
    return out


def act_linear(
    layer: OpsLayer, act: Activation, x: torch.Tensor, linear: nn.Module
) -> torch.Tensor:
    """``linear(act(x))``, in one kernel where ``layer``'s ops fuse it."""
    if type(linear) is nn.Linear and layer.ops.fuses_prologue(x, linear.weight, linear.bias):
        return layer.ops.act_linear(act, x, linear.weight, linear.bias)
    out: torch.Tensor = linear(layer.ops.activation(act, x))
    return out


class RMSNormGated(OpsLayer):
    """Grouped RMS norm of ``x * silu(gate)``: the Mamba2 output norm. With a ``span``
    this rank holds part of one group, and the group's sum of squares is all-reduced."""

    def __init__(
        self, size: int, group_size: int, eps: float, span: NormSpan | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps
        self.group_size = group_size
        self.span = span

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        if self.span is None:
            return self.ops.gated_rms_norm(
                x, gate, self.weight, self.variance_epsilon, self.group_size
            )
        h = x.float() if gate is None else x.float() * F.silu(gate.float())
        return self.weight * self.span.rms_norm(h, self.variance_epsilon).to(x.dtype)

    def linear(
        self, x: torch.Tensor, gate: torch.Tensor, linear: nn.Module, dtype: torch.dtype,
        residual: bool = False,
    ) -> Any:
        """``linear(norm(x, gate).to(dtype))``, in one kernel where the ops fuse it
        (``residual``: the output only joins the residual stream, `Ops.linear`)."""
        if (
            self.span is None
            and type(linear) is nn.Linear
            and linear.weight.dtype == dtype
            and self.ops.fuses_prologue(x, linear.weight, linear.bias)
        ):
            return self.ops.gated_norm_linear(
                x, gate, self.weight, self.variance_epsilon, self.group_size,
                linear.weight, linear.bias, residual,
            )  # fmt: skip
        out: torch.Tensor = linear(self(x, gate).to(dtype))
        return out


class Rotary:
    """Rotary position embedding over the first ``rotary_dim`` channels of each head."""

    def __init__(self, head_dim: int, theta: float, partial_factor: float = 1.0) -> None:
        self.rotary_dim = int(head_dim * partial_factor)
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        self.inv_freq = 1.0 / (theta**exponents)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, rotary_dim]`` cos and sin for the given positions."""
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]``'s first ``cos.shape[-1]`` channels."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat((out, rest), dim=-1)


def rope_theta(config: Any) -> float:
    """The rope base of a transformers config (5.x keeps it in ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class PagedAttention(OpsLayer):
    """Grouped-query attention whose K/V live in the KV pool's pages.

    Under tensor parallelism each rank holds ``heads / size`` query heads and the KV
    heads they read: ``kv_heads / size`` of them, or the one they share when there are
    fewer KV heads than ranks (replicated, as vLLM does); ``o_proj`` is row-parallel.
    """

    def __init__(
        self,
        layer_index: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        bias: bool = False,
        out_bias: bool | None = None,
        tp: TensorParallel = SINGLE,
        reduce: bool = True,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.first_head, local_heads = tp.split(num_heads, "attention heads")
        first_kv, local_kv = tp.split_or_replicate(num_kv_heads, "KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = local_heads, local_kv, head_dim
        self.scale = scale
        q_rows = Rows.units(self.first_head, local_heads, head_dim, num_heads)
        kv_rows = Rows.units(first_kv, local_kv, head_dim, num_kv_heads)
        self.q_proj = column_linear(hidden_size, q_rows, bias, tp)
        self.k_proj = column_linear(hidden_size, kv_rows, bias, tp)
        self.v_proj = column_linear(hidden_size, kv_rows, bias, tp)
        out_bias = bias if out_bias is None else out_bias
        self.o_proj = row_linear(q_rows, hidden_size, out_bias, tp, reduce)
        self.qkv = StackedLinears(self.q_proj, self.k_proj, self.v_proj)
        self.residual_out = False  # see `Mamba2Mixer.residual_out`

    def forward(
        self,
        x: Normed,
        batch: StepBatch,
        cache: LayerCaches,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        q, k, v = self.qkv(self.ops, x)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = self.attend(q, k, v, batch, cache).reshape(q.shape[0], -1)
        if self.ops.attention_out and type(self.o_proj) is nn.Linear:
            return self.ops.linear(out, self.o_proj.weight, self.o_proj.bias, self.residual_out)
        return self.o_proj(out)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: StepBatch,
        cache: LayerCaches,
    ) -> torch.Tensor:
        """Write the new K/V into this layer's pages and attend: ``[T, heads, head_dim]``."""
        k_cache, v_cache = cache.kv(self.layer_index)
        return self.ops.attention(q, k, v, k_cache, v_cache, batch, self.scale)


class Mamba2Mixer(OpsLayer):
    """Mamba2 (SSD) mixer: in_proj, causal conv, scan or step, gated norm, out_proj.

    Under tensor parallelism each rank holds ``heads / size`` heads and the groups they
    read (``groups / size`` of them, or the one they share when there are fewer groups
    than ranks, as vLLM's ``MambaMixer2``): ``in_proj`` and the conv are sliced section
    by section (z, x, B, C, dt), ``out_proj`` is row-parallel, and the gated norm
    all-reduces its sums of squares when a norm group spans ranks.
    """

    def __init__(
        self,
        layer_index: int,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        n_groups: int,
        d_state: int,
        d_conv: int,
        chunk_size: int,
        eps: float,
        conv_bias: bool = True,
        proj_bias: bool = False,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
        norm_group_size: int | None = None,
        tp: TensorParallel = SINGLE,
        reduce: bool = True,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        first_head, local_heads = tp.split(num_heads, "Mamba2 heads")
        first_group, local_groups = tp.split_or_replicate(n_groups, "Mamba2 groups")
        self.num_heads, self.head_dim, self.n_groups = local_heads, head_dim, local_groups
        self.d_state, self.chunk_size, self.d_conv = d_state, chunk_size, d_conv
        self.intermediate_size = local_heads * head_dim
        self.conv_dim = self.intermediate_size + 2 * local_groups * d_state
        self.time_step_limit = time_step_limit
        inner = Rows.units(first_head, local_heads, head_dim, num_heads)  # z, x, the norm
        groups = Rows.units(first_group, local_groups, d_state, n_groups)  # B, C
        heads = Rows.units(first_head, local_heads, 1, num_heads)  # dt, A, D
        self.channel_rows = inner
        self.in_proj_rows = Rows.sections([inner, inner, groups, groups, heads])
        self.conv1d = depthwise_conv(Rows.sections([inner, groups, groups]), d_conv,
                                     conv_bias, tp)  # fmt: skip
        self.in_proj = column_linear(hidden_size, self.in_proj_rows, proj_bias, tp)
        self.dt_bias = shard_param(nn.Parameter(torch.ones(local_heads)), heads, tp)
        self.A_log = shard_param(nn.Parameter(torch.zeros(local_heads)), heads, tp)
        self.D = shard_param(nn.Parameter(torch.ones(local_heads)), heads, tp)
        group = norm_group_size or inner.full // n_groups
        span = NormSpan.of(tp, first_head * head_dim, inner.full, group)
        self.norm: nn.Module = RMSNormGated(self.intermediate_size, group, eps, span)
        shard_param(self.norm.weight, inner, tp)
        self.out_proj = row_linear(inner, hidden_size, proj_bias, tp, reduce)
        # Set by blocks whose residual stream takes the output as it is (no scaling or
        # reduction between): the ops may then leave a split K's sum to the stream's
        # next norm (`Ops.linear`'s ``residual``).
        self.residual_out = False

    @property
    def ssm_shape(self) -> tuple[int, int, int]:
        return (self.num_heads, self.head_dim, self.d_state)

    def forward(self, x: Normed, batch: StepBatch, cache: LayerCaches) -> torch.Tensor:
        conv = self.ops.decode_conv(self, batch, cache.state(self.layer_index)[0])
        proj = linear_of(self.in_proj, x, conv)
        gate, xbc, dt = proj.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        y = self.mix(xbc, dt, batch, cache, conv_done=conv is not None and conv.applied)
        return self.norm.linear(y, gate, self.out_proj, x.dtype, self.residual_out)

    def mix(
        self,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        batch: StepBatch,
        cache: LayerCaches,
        conv_done: bool = False,
    ) -> torch.Tensor:
        """The recurrent core: conv then chunked scan per prefill chunk, and one batched
        conv step and state step for all decode tokens (`Ops.mamba2_mix`; ``conv_done``:
        the in_proj applied the decode conv step, `Ops.decode_conv`)."""
        conv_states, ssm_states = cache.state(self.layer_index)
        return self.ops.mamba2_mix(self, xbc, dt, conv_states, ssm_states, batch, conv_done)

    def ssm_inputs(self, xbc: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split the conv output into x, B, C per head and group; discretise dt."""
        n = xbc.shape[0]
        gn = self.n_groups * self.d_state
        xs, B, C = xbc.split([self.intermediate_size, gn, gn], dim=-1)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype))
        dt = torch.clamp(dt, self.time_step_limit[0], self.time_step_limit[1])
        return (
            xs.reshape(n, self.num_heads, self.head_dim),
            dt,
            B.reshape(n, self.n_groups, self.d_state),
            C.reshape(n, self.n_groups, self.d_state),
        )

    def prefill(
        self, xbc: torch.Tensor, dt: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor
    ) -> torch.Tensor:
        """One sequence's chunk, continuing from (and updating) its conv and SSM state."""
        weight = self.conv1d.weight.squeeze(1)
        xbc = ref.causal_conv1d(xbc, conv, weight, self.conv1d.bias, "silu")
        xs, dt, B, C = self.ssm_inputs(xbc, dt)
        A = -torch.exp(self.A_log.float())
        y, final = ref.mamba2_chunk_scan(xs, dt, A, B, C, self.D, ssm, self.chunk_size)
        ssm.copy_(final.to(ssm.dtype))
        return y.reshape(xbc.shape[0], self.intermediate_size).to(xbc.dtype)

    def decode(
        self,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        conv_states: torch.Tensor,
        ssm_states: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One token for each of N sequences: gather their states, step, scatter back."""
        weight = self.conv1d.weight.squeeze(1)
        xbc = ref.causal_conv1d_step(xbc, conv_states, slots, weight, self.conv1d.bias, "silu")
        xs, dt, B, C = self.ssm_inputs(xbc, dt)
        A = -torch.exp(self.A_log.float())
        ssm = ssm_states[slots]  # [N, H, P, S], a copy
        y = ref.mamba2_step(ssm, xs, dt, A, B, C, self.D)
        ssm_states[slots] = ssm
        return y.reshape(xbc.shape[0], self.intermediate_size).to(xbc.dtype)


class GatedMLP(OpsLayer):
    """``down(act(gate(x)) * up(x))`` (Llama style, Bamba, Jamba, Falcon-H1); under
    tensor parallelism gate and up are column-parallel, down row-parallel."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        act: str,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
        reduce: bool = True,
    ) -> None:
        super().__init__()
        rows = Rows.units(*tp.split(intermediate_size, "MLP width"), 1, intermediate_size)
        self.gate_proj = column_linear(hidden_size, rows, bias, tp)
        self.up_proj = column_linear(hidden_size, rows, bias, tp)
        self.down_proj = row_linear(rows, hidden_size, bias, tp, reduce)
        self.act = activation(act)

    def forward(self, x: Normed) -> torch.Tensor:
        return glu_linear(self, self.act, linear_of(self.gate_proj, x),
                          linear_of(self.up_proj, x), self.down_proj)  # fmt: skip

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` (one launch when fused)."""
        return self.ops.glu(self.act, gate, up)


def local_experts(
    build: Any, num_experts: int, tp: TensorParallel, layout: ExpertLayout = GATED_MLP
) -> ExpertSlice:
    """This rank's experts (``build()`` makes one; ``layout`` names the linears stacked
    for the grouped path, see `avmp.engine.experts`); the global index of the first is
    their ``first_expert``.

    Experts are split whole across ranks (expert parallelism inside the tensor-parallel
    group), not each one's width: see docs/design-tp.md. One rank holds them all.
    """
    first, count = tp.split(num_experts, "experts")
    return ExpertSlice(build, first, count, num_experts, layout)


class Mamba1Mixer(OpsLayer):
    """Mamba1 selective-scan mixer with Jamba's RMS norms on dt, B and C.

    Under tensor parallelism each rank holds ``intermediate / size`` channels: in_proj,
    the conv, dt_proj, A and D are sliced by channel; ``x_proj`` reads channels, so its
    (small) output is all-reduced before the norms (vLLM's extra all-reduce for Jamba);
    ``out_proj`` is row-parallel.
    """

    def __init__(
        self,
        layer_index: int,
        hidden_size: int,
        intermediate_size: int,
        d_state: int,
        d_conv: int,
        dt_rank: int,
        eps: float,
        conv_bias: bool = True,
        proj_bias: bool = False,
        tp: TensorParallel = SINGLE,
        reduce: bool = True,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        channels = Rows.units(*tp.split(intermediate_size, "Mamba1 channels"), 1,
                              intermediate_size)  # fmt: skip
        i = channels.size
        self.intermediate_size, self.d_state, self.d_conv = i, d_state, d_conv
        self.conv_dim, self.dt_rank = i, dt_rank
        self.conv1d = depthwise_conv(channels, d_conv, conv_bias, tp)
        self.in_proj = column_linear(hidden_size, Rows.sections([channels, channels]),
                                     proj_bias, tp)  # fmt: skip
        self.x_proj = row_linear(channels, dt_rank + 2 * d_state, False, tp)
        self.dt_proj = column_linear(dt_rank, channels, True, tp)
        self.A_log = shard_param(nn.Parameter(torch.zeros(i, d_state)), channels, tp)
        self.D = shard_param(nn.Parameter(torch.ones(i)), channels, tp)
        self.out_proj = row_linear(channels, hidden_size, proj_bias, tp, reduce)
        self.dt_layernorm = RMSNorm(dt_rank, eps)
        self.b_layernorm = RMSNorm(d_state, eps)
        self.c_layernorm = RMSNorm(d_state, eps)

    @property
    def ssm_shape(self) -> tuple[int, int]:
        return (self.intermediate_size, self.d_state)

    def forward(self, x: Normed, batch: StepBatch, cache: LayerCaches) -> torch.Tensor:
        xs, gate = linear_of(self.in_proj, x).chunk(2, dim=-1)
        conv_states, ssm_states = cache.state(self.layer_index)
        out = self.ops.mamba1_mix(self, xs, gate, conv_states, ssm_states, batch)
        return self.out_proj(out.to(x.dtype))

    def normed_projections(self, xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """dt (before the dt projection), B and C of the conv output ``xs [T, I]``,
        each through its RMS norm."""
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)

    def ssm_inputs(self, xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """dt (after softplus), A, B and C of the conv output ``xs [T, I]``."""
        dt, B, C = self.normed_projections(xs)
        dt = (self.dt_proj.weight @ dt.t()).t()  # [T, I], bias added after (as transformers)
        dt = F.softplus(dt + self.dt_proj.bias.float())
        return dt, -torch.exp(self.A_log.float()), B, C

    def prefill(
        self, xs: torch.Tensor, gate: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor
    ) -> torch.Tensor:
        """One sequence's chunk, continuing from (and updating) its conv and SSM state."""
        weight = self.conv1d.weight.squeeze(1)
        xs = ref.causal_conv1d(xs, conv, weight, self.conv1d.bias, "silu")  # [T, I]
        y = ref.mamba1_scan(xs, *self.ssm_inputs(xs), self.D, ssm)
        return (y * F.silu(gate.float())).to(xs.dtype)

    def decode(
        self,
        xs: torch.Tensor,
        gate: torch.Tensor,
        conv_states: torch.Tensor,
        ssm_states: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One token for each of N sequences: gather their states, step, scatter back."""
        weight = self.conv1d.weight.squeeze(1)
        xs = ref.causal_conv1d_step(xs, conv_states, slots, weight, self.conv1d.bias, "silu")
        ssm = ssm_states[slots]  # [N, I, S], a copy
        y = ref.mamba1_step(ssm, xs, *self.ssm_inputs(xs), self.D)
        ssm_states[slots] = ssm
        return (y * F.silu(gate.float())).to(xs.dtype)


Rope = tuple[torch.Tensor, torch.Tensor] | None


def mix_or_attend(
    mamba: nn.Module | None,
    self_attn: nn.Module | None,
    h: Normed,
    batch: StepBatch,
    cache: LayerCaches,
    rope: Rope,
) -> torch.Tensor:
    """The token mixer of a block that holds either a recurrent mixer or attention
    (the other is None): recurrent mixers take no rotary, attention does."""
    if mamba is not None:
        out: torch.Tensor = mamba(h, batch, cache)
        return out
    assert self_attn is not None
    out = self_attn(h, batch, cache, rope)
    return out


class MixerOrAttentionBlock(nn.Module):
    """Pre-norm block ``x + mix(norm(x))`` then ``x + feed_forward(norm(x))``.

    Subclasses build ``input_layernorm``, ``pre_ff_layernorm``, ``feed_forward`` and one
    of ``mamba`` / ``self_attn`` under the checkpoint's names; the forward is shared.
    """

    input_layernorm: RMSNorm
    pre_ff_layernorm: RMSNorm
    feed_forward: nn.Module
    mamba: nn.Module | None
    self_attn: PagedAttention | None

    def forward(self, x: Residual, batch: StepBatch, cache: LayerCaches, rope: Rope) -> None:
        h = x.normed(self.input_layernorm)
        x.add(mix_or_attend(self.mamba, self.self_attn, h, batch, cache, rope))
        h = x.normed(self.pre_ff_layernorm)
        x.add(self.feed_forward(h if isinstance(self.feed_forward, GatedMLP) else h.value()))


class HybridBody(nn.Module):
    """Embeddings, the blocks and the final norm of a family.

    The embedding and final norm are registered under the names the family's
    checkpoints use (they differ: ``embed_tokens``/``embeddings``, ``final_layernorm``/
    ``norm``/``norm_f``), so ``load_state_dict`` sees the transformers keys unchanged.
    Every block is built as ``block(config, layer_index, tp)`` and called as
    ``block(x, batch, cache, rope)`` with ``x`` the `Residual` stream, which it reads
    through its norms and adds its outputs to.
    """

    def __init__(
        self,
        config: Any,
        block: Any,
        eps: float,
        *,
        embed_name: str = "embed_tokens",
        norm_name: str = "final_layernorm",
        fp32_norm: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.embed_name, self.norm_name = embed_name, norm_name
        setattr(self, embed_name, embedding(config.vocab_size, config.hidden_size, tp))
        self.layers = nn.ModuleList(block(config, i, tp) for i in range(config.num_hidden_layers))
        setattr(self, norm_name, RMSNorm(config.hidden_size, eps, fp32_weight=fp32_norm))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[T, hidden]``."""
        out: torch.Tensor = getattr(self, self.embed_name)(input_ids)
        return out

    def run(
        self, x: torch.Tensor, batch: StepBatch, cache: LayerCaches, rope: Rope
    ) -> torch.Tensor:
        """Every block in order, then the final norm."""
        stream = Residual(x)
        for layer in self.layers:
            layer(stream, batch, cache, rope)
        return stream.norm(getattr(self, self.norm_name))
