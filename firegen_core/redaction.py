"""The last guard of the logs, shared by the worker and the functions: what looks like a credential in a line (a
signed URL's signature, a download token, a bearer token, an OAuth token in JSON text, a private key) is replaced
by `<redacted>` before it is written. Nothing should pass a secret to a log call; this is for what slips through."""

from __future__ import annotations

import re
from typing import Any

_SECRETS = re.compile(
    # A URL's query parameter, also percent-encoded (a URL inside another URL's query).
    r"(?P<keep>(?:(?:[?&]|%3F|%26)(?:X-Goog-Signature|X-Goog-Credential|Signature|token|access_token|key)(?:=|%3D))"
    r"|(?:Bearer\s+)"
    # An OAuth token in JSON text (a token endpoint's answer quoted in an error).
    r"|(?:[\"'](?:access_token|refresh_token|id_token|client_secret)[\"']\s*:\s*[\"']))[^&\s\"']+"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
    re.IGNORECASE | re.DOTALL,
)


def redact(text: str) -> str:
    return _SECRETS.sub(lambda m: (m.group("keep") or "") + "<redacted>", text)


def redacted(value: Any) -> Any:
    """`value` with every string in it redacted, within lists, tuples and dicts too (a field of URLs)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redacted(item) for item in value]
    return value
