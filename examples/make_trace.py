"""Write examples/chat_then_documents.jsonl: 300 Poisson arrivals at 20 requests/s,
short chat prompts, then 100 long documents, then chat again (seeded)."""

from __future__ import annotations

import json
import random
from pathlib import Path


def main() -> None:
    rng = random.Random(0)
    arrival_s = 0.0
    lines = []
    for i in range(300):
        arrival_s += rng.expovariate(20)
        is_document = 100 <= i < 200
        prompt_tokens = rng.randint(4000, 16000) if is_document else rng.randint(64, 512)
        record = {
            "arrival_s": round(arrival_s, 4),
            "prompt_tokens": prompt_tokens,
            "output_tokens": rng.randint(32, 256),
        }
        lines.append(json.dumps(record))
    path = Path(__file__).with_name("chat_then_documents.jsonl")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({len(lines)} requests)")


if __name__ == "__main__":
    main()
