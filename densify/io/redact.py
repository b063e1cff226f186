"""Redaction of credentials from text that came from outside (server error bodies, exception messages).

Everything a server says is untrusted: an error body may echo the request's API key. Such text is passed
through `redact` before it is logged, stored in a failure record or put in an exception message.
"""

from __future__ import annotations

import re
from typing import Iterable

__all__ = ["REDACTED", "redact"]

REDACTED = "[redacted]"

# Shapes of credentials that are redacted even when the secret itself is not known.
_PATTERNS = [
    # Authorization header values: "Bearer abc.def", "Basic dXNlcjpw"
    re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=:-]{4,}"),
    # OpenAI-style keys (sk-..., sk-proj-...) and similar prefixed secrets
    re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_-]{6,}"),
    # name=value / "name": "value" pairs whose name says it is a secret
    # passwords in URLs: scheme://user:password@host
    re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)([^/\s@]+)@"),
    re.compile(r"""(?i)((?:api[_-]?key|access[_-]?key|secret|password|passwd|token|authorization|auth)"""
               r"""["']?\s*[:=]\s*["']?)(?!(?:bearer|basic)\s)([^\s"'&,;}]+)"""),
]


def redact(text: object, secrets: Iterable[str | None] = (), limit: int | None = 500) -> str:
    """`text` as a string with every known secret and every credential-like token replaced by
    "[redacted]", cut to `limit` characters (None: no cut). Secrets shorter than 4 characters are not
    searched for (they would redact ordinary text)."""
    s = str(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            s = s.replace(secret, REDACTED)
    s = _PATTERNS[0].sub(lambda m: m.group(1) + m.group(2) + REDACTED, s)
    s = _PATTERNS[1].sub(REDACTED, s)
    s = _PATTERNS[2].sub(lambda m: m.group(1) + REDACTED + "@", s)
    s = _PATTERNS[3].sub(lambda m: m.group(1) + REDACTED if m.group(2) != REDACTED else m.group(0), s)
    if limit is not None and len(s) > limit:
        s = s[:limit] + "..."
    return s
