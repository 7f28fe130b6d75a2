"""Helpers for the server tests: a tiny checkpoint whose tokenizer has a chat template,
an engine on it, and the app served by uvicorn on 127.0.0.1 in a thread.

Replies that must be exact (tool calls) come from `ScriptedLoop`, a stand-in engine
loop that "generates" a script under a tokenizer of one token per character.

The tokenizer is word-level (one word per token, decoded with spaces between), so a
text answer spells its token ids exactly and can be compared with `Engine.generate`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 128
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3; the model's eos is 2
MARKERS = ["<|system|>", "<|user|>", "<|assistant|>"]
WORDS = SPECIALS + MARKERS + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(MARKERS))]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# an agent's template: the tools' names, tool calls (name and the argument "x") and the
# ids of tool answers, all in words of the vocabulary so a prompt spells them; and the
# template variables vLLM's fields set (w50 for enable_thinking, reasoning_effort, documents)
AGENT_TEMPLATE = (
    "{% if enable_thinking %}w50 {% endif %}{% if reasoning_effort %}{{ reasoning_effort }} "
    "{% endif %}{% for d in documents or [] %}{{ d.text }} {% endfor %}"
    "{% if tools %}<|system|> {% for t in tools %}{{ t.function.name }} {% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} "
    "{% for c in m.tool_calls or [] %}<tool_call> {{ c.function.name }} "
    "{{ c.function.arguments.x }} </tool_call> {% endfor %}"
    "{% if m.tool_call_id %}{{ m.tool_call_id }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_NAME = "tiny-granite"
MAX_MODEL_LEN = 256
TIMEOUT_S = 60.0  # no request of these tests comes near it


def write_checkpoint(
    path: Path,
    chat_template: bool | str = True,
    seed: int = 0,
    tokenizer: Any = None,
    vocab_size: int = VOCAB,
) -> Path:
    """A tiny Granite-4.0-H-style hybrid (3 Mamba2 layers, 1 attention layer) with a
    word-level tokenizer of its 128 tokens, saved to ``path``; ``chat_template``: True for
    `CHAT_TEMPLATE`, False for none, or the template itself; ``tokenizer``: another
    tokenizer to save (its template set as ``chat_template`` says) beside a model of
    ``vocab_size`` tokens."""
    import torch

    config = transformers.GraniteMoeHybridConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=32,
        shared_intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=0,
        layer_types=["mamba", "mamba", "attention", "mamba"],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=2,
        mamba_chunk_size=8,
        position_embedding_type="rope",
        max_position_embeddings=MAX_MODEL_LEN,
        initializer_range=0.1,  # logits far enough apart that greedy is stable
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(path))
    if tokenizer is None:
        tokenizer = word_tokenizer(chat_template)
    elif chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE if chat_template is True else chat_template
    tokenizer.save_pretrained(str(path))
    return path


def word_tokenizer(chat_template: bool | str) -> Any:
    """The checkpoints' word-level Hugging Face tokenizer (``chat_template`` as for
    `write_checkpoint`)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    words = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )  # fmt: skip
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE if chat_template is True else chat_template
    return fast


def make_engine(path: Path, **overrides: Any) -> Any:
    """An engine on the CPU over the checkpoint at ``path``, warmed up."""
    from avmp.engine.engine import Engine, EngineConfig

    settings: dict[str, Any] = dict(
        memory_bytes=32 << 20, device="cpu", max_model_len=MAX_MODEL_LEN, max_num_seqs=32
    )
    settings.update(overrides)
    engine = Engine(path, EngineConfig(**settings))
    engine.warmup()
    return engine


def make_app(engine: Any, max_waiting: int = 256, **config: Any) -> Any:
    from avmp.engine.loop import EngineLoop
    from avmp.serve.app import ServeConfig, create_app
    from avmp.serve.chat import load_chat_encoder

    path, template = config.pop("model_path", None), config.pop("chat_template", None)
    chat = load_chat_encoder(path, engine.tokenizer, template)
    serve_config = ServeConfig(model_name=MODEL_NAME, **config)
    return create_app(EngineLoop(engine, max_waiting), engine.tokenizer, serve_config, chat)


class ServerThread:
    """uvicorn serving ``app`` on a free port of 127.0.0.1 in a daemon thread.

    ``stop`` asks it to exit as SIGTERM would (the same graceful path) and waits.
    """

    def __init__(self, app: Any, shutdown_timeout_s: float = 5.0) -> None:
        from avmp.serve.server import bind, make_server

        self.app = app
        self._sock = bind("127.0.0.1", 0)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, shutdown_timeout_s, log_level="warning")
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(TIMEOUT_S)
        self._sock.close()
        assert not self._thread.is_alive(), "the test server did not stop"

    @property
    def loop(self) -> Any:
        return self.app.state.server.loop

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT_S, **kwargs)

    def openai(self, api_key: str = "unused", **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=TIMEOUT_S,
                             max_retries=0, **kwargs)  # fmt: skip

    def async_openai(self, api_key: str = "unused") -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key,
                                  timeout=TIMEOUT_S, max_retries=0)  # fmt: skip


@contextlib.contextmanager
def serving(app: Any, shutdown_timeout_s: float = 5.0) -> Iterator[ServerThread]:
    server = ServerThread(app, shutdown_timeout_s).start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(condition: Any, timeout_s: float = 10.0) -> bool:
    """Polls ``condition()`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


class CharTokenizer:
    """A tokenizer of one token per character (its code point); no special tokens."""

    vocab_size = 0x110000
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:  # fmt: skip
        return "".join(chr(i) for i in ids)


class ScriptedLoop:
    """A stand-in engine loop whose every request "generates" the characters of
    ``script`` (under `CharTokenizer`), three per update, and stops (``length`` at
    ``max_tokens``); ``last_prompt``, ``last_options``: what the last request asked."""

    def __init__(self) -> None:
        self.script = ""
        self.last_prompt: list[int] = []
        self.last_options: Any = None

    def start(self) -> None:
        pass

    def shutdown(self, abort_running: bool, timeout_s: float = 0.0) -> None:
        pass

    def snapshot(self) -> Any:
        return SimpleNamespace(healthy=True, accepting=True, error=None)

    async def generate(self, prompt: list[int], options: Any) -> Any:
        from avmp.engine.engine import RequestUpdate

        self.last_prompt, self.last_options = list(prompt), options
        ids = [ord(c) for c in self.script][: options.max_tokens]
        reason = "stop" if len(ids) == len(self.script) else "length"
        for start in range(0, len(ids), 3):
            end = min(start + 3, len(ids))
            last = end == len(ids)
            yield RequestUpdate(0, ids[start:end], last, reason if last else None, None,
                                len(prompt), end)  # fmt: skip


class HermesChat:
    """A chat encoding whose template writes Hermes' tags."""

    template = "{{ '<tool_call>' }}"

    def __init__(self) -> None:
        self.last_messages: list[dict] = []
        self.last_rendering: Any = None

    def encode(self, messages: list[dict], rendering: Any = None) -> list[int]:
        """Three tokens whatever the chat, which is kept (``last_messages``,
        ``last_rendering``)."""
        self.last_messages, self.last_rendering = messages, rendering
        return [1, 2, 3]


def words(ids: list[int]) -> str:
    """The text the word-level tokenizer decodes ``ids`` to (special tokens skipped)."""
    return " ".join(WORDS[i] for i in ids if i >= len(SPECIALS))


WEATHER_CALL = '{"name": "get_weather", "arguments": {"city": "Zürich"}}'
TIME_CALL = '{"name": "get_time", "arguments": {}}'
"""Two tool calls as a model writes them inside Hermes' tags (scripted replies)."""


@contextlib.contextmanager
def agent_server(directory: Path, **config: Any) -> Iterator[ServerThread]:
    """A server over a tiny checkpoint written to ``directory`` whose chat template renders
    tools, documents and template variables (`AGENT_TEMPLATE`)."""
    path = write_checkpoint(directory / "ckpt", AGENT_TEMPLATE)
    with serving(make_app(make_engine(path), model_path=path, **config)) as running:
        yield running


def scripted_app(**config: Any) -> tuple[Any, ScriptedLoop, HermesChat]:
    """An app whose engine loop plays back scripted replies one character per token, and
    its loop and chat encoding."""
    from avmp.serve.app import ServeConfig, create_app

    loop, chat = ScriptedLoop(), HermesChat()
    app = create_app(loop, CharTokenizer(), ServeConfig(model_name=MODEL_NAME, **config), chat)
    return app, loop, chat
