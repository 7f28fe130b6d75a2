"""A linear with its norm or activation in its prologue computes what the two kernels
it replaces compute (the norm kernel, then the linear in fp32): the residual sum exactly,
the output up to the order of the fp32 accumulation and the output's own rounding; on
a GPU also with programmatic dependent launch, chained as a decode step chains them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton import activations, rms_norm  # noqa: E402
from avmp.kernels.triton import prologue_linear as pl  # noqa: E402

PDL = [False, True] if DEVICE.type == "cuda" else [False]


def tensors(rows: int, k: int, n: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)

    return {"x": rand(rows, k), "aux": rand(rows, k), "norm_weight": rand(k),
            "weight": rand(n, k, scale=k**-0.5), "bias": rand(n)}  # fmt: skip


def reference_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The unfused linear's input ``h`` through the linear in fp32."""
    return F.linear(h.float(), weight.float(), None if bias is None else bias.float())


def assert_close(out: torch.Tensor, want: torch.Tensor) -> None:
    """Within a few units of the output dtype's rounding of the largest value."""
    assert out.shape == want.shape and out.isfinite().all()
    ulp = torch.finfo(out.dtype).eps * want.abs().max().item()
    err = (out.float() - want).abs().max().item()
    assert err <= 4 * ulp + 1e-6, (err, ulp)


DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [None, 0.25])
@pytest.mark.parametrize("fp32_weight", [False, True])
def test_add_norm_linear(pdl: bool, dtype: torch.dtype, scale: float | None,
                         fp32_weight: bool) -> None:  # fmt: skip
    t = tensors(2, 320, 72, dtype, 0)
    total, h = rms_norm.add_rms_norm(t["x"], t["aux"], t["norm_weight"], 1e-5, scale,
                                     fp32_weight=fp32_weight)  # fmt: skip
    s, out = pl.norm_linear(t["x"], t["norm_weight"], 1e-5, t["weight"], t["bias"], t["aux"],
                            scale, fp32_weight, block=(8, 64, 4), pdl=pdl)  # fmt: skip
    assert s is not None and torch.equal(s, total)
    assert_close(out, reference_linear(h, t["weight"], t["bias"]))


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize("k", [256, 200, 33])
def test_plain_norm_linear_any_width(pdl: bool, k: int) -> None:
    """No delta: no sum written; K not a power of two nor a multiple of the K tile."""
    t = tensors(1, k, 45, torch.bfloat16, 1)
    s, out = pl.norm_linear(t["x"], t["norm_weight"], 1e-6, t["weight"], block=(16, 64, 4),
                            pdl=pdl)  # fmt: skip
    assert s is None
    h = rms_norm.rms_norm(t["x"], t["norm_weight"], 1e-6)
    assert_close(out, reference_linear(h, t["weight"], None))


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize(("k", "group"), [(256, 256), (256, 64), (384, 128), (240, 48)])
def test_gated_norm_linear_per_group(pdl: bool, k: int, group: int) -> None:
    """One group; four loaded at once (`_whole_row`); three, and groups of 48, a group
    at a time."""
    assert pl._whole_row(k, group) == ((k, group) == (256, 64))
    t = tensors(2, k, 40, torch.bfloat16, 2)
    out = pl.gated_norm_linear(t["x"], t["aux"], t["norm_weight"], 1e-5, group, t["weight"],
                               t["bias"], block=(8, 128, 4), pdl=pdl)  # fmt: skip
    h = rms_norm.rms_norm(t["x"], t["norm_weight"], 1e-5, t["aux"], group)
    assert_close(out, reference_linear(h, t["weight"], t["bias"]))


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize("gated", [True, False])
def test_act_linear(pdl: bool, gated: bool) -> None:
    t = tensors(3, 192, 24, torch.bfloat16, 3)
    up = t["aux"] if gated else None
    out = pl.act_linear(t["x"], t["weight"], up, block=(8, 64, 4), pdl=pdl)
    h = activations.silu_mul(t["x"], t["aux"]) if gated else activations.relu_squared(t["x"])
    assert_close(out, reference_linear(h, t["weight"], None))


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 3), k=st.sampled_from([16, 48, 96, 160]),
       n=st.integers(1, 70), block_n=st.sampled_from([8, 16]),
       block_k=st.sampled_from([16, 32, 64]), seed=st.integers(0, 99))  # fmt: skip
def test_any_shape_and_tile(rows: int, k: int, n: int, block_n: int, block_k: int,
                            seed: int) -> None:  # fmt: skip
    """Rows, widths and tiles that leave partial tiles on both sides."""
    t = tensors(rows, k, n, torch.bfloat16, seed)
    s, out = pl.norm_linear(t["x"], t["norm_weight"], 1e-5, t["weight"], None, t["aux"], 0.5,
                            block=(block_n, block_k, 4))  # fmt: skip
    total, h = rms_norm.add_rms_norm(t["x"], t["aux"], t["norm_weight"], 1e-5, 0.5)
    assert s is not None and torch.equal(s, total)
    assert_close(out, reference_linear(h, t["weight"], None))


def test_strided_rows_are_read_where_they_are() -> None:
    """The gate and up halves of one projection's output (row stride twice the width),
    as the MLP passes them."""
    t = tensors(2, 128, 16, torch.bfloat16, 4)
    gate_up = torch.cat([t["x"], t["aux"]], dim=-1)
    gate, up = gate_up.chunk(2, dim=-1)
    out = pl.act_linear(gate, t["weight"], up, block=(8, 32, 4))
    assert_close(out, reference_linear(activations.silu_mul(t["x"], t["aux"]), t["weight"], None))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a chain of launches, on a GPU")
def test_a_chain_with_dependent_launches_reads_each_output_after_it_is_written() -> None:
    """Each linear reads the previous one's output: with PDL the next launch starts
    early and must still wait for its input, in a CUDA graph as in the engine."""
    torch.manual_seed(5)
    k, n_layers = 512, 12
    ws = [torch.randn(k, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5 for _ in range(n_layers)]
    nw = torch.ones(k, device=DEVICE, dtype=torch.bfloat16)
    x0 = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)

    def chain(pdl: bool) -> torch.Tensor:
        x, d = x0, torch.zeros_like(x0)
        for w in ws:
            s, d = pl.norm_linear(x, nw, 1e-5, w, None, d, None, block=(8, 64, 4), pdl=pdl)
            x = s
        return x

    want = chain(False)
    assert torch.equal(chain(True), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)


def test_tiles() -> None:
    """Eight weight rows a program; short K steps when programs are many, long when the
    matrix has few rows (every SM still streams)."""
    assert pl.tiles(16384, 2048, 132) == (8, 256, 4)
    assert pl.tiles(2048, 8192, 132) == (8, 2048, 8)
    assert pl.tiles(2048, 4096, 132) == (8, 1024, 8)
    assert pl.tiles(3072, 2048, 132) == (8, 1024, 4)


def test_bad_shapes_raise() -> None:
    t = tensors(1, 96, 8, torch.bfloat16, 6)
    with pytest.raises(ValueError, match="weight must be"):
        pl.act_linear(t["x"], t["weight"][:, :64])
    with pytest.raises(ValueError, match="must match x"):
        pl.act_linear(t["x"], t["weight"], t["aux"][:, :64])
    with pytest.raises(ValueError, match="tiles of 16"):
        pl.gated_norm_linear(t["x"], t["aux"], t["norm_weight"], 1e-5, 24, t["weight"])
    assert not pl.tile_fits_groups(96, 24) and pl.tile_fits_groups(96, 96)
    assert pl.tile_fits_groups(96, 32) and not pl.tile_fits_groups(96, 36)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a chain of launches, on a GPU")
def test_a_mamba2_decode_chain_with_dependent_launches_matches_one_without() -> None:
    """in_proj (norm in its prologue) -> conv step -> state step -> out_proj (gated norm
    in its prologue), layer after layer, every launch dependent: each kernel waits for
    the one before it, so outputs and the states it leaves are the plain chain's, eager
    and replayed from a CUDA graph."""
    from avmp.kernels.triton.conv1d_update import conv1d_update
    from avmp.kernels.triton.mamba2_state_update import mamba2_state_update

    torch.manual_seed(6)
    hidden, heads, head_dim, d_state, layers = 256, 8, 16, 16, 6
    inner = heads * head_dim
    conv_dim = inner + 2 * d_state
    bf = torch.bfloat16

    def rand(*shape: int, scale: float = 1.0, dtype: torch.dtype = bf) -> torch.Tensor:
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    w_in = [rand(inner + conv_dim + heads, hidden, scale=hidden**-0.5) for _ in range(layers)]
    w_out = [rand(hidden, inner, scale=inner**-0.5) for _ in range(layers)]
    conv_w, a = rand(conv_dim, 4, scale=0.5), -torch.rand(heads, device=DEVICE) - 0.5
    nw, gw = torch.ones(hidden, device=DEVICE, dtype=bf), torch.ones(inner, device=DEVICE, dtype=bf)
    x0, slot = rand(1, hidden), torch.tensor([2], device=DEVICE, dtype=torch.int32)
    conv0, ssm0 = rand(layers, 4, conv_dim, 3), rand(layers, 4, heads, head_dim, d_state,
                                                     dtype=torch.float32)  # fmt: skip

    def chain(pdl: bool, conv: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor:
        x, d = x0, torch.zeros_like(x0)
        for i in range(layers):
            x, proj = pl.norm_linear(x, nw, 1e-5, w_in[i], None, d, 0.5, pdl=pdl)
            z, xbc, dt = proj.split([inner, conv_dim, heads], dim=-1)
            xbc = conv1d_update(conv[i], slot, xbc, conv_w, None, "silu", pdl=pdl)
            xs, b, c = xbc.split([inner, d_state, d_state], dim=-1)
            y = mamba2_state_update(ssm[i], slot, xs.reshape(1, heads, head_dim), dt, a,
                                    b.reshape(1, 1, d_state), c.reshape(1, 1, d_state),
                                    pdl=pdl)  # fmt: skip
            d = pl.gated_norm_linear(y.reshape(1, inner), z, gw, 1e-5, inner, w_out[i], pdl=pdl)
        return x + d

    conv_a, ssm_a = conv0.clone(), ssm0.clone()
    want = chain(False, conv_a, ssm_a)
    conv_b, ssm_b = conv0.clone(), ssm0.clone()
    assert torch.equal(chain(True, conv_b, ssm_b), want)
    assert torch.equal(conv_b, conv_a) and torch.equal(ssm_b, ssm_a)
    conv_c, ssm_c = conv0.clone(), ssm0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(True, conv_c, ssm_c)
    conv_c.copy_(conv0)
    ssm_c.copy_(ssm0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want) and torch.equal(conv_c, conv_a) and torch.equal(ssm_c, ssm_a)
