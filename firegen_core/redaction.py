"""The last guard of the logs, shared by the worker and the functions: what looks like a credential in a line (a
signed URL's signature, a download token, an API key parameter, a bearer token, an OAuth token in JSON text or
bare, a JWT, a RunPod API key, a Hugging Face token, a private key) is replaced
by `<redacted>` before it is written; so is the value of each credential the process holds in its environment
(`SECRET_VARIABLES`), whatever its shape (a RunPod API key made before RunPod's `rpa_` prefix). Nothing should pass a
secret to a log call; this is for what slips through."""

from __future__ import annotations

import os
import re
from typing import Any

_TOKEN_NAMES = r"access_token|refresh_token|id_token|client_secret"
_SECRETS = re.compile(
    # A URL's or a form's parameter, also percent-encoded (a URL inside another URL's query: its value ends at %26).
    r"(?P<keep>(?:(?:[?&]|%3F|%26)(?:X-Goog-Signature|X-Goog-Credential|Signature|token|(?:[\w-]*[_-])?(?:api[_-]?)?key|"
    + _TOKEN_NAMES
    + r")"
    r"(?:=|%3D))"
    # "Bearer" as the scheme is spelled; in another case (HTTP takes any) only before a token's length of token text,
    # so that prose ("the bearer of") stays (a review: "Authorization: bearer <token>" went out whole).
    r"|(?:(?:(?-i:Bearer)|bearer(?=[ \t]+[\w.~+/=-]{16}))[ \t]+)"
    # An OAuth token in JSON text (a token endpoint's answer quoted in an error), also with its quotes escaped.
    r"|(?:\\?[\"'](?:" + _TOKEN_NAMES + r")\\?[\"']\s*:\s*\\?[\"']))(?:(?!%26)[^&\s\"'\\])+"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
    # Bare: a JWT (a Firebase ID token, an App Check token), a Google OAuth access token, a RunPod API key, a
    # Hugging Face token.
    # Each starts only where its run of token characters starts: a start inside the run would scan to its end
    # again (a review: 64 KB of "eyJ-" took 5.7 s).
    r"|(?<![\w-])(?-i:eyJ)[\w-]{4,}\.(?-i:eyJ)[\w-]{4,}\.[\w-]*|(?<![\w.-])(?-i:ya29\.)[\w.-]+"
    r"|(?<!\w)(?-i:rpa_)[A-Za-z0-9]{16,}|(?<!\w)(?-i:hf_)[A-Za-z0-9]{30,}",
    re.IGNORECASE | re.DOTALL,
)
# The variables that hold a credential where this code runs: the functions' Firebase secret, the RunPod worker's own
# key (RunPod sets it in each worker), the worker's service account key (its base64 matches no pattern; a key file's
# path there is taken out too, which costs nothing). Read at each call: a secret set after import counts.
SECRET_VARIABLES = (
    "RUNPOD_API_KEY",
    "RUNPOD_AI_API_KEY",
    "FIREBASE_SERVICE_ACCOUNT_JSON",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "HF_TOKEN",  # a gated model's download: a volume's fill, a worker with HF_HUB_OFFLINE=0
)
# Shorter values are no credential (a placeholder such as "x"): replacing them would garble every line.
_SHORTEST_SECRET = 12
# Deeper than this, a value is written as its redacted text (a value that holds itself would recurse for ever).
_DEPTH = 8


def redact(text: str) -> str:
    text = _SECRETS.sub(lambda m: (m.group("keep") or "") + "<redacted>", text)
    for name in SECRET_VARIABLES:
        value = os.environ.get(name, "").strip()
        if len(value) >= _SHORTEST_SECRET and value in text:
            text = text.replace(value, "<redacted>")
    return text


# A wrong setting is quoted back only while short: a long one may be a secret pasted into the wrong variable (an
# audit: a service account's key set as STORAGE_BUCKET was printed whole, private key and all, into the logs).
QUOTED_AT_MOST = 64


def got(value: Any) -> str:
    """How a message about a wrong setting shows the value it got: "(got 'abc')", redacted, or its length alone."""
    quoted = redact(repr(value))
    if len(quoted) <= QUOTED_AT_MOST:
        return f"(got {quoted})"
    return f"(got {len(str(value))} characters, not shown)"


def redacted(value: Any, depth: int = 0) -> Any:
    """`value` with every string in it redacted, within lists, tuples and dicts too (a field of URLs)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict | list | tuple) and depth >= _DEPTH:
        return redact(repr(value))
    if isinstance(value, dict):
        return {key: redacted(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redacted(item, depth + 1) for item in value]
    if value is None or isinstance(value, int | float | bool):
        return value
    # Anything else (an exception, bytes, a date) as its text, redacted: passed on, the JSON renderer wrote its repr
    # after this guard, unredacted (a review: `error=exc` quoting a bearer token went out whole).
    return redact(str(value))
