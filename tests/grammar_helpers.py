"""Shared by the engine and server tests of structured outputs: a byte-level Hugging
Face tokenizer (one token per byte, no merges), so that a grammar can spell any text
(JSON, a regular expression's matches) a token at a time, and a check that a value
satisfies the small JSON schemas these tests use."""

from __future__ import annotations

from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("llguidance")

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0-2; the end of sequence is 2
BYTE_VOCAB = len(SPECIALS) + 256  # the tokenizer's tokens
MODEL_VOCAB = 288  # the models' (padded: ids 259-287 have no text)
EOS = 2


def byte_tokenizer() -> Any:
    """A fast tokenizer of `BYTE_VOCAB` tokens: the specials, then one per byte."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def satisfies(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` satisfies ``schema``, for the keywords these tests use: type
    (object, string, boolean, integer, array), enum, properties, required,
    additionalProperties false, maxLength, minimum/maximum, items, maxItems."""
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    checks = {
        "object": lambda: isinstance(value, dict),
        "string": lambda: isinstance(value, str),
        "boolean": lambda: isinstance(value, bool),
        "integer": lambda: isinstance(value, int) and not isinstance(value, bool),
        "array": lambda: isinstance(value, list),
    }
    if kind is not None and not checks[kind]():
        return False
    if isinstance(value, str) and len(value) > schema.get("maxLength", len(value)):
        return False
    if isinstance(value, int) and not schema.get("minimum", value) <= value <= schema.get(
        "maximum", value
    ):
        return False
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            return False
        return all(satisfies(item, schema.get("items", {})) for item in value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(name not in value for name in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(properties):
            return False
        return all(satisfies(value[name], properties[name]) for name in value if name in properties)
    return True
