"""Routed experts of the mixture-of-experts layers, stacked, and the two ways to run them.

A model holds a layer's experts as one module per expert (the checkpoint's
``experts.{i}.gate_proj.weight`` names, so loading and tensor-parallel slicing work per
expert), but their weights live in a few stacked tensors per layer (`ExpertSlice`): each
expert's linears are views of its rows. That lets one layer run in two ways:

- **grouped** (`grouped_experts`): the ``T x top_k`` (token, expert) pairs sorted by
  expert on the device, group ends from a search over the sorted ids, and one
  ``torch._grouped_mm`` per projection over the stacks. No host reads, and every
  shape follows from ``T`` alone, so a decode step can be captured in a CUDA graph.
- **loop** (`run_experts`): one expert after another, ``torch.where`` picking its
  tokens (a host sync each); the computation transformers' eager experts do, kept
  where the grouped kernel cannot run and where tests compare tokens with
  transformers in float32.

`can_group` decides, from the device and dtypes (a capability check, never a failed
call): torch's grouped GEMM has a fast kernel only for bf16 on CUDA devices of compute
capability 9.x or 10.x (its ``_grouped_mm_cuda`` falls back to a per-group loop that
copies the offsets to the host otherwise), with 16-byte aligned strides.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# CUDA compute capabilities (majors) where torch._grouped_mm runs its bf16 CUTLASS kernel
# without reading the offsets on the host (aten/src/ATen/native/cuda/GroupedBlas.cpp:
# ``_scaled_mm_allowed_device(sm90_only, sm100_only)``).
_FAST_MAJORS = (9, 10)
_ALIGN_BYTES = 16


def run_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_fn: Any,
    num_experts: int,
    first_expert: int = 0,
) -> torch.Tensor:
    """Route each token to its top-k experts and sum their weighted outputs, one expert
    at a time (the loop path).

    ``expert_fn(expert, tokens)`` computes local expert ``expert`` (global index
    ``first_expert + expert``: a rank holds ``num_experts`` of them) on ``[n, hidden]``
    inputs. Experts run in index order and accumulate with ``index_add_`` as
    transformers does; under tensor parallelism the sum is this rank's part.
    """
    out = torch.zeros_like(x, dtype=top_k_weights.dtype)
    for expert in range(num_experts):
        token_idx, k_pos = torch.where(top_k_index == first_expert + expert)
        if token_idx.numel() == 0:
            continue
        y = expert_fn(expert, x[token_idx]) * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def grouped_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    hidden: Callable[[torch.Tensor], torch.Tensor],
    first_expert: int = 0,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """What `run_experts` computes, as two grouped matmuls over stacked weights.

    Args:
        x: ``[T, hidden]`` tokens.
        top_k_index, top_k_weights: ``[T, k]`` global expert ids and their weights.
        up: ``[E, N, hidden]`` this rank's experts' first projection (gate rows then up
            rows, or up alone); ``down``: ``[E, hidden, I]``.
        hidden: ``[S, N] -> [S, I]``, the activation (and gate) between the two.
        first_expert: global id of ``up[0]``; pairs routed to experts outside
            ``first_expert .. first_expert + E`` (other ranks') contribute zero.
    Returns:
        ``[T, hidden]`` in ``top_k_weights``' dtype, as `run_experts`.
    """
    tokens, top_k = top_k_index.shape
    count = up.shape[0]
    if tokens == 0:
        return torch.zeros_like(x, dtype=top_k_weights.dtype)
    local = top_k_index.reshape(-1) - first_expert  # [S]
    held = (local >= 0) & (local < count)
    # other ranks' pairs get id ``count``: sorted past every group, so the grouped
    # matmuls skip them (their rows stay unwritten and are zeroed below)
    local = torch.where(held, local, count)
    ids, order = torch.sort(local, stable=True)  # stable: a group keeps token order
    # group e ends after the pairs with id <= e; a search, not bincount, whose output
    # length would depend on the data (a host read)
    groups = torch.arange(count, device=ids.device, dtype=ids.dtype)
    ends = torch.searchsorted(ids, groups, right=True, out_int32=True)  # [E]
    rows = x[order // top_k]  # [S, hidden]
    h = torch._grouped_mm(rows, up.transpose(-2, -1), offs=ends)  # [S, N]
    if up_bias is not None:
        h = h + up_bias[ids.clamp(max=count - 1)]
    y = torch._grouped_mm(hidden(h).contiguous(), down.transpose(-2, -1), offs=ends)
    if down_bias is not None:
        y = y + down_bias[ids.clamp(max=count - 1)]
    weights = top_k_weights.reshape(-1)[order]  # [S]
    y = torch.where((ids < count)[:, None], y * weights[:, None], 0).to(weights.dtype)
    pairs = torch.empty_like(y)
    pairs[order] = y  # back to (token, k) order
    return pairs.view(tokens, top_k, -1).sum(dim=1)


@functools.cache
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def can_group(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether `grouped_experts` runs torch's fast grouped GEMM for these operands: bf16
    on a CUDA device of compute capability 9.x or 10.x (H100, H200, B200), both weights
    and inputs 16-byte aligned (hidden and intermediate widths multiples of 8)."""
    if not hasattr(torch, "_grouped_mm") or up.device.type != "cuda":
        return False
    if x.device != up.device or {x.dtype, up.dtype, down.dtype} != {torch.bfloat16}:
        return False
    if _cuda_major(up.device.index or 0) not in _FAST_MAJORS:
        return False
    elements = _ALIGN_BYTES // up.element_size()
    aligned = all(t.data_ptr() % _ALIGN_BYTES == 0 for t in (up, down))
    return aligned and up.shape[-1] % elements == 0 and down.shape[-1] % elements == 0


def gated_hidden(expert: Any, h: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` through the expert's own ``glu`` (its kernels), ``h`` holding
    the gate columns then the up columns."""
    gate, up = h.chunk(2, dim=-1)
    out: torch.Tensor = expert.glu(gate, up)
    return out


def activation_hidden(expert: Any, h: torch.Tensor) -> torch.Tensor:
    """``act(up)`` through the expert's ops (experts without a gate: Nemotron-H)."""
    out: torch.Tensor = expert.ops.activation(expert.act, h)
    return out


@dataclass(frozen=True)
class ExpertLayout:
    """Which linears of one expert module form the stacks, and what runs between them.

    ``up``: the linears of the first projection, in the order their outputs are stacked
    (gate then up); ``down``: the second; ``hidden(expert, h)``: the activation, given
    any expert of the layer (for its kernels) and the stacked first projection's output.
    """

    up: tuple[str, ...]
    down: str
    hidden: Callable[[nn.Module, torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if not self.up or self.down in self.up:
            raise ValueError(f"an expert layout needs up linears and a distinct down: {self}")


GATED_MLP = ExpertLayout(("gate_proj", "up_proj"), "down_proj", gated_hidden)


class RoutedExperts(nn.Module):
    """A layer that runs routed experts: the grouped path where `can_group` says its
    kernel runs, else the loop. ``grouped`` forces one (tests, benchmarks); None
    decides per call from the device and dtypes."""

    grouped: bool | None = None

    def takes_grouped_path(self, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
        return can_group(x, up, down) if self.grouped is None else self.grouped


def set_grouped(model: nn.Module, grouped: bool | None) -> None:
    """Force every expert layer of ``model`` onto the grouped path (True), the loop
    (False), or back to the capability check (None)."""
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.grouped = grouped


def _rebind(module: nn.Module, name: str, view: torch.Tensor) -> None:
    """Make parameter ``name`` of ``module`` the view ``view``: in place where torch
    allows (the parameter object stays, as ``Module._apply`` keeps it), else (a meta
    parameter, from building) a new parameter over the view."""
    param = getattr(module, name)
    if torch._has_compatible_shallow_copy_type(param, view):
        param.data = view
    else:
        setattr(module, name, nn.Parameter(view, requires_grad=param.requires_grad))


class ExpertSlice(RoutedExperts):
    """A rank's consecutive experts out of ``num_experts`` (all of them on one rank),
    registered under their global indices (the checkpoint's ``experts.{i}`` names) and
    indexed by local position; their weights are views of per-layer stacks.

    The stacks (``[E, N, hidden]`` first projection, ``[E, hidden, I]`` second, and
    their biases if the linears have them) are the only storage: the experts are built
    on the meta device and their linears rebound to rows of the stacks, then
    initialised in the order they would have been (the same random draws as before).
    `_apply` converts the stacks once and rebinds the views, so ``.to()`` never holds
    two copies. ``forward(x, top_k_index, top_k_weights)`` runs them.
    """

    def __init__(
        self,
        build: Callable[[], nn.Module],
        first_expert: int,
        count: int,
        num_experts: int,
        layout: ExpertLayout = GATED_MLP,
    ) -> None:
        super().__init__()
        if count < 1:
            raise ValueError(f"an expert slice needs at least one expert, got {count}")
        self.first_expert, self.num_experts, self.layout = first_expert, num_experts, layout
        device = torch.get_default_device()
        with torch.device("meta"):
            experts = [build() for _ in range(count)]
        for offset, expert in enumerate(experts):
            self.add_module(str(first_expert + offset), expert)
        self.stacks = self._allocate(experts[0], count, device)
        self._bind()
        if device.type != "meta":
            self._initialise()

    # -- stacks and views -------------------------------------------------------------

    def _linears(self, expert: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
        up = [getattr(expert, name) for name in self.layout.up]
        return up, getattr(expert, self.layout.down)

    def _allocate(
        self, expert: nn.Module, count: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Empty stacks for ``count`` experts shaped like ``expert`` (checked to hold
        nothing but the layout's linears)."""
        up, down = self._linears(expert)
        covered = {id(p) for linear in (*up, down) for p in linear.parameters()}
        stray = [n for n, p in expert.named_parameters() if id(p) not in covered]
        if stray or next(expert.buffers(), None) is not None:
            raise TypeError(f"{type(expert).__name__}: parameters outside the layout {stray}")
        dtype = down.weight.dtype
        width = sum(linear.out_features for linear in up)
        stacks = {
            "up": torch.empty(count, width, up[0].in_features, device=device, dtype=dtype),
            "down": torch.empty(count, *down.weight.shape, device=device, dtype=dtype),
        }
        biases = [linear.bias is not None for linear in up]
        if any(biases) != all(biases):
            raise TypeError(f"{type(expert).__name__}: some up linears have a bias, some not")
        if all(biases):
            stacks["up_bias"] = torch.empty(count, width, device=device, dtype=dtype)
        if down.bias is not None:
            stacks["down_bias"] = torch.empty(count, down.out_features, device=device, dtype=dtype)
        return stacks

    @torch.no_grad()
    def _bind(self) -> None:
        """Point every expert's linears at its rows of the stacks."""
        for index, expert in enumerate(self):
            up, down = self._linears(expert)
            start = 0
            for linear in up:
                end = start + linear.out_features
                _rebind(linear, "weight", self.stacks["up"][index, start:end])
                if linear.bias is not None:
                    _rebind(linear, "bias", self.stacks["up_bias"][index, start:end])
                start = end
            _rebind(down, "weight", self.stacks["down"][index])
            if down.bias is not None:
                _rebind(down, "bias", self.stacks["down_bias"][index])

    def _initialise(self) -> None:
        for expert in self:
            for module in expert.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # the stacks first, then the views onto them: the experts' own conversion then
        # finds them converted already and copies nothing
        with torch.no_grad():
            self.stacks = {name: fn(stack) for name, stack in self.stacks.items()}
        self._bind()
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._bind()  # in case ``fn`` made new tensors even of converted ones
        return self

    def check_integrity(self) -> None:
        """Every expert's weights are views of the stacks (the grouped path reads the
        stacks, the loop the views: they must be the same memory)."""
        for index, expert in enumerate(self):
            up, down = self._linears(expert)
            start = 0
            for linear in up:
                expected = self.stacks["up"][index, start:]
                assert linear.weight.data_ptr() == expected.data_ptr(), (index, start)
                start += linear.out_features
            assert down.weight.data_ptr() == self.stacks["down"][index].data_ptr(), index

    # -- running them ------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``[T, hidden]``: each token's top-k experts (those this rank holds), weighted
        and summed, in ``top_k_weights``' dtype."""
        up, down = self.stacks["up"], self.stacks["down"]
        if not self.takes_grouped_path(x, up, down):
            return run_experts(x, top_k_index, top_k_weights, self._run_one, len(self),
                               self.first_expert)  # fmt: skip
        hidden = functools.partial(self.layout.hidden, self[0])
        return grouped_experts(x, top_k_index, top_k_weights, up, down, hidden,
                               self.first_expert, self.stacks.get("up_bias"),
                               self.stacks.get("down_bias"))  # fmt: skip

    def _run_one(self, index: int, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self[index](x)
        return out

    def is_capturable(self) -> bool:
        """Whether a decode step through these experts can be captured in a CUDA graph:
        it takes the grouped path on the fast kernel (checked on the weights' device
        and dtype, which the inputs share)."""
        up, down = self.stacks["up"], self.stacks["down"]
        return self.grouped is not False and can_group(up, up, down)

    # -- a container of experts ----------------------------------------------------------

    def is_elsewhere(self, index: int) -> bool:
        """Whether expert ``index`` is one of the model's, held by another rank."""
        local = range(self.first_expert, self.first_expert + len(self))
        return 0 <= index < self.num_experts and index not in local

    def __getitem__(self, index: int) -> nn.Module:
        if not 0 <= index < len(self):
            raise IndexError(f"expert {index} of {len(self)}")
        module: nn.Module = getattr(self, str(self.first_expert + index))
        return module

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._modules)
