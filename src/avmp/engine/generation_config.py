"""A checkpoint's ``generation_config.json``: the end-of-sequence ids and the sampling
defaults its authors ship with it, read as vLLM reads them.

Why it matters: a chat checkpoint often ends its turns with a token that is not the
``eos_token_id`` of its ``config.json`` (``<|im_end|>`` beside ``<|endoftext|>``; Llama 3
lists three), and only ``generation_config.json`` names all of them. A server that reads
``config.json`` alone lets such a model talk past the end of its turn until
``max_tokens``. vLLM adds the file's ids to every request's stop ids
(`SamplingParams.update_from_generation_config`) and, with ``--generation-config auto``
(its default), takes the sampling values the file sets as the defaults of requests that
leave them out; ``vllm`` keeps its neutral defaults, and a path reads another directory's
file.

What is read, as vLLM does:
- ``eos_token_id``: an id or a list of ids, every one a stop id (unless the request
  ignores the end of sequence), whatever the sampling choice.
- ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and
  ``max_new_tokens``: only where the file sets a value other than transformers'
  `GenerationConfig` default (vLLM takes ``to_diff_dict()``), so a file that writes
  ``"top_k": 50`` or ``"temperature": 1.0`` changes nothing. ``max_new_tokens`` caps
  every request's output length, as in vLLM.

No torch here: the file is JSON, read with the standard library.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERATION_CONFIG_FILE = "generation_config.json"
AUTO = "auto"
NEUTRAL = "vllm"  # vLLM's name for its own neutral defaults
CHOICES_HELP = (
    "auto (the checkpoint's generation_config.json sets the defaults of sampling "
    "values a request leaves out; default), vllm (neutral defaults, as vLLM's choice of "
    "that name), or a directory or file holding another generation_config.json; its "
    "end-of-sequence ids stop generation in every case"
)

# transformers' GenerationConfig defaults: a value equal to one of them is no default of
# the checkpoint's own (vLLM reads `to_diff_dict()`, which leaves them out)
_TRANSFORMERS_DEFAULTS: dict[str, float | None] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "min_p": None,
    "repetition_penalty": 1.0,
    "max_new_tokens": None,
}


class GenerationConfigError(ValueError):
    """A generation config that cannot be read; the message names the file."""


@dataclass(frozen=True)
class GenerationDefaults:
    """What a generation config gives a model's requests.

    Attributes:
        eos_token_ids: ids that end a request (besides ``config.json``'s), in file order.
        temperature, top_p, top_k, min_p, repetition_penalty: the defaults of requests
            that leave them out (None: the API's own).
        max_tokens: ``max_new_tokens``, a cap on every request's output (None: none).
        source: the file read (None: none).
    """

    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    source: str | None = None

    def sampling(self) -> dict[str, float | int]:
        """The sampling defaults set, by the API's names (``max_tokens`` for
        ``max_new_tokens``)."""
        names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")
        return {name: value for name in names if (value := getattr(self, name)) is not None}

    def without_sampling(self) -> GenerationDefaults:
        """The end-of-sequence ids alone (``--generation-config vllm``)."""
        return GenerationDefaults(self.eos_token_ids, source=self.source)

    def describe(self) -> str:
        """One line for a log: what the file set, and where it came from."""
        if self.source is None:
            return "no generation config"
        values = ", ".join(f"{name} {value}" for name, value in self.sampling().items())
        ids = ", ".join(map(str, self.eos_token_ids))
        parts = [f"end-of-sequence ids {ids}" if ids else "", values and f"defaults {values}"]
        return f"{self.source}: " + ("; ".join(p for p in parts if p) or "nothing to apply")


def resolve_generation_config(choice: str, model: object) -> GenerationDefaults:
    """The generation defaults that ``choice`` names for ``model`` (a checkpoint
    directory, or a built model, which has no file of its own).

    Args:
        choice: ``auto``, ``vllm`` or a path (`CHOICES_HELP`).

    Raises:
        GenerationConfigError: a path that holds no generation config, or a file that
            is not one (a one-line message naming it).
    """
    if choice in (AUTO, NEUTRAL):
        found = _file_in(model) if isinstance(model, (str, Path)) else None
        defaults = GenerationDefaults() if found is None else read_generation_config(found)
        return defaults if choice == AUTO else defaults.without_sampling()
    path = Path(choice).expanduser()
    if path.is_dir():
        path = path / GENERATION_CONFIG_FILE
    if not path.is_file():
        raise GenerationConfigError(f"{choice}: no {GENERATION_CONFIG_FILE} there")
    return read_generation_config(path)


def _file_in(model: str | Path) -> Path | None:
    """The checkpoint directory's generation config, if it has one."""
    path = Path(model) / GENERATION_CONFIG_FILE
    return path if path.is_file() else None


def read_generation_config(path: Path) -> GenerationDefaults:
    """The defaults of one ``generation_config.json``.

    Raises:
        GenerationConfigError: not a JSON object, an id that is not a non-negative
            integer, or a sampling value out of its range.
    """
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GenerationConfigError(f"{path}: cannot read it ({error})") from None
    if not isinstance(loaded, dict):
        raise GenerationConfigError(f"{path}: expected a JSON object")
    try:
        return GenerationDefaults(
            eos_token_ids=_token_ids(loaded.get("eos_token_id")),
            temperature=_value(loaded, "temperature", 0.0, math.inf),
            top_p=_value(loaded, "top_p", 0.0, 1.0, low_open=True),
            top_k=_whole(_value(loaded, "top_k", -1, math.inf), "top_k"),
            min_p=_value(loaded, "min_p", 0.0, 1.0),
            repetition_penalty=_value(loaded, "repetition_penalty", 0.0, math.inf, low_open=True),
            max_tokens=_whole(_value(loaded, "max_new_tokens", 1, math.inf), "max_new_tokens"),
            source=str(path),
        )
    except ValueError as error:
        raise GenerationConfigError(f"{path}: {error}") from None


def _token_ids(value: Any) -> tuple[int, ...]:
    values = [] if value is None else value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"eos_token_id must be an id or a list of ids, got {value!r}")
    return tuple(dict.fromkeys(values))  # file order, each once


def _value(
    loaded: dict[str, Any], name: str, low: float, high: float, low_open: bool = False
) -> float | None:
    """A sampling value the file sets apart from transformers' default, checked."""
    value = loaded.get(name)
    if value is None or value == _TRANSFORMERS_DEFAULTS[name]:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (low < value if low_open else low <= value) or value > high or math.isnan(value):
        raise ValueError(f"{name} {value} is out of range")
    return float(value)


def _whole(value: float | None, name: str) -> int | None:
    if value is None:
        return None
    if value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(value)
