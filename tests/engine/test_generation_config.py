"""Reading a checkpoint's generation_config.json: end-of-sequence ids, the sampling
defaults that differ from transformers' own, and one-line errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.engine.generation_config import (
    GENERATION_CONFIG_FILE,
    GenerationConfigError,
    GenerationDefaults,
    read_generation_config,
    resolve_generation_config,
)


def _write(directory: Path, content: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / GENERATION_CONFIG_FILE
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_every_eos_id_and_the_values_a_chat_checkpoint_ships(tmp_path: Path) -> None:
    path = _write(tmp_path, {
        "bos_token_id": 1, "eos_token_id": [7, 2, 7], "do_sample": True,
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
        "repetition_penalty": 1.05, "max_new_tokens": 2048,
    })  # fmt: skip
    defaults = read_generation_config(path)
    assert defaults.eos_token_ids == (7, 2)  # file order, each once
    assert defaults.sampling() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                   "min_p": 0.0, "repetition_penalty": 1.05,
                                   "max_tokens": 2048}  # fmt: skip
    assert "temperature 0.6" in defaults.describe() and "7, 2" in defaults.describe()


def test_transformers_defaults_are_no_defaults_of_the_checkpoint(tmp_path: Path) -> None:
    """vLLM reads `to_diff_dict()`: a file that writes transformers' own values sets none."""
    path = _write(tmp_path, {"eos_token_id": 3, "temperature": 1.0, "top_p": 1.0,
                             "top_k": 50, "repetition_penalty": 1.0})  # fmt: skip
    defaults = read_generation_config(path)
    assert defaults.eos_token_ids == (3,)
    assert defaults.sampling() == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read it"),
        ("[1, 2]", "expected a JSON object"),
        ({"eos_token_id": "2"}, "eos_token_id must be an id or a list of ids"),
        ({"eos_token_id": [2, -1]}, "eos_token_id must be an id or a list of ids"),
        ({"eos_token_id": True}, "eos_token_id must be an id or a list of ids"),
        ({"temperature": -0.5}, "temperature -0.5 is out of range"),
        ({"top_p": 0}, "top_p 0 is out of range"),
        ({"top_p": 1.5}, "top_p 1.5 is out of range"),
        ({"top_k": 2.5}, "top_k must be a whole number"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"max_new_tokens": 0}, "max_new_tokens 0 is out of range"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path, content: object, message: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(GenerationConfigError, match=message) as raised:
        read_generation_config(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_choices(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    _write(checkpoint, {"eos_token_id": [2, 9], "temperature": 0.7})
    auto = resolve_generation_config("auto", checkpoint)
    assert auto.eos_token_ids == (2, 9) and auto.temperature == 0.7
    neutral = resolve_generation_config("vllm", str(checkpoint))
    assert neutral.eos_token_ids == (2, 9) and neutral.sampling() == {}  # ids still stop
    assert resolve_generation_config("auto", tmp_path) == GenerationDefaults()  # no file
    assert resolve_generation_config("auto", object()) == GenerationDefaults()  # built model
    other = _write(tmp_path / "other", {"eos_token_id": 5, "top_p": 0.8})
    assert resolve_generation_config(str(other.parent), checkpoint).eos_token_ids == (5,)
    assert resolve_generation_config(str(other), checkpoint).top_p == 0.8
    with pytest.raises(GenerationConfigError, match="no generation_config.json there"):
        resolve_generation_config(str(tmp_path / "missing"), checkpoint)
