"""Text in and out: a checkpoint's own tokenizer, or the Mistral tokenizer shipped inside
mistral-common (for demos whose random-weight model has none); without either the
engine works on token ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

MISTRAL_TOKENIZER_FILE = "tokenizer.model.v1"  # 32,000-token SentencePiece, in mistral_common/data
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(
        self,
        token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """The text of ``token_ids``; special tokens (end of sequence, chat markers) are
        left out unless ``skip_special_tokens`` is False; ``spaces_between_special_tokens``
        as Hugging Face's slow tokenizers take it (fast ones and mistral-common's write
        no spaces either way)."""
        ...


class HFTokenizer:
    """A checkpoint's tokenizer through transformers' AutoTokenizer."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self._tok: Any = AutoTokenizer.from_pretrained(str(path))
        self.vocab_size = len(self._tok)
        self.eos_token_id: int | None = self._tok.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(
        self,
        token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        ids = in_vocabulary(token_ids, self.vocab_size)
        if spaces_between_special_tokens:  # the default; fast tokenizers take no such option
            return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens,
                                    spaces_between_special_tokens=False))  # fmt: skip


class MistralTokenizer:
    """The SentencePiece tokenizer file that mistral-common ships (no download)."""

    def __init__(self) -> None:
        try:
            import mistral_common
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as _Mistral
        except ImportError as error:
            raise ValueError(
                f"the demo tokenizer needs mistral-common ({error}): "
                "pip install 'mistral-common[sentencepiece]', or pass a checkpoint "
                "directory with its own tokenizer"
            ) from None

        path = Path(mistral_common.__file__).parent / "data" / MISTRAL_TOKENIZER_FILE
        self._tok: Any = _Mistral.from_file(str(path)).instruct_tokenizer.tokenizer
        self.vocab_size = int(self._tok.n_words)
        self.eos_token_id: int | None = int(self._tok.eos_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, bos=add_special_tokens, eos=False))

    def decode(
        self,
        token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        ids = in_vocabulary(token_ids, self.vocab_size)
        if skip_special_tokens:
            return str(self._tok.decode(ids))
        # mistral-common's own policy for keeping them writes raw pieces ("▁Hello"): each
        # run of ordinary tokens is decoded, the special ones are written as they are named
        text, run = [], []
        for token in [*ids, None]:
            if token is not None and not self._tok.is_special(token):
                run.append(token)
                continue
            text.append(str(self._tok.decode(run)) if run else "")
            run = []
            if token is not None:
                text.append(str(self._tok.id_to_piece(token)))
        return "".join(text)


def in_vocabulary(token_ids: list[int], vocab_size: int) -> list[int]:
    """The ids that the tokenizer knows. A model's embedding may have more rows than its
    tokenizer has tokens (vocabularies padded to a multiple of 64 or 128; a demo tokenizer
    beside a random model with a larger vocabulary), and it may sample one of them: such
    a token has no text, so it decodes to nothing rather than failing the request."""
    return [t for t in token_ids if 0 <= t < vocab_size]


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when its directory has no tokenizer files."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return HFTokenizer(path)
