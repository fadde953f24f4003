"""firegen_core/redaction.py, the logs' last guard, on credentials Hypothesis draws in each form it names (a URL's
or a form's parameter, percent-encoded or not, in any case; a bearer token; an OAuth token in JSON text, quoted
either way or escaped; a bare JWT, Google access token or RunPod key; a private key, whole or cut short), with
any text around them: the credential never comes out, what stands before it does, and a redacted line is left
as it is. (The hand-picked cases, and the words that only look like one, are in tests/test_credentials.py.)
`REDACTION_EXAMPLES` sets how many each test draws (default 300)."""

from __future__ import annotations

import os
import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from firegen_core.redaction import redact, redacted

SETTINGS = settings(max_examples=int(os.environ.get("REDACTION_EXAMPLES", "300")), deadline=None, database=None)

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
B64URL = ALNUM + "-_"


def cased(word: str):
    """`word` in any mix of cases (the guard reads names and percent-escapes in any case)."""
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda upper: "".join(c.upper() if u else c.lower() for c, u in zip(word, upper))
    )


def secret(alphabet: str, escapes: tuple[str, ...] = (), min_size: int = 8):
    """A credential's value: characters of `alphabet`, and percent-escapes of a URL's (never %26: it ends one)."""
    piece = st.sampled_from(list(alphabet) + list(escapes))
    return st.lists(piece, min_size=min_size, max_size=40).map("".join)


# The text around: anything, then (where a bare credential must start a run of its characters) a boundary.
around = st.text(max_size=30)


def not_in(excluded: str):
    return st.characters(codec="utf-8").filter(lambda c: not re.match(excluded, c))


def assert_guarded(text: str, value: str, before: str) -> None:
    assume(value not in before and text.count(value) == 1)
    shown = redact(text)
    assert value not in shown, shown
    assert shown.startswith(before), shown
    assert redact(shown) == shown  # the guard's own output is left as it is
    assert redacted({"k": [text]}) == {"k": [shown]}


PARAMETERS = [
    "token",
    "Signature",
    "X-Goog-Signature",
    "X-Goog-Credential",
    "key",
    "api_key",
    "apikey",
    "x-api-key",
    "private_key",
    "access_token",
    "refresh_token",
    "id_token",
    "client_secret",
]
URL_VALUE = secret(ALNUM + "-_.~+/=:@!$()*,;", ("%2F", "%2f", "%40", "%2B", "%3D", "%3d", "%20"))


@SETTINGS
@given(
    before=around,
    after=around,
    name=st.sampled_from(PARAMETERS).flatmap(cased),
    start=st.sampled_from(["?", "&", "%3F", "%3f", "%26"]),
    equals=st.sampled_from(["=", "%3D", "%3d"]),
    value=URL_VALUE,
    end=st.sampled_from(["", "&n=1", "%26n%3D1", " ", "\n", '"', "'", "\\"]),
)
def test_a_parameter_never_shows_its_value(before, after, name, start, equals, value, end):
    text = f"{before}https://h/o{start}{name}{equals}{value}{end}{after}"
    assert_guarded(text, value, before + "https://h/o")
    if end and redact(end + after) == end + after:  # the rest of the line is kept: the value ends where it does
        assert redact(text).endswith(end + after)


@SETTINGS
@given(
    before=around,
    after=around,
    space=st.text(alphabet=" \t", min_size=1, max_size=3),
    value=secret(ALNUM + "-._~+/", min_size=1).map(lambda v: v + "=="),
    end=st.sampled_from(["", " ", "\n", '"', "'", ",", "&x=1"]),
)
def test_a_bearer_token_never_shows(before, after, space, value, end):
    text = f"{before}Authorization: Bearer{space}{value}{end}{after}"
    assume(len(value) >= 8)
    assert_guarded(text, value, before + "Authorization: Bearer")


def test_a_bearer_token_in_another_case_never_shows_and_prose_stays():
    """A review: HTTP takes the scheme in any case, and "Authorization: bearer <token>" went out whole. In another
    case than "Bearer", a token's length of token text after it is a token; shorter, it is prose."""
    for scheme in ("bearer", "BEARER", "bEaReR"):
        assert (
            redact(f"Authorization: {scheme} lowercasetoken123456 sent") == f"Authorization: {scheme} <redacted> sent"
        )
    assert redact("the bearer of the news, the bearer  of it") == "the bearer of the news, the bearer  of it"


@SETTINGS
@given(
    before=around,
    after=around,
    name=st.sampled_from(["access_token", "refresh_token", "id_token", "client_secret"]).flatmap(cased),
    quote=st.sampled_from(['"', "'", '\\"']),
    colon=st.sampled_from([":", ": ", " : ", ":\n  "]),
    value=secret(ALNUM + "-._~+/="),
)
def test_an_oauth_token_in_json_text_never_shows(before, after, name, quote, colon, value):
    text = f"{before}{{{quote}{name}{quote}{colon}{quote}{value}{quote}, {quote}n{quote}: 1}}{after}"
    assert_guarded(text, value, before)


@SETTINGS
@given(
    before=around,
    boundary=not_in(r"[\w-]"),
    after=around,
    header=secret(B64URL, min_size=4),
    claims=secret(B64URL, min_size=4),
    signature=secret(B64URL, min_size=8),
)
def test_a_bare_jwt_never_shows(before, boundary, after, header, claims, signature):
    value = f"eyJ{header}.eyJ{claims}.{signature}"
    assert_guarded(f"{before}{boundary}{value} {after}", signature, before + boundary)


@SETTINGS
@given(before=around, boundary=not_in(r"[\w.-]"), after=around, value=secret(ALNUM + "-_.", min_size=12))
def test_a_bare_google_access_token_never_shows(before, boundary, after, value):
    assert_guarded(f"{before}{boundary}ya29.{value} {after}", value, before + boundary)


@SETTINGS
@given(before=around, boundary=not_in(r"\w"), after=around, value=secret(ALNUM, min_size=16))
def test_a_bare_runpod_key_never_shows(before, boundary, after, value):
    assert_guarded(f"{before}{boundary}rpa_{value} {after}", value, before + boundary)


@SETTINGS
@given(
    before=around,
    after=around,
    kind=st.sampled_from(["", "RSA ", "EC "]),
    lines=st.lists(secret(ALNUM + "+/=", min_size=16), min_size=1, max_size=4),
    cut=st.booleans(),
)
def test_a_private_key_never_shows_whole_or_cut_short(before, after, kind, lines, cut):
    body = "\n".join(lines)
    end = "" if cut else f"\n-----END {kind}PRIVATE KEY-----{after}"
    text = f"{before}-----BEGIN {kind}PRIVATE KEY-----\n{body}{end}"
    for line in lines:
        assume(line not in after)
        assert_guarded(text, line, before)
