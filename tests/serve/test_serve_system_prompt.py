"""A chat's system prompt as a prefix-cache boundary: `system_prompt_end` finds where
the leading system messages end in the prompt's token ids, and ``avmp serve`` passes it
to the engine, so that the second chat with the same system prompt already resumes
after it (without the boundary only the third does)."""

from __future__ import annotations

import pytest
from serve_helpers import MODEL_NAME, make_app, make_engine, serving

from avmp.serve.chat import Message, Rendering, system_prompt_end

pytest.importorskip("openai")
pytest.importorskip("fastapi")

MAX_TOKENS = 6
SYSTEM = " ".join(f"w{(5 * i) % 100}" for i in range(48))  # "<|system|>" + 48 words
USERS = [" ".join(f"w{(i + 3 * k) % 100}" for k in range(20)) for i in range(4)]


class _Words:
    """A chat encoding over word ids: ``system_last`` puts the system prompt in the
    last user message, as some templates do."""

    def __init__(self, system_last: bool = False) -> None:
        self.system_last = system_last
        self.vocab: dict[str, int] = {}

    def encode(self, messages: list[Message], rendering: Rendering | None = None) -> list[int]:
        system = [w for m in messages if m["role"] == "system" for w in m["content"].split()]
        rest = [m for m in messages if m["role"] != "system"]
        if not rest:
            raise ValueError("no user message")
        words: list[str] = [] if self.system_last else ["SYS", *system]
        for index, message in enumerate(rest):
            words += [message["role"].upper()]
            if self.system_last and index == len(rest) - 1:
                words += system
            words += message["content"].split()
        return [self.vocab.setdefault(word, len(self.vocab)) for word in words]


def _chat(*contents: tuple[str, str]) -> list[Message]:
    return [{"role": role, "content": content} for role, content in contents]


def test_system_prompt_end_is_where_the_system_messages_end() -> None:
    chat = _chat(("system", "a b c"), ("system", "d"), ("user", "A x y"), ("assistant", "z"))
    words = _Words()
    assert system_prompt_end(words, chat, words.encode(chat)) == 1 + 4 + 1  # SYS, 4 words, USER
    assert system_prompt_end(_Words(), _chat(("user", "x")), [1, 2]) == 0
    assert system_prompt_end(_Words(), _chat(("system", "a")), [1, 2]) == 0  # nothing after
    late = _Words(system_last=True)
    assert system_prompt_end(late, chat, late.encode(chat)) == 1  # only the role marker


def test_a_chat_system_prompt_is_resumed_from_the_second_request(checkpoints) -> None:
    engine = make_engine(checkpoints["chat"], prefix_cache="avmp", block_size=16)
    with serving(make_app(engine, model_path=checkpoints["chat"])) as server:
        client = server.openai()
        for user in USERS:  # one at a time: each finds what the ones before left
            client.chat.completions.create(
                model=MODEL_NAME,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
    # the system prompt fills 49 tokens with its marker, the user marker makes 50: the
    # checkpoint at the last whole page, 48, which every request after the first resumes
    assert engine.stats.prefix.num_hit_tokens == 48 * (len(USERS) - 1)
