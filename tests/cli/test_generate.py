"""``avmp generate``: a demo on a tiny random model, a local checkpoint, and one-line
errors (exit 2) for user mistakes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from avmp.cli import main

transformers = pytest.importorskip("transformers")


def test_random_weights_demo_prints_text_throughput_and_pools(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("mistral_common")  # the demo's tokenizer (the engine extra has it)
    argv = ["generate", "granite-4.0-h-tiny", "--random-weights", "--scale", "tiny"]
    argv += ["--prompt", "Hello", "--prompt", "Two prompts", "--max-tokens", "4"]
    assert main([*argv, "--memory", "16MiB"]) == 0
    out = capsys.readouterr().out
    assert "[0] Hello" in out and "[1] Two prompts" in out
    assert "tokens/s" in out
    assert "pools at the end: KV 2.0 MiB, state 2.0 MiB" in out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bamba")
    config = transformers.BambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, attn_layer_indices=[1],
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(path))
    return path


def test_checkpoint_without_tokenizer_takes_token_ids(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", str(checkpoint), "--prompt", "5 9 13", "--max-tokens", "3"]
    assert main([*argv, "--memory", "4MiB"]) == 0
    out = capsys.readouterr().out
    assert "[0] 5 9 13" in out


def test_checkpoint_without_tokenizer_files_says_it_takes_the_demo_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A vocabulary the demo tokenizer covers: text works, and stderr says whose it is
    (a real checkpoint copied without its tokenizer would otherwise read wrong text)."""
    from avmp.engine.tiny import TINY_VOCAB

    config = transformers.BambaConfig(
        vocab_size=TINY_VOCAB + 768, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        attn_layer_indices=[1], mamba_n_heads=2, mamba_d_head=16, mamba_d_state=8,
        mamba_n_groups=1, mamba_chunk_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    argv = ["generate", str(tmp_path), "--prompt", "Hello", "--max-tokens", "2"]
    assert main([*argv, "--memory", "16MiB"]) == 0
    captured = capsys.readouterr()
    assert "[0] Hello" in captured.out
    assert (f"avmp generate: note: {tmp_path} has no tokenizer files; text goes through "
            "mistral-common's demo tokenizer, not the model's own") in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["granite-4.0-h-tiny", "--prompt", "x"], "add --random-weights --scale tiny"),
        (["no-such-model", "--random-weights", "--scale", "tiny", "--prompt", "x"], "zoo name"),
        (["granite-4.0-h-tiny", "--random-weights", "--prompt", "x"], "go together"),
        (["mamba2-2.7b", "--random-weights", "--scale", "tiny", "--prompt", "x"],
         "no engine implementation"),
        (["granite-4.0-h-tiny", "--random-weights", "--scale", "tiny", "--prompt", "x",
          "--memory", "12 GiB"], "--memory"),
        (["granite-4.0-h-tiny", "--random-weights", "--scale", "tiny", "--prompt", "x",
          "--max-tokens", "0"], "--max-tokens"),
    ],
)  # fmt: skip
def test_user_mistakes_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_text_prompt_without_tokenizer_and_broken_checkpoint(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(checkpoint), "--prompt", "hello", "--memory", "4MiB"]) == 2
    assert "token ids" in capsys.readouterr().err
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    assert main(["generate", str(tmp_path), "--prompt", "1 2"]) == 2
    assert "missing weights" in capsys.readouterr().err


@pytest.mark.parametrize("allocator", ["static", "unified"])
def test_baseline_layouts_give_the_same_tokens(
    checkpoint: Path, allocator: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same greedy tokens on every layout (the layout only moves bytes)."""
    argv = ["generate", str(checkpoint), "--prompt", "5 9 13", "--prompt", "7 7", "--max-tokens"]
    assert main([*argv, "5", "--memory", "8MiB"]) == 0
    avmp = capsys.readouterr().out
    assert main([*argv, "5", "--memory", "8MiB", "--allocator", allocator]) == 0
    other = capsys.readouterr().out
    tokens = [line for line in avmp.splitlines() if "->" in line]
    assert tokens == [line for line in other.splitlines() if "->" in line]
    assert f"{allocator}: 0 OOM events" in other


def test_state_fraction_needs_the_static_layout(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "granite-4.0-h-tiny", "--random-weights", "--scale", "tiny"]
    assert main([*argv, "--prompt", "x", "--state-fraction", "0.3"]) == 2
    assert "--allocator static" in capsys.readouterr().err


TINY = ["granite-4.0-h-tiny", "--random-weights", "--scale", "tiny", "--prompt", "x"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*TINY, "--temperature", "nan"], "--temperature must be a finite number"),
        ([*TINY, "--temperature", "inf"], "--temperature must be a finite number"),
        ([*TINY, "--device", "tpu"], "device must be cpu, cuda or cuda:N, got 'tpu'"),
        ([*TINY, "--memory", "500TiB"], "is more than this host has"),
        ([*TINY, "--threads", "0"], "--threads must be >= 1"),
        ([*TINY, "--seed", str(1 << 64)], "--seed must be between"),  # "Overflow when unpacking"
        # a segfault from 10,000 threads up; the bound is 4 per CPU
        ([*TINY, "--threads", str(4 * (os.cpu_count() or 1) + 1)], "--threads must be at most"),
        ([*TINY, "--host-tier", "500TiB"], "host tier 500.00 TiB is more than this host has"),
        ([*TINY, "--host-tier", "lots"], "--host-tier:"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_before_anything_runs(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_cuda_without_a_gpu_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", *TINY, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA is not available" in err and len(err.splitlines()) == 1


def test_threads_sets_torch_threads(checkpoint: Path) -> None:
    before = torch.get_num_threads()
    try:
        argv = ["generate", str(checkpoint), "--prompt", "5 9", "--max-tokens", "2"]
        assert main([*argv, "--memory", "4MiB", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert main([*argv, "--memory", "4MiB"]) == 0
        assert torch.get_num_threads() == 1  # the default
    finally:
        torch.set_num_threads(before)


def test_every_request_rejected_exits_non_zero(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One 2 MiB chunk holds a page or a slot, never both: nothing can run."""
    argv = ["generate", str(checkpoint), "--prompt", "5 9 13", "--memory", "2MiB"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "rejected" in captured.out
    err = captured.err.strip()
    assert "every request was rejected" in err and len(err.splitlines()) == 1


def _copy(checkpoint: Path, where: Path) -> Path:
    for file in checkpoint.iterdir():
        (where / file.name).write_bytes(file.read_bytes())
    return where


def test_config_that_transformers_rejects_names_the_file(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _copy(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["mamba_n_heads"] = 3  # must divide mamba_expand * hidden_size
    (path / "config.json").write_text(json.dumps(config))
    assert main(["generate", str(path), "--prompt", "1 2", "--memory", "4MiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path / 'config.json'}:" in err and "mamba_n_heads" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda t: t.fill_(float("nan")), "holds NaN or infinite values"),
        (lambda t: t.to(torch.int32), "holds int32 values"),
    ],
)
def test_nan_or_integer_weights_are_refused_at_load(
    checkpoint: Path,
    tmp_path: Path,
    spoil: Any,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from safetensors.torch import load_file, save_file

    path = _copy(checkpoint, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.layers.0.mamba.out_proj.weight"
    tensors[name] = spoil(tensors[name].clone())
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert main(["generate", str(path), "--prompt", "1 2", "--memory", "4MiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert name in err and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("choice", "expected"),
    [(None, None), ("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"),
     ("auto", "float32")],  # Bamba (Mamba2): SGLang keeps its state in fp32
)
def test_ssm_dtype_choices_reach_the_engine_config(
    checkpoint: Path, choice: str | None, expected: str | None
) -> None:
    from avmp.cli import build_parser
    from avmp.cli.generate import engine_config

    argv = ["generate", str(checkpoint), "--prompt", "1 2"]
    args = build_parser().parse_args([*argv, *(["--ssm-dtype", choice] if choice else [])])
    assert engine_config(args).ssm_dtype == expected


def test_ssm_dtype_auto_runs_and_a_bad_one_is_one_line(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", str(checkpoint), "--prompt", "1 2 3", "--max-tokens", "2",
            "--memory", "8MiB"]
    assert main([*argv, "--ssm-dtype", "auto"]) == 0
    capsys.readouterr()
    assert main([*argv, "--ssm-dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ssm-dtype must be one of auto, bf16, fp16, fp32, got 'int8'" in err
    assert len(err.splitlines()) == 1


def test_preemption_options_reach_the_engine_and_the_summary(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from avmp.cli import build_parser
    from avmp.cli.generate import engine_config

    argv = ["generate", str(checkpoint), "--prompt", "1 2 3", "--max-tokens", "2",
            "--memory", "4MiB"]  # fmt: skip
    options = ["--preemption", "swap", "--admission", "greedy", "--host-tier", "8MiB"]
    config = engine_config(build_parser().parse_args([*argv, *options]))
    assert (config.preemption, config.admission) == ("swap", "greedy")
    assert config.host_tier_bytes == 8 << 20
    assert main([*argv, *options]) == 0
    out = capsys.readouterr().out
    assert "preemption swap, admission greedy: 0 swapped out, 0 swapped in" in out
    assert "host tier 8.0 MiB" in out


def test_checkpoint_path_with_tilde_is_under_home(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A quoted ``~/...`` (the shell leaves it) is the home directory, as the zoo reads it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    _copy(checkpoint, tmp_path / "ckpt")
    ((tmp_path / "ckpt") / "generation_config.json").write_text('{"eos_token_id": [7, 9]}')
    argv = ["generate", "~/ckpt/", "--prompt", "5 9 13", "--max-tokens", "3", "--memory", "4MiB"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "[0] 5 9 13" in capsys.readouterr().out
    from avmp.engine.engine import Engine, EngineConfig

    engine = Engine("~/ckpt", EngineConfig(memory_bytes=4 << 20))
    assert engine.eos_token_ids[-2:] == (7, 9)  # its generation_config.json was read
    engine.close()
