"""Guided decoding in the engine (`RequestOptions.grammar`): outputs of tiny random
models always match their grammar (bounded grammars, so that random weights finish),
finish with ``stop`` once it is complete, come out alike with and without overlap and
through preemption, and leave the requests beside them untouched."""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts
from test_engine_stream import ON_DEVICES, drain, pressure_engine, tokens_of
from test_memory_pressure import HEAVY

from avmp.engine.engine import Engine, EngineConfig, RequestOptions
from avmp.engine.grammar import GrammarCompiler, GrammarMasks, GrammarSpec
from grammar_helpers import EOS, MODEL_VOCAB, byte_tokenizer, satisfies

FAMILY = "granitemoehybrid"
CHOICES = ["yes", "no", "maybe later"]
REGEX = "[a-c]{1,4}"
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 5},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["colour", "ok", "name", "size"],
    "additionalProperties": False,
}
SPECS = [
    GrammarSpec.choice(CHOICES),
    GrammarSpec("regex", REGEX),
    GrammarSpec.json_schema(SCHEMA),
    GrammarSpec("lark", 'start: "(" item ("," item)? ")"\nitem: "x" | "yy"'),
]
MAX_TOKENS = 100  # more than any of these grammars takes (5 characters of 4 bytes in "name")


def byte_checkpoint(build: Callable[..., TinyCheckpoint], **overrides: Any) -> TinyCheckpoint:
    """A tiny model of `MODEL_VOCAB` tokens with the byte tokenizer saved beside it."""
    checkpoint = build(FAMILY, vocab_size=MODEL_VOCAB, eos_token_id=EOS, **overrides)
    byte_tokenizer().save_pretrained(str(checkpoint.path))
    return checkpoint


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> TinyCheckpoint:
    return byte_checkpoint(tiny_checkpoint)


def engine_on(checkpoint: TinyCheckpoint, **options: Any) -> Engine:
    settings: dict[str, Any] = dict(memory_bytes=8 * MiB, block_size=4, device="cpu")
    settings.update(options)
    return Engine(checkpoint.path, EngineConfig(**settings))


def matches(spec: GrammarSpec, text: str) -> bool:
    """Whether ``text`` is in the language of one of `SPECS`."""
    if spec.kind == "choice":
        return text in CHOICES
    if spec.kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if spec.kind == "json":
        return satisfies(json.loads(text), SCHEMA)
    return re.fullmatch(r"\((x|yy)(,(x|yy))?\)", text) is not None


def options(spec: GrammarSpec | None, seed: int, **extra: Any) -> RequestOptions:
    settings: dict[str, Any] = dict(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed)
    return RequestOptions(grammar=spec, **{**settings, **extra})


def run(engine: Engine, requests: list[tuple[list[int], RequestOptions]]) -> list[Any]:
    ids = [engine.add_request(prompt, opts) for prompt, opts in requests]
    updates = drain(engine)
    return [updates[request_id] for request_id in ids]


@pytest.mark.parametrize("device", ON_DEVICES)
def test_outputs_match_their_grammars(checkpoint: TinyCheckpoint, device: str) -> None:
    """Greedy and sampled, several seeds per grammar: every output is in the grammar's
    language, and the request stopped (not ``length``)."""
    engine = engine_on(checkpoint, device=device)
    prompts = random_prompts([5, 9, 3, 7], seed=3)
    requests = [
        (prompts[i % len(prompts)], options(spec, seed) if seed else
         RequestOptions(MAX_TOKENS, grammar=spec))
        for i, spec in enumerate(SPECS) for seed in range(4)
    ]  # fmt: skip
    for (_, opts), updates in zip(requests, run(engine, requests), strict=True):
        assert updates[-1].finish_reason == "stop", opts.grammar
        text = engine.tokenizer.decode(tokens_of(updates))
        assert matches(opts.grammar, text), (opts.grammar, text)


def test_unguided_requests_are_unchanged_beside_guided_ones(checkpoint: TinyCheckpoint) -> None:
    """Seeded sampling and greedy requests give the same tokens with and without guided
    requests in their batch; and every token of the guided ones is one the tokenizer
    knows (the padded ids above it are never allowed)."""
    prompts = random_prompts([6, 11, 4, 8, 5], seed=5)
    plain = [(p, RequestOptions(20, temperature=0.8 * (i % 2), seed=i, ignore_eos=True))
             for i, p in enumerate(prompts)]  # fmt: skip
    guided = [
        (p, options(spec, 10 + i))
        for i, (p, spec) in enumerate(zip(prompts[:4], SPECS, strict=True))
    ]
    alone = run(engine_on(checkpoint), plain)
    interleaved = [r for pair in zip(plain[:4], guided, strict=True) for r in pair]
    mixed = run(engine_on(checkpoint), interleaved + plain[4:])
    together = mixed[0:8:2] + mixed[8:]
    assert [tokens_of(u) for u in together] == [tokens_of(u) for u in alone]
    vocab = len(byte_tokenizer())
    assert all(t < vocab for u in mixed[1:8:2] for t in tokens_of(u))


@pytest.mark.parametrize("device", ON_DEVICES)
def test_the_same_tokens_with_and_without_overlap(checkpoint: TinyCheckpoint, device: str) -> None:
    prompts = random_prompts([6, 11, 4, 8, 5, 9], seed=6)
    requests = [(p, options(SPECS[i % len(SPECS)] if i % 3 else None, i, ignore_eos=True))
                for i, p in enumerate(prompts)]  # fmt: skip
    outputs = [
        [tokens_of(u) for u in run(engine_on(checkpoint, device=device, overlap=o), requests)]
        for o in (False, True)
    ]
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
@pytest.mark.parametrize("overlap", [False, True])
def test_a_guided_request_survives_preemption(
    tiny_checkpoint: Callable[..., TinyCheckpoint], preemption: str, overlap: bool
) -> None:
    """The long requests of test_engine_stream's preempting batch are guided (a regex of
    8 to 12 letters): each is preempted while it writes, its matcher is not fed twice,
    and its tokens are those it writes alone."""
    heavy = byte_checkpoint(tiny_checkpoint, **HEAVY[FAMILY])
    regex = GrammarSpec("regex", "[a-c]{8,12}")
    lengths = [4] * 8 + [120] * 4 + [4] * 8
    requests = [
        (p, options(regex if n == 120 else None, i, ignore_eos=True, max_tokens=16))
        for i, (n, p) in enumerate(zip(lengths, random_prompts(lengths), strict=True))
    ]
    engine = pressure_engine(heavy, preemption=preemption, overlap=overlap)
    updates = run(engine, requests)
    guided = [u for (_, o), u in zip(requests, updates, strict=True) if o.grammar is not None]
    assert sum(u[-1].num_preemptions for u in guided) > 0
    for (prompt, opts), seen in zip(requests, updates, strict=True):
        if opts.grammar is None:
            continue
        text = engine.tokenizer.decode(tokens_of(seen))
        assert seen[-1].finish_reason == "stop" and re.fullmatch("[a-c]{8,12}", text), text
        alone = run(engine_on(heavy, memory_bytes=64 * MiB), [(prompt, opts)])[0]
        assert tokens_of(seen) == tokens_of(alone)


def test_reported_logprobs_are_the_models(checkpoint: TinyCheckpoint) -> None:
    """A guided token's log-probability is the model's own (unmasked) one."""
    prompt = random_prompts([7], seed=8)[0]
    engine = engine_on(checkpoint)
    seen = run(engine, [(prompt, RequestOptions(8, grammar=SPECS[0], logprobs=0))])[0]
    first = tokens_of(seen)[0]
    with torch.no_grad():
        logits = checkpoint.hf(torch.tensor([prompt])).logits[0, -1].float()
    expected = torch.log_softmax(logits, dim=-1)[first].item()
    assert seen[0].new_logprobs[0].logprob == pytest.approx(expected, abs=1e-4)
    assert expected < -1e-3  # the mask did change the distribution: not trivially equal


def test_a_bad_grammar_is_one_line_value_error(checkpoint: TinyCheckpoint) -> None:
    engine = engine_on(checkpoint)
    for spec in [
        GrammarSpec("regex", "[a-"),
        GrammarSpec("json", '{"type": "no such type"}'),
        GrammarSpec("json", "not json"),
        GrammarSpec("choice", "[]"),
        GrammarSpec("lark", "start: missing_rule"),
    ]:
        with pytest.raises(ValueError) as error:
            engine.add_request([5, 6], RequestOptions(4, grammar=spec))
        assert "\n" not in str(error.value) and spec.kind in str(error.value)
    assert not engine.has_unfinished_requests
    with pytest.raises(ValueError, match="kind"):
        GrammarSpec("yaml", "a: b")


def test_a_grammar_needs_a_tokenizer_no_larger_than_the_model(
    checkpoint: TinyCheckpoint, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    small = tiny_checkpoint(FAMILY)  # 128 tokens, and no tokenizer of its own
    engine = engine_on(small)
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.add_request([5, 6], RequestOptions(4, grammar=SPECS[0]))
    compiler = GrammarCompiler(engine_on(checkpoint).tokenizer, EOS, 128)
    with pytest.raises(ValueError, match="no larger than the model's vocabulary"):
        compiler.matcher(SPECS[0])


def test_compiled_grammars_are_cached_and_copied(checkpoint: TinyCheckpoint) -> None:
    compiler = GrammarCompiler(engine_on(checkpoint).tokenizer, EOS, MODEL_VOCAB)
    first, second = compiler.matcher(SPECS[1]), compiler.matcher(SPECS[1])
    assert first is not second
    assert first.consume_token(byte_tokenizer().encode("a")[0])
    assert len(compiler._compiled) == 1 and not second.is_stopped()


def test_guided_requests_on_two_ranks(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    """Rank 0 masks and samples, the followers take its ids: the tokens of one rank."""
    checkpoint = tiny_checkpoint("bamba", vocab_size=MODEL_VOCAB, eos_token_id=EOS)
    byte_tokenizer().save_pretrained(str(checkpoint.path))
    prompts = random_prompts([6, 9, 4, 7], seed=9)
    requests = [(p, options(s, i)) for i, (p, s) in enumerate(zip(prompts, SPECS, strict=True))]
    one = [tokens_of(u) for u in run(engine_on(checkpoint), requests)]
    engine = engine_on(checkpoint, tensor_parallel=2)
    try:
        two = [tokens_of(u) for u in run(engine, requests)]
    finally:
        engine.close()
    assert two == one
    assert all(matches(s, engine.tokenizer.decode(t)) for s, t in zip(SPECS, two, strict=True))


def test_the_demo_tokenizer_gets_a_token_table(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """mistral-common's SentencePiece tokenizer (no Hugging Face files): its pieces'
    bytes make llguidance's table, and a guided answer decodes to one of the choices."""
    tokenizer_module = pytest.importorskip("avmp.engine.tokenizer")
    pytest.importorskip("mistral_common")
    tokenizer = tokenizer_module.MistralTokenizer()
    checkpoint = tiny_checkpoint(FAMILY, vocab_size=tokenizer.vocab_size,
                                 eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config = EngineConfig(memory_bytes=8 * MiB, block_size=4, device="cpu")
    engine = Engine(checkpoint.path, config, tokenizer=tokenizer)
    requests = [([1, 5, 9], options(SPECS[0], seed)) for seed in range(3)]
    for seen in run(engine, requests):
        assert seen[-1].finish_reason == "stop"
        assert tokenizer.decode(tokens_of(seen)) in CHOICES


class _NothingAllowed:
    """A matcher whose mask allows no token (a grammar its tokenizer cannot spell)."""

    def unsafe_compute_mask_ptr(self, pointer: int, num_bytes: int) -> None:
        ctypes.memset(pointer, 0, num_bytes)


def test_a_row_with_nothing_allowed_may_only_end() -> None:
    masks = GrammarMasks(vocab_size=40, eos_token_id=EOS)
    logits = torch.randn(3, 48)
    masked = masks.apply(logits, [(1, _NothingAllowed())])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    assert masked[1].isfinite().nonzero().flatten().tolist() == [EOS]
