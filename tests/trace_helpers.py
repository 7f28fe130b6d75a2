"""Tiny trace files that the bench tests replay as workloads."""

from __future__ import annotations

import json
from pathlib import Path

SYSTEM_TOKENS = 320


def write_chat_jsonl(path: Path, num_requests: int = 6, output_tokens: int = 8) -> Path:
    """JSONL whose prompts share a system prompt (``segments``), then a question each."""
    with path.open("w") as handle:
        for i in range(num_requests):
            question = 40 + 16 * i
            row = {"arrival_s": 0.05 * i, "prompt_tokens": SYSTEM_TOKENS + question,
                   "output_tokens": output_tokens,
                   "segments": [["system", SYSTEM_TOKENS], [f"q{i}", question]]}
            handle.write(json.dumps(row) + "\n")
    return path


def write_lengths_csv(path: Path, num_requests: int = 5) -> Path:
    """A CSV of arrival times and lengths under other names than ours; shares nothing."""
    rows = [f"{0.1 * i:.1f},{200 + 50 * i},{6 + i}" for i in range(num_requests)]
    path.write_text("timestamp,input_len,output_len\n" + "\n".join(rows) + "\n")
    return path


def write_mooncake(path: Path) -> Path:
    """Mooncake JSONL: three prompts over the same first two 512-token blocks."""
    rows = [{"timestamp": 100 * i, "input_length": 1024 + 100 * (i + 1), "output_length": 6,
             "hash_ids": [7, 8, 20 + i]} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_conversation_jsonl(path: Path) -> Path:
    """Two turns of one conversation: the second prompt holds the first's output."""
    rows = [
        {"arrival_s": 0.0, "prompt_tokens": 100, "output_tokens": 20,
         "segments": [["u1", 100]], "output_segment": "a1"},
        {"arrival_s": 2.0, "prompt_tokens": 150, "output_tokens": 20,
         "segments": [["u1", 100], ["a1", 20], ["u2", 30]]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
