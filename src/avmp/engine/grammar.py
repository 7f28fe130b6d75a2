"""Guided decoding: a request's output held to a grammar (a JSON schema, a regular
expression, a list of choices, a Lark/GBNF grammar) through llguidance.

A request carries a `GrammarSpec`; the engine compiles it once against its tokenizer
(`GrammarCompiler`, which keeps the compiled matchers of recent specs and hands each
request a copy) and keeps one `llguidance.LLMatcher` per request. Each step that samples
for such a request, `GrammarMasks` writes every such row's allowed tokens into a bitmask
on the host, copies it to the device and sets the disallowed logits to -inf before
sampling; once the token is read, the matcher consumes it (`advance`), and a matcher
that can take nothing more but the end of sequence finishes the request. Tokens beyond
the tokenizer's vocabulary (a model's padded embedding rows) are never allowed.

llguidance is optional (``pip install llguidance``, in the ``serve`` extra); it is
imported only when a grammar is compiled.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from avmp.engine.tokenizer import Tokenizer

GRAMMAR_KINDS = ("json", "regex", "choice", "lark")
CACHED_GRAMMARS = 64  # compiled specs kept (most recently used); a copy per request
MAX_ERROR_CHARS = 300
# JSON is written on one line with a space after "," and ":" and nowhere else (a schema
# may say otherwise in its "x-guidance"): free whitespace lets a weak model pad forever
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match (`RequestOptions.grammar`).

    Attributes:
        kind: ``json`` (``text`` is a JSON schema; ``{"type": "object"}`` for any
            object), ``regex``, ``choice`` (``text`` is a JSON list of strings) or
            ``lark`` (a Lark grammar, or llama.cpp's GBNF, as llguidance reads them).
        text: the schema, expression, list or grammar.
    Raises:
        ValueError: an unknown kind, or text that is not a string.
    """

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, "
                             f"got {self.kind!r}")  # fmt: skip
        if not isinstance(self.text, str):
            raise ValueError(f"a {self.kind} grammar's text must be a string")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> GrammarSpec:
        """A spec for a JSON schema given as an object (its keys in their order: an
        object's properties are written in the order the schema lists them)."""
        return cls("json", json.dumps(schema))

    @classmethod
    def choice(cls, choices: list[str]) -> GrammarSpec:
        """A spec for one of ``choices``, exactly."""
        return cls("choice", json.dumps(list(choices)))


def _one_line(error: str) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as error:
        raise ValueError(
            f"structured outputs need llguidance ({error}): pip install llguidance"
        ) from None
    return llguidance


class GrammarCompiler:
    """Compiles specs against one tokenizer. Its llguidance token table is built on the
    first grammar (about a second for a large vocabulary); compiled matchers of the
    `CACHED_GRAMMARS` most recent specs are kept, and every request gets a fresh copy.
    Thread-safe, so that a server compiles a request's grammar in a worker thread and
    the engine thread finds it compiled; a grammar is compiled outside the lock (two
    threads may compile one spec at once; one result is kept).

    Args:
        tokenizer: the engine's tokenizer (None: grammars are refused).
        eos_token_id: the token that ends a finished output.
        model_vocab: the model's vocabulary (logits' width); the tokenizer's must not
            be larger.
    """

    def __init__(self, tokenizer: Tokenizer | None, eos_token_id: int | None, model_vocab: int):
        self._tokenizer = tokenizer
        self._eos = eos_token_id
        self._model_vocab = model_vocab
        self._table: Any = None
        self._table_error: str | None = None
        self._lock = threading.Lock()  # the cache
        self._table_lock = threading.Lock()  # the token table, built once
        self._compiled: OrderedDict[GrammarSpec, Any] = OrderedDict()

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary: the tokens a mask can allow."""
        return int(self._token_table().vocab_size)

    def matcher(self, spec: GrammarSpec) -> Any:
        """A fresh `llguidance.LLMatcher` for ``spec``.

        Raises:
            ValueError: one line: llguidance is missing, the engine has no tokenizer
                llguidance can read, or the grammar does not compile.
        """
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
                return compiled.deep_copy()
        compiled = self._compile(spec)
        with self._lock:
            self._compiled[spec] = compiled
            if len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
            return compiled.deep_copy()

    def _compile(self, spec: GrammarSpec) -> Any:
        llguidance = _llguidance()
        table = self._token_table()
        try:
            if spec.kind == "choice":
                choices = json.loads(spec.text)
                if (
                    not isinstance(choices, list)
                    or not choices
                    or not all(isinstance(c, str) for c in choices)
                ):
                    raise ValueError("choices must be a non-empty list of strings")
            if spec.kind == "json":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    spec.text, defaults=JSON_LAYOUT
                )
            else:
                grammar = llguidance.grammar_from(
                    "grammar" if spec.kind == "lark" else spec.kind, spec.text
                )
        except (ValueError, TypeError) as error:
            raise ValueError(f"invalid {spec.kind} grammar: {_one_line(str(error))}") from None
        matcher = llguidance.LLMatcher(table, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {spec.kind} grammar: {_one_line(matcher.get_error())}")
        return matcher

    def _token_table(self) -> Any:
        """The llguidance token table, built once; a tokenizer it cannot be built for
        is refused once and then at once (the same ValueError)."""
        with self._table_lock:
            return self._built_table()

    def _built_table(self) -> Any:
        if self._table_error is not None:
            raise ValueError(self._table_error)
        if self._table is None:
            try:
                table = build_token_table(self._tokenizer, self._eos)
                if table.vocab_size > self._model_vocab:
                    raise ValueError(
                        f"structured outputs need a tokenizer no larger than the model's "
                        f"vocabulary ({table.vocab_size} tokens > {self._model_vocab})"
                    )
            except ValueError as error:
                self._table_error = str(error)
                raise
            self._table = table
        return self._table


def build_token_table(tokenizer: Tokenizer | None, eos_token_id: int | None) -> Any:
    """llguidance's `LLTokenizer` for the engine's tokenizer: a Hugging Face fast
    tokenizer directly, mistral-common's SentencePiece one from its pieces' bytes.

    Raises:
        ValueError: no tokenizer, or one llguidance cannot read (one line).
    """
    llguidance = _llguidance()
    if tokenizer is None:
        raise ValueError("structured outputs need a tokenizer; this engine has none")
    inner = getattr(tokenizer, "_tok", None)
    try:
        import transformers

        if isinstance(inner, transformers.PreTrainedTokenizerFast):
            import llguidance.hf

            return llguidance.hf.from_tokenizer(inner, eos_token=eos_token_id)
    except ImportError:
        pass
    except ValueError as error:  # e.g. a word-level tokenizer without a decoder
        raise ValueError(
            f"structured outputs: llguidance cannot read this tokenizer ({_one_line(str(error))})"
        ) from None
    pieces = getattr(inner, "_model", None)  # mistral-common's sentencepiece processor
    if pieces is not None and hasattr(pieces, "id_to_piece"):
        return llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_SentencePieceTable(pieces, eos_token_id))
        )
    raise ValueError(
        f"structured outputs need a Hugging Face fast tokenizer or the demo SentencePiece "
        f"one; llguidance cannot read {type(inner or tokenizer).__name__}"
    )


class _SentencePieceTable:
    """What `llguidance.TokenizerWrapper` reads from a SentencePiece model: each token's
    bytes (``▁`` as a space, ``<0xNN>`` pieces as that byte, control tokens empty), the
    end-of-sequence id and an encoder (`__call__`)."""

    def __init__(self, pieces: Any, eos_token_id: int | None) -> None:
        self._pieces = pieces
        self._newline = int(pieces.piece_to_id("<0x0A>"))
        size = int(pieces.get_piece_size())
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for token in range(size):
            piece = str(pieces.id_to_piece(token))
            if pieces.is_control(token) or pieces.is_unknown(token):
                self.tokens.append(b"")
                self.special_token_ids.append(token)
            elif pieces.is_byte(token):
                self.tokens.append(bytes([int(piece[3:-1], 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self.eos_token_id = eos_token_id if eos_token_id is not None else int(pieces.eos_id())
        self.bos_token_id = int(pieces.bos_id())

    def __call__(self, text: str) -> list[int]:
        """``text``'s tokens as they continue an output: SentencePiece writes a space
        before a text's first piece, so a newline (a byte token of its own) goes first
        and is cut off with what precedes it."""
        ids = list(self._pieces.encode("\n" + text))
        return ids[ids.index(self._newline) + 1 :]


class GrammarMasks:
    """Applies the allowed-token masks of a step's grammar rows to its logits.

    Args:
        vocab_size: the tokenizer's vocabulary (the bitmask's width in bits, rounded up
            to 32); logits beyond it are disallowed.
        eos_token_id: the token a row that allows nothing gets (None: none).
    """

    def __init__(self, vocab_size: int, eos_token_id: int | None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._words = (vocab_size + 31) // 32
        self._bits: dict[torch.device, torch.Tensor] = {}  # 0..31 per device

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, Any]]) -> torch.Tensor:
        """``logits [N, V]`` with every (row, matcher) in ``rows`` masked: -inf at the
        tokens the matcher does not allow. A copy (the runner's logits may be a CUDA
        graph's output buffer). The bitmasks are written on the host, one call into
        llguidance per row, into pinned memory on CUDA, copied without a host wait and
        expanded on the device, so the host never waits for the step here."""
        device = logits.device
        pin = device.type == "cuda"
        mask = torch.empty(len(rows), self._words, dtype=torch.int32, pin_memory=pin)  # [R, W]
        for i, (_, matcher) in enumerate(rows):
            row = mask[i]
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        index = torch.tensor([row for row, _ in rows], dtype=torch.long, pin_memory=pin)
        mask = mask.to(device, non_blocking=True)
        index = index.to(device, non_blocking=True)
        bits = self._bits.get(device)
        if bits is None:
            bits = self._bits[device] = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((mask.unsqueeze(-1) >> bits) & 1).bool().reshape(len(rows), -1)  # [R, 32 W]
        vocab = logits.shape[-1]
        width = min(vocab, self.vocab_size)
        full = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)  # [R, V]
        full[:, :width] = allowed[:, :width]
        eos = self.eos_token_id
        if eos is not None and eos < vocab:
            # a grammar the tokenizer cannot spell on allows nothing: the end of sequence
            # ends such a request rather than a sample from no tokens at all
            full[:, eos] |= ~full.any(dim=1)
        masked = logits.clone()
        masked[index] = logits[index].masked_fill(~full, float("-inf"))
        return masked


def advance(matcher: Any, token: int) -> bool:
    """Let ``matcher`` consume ``token``; whether the output is now complete (the
    grammar takes nothing but the end of sequence, or the token was refused, which a
    masked sampler never does)."""
    if not matcher.consume_token(token):
        return True
    return bool(matcher.is_stopped())
