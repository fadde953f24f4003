"""A callable's body that is no callable request, answered as the protocol's INVALID_ARGUMENT with what is wrong.

The SDK reads the body before any code of ours runs. A body that is not JSON, JSON that is no object (`5`,
`true`, `[]`), or JSON Python's parser refuses (an integer of 5,000 digits, arrays nested 5,000 deep) raised
inside it and came back HTTP 500 INTERNAL with an ERROR entry "Unhandled error": a caller's mistake told as the
operator's fault (runsync answers such bodies 400). An object without `data`, or with more, or a body not sent as
JSON, it answered "Bad Request" alone. A GET or a CORS preflight goes to the SDK as it came.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Request, Response, jsonify, make_response
from flask_cors import cross_origin

log = logging.getLogger("functions.callable_body")

NOT_JSON = "Bad Request: send the body as JSON (Content-Type: application/json)"
NOT_A_CALL = 'Bad Request: the body must be a JSON object {"data": ...} and nothing else'
MAX_DEPTH = 64  # arrays and objects within each other; no request of the contract's nests past 3
TOO_DEEP = f"Bad Request: the body nests arrays or objects more than {MAX_DEPTH} deep"


def problem(request: Request) -> str | None:
    """What makes a POST no callable request, or None (also for any other method)."""
    if request.method != "POST":
        return None
    if request.mimetype != "application/json":  # the SDK's own test: the media type, any charset
        return NOT_JSON
    try:
        body = json.loads(request.get_data(cache=True))  # cached: the SDK reads the same bytes again
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return NOT_A_CALL
    if not (isinstance(body, dict) and body.keys() == {"data"}):
        return NOT_A_CALL
    # This parse runs a few frames above the SDK's own: a body nested just short of Python's recursion limit here
    # passed, and the SDK's parse of it raised RecursionError, HTTP 500 INTERNAL (the fuzz audit).
    return TOO_DEEP if _deeper_than(body, MAX_DEPTH) else None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest in `value` more than `limit` deep (walked without recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def guarded(endpoint: Callable[[Request], Any], origins: Any = "*") -> Callable[[Request], Any]:
    """`endpoint` (what `@https_fn.on_call` made) behind the check; `origins` as its CORS options give them (the
    SDK's default "*"), so that a browser reads the refusal instead of a CORS error."""

    @cross_origin(methods="POST", origins=origins)
    def refuse(message: str) -> Response:
        return make_response(jsonify(error={"status": "INVALID_ARGUMENT", "message": message}), 400)

    @functools.wraps(endpoint)  # the SDK's endpoint attributes too: deploy's discovery reads them
    def call(request: Request) -> Any:
        message = problem(request)
        if message is None:
            return endpoint(request)
        fields = {"function": endpoint.__name__, "error": message, "bytes": request.content_length}
        log.warning("callable_body_unreadable", extra=fields)
        return refuse(message)

    return call
