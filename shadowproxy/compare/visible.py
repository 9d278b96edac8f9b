"""Recorded strings made safe to show: the characters that act instead of being seen,
written as their escapes.

Field names, values, texts, finish reasons and request ids in a report come from clients
and shadows. Sent as they are to a terminal (the text report, or Markdown printed to
stdout), control characters move the cursor, clear the screen, retitle the window, make
hyperlinks (OSC 8) or overwrite a line (CR), and bidirectional overrides show a line's
characters in another order: a shadow could hide or fake what the report says. Such a
character is shown as ``\\x1b`` or ``\\u202e``; the JSON report keeps every string exact.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls; the bidirectional controls (ALM, LRM,
# RLM, the embeddings and overrides LRE RLE PDF LRO RLO, the isolates LRI RLI FSI PDI) and
# the line and paragraph separators, which terminals and viewers act on.
_ACTING = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                     "\u2066-\u2069\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xff else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with each character that acts on a terminal or viewer (but tab and newline)
    written as its escape: ``\\x1b``, ``\\x0d``, ``\\u202e``."""
    return _ACTING.sub(_escape, text)


def one_line(text: str) -> str:
    """``visible(text)`` with its newlines written as ``\\n`` too: on one line. A text
    printed to a terminal as lines could fake the lines of the report around it (a
    verdict, a section's rule, a tool call)."""
    return visible(text).replace("\n", "\\n")
