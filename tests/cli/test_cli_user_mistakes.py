"""More of what users get wrong, each answered in one line (exit 2) before any work:
model names and paths, trace files as other tools write them, output paths, duplicate
list entries, and interrupted or failed writes that must leave earlier results whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.cli import main
from cli_helpers import one_line_error

# ---------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "jamba-1.5-minii",
            "unknown model 'jamba-1.5-minii' (did you mean jamba-1.5-mini?); known:",
        ),
        (
            "nemotron",
            "(did you mean nemotron-h-47b or nemotron-h-56b or nemotron-h-8b or "
            "nemotron-nano-9b-v2?)",
        ),
        ("", "unknown model ''; known:"),  # was read as the working directory's config.json
    ],
)
def test_an_unknown_model_name_suggests_close_ones(
    capsys: pytest.CaptureFixture[str], model: str, message: str
) -> None:
    assert main(["plan", model, "--memory", "12GiB"]) == 2
    assert message in one_line_error(capsys, "plan")


@pytest.mark.parametrize("name", ["missing.json", "ckpt/missing", "./missing"])
def test_a_missing_model_path_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Was: "unknown model 'ckpt/missing'; known: ..." (the zoo's names)."""
    monkeypatch.chdir(tmp_path)
    assert main(["plan", name, "--memory", "12GiB"]) == 2
    assert f"error: {name}: no such file or directory" in one_line_error(capsys, "plan")


def test_a_model_path_with_a_tilde_is_the_home_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model=~/ckpt`` reaches avmp unexpanded (no shell expands a tilde after ``=``)."""
    from avmp.models import zoo_config

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(zoo_config("jamba-1.5-mini")))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["plan", "~/ckpt", "--memory", "12GiB", "--json"]) == 0


def test_random_weights_of_a_typo_or_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = ["--random-weights", "--scale", "tiny", "--prompt", "hi"]
    assert main(["generate", "granite-4.0-h-tny", *tiny]) == 2
    line = one_line_error(capsys, "generate")
    assert (
        "needs a zoo name: unknown model 'granite-4.0-h-tny' (did you mean granite-4.0-h-tiny?)"
        in line
    )
    assert main(["generate", str(tmp_path), *tiny]) == 2
    assert f"to load {tmp_path}, leave out --random-weights" in one_line_error(capsys, "generate")


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_memory_below_one_chunk_names_the_flags(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "granite-4.0-h-tiny", "--random-weights", "--scale", "tiny",
            "--memory", "1MiB", "--port", "0"] if command == "serve" else [
            command, "granite-4.0-h-tiny", "--random-weights", "--scale", "tiny",
            "--memory", "1MiB", "--prompt", "1 2"]  # fmt: skip
    assert main(argv) == 2
    line = one_line_error(capsys, command)
    assert "--memory 1MiB must hold at least one --chunk (2MiB)" in line
