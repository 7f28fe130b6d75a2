"""``avmp generate``: a demo on a tiny random model, a local checkpoint, and one-line
errors (exit 2) for user mistakes."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["granite-4.0-h-tiny", "--prompt", "x"], "add --random-weights --scale tiny"),
        (["no-such-model", "--random-weights", "--scale", "tiny", "--prompt", "x"], "zoo name"),
        (["granite-4.0-h-tiny", "--random-weights", "--prompt", "x"], "go together"),
        (["qwen3-next-80b-a3b", "--random-weights", "--scale", "tiny", "--prompt", "x"],
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
