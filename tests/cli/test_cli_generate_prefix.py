"""``avmp generate --prefix-cache`` and ``avmp serve --prefix-cache``: the same tokens as
without the cache, a line saying what the cache did, and one line (exit 2) for a budget
without room for a checkpoint or an unknown policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avmp.cli import main

transformers = pytest.importorskip("transformers")


def _bamba(path: Path, mamba_d_state: int) -> Path:
    config = transformers.BambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, attn_layer_indices=[1],
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=mamba_d_state, mamba_n_groups=1,
        mamba_chunk_size=16, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bamba(tmp_path_factory.mktemp("bamba"), mamba_d_state=8)


SHARED = " ".join(str(3 + (7 * i) % 60) for i in range(40))  # 40 tokens: 10 pages of 4
PROMPTS = [SHARED, f"{SHARED} 5 6 7", f"{SHARED} 9 10 11 12 13", f"{SHARED} 9 10 8"]


def _generate(checkpoint: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> list[str]:
    argv = ["generate", str(checkpoint), "--memory", "8MiB", "--block-size", "4"]
    argv += ["--max-tokens", "6", "--max-num-seqs", "1", *flags]  # one at a time
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_generate_with_the_cache_prints_the_same_tokens_and_its_hits(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    off = _generate(checkpoint, capsys)
    on = _generate(checkpoint, capsys, "--prefix-cache", "avmp")
    tokens = [line for line in off if line.lstrip().startswith("->")]
    assert len(tokens) == len(PROMPTS)
    assert tokens == [line for line in on if line.lstrip().startswith("->")]
    assert not any(line.startswith("prefix cache") for line in off)
    (line,) = [line for line in on if line.startswith("prefix cache avmp (flops eviction)")]
    # the second request takes a checkpoint where it leaves the first one's pages (40
    # tokens in); the third and fourth resume from it
    assert "80 of 171 prompt tokens from the cache" in line


def test_a_budget_without_room_for_a_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state slot of 1.6 MiB (4 heads of 16 x 6144 fp32, and the conv): 4 MiB (two
    chunks) holds a request's slot and a page, not a checkpoint beside them."""
    path = _bamba(tmp_path / "big-state", mamba_d_state=6144)
    argv = ["generate", str(path), "--memory", "4MiB", "--prompt", "5 6", "--max-tokens", "2"]
    assert main([*argv, "--prefix-cache", "avmp"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "avmp" in line]
    assert err.startswith("avmp generate: error: prefix caching needs room for a checkpoint")
    assert main(argv) == 0  # without the cache it runs


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_an_unknown_policy_is_one_line(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "m", "--prompt", "x", "--prefix-cache", "lru"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prefix-cache: invalid choice: 'lru'" in err and "\n" not in err
