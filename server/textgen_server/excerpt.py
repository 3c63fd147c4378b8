"""The one way an error message quotes what a client sent: a short, truncated, escaped excerpt
(and a number as it was sent).

Status messages travel in HTTP/2 trailers, which gRPC caps at a few kilobytes: an error that echoes a
10,000-character field whole reaches the client as RESOURCE_EXHAUSTED ("received metadata size
exceeds hard limit") instead of its own code. Every message built from user text quotes it through
`excerpt`.
"""

from __future__ import annotations

from collections.abc import Sequence

EXCERPT_CHARS = 32
EXCERPT_ITEMS = 5


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` quoted as repr() does, cut to `limit` characters with its full length said when cut."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def excerpt_list(texts: Sequence[str], most: int = EXCERPT_ITEMS) -> str:
    """The first `most` of `texts`, each an excerpt, and how many more there are."""
    listed = ", ".join(excerpt(text) for text in texts[:most])
    return listed + (f" and {len(texts) - most} more" if len(texts) > most else "")


def number(value: float) -> str:
    """A number as sent: short where that is exact (7, 0.5, 1e+300), else every digit it has
    (5.0000001 stays 5.0000001, where the short form would print 5 beside a bound of 5)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)
