"""benchmarks.skinny_split off a GPU: the shapes and candidates it would time (these need
Triton: CI runs them in its interpreter step), its table, and one line with exit status
2 where there is no GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.common import write_result
from benchmarks.skinny_split import (
    SHARED_BYTES,
    candidates,
    engine_linears,
    main,
    split_linears,
    tuned_configs,
)


def _skinny() -> Any:
    return pytest.importorskip("avmp.kernels.triton.skinny_linear")


def test_the_engine_runs_q_k_and_v_as_one_linear() -> None:
    layers = {(lin.model, lin.layer): lin for lin in engine_linears(["granite-4.0-h-micro"])}
    model = "granite-4.0-h-micro"
    assert (model, "attention q") not in layers and (model, "attention k, v") not in layers
    qkv = layers[(model, "attention q, k, v")]
    assert (qkv.n, qkv.k) == (2048 + 2 * 512, 2048)


def test_split_shapes_are_those_decode_config_splits() -> None:
    sk = _skinny()
    shapes = split_linears(["granite-4.0-h-micro"], 64, 132)
    assert (2048, 4096) in shapes and (2048, 8192) in shapes  # out_proj, down
    assert all(sk.decode_config(64, n, k, 132).split_k > 1 for n, k in shapes)
    assert (8512, 2048) not in shapes  # the in_proj: 133 tiles, K whole


@pytest.mark.parametrize(("n", "k"), [(2048, 4096), (4096, 21504), (3072, 2048)])
def test_candidates_start_with_decode_config_and_keep_the_rules(n: int, k: int) -> None:
    sk = _skinny()
    found = candidates(64, n, k, 132)
    assert found[0] == sk.decode_config(64, n, k, 132)
    assert len(found) == len(set(found)) > 20
    for config in found[1:]:
        assert (config.block_m + config.block_n) * config.block_k * 2 * config.num_stages <= (
            SHARED_BYTES
        )
        assert -(-k // config.block_k) >= 2 * config.split_k  # two K steps a part at least
        assert sk.tiles(64, n, config) * config.split_k <= 4 * 132
        assert config.tma and config.block_m == 64


def test_the_table_puts_decode_config_beside_the_fastest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    decode = {"block_m": 64, "block_n": 64, "block_k": 128, "split_k": 4, "num_warps": 4,
              "num_stages": 4, "tma": True, "programs": 0}
    best = {**decode, "split_k": 8, "block_n": 128}
    path = write_result(tmp_path / "split.json.gz", {"device": "test GPU", "batch": 64, "rows": [
        {"n": 2048, "k": 4096, "layers": ["g out_proj"], "decode": {"config": decode, "us": 12.0,
         "tb_s": 1.4}, "best": {"config": best, "us": 8.0, "tb_s": 2.1}},
        {"n": 512, "k": 2048, "layers": ["g kv"], "decode": {"config": decode,
         "skipped": "wrong"}, "best": None},
    ]})  # fmt: skip
    assert main(["--markdown", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| g out_proj | 2048 x 4096 | n64 k128 s4 st4 | 12.00 (1.40) | n128 k128 s8 st4 |" in out
    assert out.rstrip().splitlines()[-2].endswith("| 1.50x |")
    assert "| g kv | 512 x 2048 | not timed |" in out


def test_tuned_configs_keep_each_shape_s_fastest_where_it_beats_decode_config() -> None:
    sk = _skinny()
    decode = sk.decode_config(64, 2048, 4096, 132).to_dict()
    faster = {**decode, "split_k": 8, "block_n": 32}
    result = {"device": "test GPU", "batch": 64, "rows": [
        {"n": 2048, "k": 4096, "decode": {"config": decode, "us": 9.0},
         "best": {"config": faster, "us": 8.0}},
        {"n": 2048, "k": 8192, "decode": {"config": decode, "us": 9.0},
         "best": {"config": decode, "us": 9.0}},  # decode_config is the fastest: no entry
        {"n": 512, "k": 2048, "decode": {"config": decode, "skipped": "wrong"}, "best": None},
    ]}  # fmt: skip
    assert tuned_configs(result) == {(64, 2048, 4096): sk.SkinnyConfig(**faster)}


@pytest.mark.skipif(os.environ.get("AVMP_TRITON_INTERPRET") != "1",
                    reason="runs the GEMM on the CPU under Triton's interpreter")
def test_the_engine_ops_run_a_tuned_tiling_for_its_shape_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sk = _skinny()
    from avmp.engine.triton_ops import TritonOps

    ops = TritonOps()
    ops.prologue_rows = 0  # every decode row through the skinny GEMM
    tuned = sk.SkinnyConfig(16, 32, 64, split_k=2, num_stages=2)
    ops.decode_configs = {(4, 64, 256): tuned}
    seen = []
    run = sk.skinny_linear

    def spy(x, weight, bias, config, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(config)
        return run(x, weight, bias, config, **kwargs)

    monkeypatch.setattr(sk, "skinny_linear", spy)
    x = torch.randn(4, 256)
    for n in (64, 96):
        weight = torch.randn(n, 256)
        torch.testing.assert_close(ops.linear(x, weight, None), x @ weight.T, rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
    assert seen == [tuned, sk.decode_config(4, 96, 256, sk.num_sms(x.device), x.element_size())]


def test_an_unreadable_result_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--markdown", str(tmp_path / "missing.json.gz")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message off a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models", "granite-4.0-h-micro"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["skinny_split: needs a CUDA GPU"]
