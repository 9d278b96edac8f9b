"""Query-string redaction: the values of secret-bearing parameters become "[redacted]".

Applied to what is stored (``requests.query``) and to what is logged (the access log); the
upstreams get the query string as the client sent it. Parameters are ``name=value`` pairs
separated by ``&``, or by ``;`` (which some servers, older Rack and Java servlet
containers among them, also take as a separator: a secret after one reaches them as a
parameter of its own). A name is compared case-insensitively and after percent-decoding,
so ``API_KEY=`` and ``%61pi_key=`` are caught as ``api_key=`` is, and in the bracket
notation of Rack, PHP and Rails each part counts: ``api_key[]=``, ``api_key[0]=`` and
``user[password]=``. The rest of the query string is kept byte for byte.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

REDACTED = "[redacted]"
_SEPARATED = re.compile(r"([&;])")
_BRACKETED = re.compile(r"\[([^\]]*)\]")


class QueryRedactor:
    """``recording.redact_query`` applied to query strings."""

    def __init__(self, names: list[str]) -> None:
        self._names = frozenset(name.lower() for name in names)

    def __call__(self, query: str) -> str:
        """``query`` with the value of every listed parameter replaced."""
        if not query or not self._names:
            return query
        # With a ";" the separators are kept in the list (odd places), to be joined back.
        parts = _SEPARATED.split(query) if ";" in query else query.split("&")
        step = 2 if ";" in query else 1
        changed = False
        for i in range(0, len(parts), step):
            part = parts[i]
            name, sep, value = part.partition("=")
            if not sep or value == REDACTED:
                continue  # a bare name carries no value to hide
            key = unquote_plus(name) if "%" in name or "+" in name else name
            if self._listed(key.lower()):
                parts[i] = f"{name}={REDACTED}"
                changed = True
        if not changed:
            return query
        return "".join(parts) if step == 2 else "&".join(parts)

    def _listed(self, key: str) -> bool:
        names = self._names
        if key in names:
            return True
        base, bracket, _ = key.partition("[")
        return bool(bracket) and (base in names or any(
            inner in names for inner in _BRACKETED.findall(key, len(base))))
