"""Linears over one input run as one (`StackedLinears`): an attention layer's q, k and v
projections laid out as one weight tensor by `HybridModel.use_ops`, run as one linear
where the ops ask for it, and run apart whenever the layout no longer holds."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from engine_helpers import reference_tokens_with_ops
from torch import nn

from avmp.engine.models.layers import PagedAttention, StackedLinears
from avmp.engine.ops import Ops
from avmp.engine.parallel.shards import Rows, set_shard, shard_of


class _StackingOps(Ops):
    """The reference kernels, asking for stacked linears and counting the linears'
    output widths."""

    stack_linears = True
    attention_out = True

    def __init__(self) -> None:
        self.widths: Counter[int] = Counter()
        self.shapes: Counter[tuple[int, ...]] = Counter()

    def linear(self, x, weight, bias, residual=False):  # type: ignore[no-untyped-def]
        self.shapes[tuple(weight.shape)] += 1
        return super().linear(x, weight, bias, residual)

    def norm_linear(self, x, delta, scale, norm_weight, eps, fp32, weight, *args):  # type: ignore[no-untyped-def]
        self.widths[weight.shape[0]] += 1
        return super().norm_linear(x, delta, scale, norm_weight, eps, fp32, weight, *args)

    def fuses_prologue(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> bool:
        return x.shape[0] == 1


def _linears(bias: bool = False, widths: tuple[int, ...] = (8, 4, 4)) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(6, n, bias=bias) for n in widths]


@pytest.mark.parametrize("bias", [False, True])
def test_stack_keeps_values_and_makes_the_parameters_views_of_one_tensor(bias: bool) -> None:
    linears = _linears(bias)
    before = [{k: v.clone() for k, v in lin.state_dict().items()} for lin in linears]
    stacked = StackedLinears(*linears)
    assert stacked.linear() is None  # three separate allocations
    stacked.stack()
    for lin, old in zip(linears, before, strict=True):
        assert all(torch.equal(lin.state_dict()[k], v) for k, v in old.items())
        assert isinstance(lin.weight, nn.Parameter) and lin.weight.requires_grad
    one = stacked.linear()
    assert one is not None and one.weight.shape == (16, 6)
    assert one.weight.data_ptr() == linears[0].weight.data_ptr()
    assert (one.bias is not None) == bias
    x = torch.randn(3, 6)
    expected = torch.cat([lin(x) for lin in linears], dim=-1)
    torch.testing.assert_close(one(x), expected)
    ptrs = [p.data_ptr() for lin in linears for p in lin.parameters()]
    stacked.stack()  # stacked already: nothing moves (a captured graph keeps its pointers)
    assert [p.data_ptr() for lin in linears for p in lin.parameters()] == ptrs
    assert stacked.linear() is one  # cached while the parameters stay


def test_the_stack_keeps_a_parameters_attributes() -> None:
    linears = _linears()
    rows = Rows.units(0, 8, 1, 16)  # the first half of a weight split over two ranks
    set_shard(linears[0].weight, 0, rows)
    StackedLinears(*linears).stack()
    shard = shard_of(linears[0].weight)
    assert shard is not None and shard.dim == 0 and shard.rows == rows
    assert shard_of(linears[1].weight) is None


@pytest.mark.parametrize(
    "linears",
    [
        [nn.Linear(6, 4), nn.Linear(6, 4, bias=False)],  # only one with a bias
        [nn.Linear(6, 4), nn.Linear(5, 4)],  # input widths differ
        [nn.Linear(6, 4), nn.Linear(6, 4).double()],  # dtypes differ
    ],
)
def test_linears_that_cannot_share_a_tensor_stay_apart(linears: list[nn.Linear]) -> None:
    ptrs = [p.data_ptr() for lin in linears for p in lin.parameters()]
    stacked = StackedLinears(*linears)
    stacked.stack()
    assert [p.data_ptr() for lin in linears for p in lin.parameters()] == ptrs
    assert stacked.linear() is None


def test_replaced_parameters_fall_back_to_one_linear_each() -> None:
    linears = _linears(bias=True)
    stacked = StackedLinears(*linears)
    stacked.stack()
    assert stacked.linear() is not None
    x = torch.randn(2, 6)
    linears[1].weight = nn.Parameter(torch.randn(4, 6))  # a reload that replaces one
    assert stacked.linear() is None
    ops = _StackingOps()
    outs = stacked(ops, x)
    for out, lin in zip(outs, linears, strict=True):
        torch.testing.assert_close(out, lin(x))
    module = nn.ModuleList(_linears())
    again = StackedLinears(*module)
    again.stack()
    module.to(torch.float64)  # moving the model gives every parameter its own tensor
    assert again.linear() is None


def test_stacked_outputs_are_the_separate_ones() -> None:
    linears = _linears(bias=True)
    stacked = StackedLinears(*linears)
    stacked.stack()
    x = torch.randn(5, 6)
    outs = stacked(_StackingOps(), x)
    assert [o.shape for o in outs] == [(5, 8), (5, 4), (5, 4)]
    for out, lin in zip(outs, linears, strict=True):
        torch.testing.assert_close(out, lin(x))
    apart = stacked(Ops(), x)  # ops that do not stack: one linear each
    for out, lin in zip(apart, linears, strict=True):
        assert torch.equal(out, lin(x))


@pytest.mark.parametrize("family", ["granitemoehybrid", "bamba", "nemotron_h", "jamba"])
def test_attention_reads_one_stacked_linear_and_keeps_the_tokens(family: str) -> None:
    """`use_ops` stacks every attention layer's q, k and v; a decode row then reads the
    normed stream through one linear of their summed widths (no per-projection linear
    left), the output projection runs through the ops' `linear`, and the tokens are
    those of the projections run apart."""
    prompts = [[3, 14, 15, 9, 2, 6, 5, 35, 8], [9, 7]]
    stacking = _StackingOps()
    expected, _ = reference_tokens_with_ops(family, None, prompts)
    tokens, model = reference_tokens_with_ops(family, stacking, prompts)
    assert tokens == expected
    attention = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert attention and all(m.qkv.linear() is not None for m in attention)
    first = attention[0]
    q, k = first.q_proj.out_features, first.k_proj.out_features
    assert stacking.widths[q + 2 * k] > 0
    assert stacking.widths[k] == 0, stacking.widths  # no k or v projection alone
    assert stacking.shapes[tuple(first.o_proj.weight.shape)] > 0
