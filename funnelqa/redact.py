"""Credentials written into URLs (``http://user:KEY@host/v1``, ``?key=...``) never leave the process:
specs are redacted before they reach records, the cache or an error line."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@?#]+@")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:key|api[_-]?key|apikey|token|access[_-]?token|auth|password|secret|sig|signature)=)[^&;#\s\"']+",
    re.I,
)
MASK = "***"


def redact(text: str) -> str:
    """``text`` with the user:password part and secret query parameters of every URL in it masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m.group('name')}{MASK}", text)
