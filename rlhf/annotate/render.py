"""Split a response into prose and fenced code so both read well — as text, never as HTML.

We deliberately do not run a Markdown-to-HTML converter: those pass raw HTML through, and a
model's response must never become markup in an annotator's browser. The template escapes
every segment; CSS keeps line breaks (white-space: pre-wrap) and boxes the code blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FENCE = re.compile(r"^ {0,3}(```|~~~)\s*([\w+.#-]*)")


@dataclass(frozen=True)
class Segment:
    kind: str  # "text" or "code"
    text: str
    language: str = ""


def segments(text: str) -> list[Segment]:
    """Prose and ``` / ~~~ fenced blocks, in order. An unclosed fence runs to the end, as in
    CommonMark, so a truncated response still shows its code as code."""
    result: list[Segment] = []
    buffer: list[str] = []
    fence: str | None = None
    language = ""

    def flush(kind: str) -> None:
        body = "\n".join(buffer)
        if kind == "code" or body.strip():
            result.append(Segment(kind, body.strip("\n") if kind == "text" else body, language))
        buffer.clear()

    for line in text.split("\n"):
        match = FENCE.match(line)
        if fence is None and match:
            flush("text")
            fence, language = match.group(1), match.group(2)
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[3:].strip():
            flush("code")
            fence, language = None, ""
        else:
            buffer.append(line)
    flush("code" if fence is not None else "text")
    return result
