"""Finds the runnable code blocks of the documentation.

A block is runnable when the line before its opening fence is ``<!-- run -->``. The
runnable blocks of one page run in order, as one program, so a later block may use what an
earlier one defined (the way a reader runs them); ``<!-- run: slow -->`` marks a page's
blocks as too long for the normal suite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
MARKER = re.compile(r"^<!--\s*run(?::\s*(?P<mark>slow))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w-]*)")


@dataclass
class Page:
    path: Path
    #: (line number of the opening fence, code) in page order
    blocks: list[tuple[int, str]] = field(default_factory=list)
    slow: bool = False

    @property
    def program(self) -> str:
        """The page's blocks as one script; line numbers in tracebacks point at the page."""
        lines: list[str] = []
        for start, code in self.blocks:
            lines += [""] * (start - len(lines))
            lines += code.splitlines()
        return "\n".join(lines) + "\n"


def runnable_pages(root: Path = DOCS) -> list[Page]:
    pages = []
    for path in sorted(root.rglob("*.md")):
        page = parse(path)
        if page.blocks:
            pages.append(page)
    return pages


def parse(path: Path) -> Page:
    page = Page(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        if marker is None:
            i += 1
            continue
        opening = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if opening is None or opening["lang"] not in ("python", "py"):
            raise ValueError(f"{path}:{i + 1}: <!-- run --> must come right before a ```python fence")
        page.slow = page.slow or marker["mark"] == "slow"
        fence, indent = opening["fence"], len(opening["indent"])
        end = i + 2
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{i + 2}: the runnable block is never closed")
        # the program's line n is the page's line n (1-based: the fence is line i + 2)
        page.blocks.append((i + 2, "\n".join(line[indent:] for line in lines[i + 2:end])))
        i = end + 1
    return page
