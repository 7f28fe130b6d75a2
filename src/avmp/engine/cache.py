"""Cache views the engine can run on.

`DenseCacheViews` gives every layer its own tensors with a fixed number of pages and
slots: no pools, no migration. The kernel and model tests use it to check numerics
against hand-built page tables; the engine itself runs on views over an AVMP backing.
"""

from __future__ import annotations

import torch

from avmp.memory.backing.views import TORCH_DTYPES
from avmp.models.geometry import ModelGeometry


class DenseCacheViews:
    """Per-layer K/V ``[num_pages, block_size, kv_heads, head_dim]`` and per-layer
    conv/SSM state ``[num_slots, ...]``, allocated once."""

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
            if rec.conv is None:
                raise ValueError(f"layer {rec.layer_index}: no conv state (unsupported)")
            conv = torch.zeros(
                (num_slots, *rec.conv.shape), dtype=TORCH_DTYPES[rec.conv.dtype], device=device
            )
            ssm = torch.zeros(
                (num_slots, *rec.ssm.shape), dtype=TORCH_DTYPES[rec.ssm.dtype], device=device
            )
            self._state[rec.layer_index] = (conv, ssm)

    def kv(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._kv[layer_index]

    def state(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._state[layer_index]
