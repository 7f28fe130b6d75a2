"""docs/BENCHMARKS.md's contents list every section, in order, each linking to the anchor
GitHub gives its heading."""

from __future__ import annotations

import re

from benchmarks.common import REPO_ROOT

DOC = REPO_ROOT / "docs" / "BENCHMARKS.md"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_contents_list_every_section_in_order() -> None:
    lines = DOC.read_text().splitlines()
    headings = [line[3:] for line in lines if line.startswith("## ") and line != "## Contents"]
    start = lines.index("## Contents") + 1
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    entries = [line for line in lines[start:end] if line.startswith("- [")]
    expected = [f"- [{h.replace('`', '')}](#{_anchor(h)})" for h in headings]
    assert entries == expected
