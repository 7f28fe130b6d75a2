"""A checkpoint's generation_config.json through the engine, the server and the CLI: its
end-of-sequence ids stop requests (a chat model's end-of-turn token besides config.json's
eos), its sampling values are the defaults of requests that leave them out (not under
``--generation-config vllm``), and its ``max_new_tokens`` caps every output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from serve_helpers import make_engine, scripted_app, serving, words

from avmp.cli import main
from avmp.engine.generation_config import GENERATION_CONFIG_FILE, GenerationDefaults

PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 8


def _with_generation_config(checkpoint: Path, where: Path, content: dict) -> Path:
    path = where / "ckpt"
    shutil.copytree(checkpoint, path)
    (path / GENERATION_CONFIG_FILE).write_text(json.dumps(content))
    return path


def _end_of_turn(tokens: list[int]) -> int:
    """A token of a greedy reply, neither the first nor config.json's eos (2), that does
    not appear before its place: the end-of-turn id the generation config will add."""
    for place in range(1, len(tokens)):
        if tokens[place] != 2 and tokens[place] not in tokens[:place]:
            return place
    raise AssertionError(f"no token to end the reply at in {tokens}")


def test_the_generation_configs_eos_ids_stop_a_request(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    plain = make_engine(checkpoints["chat"])
    full = plain.generate([PROMPT], MAX_TOKENS, ignore_eos=True)[0].token_ids
    place = _end_of_turn(full)
    ckpt = _with_generation_config(checkpoints["chat"], tmp_path,
                                   {"eos_token_id": [2, full[place]]})  # fmt: skip
    for choice in ("auto", "vllm"):  # the ids apply under either
        engine = make_engine(ckpt, generation_config=choice)
        assert engine.eos_token_ids == (2, full[place])
        stopped = engine.generate([PROMPT], MAX_TOKENS)[0]
        assert (stopped.token_ids, stopped.finish_reason) == (full[: place + 1], "stop")
        assert engine.generate([PROMPT], MAX_TOKENS, ignore_eos=True)[0].token_ids == full


def test_the_server_leaves_out_an_end_of_turn_tokens_text(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    full = make_engine(checkpoints["chat"]).generate([PROMPT], MAX_TOKENS,
                                                     ignore_eos=True)[0].token_ids  # fmt: skip
    place = _end_of_turn(full)
    ckpt = _with_generation_config(checkpoints["chat"], tmp_path,
                                   {"eos_token_id": [2, full[place]]})  # fmt: skip
    from serve_helpers import make_app

    with serving(make_app(make_engine(ckpt))) as server, server.client() as client:
        body = {"model": "tiny-granite", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                "temperature": 0, "skip_special_tokens": False}  # fmt: skip
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == words(full[:place])  # the end-of-turn token's text left out


def test_sampling_defaults_fill_what_a_request_leaves_out() -> None:
    defaults = GenerationDefaults(temperature=0.6, top_p=0.9, top_k=20, min_p=0.05,
                                  repetition_penalty=1.1, max_tokens=5)  # fmt: skip
    app, loop, _ = scripted_app(generation=defaults)
    loop.script = "abcdefghij"
    with serving(app) as server, server.client() as client:
        client.post("/v1/completions", json={"model": "tiny-granite", "prompt": "x",
                                             "max_tokens": 9})  # fmt: skip
        options = loop.last_options
        assert (options.temperature, options.top_p, options.top_k, options.min_p,
                options.repetition_penalty) == (0.6, 0.9, 20, 0.05, 1.1)  # fmt: skip
        assert options.max_tokens == 5  # max_new_tokens caps a larger request, as in vLLM
        given = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                 "repetition_penalty": 1.0, "max_tokens": 3}  # fmt: skip
        answer = client.post("/v1/chat/completions", json={
            "model": "tiny-granite", "messages": [{"role": "user", "content": "x"}], **given,
        }).json()  # fmt: skip
        options = loop.last_options
        assert (options.temperature, options.top_p, options.top_k, options.min_p,
                options.repetition_penalty, options.max_tokens) == (0.0, 1.0, 0, 0.0, 1.0, 3)
        assert answer["choices"][0]["message"]["content"] == "abc"


def test_without_a_generation_config_the_apis_own_defaults() -> None:
    app, loop, _ = scripted_app()
    loop.script = "ab"
    with serving(app) as server, server.client() as client:
        client.post("/v1/completions", json={"model": "tiny-granite", "prompt": "x"})
    options = loop.last_options
    assert (options.temperature, options.top_p, options.top_k, options.min_p,
            options.repetition_penalty, options.max_tokens) == (1.0, 1.0, 0, 0.0, 1.0, 16)


def test_cli_options(checkpoints: dict[str, Path], tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    missing = tmp_path / "nowhere"
    assert main(["serve", str(checkpoints["chat"]), "--generation-config", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--generation-config: {missing}: no generation" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / GENERATION_CONFIG_FILE).write_text('{"top_p": 7}')
    assert main(["generate", str(checkpoints["chat"]), "--prompt", "w1 w2",
                 "--generation-config", str(bad)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "top_p 7 is out of range" in err
    good = tmp_path / "good"
    good.mkdir()
    (good / GENERATION_CONFIG_FILE).write_text('{"eos_token_id": [2]}')
    assert main(["generate", str(checkpoints["chat"]), "--prompt", "w1 w2", "--max-tokens",
                 "2", "--memory", "32MiB", "--generation-config", str(good)]) == 0  # fmt: skip
