"""What every hybrid model of the engine provides: a forward pass over a flat step,
logits, and the cache geometry its layers need (so the allocator and the views agree
with the model on every shape)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.models.layers import Mamba1Mixer, Mamba2Mixer, OpsLayer, PagedAttention
from avmp.engine.ops import REFERENCE_OPS, Ops
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.shards import load_full_state
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    ConvColumns,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)

TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class HybridModel(nn.Module):
    """Base of the engine's causal LMs.

    Subclasses build their modules with transformers' names (usually a
    `~avmp.engine.models.layers.HybridBody` and an ``lm_head``), then implement
    `forward`, and `logits` when their logits are scaled. ``tied_weights`` maps a
    parameter that a checkpoint may omit to the one it shares storage with.

    Built with a `TensorParallel` of several ranks, a model holds this rank's shard of
    every layer (its sizes, and so its cache geometry, are the rank's) and its forward
    pass all-reduces where a layer's partial sums meet; every rank runs the same step.
    """

    family: str = ""
    tied_weights: dict[str, str] = {}
    # buffers a checkpoint may hold but the model computes from its config (dropped on load)
    computed_buffers: tuple[str, ...] = ()
    lm_head: nn.Linear

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp

    @torch.no_grad()
    def sharded(self, tp: TensorParallel) -> HybridModel:
        """This full model's shard for ``tp``'s rank, on its device and in its dtype
        (every rank builds the same full model, e.g. from one seed, then slices it).

        Raises:
            ValueError: this model is a shard already, or does not split over
                ``tp.size`` ranks (the message names the figure).
        """
        if not self.tp.is_single:
            raise ValueError(f"{self.family}: already one of {self.tp.size} ranks' shards")
        weight = next(self.parameters())
        shard = type(self)(self.config, tp).to(device=weight.device, dtype=weight.dtype)
        load_full_state(shard, self.state_dict())
        shard.tie_weights_if_needed()
        shard.use_ops(self.ops)
        return shard.train(self.training)

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of the step's tokens (after the final norm)."""
        raise TypeError(f"{type(self).__name__} must define forward")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, vocab]`` float32 logits of selected hidden states; families that scale
        their logits override this."""
        return self.lm_head(hidden).float()

    def can_capture_decode(self) -> bool:
        """Whether a decode step runs on device indices alone (no per-sequence Python
        loop, no data-dependent expert routing), so a CUDA graph can capture it.
        Families with such layers override this."""
        return True

    def can_capture_mixed(self) -> bool:
        """Whether a prefill or mixed step runs on device indices alone with the Triton
        kernels (no per-sequence Python loop, no data-dependent shape, no host value
        that differs between steps padded to one bucket), so a CUDA graph can capture
        it. No by default: a family says yes once every layer's prefill path is
        checked (`avmp.engine.fast_runner`)."""
        return False

    def use_ops(self, ops: Ops) -> None:
        """Run every layer's kernels through ``ops`` from now on (the engine calls this
        once, at construction; a new model runs the reference), and lay each attention
        layer's q, k and v weights out as one tensor (`StackedLinears.stack`; values
        unchanged) for ops that run them as one linear."""
        for module in self.modules():
            if isinstance(module, OpsLayer):
                module.ops = ops
            if isinstance(module, PagedAttention):
                module.qkv.stack()

    @property
    def ops(self) -> Ops:
        """The kernels this model's layers run."""
        for module in self.modules():
            if isinstance(module, OpsLayer):
                return module.ops
        return REFERENCE_OPS

    def tie_weights_if_needed(self) -> None:
        """Share parameters that the config ties (e.g. lm_head with the embeddings)."""
        if not getattr(self.config, "tie_word_embeddings", False):
            return
        params = dict(self.named_parameters())
        for name, source in self.tied_weights.items():
            module_name, _, attr = name.rpartition(".")
            setattr(self.get_submodule(module_name), attr, params[source])

    def geometry(
        self,
        dtype: torch.dtype,
        ssm_dtype: torch.dtype | None = None,
        conv_columns: ConvColumns = ConvColumns.VLLM,
    ) -> ModelGeometry:
        """The cache geometry of this model's layers, as the allocator and the views see it."""
        kv_name = TORCH_DTYPE_NAMES[dtype]
        ssm_name = TORCH_DTYPE_NAMES[ssm_dtype or dtype]
        attention = [
            AttentionLayer(m.layer_index, m.num_kv_heads, m.head_dim, kv_name)
            for m in self.modules()
            if isinstance(m, PagedAttention)
        ]
        recurrent = [
            recurrent_layer(m, kv_name, ssm_name, conv_columns)
            for m in self.modules()
            if isinstance(m, Mamba1Mixer | Mamba2Mixer)
        ]
        num_params = sum(p.numel() for p in self.parameters())
        return ModelGeometry(
            name=getattr(self.config, "name_or_path", "") or self.family,
            family=self.family,
            num_layers=int(self.config.num_hidden_layers),
            attention_layers=tuple(sorted(attention, key=lambda a: a.layer_index)),
            recurrent_layers=tuple(sorted(recurrent, key=lambda r: r.layer_index)),
            hidden_size=int(self.config.hidden_size),
            vocab_size=int(self.config.vocab_size),
            num_params=num_params,
            num_active_params=num_params,
            weight_dtype=kv_name,
            ssm_dtype=ssm_name,
            conv_columns=conv_columns,
            num_ranks=self.tp.size,
        )


def recurrent_layer(
    mixer: Any, conv_dtype: str, ssm_dtype: str, conv_columns: ConvColumns
) -> RecurrentLayer:
    """The geometry entry of one recurrent mixer (``conv_dim``, ``d_conv``, ``ssm_shape``)."""
    kind = LayerKind.MAMBA2 if isinstance(mixer, Mamba2Mixer) else LayerKind.MAMBA1
    conv = CacheTensor("conv", (mixer.conv_dim, conv_columns.columns(mixer.d_conv)), conv_dtype)
    return RecurrentLayer(
        mixer.layer_index, kind, CacheTensor("ssm", mixer.ssm_shape, ssm_dtype), conv
    )
