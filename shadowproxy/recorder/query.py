"""Query-string redaction: the values of secret-bearing parameters become "[redacted]".

Applied to what is stored (``requests.query``) and to what is logged (the access log); the
upstreams get the query string as the client sent it. Parameters are ``&``-separated
``name=value`` pairs; a name is compared case-insensitively and after percent-decoding,
so ``API_KEY=`` and ``%61pi_key=`` are caught as ``api_key=`` is. The rest of the query
string is kept byte for byte.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

REDACTED = "[redacted]"


class QueryRedactor:
    """``recording.redact_query`` applied to query strings."""

    def __init__(self, names: list[str]) -> None:
        self._names = frozenset(name.lower() for name in names)

    def __call__(self, query: str) -> str:
        """``query`` with the value of every listed parameter replaced."""
        if not query or not self._names:
            return query
        parts = query.split("&")
        changed = False
        for i, part in enumerate(parts):
            name, sep, value = part.partition("=")
            if not sep or value == REDACTED:
                continue  # a bare name carries no value to hide
            key = unquote_plus(name) if "%" in name or "+" in name else name
            if key.lower() in self._names:
                parts[i] = f"{name}={REDACTED}"
                changed = True
        return "&".join(parts) if changed else query
